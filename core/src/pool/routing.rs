//! Which chain serves a session: the cheapest confirmed spans by measured queue and trust,
//! the sessions each peer runs, and the step times that measure it.

use super::exclusion::ALIVE_WINDOW;
use super::planning::DEFAULT_RTT_MS;
use super::PoolCore;
use crate::planner::{Plan, Span};
use crate::queue::queued_ms_per_block;
use crate::router::{route_range, PeerCost};
use potluck_protocol::signed::PublicKey;
use std::collections::{HashMap, HashSet};
use std::time::Instant;
use thiserror::Error;

/// Why no chain serves the model now.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("{0}")]
pub struct NotReady(pub String);

impl PoolCore {
    /// The cheapest chain of confirmed spans over the whole model at `now`.
    pub fn chain(&self, now: Instant) -> Result<Vec<Span>, NotReady> {
        if self.plan.is_none() {
            let why = self.plan_error.as_deref().unwrap_or("no peers yet");
            return Err(NotReady(why.into()));
        }
        self.route(0, self.model.shape.layers, &HashSet::new(), now)
            .ok_or_else(|| NotReady("spans are still loading".into()))
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
        &self,
        start: u32,
        end: u32,
        avoid: &HashSet<PublicKey>,
        now: Instant,
    ) -> Option<Vec<Span>> {
        let plan = self.plan.as_ref()?;
        let confirmed = Plan {
            epoch: plan.epoch,
            spans: plan
                .spans
                .iter()
                .filter(|s| self.loaded.get(&s.peer) == Some(&s.range))
                .filter(|s| !avoid.contains(&s.peer))
                .cloned()
                .collect(),
        };
        let layer_bytes = self.model.shape.layer_bytes as f64;
        // A claimed speed counts for no more than the fastest measured one, as in plans.
        let speeds: HashMap<PublicKey, f64> = self
            .planning_peers(&self.step_times.quickest(), now)
            .into_iter()
            .map(|p| (p.id, p.speed))
            .collect();
        let blocks: HashMap<PublicKey, u32> = confirmed
            .spans
            .iter()
            .map(|s| (s.peer, s.range.len()))
            .collect();
        let cost = |key: &PublicKey| {
            let peer = self.table.get(key)?;
            let busy = self.busy.get(key).copied().unwrap_or(0);
            let measured = self.step_times.recent(key, now).map(|s| s * 1e3);
            let blocks = blocks.get(key).copied().unwrap_or(1);
            let rtt_ms = peer.rtt_ms.map_or(DEFAULT_RTT_MS, f64::from);
            let speed = speeds
                .get(key)
                .copied()
                .unwrap_or_else(|| f64::from(peer.advert.mem_gbps));
            let estimate = layer_bytes / (speed.max(1e-3) * 1e6);
            let distrust = 1.5 - 0.5 * self.trust.get(key).lower_bound();
            Some(PeerCost {
                rtt_ms,
                ms_per_block: queued_ms_per_block(estimate, measured, rtt_ms, blocks, busy)
                    * distrust,
            })
        };
        route_range(&confirmed, start, end, cost, &HashSet::new())
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
        }
    }

    /// Whether `key` is slow but working at `now`: it answered steps lately and its
    /// connection answers pings (a failover waits on it rather than leaving it).
    pub fn answering(&self, key: &PublicKey, now: Instant) -> bool {
        self.step_times.answering(key, now, ALIVE_WINDOW) && self.alive(key, now)
    }
}
