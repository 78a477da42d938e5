//! Admission to a pool, checked at connection. Each side of a new connection presents a
//! [`Hello`] on the admission protocol and hears an [`Admission`]; in a private pool a peer
//! that presents no valid certificate (none, expired, forged, revoked, another pool's) is
//! told why, logged on both sides and disconnected, and nothing else it asks for is served.
//! Public pools admit anyone who says it is in the same pool; their new peers are on
//! probation through the coordinator's checks instead.

use futures::StreamExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use potluck_protocol::hex::to_hex;
use potluck_protocol::membership::{
    Admission, Certificate, Hello, MembershipError, Revocation, Role,
};
use potluck_protocol::messages::Message;
use potluck_protocol::signed::PublicKey;
use potluck_protocol::stream::{
    read_frame_async, write_frame_async, ADMIT_PROTOCOL, MAX_ADMIT_FRAME,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long a new peer has to present itself before a private pool drops it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an admitted peer whose certificate ends keeps its connection: long enough to
/// hear the gossiped revocation that ended it.
const LAST_WORD: Duration = Duration::from_secs(1);

/// Most revocations a peer keeps (and sends in an answer): far more than a community pool
/// issues, and within [`MAX_ADMIT_FRAME`].
pub const MAX_REVOCATIONS: usize = 8192;

/// Signatures of new revocations checked for one peer's lists (answers and gossip) per
/// [`REVOCATION_WINDOW`]: a whole list's worth, so an honest answer is taken in at once,
/// while a member sending forged lists over and over costs little.
pub const REVOCATION_CHECKS: usize = MAX_REVOCATIONS;

/// The window [`REVOCATION_CHECKS`] counts over.
const REVOCATION_WINDOW: Duration = Duration::from_secs(60);

/// Forged revocations remembered, so a list sent again costs no signature checks.
const FORGED_KEPT: usize = 4096;

/// Which pool a peer is in, and what it presents to join it.
#[derive(Debug, Clone)]
pub enum PoolMembership {
    /// Anyone may join; new peers are on probation through the pool's checks.
    Public {
        /// The pool's name.
        name: String,
    },
    /// Holders of a certificate signed by the pool key.
    Private {
        /// The pool key: the pool's identity.
        pool: PublicKey,
        /// The pool's name, for people.
        name: String,
        /// This peer's certificate (none: peers of the pool will refuse it).
        certificate: Option<Box<Certificate>>,
    },
}

impl PoolMembership {
    /// The tag in the pool's topic and protocol names: a public pool's name, a private
    /// pool's id (its key, hex).
    pub fn tag(&self) -> String {
        match self {
            PoolMembership::Public { name } => name.clone(),
            PoolMembership::Private { pool, .. } => to_hex(&pool.0),
        }
    }

    /// One line for operators: which pool, and on what terms.
    pub fn describe(&self) -> String {
        match self {
            PoolMembership::Public { name } => {
                format!("pool {name} (public: anyone may join, new peers on probation)")
            }
            PoolMembership::Private {
                pool,
                name,
                certificate,
            } => match certificate {
                Some(c) => format!(
                    "pool {name} (private, id {}; this peer: certificate {}, {})",
                    to_hex(&pool.0),
                    c.body.serial,
                    c.body.role.as_str()
                ),
                None => format!(
                    "pool {name} (private, id {}; this peer holds no certificate and will be refused)",
                    to_hex(&pool.0)
                ),
            },
        }
    }
}

/// What a peer was admitted with.
#[derive(Debug, Clone)]
struct Entry {
    serial: Option<u64>,
    expires_at: Option<u64>,
    role: Option<Role>,
    operator: Option<String>,
}

#[derive(Default)]
struct State {
    /// Connected peers, each with the number of its current connection and whether it has
    /// presented a hello on it.
    connected: HashMap<PeerId, (u64, bool)>,
    connections: u64,
    admitted: HashMap<PeerId, Entry>,
    revoked: Vec<Revocation>,
    /// The serials in `revoked`.
    revoked_serials: std::collections::HashSet<u64>,
    /// Signatures of revocations that did not verify.
    forged: std::collections::HashSet<[u8; 64]>,
    /// Each peer's revocation window: when it began and the checks left in it.
    revocations_from: HashMap<PeerId, (tokio::time::Instant, usize)>,
    /// Refusals lately logged, each way, so that a peer dialling again and again is
    /// logged once a minute rather than on every connection.
    told: HashMap<(PeerId, bool), (tokio::time::Instant, String)>,
}

/// How long a refusal, logged once, is not logged again for the same peer and reason.
const QUIET_FOR: Duration = Duration::from_secs(60);

impl State {
    /// Whether to log `why` for `peer` now (`ours`: this peer refused it; else the other
    /// way round).
    fn worth_telling(&mut self, peer: PeerId, ours: bool, why: &str) -> bool {
        let now = tokio::time::Instant::now();
        if self.told.len() > 1024 {
            self.told
                .retain(|_, (at, _)| now.duration_since(*at) < QUIET_FOR);
        }
        match self.told.get(&(peer, ours)) {
            Some((at, said)) if said == why && now.duration_since(*at) < QUIET_FOR => false,
            _ => {
                self.told.insert((peer, ours), (now, why.to_string()));
                true
            }
        }
    }
}

struct Inner {
    pool: PoolMembership,
    tag: String,
    state: Mutex<State>,
    /// Bumped whenever a peer is admitted, so waiters look again.
    admitted: watch::Sender<u64>,
    /// Bumped whenever a peer admits this one.
    accepted: watch::Sender<u64>,
    drops: mpsc::UnboundedSender<(PeerId, String)>,
    /// Told of each peer a private pool admits (the [`crate::gated::Gated`] behaviours).
    admissions: Mutex<Vec<mpsc::UnboundedSender<PeerId>>>,
}

/// The pool's door, shared by the swarm loop (which reports connections and carries out
/// disconnections) and the stream handlers (which serve admitted peers only).
#[derive(Clone)]
pub struct Gate {
    inner: Arc<Inner>,
}

/// Peers the gate wants disconnected, with why; the swarm loop drains it.
pub struct Drops(mpsc::UnboundedReceiver<(PeerId, String)>);

impl Drops {
    /// The next peer to disconnect.
    pub async fn next(&mut self) -> Option<(PeerId, String)> {
        self.0.recv().await
    }
}

impl Gate {
    /// A gate for `pool`, and the queue of peers to disconnect.
    pub fn new(pool: PoolMembership) -> (Self, Drops) {
        let (tx, rx) = mpsc::unbounded_channel();
        let gate = Self {
            inner: Arc::new(Inner {
                tag: pool.tag(),
                pool,
                state: Mutex::new(State::default()),
                admitted: watch::channel(0).0,
                accepted: watch::channel(0).0,
                drops: tx,
                admissions: Mutex::new(Vec::new()),
            }),
        };
        (gate, Drops(rx))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pool this gate guards.
    pub fn pool(&self) -> &PoolMembership {
        &self.inner.pool
    }

    /// The pool's tag (see [`PoolMembership::tag`]).
    pub fn tag(&self) -> &str {
        &self.inner.tag
    }

    fn private_key(&self) -> Option<&PublicKey> {
        match &self.inner.pool {
            PoolMembership::Private { pool, .. } => Some(pool),
            PoolMembership::Public { .. } => None,
        }
    }

    /// Whether `peer` may be served now: anyone in a public pool, admitted peers in a
    /// private one.
    pub fn admitted(&self, peer: &PeerId) -> bool {
        self.private_key().is_none() || self.state().admitted.contains_key(peer)
    }

    /// The role `peer` was admitted with (private pools; none in a public pool or if it is
    /// not admitted).
    pub fn role(&self, peer: &PeerId) -> Option<Role> {
        self.state().admitted.get(peer).and_then(|e| e.role)
    }

    /// Who runs `peer`'s machine, as its certificate says (private pools whose admin
    /// named operators); `None` otherwise.
    pub fn operator(&self, peer: &PeerId) -> Option<String> {
        self.state()
            .admitted
            .get(peer)
            .and_then(|e| e.operator.clone())
    }

    /// Waits until `peer` is admitted or [`HELLO_TIMEOUT`] passes; whether it was. A stream
    /// can arrive before the hello on the same new connection has been checked.
    pub async fn wait_admitted(&self, peer: &PeerId) -> bool {
        let mut changes = self.inner.admitted.subscribe();
        let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
        loop {
            if self.admitted(peer) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return self.admitted(peer),
            }
        }
    }

    /// The peers a private pool admits from now on, as they are admitted.
    pub fn admissions(&self) -> mpsc::UnboundedReceiver<PeerId> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .admissions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tx);
        rx
    }

    /// A receiver that changes each time a peer admits this one (a node then advertises at
    /// once instead of waiting for its next interval).
    pub fn accepted_by_peers(&self) -> watch::Receiver<u64> {
        self.inner.accepted.subscribe()
    }

    /// The withdrawals this peer knows of.
    pub fn revocations(&self) -> Vec<Revocation> {
        self.state().revoked.clone()
    }

    /// Called on a peer's first connection: presents this peer to it and, in a private
    /// pool, drops it unless it presents a valid certificate in time.
    pub fn connected(&self, peer: PeerId, control: libp2p_stream::Control) {
        let number = {
            let mut st = self.state();
            st.connections += 1;
            let n = st.connections;
            st.connected.insert(peer, (n, false));
            n
        };
        let this = self.clone();
        tokio::spawn(async move { this.present(peer, control).await });
        if self.private_key().is_some() {
            let this = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(HELLO_TIMEOUT).await;
                let silent = this.state().connected.get(&peer) == Some(&(number, false));
                if silent {
                    let why = format!(
                        "it presented no certificate for this pool within {} s",
                        HELLO_TIMEOUT.as_secs()
                    );
                    this.refuse(peer, why, Duration::ZERO);
                }
            });
        }
    }

    /// Called when a peer's last connection closes.
    pub fn disconnected(&self, peer: &PeerId) {
        let mut st = self.state();
        st.connected.remove(peer);
        st.admitted.remove(peer);
    }

    /// Stops serving `peer` now and has it disconnected after `grace` (time for a last
    /// message, such as the gossiped revocation, to reach it).
    fn refuse(&self, peer: PeerId, why: String, grace: Duration) {
        let loud = {
            let mut st = self.state();
            st.admitted.remove(&peer);
            st.worth_telling(peer, true, &why)
        };
        if loud {
            tracing::warn!(%peer, "refused peer {peer}: {why}");
        } else {
            tracing::debug!(%peer, "refused peer {peer} again: {why}");
        }
        let drops = self.inner.drops.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = drops.send((peer, why));
        });
    }

    /// Sends this peer's hello to `peer` and takes in its answer.
    async fn present(&self, peer: PeerId, mut control: libp2p_stream::Control) {
        let certificate = match &self.inner.pool {
            PoolMembership::Private { certificate, .. } => certificate.as_deref().cloned(),
            PoolMembership::Public { .. } => None,
        };
        let hello = Message::Hello(Hello {
            pool: self.inner.tag.clone(),
            certificate,
        });
        let exchange = async {
            let mut stream = control
                .open_stream(peer, StreamProtocol::new(ADMIT_PROTOCOL))
                .await
                .map_err(|e| e.to_string())?;
            write_frame_async(&mut stream, &hello)
                .await
                .map_err(|e| e.to_string())?;
            read_frame_async::<Message>(&mut stream, MAX_ADMIT_FRAME)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(HELLO_TIMEOUT, exchange).await {
            Ok(Ok(Some(Message::Admission(Admission {
                refused: None,
                revocations,
            })))) => {
                tracing::info!(%peer, "admitted by peer {peer}");
                self.inner.accepted.send_modify(|n| *n += 1);
                self.revocations_from(peer, revocations).await;
            }
            Ok(Ok(Some(Message::Admission(Admission {
                refused: Some(why), ..
            })))) => {
                tracing::warn!(%peer, "peer {peer} refused this peer: {why}");
            }
            Ok(Ok(_)) => tracing::debug!(%peer, "no admission answer"),
            Ok(Err(e)) => tracing::debug!(%peer, "admission not exchanged: {e}"),
            Err(_) => tracing::debug!(%peer, "admission not answered in time"),
        }
    }

    /// Answers hellos from `control` until it is dropped.
    pub fn serve(&self, mut control: libp2p_stream::Control) -> Result<(), String> {
        let mut incoming = control
            .accept(StreamProtocol::new(ADMIT_PROTOCOL))
            .map_err(|e| format!("{ADMIT_PROTOCOL}: {e}"))?;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some((peer, stream)) = incoming.next().await {
                let this = this.clone();
                tokio::spawn(async move { this.answer(peer, stream).await });
            }
        });
        Ok(())
    }

    async fn answer(&self, peer: PeerId, mut stream: Stream) {
        let hello = match tokio::time::timeout(
            HELLO_TIMEOUT,
            read_frame_async::<Message>(&mut stream, MAX_ADMIT_FRAME),
        )
        .await
        {
            Ok(Ok(Some(Message::Hello(h)))) => Ok(h),
            Ok(Ok(_)) => Err("it sent no hello".to_string()),
            Ok(Err(e)) => Err(format!("its hello is not readable: {e}")),
            Err(_) => Err("its hello did not come in time".to_string()),
        };
        if let Some((_, heard)) = self.state().connected.get_mut(&peer) {
            *heard = true;
        }
        let verdict = hello.and_then(|h| self.judge(&peer, &h, crate::ids::unix_now()));
        let refused = verdict.as_ref().err().cloned();
        let answer = Message::Admission(Admission {
            refused: refused.clone(),
            revocations: self.revocations(),
        });
        if let Err(e) = write_frame_async(&mut stream, &answer).await {
            tracing::debug!(%peer, "admission answer not sent: {e}");
        }
        match verdict {
            Ok(entry) => {
                if let Some(serial) = entry.serial {
                    tracing::info!(%peer, serial, "admitted peer {peer} (certificate {serial})");
                }
                self.state().admitted.insert(peer, entry);
                self.inner.admitted.send_modify(|n| *n += 1);
                if self.private_key().is_some() {
                    self.inner
                        .admissions
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .retain(|tx| tx.send(peer).is_ok());
                }
            }
            Err(why) => {
                // Give the answer a moment to reach the peer before the connection goes.
                let mut rest = [0u8; 1];
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    futures::AsyncReadExt::read(&mut stream, &mut rest),
                )
                .await;
                self.refuse(peer, why, Duration::ZERO);
            }
        }
    }

    /// Whether `hello`, from `peer`, admits it at unix time `now`.
    fn judge(&self, peer: &PeerId, hello: &Hello, now: u64) -> Result<Entry, String> {
        if hello.pool != self.inner.tag {
            return Err(format!(
                "it is in pool {:.64}, not this one ({})",
                hello.pool, self.inner.tag
            ));
        }
        let Some(pool) = self.private_key() else {
            return Ok(Entry {
                serial: None,
                expires_at: None,
                role: None,
                operator: None,
            });
        };
        let cert = hello
            .certificate
            .as_ref()
            .ok_or("it presented no certificate")?;
        if crate::ids::peer_id_of(&cert.body.member) != Some(*peer) {
            return Err("its certificate names another member key".into());
        }
        let role = self.role_in(pool, cert, now).map_err(|e| e.to_string())?;
        Ok(Entry {
            serial: Some(cert.body.serial),
            expires_at: cert.body.expires_at,
            role: Some(role),
            operator: cert.body.operator.clone(),
        })
    }

    /// In a private pool, whether `cert` admits its member at unix time `now` (signed by
    /// the pool key, current, not revoked) and with what role; `None` in a public pool,
    /// which checks no certificates.
    pub fn certificate_role(
        &self,
        cert: &Certificate,
        now: u64,
    ) -> Option<Result<Role, MembershipError>> {
        let pool = self.private_key()?;
        Some(self.role_in(pool, cert, now))
    }

    /// `cert`'s role in `pool` at `now`. Revocation is checked last, as
    /// [`Certificate::admits`] does, against the list held here (not copied out).
    fn role_in(
        &self,
        pool: &PublicKey,
        cert: &Certificate,
        now: u64,
    ) -> Result<Role, MembershipError> {
        let role = cert.admits(pool, &cert.body.member, now, &[])?;
        let serial = cert.body.serial;
        if self.state().revoked_serials.contains(&serial) {
            return Err(MembershipError::Revoked(serial));
        }
        Ok(role)
    }

    /// How many new revocations of `peer`'s may be checked now: none from a stranger (so
    /// fresh identities cannot make a member check signatures by the thousand), else what
    /// is left of its [`REVOCATION_CHECKS`] this window.
    fn revocation_budget(&self, peer: &PeerId) -> usize {
        if self.private_key().is_none() || !self.admitted(peer) {
            return 0;
        }
        let now = tokio::time::Instant::now();
        let mut st = self.state();
        if st.revocations_from.len() > 1024 {
            st.revocations_from
                .retain(|_, (at, _)| now.duration_since(*at) < REVOCATION_WINDOW);
        }
        let window = st
            .revocations_from
            .entry(*peer)
            .or_insert((now, REVOCATION_CHECKS));
        if now.duration_since(window.0) >= REVOCATION_WINDOW {
            *window = (now, REVOCATION_CHECKS);
        }
        window.1
    }

    /// Counts `n` checks against `peer`'s window.
    fn spend_revocation_checks(&self, peer: &PeerId, n: usize) {
        if let Some(w) = self.state().revocations_from.get_mut(peer) {
            w.1 = w.1.saturating_sub(n);
        }
    }

    /// Takes in revocations `peer` sent (its admission answer, its gossip), within its
    /// budget (see [`Gate::revocation_budget`]); the new ones. Blocking: checks signatures.
    pub fn revoke_from(&self, peer: &PeerId, revocations: &[Revocation]) -> Vec<Revocation> {
        let budget = self.revocation_budget(peer);
        if budget == 0 {
            if !revocations.is_empty() {
                tracing::debug!(%peer, "revocations from peer {peer} ignored: not admitted, or over its checks for now");
            }
            return Vec::new();
        }
        let (new, checked) = self.revoke_within(revocations, budget);
        self.spend_revocation_checks(peer, checked);
        new
    }

    /// Takes in the revocations in `peer`'s admission answer, once this peer has judged
    /// `peer` itself and off the async workers (see [`Gate::revoke_from`]).
    async fn revocations_from(&self, peer: PeerId, revocations: Vec<Revocation>) {
        if revocations.is_empty() || self.private_key().is_none() {
            return;
        }
        if !self.wait_admitted(&peer).await {
            tracing::warn!(%peer, "ignored {} revocations from peer {peer}: it is not admitted to this pool", revocations.len());
            return;
        }
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.revoke_from(&peer, &revocations)).await;
    }

    /// Takes in withdrawals signed by the pool key (others are ignored), disconnects
    /// admitted peers whose certificates they name, and returns the new ones. For the
    /// pool's own list (the coordinator's `pool.json`); peers' lists go through
    /// [`Gate::revoke_from`]. Blocking: checks signatures.
    pub fn revoke(&self, revocations: &[Revocation]) -> Vec<Revocation> {
        self.revoke_within(revocations, MAX_REVOCATIONS).0
    }

    /// [`Gate::revoke`], checking at most `budget` signatures; the new revocations and how
    /// many signatures were checked. Signatures are checked without holding the gate's
    /// lock, and forged ones are remembered so they cost nothing again.
    fn revoke_within(&self, revocations: &[Revocation], budget: usize) -> (Vec<Revocation>, usize) {
        let Some(pool) = self.private_key() else {
            return (Vec::new(), 0);
        };
        let candidates: Vec<&Revocation> = {
            let st = self.state();
            revocations
                .iter()
                .filter(|r| {
                    !st.revoked_serials.contains(&r.serial) && !st.forged.contains(&r.signature.0)
                })
                .take(budget)
                .collect()
        };
        let checked = candidates.len();
        let (good, bad): (Vec<&Revocation>, Vec<&Revocation>) =
            candidates.into_iter().partition(|r| r.verify(pool).is_ok());
        let mut new = Vec::new();
        {
            let mut st = self.state();
            if st.forged.len() + bad.len() > FORGED_KEPT {
                st.forged.clear();
            }
            st.forged.extend(bad.iter().map(|r| r.signature.0));
            for r in good {
                if st.revoked.len() >= MAX_REVOCATIONS {
                    tracing::warn!("over {MAX_REVOCATIONS} revocations; the rest are ignored");
                    break;
                }
                if st.revoked_serials.insert(r.serial) {
                    st.revoked.push(r.clone());
                    new.push(r.clone());
                }
            }
        }
        if let PoolMembership::Private {
            certificate: Some(c),
            ..
        } = &self.inner.pool
        {
            if new.iter().any(|r| r.serial == c.body.serial) {
                tracing::error!(
                    "this peer's own certificate (serial {}) was revoked; its pool will refuse it",
                    c.body.serial
                );
            }
        }
        let hit: Vec<(PeerId, u64)> = self
            .state()
            .admitted
            .iter()
            .filter_map(|(p, e)| {
                e.serial
                    .filter(|s| new.iter().any(|r| r.serial == *s))
                    .map(|s| (*p, s))
            })
            .collect();
        for (peer, serial) in hit {
            let why = format!("its certificate (serial {serial}) was revoked");
            self.refuse(peer, why, LAST_WORD);
        }
        (new, checked)
    }

    /// Disconnects admitted peers whose certificates expired by unix time `now`.
    pub fn sweep(&self, now: u64) {
        let expired: Vec<(PeerId, u64)> = self
            .state()
            .admitted
            .iter()
            .filter_map(|(p, e)| e.expires_at.filter(|at| *at <= now).map(|at| (*p, at)))
            .collect();
        for (peer, at) in expired {
            self.refuse(peer, format!("its certificate expired at {at}"), LAST_WORD);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_protocol::membership::Membership;
    use potluck_protocol::signed::Keypair;

    fn key(seed: u8) -> Keypair {
        Keypair::from_secret(&[seed; 32])
    }

    fn peer(k: &Keypair) -> PeerId {
        crate::ids::peer_id_of(&k.public()).unwrap()
    }

    fn cert(pool: &Keypair, member: &Keypair, serial: u64, expires_at: Option<u64>) -> Certificate {
        let body = Membership {
            pool: pool.public(),
            pool_name: "lab".into(),
            member: member.public(),
            role: Role::Member,
            issued_at: 1_000,
            expires_at,
            serial,
            operator: None,
        };
        Certificate::issue(pool, body).unwrap()
    }

    #[tokio::test]
    async fn a_private_gate_admits_valid_certificates_only_and_drops_revoked_members() {
        let (pool, alice, bob) = (key(1), key(2), key(3));
        let (gate, mut drops) = Gate::new(PoolMembership::Private {
            pool: pool.public(),
            name: "lab".into(),
            certificate: None,
        });
        let hello = |c: Option<Certificate>| Hello {
            pool: gate.tag().to_string(),
            certificate: c,
        };
        let judge = |p: &Keypair, h: Hello, now: u64| gate.judge(&peer(p), &h, now);
        let good = cert(&pool, &alice, 1, Some(5_000));
        assert!(judge(&alice, hello(Some(good.clone())), 2_000).is_ok());
        let refusal = |p: &Keypair, h: Hello, now: u64| judge(p, h, now).unwrap_err();
        assert!(refusal(&bob, hello(Some(good.clone())), 2_000).contains("another member"));
        assert!(refusal(&alice, hello(None), 2_000).contains("no certificate"));
        assert!(refusal(&alice, hello(Some(good.clone())), 5_000).contains("expired"));
        let elsewhere = Hello {
            pool: "public".into(),
            certificate: Some(good.clone()),
        };
        assert!(refusal(&alice, elsewhere, 2_000).contains("in pool public"));
        let foreign = cert(&key(9), &alice, 1, None);
        assert!(refusal(&alice, hello(Some(foreign)), 2_000).contains("for pool"));

        // Revocations count only when the pool key signed them.
        let fake = Revocation::issue(&key(9), 1, 2_000).unwrap();
        assert!(gate.revoke(&[fake]).is_empty());
        assert!(!gate.admitted(&peer(&alice)));
        gate.state().admitted.insert(
            peer(&alice),
            Entry {
                serial: Some(1),
                expires_at: Some(5_000),
                role: Some(Role::Member),
                operator: None,
            },
        );
        assert!(gate.admitted(&peer(&alice)));
        let real = Revocation::issue(&pool, 1, 2_000).unwrap();
        assert_eq!(gate.revoke(&[real.clone(), real]).len(), 1);
        assert!(!gate.admitted(&peer(&alice)));
        let (who, why) = tokio::time::timeout(Duration::from_secs(5), drops.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(who, peer(&alice));
        assert!(why.contains("revoked"), "{why}");
        assert!(refusal(&alice, hello(Some(good)), 2_000).contains("revoked"));
    }

    #[tokio::test]
    async fn expired_members_are_swept_and_a_public_gate_admits_anyone_of_its_pool() {
        let (pool, alice) = (key(1), key(2));
        let (gate, mut drops) = Gate::new(PoolMembership::Private {
            pool: pool.public(),
            name: "lab".into(),
            certificate: None,
        });
        let entry = Entry {
            serial: Some(4),
            expires_at: Some(3_000),
            role: Some(Role::Member),
            operator: None,
        };
        gate.state().admitted.insert(peer(&alice), entry);
        gate.sweep(2_999);
        assert!(gate.admitted(&peer(&alice)));
        gate.sweep(3_000);
        assert!(!gate.admitted(&peer(&alice)));
        let (_, why) = tokio::time::timeout(Duration::from_secs(5), drops.next())
            .await
            .unwrap()
            .unwrap();
        assert!(why.contains("expired"), "{why}");

        let (open, _) = Gate::new(PoolMembership::Public {
            name: "city".into(),
        });
        assert!(open.admitted(&peer(&alice)));
        let hello = |pool: &str| Hello {
            pool: pool.into(),
            certificate: None,
        };
        assert!(open.judge(&peer(&alice), &hello("city"), 0).is_ok());
        assert!(open.judge(&peer(&alice), &hello("lab"), 0).is_err());
        assert!(open
            .revoke(&[Revocation::issue(&pool, 4, 0).unwrap()])
            .is_empty());
    }

    #[tokio::test]
    async fn a_strangers_revocations_cost_no_checks_and_forged_ones_cost_one_each_once() {
        let (pool, alice, stranger) = (key(1), key(2), key(3));
        let (gate, _drops) = Gate::new(PoolMembership::Private {
            pool: pool.public(),
            name: "lab".into(),
            certificate: None,
        });
        // Forged in the pool's name: each needs a signature check to be found out.
        let forged: Vec<Revocation> = (0..100)
            .map(|i| {
                let mut r = Revocation::issue(&key(9), i, 0).unwrap();
                r.pool = pool.public();
                r
            })
            .collect();
        assert!(gate.revoke_from(&peer(&stranger), &forged).is_empty());
        assert!(
            gate.state().forged.is_empty(),
            "a stranger's list was checked"
        );

        gate.state().admitted.insert(
            peer(&alice),
            Entry {
                serial: Some(7),
                expires_at: None,
                role: Some(Role::Member),
                operator: None,
            },
        );
        assert!(gate.revoke_from(&peer(&alice), &forged).is_empty());
        assert_eq!(gate.state().forged.len(), 100);
        let left = |g: &Gate| g.state().revocations_from.get(&peer(&alice)).map(|w| w.1);
        assert_eq!(left(&gate), Some(REVOCATION_CHECKS - 100));
        // Sent again, they are known forgeries: no checks spent.
        assert!(gate.revoke_from(&peer(&alice), &forged).is_empty());
        assert_eq!(left(&gate), Some(REVOCATION_CHECKS - 100));
        // A real one among them still counts.
        let mut list = forged.clone();
        list.push(Revocation::issue(&pool, 42, 0).unwrap());
        assert_eq!(gate.revoke_from(&peer(&alice), &list).len(), 1);
        // Past its budget, a member's lists wait for the next window.
        gate.state()
            .revocations_from
            .insert(peer(&alice), (tokio::time::Instant::now(), 0));
        let later = [Revocation::issue(&pool, 43, 0).unwrap()];
        assert!(gate.revoke_from(&peer(&alice), &later).is_empty());
        assert!(
            gate.revoke(&later).len() == 1,
            "the pool's own list is not budgeted"
        );
    }
}
