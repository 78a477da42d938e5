//! Which peer holds which blocks. Peers are grouped into chains, each able to hold the whole
//! model; within a chain every peer gets a contiguous range in proportion to its speed, capped
//! by its memory. Peers too few to form another chain replicate the slowest span. Re-planning
//! keeps every assignment that still stands, so a joining peer never makes others reload.

use potluck_protocol::messages::LayerRange;
use potluck_protocol::signed::PublicKey;
use std::collections::{BTreeMap, HashMap, HashSet};
use thiserror::Error;

/// What the planner needs to know about the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Decoder blocks.
    pub layers: u32,
    /// Bytes one block's weights take in memory.
    pub layer_bytes: u64,
    /// Extra bytes of the embedding or LM head, which a first or last stage holds.
    pub edge_bytes: u64,
    /// Bytes each peer keeps free for KV caches and scratch.
    pub reserve_bytes: u64,
}

/// A peer as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanPeer {
    /// Identity.
    pub id: PublicKey,
    /// Measured speed, blocks per second (any consistent unit).
    pub speed: f64,
    /// Memory it may use.
    pub memory_bytes: u64,
    /// Whether it may hold the first or last span, which see text (with `--private-edges`,
    /// trusted members only).
    pub edge_ok: bool,
}

/// One peer's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    /// Who.
    pub peer: PublicKey,
    /// Which blocks.
    pub range: LayerRange,
}

/// A complete assignment of blocks to peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Increases whenever the assignments change.
    pub epoch: u64,
    /// Every assignment.
    pub spans: Vec<Span>,
}

impl Plan {
    /// Why the plan looks as it does, in words for the operator's log and the dashboard:
    /// whole copies of a model of `layers` blocks (replicas, each serving sessions alone,
    /// which is what nodes that can hold the model get) or a split over several nodes
    /// (when none can, or `--max-memory` keeps them from it).
    pub fn explain(&self, layers: u32) -> String {
        let whole = self
            .spans
            .iter()
            .filter(|s| s.range.start == 0 && s.range.end >= layers)
            .count();
        let parts = self.spans.len() - whole;
        let copies = |n: usize| {
            if n == 1 {
                "1 whole copy".to_string()
            } else {
                format!("{n} whole copies")
            }
        };
        match (whole, parts) {
            (0, 0) => "nothing planned".into(),
            (w, 0) => format!(
                "{} of the model's {layers} blocks: each node can hold all of them, so each serves sessions alone; a split comes only when no node can, or with --max-memory",
                copies(w)
            ),
            (0, p) => format!(
                "the model's {layers} blocks split over {p} nodes: no node's memory holds them all"
            ),
            (w, p) => format!(
                "{} of the model's {layers} blocks, and a split over {p} nodes whose memory holds only part",
                copies(w)
            ),
        }
    }

    /// The span a peer holds, if any.
    pub fn span_of(&self, peer: &PublicKey) -> Option<&Span> {
        self.spans.iter().find(|s| &s.peer == peer)
    }
}

/// Why no plan exists.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    /// No peer can hold even one block.
    #[error("no peer can hold a block of this model")]
    NoPeers,
    /// All peers together cannot hold the model.
    #[error("the pool can hold {available} of the model's {needed} blocks")]
    NotEnoughMemory {
        /// Blocks of the model.
        needed: u32,
        /// Blocks the pool can hold.
        available: u64,
    },
    /// No chain can start and end on peers allowed to see text.
    #[error(
        "no chain can run its first and last stages on trusted members (the pool requires it)"
    )]
    NoTrustedEdges,
}

/// The speed a peer is planned with. Claims are not facts: once its steps have been timed,
/// the measured speed replaces its claim, and an untimed claim counts for no more than the
/// fastest peer timed so far (a fresh key claiming a huge speed gets no more blocks than a
/// proven fast peer would).
pub fn planning_speed(claimed: f64, measured: Option<f64>, fastest_measured: Option<f64>) -> f64 {
    match (measured, fastest_measured) {
        (Some(m), _) => m,
        (None, Some(f)) => claimed.min(f),
        (None, None) => claimed,
    }
}

/// How many blocks a peer can hold, at most the whole model.
pub fn capacity(model: &ModelShape, peer: &PlanPeer) -> u32 {
    let usable = peer
        .memory_bytes
        .saturating_sub(model.reserve_bytes + model.edge_bytes);
    (usable / model.layer_bytes.max(1)).min(model.layers as u64) as u32
}

/// Plans `peers` for `model`, keeping what still stands of `previous`.
pub fn plan(
    model: &ModelShape,
    peers: &[PlanPeer],
    previous: Option<&Plan>,
) -> Result<Plan, PlanError> {
    let mut eligible: Vec<&PlanPeer> = peers
        .iter()
        .filter(|p| capacity(model, p) > 0 && p.speed.is_finite() && p.speed > 0.0)
        .collect();
    if eligible.is_empty() {
        return Err(PlanError::NoPeers);
    }
    eligible.sort_by(|a, b| b.speed.total_cmp(&a.speed).then(a.id.0.cmp(&b.id.0)));
    let total: u64 = eligible.iter().map(|p| capacity(model, p) as u64).sum();
    if total < model.layers as u64 {
        return Err(PlanError::NotEnoughMemory {
            needed: model.layers,
            available: total,
        });
    }
    if let Some(prev) = previous {
        let by_id: HashMap<PublicKey, &PlanPeer> = eligible.iter().map(|p| (p.id, *p)).collect();
        let kept: Vec<Span> = prev
            .spans
            .iter()
            .filter(|s| {
                by_id.get(&s.peer).is_some_and(|p| {
                    s.range.len() <= capacity(model, p) && may_hold(model, p, s.range)
                })
            })
            .cloned()
            .collect();
        if covers(&kept, model.layers) {
            let holding: HashSet<PublicKey> = kept.iter().map(|s| s.peer).collect();
            let free: Vec<&PlanPeer> = eligible
                .iter()
                .copied()
                .filter(|p| !holding.contains(&p.id))
                .collect();
            let mut spans = kept;
            add_chains_and_replicas(model, &free, &mut spans);
            let epoch = if spans == prev.spans {
                prev.epoch
            } else {
                prev.epoch + 1
            };
            return Ok(Plan { epoch, spans });
        }
    }
    let mut spans = Vec::new();
    add_chains_and_replicas(model, &eligible, &mut spans);
    if !covers(&spans, model.layers) {
        return Err(PlanError::NoTrustedEdges);
    }
    let epoch = previous.map_or(1, |p| p.epoch + 1);
    Ok(Plan { epoch, spans })
}

/// Whether `p` may hold `range`: any range if it may see text, else a middle one.
fn may_hold(model: &ModelShape, p: &PlanPeer, range: LayerRange) -> bool {
    p.edge_ok || (range.start != 0 && range.end != model.layers)
}

/// `chain` in an order that puts peers allowed to see text at both ends (all of it when
/// only one is, and it can hold the whole model); `None` if it cannot be so ordered.
fn edge_order<'a>(model: &ModelShape, chain: &[&'a PlanPeer]) -> Option<Vec<&'a PlanPeer>> {
    if chain.iter().all(|p| p.edge_ok) {
        return Some(chain.to_vec());
    }
    let ok: Vec<&PlanPeer> = chain.iter().copied().filter(|p| p.edge_ok).collect();
    match ok.as_slice() {
        [] => None,
        [one] => (capacity(model, one) >= model.layers).then(|| vec![*one]),
        [first, last, ..] => {
            let mut order = vec![*first];
            order.extend(
                chain
                    .iter()
                    .copied()
                    .filter(|p| p.id != first.id && p.id != last.id),
            );
            order.push(*last);
            Some(order)
        }
    }
}

/// Forms as many whole-model chains from `free` as their memory allows (fastest first) and
/// makes the rest replicas of the slowest spans.
fn add_chains_and_replicas(model: &ModelShape, free: &[&PlanPeer], spans: &mut Vec<Span>) {
    let mut leftovers = Vec::new();
    let mut chain: Vec<&PlanPeer> = Vec::new();
    let mut chain_cap = 0u64;
    for &p in free {
        chain.push(p);
        chain_cap += capacity(model, p) as u64;
        if chain_cap < model.layers as u64 {
            continue;
        }
        let Some(order) = edge_order(model, &chain) else {
            continue;
        };
        let (members, rest) = split_chain(model, &order);
        // A peer that may not see text can still end up at an edge when its neighbour's
        // share rounds to nothing; then the chain grows first.
        let allowed = members.iter().all(|s| {
            order
                .iter()
                .any(|q| q.id == s.peer && may_hold(model, q, s.range))
        });
        if !allowed {
            continue;
        }
        spans.extend(members);
        leftovers.extend(rest);
        leftovers.extend(
            chain
                .iter()
                .copied()
                .filter(|q| !order.iter().any(|o| o.id == q.id)),
        );
        chain.clear();
        chain_cap = 0;
    }
    leftovers.extend(chain);
    if leftovers.is_empty() {
        return;
    }
    // Each range's replicas and its slowest one's speed (a span of a peer not in `free`
    // counts at speed 1): the slowest range to serve is found per range, not per span, so a
    // plan of thousands of spans takes a replica in time linear in its ranges.
    let speed: HashMap<PublicKey, f64> = free.iter().map(|q| (q.id, q.speed)).collect();
    let speed_of = |s: &Span| speed.get(&s.peer).copied().unwrap_or(1.0);
    let mut ranges: BTreeMap<(u32, u32), (usize, f64)> = BTreeMap::new();
    for s in spans.iter() {
        let e = ranges
            .entry((s.range.start, s.range.end))
            .or_insert((0, f64::INFINITY));
        e.0 += 1;
        e.1 = e.1.min(speed_of(s));
    }
    for p in leftovers {
        let cap = capacity(model, p);
        // The range slowest to serve, counting the replicas it already has; of equals, the
        // one starting first.
        let target = ranges
            .iter()
            .map(|(&(start, end), &(replicas, slowest))| {
                (LayerRange { start, end }, replicas, slowest)
            })
            .filter(|(r, _, _)| r.len() <= cap && may_hold(model, p, *r))
            .map(|(r, replicas, slowest)| (r, r.len() as f64 / slowest / replicas as f64))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.start.cmp(&a.0.start)));
        if let Some((range, _)) = target {
            spans.push(Span { peer: p.id, range });
            if let Some(e) = ranges.get_mut(&(range.start, range.end)) {
                e.0 += 1;
                e.1 = e.1.min(p.speed);
            }
        }
    }
}

/// Cuts the model into contiguous ranges over `chain`, in proportion to speed within each
/// member's capacity; members whose share rounds to nothing are returned unused.
fn split_chain<'a>(model: &ModelShape, chain: &[&'a PlanPeer]) -> (Vec<Span>, Vec<&'a PlanPeer>) {
    let caps: Vec<f64> = chain.iter().map(|p| capacity(model, p) as f64).collect();
    let n = chain.len();
    let mut share = vec![0f64; n];
    let mut fixed = vec![false; n];
    // Water-filling: give each free member its speed share; cap those that overflow; repeat.
    loop {
        let left =
            model.layers as f64 - (0..n).filter(|&i| fixed[i]).map(|i| share[i]).sum::<f64>();
        let speed: f64 = (0..n).filter(|&i| !fixed[i]).map(|i| chain[i].speed).sum();
        let mut changed = false;
        let open: Vec<usize> = (0..n).filter(|&i| !fixed[i]).collect();
        for i in open {
            share[i] = left * chain[i].speed / speed;
            if share[i] > caps[i] {
                share[i] = caps[i];
                fixed[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    // Whole blocks: floors, then the remainder to the largest fractions that have room.
    let mut blocks: Vec<u32> = share.iter().map(|s| s.floor() as u32).collect();
    let mut rest = model.layers - blocks.iter().sum::<u32>();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        (share[b] - share[b].floor())
            .total_cmp(&(share[a] - share[a].floor()))
            .then(a.cmp(&b))
    });
    while rest > 0 {
        let mut gave = false;
        for &i in &order {
            if rest > 0 && (blocks[i] as f64) < caps[i] {
                blocks[i] += 1;
                rest -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
    let mut spans = Vec::new();
    let mut unused = Vec::new();
    let mut start = 0;
    for (i, &b) in blocks.iter().enumerate() {
        if b == 0 {
            unused.push(chain[i]);
            continue;
        }
        spans.push(Span {
            peer: chain[i].id,
            range: LayerRange {
                start,
                end: start + b,
            },
        });
        start += b;
    }
    (spans, unused)
}

/// Whether `spans` contain a chain from block 0 to `layers`.
pub fn covers(spans: &[Span], layers: u32) -> bool {
    let n = layers as usize;
    let mut ends: Vec<Vec<usize>> = vec![Vec::new(); n];
    for s in spans {
        let (a, b) = (s.range.start as usize, s.range.end as usize);
        if a < b && b <= n {
            ends[a].push(b);
        }
    }
    let mut reach = vec![false; n + 1];
    reach[0] = true;
    for b in 0..n {
        if reach[b] {
            for &e in &ends[b] {
                reach[e] = true;
            }
        }
    }
    reach[n]
}
