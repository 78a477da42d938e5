//! A stage of a Llama-family decoder: the embedding if it is first, blocks `start..end`, and the
//! final norm and LM head if it is last. Any split of a model into stages computes exactly what
//! the whole model computes, because every stage runs the same ops on the same f32 hidden states.

use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvStore, SessionId};
use crate::linear::Linear;
use crate::sampling::{top_logprobs, Sampler, TokenLogprob};
use crate::weights::{Embedding, Role, WeightFile};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// Prefill runs in chunks of this many positions so an 8k prompt needs bounded scratch memory.
pub const PREFILL_CHUNK: usize = 512;

/// Default KV budget for a stage when the owner sets none.
pub const DEFAULT_KV_BUDGET: usize = 1 << 30;

struct Block {
    attn_norm: Tensor,
    /// Q, K and V stacked by rows: one matmul per step.
    qkv: Linear,
    o: Linear,
    ffn_norm: Tensor,
    /// Gate and up stacked by rows.
    gate_up: Linear,
    down: Linear,
}

/// What a stage consumes: token ids (first stage) or the previous stage's hidden states.
#[derive(Debug, Clone)]
pub enum StageInput {
    /// Token ids, for a stage that holds the embedding.
    Tokens(Vec<u32>),
    /// Hidden states (positions, hidden) in f32, for every other stage.
    Hidden(Tensor),
}

impl StageInput {
    /// How many positions this input covers.
    pub fn len(&self) -> usize {
        match self {
            StageInput::Tokens(t) => t.len(),
            StageInput::Hidden(h) => h.dims().first().copied().unwrap_or(0),
        }
    }

    /// Whether the input covers no positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a stage produced.
#[derive(Debug, Clone)]
pub enum StageOutput {
    /// Hidden states (positions, hidden) for the next stage.
    Hidden(Tensor),
    /// Logits of the last position, for a stage holding the LM head.
    Logits(Vec<f32>),
}

/// The token the last stage picked, with the top-k alternatives' log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The chosen token id.
    pub token: u32,
    /// Its log-probability under the unmodified model distribution.
    pub logprob: f32,
    /// The k most likely tokens and their log-probabilities, best first.
    pub top: Vec<TokenLogprob>,
}

/// One contiguous slice of a model, ready to run.
pub struct Stage {
    cfg: LlamaConfig,
    blocks_range: Range<usize>,
    embedding: Option<Embedding>,
    blocks: Vec<Block>,
    head: Option<(Tensor, Linear)>,
    inv_freq: Vec<f32>,
    rope_interleaved: bool,
    kv: KvStore,
}

impl Stage {
    /// Loads blocks `range` (plus the embedding when it starts at 0 and the head when it ends at
    /// the last block) from `file`, reading only those tensors. `kv_budget` bounds the bytes all
    /// sessions' caches may hold.
    pub fn load(file: &WeightFile, range: Range<usize>, kv_budget: usize) -> Result<Self> {
        let cfg = file.config()?;
        if range.start >= range.end || range.end > cfg.layers {
            return Err(EngineError::bad_input(format!(
                "block range {}..{} is not within 0..{}",
                range.start, range.end, cfg.layers
            )));
        }
        let (h, q_out, kv_out) = (
            cfg.hidden,
            cfg.heads * cfg.head_dim,
            cfg.kv_heads * cfg.head_dim,
        );
        let first = range.start == 0;
        let last = range.end == cfg.layers;
        let embedding = if first || (last && cfg.tied_embeddings) {
            Some(file.embedding(cfg.vocab, h)?)
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(range.len());
        for l in range.clone() {
            blocks.push(Block {
                attn_norm: file.vector(Role::AttnNorm(l), h)?,
                qkv: file.linear(
                    &[
                        (Role::Q(l), q_out),
                        (Role::K(l), kv_out),
                        (Role::V(l), kv_out),
                    ],
                    h,
                )?,
                o: file.linear(&[(Role::O(l), h)], q_out)?,
                ffn_norm: file.vector(Role::FfnNorm(l), h)?,
                gate_up: file.linear(&[(Role::Gate(l), cfg.ff), (Role::Up(l), cfg.ff)], h)?,
                down: file.linear(&[(Role::Down(l), h)], cfg.ff)?,
            });
        }
        let head = if last {
            let norm = file.vector(Role::OutputNorm, h)?;
            let lm = match (&embedding, cfg.tied_embeddings) {
                (Some(e), true) => e.as_linear()?,
                _ => file.linear(&[(Role::Output, cfg.vocab)], h)?,
            };
            Some((norm, lm))
        } else {
            None
        };
        let embedding = if first { embedding } else { None };
        let inv_freq = match file.rope_freq_factors(cfg.head_dim / 2)? {
            Some(factors) => {
                let base = LlamaConfig {
                    llama3_scaling: None,
                    ..cfg.clone()
                }
                .inv_freqs();
                base.iter().zip(factors).map(|(f, d)| f / d).collect()
            }
            None => cfg.inv_freqs(),
        };
        let kv = KvStore::new(
            range.len(),
            cfg.kv_heads,
            cfg.head_dim,
            cfg.context,
            kv_budget,
        );
        Ok(Self {
            rope_interleaved: file.rope_interleaved(),
            cfg,
            blocks_range: range,
            embedding,
            blocks,
            head,
            inv_freq,
            kv,
        })
    }

    /// The model geometry.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The blocks this stage runs.
    pub fn blocks(&self) -> Range<usize> {
        self.blocks_range.clone()
    }

    /// Whether this stage takes token ids.
    pub fn is_first(&self) -> bool {
        self.embedding.is_some()
    }

    /// Whether this stage produces logits.
    pub fn is_last(&self) -> bool {
        self.head.is_some()
    }

    /// The session caches of this stage.
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// Whether a full KV store may evict other sessions (see [`KvStore::set_eviction`]).
    pub fn set_kv_eviction(&mut self, evict: bool) {
        self.kv.set_eviction(evict);
    }

    /// Drops a session's cache.
    pub fn end_session(&mut self, id: SessionId) -> bool {
        self.kv.remove(id)
    }

    /// Runs `input` for `session` at positions `pos..pos + n`. A `pos` before the session's end
    /// rolls its cache back first (replay after failover). Non-last stages return hidden states
    /// for every position; the last stage returns the logits of the final position.
    pub fn forward(
        &mut self,
        session: SessionId,
        pos: usize,
        input: StageInput,
    ) -> Result<StageOutput> {
        let hidden = self.run_blocks(session, pos, input, false)?;
        match &self.head {
            None => Ok(StageOutput::Hidden(hidden)),
            Some(_) => {
                let n = hidden.dim(0)?;
                let logits = self.logits(&hidden.narrow(0, n - 1, 1)?)?;
                Ok(StageOutput::Logits(logits.squeeze(0)?.to_vec1::<f32>()?))
            }
        }
    }

    /// Like [`Stage::forward`] on the last stage, but returns logits for every position,
    /// shape (n, vocab).
    pub fn forward_all_logits(
        &mut self,
        session: SessionId,
        pos: usize,
        input: StageInput,
    ) -> Result<Tensor> {
        if self.head.is_none() {
            return Err(EngineError::bad_input("this stage holds no LM head"));
        }
        let hidden = self.run_blocks(session, pos, input, true)?;
        self.logits(&hidden)
    }

    /// Runs the last stage and returns only the sampled token and the top `k` log-probabilities,
    /// which is all a pipeline needs to send back.
    pub fn forward_sampled(
        &mut self,
        session: SessionId,
        pos: usize,
        input: StageInput,
        sampler: &mut Sampler,
        history: &[u32],
        k: usize,
    ) -> Result<SampledToken> {
        match self.forward(session, pos, input)? {
            StageOutput::Logits(logits) => {
                let token = sampler.sample(&logits, history)?;
                let (logprob, top) = top_logprobs(&logits, token, k);
                Ok(SampledToken {
                    token,
                    logprob,
                    top,
                })
            }
            StageOutput::Hidden(_) => Err(EngineError::bad_input("this stage holds no LM head")),
        }
    }

    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (norm, lm) = self
            .head
            .as_ref()
            .ok_or_else(|| EngineError::bad_input("no LM head"))?;
        let x = candle_nn::ops::rms_norm(&hidden.contiguous()?, norm, self.cfg.rms_eps as f32)?;
        lm.forward(&x)
    }

    fn embed_or_check(&self, input: StageInput) -> Result<Tensor> {
        match (input, &self.embedding) {
            (StageInput::Tokens(ids), Some(e)) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab) {
                    return Err(EngineError::bad_input(format!(
                        "token id {bad} is outside the vocabulary of {}",
                        self.cfg.vocab
                    )));
                }
                e.forward(&ids)
            }
            (StageInput::Tokens(_), None) => Err(EngineError::bad_input(
                "token ids sent to a stage that does not hold the embedding",
            )),
            (StageInput::Hidden(_), Some(_)) => Err(EngineError::bad_input(
                "hidden states sent to the first stage",
            )),
            (StageInput::Hidden(h), None) => {
                if h.dtype() != DType::F32 || h.rank() != 2 || h.dim(1)? != self.cfg.hidden {
                    return Err(EngineError::bad_input(format!(
                        "hidden states must be f32 (n, {}), got {:?} {:?}",
                        self.cfg.hidden,
                        h.dtype(),
                        h.dims()
                    )));
                }
                Ok(h)
            }
        }
    }

    /// Embeds or checks the input, then runs it through every block in chunks. Returns hidden
    /// states for all positions (`all` or a non-last stage) or only the final chunk's.
    fn run_blocks(
        &mut self,
        session: SessionId,
        pos: usize,
        input: StageInput,
        all: bool,
    ) -> Result<Tensor> {
        let n = input.len();
        if n == 0 {
            return Err(EngineError::bad_input("empty input"));
        }
        let needed = pos.saturating_add(n);
        if needed > self.cfg.context {
            return Err(EngineError::ContextOverflow {
                needed,
                context: self.cfg.context,
            });
        }
        let x = self.embed_or_check(input)?;
        let keep_all = all || self.head.is_none();
        let mut outputs = Vec::new();
        let mut done = 0;
        while done < n {
            let t = PREFILL_CHUNK.min(n - done);
            let chunk = x.narrow(0, done, t)?;
            let out = self.run_chunk(session, pos + done, chunk)?;
            if keep_all || done + t == n {
                outputs.push(out);
            }
            done += t;
        }
        Ok(if outputs.len() == 1 {
            outputs.remove(0)
        } else {
            Tensor::cat(&outputs, 0)?
        })
    }

    /// Runs one chunk inside candle's compute pool: candle ops started from a thread outside
    /// it each pay a cross-thread hand-off, which at decode sizes costs more than the op.
    fn run_chunk(&mut self, session: SessionId, pos: usize, x: Tensor) -> Result<Tensor> {
        candle_core::utils::with_threadpool(|| self.run_chunk_inner(session, pos, x))
    }

    fn run_chunk_inner(&mut self, session: SessionId, pos: usize, mut x: Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (cos, sin) = self.rope_tables(pos, t)?;
        let mask = causal_mask(pos, t)?;
        let cfg = &self.cfg;
        let kv = self.kv.reserve(session, pos, t)?;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.attn_norm, cfg.rms_eps as f32)?;
            let qkv = b.qkv.forward(&h)?;
            let (q_out, kv_out) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
            let q = heads_first(qkv.narrow(1, 0, q_out)?, cfg.heads, cfg.head_dim)?;
            let k = heads_first(qkv.narrow(1, q_out, kv_out)?, cfg.kv_heads, cfg.head_dim)?;
            let v = heads_first(
                qkv.narrow(1, q_out + kv_out, kv_out)?,
                cfg.kv_heads,
                cfg.head_dim,
            )?;
            let q = rope(&q, &cos, &sin, self.rope_interleaved)?;
            let k = rope(&k, &cos, &sin, self.rope_interleaved)?;
            let (k_all, v_all) = kv.append(i, &k, &v)?;
            let attn = attention(&q, &k_all, &v_all, mask.as_ref(), cfg)?;
            x = (x + b.o.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &b.ffn_norm, cfg.rms_eps as f32)?;
            let gate_up = b.gate_up.forward(&h)?;
            let mlp =
                (gate_up.narrow(1, 0, cfg.ff)?.silu()? * gate_up.narrow(1, cfg.ff, cfg.ff)?)?;
            x = (x + b.down.forward(&mlp)?)?;
        }
        kv.commit(t);
        Ok(x)
    }

    fn rope_tables(&self, pos: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(t * half);
        for p in pos..pos + t {
            angles.extend(self.inv_freq.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (t, half), &Device::Cpu)?;
        Ok((angles.cos()?, angles.sin()?))
    }
}

/// Rotates (heads, t, d) by position: adjacent pairs when `interleaved`, else the two halves.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let x = x.unsqueeze(0)?;
    let y = if interleaved {
        candle_nn::rotary_emb::rope_i(&x, cos, sin)?
    } else {
        candle_nn::rotary_emb::rope(&x, cos, sin)?
    };
    Ok(y.squeeze(0)?)
}

/// (t, heads * d) -> (heads, t, d), contiguous.
fn heads_first(x: Tensor, heads: usize, d: usize) -> Result<Tensor> {
    let t = x.dim(0)?;
    Ok(x.reshape((t, heads, d))?.transpose(0, 1)?.contiguous()?)
}

/// Additive mask for `t` new positions starting at `pos`: -inf where a key lies in the future.
fn causal_mask(pos: usize, t: usize) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let total = pos + t;
    let mut m = vec![0f32; t * total];
    for i in 0..t {
        for j in pos + i + 1..total {
            m[i * total + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Some(Tensor::from_vec(m, (t, total), &Device::Cpu)?))
}

/// Scaled dot-product attention with grouped KV heads: the query heads of a group are folded
/// into rows so K and V are never copied per query head. Returns (t, heads * d).
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    cfg: &LlamaConfig,
) -> Result<Tensor> {
    let (heads, t, d) = q.dims3()?;
    let group = heads / cfg.kv_heads;
    let total = k.dim(1)?;
    let q = q.reshape((cfg.kv_heads, group * t, d))?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match mask {
        None => scores,
        Some(m) => scores
            .reshape((cfg.kv_heads, group, t, total))?
            .broadcast_add(m)?
            .reshape((cfg.kv_heads, group * t, total))?,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.matmul(&v.contiguous()?)?;
    Ok(out
        .reshape((heads, t, d))?
        .transpose(0, 1)?
        .reshape((t, heads * d))?)
}

/// Index of the largest logit (the first one on ties), for greedy decoding.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}
