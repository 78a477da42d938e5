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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl std::hash::Hash for PublicKey {
    /// Hashes the key's first 8 bytes: the coordinator looks keys up on every hop of every
    /// route it weighs, and hashing a quarter of the bytes halved the simulator's hashing
    /// time at 10,000 peers. An ed25519 key's bytes are as good as uniform, and two keys
    /// sharing their first 8 take about 2^32 key generations to find, so a keyed hasher
    /// over them still keeps a flood of chosen keys out of one bucket; equality still
    /// compares all 32.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(head));
    }
}

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

    /// The libp2p peer id this key is known by, as operators read it (`12D3KooW...`): the
    /// identity multihash of the key's protobuf encoding, in base58. Written out here so the
    /// layers with no swarm (the coordinator's core, the simulator) name peers as logs do.
    pub fn peer_id(&self) -> String {
        // Multihash identity (0x00), length 36; protobuf KeyType Ed25519 (field 1 = 1), then
        // field 2, 32 bytes of key.
        let mut bytes = Vec::with_capacity(38);
        bytes.extend_from_slice(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
        bytes.extend_from_slice(&self.0);
        base58(&bytes)
    }
}

/// Bitcoin's base58 alphabet, as multiformats and libp2p write peer ids.
const BASE58: &[u8; 58] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// `bytes` in base58 (leading zero bytes as leading `1`s).
fn base58(bytes: &[u8]) -> String {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    // Digits in base 58, least significant first.
    let mut digits: Vec<u8> = Vec::with_capacity(bytes.len() * 138 / 100 + 1);
    for &b in &bytes[zeros..] {
        let mut carry = u32::from(b);
        for d in digits.iter_mut() {
            carry += u32::from(*d) << 8;
            *d = (carry % 58) as u8;
            carry /= 58;
        }
        while carry > 0 {
            digits.push((carry % 58) as u8);
            carry /= 58;
        }
    }
    let mut out = String::with_capacity(zeros + digits.len());
    out.extend(std::iter::repeat_n('1', zeros));
    out.extend(
        digits
            .iter()
            .rev()
            .map(|d| char::from(BASE58[usize::from(*d)])),
    );
    out
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
