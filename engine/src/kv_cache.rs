//! Per-session key/value caches for one stage, held under a byte budget with least-recently-used
//! eviction. Buffers grow by doubling so a decode step appends in place instead of copying the
//! whole history.

use crate::error::{EngineError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Identifies one generation (conversation) across every stage of a pipeline.
pub type SessionId = u64;

const MIN_CAPACITY: usize = 32;

/// Keys and values of one block for one session: (kv_heads, capacity, head_dim) each.
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// All cached positions of one session in this stage.
pub struct SessionKv {
    layers: Vec<LayerKv>,
    len: usize,
    capacity: usize,
    last_used: u64,
}

impl SessionKv {
    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `t` new positions of block `layer` at the end and returns the keys and values of
    /// every position up to and including them, each (kv_heads, len + t, head_dim).
    /// The caller has reserved room with [`KvStore::reserve`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(1)?;
        let entry = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| EngineError::bad_input(format!("no cache for block {layer}")))?;
        if self.len + t > self.capacity {
            return Err(EngineError::bad_input("KV append past reserved capacity"));
        }
        entry.k.slice_set(&k.contiguous()?, 1, self.len)?;
        entry.v.slice_set(&v.contiguous()?, 1, self.len)?;
        let total = self.len + t;
        Ok((entry.k.narrow(1, 0, total)?, entry.v.narrow(1, 0, total)?))
    }

    /// Marks `t` appended positions as committed once every block has written them.
    pub fn commit(&mut self, t: usize) {
        self.len += t;
    }
}

/// The KV caches of every session a stage serves.
pub struct KvStore {
    sessions: HashMap<SessionId, SessionKv>,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    context: usize,
    budget: usize,
    clock: u64,
    evict: bool,
}

impl KvStore {
    /// An empty store for `layers` blocks under a budget of `budget` bytes.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        context: usize,
        budget: usize,
    ) -> Self {
        Self {
            sessions: HashMap::new(),
            layers,
            kv_heads,
            head_dim,
            context,
            budget,
            clock: 0,
            evict: true,
        }
    }

    /// Whether other sessions may be evicted (least recently used first) to make room. A
    /// server whose sessions are all live turns this off: a full store then refuses with
    /// [`EngineError::KvBudget`] instead of breaking a running session.
    pub fn set_eviction(&mut self, evict: bool) {
        self.evict = evict;
    }

    fn bytes_for(&self, capacity: usize) -> usize {
        self.layers * 2 * self.kv_heads * capacity * self.head_dim * std::mem::size_of::<f32>()
    }

    /// Bytes held by all sessions.
    pub fn used_bytes(&self) -> usize {
        self.sessions
            .values()
            .map(|s| self.bytes_for(s.capacity))
            .sum()
    }

    /// The configured budget in bytes.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Positions cached for a session, if it is held.
    pub fn session_len(&self, id: SessionId) -> Option<usize> {
        self.sessions.get(&id).map(|s| s.len)
    }

    /// Sessions currently held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Forgets a session.
    pub fn remove(&mut self, id: SessionId) -> bool {
        self.sessions.remove(&id).is_some()
    }

    /// Prepares `id` to take `t` positions starting at `pos`: creates it when `pos` is 0,
    /// rolls it back when `pos` is earlier than its end (replay), grows its buffers, and evicts
    /// other sessions, least recently used first, to stay within the budget.
    pub fn reserve(&mut self, id: SessionId, pos: usize, t: usize) -> Result<&mut SessionKv> {
        let needed = pos.checked_add(t).filter(|n| *n <= self.context).ok_or(
            EngineError::ContextOverflow {
                needed: pos.saturating_add(t),
                context: self.context,
            },
        )?;
        match self.sessions.get(&id).map(|s| s.len) {
            None if pos != 0 => return Err(EngineError::UnknownSession(id)),
            Some(len) if pos > len => {
                return Err(EngineError::bad_input(format!(
                    "session {id} holds {len} positions, input starts at {pos}"
                )))
            }
            _ => {}
        }
        let current = self.sessions.get(&id).map_or(0, |s| s.capacity);
        let capacity = if needed <= current {
            current
        } else {
            needed.max(current * 2).max(MIN_CAPACITY).min(self.context)
        };
        let needed_bytes = self.bytes_for(capacity);
        if needed_bytes > self.budget {
            return Err(EngineError::KvBudget {
                needed: needed_bytes,
                budget: self.budget,
            });
        }
        if self.evict {
            self.evict_for(id, needed_bytes);
        } else {
            let others: usize = self
                .sessions
                .iter()
                .filter(|(other, _)| **other != id)
                .map(|(_, s)| self.bytes_for(s.capacity))
                .sum();
            if others + needed_bytes > self.budget {
                return Err(EngineError::KvBudget {
                    needed: needed_bytes,
                    budget: self.budget.saturating_sub(others),
                });
            }
        }
        self.clock += 1;
        let clock = self.clock;
        let (layers, kv_heads, head_dim) = (self.layers, self.kv_heads, self.head_dim);
        let session = self.sessions.entry(id).or_insert_with(|| SessionKv {
            layers: Vec::new(),
            len: 0,
            capacity: 0,
            last_used: 0,
        });
        session.len = session.len.min(pos);
        session.last_used = clock;
        if capacity > session.capacity {
            let mut grown = Vec::with_capacity(layers);
            for l in 0..layers {
                let k = Tensor::zeros((kv_heads, capacity, head_dim), DType::F32, &Device::Cpu)?;
                let v = Tensor::zeros((kv_heads, capacity, head_dim), DType::F32, &Device::Cpu)?;
                if let Some(old) = session.layers.get(l) {
                    if session.len > 0 {
                        k.slice_set(&old.k.narrow(1, 0, session.len)?.contiguous()?, 1, 0)?;
                        v.slice_set(&old.v.narrow(1, 0, session.len)?.contiguous()?, 1, 0)?;
                    }
                }
                grown.push(LayerKv { k, v });
            }
            session.layers = grown;
            session.capacity = capacity;
        }
        Ok(session)
    }

    /// Evicts least-recently-used sessions other than `keep` until `keep` can hold
    /// `keep_bytes` within the budget.
    fn evict_for(&mut self, keep: SessionId, keep_bytes: usize) {
        loop {
            let others: usize = self
                .sessions
                .iter()
                .filter(|(id, _)| **id != keep)
                .map(|(_, s)| self.bytes_for(s.capacity))
                .sum();
            if others + keep_bytes <= self.budget {
                return;
            }
            let victim = self
                .sessions
                .iter()
                .filter(|(id, _)| **id != keep)
                .min_by_key(|(_, s)| s.last_used)
                .map(|(id, _)| *id);
            match victim {
                Some(v) => {
                    tracing::debug!(session = v, "evicting KV cache (LRU)");
                    self.sessions.remove(&v);
                }
                None => return,
            }
        }
    }
}
