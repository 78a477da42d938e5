//! The router's index of a plan's confirmed spans: replicas grouped by range, each range's
//! spans in order of a lower bound on what a hop through them costs. A route then weighs,
//! per range, only the replicas whose bound could still beat the best found, instead of
//! every span of the pool: the same choice ([`PoolCore::route`] is exact), at a cost that
//! follows the plan's ranges rather than its peers.
//!
//! It is built for one plan epoch and kept up as spans are confirmed and lost (a new plan
//! rebuilds it). A bound holds while the peer's speed bound, its round trip and its trust
//! stand: a quicker step, a changed round trip, a verdict or a changed advert marks the
//! peer stale, and a stale peer is weighed whole at every route until the next rebuild.

use super::planning::DEFAULT_RTT_MS;
use super::PoolCore;
use crate::planner::Span;
use crate::router::PeerCost;
use potluck_protocol::messages::LayerRange;
use potluck_protocol::signed::PublicKey;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// One range's replicas.
#[derive(Debug)]
struct Replicas {
    range: LayerRange,
    /// (bound on a hop's cost in ms, plan index), ascending.
    by_bound: Vec<(f64, usize)>,
    /// Plan indices of stale replicas: weighed whole at every route.
    stale: Vec<usize>,
}

/// Confirmed spans by range, for one plan epoch.
#[derive(Debug)]
pub(super) struct RouteIndex {
    plan_epoch: u64,
    /// Each planned peer's plan index (confirmed or not).
    pos: HashMap<PublicKey, usize>,
    /// Each range's entry in `ranges`.
    by_range: HashMap<LayerRange, usize>,
    /// Ranges by first block: indices into `ranges`.
    from: Vec<Vec<usize>>,
    ranges: Vec<Replicas>,
    /// Each indexed peer's range and plan index.
    of_peer: HashMap<PublicKey, (usize, usize)>,
    stale: HashSet<PublicKey>,
}

impl RouteIndex {
    /// Whether it was built for plan epoch `epoch` and is not worn out by stale peers.
    pub(super) fn fresh(&self, epoch: u64) -> bool {
        self.plan_epoch == epoch && self.stale.len() <= (self.of_peer.len() / 8).max(64)
    }

    /// The plan index of `peer`'s span, if it has one.
    pub(super) fn position(&self, peer: &PublicKey) -> Option<usize> {
        self.pos.get(peer).copied()
    }

    /// The span at plan index `i` (of range `range`, first block `start`) is confirmed,
    /// with hop bound `bound`.
    pub(super) fn confirm(&mut self, peer: PublicKey, i: usize, range: LayerRange, bound: f64) {
        self.unconfirm(&peer);
        let start = range.start as usize;
        if start >= self.from.len() {
            return;
        }
        let r = match self.by_range.get(&range) {
            Some(&r) => r,
            None => {
                self.ranges.push(Replicas {
                    range,
                    by_bound: Vec::new(),
                    stale: Vec::new(),
                });
                let r = self.ranges.len() - 1;
                self.from[start].push(r);
                self.by_range.insert(range, r);
                r
            }
        };
        let list = &mut self.ranges[r].by_bound;
        let at = list.partition_point(|&(b, j)| b.total_cmp(&bound).then(j.cmp(&i)).is_lt());
        list.insert(at, (bound, i));
        self.of_peer.insert(peer, (r, i));
    }

    /// `peer`'s span is no longer confirmed.
    pub(super) fn unconfirm(&mut self, peer: &PublicKey) {
        let Some((r, i)) = self.of_peer.remove(peer) else {
            return;
        };
        let replicas = &mut self.ranges[r];
        replicas.by_bound.retain(|&(_, j)| j != i);
        if self.stale.remove(peer) {
            replicas.stale.retain(|&j| j != i);
        }
    }

    /// `peer`'s bound may have dropped: weigh it whole until the next rebuild.
    pub(super) fn mark_stale(&mut self, peer: &PublicKey) {
        if let Some(&(r, i)) = self.of_peer.get(peer) {
            if self.stale.insert(*peer) {
                self.ranges[r].stale.push(i);
            }
        }
    }

    /// The cheapest replica of range `r` whose first block is reached at `here` ms, as
    /// (arrival ms, plan index): lowest arrival, then first in the plan, as a walk over
    /// every span in plan order would choose. `hop` is a span's exact cost; `prune` stops
    /// at the first replica whose bound cannot win.
    pub(super) fn cheapest(
        &self,
        r: usize,
        here: f64,
        prune: bool,
        hop: impl Fn(usize) -> Option<f64>,
    ) -> Option<(f64, usize)> {
        let replicas = &self.ranges[r];
        let mut best: Option<(f64, usize)> = None;
        let weigh = |best: &mut Option<(f64, usize)>, i: usize| {
            if let Some(h) = hop(i) {
                let t = here + h;
                if best.is_none_or(|(b, j)| t < b || (t == b && i < j)) {
                    *best = Some((t, i));
                }
            }
        };
        for &i in &replicas.stale {
            weigh(&mut best, i);
        }
        for &(bound, i) in &replicas.by_bound {
            if prune && best.is_some_and(|(b, _)| here + bound > b) {
                break;
            }
            weigh(&mut best, i);
        }
        best
    }

    /// Ranges that start at block `b`, with their index.
    pub(super) fn starting_at(&self, b: usize) -> impl Iterator<Item = (usize, LayerRange)> + '_ {
        self.from
            .get(b)
            .into_iter()
            .flatten()
            .map(|&r| (r, self.ranges[r].range))
    }
}

impl PoolCore {
    /// A lower bound on the cost of a hop through `span` at `now`, ms: its round trip, the
    /// fixed hop cost, and its blocks at the fastest it could be planned (its measured
    /// speed, else its claim), idle, at its trust now. `None` if its peer is unknown.
    fn hop_bound(&self, span: &Span, now: Instant) -> Option<f64> {
        let peer = self.table.get(&span.peer)?;
        let rtt_ms = peer.rtt_ms.map_or(DEFAULT_RTT_MS, f64::from);
        let blocks = span.range.len();
        let (_, quickest) = self.step_times.times(&span.peer, now);
        let speed = quickest
            .map_or(f64::from(peer.advert.mem_gbps), |secs| {
                self.speed_from(secs, blocks, rtt_ms)
            })
            .max(1e-3);
        let estimate = self.model.shape.layer_bytes as f64 / (speed * 1e6);
        let ms_per_block = estimate * self.distrust(&span.peer);
        Some(
            PeerCost {
                rtt_ms,
                ms_per_block,
            }
            .hop_ms(blocks),
        )
    }

    /// The index of the plan's confirmed spans at `now`.
    pub(super) fn build_route_index(&self, now: Instant) -> RouteIndex {
        let layers = self.model.shape.layers as usize;
        let mut index = RouteIndex {
            plan_epoch: self.plan.as_ref().map_or(0, |p| p.epoch),
            pos: HashMap::new(),
            by_range: HashMap::new(),
            from: vec![Vec::new(); layers],
            ranges: Vec::new(),
            of_peer: HashMap::new(),
            stale: HashSet::new(),
        };
        let Some(plan) = self.plan.as_ref() else {
            return index;
        };
        // A plan gives each peer one span.
        for (i, s) in plan.spans.iter().enumerate() {
            index.pos.entry(s.peer).or_insert(i);
        }
        for (i, s) in plan.spans.iter().enumerate() {
            if index.pos.get(&s.peer) != Some(&i) {
                continue;
            }
            self.index_span(&mut index, i, now);
        }
        index
    }

    /// Puts the span at plan index `i` in `index` if it is confirmed and routable.
    fn index_span(&self, index: &mut RouteIndex, i: usize, now: Instant) {
        let Some(s) = self.plan.as_ref().and_then(|p| p.spans.get(i)) else {
            return;
        };
        let confirmed = self.loaded.get(&s.peer) == Some(&s.range);
        if !confirmed || s.range.is_empty() {
            return;
        }
        if let Some(bound) = self.hop_bound(s, now) {
            index.confirm(s.peer, i, s.range, bound);
        }
    }

    /// Something that `key`'s hop bound was made from changed in a way that may lower it
    /// (a quicker step, another round trip, a verdict, a new advert): the index weighs it
    /// whole until it is rebuilt.
    pub(super) fn bound_may_drop(&mut self, key: &PublicKey) {
        if let Some(index) = self.route_index.as_mut() {
            index.mark_stale(key);
        }
    }

    /// `key` no longer serves the span it confirmed (it is excluded, or gone): routes and
    /// the index forget it.
    pub(super) fn lose_span(&mut self, key: &PublicKey) {
        if self.loaded.remove(key).is_some() {
            self.routing += 1;
            if let Some(index) = self.route_index.as_mut() {
                index.unconfirm(key);
            }
        }
    }

    /// `key`'s confirmed span changed (confirmed, lost, or another): the route index
    /// follows, so routing need not rebuild it for each assignment answered.
    pub(super) fn reindex(&mut self, key: &PublicKey, now: Instant) {
        let Some(mut index) = self.route_index.take() else {
            return;
        };
        index.unconfirm(key);
        if let Some(i) = index.position(key) {
            self.index_span(&mut index, i, now);
        }
        self.route_index = Some(index);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Action, Now, PoolModel};
    use super::*;
    use crate::capacity::KvGeometry;
    use crate::compare::Verdict;
    use crate::peer_table::PeerTable;
    use crate::planner::ModelShape;
    use crate::trust::Trust;
    use potluck_engine::rng::Rng;
    use potluck_protocol::messages::{CapacityAdvert, DeviceKind, ModelRef};
    use std::time::Duration;

    const MB: u64 = 1_000_000;

    /// A pool of `n` peers of mixed memory and speed, its assignments answered (a few
    /// refused), some measured, busy, trusted, with round trips.
    fn pool(n: usize, rng: &mut Rng, t0: Instant) -> PoolCore {
        let model = ModelRef {
            name: "m".into(),
            digest: [7; 32],
        };
        let shape = ModelShape {
            layers: 24,
            layer_bytes: 100 * MB,
            edge_bytes: 0,
            reserve_bytes: 0,
        };
        let kv = KvGeometry {
            layers: 24,
            block_bytes: 100 * MB,
            edge_bytes: 0,
            kv_bytes_per_block_position: 1,
        };
        let served = PoolModel {
            model: model.clone(),
            shape,
            kv,
        };
        let mut core = PoolCore::new(served, PeerTable::new("t"), Trust::new(0.05, 3), false);
        let now = Now { at: t0, unix: 1000 };
        for i in 0..n {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
            let key = PublicKey(key);
            let advert = CapacityAdvert {
                pool: "t".into(),
                device: DeviceKind::Cpu,
                // Three speed classes, so replicas tie often.
                memory_bytes: (3 + rng.next_u64() % 12) * 100 * MB,
                gflops: 100.0,
                mem_gbps: [20.0, 40.0, 400.0][i % 3],
                threads: 4,
                models: vec![model.clone()],
                loaded: None,
                seq: 1,
                issued_at: 1000,
                expires_at: 1030,
                name: None,
                coordinator: None,
            };
            let accepted = core
                .table_mut()
                .admit(key, advert, 1000)
                .expect("an advert");
            core.admitted(key, accepted, now);
        }
        core.replan(t0);
        for action in core.poll() {
            if let Action::Assign { peer, assignment } = action {
                let ok = rng.next_f64() < 0.9;
                let outcome = if ok { Ok(()) } else { Err("no".into()) };
                core.assigned(peer, &assignment, outcome, true, t0);
            }
        }
        core
    }

    #[test]
    fn pruned_routes_choose_what_weighing_every_replica_chooses() {
        let mut rng = Rng::new(11);
        let t0 = Instant::now();
        let mut core = pool(300, &mut rng, t0);
        let keys: Vec<PublicKey> = core.table().iter().map(|p| p.key).collect();
        let mut routed = 0;
        for round in 0..200u64 {
            let at = t0 + Duration::from_millis(round * 50);
            // The pool moves between routes: steps, sessions, round trips, verdicts.
            for _ in 0..5 {
                let k = keys[(rng.next_u64() as usize) % keys.len()];
                match rng.next_u64() % 4 {
                    0 => core.measured(k, 0.002 + rng.next_f64() * 0.05, 1, at),
                    1 => core.load(&[k]),
                    2 => core.table_mut().set_rtt(&k, (rng.next_f64() * 40.0) as f32),
                    _ => core.record_trust(&k, Verdict::Pass, 1000 + round),
                }
            }
            let avoid: HashSet<PublicKey> = (0..(rng.next_u64() % 4))
                .map(|_| keys[(rng.next_u64() as usize) % keys.len()])
                .collect();
            // Windows between span boundaries, as failovers ask for, and the whole model.
            let spans = &core.plan().expect("a plan").spans;
            let pick = |x: u64| spans[(x as usize) % spans.len()].range;
            let (a, b) = (pick(rng.next_u64()), pick(rng.next_u64()));
            let (start, end) = match round % 3 {
                0 => (0, 24),
                _ if a.start < b.end => (a.start, b.end),
                _ => (b.start, a.end.max(b.start + 1)),
            };
            let pruned = core.route_with(start, end, &avoid, at, true);
            let whole = core.route_with(start, end, &avoid, at, false);
            let saved = core.route_index.take();
            let rebuilt = core.route_with(start, end, &avoid, at, false);
            core.route_index = saved;
            assert_eq!(pruned, whole, "round {round}: pruning changed the route");
            assert_eq!(whole, rebuilt, "round {round}: the kept index drifted");
            routed += usize::from(pruned.is_some());
        }
        assert!(routed > 100, "most windows have a route: {routed}");
    }
}
