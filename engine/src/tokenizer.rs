//! Text <-> token ids: from a tokenizer.json, or rebuilt from a GGUF file's metadata
//! (byte-level BPE with merges, or a SentencePiece-style llama vocab with scores).

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};
use std::path::Path;

/// Token type llama.cpp gives control tokens such as `<|im_start|>`.
const TOKEN_TYPE_CONTROL: i64 = 3;
/// Token type of user-defined tokens, which are also matched whole.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A tokenizer plus the special ids and chat template that came with the model.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

/// Decodes a stream of ids into text pieces, holding back bytes of incomplete UTF-8
/// characters; each step costs a few tokens' decode, not the whole history's.
pub struct StreamDecoder<'a> {
    inner: tokenizers::DecodeStream<
        'a,
        tokenizers::ModelWrapper,
        tokenizers::NormalizerWrapper,
        tokenizers::PreTokenizerWrapper,
        tokenizers::PostProcessorWrapper,
        tokenizers::DecoderWrapper,
    >,
}

impl StreamDecoder<'_> {
    /// Adds one token and returns whatever new text is complete.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let piece = self
            .inner
            .step(id)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        Ok(piece.unwrap_or_default())
    }
}

/// Reads an HF tokenizer.json as untrusted input: a normalizer or decoder that could grow
/// text more than [`crate::normalizer_growth::MAX_NORMALIZER_GROWTH`]-fold is refused, and
/// the file's padding and truncation are dropped (they are the file's to choose, not ours to
/// obey: a fixed padding of a billion makes every encode allocate that much, and truncation
/// would cut prompts short behind the context check).
pub fn load_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let bad =
        |e: &dyn std::fmt::Display| EngineError::Tokenizer(format!("{}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| bad(&e))?;
    for part in ["normalizer", "decoder"] {
        let growth =
            crate::normalizer_growth::normalizer_growth(json.get(part).unwrap_or(&Json::Null));
        if growth > crate::normalizer_growth::MAX_NORMALIZER_GROWTH {
            return Err(bad(&format!(
                "its {part} can grow text {growth:.0}-fold (at most {} is accepted)",
                crate::normalizer_growth::MAX_NORMALIZER_GROWTH
            )));
        }
    }
    let mut inner: tokenizers::Tokenizer = text.parse().map_err(|e| bad(&e))?;
    inner.with_padding(None);
    inner.with_truncation(None).map_err(|e| bad(&e))?;
    Ok(inner)
}

impl TextTokenizer {
    /// Loads an HF tokenizer.json (see [`load_tokenizer_json`]), reading BOS/EOS and the chat template from the
    /// tokenizer_config.json beside it when present.
    /// A file whose normalizer could grow text more than
    /// [`crate::normalizer_growth::MAX_NORMALIZER_GROWTH`]-fold is refused.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner = load_tokenizer_json(path)?;
        let cfg: Json = path
            .parent()
            .map(|d| d.join("tokenizer_config.json"))
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Json::Null);
        let token_of = |key: &str| -> Option<u32> {
            let v = cfg.get(key)?;
            let text = v
                .as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))?;
            inner.token_to_id(text)
        };
        let bos = token_of("bos_token");
        let eos = token_of("eos_token").into_iter().collect();
        let add_bos = cfg
            .get("add_bos_token")
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        let chat_template = cfg
            .get("chat_template")
            .and_then(|t| t.as_str())
            .map(str::to_string);
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            chat_template,
        })
    }

    /// Rebuilds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let model = g.meta_str("tokenizer.ggml.model").unwrap_or("");
        let tokens = string_array(g, "tokenizer.ggml.tokens")?;
        let types = int_array(g, "tokenizer.ggml.token_type").unwrap_or_default();
        let json = match model {
            "gpt2" => {
                let merges = string_array(g, "tokenizer.ggml.merges")?;
                let pre = g.meta_str("tokenizer.ggml.pre").unwrap_or("default");
                bpe_tokenizer_json(&tokens, &merges, pre)
            }
            "llama" => {
                let scores = float_array(g, "tokenizer.ggml.scores")?;
                if scores.len() != tokens.len() {
                    return Err(EngineError::Tokenizer(
                        "scores and tokens differ in length".into(),
                    ));
                }
                let unk = g.meta_usize("tokenizer.ggml.unknown_token_id").unwrap_or(0);
                spm_json(&tokens, &scores, unk)
            }
            other => {
                return Err(EngineError::Unsupported(format!(
                    "tokenizer model '{other}'"
                )));
            }
        };
        let mut inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| EngineError::Tokenizer(format!("rebuilding from GGUF: {e}")))?;
        let specials: Vec<tokenizers::AddedToken> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(t, _)| tokenizers::AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| EngineError::Tokenizer(format!("adding control tokens: {e}")))?;
        let id = |k: &str| {
            g.meta_usize(k)
                .filter(|&i| i < tokens.len())
                .map(|i| i as u32)
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let mut eos: Vec<u32> = ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| id(k))
            .collect();
        eos.dedup();
        let add_bos = match g.meta("tokenizer.ggml.add_bos_token") {
            Some(Value::Bool(b)) => *b,
            _ => model == "llama",
        };
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            chat_template: g.meta_str("tokenizer.chat_template").map(str::to_string),
        })
    }

    /// Token ids for `text`; control tokens written in the text are matched whole. Adds BOS
    /// when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            if let Some(b) = self.bos {
                if enc.get_ids().first() != Some(&b) {
                    ids.push(b);
                }
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text for `ids`, with special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| EngineError::Tokenizer(e.to_string()))
    }

    /// A decoder that turns a stream of ids into text as it becomes complete.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            inner: self.inner.decode_stream(true),
        }
    }

    /// Whether `id` ends a generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// The ids that end a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The text of a token id, special tokens included.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The BOS token's text, for chat templates.
    pub fn bos_text(&self) -> String {
        self.bos
            .and_then(|b| self.token_text(b))
            .unwrap_or_default()
    }

    /// The EOS token's text, for chat templates.
    pub fn eos_text(&self) -> String {
        self.eos
            .first()
            .and_then(|&e| self.token_text(e))
            .unwrap_or_default()
    }

    /// The model's own chat template, when it ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

fn string_array(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    match g.meta(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| EngineError::Tokenizer(format!("{key} holds a non-string")))
            })
            .collect(),
        _ => Err(EngineError::Tokenizer(format!("GGUF has no {key}"))),
    }
}

fn int_array(g: &GgufFile, key: &str) -> Option<Vec<i64>> {
    match g.meta(key) {
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| match v {
                    Value::I32(x) => *x as i64,
                    Value::U32(x) => *x as i64,
                    Value::I8(x) => *x as i64,
                    Value::U8(x) => *x as i64,
                    Value::I64(x) => *x,
                    _ => 1,
                })
                .collect(),
        ),
        _ => None,
    }
}

fn float_array(g: &GgufFile, key: &str) -> Result<Vec<f32>> {
    match g.meta(key) {
        Some(Value::Array(a)) => Ok(a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect()),
        _ => Err(EngineError::Tokenizer(format!("GGUF has no {key}"))),
    }
}

/// GPT-2 style split of contractions, letters, numbers, other symbols and whitespace; with
/// `\p{N}{1,3}` for llama3 and `\p{N}` for qwen2.
fn split_regex(numbers: &str) -> String {
    format!(
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{numbers}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
}

/// The tokenizer.json form of a byte-level BPE vocabulary with llama.cpp pre-tokenizer `pre`.
pub fn bpe_tokenizer_json(tokens: &[String], merges: &[String], pre: &str) -> Json {
    let vocab: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let regex_split = |numbers: &str| json!({"type": "Split", "pattern": {"Regex": split_regex(numbers)}, "behavior": "Isolated", "invert": false});
    let pre_tokenizer = match pre {
        "llama-bpe" | "llama3" | "smaug-bpe" | "dbrx" => {
            json!({"type": "Sequence", "pretokenizers": [regex_split(r"\p{N}{1,3}"), byte_level(false)]})
        }
        "qwen2" | "deepseek-llm" => {
            json!({"type": "Sequence", "pretokenizers": [regex_split(r"\p{N}"), byte_level(false)]})
        }
        // SmolLM / StarCoder: digits one by one, then GPT-2's byte-level split.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        _ => byte_level(true),
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        }
    })
}

fn spm_json(tokens: &[String], scores: &[f32], unk: usize) -> Json {
    let vocab: Vec<Json> = tokens
        .iter()
        .zip(scores)
        .map(|(t, s)| json!([t, s]))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": true}
    })
}
