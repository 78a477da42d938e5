//! A projection layer: our own kernels for Q4_1/Q8_0 and float weights, candle's for every
//! other quantized type (whose CPU kernels are row-independent too: each row is quantized
//! and dotted on its own).

use crate::dense::DenseMatrix;
use crate::error::{EngineError, Result};
use crate::quant_matmul::QuantMatrix;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use std::borrow::Cow;
use std::sync::Arc;

/// A weight matrix (outputs, inputs) applied to f32 activations (positions, inputs).
pub enum Linear {
    /// Q4_1 / Q8_0 on our kernels.
    Quant(QuantMatrix),
    /// F32 / F16 / BF16 held as f32, on our fixed-order kernel.
    Dense(DenseMatrix),
    /// Anything else, on candle.
    Candle(QMatMul),
}

/// Whether our kernels are enabled (`POTLUCK_KERNELS=candle` turns them off, for A/B runs).
fn own_kernels() -> bool {
    std::env::var("POTLUCK_KERNELS").map_or(true, |v| v != "candle")
}

impl Linear {
    /// Stacks quantized tensors of one type and width by rows into one layer, so projections
    /// that read the same input (q/k/v, gate/up) run as one matmul.
    pub fn from_qtensors(mut parts: Vec<QTensor>) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| EngineError::invalid("no tensors"))?;
        let (dtype, (_, cols)) = (first.dtype(), first.shape().dims2()?);
        if own_kernels() && QuantMatrix::supports(dtype) {
            let refs: Vec<&QTensor> = parts.iter().collect();
            return Ok(Linear::Quant(QuantMatrix::from_qtensors(&refs)?));
        }
        if own_kernels() && is_float(dtype) {
            let dense = parts
                .iter()
                .map(|p| p.dequantize(&Device::Cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Self::from_dense(&dense);
        }
        if parts.len() == 1 {
            if let Some(one) = parts.pop() {
                return Ok(Linear::Candle(QMatMul::from_qtensor(one)?));
            }
        }
        let mut bytes = Vec::new();
        let mut rows = 0;
        for p in &parts {
            let (r, c) = p.shape().dims2()?;
            if c != cols || p.dtype() != dtype {
                return Err(EngineError::invalid(
                    "stacked tensors differ in type or width",
                ));
            }
            bytes.extend_from_slice(&p.data()?);
            rows += r;
        }
        let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, dtype)?;
        Ok(Linear::Candle(QMatMul::from_qtensor(QTensor::new(
            storage,
            (rows, cols),
        )?)?))
    }

    /// A layer over a shared table (a tied LM head reading the embedding).
    pub fn from_shared(q: &Arc<QTensor>) -> Result<Self> {
        if own_kernels() && QuantMatrix::supports(q.dtype()) {
            return Ok(Linear::Quant(QuantMatrix::from_qtensors(&[q.as_ref()])?));
        }
        if own_kernels() && is_float(q.dtype()) {
            return Self::from_dense(&[q.dequantize(&Device::Cpu)?]);
        }
        Ok(Linear::Candle(QMatMul::from_arc(q.clone())?))
    }

    /// Stacks dense (outputs, inputs) f32 matrices by rows into one layer.
    pub fn from_dense(parts: &[Tensor]) -> Result<Self> {
        let w = Tensor::cat(parts, 0)?.to_dtype(DType::F32)?;
        if !own_kernels() {
            return Ok(Linear::Candle(QMatMul::Tensor(w)));
        }
        let (rows, cols) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        Ok(Linear::Dense(DenseMatrix::new(values, rows, cols)?))
    }

    /// Applies the layer to (positions, inputs), giving (positions, outputs).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => Ok(m.forward(x)?),
            _ => {
                let (t, _) = x.dims2()?;
                let data = x.flatten_all()?.to_vec1::<f32>()?;
                let out = self.forward_rows(&data, t)?;
                Ok(Tensor::from_vec(out, (t, self.rows()), &Device::Cpu)?)
            }
        }
    }

    /// Applies the layer to `m` row-major rows of inputs, giving `m` rows of outputs, with no
    /// tensor in between on our own kernels.
    pub fn forward_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        match self {
            Linear::Quant(q) => q.matmul(x, m),
            Linear::Dense(d) => d.matmul(x, m),
            Linear::Candle(c) => {
                let cols = x.len().checked_div(m).unwrap_or(0);
                let t = Tensor::from_slice(x, (m, cols), &Device::Cpu)?;
                Ok(c.forward(&t)?.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    /// Output width.
    pub fn rows(&self) -> usize {
        match self {
            Linear::Quant(q) => q.rows(),
            Linear::Dense(d) => d.rows(),
            Linear::Candle(QMatMul::QTensor(q)) => q.shape().dims().first().copied().unwrap_or(0),
            Linear::Candle(QMatMul::Tensor(t)) | Linear::Candle(QMatMul::TensorF16(t)) => {
                t.dims().first().copied().unwrap_or(0)
            }
        }
    }
}

/// Float weight types, which run on [`DenseMatrix`].
fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}
