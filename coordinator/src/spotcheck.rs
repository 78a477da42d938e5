//! Recomputing a peer's stage results on another peer that holds the same blocks, from the
//! same committed inputs (the requests the checked peer was sent, whose digests its
//! receipts sign), so an error upstream never compounds into a false verdict downstream.
//!
//! The checker gets the requests exactly as they were sent, one by one, in a fresh session:
//! on the same kind of hardware its answers are then bit for bit the honest ones. A batched
//! replay (one prefill for the whole history) would be cheaper, but it rounds differently:
//! on SmolLM2 Q4_1 it moves hidden states by up to 2.4% and log-probabilities by up to 0.6
//! (`potluck bench --checks`), as much as some cheats would.

use crate::metrics::Metrics;
use crate::pipeline::{
    check_hop, exchange, never_busy, open_stream, step_timeout, ChainModel, CheckJob, Hop,
    PipelineError,
};
use crate::planner::Span;
use libp2p::PeerId;
use potluck_net::streams::PoolStreams;
use potluck_protocol::messages::{Receipt, StageOutputWire, StageResult};

/// The checker's version of one picked result.
#[derive(Debug, Clone)]
pub struct Reference {
    /// What the checker computed for that step.
    pub output: StageOutputWire,
    /// The checker's receipt for it.
    pub receipt: Receipt,
}

/// Recomputes `job` on `checker` (a span equal to the checked one) and returns the
/// checker's version of each picked result, in order. Each request replayed counts as
/// `recomputed` in `metrics`.
pub async fn recompute(
    control: &mut PoolStreams,
    checker: (Span, PeerId),
    job: &CheckJob,
    model: &ChainModel,
    metrics: &Metrics,
) -> Result<Vec<Reference>, PipelineError> {
    let (span, peer) = checker;
    let mut hop = Hop {
        stream: open_stream(control, peer).await?,
        label: peer.to_string(),
        span,
        peer,
        journal: Vec::new(),
        picked: Vec::new(),
        checked: Some(false),
        twin: None,
    };
    let mut refs = Vec::with_capacity(job.picked.len());
    let wanted: Vec<u64> = job.picked.iter().map(|p| p.step).collect();
    for req in &job.journal {
        metrics.check("recomputed");
        let r = exchange(
            &mut hop,
            req,
            step_timeout(req.input.positions()),
            &never_busy,
        )
        .await?;
        check_hop(model, None, &hop, job.last, req, &r)?;
        if wanted.get(refs.len()) == Some(&req.step) {
            let StageResult {
                output, receipt, ..
            } = *r;
            refs.push(Reference { output, receipt });
        }
    }
    {
        use futures::AsyncWriteExt;
        let _ = hop.stream.close().await;
    }
    if refs.len() != job.picked.len() {
        return Err(PipelineError::Stage {
            peer,
            reason: "the recomputation left a picked step out".into(),
        });
    }
    Ok(refs)
}
