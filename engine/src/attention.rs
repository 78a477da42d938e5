//! Causal attention over a session's KV cache, one query row and head at a time, in a fixed
//! order: each output depends only on its own query row and the cached keys and values up to
//! its position. So a row's result is the same whether it runs alone, in a prefill chunk of
//! any length, or in a batch beside other sessions' rows: batching and chunked prefill never
//! change numbers.

use crate::parallel::SendPtr;

/// The head layout attention needs.
#[derive(Debug, Clone, Copy)]
pub struct HeadShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

/// One query row of one session: where its query lies, its position, and its session's
/// keys and values.
pub struct QueryRow<'a> {
    /// The row's queries, `heads * head_dim` values, already rotated.
    pub q: &'a [f32],
    /// The row's absolute position: it sees keys `0..=pos`.
    pub pos: usize,
    /// The session's keys, (at least pos + 1, kv_heads, head_dim).
    pub k: &'a [f32],
    /// The session's values, laid out as `k`.
    pub v: &'a [f32],
}

/// Attention for every row of `rows`, written to `out` (rows, heads * head_dim), spread over
/// candle's compute threads by (row, head).
pub fn attend(rows: &[QueryRow<'_>], shape: HeadShape, out: &mut [f32]) {
    let width = shape.heads * shape.head_dim;
    debug_assert_eq!(out.len(), rows.len() * width);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let units = rows.len() * shape.heads;
    candle_core::utils::barrier_pool().execute_chunked(units, |range| {
        let out_ptr = &out_ptr;
        let mut scores = Vec::new();
        for unit in range {
            let (r, h) = (unit / shape.heads, unit % shape.heads);
            let Some(row) = rows.get(r) else { continue };
            // SAFETY: unit (r, h) owns out[r * width + h * d ..][..d]; no other unit writes it.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(
                    out_ptr.0.add(r * width + h * shape.head_dim),
                    shape.head_dim,
                )
            };
            one_head(row, h, shape, &mut scores, dst);
        }
    });
}

/// [`one_head_body`], compiled for AVX2 when the CPU has it so the dot products inline.
fn one_head(row: &QueryRow<'_>, h: usize, s: HeadShape, scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: AVX2 is present (checked).
        return unsafe { one_head_avx2(row, h, s, scores, out) };
    }
    one_head_body(row, h, s, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn one_head_avx2(
    row: &QueryRow<'_>,
    h: usize,
    s: HeadShape,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    one_head_body(row, h, s, scores, out)
}

/// Softmax(q k^T / sqrt(d)) v for head `h` of one row, keys in position order.
#[inline(always)]
fn one_head_body(
    row: &QueryRow<'_>,
    h: usize,
    s: HeadShape,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = s.head_dim;
    let g = h / (s.heads / s.kv_heads).max(1);
    let stride = s.kv_heads * d;
    let q = &row.q[h * d..(h + 1) * d];
    let visible = row.pos + 1;
    let scale = 1.0 / (d as f32).sqrt();
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for j in 0..visible {
        let k = &row.k[j * stride + g * d..][..d];
        let score = crate::simd::dot_lanes(q, k) * scale;
        max = max.max(score);
        scores.push(score);
    }
    let mut sum = 0f32;
    for e in scores.iter_mut() {
        *e = (*e - max).exp();
        sum += *e;
    }
    out.fill(0.0);
    for (j, &e) in scores.iter().enumerate() {
        let v = &row.v[j * stride + g * d..][..d];
        crate::simd::axpy_lanes(e, v, out);
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}
