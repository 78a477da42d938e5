//! Spot checks of online embedding slices (`/v1/embeddings`). A slice is picked by the same
//! adaptive policy as stage results (every one of a new peer's, a share of a proven peer's;
//! see [`crate::trust`]), recomputed beside the request on another peer holding the encoder,
//! and compared vector by vector as batch quorums compare them
//! ([`crate::compare::vectors_agree`]). A disagreement goes to a third peer and is settled
//! as stage checks are ([`super::checks::settle`]): a failed peer is quarantined and its
//! unchecked results and credit voided; a checker two others showed wrong is quarantined.
//! The client's answer does not wait for any of it.

use super::checks::{settle, Standing};
use super::work::{Slice, SliceAnswer};
use super::Coordinator;
use crate::audit::{receipt_hex, Record};
use crate::compare::{vectors_agree, Verdict};
use libp2p::PeerId;
use potluck_protocol::messages::ModelRef;
use potluck_protocol::signed::PublicKey;

/// Pass when two answers agree, else fail.
fn agreement(a: &[Vec<f32>], b: &[Vec<f32>]) -> Verdict {
    if vectors_agree(a, b) {
        Verdict::Pass
    } else {
        Verdict::Fail
    }
}

impl Coordinator {
    /// Checks `peer`'s `answer` to `slice` on other holders of `model`, beside the request.
    pub(super) fn check_slice_later(
        &self,
        peer: PeerId,
        model: ModelRef,
        slice: &Slice,
        answer: &SliceAnswer,
    ) {
        let (this, texts, answer) = (self.clone(), slice.texts.clone(), answer.clone());
        tokio::spawn(async move { this.run_slice_check(peer, model, texts, answer).await });
    }

    async fn run_slice_check(
        &self,
        peer: PeerId,
        model: ModelRef,
        texts: Vec<String>,
        answer: SliceAnswer,
    ) {
        let SliceAnswer {
            vectors,
            receipt,
            unit,
            ..
        } = answer;
        let Ok(_permit) = self.checks.clone().acquire_owned().await else {
            return;
        };
        let others: Vec<(PeerId, PublicKey)> = self
            .holders(&model)
            .into_iter()
            .filter(|(p, _)| *p != peer)
            .collect();
        let candidates = self.apart(others.clone(), |(p, _)| *p, &[peer], false);
        let Some((checker, checker_key)) = self.draw_by(candidates, |(p, _)| *p) else {
            self.metrics().check("unchecked");
            tracing::debug!(%peer, "no other node holds the encoder to check against");
            return;
        };
        let slice = Slice { start: 0, texts };
        let theirs = match self.run_slice(checker, &checker_key, &model, &slice).await {
            Ok(a) => a,
            Err(_) => {
                self.metrics().check("check_failed");
                tracing::warn!(%checker, "embedding check could not run");
                return;
            }
        };
        let standing = Standing {
            checked: self.proven(peer),
            checker: self.proven(checker),
        };
        let first = agreement(&vectors, &theirs.vectors);
        let mut third = None;
        if first != Verdict::Pass {
            let rest: Vec<_> = others.into_iter().filter(|(p, _)| *p != checker).collect();
            if let Some((p, key)) =
                self.third_opinion(rest, |(p, _)| *p, standing.checked, &[peer, checker])
            {
                match self.run_slice(p, &key, &model, &slice).await {
                    Ok(t) => {
                        third = Some((
                            agreement(&vectors, &t.vectors),
                            agreement(&theirs.vectors, &t.vectors),
                        ))
                    }
                    Err(_) => tracing::warn!(third = %p, "third embedding check could not run"),
                }
            }
        }
        let (verdict, lying_checker) = settle(first, third, standing);
        let worst = vectors
            .iter()
            .zip(&theirs.vectors)
            .map(|(a, b)| crate::compare::row_distances(a, b, a.len()).0)
            .fold(1.0f64, f64::min);
        let detail = format!(
            "{} vectors; lowest cosine against the checker {worst:.6}",
            vectors.len()
        );
        self.note_verdict(peer, verdict, "embed");
        tracing::info!(%peer, %checker, verdict = verdict.as_str(), "embedding check: {detail}");
        if let Some(audit) = self.audit.as_ref() {
            audit.record(Record::Check {
                peer: peer.to_string(),
                checker: checker.to_string(),
                session: unit,
                step: 0,
                verdict: verdict.as_str().into(),
                detail: detail.clone(),
                cos: Some(worst).filter(|v| v.is_finite()),
                rel_l2: None,
                logprob: None,
                receipts: vec![receipt_hex(&receipt), receipt_hex(&theirs.receipt)],
            });
        }
        if verdict == Verdict::Fail {
            self.quarantine(peer, &format!("failed an embedding check ({detail})"));
        }
        if lying_checker {
            self.record_trust(checker, Verdict::Fail);
            self.quarantine(checker, "its recomputation disagreed with two other peers");
        }
    }
}
