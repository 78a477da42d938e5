//! Our own CPU matmul kernels for the two weight types the default model uses, Q4_1 and Q8_0
//! (candle's Q4_1 dot product is scalar). Activations are quantized once per row to 8 bits in
//! blocks of 32 (llama.cpp's Q8_1 pairing: a scale and the block's scaled sum), weights keep
//! their stored blocks with f16 scales widened to f32 at load. Each output is one dot product
//! over its own weight row in a fixed order, so results do not depend on how rows are stacked,
//! tiled or split across threads: stages stay bit-identical to the whole model.

use crate::error::{EngineError, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Values per quantization block.
const QK: usize = 32;

/// A weight matrix (rows = outputs, cols = inputs) in one of our kernel's formats.
pub struct QuantMatrix {
    rows: usize,
    cols: usize,
    /// Blocks per row.
    nb: usize,
    weights: Weights,
}

enum Weights {
    /// 4-bit unsigned quants (16 bytes per block: low nibbles are values 0..16, high 16..32),
    /// value = d * q + m.
    Q4_1 { d: Vec<f32>, m: Vec<f32>, qs: Vec<[u8; 16]> },
    /// 8-bit signed quants, value = d * q.
    Q8_0 { d: Vec<f32>, qs: Vec<[i8; 32]> },
}

/// One activation block: 32 signed 8-bit values, their scale, and scale * sum(q).
#[derive(Clone, Copy)]
struct ActBlock {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

impl QuantMatrix {
    /// Whether a tensor type runs on these kernels.
    pub fn supports(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
    }

    /// Builds the matrix from the stored blocks of one or more tensors with equal column
    /// counts, stacked by rows in order (q/k/v, or gate/up, share one activation pass).
    pub fn from_qtensors(parts: &[&QTensor]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| EngineError::invalid("no tensors to stack"))?;
        let dtype = first.dtype();
        let (_, cols) = first.shape().dims2()?;
        if !Self::supports(dtype) || !cols.is_multiple_of(QK) {
            return Err(EngineError::Unsupported(format!("{dtype:?} with {cols} columns")));
        }
        let nb = cols / QK;
        let mut rows = 0;
        let mut raw = Vec::new();
        for p in parts {
            let (r, c) = p.shape().dims2()?;
            if p.dtype() != dtype || c != cols {
                return Err(EngineError::invalid("stacked tensors differ in type or width"));
            }
            let data = p.data()?;
            if data.len() != r * nb * dtype.type_size() {
                return Err(EngineError::invalid("tensor data has the wrong length"));
            }
            raw.extend_from_slice(&data);
            rows += r;
        }
        let block_bytes = dtype.type_size();
        let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        let weights = match dtype {
            GgmlDType::Q4_1 => {
                let (mut d, mut m, mut qs) = (Vec::new(), Vec::new(), Vec::new());
                for b in raw.chunks_exact(block_bytes) {
                    d.push(h(&b[0..2]));
                    m.push(h(&b[2..4]));
                    let mut q = [0u8; 16];
                    q.copy_from_slice(&b[4..20]);
                    qs.push(q);
                }
                Weights::Q4_1 { d, m, qs }
            }
            _ => {
                let (mut d, mut qs) = (Vec::new(), Vec::new());
                for b in raw.chunks_exact(block_bytes) {
                    d.push(h(&b[0..2]));
                    let mut q = [0i8; 32];
                    for (dst, &src) in q.iter_mut().zip(&b[2..34]) {
                        *dst = src as i8;
                    }
                    qs.push(q);
                }
                Weights::Q8_0 { d, qs }
            }
        };
        Ok(Self { rows, cols, nb, weights })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input width.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` (m, cols) row-major times the transposed weights: (m, rows) row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * self.cols {
            return Err(EngineError::bad_input(format!(
                "matmul input has {} values, expected {m} x {}",
                x.len(),
                self.cols
            )));
        }
        let mut acts = Vec::with_capacity(m * self.nb);
        for row in x.chunks_exact(self.cols) {
            quantize_row(row, &mut acts);
        }
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let n_quads = self.rows.div_ceil(4);
        let acts = &acts[..];
        candle_core::utils::barrier_pool().execute_chunked(n_quads, |range| {
            let out_ptr = &out_ptr;
            for quad in range {
                let r0 = quad * 4;
                let nr = (self.rows - r0).min(4);
                for i in 0..m {
                    let a = &acts[i * self.nb..(i + 1) * self.nb];
                    let mut dots = [0f32; 4];
                    self.dot_rows(r0, nr, a, &mut dots);
                    for (j, &v) in dots[..nr].iter().enumerate() {
                        // SAFETY: (i, r0 + j) is inside the (m, rows) output, and each quad of
                        // rows is written by exactly one worker.
                        unsafe { *out_ptr.0.add(i * self.rows + r0 + j) = v };
                    }
                }
            }
        });
        Ok(out)
    }

    /// Dot products of rows r0..r0+nr (nr <= 4) with one quantized activation row.
    fn dot_rows(&self, r0: usize, nr: usize, a: &[ActBlock], out: &mut [f32; 4]) {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked), and every slice is in bounds.
            unsafe {
                match &self.weights {
                    Weights::Q4_1 { d, m, qs } => x86::q4_1_rows(d, m, qs, self.nb, r0, nr, a, out),
                    Weights::Q8_0 { d, qs } => x86::q8_0_rows(d, qs, self.nb, r0, nr, a, out),
                }
            }
            return;
        }
        for (j, o) in out.iter_mut().enumerate().take(nr) {
            *o = self.dot_portable(r0 + j, a);
        }
    }

    fn dot_portable(&self, row: usize, a: &[ActBlock]) -> f32 {
        let base = row * self.nb;
        let mut acc = 0f32;
        let mut macc = 0f32;
        for (b, act) in a.iter().enumerate() {
            let i = base + b;
            match &self.weights {
                Weights::Q4_1 { d, m, qs } => {
                    let q = &qs[i];
                    let mut sum = 0i32;
                    for j in 0..16 {
                        sum += (q[j] & 0x0F) as i32 * act.qs[j] as i32;
                        sum += (q[j] >> 4) as i32 * act.qs[j + 16] as i32;
                    }
                    acc += sum as f32 * (d[i] * act.d);
                    macc += m[i] * act.s;
                }
                Weights::Q8_0 { d, qs } => {
                    let sum: i32 = qs[i].iter().zip(&act.qs).map(|(&w, &x)| w as i32 * x as i32).sum();
                    acc += sum as f32 * (d[i] * act.d);
                }
            }
        }
        acc + macc
    }
}

struct SendPtr(*mut f32);
// SAFETY: workers write disjoint elements through it (see `matmul`).
unsafe impl Sync for SendPtr {}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Quantizes one row (a whole number of blocks) to 8-bit blocks with scale and scaled sum.
fn quantize_row(x: &[f32], out: &mut Vec<ActBlock>) {
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; 32];
        let mut sum = 0i32;
        for (q, &v) in qs.iter_mut().zip(chunk) {
            let r = (v * inv).round().clamp(-127.0, 127.0) as i8;
            *q = r;
            sum += r as i32;
        }
        out.push(ActBlock { d, s: d * sum as f32, qs });
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ActBlock;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Sum of u8 x i8 products of 32 pairs as eight i32 lanes, then to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(w, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn unpack_nibbles(q: &[u8; 16]) -> __m256i {
        let v = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        let mask = _mm_set1_epi8(0x0F);
        let lo = _mm_and_si128(v, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        _mm256_set_m128i(hi, lo)
    }

    /// Q4_1 rows r0..r0+nr against one activation row.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q4_1_rows(
        d: &[f32],
        m: &[f32],
        qs: &[[u8; 16]],
        nb: usize,
        r0: usize,
        nr: usize,
        a: &[ActBlock],
        out: &mut [f32; 4],
    ) {
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut macc = [0f32; 4];
        for (b, act) in a.iter().enumerate() {
            let x = _mm256_loadu_si256(act.qs.as_ptr() as *const __m256i);
            for j in 0..nr {
                let i = (r0 + j) * nb + b;
                let w = unpack_nibbles(&qs[i]);
                let scale = _mm256_set1_ps(d[i] * act.d);
                acc[j] = _mm256_fmadd_ps(dot_u8_i8(w, x), scale, acc[j]);
                macc[j] += m[i] * act.s;
            }
        }
        for j in 0..nr {
            out[j] = hsum(acc[j]) + macc[j];
        }
    }

    /// Q8_0 rows r0..r0+nr against one activation row.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q8_0_rows(
        d: &[f32],
        qs: &[[i8; 32]],
        nb: usize,
        r0: usize,
        nr: usize,
        a: &[ActBlock],
        out: &mut [f32; 4],
    ) {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, act) in a.iter().enumerate() {
            let x = _mm256_loadu_si256(act.qs.as_ptr() as *const __m256i);
            for j in 0..nr {
                let i = (r0 + j) * nb + b;
                let w = _mm256_loadu_si256(qs[i].as_ptr() as *const __m256i);
                // |w| as unsigned times x with w's sign moved onto it.
                let prod = dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                acc[j] = _mm256_fmadd_ps(prod, _mm256_set1_ps(d[i] * act.d), acc[j]);
            }
        }
        for j in 0..nr {
            out[j] = hsum(acc[j]);
        }
    }
}
