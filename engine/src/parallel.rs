//! What the kernels share to fill one output buffer from candle's compute threads: a pointer
//! the workers may write through (each to its own disjoint elements), and the input check
//! every matmul makes.

use crate::error::{EngineError, Result};

/// The start of an output buffer that pool workers write disjoint elements of.
pub(crate) struct SendPtr(pub(crate) *mut f32);

// SAFETY: workers only write disjoint elements through it; each caller documents how its
// work units split the buffer.
unsafe impl Sync for SendPtr {}

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
