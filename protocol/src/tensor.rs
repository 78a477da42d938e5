//! Tensors on the wire: dtype, shape and little-endian bytes, checked for consistency and
//! size before anyone trusts them.

use crate::error::{ProtocolError, Result};
use half::f16;
use serde::{Deserialize, Serialize};

/// Element types a tensor may travel as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireDType {
    /// 32-bit float (exact hidden states).
    F32,
    /// 16-bit float (half the bytes, for links where that matters).
    F16,
}

impl WireDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 => 2,
        }
    }
}

/// Most dimensions a wire tensor may have.
pub const MAX_RANK: usize = 4;

/// A dense tensor as sent between peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Element type.
    pub dtype: WireDType,
    /// Dimensions, outermost first.
    pub shape: Vec<u32>,
    /// Elements in row-major order, little-endian.
    pub data: Vec<u8>,
}

impl WireTensor {
    /// Packs f32 values of the given shape, as f32 or converted to f16.
    pub fn from_f32(values: &[f32], shape: &[usize], dtype: WireDType) -> Result<Self> {
        let count = element_count(shape)?;
        if count != values.len() {
            return Err(ProtocolError::BadTensor(format!(
                "{} values for shape {shape:?}",
                values.len()
            )));
        }
        let data = match dtype {
            WireDType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WireDType::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        let shape = shape.iter().map(|&d| d as u32).collect();
        Ok(Self { dtype, shape, data })
    }

    /// Checks that shape and bytes agree; every consumer calls this before using the data.
    pub fn validate(&self) -> Result<usize> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let count = element_count(&shape)?;
        let want = count
            .checked_mul(self.dtype.size())
            .ok_or_else(|| ProtocolError::BadTensor("size overflows".into()))?;
        if want != self.data.len() {
            return Err(ProtocolError::BadTensor(format!(
                "shape {:?} of {:?} needs {want} bytes, got {}",
                self.shape,
                self.dtype,
                self.data.len()
            )));
        }
        Ok(count)
    }

    /// The values as f32 (exact for F32, widened for F16), after validation.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.validate()?;
        Ok(match self.dtype {
            WireDType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            WireDType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        })
    }

    /// The shape as usizes.
    pub fn dims(&self) -> Vec<usize> {
        self.shape.iter().map(|&d| d as usize).collect()
    }
}

fn element_count(shape: &[usize]) -> Result<usize> {
    if shape.is_empty() || shape.len() > MAX_RANK {
        return Err(ProtocolError::BadTensor(format!(
            "rank {} is outside 1..={MAX_RANK}",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= crate::codec::MAX_FRAME)
        .ok_or_else(|| ProtocolError::BadTensor(format!("shape {shape:?} is too large")))
}
