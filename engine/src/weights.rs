//! One interface over the two weight formats: GGUF (quantized, llama.cpp names) and HF
//! safetensors + config.json (dense, HF names). Stages ask for weights by role, so the
//! decoder never sees file names or formats.

use crate::config::{HfConfig, LlamaConfig};
use crate::error::candle_message;
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::linear::Linear;
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a weight is for, independent of how a file names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Token embedding table.
    Embedding,
    /// RMSNorm before attention in block l.
    AttnNorm(usize),
    /// Query projection.
    Q(usize),
    /// Key projection.
    K(usize),
    /// Value projection.
    V(usize),
    /// Attention output projection.
    O(usize),
    /// RMSNorm before the MLP.
    FfnNorm(usize),
    /// SwiGLU gate projection.
    Gate(usize),
    /// SwiGLU up projection.
    Up(usize),
    /// SwiGLU down projection.
    Down(usize),
    /// Final RMSNorm.
    OutputNorm,
    /// LM head (absent when tied to the embedding).
    Output,
}

impl Role {
    fn gguf_name(self) -> String {
        match self {
            Role::Embedding => "token_embd.weight".into(),
            Role::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
            Role::Q(l) => format!("blk.{l}.attn_q.weight"),
            Role::K(l) => format!("blk.{l}.attn_k.weight"),
            Role::V(l) => format!("blk.{l}.attn_v.weight"),
            Role::O(l) => format!("blk.{l}.attn_output.weight"),
            Role::FfnNorm(l) => format!("blk.{l}.ffn_norm.weight"),
            Role::Gate(l) => format!("blk.{l}.ffn_gate.weight"),
            Role::Up(l) => format!("blk.{l}.ffn_up.weight"),
            Role::Down(l) => format!("blk.{l}.ffn_down.weight"),
            Role::OutputNorm => "output_norm.weight".into(),
            Role::Output => "output.weight".into(),
        }
    }

    fn hf_name(self) -> String {
        match self {
            Role::Embedding => "model.embed_tokens.weight".into(),
            Role::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            Role::Q(l) => format!("model.layers.{l}.self_attn.q_proj.weight"),
            Role::K(l) => format!("model.layers.{l}.self_attn.k_proj.weight"),
            Role::V(l) => format!("model.layers.{l}.self_attn.v_proj.weight"),
            Role::O(l) => format!("model.layers.{l}.self_attn.o_proj.weight"),
            Role::FfnNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            Role::Gate(l) => format!("model.layers.{l}.mlp.gate_proj.weight"),
            Role::Up(l) => format!("model.layers.{l}.mlp.up_proj.weight"),
            Role::Down(l) => format!("model.layers.{l}.mlp.down_proj.weight"),
            Role::OutputNorm => "model.norm.weight".into(),
            Role::Output => "lm_head.weight".into(),
        }
    }
}

/// An embedding table, kept in its stored type so a quantized table is never expanded.
#[derive(Clone)]
pub enum Embedding {
    /// Quantized rows, dequantized one looked-up row at a time.
    Quant(Arc<QTensor>),
    /// Dense f32 rows.
    Dense(Tensor),
}

impl Embedding {
    /// Looks up rows for `ids` (already checked against the vocabulary), shape (n, hidden).
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let ids_t = Tensor::new(ids, &Device::Cpu)?;
        Ok(match self {
            Embedding::Quant(q) => q.embedding(&ids_t)?,
            Embedding::Dense(t) => t.index_select(&ids_t, 0)?,
        })
    }

    /// A linear layer over this table (tied LM head).
    pub fn as_linear(&self) -> Result<Linear> {
        match self {
            Embedding::Quant(q) => Linear::from_shared(q),
            Embedding::Dense(t) => Linear::from_dense(std::slice::from_ref(t)),
        }
    }
}

/// The files in `dir` named `*.{ext}`, sorted (safetensors shards load in name order).
pub fn files_with_extension(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| EngineError::Io {
            path: dir.display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    files.sort();
    Ok(files)
}

/// An open model file (or directory) of either format.
pub enum WeightFile {
    /// A llama.cpp GGUF file.
    Gguf(GgufFile),
    /// HF safetensors shards plus their config.
    Safetensors {
        /// The memory-mapped shards.
        tensors: candle_core::safetensors::MmapedSafetensors,
        /// The parsed config.json.
        config: Box<HfConfig>,
        /// Where config.json and tokenizer.json live.
        dir: PathBuf,
    },
}

impl WeightFile {
    /// Opens a GGUF file, a safetensors file (config.json beside it) or a directory holding
    /// config.json and safetensors shards.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if meta.is_dir() {
            return Self::open_safetensors_dir(path);
        }
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        if is_safetensors {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Self::open_safetensors(dir, vec![path.to_path_buf()]);
        }
        Ok(WeightFile::Gguf(GgufFile::open(path)?))
    }

    fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let shards = files_with_extension(dir, "safetensors")?;
        if shards.is_empty() {
            // A directory holding a single GGUF works too.
            if let [one] = files_with_extension(dir, "gguf")?.as_slice() {
                return Ok(WeightFile::Gguf(GgufFile::open(one)?));
            }
            return Err(EngineError::invalid(format!(
                "{} holds no .safetensors files and not exactly one .gguf",
                dir.display()
            )));
        }
        Self::open_safetensors(dir, shards)
    }

    fn open_safetensors(dir: &Path, shards: Vec<PathBuf>) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|source| EngineError::Io {
            path: cfg_path.display().to_string(),
            source,
        })?;
        let config: Box<HfConfig> = serde_json::from_str(&text)
            .map_err(|e| EngineError::invalid(format!("{}: {e}", cfg_path.display())))?;
        // SAFETY: read-only mapping of files we do not modify while mapped.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&shards) }
            .map_err(|e| EngineError::invalid(format!("safetensors: {}", candle_message(&e))))?;
        Ok(WeightFile::Safetensors {
            tensors,
            config,
            dir: dir.to_path_buf(),
        })
    }

    /// The model geometry.
    pub fn config(&self) -> Result<LlamaConfig> {
        match self {
            WeightFile::Gguf(g) => g.llama_config(),
            WeightFile::Safetensors {
                tensors, config, ..
            } => {
                let mut cfg = config.to_llama()?;
                cfg.tied_embeddings = tensors.get(&Role::Output.hf_name()).is_err();
                Ok(cfg)
            }
        }
    }

    /// Bytes the weights take once loaded: the largest decoder block, and everything outside
    /// the blocks (embedding, head, final norm). Planners size stages with it.
    pub fn footprint(&self) -> (u64, u64) {
        let (block_prefix, sizes): (&str, Vec<(String, u64)>) = match self {
            WeightFile::Gguf(g) => (
                "blk.",
                g.content()
                    .tensor_infos
                    .iter()
                    .map(|(name, t)| {
                        let elems = t.shape.elem_count() as u64;
                        let block = t.ggml_dtype.block_size().max(1) as u64;
                        (
                            name.clone(),
                            elems / block * t.ggml_dtype.type_size() as u64,
                        )
                    })
                    .collect(),
            ),
            // Held as f32 whatever the stored type.
            WeightFile::Safetensors { tensors, .. } => (
                "model.layers.",
                tensors
                    .tensors()
                    .into_iter()
                    .map(|(name, v)| (name, v.shape().iter().product::<usize>() as u64 * 4))
                    .collect(),
            ),
        };
        let mut blocks: std::collections::HashMap<String, u64> = Default::default();
        let mut edge = 0u64;
        for (name, bytes) in sizes {
            match name
                .strip_prefix(block_prefix)
                .and_then(|rest| rest.split('.').next())
            {
                Some(index) => *blocks.entry(index.to_string()).or_default() += bytes,
                None => edge += bytes,
            }
        }
        (blocks.values().copied().max().unwrap_or(0), edge)
    }

    /// Whether RoPE pairs adjacent dimensions (llama.cpp's GGUF layout, where the converter
    /// permuted Q/K rows) rather than the two halves of a head (HF layout).
    pub fn rope_interleaved(&self) -> bool {
        matches!(self, WeightFile::Gguf(_))
    }

    fn dense(&self, role: Role) -> Result<Tensor> {
        match self {
            WeightFile::Gguf(g) => Ok(g.tensor(&role.gguf_name())?.dequantize(&Device::Cpu)?),
            WeightFile::Safetensors { tensors, .. } => {
                let name = role.hf_name();
                let t = tensors.load(&name, &Device::Cpu).map_err(|e| {
                    EngineError::invalid(format!("tensor {name}: {}", candle_message(&e)))
                })?;
                match t.dtype() {
                    DType::F32 | DType::F16 | DType::BF16 => Ok(t.to_dtype(DType::F32)?),
                    other => Err(EngineError::Unsupported(format!(
                        "tensor {name} has dtype {other:?} (f32, f16, bf16 run)"
                    ))),
                }
            }
        }
    }

    /// A 1-D weight (norm scale) as f32, checked against the expected length.
    pub fn vector(&self, role: Role, len: usize) -> Result<Tensor> {
        let t = self.dense(role)?;
        if t.dims() != [len] {
            return Err(EngineError::invalid(format!(
                "{role:?} has shape {:?}, expected [{len}]",
                t.dims()
            )));
        }
        Ok(t)
    }

    /// Projections that read the same input, each (out, in) and checked against its shape,
    /// stacked by rows into one layer; quantized types are kept as they are.
    pub fn linear(&self, parts: &[(Role, usize)], inp: usize) -> Result<Linear> {
        match self {
            WeightFile::Gguf(g) => {
                let mut qs = Vec::with_capacity(parts.len());
                for &(role, out) in parts {
                    let q = g.tensor(&role.gguf_name())?;
                    check_shape(role, q.shape().dims(), out, inp)?;
                    qs.push(q);
                }
                let same_type = qs.windows(2).all(|w| w[0].dtype() == w[1].dtype());
                if same_type {
                    return Linear::from_qtensors(qs);
                }
                // Mixed types (some files keep V at higher precision): dense rows, stacked.
                let dense: Vec<Tensor> = qs
                    .iter()
                    .map(|q| q.dequantize(&Device::Cpu))
                    .collect::<candle_core::Result<_>>()?;
                Linear::from_dense(&dense)
            }
            WeightFile::Safetensors { .. } => {
                let mut ts = Vec::with_capacity(parts.len());
                for &(role, out) in parts {
                    let t = self.dense(role)?;
                    check_shape(role, t.dims(), out, inp)?;
                    ts.push(t);
                }
                Linear::from_dense(&ts)
            }
        }
    }

    /// The embedding table, checked against (vocab, hidden).
    pub fn embedding(&self, vocab: usize, hidden: usize) -> Result<Embedding> {
        match self {
            WeightFile::Gguf(g) => {
                let q = g.tensor(&Role::Embedding.gguf_name())?;
                check_shape(Role::Embedding, q.shape().dims(), vocab, hidden)?;
                if !hidden.is_multiple_of(q.dtype().block_size()) {
                    return Err(EngineError::invalid("embedding width is not whole blocks"));
                }
                Ok(Embedding::Quant(Arc::new(q)))
            }
            WeightFile::Safetensors { .. } => {
                let t = self.dense(Role::Embedding)?;
                check_shape(Role::Embedding, t.dims(), vocab, hidden)?;
                Ok(Embedding::Dense(t))
            }
        }
    }

    /// llama.cpp's per-frequency RoPE divisors (llama3 scaling baked into the file), if any.
    pub fn rope_freq_factors(&self, half_dim: usize) -> Result<Option<Vec<f32>>> {
        match self {
            WeightFile::Gguf(g) if g.has_tensor("rope_freqs.weight") => {
                let t = g.tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                if v.len() != half_dim || v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
                    return Err(EngineError::invalid("rope_freqs.weight is malformed"));
                }
                Ok(Some(v))
            }
            _ => Ok(None),
        }
    }
}

fn check_shape(role: Role, dims: &[usize], out: usize, inp: usize) -> Result<()> {
    if dims != [out, inp] {
        return Err(EngineError::invalid(format!(
            "{role:?} has shape {dims:?}, expected [{out}, {inp}]"
        )));
    }
    Ok(())
}

/// Bytes the weights of a stage holding blocks `start..end` of `total` take, from
/// [`WeightFile::footprint`]'s per-block and edge sizes: the embedding or head counts once
/// for a first stage and once for a last one.
pub fn stage_weight_bytes(
    block_bytes: u64,
    edge_bytes: u64,
    start: u32,
    end: u32,
    total: u32,
) -> u64 {
    let edges = u64::from(start == 0) + u64::from(end == total);
    block_bytes * u64::from(end.saturating_sub(start)) + edge_bytes * edges
}
