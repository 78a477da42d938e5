//! Pool membership: a private pool is named by its pool key, and that key signs certificates
//! that admit a member's key with a role until an expiry, and revocations that withdraw them.
//! Anyone can check a certificate offline against the pool's key; nothing here needs a
//! network or a clock of its own (the caller passes the time).

use crate::codec::{decode_body, encode_body};
use crate::hex::{from_hex, to_hex};
use crate::signed::{Keypair, PublicKey, Signature};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Signature domain of membership certificates that name no operator (the first layout,
/// still issued for them so that older tools read them).
pub const CERTIFICATE_DOMAIN: &str = "potluck/membership/v1";
/// Signature domain of membership certificates that name their operator.
pub const CERTIFICATE_DOMAIN_V2: &str = "potluck/membership/v2";
/// Signature domain of revocations.
pub const REVOCATION_DOMAIN: &str = "potluck/revocation/v1";
/// How a certificate without an operator starts in its text form.
const TEXT_PREFIX: &str = "potluck-cert-1:";
/// How a certificate naming its operator starts in its text form.
const TEXT_PREFIX_V2: &str = "potluck-cert-2:";
/// Longest text form accepted (a certificate is a few hundred bytes).
const MAX_TEXT: usize = 4096;
/// Longest pool name.
pub const MAX_POOL_NAME: usize = 64;
/// Longest operator name.
pub const MAX_OPERATOR: usize = 64;

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Runs work and uses the pool.
    Member,
    /// Also administers it (invites, revokes).
    Admin,
    /// A member trusted with text: it may run the first and last stages of a pool that
    /// keeps those to trusted members.
    Trusted,
}

impl Role {
    /// Whether it may see a pool's text (the first and last stages, whole work units) where
    /// the pool keeps text to trusted members.
    pub fn sees_text(self) -> bool {
        matches!(self, Role::Admin | Role::Trusted)
    }

    /// Its name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Trusted => "trusted",
        }
    }
}

/// What a certificate claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The pool's key: the pool's identity.
    pub pool: PublicKey,
    /// The pool's name, for people.
    pub pool_name: String,
    /// The member's key (a node's or a user's identity key).
    pub member: PublicKey,
    /// What the member may do.
    pub role: Role,
    /// Unix seconds it was issued.
    pub issued_at: u64,
    /// Unix seconds after which it is void; `None`: until revoked.
    pub expires_at: Option<u64>,
    /// Number of this certificate within the pool, for revocation.
    pub serial: u64,
    /// Who runs the member's machine, as the pool's admin knows them (a person, a lab, a
    /// company): several machines of one operator count as one voice in batch quorums and
    /// checks. `None`: the pool does not say, and the peer's network stands in.
    pub operator: Option<String>,
}

/// The fields of a certificate from before operators, in their order: what certificates
/// without an operator are signed over and written as, so that those issued earlier still
/// verify and older tools still read new ones.
type MembershipV1 = (PublicKey, String, PublicKey, Role, u64, Option<u64>, u64);

impl Membership {
    fn v1(&self) -> MembershipV1 {
        (
            self.pool,
            self.pool_name.clone(),
            self.member,
            self.role,
            self.issued_at,
            self.expires_at,
            self.serial,
        )
    }

    fn from_v1(v: MembershipV1) -> Self {
        let (pool, pool_name, member, role, issued_at, expires_at, serial) = v;
        Self {
            pool,
            pool_name,
            member,
            role,
            issued_at,
            expires_at,
            serial,
            operator: None,
        }
    }

    /// The signature's domain and the bytes it covers.
    fn signed_bytes(&self) -> Result<(&'static str, Vec<u8>), MembershipError> {
        Ok(match &self.operator {
            None => (
                CERTIFICATE_DOMAIN,
                encode_body(&self.v1()).map_err(malformed)?,
            ),
            Some(_) => (CERTIFICATE_DOMAIN_V2, encode_body(self).map_err(malformed)?),
        })
    }
}

/// A membership certificate: the claims and the pool key's signature over them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    /// The claims.
    pub body: Membership,
    /// The pool key's signature over the encoded claims.
    pub signature: Signature,
}

/// A pool's withdrawal of one certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The pool.
    pub pool: PublicKey,
    /// The certificate's serial.
    pub serial: u64,
    /// Unix seconds it was revoked.
    pub revoked_at: u64,
    /// The pool key's signature over (pool, serial, revoked_at).
    pub signature: Signature,
}

/// Why a certificate does not admit its holder.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MembershipError {
    /// The text or bytes are not a certificate.
    #[error("not a certificate: {0}")]
    Malformed(String),
    /// It is for another pool.
    #[error("the certificate is for pool {0}, not this one")]
    WrongPool(String),
    /// It names another key than the one presenting it.
    #[error("the certificate names another member key")]
    WrongMember,
    /// The pool key did not sign it.
    #[error("the certificate's signature does not verify (forged or altered)")]
    Forged,
    /// Its time is up.
    #[error("the certificate expired at {0}")]
    Expired(u64),
    /// Issued in the future (a clock far off, or a forgery).
    #[error("the certificate is issued in the future ({0})")]
    NotYetValid(u64),
    /// The pool withdrew it.
    #[error("the certificate (serial {0}) was revoked")]
    Revoked(u64),
}

/// Clock slack allowed for issue times a little ahead of the checker's clock.
const CLOCK_SLACK: u64 = 300;

fn malformed(e: impl std::fmt::Display) -> MembershipError {
    MembershipError::Malformed(e.to_string())
}

impl Certificate {
    /// Signs `body` with the pool key (whose public half must be `body.pool`).
    pub fn issue(pool_key: &Keypair, body: Membership) -> Result<Self, MembershipError> {
        if pool_key.public() != body.pool {
            return Err(MembershipError::WrongPool(to_hex(&body.pool.0)));
        }
        if body.pool_name.is_empty() || body.pool_name.len() > MAX_POOL_NAME {
            return Err(malformed(format!(
                "a pool name must have 1 to {MAX_POOL_NAME} bytes"
            )));
        }
        if let Some(op) = &body.operator {
            if op.trim().is_empty() || op.len() > MAX_OPERATOR || op.chars().any(char::is_control) {
                return Err(malformed(format!(
                    "an operator name must have 1 to {MAX_OPERATOR} bytes and no control characters"
                )));
            }
        }
        let (domain, bytes) = body.signed_bytes()?;
        let signature = pool_key.sign(domain, &bytes);
        Ok(Self { body, signature })
    }

    /// Whether it admits `member` to `pool` at unix time `now`, given the pool's
    /// `revoked` serials; the member's role if so.
    pub fn admits(
        &self,
        pool: &PublicKey,
        member: &PublicKey,
        now: u64,
        revoked: &[u64],
    ) -> Result<Role, MembershipError> {
        let b = &self.body;
        if &b.pool != pool {
            return Err(MembershipError::WrongPool(to_hex(&b.pool.0)));
        }
        let (domain, bytes) = b.signed_bytes()?;
        pool.verify(domain, &bytes, &self.signature)
            .map_err(|_| MembershipError::Forged)?;
        if &b.member != member {
            return Err(MembershipError::WrongMember);
        }
        if b.issued_at > now + CLOCK_SLACK {
            return Err(MembershipError::NotYetValid(b.issued_at));
        }
        if let Some(at) = b.expires_at.filter(|at| *at <= now) {
            return Err(MembershipError::Expired(at));
        }
        if revoked.contains(&b.serial) {
            return Err(MembershipError::Revoked(b.serial));
        }
        Ok(b.role)
    }

    /// Its text form, for command lines and files (the first layout when it names no
    /// operator).
    pub fn to_text(&self) -> Result<String, MembershipError> {
        Ok(match &self.body.operator {
            None => format!(
                "{TEXT_PREFIX}{}",
                to_hex(&encode_body(&(self.body.v1(), &self.signature)).map_err(malformed)?)
            ),
            Some(_) => format!(
                "{TEXT_PREFIX_V2}{}",
                to_hex(&encode_body(self).map_err(malformed)?)
            ),
        })
    }

    /// Reads the text form (surrounding whitespace allowed).
    pub fn from_text(text: &str) -> Result<Self, MembershipError> {
        let text = text.trim();
        if text.len() > MAX_TEXT {
            return Err(malformed(format!("over {MAX_TEXT} characters")));
        }
        let hex = |h: &str| from_hex(h).ok_or_else(|| malformed("not hex"));
        if let Some(h) = text.strip_prefix(TEXT_PREFIX) {
            let (body, signature): (MembershipV1, Signature) =
                decode_body(&hex(h)?).map_err(malformed)?;
            return Ok(Self {
                body: Membership::from_v1(body),
                signature,
            });
        }
        let h = text.strip_prefix(TEXT_PREFIX_V2).ok_or_else(|| {
            malformed(format!(
                "it does not start with {TEXT_PREFIX} or {TEXT_PREFIX_V2}"
            ))
        })?;
        let cert: Self = decode_body(&hex(h)?).map_err(malformed)?;
        if cert.body.operator.is_none() {
            return Err(malformed("a second-layout certificate without an operator"));
        }
        Ok(cert)
    }
}

impl Revocation {
    /// The pool key's withdrawal of certificate `serial` at `now`.
    pub fn issue(pool_key: &Keypair, serial: u64, now: u64) -> Result<Self, MembershipError> {
        let pool = pool_key.public();
        let bytes = encode_body(&(pool, serial, now)).map_err(malformed)?;
        Ok(Self {
            pool,
            serial,
            revoked_at: now,
            signature: pool_key.sign(REVOCATION_DOMAIN, &bytes),
        })
    }

    /// Whether the pool key `pool` signed it.
    pub fn verify(&self, pool: &PublicKey) -> Result<(), MembershipError> {
        if &self.pool != pool {
            return Err(MembershipError::WrongPool(to_hex(&self.pool.0)));
        }
        let bytes = encode_body(&(self.pool, self.serial, self.revoked_at)).map_err(malformed)?;
        pool.verify(REVOCATION_DOMAIN, &bytes, &self.signature)
            .map_err(|_| MembershipError::Forged)
    }
}

/// What a peer presents on connecting, before it is served anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The pool it means to be in: a public pool's name or a private pool's id (hex).
    pub pool: String,
    /// Its certificate for that pool (none in a public pool).
    pub certificate: Option<Certificate>,
}

/// The answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Admission {
    /// Why the peer is refused; `None`: admitted.
    pub refused: Option<String>,
    /// The withdrawals the answering peer knows of, so that a member learns them on
    /// connecting and refuses revoked peers too.
    pub revocations: Vec<Revocation>,
}

/// What a private pool's folder records besides its key (`pool.json`): written by `potluck
/// pool`, read by a coordinator that watches it for revocations.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PoolRecord {
    /// The pool's name.
    pub name: String,
    /// Its id: the pool key's public half, hex.
    pub id: String,
    /// The serial the next certificate gets.
    pub next_serial: u64,
    /// Withdrawn certificates.
    pub revocations: Vec<Revocation>,
}

/// The file in a pool's folder holding its [`PoolRecord`].
pub const POOL_RECORD_FILE: &str = "pool.json";

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Keypair {
        Keypair::from_secret(&[seed; 32])
    }

    fn body(pool: &Keypair, member: &Keypair, expires_at: Option<u64>) -> Membership {
        Membership {
            pool: pool.public(),
            pool_name: "lab".into(),
            member: member.public(),
            role: Role::Member,
            issued_at: 1_000,
            expires_at,
            serial: 7,
            operator: None,
        }
    }

    #[test]
    fn a_certificate_admits_its_member_until_it_expires_or_is_revoked() {
        let (pool, alice, bob) = (key(1), key(2), key(3));
        let cert = Certificate::issue(&pool, body(&pool, &alice, Some(2_000))).unwrap();
        let cert = Certificate::from_text(&format!("  {}\n", cert.to_text().unwrap())).unwrap();
        let p = pool.public();
        assert_eq!(
            cert.admits(&p, &alice.public(), 1_500, &[]),
            Ok(Role::Member)
        );
        assert_eq!(
            cert.admits(&p, &bob.public(), 1_500, &[]),
            Err(MembershipError::WrongMember)
        );
        assert_eq!(
            cert.admits(&p, &alice.public(), 2_000, &[]),
            Err(MembershipError::Expired(2_000))
        );
        assert_eq!(
            cert.admits(&p, &alice.public(), 1_500, &[7]),
            Err(MembershipError::Revoked(7))
        );
        assert!(matches!(
            cert.admits(&key(9).public(), &alice.public(), 1_500, &[]),
            Err(MembershipError::WrongPool(_))
        ));
        assert_eq!(
            cert.admits(&p, &alice.public(), 100, &[]),
            Err(MembershipError::NotYetValid(1_000))
        );
    }

    #[test]
    fn forged_and_altered_certificates_are_refused() {
        let (pool, alice) = (key(1), key(2));
        let p = pool.public();
        // Signed by another key that claims to be the pool.
        let mut forged = Certificate::issue(&key(5), body(&key(5), &alice, None)).unwrap();
        forged.body.pool = p;
        assert_eq!(
            forged.admits(&p, &alice.public(), 1_500, &[]),
            Err(MembershipError::Forged)
        );
        // A real one with its role raised.
        let mut altered = Certificate::issue(&pool, body(&pool, &alice, None)).unwrap();
        altered.body.role = Role::Admin;
        assert_eq!(
            altered.admits(&p, &alice.public(), 1_500, &[]),
            Err(MembershipError::Forged)
        );
        // Issuing needs the pool's own key.
        assert!(Certificate::issue(&key(5), body(&pool, &alice, None)).is_err());
        for bad in [
            "",
            "potluck-cert-1:zz",
            "potluck-cert-1:abc",
            "cert",
            &"a".repeat(5000),
        ] {
            assert!(Certificate::from_text(bad).is_err(), "{bad:.20}");
        }
    }

    #[test]
    fn an_operator_is_signed_and_cannot_be_stripped_or_changed() {
        let (pool, alice) = (key(1), key(2));
        let p = pool.public();
        let plain = Certificate::issue(&pool, body(&pool, &alice, None)).unwrap();
        // Without an operator the first layout is kept, byte for byte.
        let text = plain.to_text().unwrap();
        assert!(text.starts_with(TEXT_PREFIX));
        assert_eq!(Certificate::from_text(&text).unwrap(), plain);
        let mut b = body(&pool, &alice, None);
        b.operator = Some("alice's lab".into());
        let named = Certificate::issue(&pool, b).unwrap();
        let text = named.to_text().unwrap();
        assert!(text.starts_with(TEXT_PREFIX_V2));
        let back = Certificate::from_text(&text).unwrap();
        assert_eq!(back, named);
        assert_eq!(
            back.admits(&p, &alice.public(), 1_500, &[]),
            Ok(Role::Member)
        );
        let mut stripped = named.clone();
        stripped.body.operator = None;
        let mut renamed = named.clone();
        renamed.body.operator = Some("bob".into());
        for bad in [stripped, renamed] {
            assert_eq!(
                bad.admits(&p, &alice.public(), 1_500, &[]),
                Err(MembershipError::Forged)
            );
        }
        for name in ["", " ", "a\nb", &"x".repeat(MAX_OPERATOR + 1)] {
            let mut b = body(&pool, &alice, None);
            b.operator = Some(name.into());
            assert!(Certificate::issue(&pool, b).is_err(), "{name:?}");
        }
    }

    #[test]
    fn revocations_verify_against_their_pool_only() {
        let pool = key(1);
        let r = Revocation::issue(&pool, 7, 1_700).unwrap();
        assert!(r.verify(&pool.public()).is_ok());
        assert!(r.verify(&key(2).public()).is_err());
        let mut moved = r.clone();
        moved.serial = 8;
        assert_eq!(moved.verify(&pool.public()), Err(MembershipError::Forged));
    }
}
