//! The element-wise parts of a decoder block on flat row-major f32 buffers, spread over
//! candle's compute threads by row. They compute exactly what candle's ops compute (the same
//! formulas in the same order), but without a tensor, an allocation or a strided copy per op,
//! and in parallel where candle runs them on one thread: at decode sizes those costs, not the
//! arithmetic, were what kept the second core idle.

use crate::parallel::par_rows;

/// RMS norm of every `alpha.len()`-wide row of `x`, scaled by `alpha`: candle's `rms_norm`
/// (sum of squares in order, `x / sqrt(mean + eps) * alpha`).
pub fn rms_norm(x: &[f32], alpha: &[f32], eps: f32) -> Vec<f32> {
    let n = alpha.len();
    let mut out = vec![0f32; x.len()];
    par_rows(&mut out, n, 2 * n, |i, dst| {
        let src = &x[i * n..(i + 1) * n];
        let sum2 = src.iter().map(|&v| v * v).sum::<f32>();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((d, &s), &a) in dst.iter_mut().zip(src).zip(alpha) {
            *d = s / m * a;
        }
    });
    out
}

/// `silu(gate) * up` for rows laid out as `[gate (ff) | up (ff)]`: candle's `silu` then `*`.
pub fn swiglu(gate_up: &[f32], ff: usize) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len() / 2];
    // expf is some ten times an add.
    par_rows(&mut out, ff, 12 * ff, |i, dst| {
        let (gate, up) = gate_up[2 * i * ff..2 * (i + 1) * ff].split_at(ff);
        for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
            *d = g / (1.0 + (-g).exp()) * u;
        }
    });
    out
}

/// `x += y`, element by element (candle's `+`).
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn sample(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 250.0 - 4.0
            })
            .collect()
    }

    #[test]
    fn rms_norm_is_candles_to_the_bit() {
        let (rows, n) = (37, 96);
        let x = sample(rows * n, 1);
        let alpha = sample(n, 2);
        let xt = Tensor::from_slice(&x, (rows, n), &Device::Cpu).unwrap();
        let at = Tensor::from_slice(&alpha, n, &Device::Cpu).unwrap();
        let want = candle_nn::ops::rms_norm(&xt, &at, 1e-5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(rms_norm(&x, &alpha, 1e-5), want);
    }

    #[test]
    fn swiglu_is_candles_silu_times_up_to_the_bit() {
        let (rows, ff) = (5, 64);
        let gu = sample(rows * 2 * ff, 3);
        let t = Tensor::from_slice(&gu, (rows, 2 * ff), &Device::Cpu).unwrap();
        let want = (t.narrow(1, 0, ff).unwrap().silu().unwrap() * t.narrow(1, ff, ff).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(swiglu(&gu, ff), want);
    }
}
