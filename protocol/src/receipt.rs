//! Making and checking stage receipts: a node signs what it computed (job, input, output,
//! model, layers, numeric class) so anyone can check the claim offline against its key.

use crate::codec::encode_body;
use crate::error::Result;
use crate::messages::{
    Receipt, ReceiptBody, StageForward, StageInputWire, StageOutputWire, WorkOutput, WorkRequest,
    RECEIPT_DOMAIN,
};
use crate::signed::{digest, Digest, Keypair};
use serde::Serialize;

/// blake3 of a value's encoding: the content id of jobs, inputs and outputs.
pub fn content_id<T: Serialize>(value: &T) -> Result<Digest> {
    Ok(digest(&encode_body(value)?))
}

impl Receipt {
    /// Signs `body` with `key`.
    pub fn sign(body: ReceiptBody, key: &Keypair) -> Result<Self> {
        let signature = key.sign(RECEIPT_DOMAIN, &encode_body(&body)?);
        Ok(Self {
            body,
            signer: key.public(),
            signature,
        })
    }

    /// Checks the signature over the body.
    pub fn verify(&self) -> Result<()> {
        self.signer
            .verify(RECEIPT_DOMAIN, &encode_body(&self.body)?, &self.signature)
    }
}

/// Content id of a stage input: of the token ids, or of the hidden-state tensor, so that a
/// stage's output id equals the next stage's input id and chains can be checked hop by hop.
pub fn input_id(input: &StageInputWire) -> Result<Digest> {
    match input {
        StageInputWire::Tokens(t) => content_id(t),
        StageInputWire::Hidden(h) => content_id(h),
    }
}

/// Content id of a stage output (see [`input_id`]).
pub fn output_id(output: &StageOutputWire) -> Result<Digest> {
    match output {
        StageOutputWire::Hidden(h) => content_id(h),
        StageOutputWire::Token {
            token,
            logprob,
            top,
        } => content_id(&(token, logprob, top)),
    }
}

/// The ids a work unit's receipt vouches for: (job, input, output). The job is the unit and
/// model, the input its task.
pub fn work_ids(req: &WorkRequest, output: &WorkOutput) -> Result<(Digest, Digest, Digest)> {
    Ok((
        content_id(&(req.unit, &req.model))?,
        content_id(&req.task)?,
        content_id(output)?,
    ))
}

/// Content id of a request's job: everything but its input.
pub fn job_id(req: &StageForward) -> Result<Digest> {
    content_id(&(req.session, req.step, req.position, &req.sample))
}
