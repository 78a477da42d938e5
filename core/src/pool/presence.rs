//! Who is in the pool: peers joining, leaving, failing, going silent and coming back, and
//! the exclusions and redials that follow.

use super::exclusion::{ALIVE_WINDOW, BAN, LEAVE_BAN, SUSPECT_FOR};
use super::{Action, Exclusion, Now, PoolCore};
use crate::peer_table::Accepted;
use potluck_protocol::signed::PublicKey;
use std::time::{Duration, Instant};

impl PoolCore {
    /// The peer table accepted an advert of `key` (`accepted` says what it changed): a new
    /// peer is announced, a paused one is back, spans are synced and, when what plans are
    /// made from changed, the pool re-planned (what a peer holds matters only to a first
    /// plan: later ones go by what it confirmed loading).
    pub fn admitted(&mut self, key: PublicKey, accepted: Accepted, now: Now) {
        if accepted == Accepted::New {
            if let Some(p) = self.table.get(&key) {
                let a = &p.advert;
                let named = a
                    .name
                    .as_ref()
                    .map(|n| format!(" named {n:?}"))
                    .unwrap_or_default();
                let line = format!(
                    "peer joined {} device {:?} memory {} MB threads {} gflops {:.1} mem {:.1} GB/s{named}",
                    key.peer_id(),
                    a.device,
                    a.memory_bytes >> 20,
                    a.threads,
                    a.gflops,
                    a.mem_gbps
                );
                self.say(Some("peer"), line);
            }
        }
        self.back_from_leave(&key, now.at);
        self.sync_peer(&key, now);
        if accepted == Accepted::Changed {
            // Its claimed speed may be higher.
            self.bound_may_drop(&key);
        }
        let first = self.plan.is_none() && accepted == Accepted::Holds;
        if matches!(accepted, Accepted::New | Accepted::Changed) || first {
            self.replan_soon(now.at);
        }
    }

    /// Records what peers' adverts say they hold, and forgets departed peers' spans: a walk
    /// over the whole pool, for when peers left the table.
    pub fn sync_loaded(&mut self, now: Now) {
        let table = &self.table;
        let before = self.loaded.len();
        self.loaded.retain(|k, _| table.get(k).is_some());
        if self.loaded.len() != before {
            self.routing += 1;
            self.route_index = None;
        }
        self.claimed.retain(|k, _| table.get(k).is_some());
        self.pending.retain(|k| table.get(k).is_some());
        let stale: Vec<PublicKey> = self.stale_since.keys().copied().collect();
        let back: Vec<(PublicKey, u32)> = stale
            .iter()
            .filter_map(|k| self.fresh_again(k, now.at))
            .collect();
        let keys: Vec<PublicKey> = self.table.iter().map(|p| p.key).collect();
        for key in &keys {
            self.claim(key, now.at);
        }
        self.announce_back(&back, now.at);
        self.out.push(Action::Changed);
    }

    /// Takes `key` out of the table and forgets its spans, as [`PoolCore::sync_loaded`]
    /// would, without a walk over everyone else. Its exclusion stays: a quarantined peer
    /// that joins again is still out.
    fn forget(&mut self, key: &PublicKey) {
        self.table.remove(key);
        self.stale_since.remove(key);
        self.lose_span(key);
        self.claimed.remove(key);
        self.pending.remove(key);
        self.out.push(Action::Changed);
    }

    /// What [`PoolCore::sync_loaded`] does, for the one peer whose advert just arrived:
    /// an advert changes nothing of other peers, so a heartbeat costs the same in a pool
    /// of five and of ten thousand.
    fn sync_peer(&mut self, key: &PublicKey, now: Now) {
        let back: Vec<(PublicKey, u32)> = self.fresh_again(key, now.at).into_iter().collect();
        self.claim(key, now.at);
        self.announce_back(&back, now.at);
        self.out.push(Action::Changed);
    }

    /// If `key` was found unreachable and has advertised since (an advert issued after),
    /// it is reachable again: the tries its redials took, when that brings it back into
    /// plans and routes.
    fn fresh_again(&mut self, key: &PublicKey, now: Instant) -> Option<(PublicKey, u32)> {
        let since = *self.stale_since.get(key)?;
        if self
            .table
            .get(key)
            .is_some_and(|p| p.advert.issued_at <= since)
        {
            return None;
        }
        self.stale_since.remove(key);
        let tries = self.redials.reached(key);
        if self.exclusion(key, now) == Some(Exclusion::Unreachable) && self.knows(key) {
            self.banned.remove(key);
            return Some((*key, tries.unwrap_or(0)));
        }
        None
    }

    /// Takes what `key`'s advert says it holds as a claim (a hint for a first plan).
    fn claim(&mut self, key: &PublicKey, now: Instant) {
        let Some(p) = self.table.get(key) else {
            return;
        };
        let Some((m, range)) = &p.advert.loaded else {
            return;
        };
        // An assignment in flight reports itself when it is answered; an excluded
        // peer's span does not count until it is back; a restarted node's old advert
        // holds nothing.
        let counts = m == &self.model.model
            && range.end <= self.model.shape.layers
            && !self.stale_since.contains_key(key)
            && !self.pending.contains(key)
            && !self.is_excluded(key, now)
            && !self.loaded.contains_key(key);
        if counts {
            let range = *range;
            self.claimed.insert(*key, range);
        }
    }

    /// Tells operators which peers are back (with their redial tries) and re-plans for them.
    fn announce_back(&mut self, back: &[(PublicKey, u32)], now: Instant) {
        for (key, tries) in back {
            let line = format!("peer back {} after {tries} dials", key.peer_id());
            self.say(Some("peer"), line);
        }
        if !back.is_empty() {
            self.replan_soon(now);
        }
    }

    /// Leaves `key` out of plans and routes for `span` from `now` (unless a stronger
    /// exclusion is in force), tells operators why (`kind` on the dashboard) and re-plans
    /// around it. Returns whether it took effect.
    pub(super) fn exclude(
        &mut self,
        key: &PublicKey,
        span: Duration,
        why: Exclusion,
        kind: &'static str,
        line: String,
        now: Now,
    ) -> bool {
        if !self.knows(key) || self.exclusion(key, now.at).is_some_and(|was| was > why) {
            return false;
        }
        self.banned.insert(*key, (now.at + span, why));
        self.lose_span(key);
        if why == Exclusion::Unreachable {
            self.stale_since.insert(*key, now.unix);
            self.redials.start(*key, now.at);
        }
        self.say(Some(kind), line);
        self.replan_soon(now.at);
        true
    }

    /// Leaves `key` out of every plan for [`BAN`] (it broke the protocol or sent a result
    /// that does not verify) and re-plans around it.
    pub fn drop_peer(&mut self, key: &PublicKey, reason: &str, now: Now) {
        let line = format!("peer dropped {}: {reason}", key.peer_id());
        self.exclude(key, BAN, Exclusion::Dropped, "check", line, now);
    }

    /// Leaves a peer that failed a step out of plans and routes for [`SUSPECT_FOR`] and
    /// re-plans around it.
    pub fn suspect(&mut self, key: &PublicKey, reason: &str, now: Now) {
        let line = format!("peer failed {}: {reason}", key.peer_id());
        self.exclude(key, SUSPECT_FOR, Exclusion::Failed, "failure", line, now);
    }

    /// A peer announced it is leaving: plan and route around it at once; its running
    /// sessions move away at their next step.
    pub fn leaving(&mut self, key: &PublicKey, reason: &str, now: Now) {
        let line = format!("peer leaving {}: {reason}", key.peer_id());
        self.exclude(key, LEAVE_BAN, Exclusion::Leaving, "peer", line, now);
    }

    /// A peer that announced it was leaving (a paused node) advertises again: it is back in
    /// plans and routes.
    pub fn back_from_leave(&mut self, key: &PublicKey, now: Instant) {
        if self.exclusion(key, now) != Some(Exclusion::Leaving) {
            return;
        }
        self.banned.remove(key);
        let line = format!("peer back {}: advertising again", key.peer_id());
        self.say(Some("peer"), line);
        self.replan_soon(now);
    }

    /// `key` cannot be reached (`why`: its connection closed, it missed its adverts):
    /// routes avoid it while it is dialled again, until it advertises anew or is gone (see
    /// [`crate::redial`]). Nothing happens if it is unknown, already unreachable, leaving or
    /// dropped.
    pub fn unreachable(&mut self, key: &PublicKey, why: &str, now: Now) {
        if !self.knows(key) || self.exclusion(key, now.at) >= Some(Exclusion::Unreachable) {
            return;
        }
        let line = format!("peer unreachable {}: {why}", key.peer_id());
        self.exclude(key, BAN, Exclusion::Unreachable, "failure", line, now);
    }

    /// Peers whose adverts stopped (missed heartbeats, or expired by `now`): unreachable,
    /// unless they were on their way out anyway, then forgotten. A peer whose connection
    /// answers pings (see [`PoolCore::alive`]) and whose advert is still valid is late, not
    /// gone: a node busy computing, or one whose first adverts came close together, is
    /// never dropped for it.
    pub fn expire_silent(&mut self, now: Now) {
        for key in self.table.silent(now.unix) {
            let expired = self
                .table
                .get(&key)
                .is_none_or(|p| p.advert.expires_at <= now.unix);
            if !expired && self.alive(&key, now.at) {
                continue;
            }
            let leaving = self
                .exclusion(&key, now.at)
                .is_some_and(|w| w > Exclusion::Unreachable);
            if leaving {
                self.forget(&key);
                let line = format!("peer left {} (advert expired)", key.peer_id());
                self.say(Some("peer"), line);
            } else {
                self.unreachable(&key, "its adverts stopped", now);
            }
        }
    }

    /// Peers to dial again by `now`; peers whose tries are spent are gone from the pool
    /// (they join anew if they advertise again).
    pub fn due_redials(&mut self, now: Now) -> Vec<PublicKey> {
        let due = self.redials.due(now.at);
        let mut dial = Vec::new();
        for (key, what) in due {
            let name = key.peer_id();
            match what {
                crate::redial::Due::Dial { try_no, next_in } => {
                    self.say(
                        None,
                        format!(
                            "peer {name} not back; dialling it (try {try_no}), next step in {:.1} s",
                            next_in.as_secs_f32()
                        ),
                    );
                    dial.push(key);
                }
                crate::redial::Due::Gone => {
                    self.forget(&key);
                    self.banned.remove(&key);
                    let line = format!(
                        "peer gone {name}: not back after {} dials",
                        crate::redial::TRIES
                    );
                    self.say(Some("peer"), line);
                    self.replan_soon(now.at);
                }
            }
        }
        dial
    }

    /// Records that `key`'s connection answered a ping at `now` (`false`: it closed).
    pub fn pinged(&mut self, key: PublicKey, answered: bool, now: Instant) {
        if answered {
            self.pinged.insert(key, now);
        } else {
            self.pinged.remove(&key);
        }
    }

    /// Whether `key`'s connection answered a ping within [`ALIVE_WINDOW`] of `now`: busy,
    /// not gone.
    pub fn alive(&self, key: &PublicKey, now: Instant) -> bool {
        self.pinged
            .get(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < ALIVE_WINDOW)
    }

    /// A connection to `key` opened: an assignment that failed for want of one (a node that
    /// joined through another node and has just dialled in) is tried again at once, not at
    /// its retry; one the peer refused or failed keeps its wait.
    pub fn connected(&mut self, key: &PublicKey) {
        if self.knows(key) && self.unconnected.remove(key) {
            self.retry_at.remove(key);
        }
    }
}
