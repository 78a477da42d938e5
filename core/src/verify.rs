//! Checks every stage result against the request that produced it before anything else
//! uses it: the echo, the signer (the peer the span was planned on), the signature, the
//! receipt's content ids, model and layers, and the output's shape and values.

use potluck_protocol::messages::{LayerRange, StageForward, StageOutputWire, StageResult};
use potluck_protocol::receipt::{input_id, job_id, output_id};
use potluck_protocol::signed::{Digest, PublicKey};
use thiserror::Error;

/// What a result must match, besides its request.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// The peer the span was planned on.
    pub signer: &'a PublicKey,
    /// The model's digest.
    pub model: &'a Digest,
    /// The span's blocks.
    pub layers: LayerRange,
    /// Whether the span ends the model (a token comes back, not hidden states).
    pub last: bool,
    /// Hidden width.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// Why a stage result was refused.
#[derive(Debug, Error, PartialEq)]
pub enum ResultRejection {
    /// Session or step differs from the request's.
    #[error("answers another request (session {session}, step {step})")]
    WrongRequest {
        /// Its session.
        session: u64,
        /// Its step.
        step: u64,
    },
    /// Signed by a key other than the planned peer's.
    #[error("receipt signed by another key")]
    WrongSigner,
    /// The signature does not verify.
    #[error("receipt signature: {0}")]
    Signature(#[from] potluck_protocol::ProtocolError),
    /// A content id in the receipt differs from the request's or the output's.
    #[error("receipt's {0} digest does not match")]
    Digest(&'static str),
    /// The receipt names another model.
    #[error("receipt names another model")]
    WrongModel,
    /// The receipt names other blocks.
    #[error("receipt covers blocks {}..{}", .0.start, .0.end)]
    WrongLayers(LayerRange),
    /// The output has the wrong kind or shape.
    #[error("bad output: {0}")]
    BadOutput(String),
}

/// Checks `res` as the answer to `req` from the span described by `want`.
pub fn check_result(
    req: &StageForward,
    res: &StageResult,
    want: &Expected<'_>,
) -> Result<(), ResultRejection> {
    if res.session != req.session || res.step != req.step {
        return Err(ResultRejection::WrongRequest {
            session: res.session,
            step: res.step,
        });
    }
    let r = &res.receipt;
    if &r.signer != want.signer {
        return Err(ResultRejection::WrongSigner);
    }
    r.verify()?;
    if r.body.job != job_id(req)? {
        return Err(ResultRejection::Digest("job"));
    }
    if r.body.input != input_id(&req.input)? {
        return Err(ResultRejection::Digest("input"));
    }
    if r.body.output != output_id(&res.output)? {
        return Err(ResultRejection::Digest("output"));
    }
    if &r.body.model != want.model {
        return Err(ResultRejection::WrongModel);
    }
    if r.body.layers != want.layers {
        return Err(ResultRejection::WrongLayers(r.body.layers));
    }
    let positions = req.input.positions();
    match (&res.output, want.last) {
        (StageOutputWire::Hidden(h), false) => {
            if h.dims() != [positions, want.hidden] {
                return Err(ResultRejection::BadOutput(format!(
                    "hidden states {:?}, expected [{positions}, {}]",
                    h.dims(),
                    want.hidden
                )));
            }
            let values = h
                .to_f32()
                .map_err(|e| ResultRejection::BadOutput(e.to_string()))?;
            if values.iter().any(|v| !v.is_finite()) {
                return Err(ResultRejection::BadOutput(
                    "hidden states hold NaN or infinity".into(),
                ));
            }
        }
        (StageOutputWire::Token { token, logprob, .. }, true) => {
            if *token as usize >= want.vocab || !(logprob.is_finite() && *logprob <= 1e-3) {
                return Err(ResultRejection::BadOutput(format!(
                    "token {token} with log-probability {logprob}"
                )));
            }
        }
        (StageOutputWire::Hidden(_), true) => {
            return Err(ResultRejection::BadOutput(
                "hidden states from the last stage".into(),
            ))
        }
        (StageOutputWire::Token { .. }, false) => {
            return Err(ResultRejection::BadOutput(
                "a token from a middle stage".into(),
            ))
        }
    }
    Ok(())
}
