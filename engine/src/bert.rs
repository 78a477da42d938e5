//! A BERT sentence encoder (all-MiniLM-L6-v2 and its kin): tokenize, run the encoder, mean-pool
//! the last hidden states over real tokens, L2-normalise. It reads a sentence-transformers
//! folder: `config.json`, `model.safetensors`, `tokenizer.json`, and where present
//! `sentence_bert_config.json` (the sequence limit) and `1_Pooling/config.json` (the pooling).

use crate::error::candle_message;
use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// Texts encoded together; sorted by length first so a batch pads little.
const BATCH: usize = 16;
/// Texts one call may encode: a request that large is split by its sender.
pub const MAX_TEXTS: usize = 2048;
/// Bytes of one text; sentence-transformers truncates to the sequence limit anyway, and this
/// keeps a hostile text from costing a tokenizer pass over megabytes.
pub const MAX_TEXT_BYTES: usize = 64 << 10;

/// The parts of a BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Encoder blocks.
    pub num_hidden_layers: usize,
    /// Attention heads per block.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Positions the position table covers.
    pub max_position_embeddings: usize,
    /// Token-type table size.
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Feed-forward activation.
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

impl BertConfig {
    /// Reads `config.json` from a model folder.
    pub fn load(dir: &Path) -> Result<Self> {
        read_json(&dir.join("config.json"))
    }

    /// Multiply-adds one token costs, roughly (twice the block weights): the unit of work
    /// credit.
    pub fn flops_per_token(&self) -> u64 {
        let h = self.hidden_size as u64;
        let per_block = 4 * h * h + 2 * h * self.intermediate_size as u64;
        2 * per_block * self.num_hidden_layers as u64
    }
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

#[derive(Deserialize)]
struct SentenceConfig {
    max_seq_length: usize,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_cls_token: bool,
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over real (unpadded) tokens.
    Mean,
    /// The first token's vector.
    Cls,
}

struct Block {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// A loaded sentence encoder.
pub struct Encoder {
    config: BertConfig,
    tokenizer: tokenizers::Tokenizer,
    words: Embedding,
    positions: Embedding,
    types: Embedding,
    embed_norm: LayerNorm,
    blocks: Vec<Block>,
    pooling: Pooling,
    max_tokens: usize,
    device: Device,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| EngineError::invalid(format!("{}: {e}", path.display())))
}

fn read_optional<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

impl Encoder {
    /// Whether `path` is a folder laid out as a sentence encoder (config.json of a BERT model
    /// beside tokenizer.json).
    pub fn is_encoder_dir(path: &Path) -> bool {
        let cfg = path.join("config.json");
        path.join("tokenizer.json").is_file()
            && std::fs::read_to_string(cfg)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| {
                    v.get("model_type")
                        .and_then(|t| t.as_str())
                        .map(String::from)
                })
                .is_some_and(|t| t == "bert")
    }

    /// Loads the encoder in folder `dir` onto the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        let device = Device::Cpu;
        let config = BertConfig::load(dir)?;
        if config.hidden_act != "gelu" {
            return Err(EngineError::Unsupported(format!(
                "activation {} (only gelu)",
                config.hidden_act
            )));
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(EngineError::invalid(format!(
                "{} heads do not divide hidden size {}",
                config.num_attention_heads, config.hidden_size
            )));
        }
        let limit = read_optional::<SentenceConfig>(&dir.join("sentence_bert_config.json"))?
            .map_or(config.max_position_embeddings, |s| s.max_seq_length);
        let max_tokens = limit.min(config.max_position_embeddings);
        let pooling = match read_optional::<PoolingConfig>(&dir.join("1_Pooling/config.json"))? {
            Some(p) if p.pooling_mode_cls_token && !p.pooling_mode_mean_tokens => Pooling::Cls,
            Some(p) if !p.pooling_mode_mean_tokens => {
                return Err(EngineError::Unsupported(
                    "pooling other than mean or CLS".into(),
                ))
            }
            _ => Pooling::Mean,
        };
        let mut tokenizer = crate::tokenizer::load_tokenizer_json(&dir.join("tokenizer.json"))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let shards = crate::weights::files_with_extension(dir, "safetensors")?;
        if shards.is_empty() {
            return Err(EngineError::invalid(format!(
                "{} holds no .safetensors file",
                dir.display()
            )));
        }
        // SAFETY: read-only mapping of files we do not modify while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&shards, DType::F32, &device) }
            .map_err(|e| EngineError::invalid(format!("safetensors: {}", candle_message(&e))))?;
        // Checkpoints saved from BertModel have no prefix; those from BertForX carry `bert.`.
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let h = config.hidden_size;
        let norm = |vb: VarBuilder| candle_nn::layer_norm(h, config.layer_norm_eps, vb);
        let emb = vb.pp("embeddings");
        let words = candle_nn::embedding(config.vocab_size, h, emb.pp("word_embeddings"))?;
        let positions = candle_nn::embedding(
            config.max_position_embeddings,
            h,
            emb.pp("position_embeddings"),
        )?;
        let types =
            candle_nn::embedding(config.type_vocab_size, h, emb.pp("token_type_embeddings"))?;
        let embed_norm = norm(emb.pp("LayerNorm"))?;
        let mut blocks = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let att = l.pp("attention");
            blocks.push(Block {
                query: candle_nn::linear(h, h, att.pp("self.query"))?,
                key: candle_nn::linear(h, h, att.pp("self.key"))?,
                value: candle_nn::linear(h, h, att.pp("self.value"))?,
                attn_out: candle_nn::linear(h, h, att.pp("output.dense"))?,
                attn_norm: norm(att.pp("output.LayerNorm"))?,
                up: candle_nn::linear(h, config.intermediate_size, l.pp("intermediate.dense"))?,
                down: candle_nn::linear(config.intermediate_size, h, l.pp("output.dense"))?,
                out_norm: norm(l.pp("output.LayerNorm"))?,
            });
        }
        Ok(Self {
            config,
            tokenizer,
            words,
            positions,
            types,
            embed_norm,
            blocks,
            pooling,
            max_tokens,
            device,
        })
    }

    /// The width of the vectors it returns.
    pub fn dimensions(&self) -> usize {
        self.config.hidden_size
    }

    /// The longest input in tokens; longer texts are truncated, as sentence-transformers does.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Token ids of `text` as the encoder sees them ([CLS] … [SEP], truncated).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(EngineError::bad_input(format!(
                "a text of {} bytes is over the {MAX_TEXT_BYTES}-byte limit",
                text.len()
            )));
        }
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Unit-length sentence vectors for `texts`, in order, and the tokens they took.
    pub fn embed(&self, texts: &[String]) -> Result<(Vec<Vec<f32>>, u64)> {
        if texts.len() > MAX_TEXTS {
            return Err(EngineError::bad_input(format!(
                "{} texts in one call; at most {MAX_TEXTS}",
                texts.len()
            )));
        }
        let ids = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>>>()?;
        let tokens = ids.iter().map(|i| i.len() as u64).sum();
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids.get(i).map_or(0, Vec::len));
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(BATCH) {
            let batch: Vec<&[u32]> = chunk
                .iter()
                .filter_map(|&i| ids.get(i).map(Vec::as_slice))
                .collect();
            let vectors = self.embed_ids(&batch)?;
            for (&i, v) in chunk.iter().zip(vectors) {
                if let Some(slot) = out.get_mut(i) {
                    *slot = v;
                }
            }
        }
        Ok((out, tokens))
    }

    /// Runs one padded batch of token sequences.
    fn embed_ids(&self, batch: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let n = batch.len();
        let len = batch.iter().map(|b| b.len()).max().unwrap_or(0).max(1);
        if len > self.max_tokens {
            return Err(EngineError::bad_input(format!(
                "{len} tokens; the encoder takes at most {}",
                self.max_tokens
            )));
        }
        let mut flat = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for ids in batch {
            for j in 0..len {
                let id = ids.get(j).copied();
                if id.is_some_and(|t| t as usize >= self.config.vocab_size) {
                    return Err(EngineError::bad_input("token id past the vocabulary"));
                }
                flat.push(id.unwrap_or(0));
                mask.push(if id.is_some() { 1f32 } else { 0f32 });
            }
        }
        let ids = Tensor::from_vec(flat, (n, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
        let pos = Tensor::arange(0u32, len as u32, &self.device)?;
        let mut x = self
            .words
            .forward(&ids)?
            .broadcast_add(&self.positions.forward(&pos)?)?
            .broadcast_add(&self.types.forward(&Tensor::zeros(
                len,
                DType::U32,
                &self.device,
            )?)?)?;
        x = self.embed_norm.forward(&x)?;
        // Padding gets a large negative score so softmax gives it no weight.
        let bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((n, 1, 1, len))?;
        for b in &self.blocks {
            x = self.block(b, &x, &bias)?;
        }
        let pooled = match self.pooling {
            Pooling::Mean => {
                let m = mask.unsqueeze(2)?;
                let sum = x.broadcast_mul(&m)?.sum(1)?;
                let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                sum.broadcast_div(&count)?
            }
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let norm = pooled
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(1e-12, f64::MAX)?;
        Ok(pooled.broadcast_div(&norm)?.to_vec2::<f32>()?)
    }

    fn block(&self, b: &Block, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (n, len, h) = x.dims3()?;
        let heads = self.config.num_attention_heads;
        let d = h / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, len, heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(b.query.forward(x)?)?;
        let k = split(b.key.forward(x)?)?;
        let v = split(b.value.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? / (d as f64).sqrt())?.broadcast_add(bias)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n, len, h))?;
        let x = b.attn_norm.forward(&(b.attn_out.forward(&ctx)? + x)?)?;
        let ff = b.down.forward(&b.up.forward(&x)?.gelu_erf()?)?;
        Ok(b.out_norm.forward(&(ff + x)?)?)
    }
}

/// Cosine similarity of two vectors (0 when either is zero or they differ in length).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += f64::from(*x) * f64::from(*y);
        aa += f64::from(*x) * f64::from(*x);
        bb += f64::from(*y) * f64::from(*y);
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    (ab / (aa.sqrt() * bb.sqrt())) as f32
}
