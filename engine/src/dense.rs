//! f32 matmul for float weights (F32, and F16/BF16 widened at load) in a fixed order: every
//! output is one dot product over its own weight row, summed in eight lanes and combined in
//! a fixed tree, so a row's result does not depend on how many rows run beside it (the
//! general-purpose GEMM picks different kernels and blockings by shape, which moves the last
//! bits). Batching and chunked prefill stay exact on float models too.

use crate::error::{EngineError, Result};
use crate::parallel::{check_rows, SendPtr};

/// Weight rows per work unit: one pass over four rows serves every input row.
const TILE: usize = 4;

/// A float weight matrix (rows = outputs, cols = inputs), row-major.
pub struct DenseMatrix {
    rows: usize,
    cols: usize,
    w: Vec<f32>,
}

impl DenseMatrix {
    /// A matrix from row-major values.
    pub fn new(w: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if w.len() != rows * cols {
            return Err(EngineError::invalid("dense weights of the wrong length"));
        }
        Ok(Self { rows, cols, w })
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x` (m, cols) row-major times the transposed weights: (m, rows) row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        check_rows(x, m, self.cols)?;
        let mut out = vec![0f32; m * self.rows];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let (rows, cols) = (self.rows, self.cols);
        candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(TILE), |range| {
            let out_ptr = &out_ptr;
            for tile in range {
                let r0 = tile * TILE;
                for r in r0..(r0 + TILE).min(rows) {
                    let w = &self.w[r * cols..(r + 1) * cols];
                    for (i, xi) in x.chunks_exact(cols).enumerate() {
                        // SAFETY: (i, r) is inside the (m, rows) output, and each tile of
                        // rows is written by exactly one worker.
                        unsafe { *out_ptr.0.add(i * rows + r) = crate::simd::dot(w, xi) };
                    }
                }
            }
        });
        Ok(out)
    }
}
