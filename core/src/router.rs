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

impl PeerCost {
    /// What a hop of `blocks` blocks through this peer costs, milliseconds.
    pub fn hop_ms(&self, blocks: u32) -> f64 {
        self.rtt_ms / 2.0 + HOP_MS + f64::from(blocks) * self.ms_per_block
    }
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
    // Spans by their first block: one pass over blocks then visits each span once.
    let mut from: Vec<Vec<usize>> = vec![Vec::new(); end as usize];
    for (i, s) in plan.spans.iter().enumerate() {
        let inside = s.range.start >= start && s.range.start < s.range.end && s.range.end <= end;
        if inside && !excluded.contains(&s.peer) {
            from[s.range.start as usize].push(i);
        }
    }
    cheapest_path(&plan.spans, start, end, |b, here| {
        from[b]
            .iter()
            .filter_map(|&i| {
                let s = &plan.spans[i];
                Some((i, here + cost(&s.peer)?.hop_ms(s.range.len())))
            })
            .collect()
    })
}

/// The quickest path over `spans` from block `start` to block `end`, in block order.
/// `arrivals(b, here)` lists, for a path that reaches block `b` at `here` ms, the spans
/// that may follow it there and when each would arrive (index into `spans`, ms), in the
/// order that breaks ties: of equally quick ones, the first listed wins. `None` when no
/// path covers the blocks.
pub fn cheapest_path(
    spans: &[Span],
    start: u32,
    end: u32,
    mut arrivals: impl FnMut(usize, f64) -> Vec<(usize, f64)>,
) -> Option<Vec<Span>> {
    let (first, n) = (start as usize, end as usize);
    if first >= n {
        return None;
    }
    let mut best: Vec<Option<(f64, Option<usize>)>> = vec![None; n + 1];
    best[first] = Some((0.0, None));
    for b in first..n {
        let Some((here, _)) = best[b] else { continue };
        for (i, t) in arrivals(b, here) {
            let Some(s) = spans.get(i) else { continue };
            let to = s.range.end as usize;
            if to <= b || to > n {
                continue;
            }
            if best[to].is_none_or(|(d, _)| t < d) {
                best[to] = Some((t, Some(i)));
            }
        }
    }
    let mut path = Vec::new();
    let mut at = n;
    while at > first {
        let (_, via) = best[at]?;
        let span = spans.get(via?)?;
        path.push(span.clone());
        at = span.range.start as usize;
    }
    path.reverse();
    Some(path)
}
