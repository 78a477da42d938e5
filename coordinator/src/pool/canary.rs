//! Canaries: work whose answers are already known, sent to nodes as if it were new. The
//! answers come from jobs that two nodes agreed on in a spot check, a few kept per span; a
//! canary replays one under a fresh session id, so on the wire it is a session like any
//! other. Canaries reach what spot checks cannot: a span only one node holds now (there is
//! nobody to recompute on), and nodes that the router rarely picks. A canary whose vouchers
//! were since quarantined is not sent, and one that no proven peer vouched for cannot
//! condemn a proven peer.

use super::checks::cmp;
use super::Coordinator;
use crate::audit::{receipt_hex, Record};
use crate::compare::Verdict;
use crate::pipeline::CheckJob;
use crate::planner::Span;
use libp2p::PeerId;
use potluck_protocol::messages::LayerRange;
use std::collections::{HashMap, VecDeque};

/// Known-good jobs kept per span.
const BANK_PER_SPAN: usize = 8;
/// Longest job kept (requests), so the bank stays small.
const MAX_CANARY_STEPS: usize = 256;

/// A job two nodes agreed on, and who they were.
#[derive(Debug, Clone)]
pub(crate) struct Canary {
    job: CheckJob,
    vouched: [PeerId; 2],
}

/// Known-good jobs by span.
#[derive(Debug, Default)]
pub(crate) struct CanaryBank {
    jobs: HashMap<LayerRange, VecDeque<Canary>>,
}

impl CanaryBank {
    /// Keeps `job`, which `checker` agreed with, newest first out.
    pub(crate) fn keep(&mut self, job: &CheckJob, checker: PeerId) {
        if job.journal.len() > MAX_CANARY_STEPS || job.picked.is_empty() {
            return;
        }
        let q = self.jobs.entry(job.span.range).or_default();
        if q.len() == BANK_PER_SPAN {
            q.pop_front();
        }
        q.push_back(Canary {
            job: job.clone(),
            vouched: [job.peer, checker],
        });
    }

    /// A kept job for `range` that `peer` had no part in.
    fn for_peer(&self, range: LayerRange, peer: PeerId, draw: usize) -> Option<Canary> {
        let fit: Vec<&Canary> = self
            .jobs
            .get(&range)?
            .iter()
            .filter(|c| !c.vouched.contains(&peer))
            .collect();
        (!fit.is_empty()).then(|| fit[draw % fit.len()].clone())
    }
}

impl Coordinator {
    /// Sends a canary to every serving node that a kept job fits (at most two at a time,
    /// sharing the spot checks' slots).
    pub fn canary_round(&self) {
        for (span, peer) in self.serving() {
            let draw = self.core().draw(usize::MAX);
            let canary = self
                .canaries
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .for_peer(span.range, peer, draw);
            if let Some(c) = canary {
                let this = self.clone();
                tokio::spawn(async move { this.run_canary((span, peer), c).await });
            }
        }
    }

    async fn run_canary(&self, target: (Span, PeerId), canary: Canary) {
        let Ok(_permit) = self.checks.clone().acquire_owned().await else {
            return;
        };
        let peer = target.1;
        // A known answer is only as good as the peers that agreed on it.
        if canary.vouched.iter().any(|v| self.is_quarantined(*v)) {
            return;
        }
        let (job, session) = (canary.job, self.fresh_session());
        let answers = match self.replay_on(target, &job, session).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%peer, "canary could not run: {e}");
                return;
            }
        };
        // The kept results are the known answers; the node's new ones are under check.
        let Some((i, c)) = job
            .picked
            .iter()
            .zip(&answers)
            .map(|(known, got)| cmp((&got.output, &got.receipt), (&known.output, &known.receipt)))
            .enumerate()
            .max_by(|(_, a), (_, b)| a.verdict.cmp(&b.verdict).then(a.severity(b)))
        else {
            return;
        };
        // Two fresh keys agreeing is no record: against a proven peer their answer condemns
        // only if one of them is proven too.
        let vouched = canary.vouched.iter().any(|v| self.proven(*v));
        let verdict = match c.verdict {
            Verdict::Fail if self.proven(peer) && !vouched => Verdict::Inconclusive,
            v => v,
        };
        let detail = format!(
            "{} results; worst at step {}: {}",
            answers.len(),
            job.picked[i].step,
            c.detail()
        );
        self.note_verdict(peer, verdict, "canary");
        if let Some(audit) = &self.audit {
            audit.record(Record::Canary {
                peer: peer.to_string(),
                session,
                step: job.picked[i].step,
                verdict: verdict.as_str().into(),
                detail: detail.clone(),
                receipt: receipt_hex(&answers[i].receipt),
            });
        }
        if verdict == Verdict::Fail {
            self.quarantine(peer, &format!("failed a canary ({detail})"));
        }
    }
}
