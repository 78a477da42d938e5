//! Tiny random-weight Llama models written from a fixed seed, in GGUF (any supported tensor
//! type) and HF safetensors form, so tests run in milliseconds without downloads. Both forms
//! hold the same weights: the GGUF one stores Q/K rows permuted the way llama.cpp's converter
//! does, so the two formats must compute the same thing.

use crate::config::{Llama3Scaling, LlamaConfig};
use crate::error::{EngineError, Result};
use crate::rng::Rng;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The geometry and tensor type of a synthetic model.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    /// Hidden size; 256 or a multiple for k-quant types.
    pub hidden: usize,
    /// Feed-forward width.
    pub ff: usize,
    /// Blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Context window.
    pub context: usize,
    /// Tensor type of every matrix in the GGUF form.
    pub dtype: GgmlDType,
    /// Whether the LM head reuses the embedding.
    pub tied: bool,
    /// Seed of the weights.
    pub seed: u64,
    /// `general.architecture` written to the GGUF (tests of refusal use others).
    pub architecture: String,
    /// Llama3 RoPE scaling: `rope_scaling` in config.json, and in the GGUF the per-frequency
    /// divisors llama.cpp's converter writes as `rope_freqs.weight`.
    pub llama3_scaling: Option<Llama3Scaling>,
    /// A chat template written to the GGUF (`tokenizer.chat_template`; none: ChatML).
    pub chat_template: Option<String>,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            ff: 128,
            layers: 8,
            heads: 4,
            kv_heads: 2,
            context: 256,
            dtype: GgmlDType::F32,
            tied: false,
            seed: 7,
            architecture: "llama".into(),
            llama3_scaling: None,
            chat_template: None,
        }
    }
}

/// Letter pairs merged by the synthetic tokenizer, so words span fewer tokens than bytes.
const MERGES: [(&str, &str); 8] = [
    ("t", "h"),
    ("h", "e"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("o", "n"),
];
/// Control tokens of the synthetic vocabulary (ChatML).
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's map from bytes to printable characters, which byte-level BPE vocabularies use.
fn byte_chars() -> Vec<char> {
    let mut out = Vec::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        out.push(char::from_u32(c).unwrap_or('?'));
    }
    out
}

/// The synthetic vocabulary: 256 byte tokens, the merges, then the control tokens.
fn vocab() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(|c| c.to_string()).collect();
    let mut types = vec![1i32; tokens.len()];
    let mut merges = Vec::new();
    for (a, b) in MERGES {
        tokens.push(format!("{a}{b}"));
        types.push(1);
        merges.push(format!("{a} {b}"));
    }
    for s in SPECIALS {
        tokens.push(s.to_string());
        types.push(3);
    }
    (tokens, merges, types)
}

/// Vocabulary size of every synthetic model.
pub fn synthetic_vocab_size() -> usize {
    256 + MERGES.len() + SPECIALS.len()
}

struct Weights {
    tensors: Vec<(String, Tensor)>,
}

fn random(rng: &mut Rng, shape: (usize, usize), scale: f32) -> Result<Tensor> {
    let n = shape.0 * shape.1;
    let v: Vec<f32> = (0..n).map(|_| rng.normal() * scale).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn norm_weight(rng: &mut Rng, n: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * rng.normal()).collect();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
}

/// Weights in HF naming and layout.
fn hf_weights(spec: &SyntheticSpec) -> Result<Weights> {
    let mut rng = Rng::new(spec.seed);
    let head_dim = spec.hidden / spec.heads;
    let vocab = synthetic_vocab_size();
    let (h, ff) = (spec.hidden, spec.ff);
    let s_in = 1.0 / (h as f32).sqrt();
    let s_ff = 1.0 / (ff as f32).sqrt();
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        random(&mut rng, (vocab, h), 1.0)?,
    )];
    for l in 0..spec.layers {
        let p = format!("model.layers.{l}");
        t.push((
            format!("{p}.input_layernorm.weight"),
            norm_weight(&mut rng, h)?,
        ));
        t.push((
            format!("{p}.self_attn.q_proj.weight"),
            random(&mut rng, (spec.heads * head_dim, h), s_in)?,
        ));
        t.push((
            format!("{p}.self_attn.k_proj.weight"),
            random(&mut rng, (spec.kv_heads * head_dim, h), s_in)?,
        ));
        t.push((
            format!("{p}.self_attn.v_proj.weight"),
            random(&mut rng, (spec.kv_heads * head_dim, h), s_in)?,
        ));
        t.push((
            format!("{p}.self_attn.o_proj.weight"),
            random(&mut rng, (h, spec.heads * head_dim), s_in)?,
        ));
        t.push((
            format!("{p}.post_attention_layernorm.weight"),
            norm_weight(&mut rng, h)?,
        ));
        t.push((
            format!("{p}.mlp.gate_proj.weight"),
            random(&mut rng, (ff, h), s_in)?,
        ));
        t.push((
            format!("{p}.mlp.up_proj.weight"),
            random(&mut rng, (ff, h), s_in)?,
        ));
        t.push((
            format!("{p}.mlp.down_proj.weight"),
            random(&mut rng, (h, ff), s_ff)?,
        ));
    }
    t.push(("model.norm.weight".to_string(), norm_weight(&mut rng, h)?));
    if !spec.tied {
        t.push((
            "lm_head.weight".to_string(),
            random(&mut rng, (vocab, h), s_in)?,
        ));
    }
    Ok(Weights { tensors: t })
}

/// llama.cpp's converter reorders each head's rows from (half, pair) to (pair, half) so RoPE
/// can rotate adjacent values.
fn permute_rows_for_gguf(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / heads;
    Ok(w.reshape((heads, 2, d / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.trim_start_matches("model.layers.");
    let (l, part) = rest.split_once('.').unwrap_or(("0", rest));
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => other,
    };
    format!("blk.{l}.{part}")
}

/// The RoPE-relevant part of the spec's geometry, for computing frequencies.
fn rope_config(spec: &SyntheticSpec, llama3_scaling: Option<Llama3Scaling>) -> LlamaConfig {
    LlamaConfig {
        hidden: spec.hidden,
        ff: spec.ff,
        layers: spec.layers,
        heads: spec.heads,
        kv_heads: spec.kv_heads,
        head_dim: spec.hidden / spec.heads,
        vocab: synthetic_vocab_size(),
        rms_eps: 1e-5,
        rope_theta: 10_000.0,
        llama3_scaling,
        context: spec.context,
        tied_embeddings: spec.tied,
    }
}

/// Writes the synthetic model as a GGUF file at `path`.
pub fn write_gguf(spec: &SyntheticSpec, path: &Path) -> Result<()> {
    let w = hf_weights(spec)?;
    let mut qtensors = Vec::new();
    for (name, t) in &w.tensors {
        let t = if name.ends_with("q_proj.weight") {
            permute_rows_for_gguf(t, spec.heads)?
        } else if name.ends_with("k_proj.weight") {
            permute_rows_for_gguf(t, spec.kv_heads)?
        } else {
            t.clone()
        };
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            spec.dtype
        };
        qtensors.push((gguf_name(name), QTensor::quantize(&t, dtype)?));
    }
    if let Some(scaling) = &spec.llama3_scaling {
        let base = rope_config(spec, None).inv_freqs();
        let scaled = rope_config(spec, Some(scaling.clone())).inv_freqs();
        let divisors: Vec<f32> = base.iter().zip(&scaled).map(|(b, s)| b / s).collect();
        let n = divisors.len();
        let t = Tensor::from_vec(divisors, n, &Device::Cpu)?;
        qtensors.push((
            "rope_freqs.weight".to_string(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let (tokens, merges, types) = vocab();
    let u32v = |x: usize| Value::U32(x as u32);
    let strs = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let meta: Vec<(&str, Value)> = vec![
        (
            "general.architecture",
            Value::String(spec.architecture.clone()),
        ),
        ("general.name", Value::String("potluck-synthetic".into())),
        ("llama.embedding_length", u32v(spec.hidden)),
        ("llama.feed_forward_length", u32v(spec.ff)),
        ("llama.block_count", u32v(spec.layers)),
        ("llama.attention.head_count", u32v(spec.heads)),
        ("llama.attention.head_count_kv", u32v(spec.kv_heads)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.context_length", u32v(spec.context)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        ("tokenizer.ggml.tokens", strs(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges", strs(&merges)),
        ("tokenizer.ggml.bos_token_id", u32v(256 + MERGES.len())),
        ("tokenizer.ggml.eos_token_id", u32v(256 + MERGES.len() + 2)),
    ];
    let mut meta = meta;
    if let Some(t) = &spec.chat_template {
        meta.push(("tokenizer.chat_template", Value::String(t.clone())));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })?;
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    Ok(())
}

/// Writes the synthetic model as `model.safetensors`, `config.json` and `tokenizer.json` in
/// `dir`, matrices stored as `dtype` (f32, f16 or bf16).
pub fn write_safetensors(spec: &SyntheticSpec, dir: &Path, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| EngineError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let w = hf_weights(spec)?;
    let mut map = HashMap::new();
    for (name, t) in w.tensors {
        map.insert(name, t.to_dtype(dtype)?);
    }
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ff,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": synthetic_vocab_size(),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": spec.context,
        "tie_word_embeddings": spec.tied,
        "rope_scaling": spec.llama3_scaling.as_ref().map(|s| serde_json::json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_context,
        })),
    });
    let (tokens, merges, _) = vocab();
    let mut tok = crate::tokenizer::bpe_tokenizer_json(&tokens, &merges, "default");
    tok["added_tokens"] = serde_json::Value::Array(
        SPECIALS
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"id": 256 + MERGES.len() + i, "content": s, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
            })
            .collect(),
    );
    let tok_cfg = serde_json::json!({"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "add_bos_token": false});
    let write = |name: &str, v: &serde_json::Value| {
        std::fs::write(dir.join(name), v.to_string()).map_err(|source| EngineError::Io {
            path: name.to_string(),
            source,
        })
    };
    write("config.json", &config)?;
    write("tokenizer.json", &tok)?;
    write("tokenizer_config.json", &tok_cfg)?;
    Ok(())
}
