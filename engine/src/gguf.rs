//! Reading GGUF files: a memory map, the parsed header, typed metadata access, and tensors
//! loaded one at a time so a stage touches only the bytes it needs.

use crate::config::{Llama3Scaling, LlamaConfig};
use crate::error::candle_message;
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;
use std::io::Cursor;
use std::path::Path;

/// An open GGUF file. The mapping is shared by every tensor read from it.
pub struct GgufFile {
    mmap: memmap2::Mmap,
    content: Content,
}

impl GgufFile {
    /// Maps and parses the header of a GGUF file. Fails with a typed error on anything that
    /// is not a complete, well-formed GGUF v2/v3 file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        // SAFETY: the mapping is read-only; a file truncated underneath us is the only hazard,
        // and model files in the cache are never rewritten in place.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if mmap.len() < 8 || &mmap[..4] != b"GGUF" {
            return Err(EngineError::invalid(format!(
                "{} is not a GGUF file (bad magic)",
                path.display()
            )));
        }
        // candle divides by the declared alignment without checking it.
        match declared_alignment(&mmap) {
            Ok(Some(a)) if !a.is_power_of_two() => {
                return Err(EngineError::invalid(format!(
                    "{}: general.alignment is {a}, not a power of two",
                    path.display()
                )))
            }
            Ok(_) => {}
            Err(why) => return Err(EngineError::invalid(format!("{}: {why}", path.display()))),
        }
        let content = Content::read(&mut Cursor::new(&mmap[..])).map_err(|e| {
            let msg = candle_message(&e);
            match msg.strip_prefix("unknown dtype for tensor ") {
                Some(code) => EngineError::Unsupported(format!(
                    "tensor type {code} (e.g. an IQ quant); supported: F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K"
                )),
                None => EngineError::invalid(format!("{}: {msg}", path.display())),
            }
        })?;
        if content.tensor_data_offset > mmap.len() as u64 {
            return Err(EngineError::invalid(
                "tensor data starts past the end of the file",
            ));
        }
        check_extents(&content, mmap.len() as u64)?;
        Ok(Self { mmap, content })
    }

    /// The parsed header.
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// A metadata value, if present.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A string metadata value, if present and a string.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    /// An unsigned metadata value of any integer width.
    pub fn meta_usize(&self, key: &str) -> Option<usize> {
        let v = self.meta(key)?;
        let n: i128 = match v {
            Value::U8(x) => *x as i128,
            Value::I8(x) => *x as i128,
            Value::U16(x) => *x as i128,
            Value::I16(x) => *x as i128,
            Value::U32(x) => *x as i128,
            Value::I32(x) => *x as i128,
            Value::U64(x) => *x as i128,
            Value::I64(x) => *x as i128,
            _ => return None,
        };
        usize::try_from(n).ok()
    }

    /// A float metadata value.
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.meta(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => self.meta_usize(key).map(|x| x as f64),
        }
    }

    /// Whether a tensor with this name exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Loads one tensor (still quantized) from the mapping.
    pub fn tensor(&self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::invalid(format!("missing tensor {name}")));
        }
        self.content
            .tensor(&mut Cursor::new(&self.mmap[..]), name, &Device::Cpu)
            .map_err(|e| EngineError::invalid(format!("tensor {name}: {}", candle_message(&e))))
    }

    /// Reads the Llama geometry from the metadata, refusing other architectures.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self
            .meta_str("general.architecture")
            .ok_or_else(|| EngineError::invalid("missing general.architecture"))?
            .to_string();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(EngineError::Unsupported(format!(
                "architecture '{arch}' (only the Llama family runs)"
            )));
        }
        let need = |k: &str| {
            self.meta_usize(&format!("{arch}.{k}"))
                .ok_or_else(|| EngineError::invalid(format!("missing {arch}.{k}")))
        };
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        if heads == 0 {
            return Err(EngineError::invalid("attention.head_count is 0"));
        }
        let kv_heads = self
            .meta_usize(&format!("{arch}.attention.head_count_kv"))
            .unwrap_or(heads);
        let head_dim = self
            .meta_usize(&format!("{arch}.attention.key_length"))
            .unwrap_or(hidden / heads);
        let vocab = match self.meta_usize(&format!("{arch}.vocab_size")) {
            Some(v) => v,
            None => match self.meta("tokenizer.ggml.tokens") {
                Some(Value::Array(a)) => a.len(),
                _ => self
                    .content
                    .tensor_infos
                    .get("token_embd.weight")
                    .and_then(|t| t.shape.dims().first().copied())
                    .ok_or_else(|| EngineError::invalid("cannot tell the vocabulary size"))?,
            },
        };
        let llama3_scaling = match self.meta_str(&format!("{arch}.rope.scaling.type")) {
            Some("llama3") => Some(Llama3Scaling {
                factor: self
                    .meta_f64(&format!("{arch}.rope.scaling.factor"))
                    .unwrap_or(8.0) as f32,
                low_freq_factor: self
                    .meta_f64(&format!("{arch}.rope.scaling.low_freq_factor"))
                    .unwrap_or(1.0) as f32,
                high_freq_factor: self
                    .meta_f64(&format!("{arch}.rope.scaling.high_freq_factor"))
                    .unwrap_or(4.0) as f32,
                original_context: self
                    .meta_usize(&format!("{arch}.rope.scaling.original_context_length"))
                    .unwrap_or(8192),
            }),
            _ => None,
        };
        let cfg = LlamaConfig {
            hidden,
            ff: need("feed_forward_length")?,
            layers: need("block_count")?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            rms_eps: self
                .meta_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: self
                .meta_f64(&format!("{arch}.rope.freq_base"))
                .unwrap_or(10_000.0) as f32,
            llama3_scaling,
            context: self
                .meta_usize(&format!("{arch}.context_length"))
                .unwrap_or(2048),
            tied_embeddings: !self.has_tensor("output.weight"),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The `general.alignment` a GGUF header declares, as candle reads it (an integer of at
/// most 32 bits; any other type means the default), found by walking the metadata with every
/// length checked against the bytes there are. `None` when it declares none.
fn declared_alignment(b: &[u8]) -> std::result::Result<Option<u64>, String> {
    let mut r = HeaderReader { b, at: 4 };
    let wide = r.u32()? >= 2;
    r.count(wide)?; // tensors
    let entries = r.count(wide)?;
    for _ in 0..entries {
        let key = r.string(wide)?;
        let ty = r.u32()?;
        if key == b"general.alignment" {
            // The integers up to 32 bits (types 0 to 5), little-endian; candle ignores a
            // negative one.
            let Some(&size) = VALUE_SIZES[..6].get(ty as usize) else {
                return Ok(None);
            };
            let bytes = r.take(size)?;
            let negative = ty % 2 == 1 && bytes.last().is_some_and(|b| b & 0x80 != 0);
            let value = bytes
                .iter()
                .rev()
                .fold(0u64, |v, &b| (v << 8) | u64::from(b));
            return Ok(Some(value).filter(|_| !negative));
        }
        r.skip_value(ty, wide, 0)?;
    }
    Ok(None)
}

/// Bytes of a GGUF metadata value by type code: u8, i8, u16, i16, u32, i32, f32, bool, then
/// string and array (0: variable), then u64, i64, f64.
const VALUE_SIZES: [u64; 13] = [1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8];

/// A cursor over a GGUF header that refuses to read past the end.
struct HeaderReader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> HeaderReader<'a> {
    fn take(&mut self, n: u64) -> std::result::Result<&'a [u8], String> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|&e| e <= self.b.len())
            .ok_or("the header runs past the end of the file")?;
        let b: &'a [u8] = self.b;
        let out = &b[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        let lo = u64::from(self.u32()?);
        Ok(lo | (u64::from(self.u32()?) << 32))
    }

    /// A count or length: 64 bits from GGUF v2 on, 32 before.
    fn count(&mut self, wide: bool) -> std::result::Result<u64, String> {
        if wide {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }

    fn string(&mut self, wide: bool) -> std::result::Result<&'a [u8], String> {
        let len = self.count(wide)?;
        self.take(len)
    }

    /// Steps over one value of GGUF type `ty`; every element read consumes bytes, so a
    /// hostile count ends at the end of the file.
    fn skip_value(&mut self, ty: u32, wide: bool, depth: u32) -> std::result::Result<(), String> {
        match ty {
            8 => self.string(wide).map(|_| ()),
            9 if depth < 4 => {
                let inner = self.u32()?;
                let n = self.count(wide)?;
                match VALUE_SIZES.get(inner as usize).copied().filter(|&s| s > 0) {
                    Some(size) => self
                        .take(n.checked_mul(size).ok_or("an array larger than any file")?)
                        .map(|_| ()),
                    None => {
                        for _ in 0..n {
                            self.skip_value(inner, wide, depth + 1)?;
                        }
                        Ok(())
                    }
                }
            }
            9 => Err("metadata arrays nested too deep".into()),
            t => match VALUE_SIZES.get(t as usize).copied().filter(|&s| s > 0) {
                Some(size) => self.take(size).map(|_| ()),
                None => Err(format!("unknown metadata value type {t}")),
            },
        }
    }
}

/// Refuses a file whose tensors reach past its end (a download or copy cut short) at open,
/// with the sizes, rather than at whichever tensor a stage happens to load first.
fn check_extents(content: &Content, file_len: u64) -> Result<()> {
    let mut end = content.tensor_data_offset;
    let mut last = "";
    for (name, info) in &content.tensor_infos {
        let block = info.ggml_dtype.block_size().max(1) as u64;
        // The element count is a product of the file's dimensions: checked, for a hostile
        // file's can overflow it.
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| {
                EngineError::invalid(format!("tensor {name} is too large to address"))
            })?;
        let bytes = (elements / block)
            .checked_mul(info.ggml_dtype.type_size() as u64)
            .and_then(|b| b.checked_add(content.tensor_data_offset))
            .and_then(|b| b.checked_add(info.offset))
            .ok_or_else(|| {
                EngineError::invalid(format!("tensor {name} is too large to address"))
            })?;
        if bytes > end {
            end = bytes;
            last = name;
        }
    }
    if end > file_len {
        return Err(EngineError::invalid(format!(
            "the file is cut short: it has {file_len} bytes, and its tensors (the last, {last}) need {end}; fetch it again"
        )));
    }
    Ok(())
}
