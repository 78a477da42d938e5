//! The shape of a Llama-family model, read from GGUF metadata or an HF config.json.

use crate::error::{EngineError, Result};
use serde::Deserialize;

/// Llama3-style frequency-dependent RoPE scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    /// Overall scale factor.
    pub factor: f32,
    /// Wavelengths above original_ctx / low_freq_factor are scaled fully.
    pub low_freq_factor: f32,
    /// Wavelengths below original_ctx / high_freq_factor are left alone.
    pub high_freq_factor: f32,
    /// The context the model was pre-trained with.
    pub original_context: usize,
}

/// Everything the decoder needs to know about a model's geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Hidden size (embedding width).
    pub hidden: usize,
    /// Feed-forward inner width.
    pub ff: usize,
    /// Number of decoder blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (GQA when fewer than `heads`).
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Optional llama3 scaling of RoPE frequencies.
    pub llama3_scaling: Option<Llama3Scaling>,
    /// Context window in positions.
    pub context: usize,
    /// Whether the LM head reuses the embedding table.
    pub tied_embeddings: bool,
}

/// Upper bounds that keep a hostile file from asking for absurd allocations.
const MAX_DIM: usize = 1 << 20;
const MAX_LAYERS: usize = 1024;

impl LlamaConfig {
    /// Multiply-adds one token costs, roughly (twice the weights a token passes through):
    /// the unit of work credit.
    pub fn flops_per_token(&self) -> u64 {
        let (h, ff, hd) = (self.hidden as u64, self.ff as u64, self.head_dim as u64);
        let attention = h * hd * (2 * self.heads as u64 + 2 * self.kv_heads as u64);
        let block = attention + 3 * h * ff;
        2 * (self.layers as u64 * block + self.vocab as u64 * h)
    }

    /// Checks internal consistency so later shape maths cannot divide by zero or overflow.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("hidden", self.hidden),
            ("ff", self.ff),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("vocab", self.vocab),
            ("context", self.context),
        ];
        for (name, v) in dims {
            if v == 0 || v > MAX_DIM * 64 {
                return Err(EngineError::invalid(format!(
                    "{name} = {v} is out of range"
                )));
            }
        }
        if self.layers == 0 || self.layers > MAX_LAYERS {
            return Err(EngineError::invalid(format!(
                "block count {} is out of range",
                self.layers
            )));
        }
        if self.hidden > MAX_DIM || self.ff > MAX_DIM * 4 {
            return Err(EngineError::invalid("hidden/ff size is out of range"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(EngineError::invalid(format!(
                "{} query heads are not a multiple of {} kv heads",
                self.heads, self.kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(EngineError::invalid("head dimension must be even for RoPE"));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(EngineError::invalid("rope theta must be positive"));
        }
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0) {
            return Err(EngineError::invalid("rms epsilon must be positive"));
        }
        Ok(())
    }

    /// Inverse RoPE frequencies for one head, with llama3 scaling applied when configured.
    pub fn inv_freqs(&self) -> Vec<f32> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f32 / d as f32);
                match &self.llama3_scaling {
                    None => f,
                    Some(s) => llama3_scale(f, s),
                }
            })
            .collect()
    }

    /// Bytes of K and V one position takes in one block.
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

fn llama3_scale(freq: f32, s: &Llama3Scaling) -> f32 {
    let low_wavelen = s.original_context as f32 / s.low_freq_factor;
    let high_wavelen = s.original_context as f32 / s.high_freq_factor;
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth = (s.original_context as f32 / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

/// The parts of an HF `config.json` the engine reads.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    /// Must be a Llama-family architecture.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Model type ("llama", "mistral").
    #[serde(default)]
    pub model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f32,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_ctx")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    /// BOS token id, when the config names one.
    #[serde(default)]
    pub bos_token_id: Option<serde_json::Value>,
    /// EOS token id(s), when the config names them.
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_theta() -> f32 {
    10_000.0
}
fn default_ctx() -> usize {
    2048
}

impl HfConfig {
    /// Converts to the engine's config, refusing non-Llama architectures.
    pub fn to_llama(&self) -> Result<LlamaConfig> {
        let arch_ok = self
            .model_type
            .as_deref()
            .is_none_or(|t| matches!(t, "llama" | "mistral"))
            && self
                .architectures
                .iter()
                .all(|a| matches!(a.as_str(), "LlamaForCausalLM" | "MistralForCausalLM"));
        if !arch_ok {
            return Err(EngineError::Unsupported(format!(
                "architecture {:?} / {:?} (only the Llama family runs)",
                self.model_type, self.architectures
            )));
        }
        let heads = self.num_attention_heads;
        if heads == 0 {
            return Err(EngineError::invalid("num_attention_heads is 0"));
        }
        let llama3_scaling = match &self.rope_scaling {
            Some(v) if v.get("rope_type").and_then(|t| t.as_str()) == Some("llama3") => {
                let f = |k: &str| v.get(k).and_then(|x| x.as_f64());
                Some(Llama3Scaling {
                    factor: f("factor").unwrap_or(8.0) as f32,
                    low_freq_factor: f("low_freq_factor").unwrap_or(1.0) as f32,
                    high_freq_factor: f("high_freq_factor").unwrap_or(4.0) as f32,
                    original_context: f("original_max_position_embeddings").unwrap_or(8192.0)
                        as usize,
                })
            }
            _ => None,
        };
        let cfg = LlamaConfig {
            hidden: self.hidden_size,
            ff: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads,
            kv_heads: self.num_key_value_heads.unwrap_or(heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / heads),
            vocab: self.vocab_size,
            rms_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            llama3_scaling,
            context: self.max_position_embeddings,
            tied_embeddings: self.tie_word_embeddings,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}
