//! One session's chain of stages across peers: a long-lived stream to each span's peer,
//! requests sent hop by hop from the coordinator (Petals' client-driven pipeline), every
//! result verified before its output moves on, and every stage's inputs and receipts kept
//! for replay and later checks.

use crate::planner::Span;
use crate::verify::{check_result, Expected, ResultRejection};
use libp2p::{PeerId, Stream, StreamProtocol};
use potluck_engine::generate::TokenSource;
use potluck_engine::sampling::SamplingParams;
use potluck_engine::EngineError;
use potluck_protocol::codec::MAX_FRAME;
use potluck_protocol::messages::{
    Message, Receipt, SampleSpec, StageForward, StageInputWire, StageOutputWire, StageResult,
};
use potluck_protocol::signed::Digest;
use potluck_protocol::stream::{read_frame_async, write_frame_async, STAGE_PROTOCOL};
use std::time::Duration;
use thiserror::Error;

/// Base time a stage gets to answer a step.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time per input position (prefill of long prompts on slow peers).
pub const STEP_TIMEOUT_PER_POSITION: Duration = Duration::from_millis(20);

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
    /// The peer did not answer in time, closed the stream, or sent an unreadable frame.
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
    #[error("stage on {peer} refused: {reason}")]
    Refused {
        /// The peer.
        peer: PeerId,
        /// Its error.
        reason: String,
    },
    /// The chain has no last stage (an empty or truncated route).
    #[error("the chain ended without a token")]
    NoToken,
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

/// One hop: a span, its peer, and the session's stream to it.
struct Hop {
    span: Span,
    peer: PeerId,
    stream: Stream,
    /// Every request this hop was sent, in order: its inputs, for replay and spot checks.
    journal: Vec<StageForward>,
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

/// A session's pipeline across peers.
pub struct RemotePipeline {
    hops: Vec<Hop>,
    session: u64,
    step: u64,
    model: ChainModel,
    sampling: SamplingParams,
    receipts: Vec<Receipt>,
    runtime: tokio::runtime::Handle,
    misbehaving: Option<(PeerId, String)>,
}

impl RemotePipeline {
    /// Opens a stream to every span of `chain` (with its peer id), in order.
    pub async fn open(
        control: &mut libp2p_stream::Control,
        chain: Vec<(Span, PeerId)>,
        session: u64,
        model: ChainModel,
        sampling: SamplingParams,
    ) -> Result<Self, PipelineError> {
        let mut hops = Vec::with_capacity(chain.len());
        for (span, peer) in chain {
            let stream = tokio::time::timeout(
                STEP_TIMEOUT,
                control.open_stream(peer, StreamProtocol::new(STAGE_PROTOCOL)),
            )
            .await
            .map_err(|_| PipelineError::Unreachable {
                peer,
                reason: "timed out".into(),
            })?
            .map_err(|e| PipelineError::Unreachable {
                peer,
                reason: e.to_string(),
            })?;
            hops.push(Hop {
                span,
                peer,
                stream,
                journal: Vec::new(),
            });
        }
        Ok(Self {
            hops,
            session,
            step: 0,
            model,
            sampling,
            receipts: Vec::new(),
            runtime: tokio::runtime::Handle::current(),
            misbehaving: None,
        })
    }

    /// The peer whose bad frame or unverifiable result ended the session, and why.
    pub fn misbehaving(&self) -> Option<&(PeerId, String)> {
        self.misbehaving.as_ref()
    }

    /// Every verified receipt so far, hop by hop and step by step.
    pub fn receipts(&self) -> &[Receipt] {
        &self.receipts
    }

    /// The requests each hop was sent, first hop first.
    pub fn journals(&self) -> Vec<&[StageForward]> {
        self.hops.iter().map(|h| h.journal.as_slice()).collect()
    }

    /// How the last stage should pick this step's token.
    fn sample_spec(&self, history: &[u32]) -> SampleSpec {
        let p = &self.sampling;
        SampleSpec {
            temperature: p.temperature,
            top_k: p.top_k as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            // A fresh draw per step, reproducible from the session's seed.
            seed: p.seed ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            top_logprobs: 0,
            history: if p.repetition_penalty == 1.0 {
                Vec::new()
            } else {
                history[history.len().saturating_sub(p.penalty_window)..].to_vec()
            },
        }
    }

    /// Runs one step through every hop and returns the sampled token.
    pub async fn step(
        &mut self,
        pos: usize,
        tokens: &[u32],
        history: &[u32],
    ) -> Result<u32, PipelineError> {
        let sample = self.sample_spec(history);
        let last = self.hops.len().saturating_sub(1);
        let timeout = STEP_TIMEOUT + STEP_TIMEOUT_PER_POSITION * tokens.len() as u32;
        let mut input = StageInputWire::Tokens(tokens.to_vec());
        for (i, hop) in self.hops.iter_mut().enumerate() {
            let req = StageForward {
                session: self.session,
                step: self.step,
                position: pos as u32,
                input,
                sample: (i == last).then(|| sample.clone()),
            };
            let peer = hop.peer;
            let stage_err = |reason: String| PipelineError::Stage { peer, reason };
            let answer = tokio::time::timeout(timeout, async {
                write_frame_async(&mut hop.stream, &Message::Forward(req.clone()))
                    .await
                    .map_err(|e| stage_err(e.to_string()))?;
                read_frame_async::<Message>(&mut hop.stream, MAX_FRAME)
                    .await
                    .map_err(|why| PipelineError::BadFrame { peer, why })
            })
            .await
            .map_err(|_| stage_err(format!("no answer within {timeout:?}")))??;
            let result = match answer {
                Some(Message::Result(r)) => r,
                Some(Message::Error(e)) => {
                    return Err(PipelineError::Refused {
                        peer,
                        reason: format!("{:?}: {}", e.code, e.message),
                    })
                }
                Some(_) => return Err(stage_err("answered with a non-result".into())),
                None => return Err(stage_err("closed the stream".into())),
            };
            let want = Expected {
                signer: &hop.span.peer,
                model: &self.model.digest,
                layers: hop.span.range,
                last: i == last,
                hidden: self.model.hidden,
                vocab: self.model.vocab,
            };
            check_result(&req, &result, &want)
                .map_err(|why| PipelineError::Rejected { peer, why })?;
            hop.journal.push(req);
            let StageResult {
                output, receipt, ..
            } = *result;
            self.receipts.push(receipt);
            match output {
                StageOutputWire::Hidden(h) => input = StageInputWire::Hidden(h),
                StageOutputWire::Token { token, .. } => {
                    self.step += 1;
                    return Ok(token);
                }
            }
        }
        Err(PipelineError::NoToken)
    }

    /// Ends the session: closes every stream so each node frees the session's cache.
    pub async fn close(mut self) {
        use futures::AsyncWriteExt;
        for hop in &mut self.hops {
            let _ = hop.stream.close().await;
        }
    }
}

impl TokenSource for RemotePipeline {
    fn context(&self) -> usize {
        self.model.context
    }

    fn next_token(
        &mut self,
        pos: usize,
        input: &[u32],
        history: &[u32],
    ) -> potluck_engine::error::Result<u32> {
        let runtime = self.runtime.clone();
        runtime
            .block_on(self.step(pos, input, history))
            .map_err(|e| {
                if let Some(peer) = e.misbehaving_peer() {
                    self.misbehaving = Some((peer, e.to_string()));
                }
                EngineError::Pipeline(e.to_string())
            })
    }
}
