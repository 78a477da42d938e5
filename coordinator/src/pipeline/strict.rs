//! Strict verification (`--verify strict`): every hop runs on two peers that hold the same
//! blocks, and a step's output moves on only when both agree within tolerance, so no
//! corrupted hidden state or token ever reaches the next hop or the client. When they
//! disagree a third peer replays the hop's history and runs the step; the one it agrees with
//! goes on and the other is quarantined. With no third peer, or no majority, the step fails
//! rather than release a token nobody vouches for.

use super::{check_hop, exchange, never_busy, Hop, PipelineError, RemotePipeline};
use crate::compare::{compare, tolerance, Verdict};
use potluck_protocol::messages::{StageForward, StageResult};
use std::time::Duration;

/// Times a hop looks for a working twin before the step fails.
const TWIN_ATTEMPTS: usize = 3;

impl RemotePipeline {
    /// A fresh hop on another peer holding hop `i`'s blocks (none of `not`), its history
    /// replayed: a twin, or with `disputants` a peer fit to settle their dispute; `None`
    /// when the pool has no such peer now.
    async fn replica_of(
        &mut self,
        i: usize,
        not: &[libp2p::PeerId],
        disputants: Option<&[libp2p::PeerId]>,
        timeout: Duration,
    ) -> Result<Option<Hop>, PipelineError> {
        let Some(reroute) = self.pool.clone() else {
            return Ok(None);
        };
        let range = self.hops[i].span.range;
        let last = i + 1 == self.hops.len();
        let mut avoid: Vec<libp2p::PeerId> = not.to_vec();
        avoid.extend(self.avoid.iter().copied());
        let journal = self.hops[i].journal.clone();
        for _ in 0..TWIN_ATTEMPTS {
            let found = match disputants {
                None => reroute.twin(range, &avoid),
                Some(d) => reroute.decider(range, &avoid, d),
            };
            let Some((span, peer)) = found else {
                return Ok(None);
            };
            avoid.push(peer);
            // Opened and replayed like any replacement of the hop.
            match self
                .replacement(vec![(span, peer)], &journal, last, timeout)
                .await
            {
                Ok(mut hops) => {
                    if let Some(hop) = hops.pop() {
                        return Ok(Some(hop));
                    }
                }
                Err(e) => tracing::debug!(%peer, "twin could not be brought up to date: {e}"),
            }
        }
        Ok(None)
    }

    /// Runs `req` on hop `i` and on its twin (found and brought up to date first) and
    /// returns the result they agree on.
    pub(super) async fn call_strict(
        &mut self,
        i: usize,
        req: &StageForward,
        timeout: Duration,
    ) -> Result<Box<StageResult>, PipelineError> {
        let range = self.hops[i].span.range;
        let no_twin = |why: &str| PipelineError::Disputed {
            start: range.start,
            end: range.end,
            why: why.to_string(),
        };
        let last = i + 1 == self.hops.len();
        for _ in 0..TWIN_ATTEMPTS {
            let mut twin = match self.hops[i].twin.take() {
                Some(t) => *t,
                None => {
                    let primary = self.hops[i].peer;
                    match self.replica_of(i, &[primary], None, timeout).await? {
                        Some(t) => t,
                        None => return Err(no_twin("no second node holds these blocks")),
                    }
                }
            };
            let (model, audit) = (self.model.clone(), self.audit.clone());
            let (mine, theirs) = tokio::join!(self.call(i, req, timeout), async {
                let r = exchange(&mut twin, req, timeout, &never_busy).await?;
                check_hop(&model, audit.as_ref(), &twin, last, req, &r)?;
                Ok::<_, PipelineError>(r)
            });
            let mine = mine?;
            let theirs = match theirs {
                Ok(r) => r,
                Err(e) => {
                    // The twin failed, not disagreed: find another.
                    tracing::debug!(peer = %twin.peer, "twin failed: {e}");
                    self.avoid.insert(twin.peer);
                    continue;
                }
            };
            let agree = |a: &StageResult, b: &StageResult| {
                let tol = tolerance(&a.receipt.body.numeric, &b.receipt.body.numeric);
                compare(&a.output, &b.output, &tol).0.verdict == Verdict::Pass
            };
            if agree(&mine, &theirs) {
                twin.journal.push(req.clone());
                self.hops[i].twin = Some(Box::new(twin));
                self.metrics.check("strict_agree");
                return Ok(mine);
            }
            // A third peer decides.
            self.metrics.check("strict_dispute");
            let primary = self.hops[i].peer;
            let disputants = [primary, twin.peer];
            let Some(mut third) = self
                .replica_of(i, &disputants, Some(&disputants), timeout)
                .await?
            else {
                return Err(no_twin(
                    "the two nodes disagree and no third holds these blocks",
                ));
            };
            let decider = exchange(&mut third, req, timeout, &never_busy).await?;
            check_hop(
                &self.model,
                self.audit.as_ref(),
                &third,
                last,
                req,
                &decider,
            )?;
            third.journal.push(req.clone());
            let reroute = self.pool.clone();
            let loser = if agree(&mine, &decider) {
                let loser = twin.peer;
                self.hops[i].twin = Some(Box::new(third));
                (loser, mine)
            } else if agree(&theirs, &decider) {
                let loser = primary;
                twin.journal.push(req.clone());
                let old = std::mem::replace(&mut self.hops[i], twin);
                self.hops[i].twin = Some(Box::new(third));
                drop(old);
                (loser, theirs)
            } else {
                return Err(no_twin("three nodes gave three different results"));
            };
            if let Some(r) = reroute {
                r.disputed(loser.0, "its result disagreed with two other nodes'");
            }
            self.avoid.insert(loser.0);
            return Ok(loser.1);
        }
        Err(no_twin("no second node answered"))
    }
}
