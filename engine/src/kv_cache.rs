//! Per-session key/value caches for one stage, held under a byte budget with least-recently-used
//! eviction. Each block's keys and values are one plain buffer per session, laid out position by
//! position, so a step appends rows in place and attention reads them without copies. Buffers
//! grow by doubling so a decode step never copies the whole history.

use crate::error::{EngineError, Result};
use std::collections::HashMap;

/// Identifies one generation (conversation) across every stage of a pipeline.
pub type SessionId = u64;

const MIN_CAPACITY: usize = 32;

/// KV budget of a stage when its owner sets no memory cap.
pub const DEFAULT_KV_BUDGET: usize = 1 << 30;
/// KV budget a stage gets however tight its owner's cap.
pub const MIN_KV_BUDGET: usize = 16 << 20;
/// Memory a stage needs besides its weights and caches.
pub const STAGE_SCRATCH_BYTES: u64 = 32 << 20;

/// Bytes the KV caches of a stage whose weights take `weight_bytes` may use: what
/// `memory_cap` leaves after the weights and scratch, between [`MIN_KV_BUDGET`] and
/// [`DEFAULT_KV_BUDGET`]; without a cap, the default. Nodes size their caches by it and
/// coordinators size the pool's session count by it, so both must use this one formula.
pub fn stage_kv_budget(memory_cap: Option<u64>, weight_bytes: u64) -> usize {
    let Some(cap) = memory_cap else {
        return DEFAULT_KV_BUDGET;
    };
    let left = cap.saturating_sub(weight_bytes.saturating_add(STAGE_SCRATCH_BYTES));
    usize::try_from(left)
        .unwrap_or(usize::MAX)
        .clamp(MIN_KV_BUDGET, DEFAULT_KV_BUDGET)
}

/// Bytes that other sessions may hold before a new session has to wait (without eviction):
/// three quarters of the budget, because sessions that run together grow together, and if
/// new ones took the last room every running one could end up waiting for the others.
pub fn admission_bytes(budget: usize) -> usize {
    budget / 4 * 3
}

/// Keys and values of one block for one session: (capacity, kv_heads, head_dim) each.
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// All cached positions of one session in this stage.
pub struct SessionKv {
    layers: Vec<LayerKv>,
    /// Values per position: kv_heads * head_dim.
    row: usize,
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

    /// Writes the keys and values of `t` new positions of block `layer` after the committed
    /// ones; `k` and `v` hold `t * kv_heads * head_dim` values each. The caller has reserved
    /// room with [`KvStore::reserve`].
    pub fn write(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let row = self.row;
        if k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(EngineError::bad_input("KV rows of the wrong width"));
        }
        let t = k.len() / row;
        if self.len + t > self.capacity {
            return Err(EngineError::bad_input("KV append past reserved capacity"));
        }
        let entry = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| EngineError::bad_input(format!("no cache for block {layer}")))?;
        let at = self.len * row..(self.len + t) * row;
        entry.k[at.clone()].copy_from_slice(k);
        entry.v[at].copy_from_slice(v);
        Ok(())
    }

    /// The keys and values of block `layer` for the first `positions` positions (committed ones
    /// and any written since), each (positions, kv_heads, head_dim).
    pub fn layer(&self, layer: usize, positions: usize) -> Result<(&[f32], &[f32])> {
        let entry = self
            .layers
            .get(layer)
            .ok_or_else(|| EngineError::bad_input(format!("no cache for block {layer}")))?;
        if positions > self.capacity {
            return Err(EngineError::bad_input("KV read past reserved capacity"));
        }
        let n = positions * self.row;
        Ok((&entry.k[..n], &entry.v[..n]))
    }

    /// Marks `t` written positions as committed once every block has written them.
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

    /// A held session's cache, to write and read during a step.
    pub fn session_mut(&mut self, id: SessionId) -> Option<&mut SessionKv> {
        self.sessions.get_mut(&id)
    }

    /// A held session's cache.
    pub fn session(&self, id: SessionId) -> Option<&SessionKv> {
        self.sessions.get(&id)
    }

    /// Prepares `id` to take `t` positions starting at `pos`: creates it when `pos` is 0,
    /// rolls it back when `pos` is earlier than its end (replay), grows its buffers, and evicts
    /// other sessions, least recently used first, to stay within the budget. Sessions in
    /// `keep` (the rest of a batch) are never evicted.
    pub fn reserve(
        &mut self,
        id: SessionId,
        pos: usize,
        t: usize,
        keep: &[SessionId],
    ) -> Result<&mut SessionKv> {
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
            self.evict_for(id, needed_bytes, keep);
        }
        let others = self.bytes_besides(id);
        let new = !self.evict && !self.sessions.contains_key(&id);
        let limit = if new && others > 0 {
            admission_bytes(self.budget)
        } else {
            self.budget
        };
        if others + needed_bytes > limit {
            return Err(EngineError::KvBudget {
                needed: needed_bytes,
                budget: limit.saturating_sub(others),
            });
        }
        self.clock += 1;
        let clock = self.clock;
        let (layers, row) = (self.layers, self.kv_heads * self.head_dim);
        let session = self.sessions.entry(id).or_insert_with(|| SessionKv {
            layers: (0..layers)
                .map(|_| LayerKv {
                    k: Vec::new(),
                    v: Vec::new(),
                })
                .collect(),
            row,
            len: 0,
            capacity: 0,
            last_used: 0,
        });
        session.len = session.len.min(pos);
        session.last_used = clock;
        if capacity > session.capacity {
            for l in &mut session.layers {
                l.k.resize(capacity * row, 0.0);
                l.v.resize(capacity * row, 0.0);
            }
            session.capacity = capacity;
        }
        Ok(session)
    }

    /// Bytes held by every session but `id`.
    fn bytes_besides(&self, id: SessionId) -> usize {
        self.sessions
            .iter()
            .filter(|(other, _)| **other != id)
            .map(|(_, s)| self.bytes_for(s.capacity))
            .sum()
    }

    /// Evicts least-recently-used sessions other than `keep` and `also` until `keep` can hold
    /// `keep_bytes` within the budget.
    fn evict_for(&mut self, keep: SessionId, keep_bytes: usize, also: &[SessionId]) {
        loop {
            if self.bytes_besides(keep) + keep_bytes <= self.budget {
                return;
            }
            let victim = self
                .sessions
                .iter()
                .filter(|(id, _)| **id != keep && !also.contains(id))
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
