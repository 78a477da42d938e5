//! Why a step through a session's chain failed, and what each failure says of the peer.

use crate::verify::ResultRejection;
use libp2p::PeerId;
use potluck_protocol::messages::ErrorCode;
use std::time::Duration;
use thiserror::Error;

/// Why a step through the chain failed.
#[derive(Debug, Error)]
pub enum PipelineError {
    /// A stream to a peer could not be opened.
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The peer.
        peer: PeerId,
        /// What failed.
        reason: String,
    },
    /// The peer did not answer in time.
    #[error("stage on {peer} gave no answer within {after:?}")]
    Timeout {
        /// The peer.
        peer: PeerId,
        /// How long it had.
        after: Duration,
    },
    /// The stream to the peer broke or closed.
    #[error("stage on {peer} failed: {reason}")]
    Stage {
        /// The peer.
        peer: PeerId,
        /// What failed.
        reason: String,
    },
    /// The peer sent a frame that is not valid protocol.
    #[error("stage on {peer} sent a bad frame: {why}")]
    BadFrame {
        /// The peer.
        peer: PeerId,
        /// What was wrong.
        why: potluck_protocol::ProtocolError,
    },
    /// The peer refused the step.
    #[error("stage on {peer} refused: {code:?}: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// Its error's kind.
        code: ErrorCode,
        /// Its error.
        reason: String,
    },
    /// The client went away; the session was ended on purpose.
    #[error("cancelled")]
    Cancelled,
    /// A hop failed and nothing in the pool can take its blocks over.
    #[error("no node can take over blocks {start}..{end} ({why}) after: {cause}")]
    NoReplacement {
        /// First block of the failed hop.
        start: u32,
        /// One past its last block.
        end: u32,
        /// Why nothing can.
        why: String,
        /// What failed.
        cause: String,
    },
    /// The chain has no last stage (an empty or truncated route).
    #[error("the chain ended without a token")]
    NoToken,
    /// Strict mode could not get two agreeing results for a hop (no token is released).
    #[error("no agreed result for blocks {start}..{end}: {why}")]
    Disputed {
        /// First block of the hop.
        start: u32,
        /// One past its last block.
        end: u32,
        /// Why.
        why: String,
    },
    /// The peer's result did not verify.
    #[error("result from {peer} rejected: {why}")]
    Rejected {
        /// The peer.
        peer: PeerId,
        /// Why.
        why: ResultRejection,
    },
}

impl PipelineError {
    /// The peer that broke the protocol or sent a result that does not verify: one to drop
    /// from the pool, unlike a peer that was merely slow, busy or gone.
    pub fn misbehaving_peer(&self) -> Option<PeerId> {
        match self {
            PipelineError::BadFrame { peer, .. } | PipelineError::Rejected { peer, .. } => {
                Some(*peer)
            }
            _ => None,
        }
    }
}

impl PipelineError {
    /// Whether another peer may succeed where this one failed. A node still full after
    /// [`OVERLOAD_PATIENCE`](super::OVERLOAD_PATIENCE) is busy, not broken: the session ends, the node stays.
    pub(super) fn worth_failing_over(&self) -> bool {
        !matches!(
            self,
            PipelineError::Cancelled
                | PipelineError::NoToken
                | PipelineError::NoReplacement { .. }
                | PipelineError::Disputed { .. }
                | PipelineError::Refused {
                    code: ErrorCode::BadRequest | ErrorCode::Overloaded,
                    ..
                }
        )
    }

    /// The peer this error is about, if any.
    pub(super) fn peer(&self) -> Option<PeerId> {
        match self {
            PipelineError::Unreachable { peer, .. }
            | PipelineError::Timeout { peer, .. }
            | PipelineError::Stage { peer, .. }
            | PipelineError::BadFrame { peer, .. }
            | PipelineError::Refused { peer, .. }
            | PipelineError::Rejected { peer, .. } => Some(*peer),
            PipelineError::Cancelled
            | PipelineError::NoToken
            | PipelineError::NoReplacement { .. }
            | PipelineError::Disputed { .. } => None,
        }
    }
}
