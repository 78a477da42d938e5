//! Which peer holds which blocks: the peers a plan may use and at what speed, re-planning,
//! the assignments it owes, their answers, and the session count the plan's memory holds.

use super::exclusion::ASSIGN_RETRY;
use super::{Action, PoolCore};
use crate::peer_table::Peer;
use crate::planner::{plan, planning_speed, Plan, PlanPeer, Span};
use potluck_protocol::messages::ShardAssignment;
use potluck_protocol::signed::PublicKey;
use std::collections::HashMap;
use std::time::Instant;

/// Round trip assumed for peers not yet pinged, milliseconds.
pub(super) const DEFAULT_RTT_MS: f64 = 1.0;

impl PoolCore {
    /// The peers a plan may use at `now`, with the speeds it plans them by: measured where
    /// this coordinator has timed their steps (`quickest`, seconds per step by peer),
    /// claimed otherwise (see [`planning_speed`]), in the adverts' unit (GB/s). Routing
    /// estimates unmeasured peers by the same speeds.
    pub(super) fn planning_peers(
        &self,
        quickest: &HashMap<PublicKey, f64>,
        now: Instant,
    ) -> Vec<PlanPeer> {
        let layer_bytes = self.model.shape.layer_bytes as f64;
        let measured = |p: &Peer| {
            let secs = quickest.get(&p.key)?;
            let blocks = self.loaded.get(&p.key)?.len().max(1);
            let rtt_ms = p.rtt_ms.map_or(DEFAULT_RTT_MS, f64::from);
            let ms_per_block = (secs * 1e3 - rtt_ms).max(1e-3) / f64::from(blocks);
            Some(layer_bytes / (ms_per_block * 1e6))
        };
        let candidates: Vec<(&Peer, Option<f64>)> = self
            .table
            .peers()
            .into_iter()
            .filter(|p| !self.is_excluded(&p.key, now))
            .filter(|p| p.advert.models.contains(&self.model.model))
            .map(|p| (p, measured(p)))
            .collect();
        let fastest = candidates
            .iter()
            .filter_map(|(_, m)| *m)
            .max_by(f64::total_cmp);
        candidates
            .into_iter()
            .map(|(p, m)| PlanPeer {
                id: p.key,
                speed: planning_speed(f64::from(p.advert.mem_gbps), m, fastest).max(1e-3),
                memory_bytes: p.advert.memory_bytes,
                edge_ok: self.may_see_text(&p.key),
            })
            .collect()
    }

    /// Re-plans for the peers known at `now` and owes every assignment not yet confirmed
    /// ([`Action::Assign`]).
    pub fn replan(&mut self, now: Instant) {
        let quickest = self.step_times.quickest();
        let peers = self.planning_peers(&quickest, now);
        if peers.is_empty() && self.plan.is_none() {
            self.plan_error = Some("no peer offers the model yet".into());
            return;
        }
        // A restarted coordinator starts from what the nodes say they hold, so it comes back
        // to the same plan instead of making them reload; it still assigns each span.
        let previous = self.plan.clone().or_else(|| {
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
        match plan(&self.model.shape, &peers, previous.as_ref()) {
            Ok(p) => {
                if self.plan.as_ref().map(|q| q.epoch) != Some(p.epoch) {
                    let line = format!(
                        "plan epoch {}: {} ({})",
                        p.epoch,
                        describe(&p),
                        p.explain(self.model.shape.layers)
                    );
                    self.out.push(Action::NewPlan { epoch: p.epoch });
                    self.say(Some("plan"), line);
                }
                self.plan = Some(p);
                self.plan_error = None;
                self.size_sessions();
            }
            Err(e) => {
                if self.plan_error.as_deref() != Some(&e.to_string()) {
                    self.say(None, format!("no plan: {e}"));
                }
                self.plan = None;
                self.plan_error = Some(e.to_string());
            }
        }
        let Some(p) = self.plan.clone() else { return };
        for span in p.spans {
            let done = self.loaded.get(&span.peer) == Some(&span.range);
            let waiting = self.pending.contains(&span.peer)
                || self.retry_at.get(&span.peer).is_some_and(|t| *t > now);
            if done || waiting {
                continue;
            }
            self.pending.insert(span.peer);
            let assignment = ShardAssignment {
                model: self.model.model.clone(),
                layers: span.range,
                total_layers: self.model.shape.layers,
                epoch: p.epoch,
            };
            self.out.push(Action::Assign {
                peer: span.peer,
                assignment,
            });
        }
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
                self.loaded.insert(key, a.layers);
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

/// One line per span, for operators.
pub fn describe(plan: &Plan) -> String {
    plan.spans
        .iter()
        .map(|s| format!("{} {}..{}", s.peer.peer_id(), s.range.start, s.range.end))
        .collect::<Vec<_>>()
        .join(", ")
}
