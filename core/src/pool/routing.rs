//! Which chain serves a session: the cheapest confirmed spans by measured queue and trust,
//! the sessions each peer runs, and the step times that measure it.

use super::exclusion::ALIVE_WINDOW;
use super::planning::DEFAULT_RTT_MS;
use super::PoolCore;
use crate::planner::planning_speed;
use crate::planner::Span;
use crate::queue::queued_ms_per_block;
use crate::router::{by_first_block, route_from, PeerCost};
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
        self.plan.as_ref()?;
        if self
            .route_index
            .as_ref()
            .is_none_or(|(epoch, _)| *epoch != self.routing)
        {
            let index = self.confirmed_by_first_block();
            self.route_index = Some((self.routing, index));
        }
        let (plan, (_, from)) = (self.plan.as_ref()?, self.route_index.as_ref()?);
        let layer_bytes = self.model.shape.layer_bytes as f64;
        let cost = |s: &Span| {
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
            let distrust = 1.5 - 0.5 * self.trust.get(&s.peer).lower_bound();
            Some(PeerCost {
                rtt_ms,
                ms_per_block: queued_ms_per_block(
                    estimate,
                    recent.map(|s| s * 1e3),
                    rtt_ms,
                    blocks,
                    busy,
                ) * distrust,
            })
        };
        route_from(&plan.spans, from, start, end, cost, avoid)
    }

    /// The plan's spans confirmed loaded, by first block (see [`by_first_block`]): kept
    /// until the routing epoch moves, so routing many sessions costs a walk over the
    /// spans' costs alone.
    fn confirmed_by_first_block(&self) -> Vec<Vec<usize>> {
        let Some(plan) = self.plan.as_ref() else {
            return Vec::new();
        };
        let mut from = by_first_block(&plan.spans, self.model.shape.layers);
        for bucket in &mut from {
            bucket.retain(|&i| {
                let s = &plan.spans[i];
                self.loaded.get(&s.peer) == Some(&s.range)
            });
        }
        from
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
            self.step_times.observe(key, secs, now);
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
