//! Whose work is checked and what a verdict does: picks by reputation, the spans that may
//! recompute others' work, and quarantine.

use super::exclusion::QUARANTINE;
use super::{Action, Exclusion, Now, PoolCore};
use crate::compare::Verdict;
use crate::planner::Span;
use potluck_protocol::signed::PublicKey;
use std::time::Instant;

impl PoolCore {
    /// Whether `key`'s result just verified is picked for a check (see [`crate::trust`]).
    pub fn pick_for_check(&mut self, key: &PublicKey) -> bool {
        self.knows(key) && self.trust.pick(key)
    }

    /// Whether `key` has a record of its own (see [`crate::trust::PeerTrust::proven`]).
    pub fn proven(&self, key: &PublicKey) -> bool {
        self.knows(key) && self.trust.get(key).proven()
    }

    /// Records a verdict on `key`'s work in its trust record, at unix time `now`.
    pub fn record_trust(&mut self, key: &PublicKey, verdict: Verdict, now: u64) {
        if self.knows(key) {
            self.trust.record(key, verdict, now as f64);
            // More trust, less distrust in its cost.
            self.bound_may_drop(key);
        }
    }

    /// A draw below `n`, from the seeded stream checks are picked by (so a checked peer
    /// cannot know its checker, and runs are reproducible from the seed).
    pub fn draw(&mut self, n: usize) -> usize {
        self.trust.draw(n)
    }

    /// Leaves `key` out of the pool for [`QUARANTINE`] from `now` and voids its results no
    /// check has covered; [`Action::Quarantined`] tells the shell to void its credit too
    /// (a cheat keeps nothing it was credited before it was caught) and, when it took
    /// effect, to put it on record. The failure itself is for the caller to record (see
    /// [`PoolCore::record_trust`]).
    pub fn quarantine(&mut self, key: &PublicKey, why: &str, now: Now) {
        let voided = if self.knows(key) {
            self.trust.void_unchecked(key)
        } else {
            0
        };
        let detail = format!("{why}; {voided} unchecked results voided");
        let line = format!("peer quarantined {}: {detail}", key.peer_id());
        let at = self.out.len();
        let excluded = self.exclude(key, QUARANTINE, Exclusion::Quarantined, "check", line, now);
        // Credit goes before anything the exclusion said or re-planned.
        self.out.insert(
            at,
            Action::Quarantined {
                peer: *key,
                detail,
                excluded,
            },
        );
    }

    /// Whether `key` is quarantined at `now`.
    pub fn is_quarantined(&self, key: &PublicKey, now: Instant) -> bool {
        self.exclusion(key, now) == Some(Exclusion::Quarantined)
    }

    /// Every loaded span, in or out of the plan's chain, on a peer that is not excluded at
    /// `now` and may be sent that span's inputs (see [`PoolCore::may_serve`]): checks,
    /// twins and canaries replay a first stage's journal, which is the prompt.
    pub fn serving(&self, now: Instant) -> Vec<Span> {
        self.loaded
            .iter()
            .filter(|(k, r)| !self.is_excluded(k, now) && self.may_serve(k, **r))
            .map(|(k, r)| Span {
                peer: *k,
                range: *r,
            })
            .collect()
    }
}
