//! Which chain of spans serves a session: the cheapest path from block 0 to the last block,
//! where a hop costs half its peer's round trip, a fixed serialisation cost, and its blocks'
//! compute time (Petals' routing cost). Spans only go forward, so the graph is acyclic and a
//! single pass in block order finds the optimum.

use crate::planner::{Plan, Span};
use potluck_protocol::signed::PublicKey;
use std::collections::HashSet;
use std::time::Duration;

/// How long a failed hop waits for the pool to offer a replacement (a replica, or spans
/// re-planned onto other nodes and loaded) before the session fails.
pub const FAILOVER_PATIENCE: Duration = Duration::from_secs(120);
/// How often a waiting failover asks again.
pub const FAILOVER_POLL: Duration = Duration::from_millis(100);

/// Runs of hops `(lo, hi)` around hop `i` of `n`, smallest first: what a failover tries
/// to replace, from the failed hop alone up to the whole chain.
pub fn windows_around(i: usize, n: usize) -> Vec<(usize, usize)> {
    let mut w: Vec<(usize, usize)> = (0..=i)
        .flat_map(|lo| (i..n).map(move |hi| (lo, hi)))
        .collect();
    w.sort_by_key(|&(lo, hi)| (hi - lo, i - lo));
    w
}

/// Fixed cost of one hop (framing, copying, scheduling), milliseconds.
pub const HOP_MS: f64 = 0.3;

/// What routing needs to know about a peer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerCost {
    /// Round-trip time to it, milliseconds.
    pub rtt_ms: f64,
    /// Time it takes per block per token, milliseconds.
    pub ms_per_block: f64,
}

/// The cheapest chain through `plan`, skipping `excluded` peers and peers without a cost
/// (unknown or unreachable). `None` when no chain covers the model.
pub fn route(
    plan: &Plan,
    layers: u32,
    cost: impl Fn(&PublicKey) -> Option<PeerCost>,
    excluded: &HashSet<PublicKey>,
) -> Option<Vec<Span>> {
    route_range(plan, 0, layers, cost, excluded)
}

/// Like [`route`], for blocks `start..end` only: what replaces a failed part of a chain.
pub fn route_range(
    plan: &Plan,
    start: u32,
    end: u32,
    cost: impl Fn(&PublicKey) -> Option<PeerCost>,
    excluded: &HashSet<PublicKey>,
) -> Option<Vec<Span>> {
    let from = by_first_block(&plan.spans, end);
    route_from(&plan.spans, &from, start, end, |s| cost(&s.peer), excluded)
}

/// Indices of `spans` by their first block, up to block `layers` (in their order): what
/// [`route_from`] walks. A pool that routes many sessions between changes keeps it.
pub fn by_first_block(spans: &[Span], layers: u32) -> Vec<Vec<usize>> {
    let mut from: Vec<Vec<usize>> = vec![Vec::new(); layers as usize];
    for (i, s) in spans.iter().enumerate() {
        let start = s.range.start as usize;
        if s.range.start < s.range.end && start < from.len() {
            from[start].push(i);
        }
    }
    from
}

/// The cheapest chain of `spans` over blocks `start..end`, walking `from` (see
/// [`by_first_block`]), skipping `excluded` peers and spans without a `cost`. Of equally
/// cheap spans the one listed first wins.
pub fn route_from(
    spans: &[Span],
    from: &[Vec<usize>],
    start: u32,
    end: u32,
    cost: impl Fn(&Span) -> Option<PeerCost>,
    excluded: &HashSet<PublicKey>,
) -> Option<Vec<Span>> {
    let (first, n) = (start as usize, (end as usize).min(from.len()));
    if first >= n || n != end as usize {
        return None;
    }
    let mut best: Vec<Option<(f64, Option<usize>)>> = vec![None; n + 1];
    best[first] = Some((0.0, None));
    for b in first..n {
        let Some((here, _)) = best[b] else { continue };
        for &i in &from[b] {
            let s = &spans[i];
            if s.range.end > end || excluded.contains(&s.peer) {
                continue;
            }
            let Some(c) = cost(s) else { continue };
            let hop = c.rtt_ms / 2.0 + HOP_MS + s.range.len() as f64 * c.ms_per_block;
            let to = s.range.end as usize;
            if best[to].is_none_or(|(d, _)| here + hop < d) {
                best[to] = Some((here + hop, Some(i)));
            }
        }
    }
    let mut path = Vec::new();
    let mut at = n;
    while at > first {
        let (_, via) = best[at]?;
        let span = &spans[via?];
        path.push(span.clone());
        at = span.range.start as usize;
    }
    path.reverse();
    Some(path)
}
