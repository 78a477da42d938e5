//! Which chain of spans serves a session: the cheapest path from block 0 to the last block,
//! where a hop costs half its peer's round trip, a fixed serialisation cost, and its blocks'
//! compute time (Petals' routing cost). Spans only go forward, so the graph is acyclic and a
//! single pass in block order finds the optimum.

use crate::planner::{Plan, Span};
use potluck_protocol::signed::PublicKey;
use std::collections::HashSet;

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
    let (first, n) = (start as usize, end as usize);
    if first >= n {
        return None;
    }
    let mut best: Vec<Option<(f64, Option<usize>)>> = vec![None; n + 1];
    best[first] = Some((0.0, None));
    let spans: Vec<(usize, &Span, PeerCost)> = plan
        .spans
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            !excluded.contains(&s.peer)
                && s.range.start >= start
                && s.range.start < s.range.end
                && s.range.end <= end
        })
        .filter_map(|(i, s)| cost(&s.peer).map(|c| (i, s, c)))
        .collect();
    for b in first..n {
        let Some((here, _)) = best[b] else { continue };
        for &(i, s, c) in spans.iter().filter(|(_, s, _)| s.range.start as usize == b) {
            let hop = c.rtt_ms / 2.0 + HOP_MS + s.range.len() as f64 * c.ms_per_block;
            let end = s.range.end as usize;
            if best[end].is_none_or(|(d, _)| here + hop < d) {
                best[end] = Some((here + hop, Some(i)));
            }
        }
    }
    let mut path = Vec::new();
    let mut at = n;
    while at > first {
        let (_, via) = best[at]?;
        let span = &plan.spans[via?];
        path.push(span.clone());
        at = span.range.start as usize;
    }
    path.reverse();
    Some(path)
}
