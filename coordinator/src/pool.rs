//! The coordinator's live view of its pool and what it does with it: peers from verified
//! adverts, the current plan, which peers have confirmed loading their span, assignments
//! sent over control streams, and sessions routed through confirmed spans.

mod canary;
mod checks;
mod embed_checks;
mod work;

pub use work::Embedded;
pub(crate) use work::{embedded, verify_work, Refusal};

pub use potluck_core::pool::{
    describe, Exclusion, WorkTally, ALIVE_WINDOW, ASSIGN_RETRY, BAN, LEAVE_BAN, QUARANTINE,
    SUSPECT_FOR,
};

use crate::audit::{AuditLog, Record};
use crate::config::CoordinatorConfig;
use crate::metrics::Metrics;
use crate::model::{EmbeddingModel, ServedModel};
use crate::origin::{Connections, Origin};
use crate::peer_table::{Accepted, PeerTable};
use crate::pipeline::CheckJob;
use crate::pipeline::{
    ChainModel, Checks, PipelineError, RemotePipeline, Reroute, SessionContext, SessionHandle,
};
use crate::planner::Span;
use crate::share::{MemberId, Share};
use crate::trust::Trust;
use libp2p::swarm::ConnectionId;
use libp2p::PeerId;
use potluck_core::pool::{Action, Now, PoolCore, PoolModel, SeesText};
use potluck_engine::generate::{GenerateRequest, GenerateStats, Generation};
use potluck_engine::sampling::SamplingParams;
use potluck_net::gate::Gate;
use potluck_net::reach::{PeerReachView, Reach};
use potluck_net::streams::PoolStreams;
use potluck_net::swarm::{key_of_peer, peer_id_of};
use potluck_protocol::membership::Role;
use potluck_protocol::messages::{LayerRange, Message, ModelRef, ShardAssignment};
use potluck_protocol::signed::PublicKey;
use potluck_protocol::stream::{read_frame_async, write_frame_async, Channel, MAX_CONTROL_FRAME};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Notify;

/// How long a node may take to load its span.
pub const ASSIGN_TIMEOUT: Duration = Duration::from_secs(300);

/// How many times a request is sent again when a connection of its peer closes under it.
pub const REQUEST_RESENDS: usize = 3;

/// Connection closes held for requests in flight that have not looked yet (a request that
/// misses some sends itself again, as one of them may have been its peer's).
const CLOSED_BACKLOG: usize = 4096;

/// Sessions a coordinator lets start before its first plan sizes the count by the nodes'
/// memory (see [`crate::capacity`]).
pub const DEFAULT_MAX_SESSIONS: usize = 32;
/// Events the dashboard keeps.
pub const EVENT_LOG: usize = 50;
/// Spot checks run at once; more wait (they must not crowd out generation).
const CONCURRENT_CHECKS: usize = 2;

/// Why a session could not run.
#[derive(Debug, Error, PartialEq)]
pub enum SessionError {
    /// The pool cannot serve the model now (too few peers, spans still loading).
    #[error("the pool is not ready: {0}")]
    NotReady(String),
    /// The request itself is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// A stage failed mid-generation.
    #[error("generation failed: {0}")]
    Failed(String),
    /// The client went away and the session was ended.
    #[error("cancelled")]
    Cancelled,
}

impl SessionError {
    /// A short name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::NotReady(_) => "not_ready",
            SessionError::BadRequest(_) => "bad_request",
            SessionError::Failed(_) => "stage",
            SessionError::Cancelled => "cancelled",
        }
    }
}

/// Something that happened in the pool, for the dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolEvent {
    /// Unix seconds.
    pub at: u64,
    /// `peer`, `plan`, `failure` or `check`.
    pub kind: &'static str,
    /// What happened.
    pub message: String,
}

/// A running session, as the dashboard shows it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// When it started, unix seconds.
    pub started: u64,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Its live counters, chain and cancel switch.
    pub handle: Arc<SessionHandle>,
}

/// One generation, already tokenized.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    /// Prompt token ids (templated).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Counts the session's tokens and ends it when cancelled.
    pub handle: Arc<SessionHandle>,
    /// Who asked: its place in the fair share, and whose quota the tokens count against.
    pub member: MemberId,
}

/// The privacy option: text (first and last stages, whole work units) only on trusted peers.
struct PrivateEdges {
    enabled: bool,
    trusted: HashSet<PeerId>,
}

/// A handle on the running coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    model: Arc<ServedModel>,
    /// The pool and every decision about it (see [`potluck_core::pool`]).
    core: Arc<Mutex<PoolCore>>,
    control: PoolStreams,
    next_session: Arc<AtomicU64>,
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
    sessions: Arc<Mutex<BTreeMap<u64, SessionInfo>>>,
    events: Arc<Mutex<VecDeque<PoolEvent>>>,
    /// Nodes running on the coordinator's own machine (`up`'s), marked on the dashboard.
    local: Arc<Mutex<HashSet<PeerId>>>,
    /// Members, their limits and usage, and the session slots they share.
    share: Arc<Share>,
    /// Who may connect (a private pool's certificates and revocations).
    gate: Option<Gate>,
    /// How each peer can be reached (public, hole-punched, relayed), as the swarm saw.
    reach: Option<Reach>,
    /// Told of every peer quarantined (the job store voids its credit).
    on_quarantine: Option<Arc<dyn Fn(PeerId) + Send + Sync>>,
    /// Whether text stays on trusted peers, and the peers trusted by name.
    private_edges: Arc<PrivateEdges>,
    audit: Option<AuditLog>,
    checks: Arc<tokio::sync::Semaphore>,
    /// Each peer's open connections: its network, for [`Coordinator::origin`].
    remote: Arc<Mutex<HashMap<PeerId, Connections<ConnectionId>>>>,
    /// Told the peer of every connection that closes, so a request riding it is sent again
    /// on another instead of waiting out its timeout.
    closed: tokio::sync::broadcast::Sender<PeerId>,
    /// Held while a session is routed and counted.
    routing: Arc<tokio::sync::Mutex<()>>,
    /// Every hop on two peers that must agree (`--verify strict`).
    strict: bool,
    /// Jobs two peers agreed on, for canaries.
    canaries: Arc<Mutex<canary::CanaryBank>>,
    /// The sentence encoder embedding requests run on.
    embedding_model: Option<EmbeddingModel>,
    /// How long a work unit may take on a node.
    unit_timeout: Duration,
}

/// Counts a session on its chain's peers until it ends.
struct Load {
    core: Arc<Mutex<PoolCore>>,
    peers: Vec<PublicKey>,
}

impl Load {
    fn new(core: Arc<Mutex<PoolCore>>, peers: Vec<PublicKey>) -> Self {
        lock(&core).load(&peers);
        Self { core, peers }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        lock(&self.core).unload(&self.peers);
    }
}

/// `m` locked; poisoning is recovered from, since the core's every update leaves it whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The clock, as the core takes it.
fn now() -> Now {
    Now {
        at: Instant::now(),
        unix: potluck_net::swarm::unix_now(),
    }
}

/// Whether the peer with `key` may see the pool's text: always, unless the pool keeps text
/// to trusted peers (`--private-edges`), then only peers named trusted or admitted with a
/// trusted or admin certificate.
fn sees_text(private: &PrivateEdges, gate: Option<&Gate>, key: &PublicKey) -> bool {
    if !private.enabled {
        return true;
    }
    let Some(peer) = peer_id_of(key) else {
        return false;
    };
    private.trusted.contains(&peer)
        || gate
            .and_then(|g| g.role(&peer))
            .is_some_and(Role::sees_text)
}

/// The core's text policy: [`sees_text`] by `private` and `gate`.
fn text_policy(private: Arc<PrivateEdges>, gate: Option<Gate>) -> SeesText {
    Box::new(move |key| sees_text(&private, gate.as_ref(), key))
}

/// Removes a session from the registry however its generation ends.
struct Registered {
    sessions: Arc<Mutex<BTreeMap<u64, SessionInfo>>>,
    id: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.metrics.sessions.dec();
    }
}

impl Coordinator {
    /// A coordinator for `model` in `pool`, opening streams through `control`, running at
    /// most `max_sessions` sessions at once (more wait their turn), dropping peers after
    /// `missed_heartbeats` missed adverts, spot-checking at least a share `check_share` of
    /// trusted peers' results (all as `cfg` says), and recording every verdict in `audit`.
    pub fn new(
        model: ServedModel,
        control: PoolStreams,
        cfg: &CoordinatorConfig,
        audit: Option<AuditLog>,
        share: Arc<Share>,
    ) -> Self {
        let (pool, p_min) = (cfg.pool.tag(), cfg.check_share);
        let mut seed = [0u8; 8];
        // Session ids only need to differ between sessions; the clock is a fine fallback.
        if getrandom::fill(&mut seed).is_err() {
            seed = potluck_net::swarm::unix_now().to_le_bytes();
        }
        let served = PoolModel {
            model: model.model.clone(),
            shape: model.shape.clone(),
            kv: model.kv,
        };
        let table = PeerTable::new(&pool).with_missed_heartbeats(cfg.missed_heartbeats);
        let trust = Trust::new(p_min, u64::from_le_bytes(seed));
        let private_edges = Arc::new(PrivateEdges {
            enabled: cfg.private_edges,
            trusted: cfg.trusted_peers.iter().copied().collect(),
        });
        let mut core = PoolCore::new(served, table, trust, cfg.max_sessions.is_none());
        core.set_sees_text(text_policy(private_edges.clone(), None));
        Self {
            model: Arc::new(model),
            core: Arc::new(Mutex::new(core)),
            control,
            next_session: Arc::new(AtomicU64::new(u64::from_le_bytes(seed) >> 1)),
            changed: Arc::new(Notify::new()),
            metrics: Arc::new(Metrics::new()),
            sessions: Arc::new(Mutex::new(BTreeMap::new())),
            events: Arc::new(Mutex::new(VecDeque::new())),
            local: Arc::new(Mutex::new(HashSet::new())),
            share,
            gate: None,
            reach: None,
            on_quarantine: None,
            private_edges,
            audit,
            checks: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHECKS)),
            remote: Arc::new(Mutex::new(HashMap::new())),
            closed: tokio::sync::broadcast::channel(CLOSED_BACKLOG).0,
            routing: Arc::new(tokio::sync::Mutex::new(())),
            strict: cfg.strict,
            canaries: Arc::new(Mutex::new(canary::CanaryBank::default())),
            embedding_model: cfg.embedding_model.clone(),
            unit_timeout: cfg.unit_timeout,
        }
    }

    /// The same coordinator, showing peers' reachability as `reach` keeps it.
    pub fn with_reach(mut self, reach: Reach) -> Self {
        self.reach = Some(reach);
        self
    }

    /// How `peer` can be reached, if the swarm has met it.
    pub fn reach_of(&self, peer: &PeerId) -> Option<PeerReachView> {
        self.reach.as_ref()?.of(peer)
    }

    /// What AutoNAT says of the coordinator itself: public, behind a NAT, or not known yet.
    pub fn own_reachability(&self) -> Option<bool> {
        self.reach.as_ref()?.own()
    }

    /// The same coordinator, checking members' certificates against `gate`'s pool.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.core()
            .set_sees_text(text_policy(self.private_edges.clone(), Some(gate.clone())));
        self.gate = Some(gate);
        self
    }

    /// The same coordinator, calling `hook` with every peer it quarantines (so what keeps
    /// the peer's credit can void it without the pool owning it).
    pub fn on_quarantine(mut self, hook: impl Fn(PeerId) + Send + Sync + 'static) -> Self {
        self.on_quarantine = Some(Arc::new(hook));
        self
    }

    /// Notes that `peer` opened `connection`, which comes from `address`.
    pub fn connection_opened(
        &self,
        peer: PeerId,
        connection: ConnectionId,
        address: &libp2p::Multiaddr,
    ) {
        use libp2p::multiaddr::Protocol;
        // A relayed address names the relay, not the peer.
        let ip = (!address.iter().any(|p| p == Protocol::P2pCircuit))
            .then(|| {
                address.iter().find_map(|p| match p {
                    Protocol::Ip4(ip) => Some(std::net::IpAddr::V4(ip)),
                    Protocol::Ip6(ip) => Some(std::net::IpAddr::V6(ip)),
                    _ => None,
                })
            })
            .flatten();
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer)
            .or_default()
            .opened(connection, ip);
        if let Some(key) = key_of_peer(&peer) {
            self.core().connected(&key);
        }
    }

    /// Notes that `peer`'s `connection` closed; its other connections still say where
    /// it is.
    pub fn connection_closed(&self, peer: PeerId, connection: ConnectionId) {
        {
            let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
            if remote
                .get_mut(&peer)
                .is_some_and(|open| open.closed(&connection))
            {
                remote.remove(&peer);
            }
        }
        // Nobody listening (no request in flight) is fine.
        let _ = self.closed.send(peer);
    }

    /// Whether a connection to `peer` is open now.
    fn connected(&self, peer: &PeerId) -> bool {
        lock(&self.remote).contains_key(peer)
    }

    /// Whose voice `peer`'s results are (see [`Origin`]): the operator its certificate
    /// names, else the network its oldest direct connection comes from, else the one
    /// voice every peer of unknown address shares.
    pub fn origin(&self, peer: PeerId) -> Origin {
        let operator = self.gate.as_ref().and_then(|g| g.operator(&peer));
        let ip = self
            .remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .and_then(Connections::address);
        Origin::of(&peer.to_string(), operator.as_deref(), ip)
    }

    /// Members, their limits and usage.
    pub fn share(&self) -> &Arc<Share> {
        &self.share
    }

    /// Whether `member` may use the API now: in a private pool, a member whose key is tied
    /// to a certificate needs it valid (unexpired, unrevoked); why not otherwise.
    pub fn member_standing(&self, member: MemberId) -> Result<(), String> {
        match self.certificate_role(member) {
            Some(Err(e)) => Err(format!(
                "{}'s membership is not valid: {e}",
                self.share.name(member)
            )),
            _ => Ok(()),
        }
    }

    /// Whether a caller holding `member`'s key (none: no key) may see every member's name
    /// and usage: anyone when the API is open (there are no named members), else admins,
    /// by the members file or by a valid admin certificate.
    pub fn sees_members(&self, member: Option<MemberId>) -> bool {
        if !self.share.requires_key() {
            return true;
        }
        let Some(m) = member else { return false };
        if self.share.is_admin(m) {
            return true;
        }
        matches!(
            self.certificate_role(m),
            Some(Ok(potluck_protocol::membership::Role::Admin))
        )
    }

    /// What the certificate `member`'s key is tied to says now, in a private pool: its
    /// role, or why it no longer admits; `None` without a pool gate or a certificate.
    fn certificate_role(
        &self,
        member: MemberId,
    ) -> Option<
        Result<potluck_protocol::membership::Role, potluck_protocol::membership::MembershipError>,
    > {
        let cert = self.share.certificate(member)?;
        self.gate
            .as_ref()?
            .certificate_role(cert, potluck_net::swarm::unix_now())
    }

    /// The sentence encoder embedding requests run on, if the pool offers embeddings.
    pub fn embedding_model(&self) -> Option<&ModelRef> {
        self.embedding_model.as_ref().map(|e| &e.model)
    }

    /// Multiply-adds per token of the model `kind` runs on, for credit.
    pub fn flops_per_token(&self, embedding: bool) -> u64 {
        match (&self.embedding_model, embedding) {
            (Some(e), true) => e.flops_per_token,
            _ => self.model.config.flops_per_token(),
        }
    }

    /// The coordinator's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Says `line` to the operator: every operator line of the coordinator goes out here, on
    /// stdout (which people, scripts and tests read), and with a `kind` it is also kept as
    /// an event for the dashboard.
    pub fn say(&self, kind: Option<&'static str>, line: String) {
        println!("{line}");
        if let Some(kind) = kind {
            self.event(kind, line);
        }
    }

    /// Notes an event for the dashboard (the newest [`EVENT_LOG`] are kept).
    pub fn event(&self, kind: &'static str, message: String) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.push_back(PoolEvent {
            at: potluck_net::swarm::unix_now(),
            kind,
            message,
        });
        while ev.len() > EVENT_LOG {
            ev.pop_front();
        }
    }

    /// Marks `peer` as a node on this machine (the one `up` starts beside its coordinator).
    pub fn mark_local(&self, peer: PeerId) {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer);
    }

    /// Whether `peer` runs on this machine (see [`Coordinator::mark_local`]).
    pub fn is_local(&self, peer: &PeerId) -> bool {
        self.local
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(peer)
    }

    /// Recent events, oldest first.
    pub fn events(&self) -> Vec<PoolEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Sessions running now, by id.
    pub fn sessions(&self) -> BTreeMap<u64, SessionInfo> {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `key`'s confirmed span, whether an assignment to it is in flight, and why it is
    /// excluded now, if it is.
    pub fn peer_status(&self, key: &PublicKey) -> (Option<LayerRange>, bool, Option<Exclusion>) {
        self.core().peer_status(key, Instant::now())
    }

    /// The served model.
    pub fn model(&self) -> &ServedModel {
        &self.model
    }

    /// The pool and its decisions, locked. Read from it freely; anything that changes it goes
    /// through [`Coordinator::with_core`], so what it decides is carried out.
    pub fn core(&self) -> MutexGuard<'_, PoolCore> {
        lock(&self.core)
    }

    /// Runs `f` on the pool at the current time, then carries out what it decided.
    pub fn with_core<R>(&self, f: impl FnOnce(&mut PoolCore, Now) -> R) -> R {
        let (out, actions) = {
            let mut core = self.core();
            let out = f(&mut core, now());
            (out, core.poll())
        };
        self.act(actions);
        out
    }

    /// Carries out the core's decisions, in order.
    fn act(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Say { kind, line } => self.say(kind, line),
                Action::Assign { peer, assignment } => {
                    let this = self.clone();
                    tokio::spawn(async move { this.assign(peer, assignment).await });
                }
                Action::NewPlan { .. } => {
                    self.metrics.plan_changes.inc();
                }
                Action::Sessions(n) => {
                    let before = self.share.sessions();
                    let now = self.share.resize(n);
                    if now != before {
                        self.say(
                            None,
                            format!(
                                "the pool runs {now} sessions at once (sized by its nodes' memory)"
                            ),
                        );
                    }
                }
                Action::Quarantined {
                    peer,
                    detail,
                    excluded,
                } => {
                    let Some(peer) = peer_id_of(&peer) else {
                        continue;
                    };
                    if let Some(hook) = &self.on_quarantine {
                        hook(peer);
                    }
                    if let (true, Some(audit)) = (excluded, &self.audit) {
                        audit.record(Record::Quarantine {
                            peer: peer.to_string(),
                            detail,
                        });
                    }
                }
                Action::Changed => self.changed.notify_waiters(),
            }
        }
    }

    /// Records what peers' adverts say they hold, and forgets departed peers' spans.
    pub fn sync_loaded(&self) {
        self.with_core(|c, now| c.sync_loaded(now));
    }

    /// The peer table accepted an advert of `key` (see [`PoolCore::admitted`]).
    pub fn admitted(&self, key: PublicKey, accepted: Accepted) {
        self.with_core(|c, now| c.admitted(key, accepted, now));
    }

    /// Leaves `peer` out of every plan for [`BAN`] and re-plans around it.
    pub fn drop_peer(&self, peer: PeerId, reason: &str) {
        if let Some(key) = key_of_peer(&peer) {
            self.with_core(|c, now| c.drop_peer(&key, reason, now));
        }
    }

    /// `peer` cannot be reached (`why`: its connection closed, it missed its adverts); see
    /// [`PoolCore::unreachable`].
    pub fn unreachable(&self, peer: PeerId, why: &str) {
        if let Some(key) = key_of_peer(&peer) {
            self.with_core(|c, now| c.unreachable(&key, why, now));
        }
    }

    /// Peers whose adverts stopped: unreachable, or forgotten if they were leaving (see
    /// [`PoolCore::expire_silent`]).
    pub fn expire_silent(&self) {
        self.with_core(|c, now| c.expire_silent(now));
    }

    /// Peers to dial again now; peers whose tries are spent are gone from the pool (they
    /// join anew if they advertise again).
    pub fn due_redials(&self) -> Vec<PeerId> {
        let due = self.with_core(|c, now| c.due_redials(now));
        due.iter().filter_map(peer_id_of).collect()
    }

    /// Re-plans for the peers now known and sends every assignment not yet confirmed.
    pub fn replan(&self) {
        self.with_core(|c, now| c.replan(now.at));
    }

    /// Records that `peer`'s connection answered a ping now (`false`: it closed).
    pub fn pinged(&self, peer: PeerId, answered: bool) {
        if let Some(key) = key_of_peer(&peer) {
            self.core().pinged(key, answered, Instant::now());
        }
    }

    /// Whether `peer`'s connection answered a ping within [`ALIVE_WINDOW`]: busy, not gone.
    pub fn alive(&self, peer: PeerId) -> bool {
        key_of_peer(&peer).is_some_and(|k| self.core().alive(&k, Instant::now()))
    }

    /// Sends one assignment and records the answer.
    async fn assign(&self, key: PublicKey, a: ShardAssignment) {
        let outcome = match peer_id_of(&key) {
            None => Err("not a valid peer key".to_string()),
            Some(peer) => self.send_assignment(peer, &a).await,
        };
        let connected = peer_id_of(&key).is_some_and(|p| self.connected(&p));
        if let Err(e) = &outcome {
            tracing::warn!(peer = %key.peer_id(), "assignment failed: {e}");
        }
        self.with_core(|c, now| c.assigned(key, &a, outcome, connected, now.at));
    }

    async fn send_assignment(&self, peer: PeerId, a: &ShardAssignment) -> Result<(), String> {
        let answer = self
            .request(
                peer,
                Channel::Control,
                &Message::Assign(a.clone()),
                MAX_CONTROL_FRAME,
                ASSIGN_TIMEOUT,
            )
            .await?;
        match answer {
            Some(Message::Assigned(b)) if &b == a => Ok(()),
            Some(Message::Error(e)) => Err(format!("{:?}: {}", e.code, e.message)),
            _ => Err("unexpected answer".into()),
        }
    }

    /// One request on a fresh stream of `channel` to `peer`, and its answer (at most `max`
    /// bytes; `None` if the stream ended first), all within `timeout`. Requests must be
    /// safe to repeat: when a connection to `peer` closes mid-request (a hole punch or a
    /// move to QUIC retires the one it rode) and another is open, it is sent again there,
    /// at most [`REQUEST_RESENDS`] times, since the stream on a closing connection may
    /// never end by itself.
    pub(crate) async fn request(
        &self,
        peer: PeerId,
        channel: Channel,
        message: &Message,
        max: usize,
        timeout: Duration,
    ) -> Result<Option<Message>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut closed = self.closed.subscribe();
        for _ in 0..=REQUEST_RESENDS {
            let mut control = self.control.clone();
            let exchange = async {
                let mut stream = control.open(peer, channel).await?;
                write_frame_async(&mut stream, message)
                    .await
                    .map_err(|e| e.to_string())?;
                read_frame_async::<Message>(&mut stream, max)
                    .await
                    .map_err(|e| e.to_string())
            };
            let closes = async {
                loop {
                    match closed.recv().await {
                        Ok(p) if p != peer => continue,
                        // Lagged: one of the missed closes may be this peer's.
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await
                        }
                    }
                }
            };
            tokio::select! {
                answer = tokio::time::timeout_at(deadline, exchange) => {
                    return answer.map_err(|_| format!("no answer within {timeout:?}"))?;
                }
                () = closes => {
                    if !self.connected(&peer) {
                        return Err("its connection closed mid-request".into());
                    }
                    tracing::debug!(%peer, "a connection closed mid-request: sending it again");
                }
            }
        }
        Err(format!(
            "its connections closed {} times mid-request",
            REQUEST_RESENDS + 1
        ))
    }

    /// The cheapest chain of confirmed spans, with each span's peer id.
    pub fn chain(&self) -> Result<Vec<(Span, PeerId)>, SessionError> {
        let chain = self
            .core()
            .chain(Instant::now())
            .map_err(|e| SessionError::NotReady(e.0))?;
        Ok(with_peer_ids(chain))
    }

    /// The cheapest chain of confirmed spans over blocks `start..end`, avoiding `avoid`
    /// (see [`PoolCore::route`]).
    fn route_blocks(
        &self,
        start: u32,
        end: u32,
        avoid: &HashSet<PeerId>,
    ) -> Option<Vec<(Span, PeerId)>> {
        let avoid: HashSet<PublicKey> = avoid.iter().filter_map(key_of_peer).collect();
        let route = self.core().route(start, end, &avoid, Instant::now())?;
        Some(with_peer_ids(route))
    }

    /// A peer announced it is leaving: plan and route around it at once; its running
    /// sessions move away at their next step.
    pub fn leaving(&self, peer: PeerId, reason: &str) {
        if let Some(key) = key_of_peer(&peer) {
            self.with_core(|c, now| c.leaving(&key, reason, now));
        }
    }

    /// Whether `peer` is out of plans and routes now (failed, dropped or leaving).
    pub fn excluded(&self, peer: PeerId) -> bool {
        key_of_peer(&peer).is_some_and(|k| self.core().is_excluded(&k, Instant::now()))
    }

    /// Leaves a peer that failed a step out of plans and routes for [`SUSPECT_FOR`] and
    /// re-plans around it.
    pub fn suspect(&self, peer: PeerId, reason: &str) {
        if let Some(key) = key_of_peer(&peer) {
            self.with_core(|c, now| c.suspect(&key, reason, now));
        }
    }

    /// Waits until a chain covers the model, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), SessionError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            match self.chain() {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    let _ = tokio::time::timeout_at(deadline, notified).await;
                }
            }
        }
    }

    /// Opens a session on the cheapest chain of confirmed spans: a stream to each.
    pub async fn open_session(
        &self,
        sampling: SamplingParams,
        handle: Arc<SessionHandle>,
    ) -> Result<(u64, Vec<(Span, PeerId)>, RemotePipeline), SessionError> {
        // Routed and counted in one go, so sessions opening at once spread over replicas.
        let (chain, load) = {
            let _routing = self.routing.lock().await;
            let chain = self.chain()?;
            let load = Load::new(
                self.core.clone(),
                chain.iter().map(|(s, _)| s.peer).collect(),
            );
            (chain, load)
        };
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let chain_model = self.chain_model();
        let mut control = self.control.clone();
        let ctx = SessionContext {
            session,
            model: chain_model,
            sampling,
            metrics: self.metrics.clone(),
            handle,
            pool: Some(Arc::new(self.clone())),
            audit: self.audit.clone(),
            guard: Some(Box::new(load)),
            strict: self.strict,
        };
        let pipe = RemotePipeline::open(&mut control, chain.clone(), ctx)
            .await
            .map_err(|e| SessionError::Failed(e.to_string()))?;
        Ok((session, chain, pipe))
    }

    /// Runs one generation through the pool, calling `on_text` with each piece of text.
    pub async fn generate(
        &self,
        req: SessionRequest,
        on_text: impl FnMut(&str) + Send + 'static,
    ) -> Result<(String, GenerateStats), SessionError> {
        let started = Instant::now();
        let member = req.member;
        let out = self.run_session(req, on_text).await;
        match &out {
            Ok((_, stats)) => {
                self.metrics
                    .time_to_first_token
                    .observe(started.elapsed().as_secs_f64() - stats.decode_secs);
                let tokens = (stats.prompt_tokens + stats.generated_tokens) as u64;
                self.share
                    .record(member, tokens, potluck_net::swarm::unix_now());
            }
            Err(e) => {
                self.metrics.failure(e.kind());
                if !matches!(e, SessionError::BadRequest(_) | SessionError::Cancelled) {
                    self.event("failure", e.to_string());
                }
            }
        }
        out
    }

    async fn run_session(
        &self,
        req: SessionRequest,
        on_text: impl FnMut(&str) + Send + 'static,
    ) -> Result<(String, GenerateStats), SessionError> {
        req.sampling
            .validate()
            .map_err(|e| SessionError::BadRequest(e.to_string()))?;
        if req.prompt.is_empty() {
            return Err(SessionError::BadRequest("the prompt is empty".into()));
        }
        let context = self.model.config.context;
        if req.prompt.len() >= context {
            return Err(SessionError::BadRequest(format!(
                "the prompt has {} tokens; the model's context is {context}",
                req.prompt.len()
            )));
        }
        // Waiting here, rather than overfilling the nodes' caches, keeps every session whole.
        let _slot = self.share.acquire(req.member).await;
        let handle = req.handle.clone();
        let (id, _, mut pipe) = self
            .open_session(req.sampling.clone(), handle.clone())
            .await?;
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id,
                SessionInfo {
                    started: potluck_net::swarm::unix_now(),
                    prompt_tokens: req.prompt.len(),
                    handle: handle.clone(),
                },
            );
        self.metrics.sessions.inc();
        let _registered = Registered {
            sessions: self.sessions.clone(),
            id,
            metrics: self.metrics.clone(),
        };
        self.metrics.tokens_in.inc_by(req.prompt.len() as u64);
        // Driven here, on the async side: a session waiting on its nodes costs its state,
        // not a thread.
        let request = GenerateRequest {
            prompt: &req.prompt,
            max_tokens: req.max_tokens,
            stop: &req.stop,
        };
        let out = drive(&mut pipe, &self.model.tokenizer, &request, on_text).await;
        pipe.close().await;
        out.map_err(|e| {
            if handle.cancelled.load(Ordering::Relaxed) {
                SessionError::Cancelled
            } else {
                SessionError::Failed(e)
            }
        })
    }

    /// What a session's pipeline needs to know about the model.
    fn chain_model(&self) -> ChainModel {
        let cfg = &self.model.config;
        ChainModel {
            digest: self.model.model.digest,
            hidden: cfg.hidden,
            vocab: cfg.vocab,
            context: cfg.context,
        }
    }
}

/// Runs a generation's steps through `pipe` until it ends; the error says why it did not.
async fn drive(
    pipe: &mut RemotePipeline,
    tok: &potluck_engine::tokenizer::TextTokenizer,
    req: &GenerateRequest<'_>,
    mut on_text: impl FnMut(&str),
) -> Result<(String, GenerateStats), String> {
    let mut generation = Generation::new(tok, req, pipe.context()).map_err(|e| e.to_string())?;
    while let Some((pos, input)) = generation.next_step() {
        let token = pipe
            .step(pos, input, generation.history())
            .await
            .map_err(|e| e.to_string())?;
        generation
            .accept(token, &mut on_text)
            .map_err(|e| e.to_string())?;
    }
    Ok(generation.finish(&mut on_text))
}

/// `spans` with each one's peer id (a key that names none is left out, which a verified
/// advert's key never is).
fn with_peer_ids(spans: Vec<Span>) -> Vec<(Span, PeerId)> {
    spans
        .into_iter()
        .filter_map(|s| peer_id_of(&s.peer).map(|p| (s, p)))
        .collect()
}

impl Reroute for Coordinator {
    fn reroute(
        &self,
        start: u32,
        end: u32,
        avoid: &HashSet<PeerId>,
    ) -> Result<Option<Vec<(Span, PeerId)>>, String> {
        if let Some(why) = self.core().no_plan() {
            return Err(why);
        }
        Ok(self.route_blocks(start, end, avoid))
    }

    fn excluded(&self, peer: PeerId) -> bool {
        Coordinator::excluded(self, peer)
    }

    fn failed(&self, peer: PeerId, why: &PipelineError) {
        self.metrics.failure("stage");
        match why.misbehaving_peer() {
            Some(p) => self.drop_peer(p, &why.to_string()),
            None => self.suspect(peer, &why.to_string()),
        }
    }

    fn busy(&self, peer: PeerId) -> bool {
        key_of_peer(&peer).is_some_and(|k| self.core().answering(&k, Instant::now()))
    }

    fn measured(&self, peer: PeerId, secs: f64, positions: usize) {
        if let Some(key) = key_of_peer(&peer) {
            self.core().measured(key, secs, positions, Instant::now());
        }
    }
}

impl Checks for Coordinator {
    fn pick(&self, peer: PeerId) -> bool {
        self.pick_for_check(peer)
    }

    fn check_later(&self, job: CheckJob) {
        Coordinator::check_later(self, job);
    }

    fn quarantined(&self, peer: PeerId) -> bool {
        self.is_quarantined(peer)
    }

    fn twin(&self, range: LayerRange, not: &[PeerId]) -> Option<(Span, PeerId)> {
        self.replica(range, not)
    }

    fn decider(
        &self,
        range: LayerRange,
        not: &[PeerId],
        disputants: &[PeerId],
    ) -> Option<(Span, PeerId)> {
        let proven = disputants.iter().any(|p| self.proven(*p));
        self.third_opinion(self.replicas(range, not), |(_, p)| *p, proven, disputants)
    }

    fn disputed(&self, peer: PeerId, why: &str) {
        self.record_trust(peer, crate::compare::Verdict::Fail);
        self.quarantine(peer, why);
    }
}
