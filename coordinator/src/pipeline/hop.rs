//! One hop of a session's chain: its stream to a span's peer, one request and its answer
//! on it, the check of each result, and what a spot check later replays of its work.

use super::error::PipelineError;
use crate::audit::{receipt_hex, AuditLog, Record};
use crate::planner::Span;
use crate::verify::{check_result, Expected};
use libp2p::{PeerId, Stream};
use potluck_net::streams::PoolStreams;
use potluck_protocol::codec::MAX_FRAME;
use potluck_protocol::messages::{Message, StageForward, StageResult};
use potluck_protocol::signed::Digest;
use potluck_protocol::stream::{read_frame_async, write_frame_async, Channel};
use potluck_protocol::ProtocolError;
use std::time::Duration;

/// Base time a stage gets to answer a step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time per input position (prefill of long prompts on slow peers).
pub const STEP_TIMEOUT_PER_POSITION: Duration = Duration::from_millis(20);

/// Longest a step waits on a node that is busy (its connection answers pings) rather than
/// gone; past it the node counts as failed for the step.
pub const BUSY_PATIENCE: Duration = Duration::from_secs(300);

/// A `busy` answer for [`exchange`] that never waits past the step timeout.
pub(crate) fn never_busy(_: PeerId) -> bool {
    false
}

/// How long a stage gets to answer a request of `positions` input positions.
pub fn step_timeout(positions: usize) -> Duration {
    STEP_TIMEOUT + STEP_TIMEOUT_PER_POSITION * positions.min(u32::MAX as usize) as u32
}

/// What a session needs to know about the model.
#[derive(Debug, Clone)]
pub struct ChainModel {
    /// The model's digest.
    pub digest: Digest,
    /// Hidden width.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Context window.
    pub context: usize,
}

/// One hop: a span, its peer, and the session's stream to it.
pub(crate) struct Hop {
    pub(crate) span: Span,
    pub(crate) peer: PeerId,
    /// The peer as a metrics label.
    pub(crate) label: String,
    pub(crate) stream: Stream,
    /// Every request this hop was sent, in order: its inputs, for replay and spot checks.
    pub(crate) journal: Vec<StageForward>,
    /// Its results, kept when its work in this session is to be spot-checked.
    pub(crate) picked: Vec<StageResult>,
    /// Whether its work in this session is checked (decided at its first result).
    pub(crate) checked: Option<bool>,
    /// Strict mode: the same blocks on a second peer, sent every request this hop is.
    pub(crate) twin: Option<Box<Hop>>,
}

/// A peer's work for one session on one span (a job), to be checked whole.
#[derive(Debug, Clone)]
pub struct CheckJob {
    /// The checked span.
    pub span: Span,
    /// The checked peer.
    pub peer: PeerId,
    /// Whether the span ends the model (its results are tokens).
    pub last: bool,
    /// The hop's requests, in order, up to the last picked one.
    pub journal: Vec<StageForward>,
    /// The results to compare, in step order (each answers the journal entry of its step).
    pub picked: Vec<StageResult>,
}

impl CheckJob {
    /// The same job under session id `session`: replayed so, it cannot be told from new work
    /// (nor linked to the session it came from).
    pub fn under_session(&self, session: u64) -> Self {
        let mut job = self.clone();
        for r in &mut job.journal {
            r.session = session;
        }
        for p in &mut job.picked {
            p.session = session;
        }
        job
    }
}

/// Checks `result` as hop `hop`'s answer to `req` (`last`: the hop ends the model) and
/// records the verdict, with the node's receipt, in `audit`.
pub(crate) fn check_hop(
    model: &ChainModel,
    audit: Option<&AuditLog>,
    hop: &Hop,
    last: bool,
    req: &StageForward,
    result: &StageResult,
) -> Result<(), PipelineError> {
    let want = Expected {
        signer: &hop.span.peer,
        model: &model.digest,
        layers: hop.span.range,
        last,
        hidden: model.hidden,
        vocab: model.vocab,
    };
    let outcome = check_result(req, result, &want);
    if let Some(audit) = audit {
        audit.record(Record::Result {
            peer: hop.label.clone(),
            session: req.session,
            step: req.step,
            verdict: if outcome.is_ok() {
                "verified"
            } else {
                "rejected"
            }
            .into(),
            detail: outcome
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            receipt: Some(receipt_hex(&result.receipt)),
        });
    }
    outcome.map_err(|why| PipelineError::Rejected {
        peer: hop.peer,
        why,
    })
}

/// Opens a stage stream to `peer`.
pub(crate) async fn open_stream(
    control: &mut PoolStreams,
    peer: PeerId,
) -> Result<Stream, PipelineError> {
    tokio::time::timeout(STEP_TIMEOUT, control.open(peer, Channel::Stage))
        .await
        .map_err(|_| PipelineError::Unreachable {
            peer,
            reason: "timed out".into(),
        })?
        .map_err(|reason| PipelineError::Unreachable { peer, reason })
}

/// One request and its answer on `hop`'s stream, unchecked. A stream that breaks or ends
/// is a [`PipelineError::Stage`]; bytes that are not protocol are a
/// [`PipelineError::BadFrame`].
pub(crate) async fn exchange(
    hop: &mut Hop,
    req: &StageForward,
    timeout: Duration,
    busy: &(dyn Fn(PeerId) -> bool + Sync),
) -> Result<Box<StageResult>, PipelineError> {
    let peer = hop.peer;
    let stage_err = |reason: String| PipelineError::Stage { peer, reason };
    let timed_out = |after| PipelineError::Timeout { peer, after };
    tokio::time::timeout(
        timeout,
        write_frame_async(&mut hop.stream, &Message::Forward(req.clone())),
    )
    .await
    .map_err(|_| timed_out(timeout))?
    .map_err(|e| stage_err(e.to_string()))?;
    let read = read_frame_async::<Message>(&mut hop.stream, MAX_FRAME);
    tokio::pin!(read);
    // A node whose queue is long answers late but still answers its pings: it is waited
    // for, a timeout at a time, up to [`BUSY_PATIENCE`]; a silent one times out.
    let mut waited = Duration::ZERO;
    let answer = loop {
        match tokio::time::timeout(timeout, &mut read).await {
            Ok(answer) => break answer,
            Err(_) => {
                waited += timeout;
                if waited >= BUSY_PATIENCE || !busy(peer) {
                    return Err(timed_out(waited));
                }
            }
        }
    }
    .map_err(|why| match why {
        ProtocolError::Truncated(_) => stage_err(why.to_string()),
        why => PipelineError::BadFrame { peer, why },
    })?;
    match answer {
        Some(Message::Result(r)) => Ok(r),
        Some(Message::Error(e)) => Err(PipelineError::Refused {
            peer,
            code: e.code,
            reason: e.message,
        }),
        Some(_) => Err(stage_err("answered with a non-result".into())),
        None => Err(stage_err("closed the stream".into())),
    }
}
