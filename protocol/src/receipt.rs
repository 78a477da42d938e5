//! Making and checking stage receipts: a node signs what it computed (job, input, output,
//! model, layers, numeric class) so anyone can check the claim offline against its key.

use crate::codec::encode_body;
use crate::error::Result;
use crate::messages::{Receipt, ReceiptBody, RECEIPT_DOMAIN};
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
