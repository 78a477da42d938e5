//! What the kernels share to fill one output buffer from candle's compute threads: a pointer
//! the workers may write through (each to its own disjoint elements), a per-row loop over
//! the pool, and the input check every matmul makes.

use crate::error::{EngineError, Result};

/// The start of an output buffer that pool workers write disjoint elements of.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);

// SAFETY: workers only write disjoint elements through it; each caller documents how its
// work units split the buffer.
unsafe impl<T: Send> Sync for SendPtr<T> {}

/// Below this much work (about one value touched per unit) a hand-off to the compute
/// threads costs more than it saves: waking them and waiting at the barrier is some
/// microseconds, and a decoder step makes hundreds of such calls.
const PAR_MIN_WORK: usize = 64 * 1024;

/// Calls `f(i, row)` for every `width`-long row of `out`, spread over candle's compute
/// threads when the rows hold enough work (`cost` units each), else on this thread. Each row
/// is written by exactly one call, so results never depend on the split.
pub(crate) fn par_rows<T: Send>(
    out: &mut [T],
    width: usize,
    cost: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if width == 0 {
        return;
    }
    let n = out.len() / width;
    if n.saturating_mul(cost) < PAR_MIN_WORK {
        for (i, row) in out.chunks_exact_mut(width).enumerate() {
            f(i, row);
        }
        return;
    }
    let ptr = SendPtr(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        let ptr = &ptr;
        for i in range {
            // SAFETY: row i is `out[i * width..(i + 1) * width]`, inside `out`, and no other
            // call touches it.
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(i * width), width) };
            f(i, row);
        }
    });
}

/// Checks that `x` holds `m` rows of `cols` values, the input of a matmul.
pub(crate) fn check_rows(x: &[f32], m: usize, cols: usize) -> Result<()> {
    if x.len() != m * cols {
        return Err(EngineError::bad_input(format!(
            "matmul input has {} values, expected {m} x {cols}",
            x.len()
        )));
    }
    Ok(())
}
