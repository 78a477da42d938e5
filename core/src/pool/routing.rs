//! Which chain serves a session: the cheapest confirmed spans by measured queue and trust,
//! the sessions each peer runs, and the step times that measure it.

use super::exclusion::ALIVE_WINDOW;
use super::planning::DEFAULT_RTT_MS;
use super::PoolCore;
use crate::planner::planning_speed;
use crate::planner::Span;
use crate::queue::queued_ms_per_block;
use crate::router::{cheapest_path, PeerCost};
use potluck_protocol::signed::PublicKey;
use std::collections::HashSet;
use std::time::Instant;
use thiserror::Error;

/// Why no chain serves the model now.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct NotReady(pub String);

impl PoolCore {
    /// The cheapest chain of confirmed spans over the whole model at `now`.
    pub fn chain(&mut self, now: Instant) -> Result<Vec<Span>, NotReady> {
        if self.plan.is_none() {
            let why = self.plan_error.as_deref().unwrap_or("no peers yet");
            return Err(NotReady(why.into()));
        }
        self.route(0, self.model.shape.layers, &HashSet::new(), now)
            .ok_or_else(|| NotReady("spans are still loading".into()))
    }

    /// A count that moves whenever what decides whether a chain exists changes (the plan,
    /// the spans confirmed loaded, peers leaving the table). Whether [`PoolCore::route`]
    /// finds a chain depends on nothing else (and on what it is told to avoid), so a
    /// failover or a waiting session that found none need not ask again until it moves:
    /// polling costs nothing while nothing changed, however large the pool.
    pub fn routing_epoch(&self) -> u64 {
        self.routing
    }

    /// Why the pool cannot reroute now (it has no plan), if it cannot.
    pub fn no_plan(&self) -> Option<String> {
        self.plan.is_none().then(|| {
            self.plan_error
                .clone()
                .unwrap_or_else(|| "the pool has no plan".into())
        })
    }

    /// The cheapest chain of confirmed spans over blocks `start..end` at `now`, avoiding
    /// `avoid`. A peer's compute counts as its measured queue (see [`queued_ms_per_block`]:
    /// the longer of its estimate, from the speed plans give it (a claim counts for no more
    /// than the fastest measured peer), and its recent steps, times the sessions it runs,
    /// so replicas share the load and a slow or crowded one gets fewer) and more the less
    /// it is trusted (by the lower bound of its reputation, so new peers get work, but
    /// after proven ones).
    pub fn route(
        &mut self,
        start: u32,
        end: u32,
        avoid: &HashSet<PublicKey>,
        now: Instant,
    ) -> Option<Vec<Span>> {
        self.route_with(start, end, avoid, now, true)
    }

    /// [`PoolCore::route`], weighing every replica of each range when `prune` is off: what
    /// the tests hold the pruned walk against.
    pub(super) fn route_with(
        &mut self,
        start: u32,
        end: u32,
        avoid: &HashSet<PublicKey>,
        now: Instant,
        prune: bool,
    ) -> Option<Vec<Span>> {
        self.plan.as_ref()?;
        match self.table.take_rtt_changes() {
            Some(changed) => changed.iter().for_each(|key| self.bound_may_drop(key)),
            None => self.route_index = None,
        }
        let epoch = self.plan.as_ref().map_or(0, |p| p.epoch);
        if !self.route_index.as_ref().is_some_and(|i| i.fresh(epoch)) {
            self.route_index = Some(self.build_route_index(now));
        }
        let (plan, index) = (self.plan.as_ref()?, self.route_index.as_ref()?);
        let layer_bytes = self.model.shape.layer_bytes as f64;
        // What a hop through the span at plan index `i` costs, ms.
        let hop = |i: usize| {
            let s = &plan.spans[i];
            if avoid.contains(&s.peer) {
                return None;
            }
            let peer = self.table.get(&s.peer)?;
            let busy = self.busy.get(&s.peer).copied().unwrap_or(0);
            let (recent, quickest) = self.step_times.times(&s.peer, now);
            let blocks = s.range.len();
            let rtt_ms = peer.rtt_ms.map_or(DEFAULT_RTT_MS, f64::from);
            // A claimed speed counts for no more than the fastest measured one, as in plans.
            let measured_speed = quickest.map(|secs| self.speed_from(secs, blocks, rtt_ms));
            let speed = planning_speed(
                f64::from(peer.advert.mem_gbps),
                measured_speed,
                self.fastest,
            )
            .max(1e-3);
            let estimate = layer_bytes / (speed * 1e6);
            let ms_per_block =
                queued_ms_per_block(estimate, recent.map(|s| s * 1e3), rtt_ms, blocks, busy)
                    * self.distrust(&s.peer);
            Some(
                PeerCost {
                    rtt_ms,
                    ms_per_block,
                }
                .hop_ms(blocks),
            )
        };
        // Each range through its cheapest replica.
        cheapest_path(&plan.spans, start, end, |b, here| {
            index
                .starting_at(b)
                .filter(|(_, range)| range.end <= end)
                .filter_map(|(r, _)| index.cheapest(r, here, prune, hop))
                .map(|(t, i)| (i, t))
                .collect()
        })
    }

    /// How much more a peer's compute counts the less it is trusted: from 1 (fully, by
    /// the lower bound of its reputation) to 1.5 (not at all), so new peers get work, but
    /// after proven ones.
    pub(super) fn distrust(&self, key: &PublicKey) -> f64 {
        1.5 - 0.5 * self.trust.get(key).lower_bound()
    }

    /// A session now runs on `peers` (counted until [`PoolCore::unload`]).
    pub fn load(&mut self, peers: &[PublicKey]) {
        for p in peers {
            *self.busy.entry(*p).or_default() += 1;
        }
    }

    /// A session on `peers` ended.
    pub fn unload(&mut self, peers: &[PublicKey]) {
        for p in peers {
            if let Some(n) = self.busy.get_mut(p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.busy.remove(p);
                }
            }
        }
    }

    /// `key` answered a step of `positions` positions in `secs` at `now`.
    pub fn measured(&mut self, key: PublicKey, secs: f64, positions: usize, now: Instant) {
        self.step_times.answered(key, now);
        // Decode steps are what a new session will wait on; prefills cost by their length.
        if positions == 1 {
            let before = self.step_times.quickest_of(&key);
            self.step_times.observe(key, secs, now);
            if self.step_times.quickest_of(&key) != before {
                // A quicker step raises its speed.
                self.bound_may_drop(&key);
            }
            let faster = self
                .table
                .get(&key)
                .filter(|p| !self.is_excluded(&p.key, now))
                .and_then(|p| self.measured_speed(p));
            if let Some(speed) = faster {
                self.fastest = Some(self.fastest.map_or(speed, |f| f.max(speed)));
            }
        }
    }

    /// Whether `key` is slow but working at `now`: it answered steps lately and its
    /// connection answers pings (a failover waits on it rather than leaving it).
    pub fn answering(&self, key: &PublicKey, now: Instant) -> bool {
        self.step_times.answering(key, now, ALIVE_WINDOW) && self.alive(key, now)
    }
}
