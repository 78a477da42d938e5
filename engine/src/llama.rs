//! A stage of a Llama-family decoder: the embedding if it is first, blocks `start..end`, and the
//! final norm and LM head if it is last. Any split of a model into stages computes exactly what
//! the whole model computes, because every stage runs the same ops on the same f32 hidden states.

use crate::attention::{attend, HeadShape, QueryRow};
use crate::config::LlamaConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::{KvStore, SessionId};
use crate::linear::Linear;
use crate::rows::{add_assign, rms_norm, swiglu};
use crate::sampling::{top_logprobs, Sampler, TokenLogprob};
use crate::weights::{Embedding, Role, WeightFile};
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// Prefill runs in chunks of this many positions so an 8k prompt needs bounded scratch memory.
pub const PREFILL_CHUNK: usize = 512;

pub use crate::kv_cache::DEFAULT_KV_BUDGET;
pub use crate::sampling::argmax;

struct Block {
    attn_norm: Vec<f32>,
    /// Q, K and V stacked by rows: one matmul per step.
    qkv: Linear,
    o: Linear,
    ffn_norm: Vec<f32>,
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
    /// The final norm's weights and the LM head.
    head: Option<(Vec<f32>, Linear)>,
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
                attn_norm: file.vector(Role::AttnNorm(l), h)?.to_vec1::<f32>()?,
                qkv: file.linear(
                    &[
                        (Role::Q(l), q_out),
                        (Role::K(l), kv_out),
                        (Role::V(l), kv_out),
                    ],
                    h,
                )?,
                o: file.linear(&[(Role::O(l), h)], q_out)?,
                ffn_norm: file.vector(Role::FfnNorm(l), h)?.to_vec1::<f32>()?,
                gate_up: file.linear(&[(Role::Gate(l), cfg.ff), (Role::Up(l), cfg.ff)], h)?,
                down: file.linear(&[(Role::Down(l), h)], cfg.ff)?,
            });
        }
        let head = if last {
            let norm = file.vector(Role::OutputNorm, h)?.to_vec1::<f32>()?;
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
        let item = BatchItem {
            session,
            pos,
            input,
        };
        self.forward_batch(vec![item])
            .pop()
            .unwrap_or_else(|| Err(EngineError::bad_input("empty batch")))
    }

    /// Runs many sessions' steps as one batch: every weight is read once for all their rows,
    /// attention runs per session over its own cache. Each item's output is bit-identical to
    /// [`Stage::forward`] on that item alone, and a bad item (unknown session, wrong shape,
    /// context or cache overflow) fails alone with its error while the rest are served.
    pub fn forward_batch(&mut self, items: Vec<BatchItem>) -> Vec<Result<StageOutput>> {
        let last = self.head.is_some();
        let hidden = self.run_batch(items, false);
        if !last {
            return hidden
                .into_iter()
                .map(|h| h.map(StageOutput::Hidden))
                .collect();
        }
        // One LM-head pass over every item's final row.
        let finals: Vec<Option<Tensor>> = hidden.iter().map(|h| h.as_ref().ok().cloned()).collect();
        let rows: Vec<&Tensor> = finals.iter().flatten().collect();
        let logits = match self.logits_rows(&rows) {
            Ok(l) => l,
            Err(e) => {
                let why = e.to_string();
                return hidden
                    .into_iter()
                    .map(|h| h.and_then(|_| Err(EngineError::bad_input(why.clone()))))
                    .collect();
            }
        };
        let mut logits = logits.into_iter();
        hidden
            .into_iter()
            .map(|h| {
                h.and_then(|_| {
                    logits
                        .next()
                        .map(StageOutput::Logits)
                        .ok_or_else(|| EngineError::bad_input("missing logits"))
                })
            })
            .collect()
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
        let item = BatchItem {
            session,
            pos,
            input,
        };
        let hidden = self
            .run_batch(vec![item], true)
            .pop()
            .unwrap_or_else(|| Err(EngineError::bad_input("empty batch")))?;
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
        let n = hidden.dim(0)?;
        let x = rms_norm(
            &hidden.flatten_all()?.to_vec1::<f32>()?,
            norm,
            self.cfg.rms_eps as f32,
        );
        let logits = candle_core::utils::with_threadpool(|| lm.forward_rows(&x, n))?;
        Ok(Tensor::from_vec(logits, (n, lm.rows()), &Device::Cpu)?)
    }

    /// Logits of single rows (1, hidden) stacked into one pass, one vector per row.
    fn logits_rows(&self, rows: &[&Tensor]) -> Result<Vec<Vec<f32>>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let x = Tensor::cat(rows, 0)?;
        let logits = self.logits(&x)?;
        Ok(logits.to_vec2::<f32>()?)
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

    /// Checks an item and embeds it: its input as (n, hidden).
    fn admit(&self, item: BatchItem, seen: &[SessionId]) -> Result<Pending> {
        let n = item.input.len();
        if n == 0 {
            return Err(EngineError::bad_input("empty input"));
        }
        if seen.contains(&item.session) {
            return Err(EngineError::bad_input(format!(
                "session {} has two steps in one batch",
                item.session
            )));
        }
        let needed = item.pos.saturating_add(n);
        if needed > self.cfg.context {
            return Err(EngineError::ContextOverflow {
                needed,
                context: self.cfg.context,
            });
        }
        Ok(Pending {
            session: item.session,
            pos: item.pos,
            x: self.embed_or_check(item.input)?,
            n,
            done: 0,
            outputs: Vec::new(),
        })
    }

    /// Embeds or checks every item, then runs them through every block in rounds of at most
    /// [`PREFILL_CHUNK`] positions per item. Returns, per item, hidden states for all positions
    /// (`all` or a non-last stage) or only for the final position.
    fn run_batch(&mut self, items: Vec<BatchItem>, all: bool) -> Vec<Result<Tensor>> {
        let keep_all = all || self.head.is_none();
        let mut results: Vec<Option<Result<Tensor>>> = Vec::with_capacity(items.len());
        let mut pending: Vec<(usize, Pending)> = Vec::new();
        let mut seen = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let session = item.session;
            match self.admit(item, &seen) {
                Ok(p) => {
                    seen.push(session);
                    pending.push((i, p));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        while !pending.is_empty() {
            // This round's rows: the next chunk of every item, its cache reserved.
            let (mut slots, mut chunks) = (Vec::new(), Vec::new());
            let mut failed = Vec::new();
            for (slot, (_, p)) in pending.iter().enumerate() {
                let t = PREFILL_CHUNK.min(p.n - p.done);
                let pos = p.pos + p.done;
                let reserved = self
                    .kv
                    .reserve(p.session, pos, t, &seen)
                    .map(|_| ())
                    .and_then(|_| Ok(p.x.narrow(0, p.done, t)?));
                match reserved {
                    Ok(x) => {
                        slots.push(slot);
                        chunks.push(Chunk {
                            session: p.session,
                            pos,
                            x,
                        });
                    }
                    Err(e) => failed.push((slot, e)),
                }
            }
            let out = self.run_round(&chunks);
            let mut at = 0;
            for (slot, c) in slots.iter().zip(&chunks) {
                let t = c.x.dim(0).unwrap_or(0);
                let p = &mut pending[*slot].1;
                match &out {
                    Ok(h) => match h.narrow(0, at, t) {
                        Ok(rows) => {
                            p.done += t;
                            if keep_all {
                                p.outputs.push(rows);
                            } else if p.done == p.n {
                                match rows.narrow(0, t - 1, 1) {
                                    Ok(r) => p.outputs.push(r),
                                    Err(e) => failed.push((*slot, e.into())),
                                }
                            }
                        }
                        Err(e) => failed.push((*slot, e.into())),
                    },
                    Err(e) => failed.push((*slot, EngineError::bad_input(e.to_string()))),
                }
                at += t;
            }
            // Failed and finished items leave; the rest go on to their next chunk.
            failed.sort_by_key(|(slot, _)| std::cmp::Reverse(*slot));
            for (slot, e) in failed {
                let (i, _) = pending.remove(slot);
                results[i] = Some(Err(e));
            }
            let mut k = 0;
            while k < pending.len() {
                if pending[k].1.done == pending[k].1.n {
                    let (i, mut p) = pending.remove(k);
                    let out = if p.outputs.len() == 1 {
                        Ok(p.outputs.remove(0))
                    } else {
                        Tensor::cat(&p.outputs, 0).map_err(EngineError::from)
                    };
                    results[i] = Some(out);
                } else {
                    k += 1;
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(EngineError::bad_input("item not run"))))
            .collect()
    }

    /// Runs one round inside candle's compute pool: candle ops started from a thread outside
    /// it each pay a cross-thread hand-off, which at decode sizes costs more than the op.
    fn run_round(&mut self, chunks: &[Chunk]) -> Result<Tensor> {
        candle_core::utils::with_threadpool(|| self.run_round_inner(chunks))
    }

    /// Every block over the stacked rows of `chunks` (each already reserved in the cache):
    /// projections once for all rows, attention per session.
    fn run_round_inner(&mut self, chunks: &[Chunk]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let eps = cfg.rms_eps as f32;
        let mut x = Vec::new();
        for c in chunks {
            x.extend(c.x.flatten_all()?.to_vec1::<f32>()?);
        }
        let rows = x.len() / cfg.hidden.max(1);
        let positions: Vec<usize> = chunks
            .iter()
            .flat_map(|c| c.pos..c.pos + c.x.dim(0).unwrap_or(0))
            .collect();
        if positions.len() != rows || x.len() != rows * cfg.hidden {
            return Err(EngineError::bad_input("chunk shapes disagree"));
        }
        let (cos, sin) = self.rope_tables(&positions);
        let shape = HeadShape {
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
        };
        let (q_out, kv_out) = (cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        let width = q_out + 2 * kv_out;
        let mut attn = vec![0f32; rows * q_out];
        for (i, b) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &b.attn_norm, eps);
            let mut qkv = b.qkv.forward_rows(&h, rows)?;
            if qkv.len() != rows * width {
                return Err(EngineError::bad_input(
                    "q/k/v projection of the wrong width",
                ));
            }
            let half = self.inv_freq.len();
            for (r, row) in qkv.chunks_exact_mut(width).enumerate() {
                let (c, s) = (&cos[r * half..][..half], &sin[r * half..][..half]);
                let (q, kv) = row.split_at_mut(q_out);
                rope_row(q, cfg.head_dim, c, s, self.rope_interleaved);
                rope_row(&mut kv[..kv_out], cfg.head_dim, c, s, self.rope_interleaved);
            }
            // Keys and values into each session's cache, then attention reads them there.
            let mut at = 0;
            let (mut ks, mut vs) = (Vec::new(), Vec::new());
            for c in chunks {
                let t = c.x.dim(0)?;
                let cache = self
                    .kv
                    .session_mut(c.session)
                    .ok_or(EngineError::UnknownSession(c.session))?;
                ks.clear();
                vs.clear();
                for row in qkv[at * width..(at + t) * width].chunks_exact(width) {
                    ks.extend_from_slice(&row[q_out..q_out + kv_out]);
                    vs.extend_from_slice(&row[q_out + kv_out..]);
                }
                cache.write(i, &ks, &vs)?;
                at += t;
            }
            let mut queries = Vec::with_capacity(rows);
            let mut at = 0;
            for c in chunks {
                let t = c.x.dim(0)?;
                let cache = self
                    .kv
                    .session(c.session)
                    .ok_or(EngineError::UnknownSession(c.session))?;
                let (k, v) = cache.layer(i, c.pos + t)?;
                for r in 0..t {
                    queries.push(QueryRow {
                        q: &qkv[(at + r) * width..][..q_out],
                        pos: c.pos + r,
                        k,
                        v,
                    });
                }
                at += t;
            }
            attend(&queries, shape, &mut attn);
            drop(queries);
            add_assign(&mut x, &b.o.forward_rows(&attn, rows)?);
            let h = rms_norm(&x, &b.ffn_norm, eps);
            let gate_up = b.gate_up.forward_rows(&h, rows)?;
            if gate_up.len() != rows * 2 * cfg.ff {
                return Err(EngineError::bad_input(
                    "gate/up projection of the wrong width",
                ));
            }
            let mlp = swiglu(&gate_up, cfg.ff);
            add_assign(&mut x, &b.down.forward_rows(&mlp, rows)?);
        }
        for c in chunks {
            let t = c.x.dim(0)?;
            if let Some(cache) = self.kv.session_mut(c.session) {
                cache.commit(t);
            }
        }
        Ok(Tensor::from_vec(x, (rows, cfg.hidden), &Device::Cpu)?)
    }

    /// cos and sin of every row's rotation angles, (rows, head_dim / 2) each.
    fn rope_tables(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }
}

/// One session's share of a batched step (see [`Stage::forward_batch`]).
#[derive(Debug, Clone)]
pub struct BatchItem {
    /// Whose cache the step reads and extends.
    pub session: SessionId,
    /// The position of the input's first row.
    pub pos: usize,
    /// Token ids or hidden states for positions `pos..pos + n`.
    pub input: StageInput,
}

/// An item checked and embedded, with how far it has run.
struct Pending {
    session: SessionId,
    pos: usize,
    x: Tensor,
    n: usize,
    done: usize,
    outputs: Vec<Tensor>,
}

/// The rows of one item that run in one round.
struct Chunk {
    session: SessionId,
    pos: usize,
    x: Tensor,
}

/// Rotates every head of one row in place by its position's angles: adjacent pairs when
/// `interleaved`, else the two halves of each head (the formula candle's rope kernels use).
fn rope_row(x: &mut [f32], d: usize, cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x1, x2) = (head[a], head[b]);
            head[a] = x1 * cos[i] - x2 * sin[i];
            head[b] = x1 * sin[i] + x2 * cos[i];
        }
    }
}
