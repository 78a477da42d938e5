//! Which peer holds which blocks: the peers a plan may use and at what speed, re-planning,
//! the assignments it owes, their answers, and the session count the plan's memory holds.

use super::exclusion::ASSIGN_RETRY;
use super::{Action, PoolCore};
use crate::peer_table::Peer;
use crate::planner::{plan, planning_speed, Plan, PlanPeer, Span};
use potluck_protocol::messages::ShardAssignment;
use potluck_protocol::signed::PublicKey;
use std::time::{Duration, Instant};

/// Round trip assumed for peers not yet pinged, milliseconds.
pub(super) const DEFAULT_RTT_MS: f64 = 1.0;

/// Pools of more peers than this re-plan on the shell's next tick (the daemon's is a
/// second) rather than at every join, leave and failure: a plan of such a pool costs a
/// millisecond or more, and under churn such events come several a second (the
/// simulator's internet pool saw five re-plans a second among 2,000 peers).
pub const DEFER_PLANS_ABOVE: usize = 256;

/// How often such a pool plans at most. Under churn its plan changed nearly every second
/// (the simulator's 10,000-peer pool: 3,524 plan epochs in an hour, 15 ms each), one join
/// at a time; this way a few seconds' joins go into one plan. A newcomer waits that much
/// longer for its assignment (and takes longer than that to load), and nobody waits on a
/// plan to be routed around: a peer that fails or leaves is left out at once.
pub const LARGE_PLAN_EVERY: Duration = Duration::from_secs(5);

impl PoolCore {
    /// The speed `p`'s timed steps show, in the adverts' unit (GB/s), if this coordinator
    /// has timed them and it holds a confirmed span.
    pub(super) fn measured_speed(&self, p: &Peer) -> Option<f64> {
        let secs = self.step_times.quickest_of(&p.key)?;
        let blocks = self.loaded.get(&p.key)?.len();
        let rtt_ms = p.rtt_ms.map_or(DEFAULT_RTT_MS, f64::from);
        Some(self.speed_from(secs, blocks, rtt_ms))
    }

    /// The speed (GB/s, the adverts' unit) of a peer whose quickest step over `blocks`
    /// blocks took `secs` behind a round trip of `rtt_ms`.
    pub(super) fn speed_from(&self, secs: f64, blocks: u32, rtt_ms: f64) -> f64 {
        let ms_per_block = (secs * 1e3 - rtt_ms).max(1e-3) / f64::from(blocks.max(1));
        self.model.shape.layer_bytes as f64 / (ms_per_block * 1e6)
    }

    /// The peers a plan may use at `now`, with the speeds it plans them by: measured where
    /// this coordinator has timed their steps, claimed otherwise, a claim counting for no
    /// more than the fastest peer measured (see [`planning_speed`]). It also takes the
    /// fastest measured speed among them afresh, which routing caps claims by until the
    /// next plan or a faster measurement.
    pub(super) fn planning_peers(&mut self, now: Instant) -> Vec<PlanPeer> {
        // The planner orders peers itself (by speed, then key).
        let candidates: Vec<(&Peer, Option<f64>)> = self
            .table
            .unordered()
            .filter(|p| !self.is_excluded(&p.key, now))
            .filter(|p| p.advert.models.contains(&self.model.model))
            .map(|p| (p, self.measured_speed(p)))
            .collect();
        let fastest = candidates
            .iter()
            .filter_map(|(_, m)| *m)
            .max_by(f64::total_cmp);
        let peers = candidates
            .into_iter()
            .map(|(p, m)| PlanPeer {
                id: p.key,
                speed: planning_speed(f64::from(p.advert.mem_gbps), m, fastest).max(1e-3),
                memory_bytes: p.advert.memory_bytes,
                edge_ok: self.may_see_text(&p.key),
            })
            .collect();
        self.fastest = fastest;
        peers
    }

    /// Re-plans now when the pool is small or has no plan yet; a larger pool's re-plan is
    /// owed until the shell's next [`PoolCore::replan`].
    pub(super) fn replan_soon(&mut self, now: Instant) {
        if self.plan.is_none() || self.table.len() <= DEFER_PLANS_ABOVE {
            self.replan(now);
        } else {
            self.replan_owed = true;
        }
    }

    /// Whether something happened that the plan has not yet taken in.
    pub fn replan_owed(&self) -> bool {
        self.replan_owed
    }

    /// Re-plans for the peers known at `now` (a pool of more than [`DEFER_PLANS_ABOVE`]
    /// peers at most every [`LARGE_PLAN_EVERY`]) and owes every assignment not yet confirmed
    /// ([`Action::Assign`]). The shell calls it on a tick, for assignments whose retry is
    /// due and for re-plans a large pool put off.
    pub fn replan(&mut self, now: Instant) {
        let large = self.plan.is_some() && self.table.len() > DEFER_PLANS_ABOVE;
        let recent = self
            .planned_at
            .is_some_and(|t| now.saturating_duration_since(t) < LARGE_PLAN_EVERY);
        if !(large && recent) {
            self.plan_again(now);
        }
        self.assign_owed(now);
    }

    /// Plans for the peers known at `now`, from the plan there is (or from what the peers
    /// hold, with none).
    fn plan_again(&mut self, now: Instant) {
        self.replan_owed = false;
        self.planned_at = Some(now);
        let peers = self.planning_peers(now);
        if peers.is_empty() && self.plan.is_none() {
            self.plan_error = Some("no peer offers the model yet".into());
            return;
        }
        // A restarted coordinator starts from what the nodes say they hold, so it comes back
        // to the same plan instead of making them reload; it still assigns each span.
        let had = self.plan.as_ref().map(|p| p.epoch);
        let previous = self.plan.take().or_else(|| {
            let mut held = self.claimed.clone();
            held.extend(self.loaded.iter().map(|(k, r)| (*k, *r)));
            let mut spans: Vec<Span> = held
                .iter()
                .map(|(k, r)| Span {
                    peer: *k,
                    range: *r,
                })
                .collect();
            spans.sort_by_key(|s| (s.range.start, s.peer.0));
            (!spans.is_empty()).then_some(Plan { epoch: 1, spans })
        });
        let planned = match previous {
            Some(prev) if self.is_settled(&peers, &prev) => Ok(prev),
            previous => {
                let planned = plan(&self.model.shape, &peers, previous.as_ref());
                self.settled = match &planned {
                    Ok(p) if previous.as_ref() == Some(p) => Some((peers, p.clone())),
                    _ => None,
                };
                planned
            }
        };
        match planned {
            Ok(p) => {
                if had != Some(p.epoch) {
                    let line = format!(
                        "plan epoch {}: {} ({})",
                        p.epoch,
                        describe(&p),
                        p.explain(self.model.shape.layers)
                    );
                    self.out.push(Action::NewPlan { epoch: p.epoch });
                    self.say(Some("plan"), line);
                    // A plan keeps its epoch only while its spans are the same.
                    self.routing += 1;
                }
                self.plan = Some(p);
                self.plan_error = None;
                self.size_sessions();
            }
            Err(e) => {
                if self.plan_error.as_deref() != Some(&e.to_string()) {
                    self.say(None, format!("no plan: {e}"));
                }
                if had.is_some() {
                    self.routing += 1;
                }
                self.plan_error = Some(e.to_string());
            }
        }
    }

    /// Sends each span of the plan its assignment, unless its peer holds it, is answering
    /// one or waits to be sent it again.
    fn assign_owed(&mut self, now: Instant) {
        let Some(p) = self.plan.as_ref() else { return };
        let epoch = p.epoch;
        let owed: Vec<Span> = p
            .spans
            .iter()
            .filter(|span| {
                let done = self.loaded.get(&span.peer) == Some(&span.range);
                let waiting = self.pending.contains(&span.peer)
                    || self.retry_at.get(&span.peer).is_some_and(|t| *t > now);
                !done && !waiting
            })
            .cloned()
            .collect();
        for span in owed {
            if !self.pending.insert(span.peer) {
                continue;
            }
            let assignment = ShardAssignment {
                model: self.model.model.clone(),
                layers: span.range,
                total_layers: self.model.shape.layers,
                epoch,
            };
            self.out.push(Action::Assign {
                peer: span.peer,
                assignment,
            });
        }
    }

    /// Whether planning for `peers` from `previous` is known to give `previous` again.
    fn is_settled(&self, peers: &[PlanPeer], previous: &Plan) -> bool {
        self.settled
            .as_ref()
            .is_some_and(|(p, plan)| p == peers && plan == previous)
    }

    /// The session count the plan's nodes' memory holds, when it follows memory.
    fn size_sessions(&mut self) {
        if !self.auto_sessions {
            return;
        }
        let Some(plan) = self.plan.as_ref() else {
            return;
        };
        let memory = |k: &PublicKey| self.table.get(k).map(|p| p.advert.memory_bytes);
        if let Some(n) = crate::capacity::pool_sessions(plan, &self.model.kv, memory) {
            self.out.push(Action::Sessions(n));
        }
    }

    /// `key` answered `assignment` (`Err`: why it failed; `connected`: whether a connection
    /// to it was open then) at `now`.
    pub fn assigned(
        &mut self,
        key: PublicKey,
        assignment: &ShardAssignment,
        outcome: Result<(), String>,
        connected: bool,
        now: Instant,
    ) {
        self.pending.remove(&key);
        match outcome {
            Ok(()) => {
                let a = assignment;
                self.say(
                    None,
                    format!(
                        "peer {} serves blocks {}..{} (epoch {})",
                        key.peer_id(),
                        a.layers.start,
                        a.layers.end,
                        a.epoch
                    ),
                );
                if self.loaded.insert(key, a.layers) != Some(a.layers) {
                    self.routing += 1;
                    self.reindex(&key, now);
                }
                self.retry_at.remove(&key);
                self.unconnected.remove(&key);
            }
            Err(_) => {
                self.retry_at.insert(key, now + ASSIGN_RETRY);
                if connected {
                    self.unconnected.remove(&key);
                } else {
                    self.unconnected.insert(key);
                }
            }
        }
        self.out.push(Action::Changed);
    }
}

/// Spans an operator line lists; a larger plan's line ends with how many more there are
/// (the dashboard and `/api/pool` hold every span).
pub const DESCRIBED_SPANS: usize = 16;

/// The plan's spans for an operator's line: its first [`DESCRIBED_SPANS`], then a count, so
/// a pool of thousands does not write the whole plan at every join.
pub fn describe(plan: &Plan) -> String {
    let mut line = plan
        .spans
        .iter()
        .take(DESCRIBED_SPANS)
        .map(|s| format!("{} {}..{}", s.peer.peer_id(), s.range.start, s.range.end))
        .collect::<Vec<_>>()
        .join(", ");
    if plan.spans.len() > DESCRIBED_SPANS {
        line += &format!(" and {} more spans", plan.spans.len() - DESCRIBED_SPANS);
    }
    line
}
