//! Dot products and scaled adds written so the compiler vectorizes them lane by lane (eight
//! partial sums, combined in a fixed tree): the same order, so the same bits, with or without
//! AVX, since Rust never fuses a multiply and an add on its own. Attention and float
//! matmuls use them so every row's result is independent of its neighbours.

/// [`dot`] for callers that already run with AVX2 enabled (it inlines there).
#[inline(always)]
pub fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// [`axpy`] for callers that already run with AVX2 enabled (it inlines there).
#[inline(always)]
pub fn axpy_lanes(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn axpy_avx2(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_lanes(a, x, y)
}

/// Whether this CPU runs AVX2 (checked once).
#[cfg(target_arch = "x86_64")]
pub fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2"))
}

/// Sum of a[i] * b[i] over the shorter of the two.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 is present (checked).
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// y += a * x.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 is present (checked).
        return unsafe { axpy_avx2(a, x, y) };
    }
    axpy_lanes(a, x, y)
}
