//! Spot checks on the pool's side: which results are picked, which peer recomputes them,
//! what the verdicts do to each peer's trust, and quarantine. A result the first checker
//! disagrees with goes to a third peer holding the same blocks, and the majority decides;
//! where the three all differ (two of them lied), a fourth peer's answer decides.
//! One peer's word against another's never condemns a peer with a record of its own (see
//! [`crate::trust::PeerTrust::proven`]), so a fresh key claiming an honest node's blocks
//! cannot get it quarantined: its dispute needs a third opinion from a proven peer, and
//! without one it is inconclusive. With no third peer the checker's word stands only when
//! the checker has a record and the checked peer has none.

use super::Coordinator;
use crate::audit::{receipt_hex, Record};
use crate::compare::{compare, tolerance, Comparison, Verdict};
use crate::origin::Origin;
use crate::pipeline::CheckJob;
use crate::pipeline::PipelineError;
use crate::planner::Span;
use crate::spotcheck::{recompute, Reference};
use libp2p::PeerId;
use potluck_net::swarm::key_of_peer;
use potluck_protocol::messages::{LayerRange, Receipt, StageOutputWire, StageResult};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What the checks decided about one picked result.
struct Decision {
    verdict: Verdict,
    /// A checker whose answer the third peer showed wrong.
    lying_checker: bool,
    /// The checked, the checker's and the third peer's answers all differ.
    split: bool,
    /// The checked result against the first checker's.
    first: Comparison,
}

/// Compares output `a` with reference `b`, each with the receipt that says how it was
/// computed (which sets the tolerance).
pub(super) fn cmp(a: (&StageOutputWire, &Receipt), b: (&StageOutputWire, &Receipt)) -> Comparison {
    let tol = tolerance(&a.1.body.numeric, &b.1.body.numeric);
    compare(a.0, b.0, &tol).0
}

/// Whether the two sides of a check have records of their own.
#[derive(Debug, Clone, Copy)]
pub(super) struct Standing {
    /// The peer whose work is checked.
    pub(super) checked: bool,
    /// The peer that recomputed it first.
    pub(super) checker: bool,
}

/// Settles a check from its comparisons: `first`, the checked result against the checker's;
/// `third`, when the first disagreed and a third peer answered, the checked result and the
/// checker's each against the third's. The verdict, and whether the checker was shown
/// wrong. One peer's word alone stands only from a proven checker against an unproven peer.
pub(super) fn settle(
    first: Verdict,
    third: Option<(Verdict, Verdict)>,
    standing: Standing,
) -> (Verdict, bool) {
    if first == Verdict::Pass {
        return (Verdict::Pass, false);
    }
    let Some((checked, checker)) = third else {
        let stands = standing.checker && !standing.checked;
        return (if stands { first } else { Verdict::Inconclusive }, false);
    };
    match (checked, checker) {
        (Verdict::Pass, checker) => (Verdict::Pass, checker == Verdict::Fail),
        (Verdict::Fail, v) if v != Verdict::Fail => (Verdict::Fail, false),
        _ => (Verdict::Inconclusive, false),
    }
}

/// Settles a check whose three answers all differ from a fourth peer's answer: whether it
/// agrees with the checked result, the checker's, or the third peer's. Two that agree
/// stand; the verdict, and whether the checker was shown wrong.
pub(super) fn settle_split(checked: bool, checker: bool, third: bool) -> (Verdict, bool) {
    match (checked, checker, third) {
        (true, false, _) => (Verdict::Pass, true),
        (false, true, _) => (Verdict::Fail, false),
        // The third and the fourth agree: both the checked peer and its checker lied.
        (false, false, true) => (Verdict::Fail, true),
        _ => (Verdict::Inconclusive, false),
    }
}

/// Decides one picked result whose three answers all differ, by a fourth peer's `fourth`.
fn decide_split(
    picked: &StageResult,
    first: &Reference,
    third: &Reference,
    fourth: &Reference,
) -> Decision {
    let checked = (&picked.output, &picked.receipt);
    let against = (&fourth.output, &fourth.receipt);
    let agrees = |x| cmp(x, against).verdict == Verdict::Pass;
    let (verdict, lying_checker) = settle_split(
        agrees(checked),
        agrees((&first.output, &first.receipt)),
        agrees((&third.output, &third.receipt)),
    );
    Decision {
        verdict,
        lying_checker,
        split: false,
        first: cmp(checked, (&first.output, &first.receipt)),
    }
}

/// Decides one picked result from its recomputations: `first` by the checker, `third` by
/// a third peer when the first disagreed; `standing` says who has a record.
fn decide(
    picked: &StageResult,
    first: &Reference,
    third: Option<&Reference>,
    standing: Standing,
) -> Decision {
    let checked = (&picked.output, &picked.receipt);
    let v1 = cmp(checked, (&first.output, &first.receipt));
    let third = third.map(|t| {
        let against = (&t.output, &t.receipt);
        (
            cmp(checked, against).verdict,
            cmp((&first.output, &first.receipt), against).verdict,
        )
    });
    let (verdict, lying_checker) = settle(v1.verdict, third, standing);
    Decision {
        verdict,
        lying_checker,
        split: v1.verdict == Verdict::Fail && third == Some((Verdict::Fail, Verdict::Fail)),
        first: v1,
    }
}

impl Coordinator {
    /// Whether `peer`'s result just verified is picked for a check (see [`crate::trust`]).
    pub(crate) fn pick_for_check(&self, peer: PeerId) -> bool {
        key_of_peer(&peer).is_some_and(|k| self.core().pick_for_check(&k))
    }

    /// Whether `peer` has a record of its own (see [`crate::trust::PeerTrust::proven`]).
    pub(super) fn proven(&self, peer: PeerId) -> bool {
        key_of_peer(&peer).is_some_and(|k| self.core().proven(&k))
    }

    /// Checks `job` on other peers, beside generation.
    pub(crate) fn check_later(&self, job: CheckJob) {
        let this = self.clone();
        tokio::spawn(async move { this.run_check(job).await });
    }

    /// Every loaded span, in or out of the plan's chain, on a peer that is not excluded and
    /// may be sent that span's inputs (see [`PoolCore::may_serve`](potluck_core::pool::PoolCore::may_serve)): checks, twins and
    /// canaries replay a first stage's journal, which is the prompt.
    pub(super) fn serving(&self) -> Vec<(Span, PeerId)> {
        let spans = self.core().serving(Instant::now());
        super::with_peer_ids(spans)
    }

    /// Loaded spans of exactly `range` on serving peers other than `not`, of other origins
    /// than theirs where there are any (a peer's own other keys are no check on it).
    pub(super) fn replicas(&self, range: LayerRange, not: &[PeerId]) -> Vec<(Span, PeerId)> {
        let all = self
            .serving()
            .into_iter()
            .filter(|(s, p)| s.range == range && !not.contains(p))
            .collect();
        self.apart(all, |(_, p)| *p, not, false)
    }

    /// The `candidates` of another origin than every peer of `from`; when there are none,
    /// all of them unless `only_apart`.
    pub(super) fn apart<T>(
        &self,
        candidates: Vec<T>,
        peer: impl Fn(&T) -> PeerId,
        from: &[PeerId],
        only_apart: bool,
    ) -> Vec<T> {
        let taken: HashSet<Origin> = from.iter().map(|p| self.origin(*p)).collect();
        let (apart, near): (Vec<T>, Vec<T>) = candidates
            .into_iter()
            .partition(|c| !taken.contains(&self.origin(peer(c))));
        if apart.is_empty() && !only_apart {
            near
        } else {
            apart
        }
    }

    /// A session id no session has had (replays under it cannot be linked to the session
    /// they came from, nor told from new work).
    pub(super) fn fresh_session(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Replays `job` on `target` under `session`; the time counts as checking.
    pub(super) async fn replay_on(
        &self,
        target: (Span, PeerId),
        job: &CheckJob,
        session: u64,
    ) -> Result<Vec<Reference>, PipelineError> {
        let job = job.under_session(session);
        let started = std::time::Instant::now();
        let mut control = self.control.clone();
        let answers = recompute(
            &mut control,
            target,
            &job,
            &self.chain_model(),
            &self.metrics,
        )
        .await;
        self.metrics
            .check_seconds
            .inc_by(started.elapsed().as_secs_f64());
        answers
    }

    /// A replica of `range` on a peer other than `not`, at random.
    pub(crate) fn replica(&self, range: LayerRange, not: &[PeerId]) -> Option<(Span, PeerId)> {
        self.draw(self.replicas(range, not))
    }

    /// One of `candidates`, at random (a checked peer must not know its checker).
    fn draw(&self, candidates: Vec<(Span, PeerId)>) -> Option<(Span, PeerId)> {
        self.draw_by(candidates, |(_, p)| *p)
    }

    /// One of `candidates`, each naming its peer with `peer`, at random; the order drawn
    /// from is the peers', so draws are reproducible from the seed.
    pub(super) fn draw_by<T>(
        &self,
        mut candidates: Vec<T>,
        peer: impl Fn(&T) -> PeerId,
    ) -> Option<T> {
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_by_key(|c| peer(c).to_bytes());
        let i = self.core().draw(candidates.len());
        Some(candidates.swap_remove(i))
    }

    /// A third opinion on a dispute between `disputants` among `others`: proven peers
    /// first, of neither disputant's origin where there is one; for a `checked_proven`
    /// peer's dispute only a proven peer of neither origin (one party's keys agreeing with
    /// each other condemn no one).
    pub(super) fn third_opinion<T>(
        &self,
        others: Vec<T>,
        peer: impl Fn(&T) -> PeerId + Copy,
        checked_proven: bool,
        disputants: &[PeerId],
    ) -> Option<T> {
        let others = self.apart(others, peer, disputants, checked_proven);
        let (proven, new): (Vec<T>, Vec<T>) =
            others.into_iter().partition(|c| self.proven(peer(c)));
        if checked_proven || !proven.is_empty() {
            self.draw_by(proven, peer)
        } else {
            self.draw_by(new, peer)
        }
    }

    async fn run_check(&self, job: CheckJob) {
        let Ok(_permit) = self.checks.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = self.draw(self.replicas(job.span.range, &[job.peer])) else {
            self.metrics.check("unchecked");
            tracing::debug!(peer = %job.peer, "no replica to check against");
            return;
        };
        let checker = first.1;
        let standing = Standing {
            checked: self.proven(job.peer),
            checker: self.proven(checker),
        };
        let answers = match self.replay_on(first, &job, self.fresh_session()).await {
            Ok(a) => a,
            Err(e) => {
                self.metrics.check("check_failed");
                tracing::warn!(%checker, "spot check could not run: {e}");
                return;
            }
        };
        let mut decisions: Vec<Decision> = job
            .picked
            .iter()
            .zip(&answers)
            .map(|(p, a)| decide(p, a, None, standing))
            .collect();
        // What the checker disputes goes to a third peer, whose answers decide it.
        let disputed: Vec<usize> = (0..decisions.len())
            .filter(|&i| decisions[i].verdict != Verdict::Pass)
            .collect();
        let third = if disputed.is_empty() {
            None
        } else {
            let others = self.replicas(job.span.range, &[job.peer, checker]);
            self.third_opinion(others, |(_, p)| *p, standing.checked, &[job.peer, checker])
        };
        let mut thirds: Vec<(usize, Reference)> = Vec::new();
        let third_peer = third.as_ref().map(|t| t.1);
        if let Some(third) = third {
            let sub = CheckJob {
                picked: disputed.iter().map(|&i| job.picked[i].clone()).collect(),
                ..job.clone()
            };
            match self.replay_on(third, &sub, self.fresh_session()).await {
                Ok(a) => {
                    for (&i, r) in disputed.iter().zip(a) {
                        decisions[i] = decide(&job.picked[i], &answers[i], Some(&r), standing);
                        thirds.push((i, r));
                    }
                }
                Err(e) => tracing::warn!("third check could not run: {e}"),
            }
        }
        // Three answers that all differ go to a fourth peer of none of their origins.
        thirds.retain(|(i, _)| decisions[*i].split);
        if let (Some(third_peer), false) = (third_peer, thirds.is_empty()) {
            let three = [job.peer, checker, third_peer];
            let others = self.replicas(job.span.range, &three);
            if let Some(fourth) = self.third_opinion(others, |(_, p)| *p, standing.checked, &three)
            {
                let sub = CheckJob {
                    picked: thirds.iter().map(|(i, _)| job.picked[*i].clone()).collect(),
                    ..job.clone()
                };
                match self.replay_on(fourth, &sub, self.fresh_session()).await {
                    Ok(a) => {
                        for ((i, t), r) in thirds.iter().zip(&a) {
                            decisions[*i] = decide_split(&job.picked[*i], &answers[*i], t, r);
                        }
                    }
                    Err(e) => tracing::warn!("fourth check could not run: {e}"),
                }
            }
        }
        // The job's verdict is its worst result's; the audit log keeps that result's
        // distances and receipts, and how many results each verdict had.
        let Some(worst) = (0..decisions.len()).max_by(|&a, &b| {
            let (x, y) = (&decisions[a], &decisions[b]);
            x.verdict.cmp(&y.verdict).then(x.first.severity(&y.first))
        }) else {
            return;
        };
        let d = &decisions[worst];
        let count = |v: Verdict| decisions.iter().filter(|d| d.verdict == v).count();
        let detail = format!(
            "{} results: {} pass, {} inconclusive, {} fail; worst at step {}: {}",
            decisions.len(),
            count(Verdict::Pass),
            count(Verdict::Inconclusive),
            count(Verdict::Fail),
            job.picked[worst].step,
            d.first.detail()
        );
        self.note_verdict(job.peer, d.verdict, "spot");
        tracing::info!(peer = %job.peer, %checker, verdict = d.verdict.as_str(), "{detail}");
        if let Some(audit) = &self.audit {
            audit.record(Record::Check {
                peer: job.peer.to_string(),
                checker: checker.to_string(),
                session: job.picked[worst].session,
                step: job.picked[worst].step,
                verdict: d.verdict.as_str().into(),
                detail: detail.clone(),
                cos: Some(d.first.cos).filter(|v| v.is_finite()),
                rel_l2: Some(d.first.rel_l2).filter(|v| v.is_finite()),
                logprob: Some(d.first.logprob).filter(|v| v.is_finite()),
                receipts: vec![
                    receipt_hex(&job.picked[worst].receipt),
                    receipt_hex(&answers[worst].receipt),
                ],
            });
        }
        if d.verdict == Verdict::Fail {
            self.quarantine(job.peer, &format!("failed a spot check ({detail})"));
        } else if d.verdict == Verdict::Pass && !decisions.iter().any(|d| d.lying_checker) {
            // Two nodes agree on it: a known answer for canaries.
            self.canaries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keep(&job, checker);
        }
        if decisions.iter().any(|d| d.lying_checker) {
            self.record_trust(checker, Verdict::Fail);
            self.quarantine(checker, "its recomputation disagreed with two other peers");
        }
    }

    /// Leaves `peer` out of the pool for [`QUARANTINE`](super::QUARANTINE), voids its
    /// results no check has covered and its batch credit, and moves running sessions off it
    /// (rebuilding what it fed downstream). The failure itself is for the caller to record (see
    /// [`Coordinator::record_trust`]).
    pub fn quarantine(&self, peer: PeerId, why: &str) {
        if let Some(key) = key_of_peer(&peer) {
            self.with_core(|c, now| c.quarantine(&key, why, now));
        }
    }

    /// Counts a verdict on `peer`'s work in its trust record and in the metrics (as
    /// `{what}_{verdict}`).
    pub(super) fn note_verdict(&self, peer: PeerId, verdict: Verdict, what: &str) {
        self.record_trust(peer, verdict);
        self.metrics.check(&format!("{what}_{}", verdict.as_str()));
    }

    /// Records a verdict on `peer`'s work in its trust record, now.
    pub(crate) fn record_trust(&self, peer: PeerId, verdict: Verdict) {
        if let Some(key) = key_of_peer(&peer) {
            self.with_core(|c, now| c.record_trust(&key, verdict, now.unix));
        }
    }

    /// Waits until every spot check started so far has finished.
    pub async fn wait_checks(&self) {
        // The semaphore is fair: all of it comes free only after the checks queued before.
        let _all = self
            .checks
            .acquire_many(super::CONCURRENT_CHECKS as u32)
            .await;
    }

    /// Whether `peer` is quarantined now.
    pub fn is_quarantined(&self, peer: PeerId) -> bool {
        key_of_peer(&peer).is_some_and(|k| self.core().is_quarantined(&k, Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{Fail, Inconclusive, Pass};

    fn standing(checked: bool, checker: bool) -> Standing {
        Standing { checked, checker }
    }

    #[test]
    fn one_peers_word_condemns_only_from_a_proven_checker_against_an_unproven_peer() {
        // A fresh key disputing a proven peer, with nobody to ask: inconclusive.
        assert_eq!(
            settle(Fail, None, standing(true, false)),
            (Inconclusive, false)
        );
        // Proven against proven, or fresh against fresh: inconclusive too.
        assert_eq!(
            settle(Fail, None, standing(true, true)),
            (Inconclusive, false)
        );
        assert_eq!(
            settle(Fail, None, standing(false, false)),
            (Inconclusive, false)
        );
        // A proven checker's word against a fresh peer stands.
        assert_eq!(settle(Fail, None, standing(false, true)), (Fail, false));
        // Agreement needs nobody's record.
        assert_eq!(settle(Pass, None, standing(false, false)), (Pass, false));
    }

    #[test]
    fn a_third_opinion_decides_by_majority_and_exposes_a_lying_checker() {
        for s in [
            standing(true, false),
            standing(false, true),
            standing(false, false),
        ] {
            // The third agrees with the checked peer and not the checker: the checker lied.
            assert_eq!(settle(Fail, Some((Pass, Fail)), s), (Pass, true));
            // The third agrees with the checker: the checked peer fails.
            assert_eq!(settle(Fail, Some((Fail, Pass)), s), (Fail, false));
            // Three different answers: nobody is condemned on them alone.
            assert_eq!(settle(Fail, Some((Fail, Fail)), s), (Inconclusive, false));
        }
    }

    #[test]
    fn a_fourth_opinion_settles_three_different_answers() {
        // The fourth agrees with the checked peer: the checker lied.
        assert_eq!(settle_split(true, false, false), (Pass, true));
        // With the checker: the checked peer lied.
        assert_eq!(settle_split(false, true, false), (Fail, false));
        // With the third: both the checked peer and its checker lied.
        assert_eq!(settle_split(false, false, true), (Fail, true));
        // A fourth answer of its own settles nothing.
        assert_eq!(settle_split(false, false, false), (Inconclusive, false));
    }
}
