//! Ed25519 signatures over blake3 digests: identities, signed envelopes, and content ids.
//! A signature covers `blake3(domain || body)`, where the domain names what is signed, so a
//! signature made for one kind of message can never be replayed as another.

use crate::codec::{decode_body, encode_body};
use crate::error::{ProtocolError, Result};
use ed25519_dalek::Signer;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A blake3 digest: content ids of inputs, outputs, jobs and model files.
pub type Digest = [u8; 32];

/// blake3 of some bytes.
pub fn digest(bytes: &[u8]) -> Digest {
    *blake3::hash(bytes).as_bytes()
}

/// A peer's ed25519 public key (its libp2p PeerId is derived from the same key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

/// An ed25519 signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl Serialize for Signature {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bytes: Vec<u8> = serde::Deserialize::deserialize(d)?;
        let arr: [u8; 64] = bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("a signature is 64 bytes"))?;
        Ok(Signature(arr))
    }
}

/// A signing identity: the secret half of a peer's key.
pub struct Keypair {
    key: ed25519_dalek::SigningKey,
}

impl Keypair {
    /// The keypair whose secret is these 32 bytes.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        Self {
            key: ed25519_dalek::SigningKey::from_bytes(secret),
        }
    }

    /// The secret bytes, for storing the identity.
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }

    /// Signs `blake3(domain || body)`.
    pub fn sign(&self, domain: &str, body: &[u8]) -> Signature {
        Signature(self.key.sign(&signed_digest(domain, body)).to_bytes())
    }
}

fn signed_digest(domain: &str, body: &[u8]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&(domain.len() as u32).to_le_bytes());
    h.update(domain.as_bytes());
    h.update(body);
    *h.finalize().as_bytes()
}

impl PublicKey {
    /// Checks `sig` over `blake3(domain || body)`.
    pub fn verify(&self, domain: &str, body: &[u8], sig: &Signature) -> Result<()> {
        let key = ed25519_dalek::VerifyingKey::from_bytes(&self.0)
            .map_err(|_| ProtocolError::BadSignature("invalid public key"))?;
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        key.verify_strict(&signed_digest(domain, body), &sig)
            .map_err(|_| ProtocolError::BadSignature("does not verify"))
    }
}

/// A message with its signer and signature. The body stays encoded so the bytes that were
/// signed are the bytes that are checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// Who signed.
    pub signer: PublicKey,
    /// The encoded message.
    pub body: Vec<u8>,
    /// Signature over `blake3(domain || body)`.
    pub signature: Signature,
}

impl Signed {
    /// Encodes and signs `value` under `domain`.
    pub fn sign<T: Serialize>(value: &T, domain: &str, key: &Keypair) -> Result<Self> {
        let body = encode_body(value)?;
        let signature = key.sign(domain, &body);
        Ok(Self {
            signer: key.public(),
            body,
            signature,
        })
    }

    /// Checks the signature under `domain`, then decodes the body.
    pub fn verify<T: DeserializeOwned>(&self, domain: &str) -> Result<T> {
        self.signer.verify(domain, &self.body, &self.signature)?;
        decode_body(&self.body)
    }
}
