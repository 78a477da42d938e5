//! The coordinator's live view of its pool and what it does with it: peers from verified
//! adverts, the current plan, which peers have confirmed loading their span, assignments
//! sent over control streams, and sessions routed through confirmed spans.

mod canary;
mod checks;
mod embed_checks;
mod work;

pub(crate) use work::{embedded, verify_work, Refusal};
pub use work::{Embedded, WorkTally};

use crate::audit::AuditLog;
use crate::config::CoordinatorConfig;
use crate::metrics::Metrics;
use crate::model::{EmbeddingModel, ServedModel};
use crate::origin::{Connections, Origin};
use crate::peer_table::PeerTable;
use crate::pipeline::CheckJob;
use crate::pipeline::{
    ChainModel, Checks, PipelineError, RemotePipeline, Reroute, SessionContext, SessionHandle,
};
use crate::planner::{plan, Plan, PlanPeer, Span};
use crate::queue::{queued_ms_per_block, StepTimes};
use crate::redial::{Due, Redials};
use crate::router::{route_range, PeerCost};
use crate::share::{MemberId, Share};
use crate::trust::Trust;
use libp2p::swarm::ConnectionId;
use libp2p::PeerId;
use potluck_engine::generate::{GenerateRequest, GenerateStats, Generation};
use potluck_engine::sampling::SamplingParams;
use potluck_net::gate::Gate;
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
/// How long to wait before re-sending a failed assignment.
pub const ASSIGN_RETRY: Duration = Duration::from_secs(10);
/// How long a peer that failed a step stays out of plans and routes (it comes back after,
/// if it is still advertising).
pub const SUSPECT_FOR: Duration = Duration::from_secs(20);
/// How long a leaving peer stays out of plans (its adverts stop; it is gone by then).
pub const LEAVE_BAN: Duration = Duration::from_secs(60);
/// A peer whose connection answered a ping this recently is alive, however late its adverts
/// or answers (pings come every 5 s; two may be lost to a loaded machine).
pub const ALIVE_WINDOW: Duration = Duration::from_secs(12);
/// How long a peer that broke the protocol or sent an unverifiable result stays out.
pub const BAN: Duration = Duration::from_secs(600);
/// Sessions a coordinator lets start before its first plan sizes the count by the nodes'
/// memory (see [`crate::capacity`]).
pub const DEFAULT_MAX_SESSIONS: usize = 32;
/// Events the dashboard keeps.
pub const EVENT_LOG: usize = 50;
/// Round trip assumed for peers not yet pinged, milliseconds.
const DEFAULT_RTT_MS: f64 = 1.0;

/// How long a peer that failed a spot check stays out.
pub const QUARANTINE: Duration = Duration::from_secs(3600);
/// Spot checks run at once; more wait (they must not crowd out generation).
const CONCURRENT_CHECKS: usize = 2;

/// Why a peer is out of plans and routes, weakest first: a stronger reason is never
/// overridden by a weaker one while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exclusion {
    /// It failed a step; it comes back after [`SUSPECT_FOR`].
    Failed,
    /// Its connection closed; it is back when it can be reached again.
    Unreachable,
    /// It announced it is leaving.
    Leaving,
    /// It broke the protocol or sent a result that does not verify.
    Dropped,
    /// A recomputation of its work disagreed with it.
    Quarantined,
}

impl Exclusion {
    /// A short name for the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            Exclusion::Failed => "failed",
            Exclusion::Unreachable => "unreachable",
            Exclusion::Leaving => "leaving",
            Exclusion::Dropped => "dropped",
            Exclusion::Quarantined => "quarantined",
        }
    }
}

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
    /// Its chain: peer id and blocks.
    pub chain: Vec<(String, LayerRange)>,
    /// Its live counters and cancel switch.
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

/// What the coordinator tracks about the pool.
pub struct PoolState {
    /// Verified peers.
    pub table: PeerTable,
    /// The current plan, if the pool can hold the model.
    pub plan: Option<Plan>,
    /// Why there is no plan.
    pub plan_error: Option<String>,
    /// Spans each peer confirmed it serves, on this coordinator's assignment: the only
    /// spans routed to, checked against or asked for second opinions.
    loaded: HashMap<PublicKey, LayerRange>,
    /// Spans peers' adverts say they hold that this coordinator has not assigned (a
    /// restarted coordinator's nodes, or a claim): a hint for its first plan, which then
    /// assigns them like any other span. A claim alone is never served from.
    claimed: HashMap<PublicKey, LayerRange>,
    /// Assignments in flight.
    pending: HashSet<PublicKey>,
    /// When failed assignments may be sent again.
    retry_at: HashMap<PublicKey, Instant>,
    /// Peers whose last assignment failed while no connection to them was open: tried
    /// again as soon as one opens (a node that joined through another node dials in).
    unconnected: HashSet<PublicKey>,
    /// Peers left out of plans until the given time, and why.
    banned: HashMap<PublicKey, (Instant, Exclusion)>,
    /// Peers whose connection closed at the given unix time: what their adverts from before
    /// then say they hold is not trusted (a restarted node has lost its layers).
    stale_since: HashMap<PublicKey, u64>,
    /// Unreachable peers being tried again.
    redials: Redials<PublicKey>,
    /// How far each peer is trusted, and the draws that pick its results for checks.
    pub trust: Trust<PublicKey>,
    /// Whole-model work each peer has done.
    pub work: HashMap<PublicKey, WorkTally>,
}

impl PoolState {
    /// Whether `key` is out of plans and routes now (failed, dropped or leaving).
    pub fn is_excluded(&self, key: &PublicKey) -> bool {
        self.exclusion(key).is_some()
    }

    /// Why `key` is out of plans and routes now, if it is.
    pub fn exclusion(&self, key: &PublicKey) -> Option<Exclusion> {
        self.banned
            .get(key)
            .filter(|(until, _)| *until > Instant::now())
            .map(|(_, why)| *why)
    }

    /// The key of a known peer, by its libp2p id (which carries the key: no scan).
    pub fn key_of(&self, peer: PeerId) -> Option<PublicKey> {
        key_of_peer(&peer).filter(|k| self.table.get(k).is_some())
    }
}

/// A handle on the running coordinator; cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    model: Arc<ServedModel>,
    state: Arc<Mutex<PoolState>>,
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
    /// Told of every peer quarantined (the job store voids its credit).
    on_quarantine: Option<Arc<dyn Fn(PeerId) + Send + Sync>>,
    /// Whether text stays on trusted peers, and the peers trusted by name.
    private_edges: Arc<PrivateEdges>,
    audit: Option<AuditLog>,
    checks: Arc<tokio::sync::Semaphore>,
    /// Sessions each peer serves now (counted from routing to the session's end).
    busy: Arc<Mutex<HashMap<PeerId, usize>>>,
    /// When each peer's connection last answered a ping: the proof of life that adverts
    /// (which a busy node may send late) and step answers (behind a long queue) are not.
    pinged: Arc<Mutex<HashMap<PeerId, Instant>>>,
    /// How long decode steps took on each peer lately: its measured queue.
    step_times: Arc<Mutex<StepTimes<PeerId>>>,
    /// Each peer's open connections: its network, for [`Coordinator::origin`].
    remote: Arc<Mutex<HashMap<PeerId, Connections<ConnectionId>>>>,
    /// Held while a session is routed and counted.
    routing: Arc<tokio::sync::Mutex<()>>,
    /// Every hop on two peers that must agree (`--verify strict`).
    strict: bool,
    /// Jobs two peers agreed on, for canaries.
    canaries: Arc<Mutex<canary::CanaryBank>>,
    /// The sentence encoder embedding requests run on.
    embedding_model: Option<EmbeddingModel>,
    /// The batch runner and its store, when the coordinator keeps one.
    /// How long a work unit may take on a node.
    unit_timeout: Duration,
    /// Whether the session count follows the nodes' memory (no `--max-sessions`).
    auto_sessions: bool,
}

/// Counts a session on its chain's peers until it ends.
struct Load {
    busy: Arc<Mutex<HashMap<PeerId, usize>>>,
    peers: Vec<PeerId>,
}

impl Load {
    fn new(busy: Arc<Mutex<HashMap<PeerId, usize>>>, peers: Vec<PeerId>) -> Self {
        {
            let mut b = busy.lock().unwrap_or_else(|p| p.into_inner());
            for p in &peers {
                *b.entry(*p).or_default() += 1;
            }
        }
        Self { busy, peers }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        for p in &self.peers {
            if let Some(n) = b.get_mut(p) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    b.remove(p);
                }
            }
        }
    }
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
        Self {
            model: Arc::new(model),
            state: Arc::new(Mutex::new(PoolState {
                table: PeerTable::new(&pool).with_missed_heartbeats(cfg.missed_heartbeats),
                plan: None,
                plan_error: None,
                loaded: HashMap::new(),
                claimed: HashMap::new(),
                pending: HashSet::new(),
                retry_at: HashMap::new(),
                unconnected: HashSet::new(),
                banned: HashMap::new(),
                stale_since: HashMap::new(),
                redials: Redials::new(),
                trust: Trust::new(p_min, u64::from_le_bytes(seed)),
                work: HashMap::new(),
            })),
            control,
            next_session: Arc::new(AtomicU64::new(u64::from_le_bytes(seed) >> 1)),
            changed: Arc::new(Notify::new()),
            metrics: Arc::new(Metrics::new()),
            sessions: Arc::new(Mutex::new(BTreeMap::new())),
            events: Arc::new(Mutex::new(VecDeque::new())),
            local: Arc::new(Mutex::new(HashSet::new())),
            share,
            gate: None,
            on_quarantine: None,
            private_edges: Arc::new(PrivateEdges {
                enabled: cfg.private_edges,
                trusted: cfg.trusted_peers.iter().copied().collect(),
            }),
            audit,
            checks: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHECKS)),
            busy: Arc::new(Mutex::new(HashMap::new())),
            pinged: Arc::new(Mutex::new(HashMap::new())),
            step_times: Arc::new(Mutex::new(StepTimes::default())),
            remote: Arc::new(Mutex::new(HashMap::new())),
            routing: Arc::new(tokio::sync::Mutex::new(())),
            strict: cfg.strict,
            canaries: Arc::new(Mutex::new(canary::CanaryBank::default())),
            embedding_model: cfg.embedding_model.clone(),
            unit_timeout: cfg.unit_timeout,
            auto_sessions: cfg.max_sessions.is_none(),
        }
    }

    /// The same coordinator, checking members' certificates against `gate`'s pool.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The same coordinator, calling `hook` with every peer it quarantines (so what keeps
    /// the peer's credit can void it without the pool owning it).
    pub fn on_quarantine(mut self, hook: impl Fn(PeerId) + Send + Sync + 'static) -> Self {
        self.on_quarantine = Some(Arc::new(hook));
        self
    }

    /// Whether the peer with `key` may be sent what runs on `range`: a first or last
    /// stage's inputs or outputs are the prompt's tokens and the text, so those go only to
    /// peers that may see text. Spot checks, strict-mode twins and canaries pick their
    /// peers through it (see `serving`); plans apply the same rule through
    /// [`PlanPeer::edge_ok`], and routes only follow plans.
    pub fn may_serve(&self, key: &PublicKey, range: LayerRange) -> bool {
        let edge = range.start == 0 || range.end >= self.model.shape.layers;
        !edge || self.may_see_text(key)
    }

    /// Whether the peer with `key` may see the pool's text: always, unless the pool keeps
    /// text to trusted peers (`--private-edges`), then only peers named trusted or admitted
    /// with a trusted or admin certificate.
    pub fn may_see_text(&self, key: &PublicKey) -> bool {
        if !self.private_edges.enabled {
            return true;
        }
        let Some(peer) = peer_id_of(key) else {
            return false;
        };
        self.private_edges.trusted.contains(&peer)
            || self
                .gate
                .as_ref()
                .and_then(|g| g.role(&peer))
                .is_some_and(Role::sees_text)
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
        // An assignment that failed for want of a connection (a node that joined through
        // another node and has just dialled in) is tried again at once, not at its retry;
        // one the peer refused or failed keeps its wait.
        let mut st = self.state();
        if let Some(key) = st.key_of(peer) {
            if st.unconnected.remove(&key) {
                st.retry_at.remove(&key);
            }
        }
    }

    /// Notes that `peer`'s `connection` closed; its other connections still say where
    /// it is.
    pub fn connection_closed(&self, peer: PeerId, connection: ConnectionId) {
        let mut remote = self.remote.lock().unwrap_or_else(|p| p.into_inner());
        if remote
            .get_mut(&peer)
            .is_some_and(|open| open.closed(&connection))
        {
            remote.remove(&peer);
        }
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
        let st = self.state();
        (
            st.loaded.get(key).copied(),
            st.pending.contains(key),
            st.exclusion(key),
        )
    }

    /// The served model.
    pub fn model(&self) -> &ServedModel {
        &self.model
    }

    /// The pool state, locked. Poisoning is recovered from: the state stays consistent
    /// because every update is a single assignment.
    pub fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what a peer's advert says it holds, and forgets departed peers' spans.
    pub fn sync_loaded(&self) {
        let mut back = Vec::new();
        {
            let mut guard = self.state();
            let st = &mut *guard;
            let present: HashSet<PublicKey> = st.table.peers().iter().map(|p| p.key).collect();
            st.loaded.retain(|k, _| present.contains(k));
            st.claimed.retain(|k, _| present.contains(k));
            st.pending.retain(|k| present.contains(k));
            // An advert issued after a peer was found unreachable brings it back.
            let fresh: Vec<PublicKey> = st
                .stale_since
                .iter()
                .filter(|(k, since)| st.table.get(k).is_none_or(|p| p.advert.issued_at > **since))
                .map(|(k, _)| *k)
                .collect();
            for key in fresh {
                st.stale_since.remove(&key);
                let tries = st.redials.reached(&key);
                if st.exclusion(&key) == Some(Exclusion::Unreachable) && present.contains(&key) {
                    st.banned.remove(&key);
                    back.push((key, tries.unwrap_or(0)));
                }
            }
            for p in st.table.peers() {
                let Some((m, range)) = &p.advert.loaded else {
                    continue;
                };
                if st.stale_since.contains_key(&p.key) {
                    continue;
                }
                // An assignment in flight reports itself when it is answered; an excluded
                // peer's span does not count until it is back.
                let answering = st.pending.contains(&p.key);
                if m == &self.model.model
                    && range.end <= self.model.shape.layers
                    && !answering
                    && !st.is_excluded(&p.key)
                    && !st.loaded.contains_key(&p.key)
                {
                    st.claimed.insert(p.key, *range);
                }
            }
        }
        for (key, tries) in &back {
            let who = peer_id_of(key).map(|p| p.to_string()).unwrap_or_default();
            let line = format!("peer back {who} after {tries} dials");
            self.say(Some("peer"), line);
        }
        if !back.is_empty() {
            self.replan();
        }
        self.changed.notify_waiters();
    }

    /// Leaves `peer` out of every plan for [`BAN`] and re-plans around it.
    pub fn drop_peer(&self, peer: PeerId, reason: &str) {
        let line = format!("peer dropped {peer}: {reason}");
        self.exclude(peer, BAN, Exclusion::Dropped, "check", line);
    }

    /// Leaves `peer` out of plans and routes for `span` (unless a stronger exclusion is in
    /// force), tells operators why (`kind` on the dashboard) and re-plans around it.
    /// Returns whether it took effect.
    fn exclude(
        &self,
        peer: PeerId,
        span: Duration,
        why: Exclusion,
        kind: &'static str,
        line: String,
    ) -> bool {
        {
            let mut st = self.state();
            let Some(key) = st.key_of(peer) else {
                return false;
            };
            if st.exclusion(&key).is_some_and(|now| now > why) {
                return false;
            }
            st.banned.insert(key, (Instant::now() + span, why));
            st.loaded.remove(&key);
            if why == Exclusion::Unreachable {
                st.stale_since.insert(key, potluck_net::swarm::unix_now());
                st.redials.start(key, Instant::now());
            }
        }
        self.say(Some(kind), line);
        self.replan();
        true
    }

    /// `peer` cannot be reached (`why`: its connection closed, it missed its adverts):
    /// routes avoid it while it is dialled again, until it advertises anew or is gone (see
    /// [`crate::redial`]). Nothing happens if it is unknown, already unreachable, leaving or
    /// dropped.
    pub fn unreachable(&self, peer: PeerId, why: &str) {
        let already = {
            let st = self.state();
            st.key_of(peer)
                .is_none_or(|k| st.exclusion(&k) >= Some(Exclusion::Unreachable))
        };
        if !already {
            let line = format!("peer unreachable {peer}: {why}");
            self.exclude(peer, BAN, Exclusion::Unreachable, "failure", line);
        }
    }

    /// Peers whose adverts stopped (missed heartbeats or expired at unix time `now`):
    /// unreachable, unless they were on their way out anyway, then forgotten. A peer that
    /// `alive` vouches for (its connection answers now) and whose advert is still valid is
    /// late, not gone: a node busy computing, or one whose first adverts came close
    /// together, is never dropped for it.
    pub fn expire_silent(&self, now: u64, alive: impl Fn(PeerId) -> bool) {
        let silent = self.state().table.silent(now);
        for key in silent {
            let Some(peer) = peer_id_of(&key) else {
                self.state().table.remove(&key);
                continue;
            };
            let expired = self
                .state()
                .table
                .get(&key)
                .is_none_or(|p| p.advert.expires_at <= now);
            if !expired && alive(peer) {
                tracing::debug!(%peer, "adverts late, but its connection answers");
                continue;
            }
            let leaving = self
                .state()
                .exclusion(&key)
                .is_some_and(|w| w > Exclusion::Unreachable);
            if leaving {
                self.state().table.remove(&key);
                let line = format!("peer left {peer} (advert expired)");
                self.say(Some("peer"), line);
                self.sync_loaded();
            } else {
                self.unreachable(peer, "its adverts stopped");
            }
        }
    }

    /// Peers to dial again now; peers whose tries are spent are gone from the pool (they
    /// join anew if they advertise again).
    pub fn due_redials(&self) -> Vec<PeerId> {
        let due = self.state().redials.due(Instant::now());
        let mut dial = Vec::new();
        for (key, what) in due {
            let who = peer_id_of(&key);
            let name = who.map(|p| p.to_string()).unwrap_or_default();
            match what {
                Due::Dial { try_no, next_in } => {
                    self.say(
                        None,
                        format!(
                            "peer {name} not back; dialling it (try {try_no}), next step in {:.1} s",
                            next_in.as_secs_f32()
                        ),
                    );
                    dial.extend(who);
                }
                Due::Gone => {
                    {
                        let mut st = self.state();
                        st.table.remove(&key);
                        st.banned.remove(&key);
                        st.stale_since.remove(&key);
                    }
                    let line = format!(
                        "peer gone {name}: not back after {} dials",
                        crate::redial::TRIES
                    );
                    self.say(Some("peer"), line);
                    self.sync_loaded();
                    self.replan();
                }
            }
        }
        dial
    }

    /// The peers a plan may use, with the speeds it plans them by: measured where this
    /// coordinator has timed their steps (`quickest`, seconds per step by peer), claimed
    /// otherwise (see [`crate::planner::planning_speed`]), in the adverts' unit (GB/s).
    /// Routing estimates unmeasured peers by the same speeds.
    fn planning_peers(&self, st: &PoolState, quickest: &HashMap<PeerId, f64>) -> Vec<PlanPeer> {
        let layer_bytes = self.model.shape.layer_bytes as f64;
        let measured = |p: &crate::peer_table::Peer| {
            let secs = quickest.get(&peer_id_of(&p.key)?)?;
            let blocks = st.loaded.get(&p.key)?.len().max(1);
            let rtt_ms = p.rtt_ms.map_or(DEFAULT_RTT_MS, f64::from);
            let ms_per_block = (secs * 1e3 - rtt_ms).max(1e-3) / f64::from(blocks);
            Some(layer_bytes / (ms_per_block * 1e6))
        };
        let candidates: Vec<(&crate::peer_table::Peer, Option<f64>)> = st
            .table
            .peers()
            .into_iter()
            .filter(|p| !st.is_excluded(&p.key))
            .filter(|p| p.advert.models.contains(&self.model.model))
            .map(|p| (p, measured(p)))
            .collect();
        let fastest = candidates
            .iter()
            .filter_map(|(_, m)| *m)
            .max_by(f64::total_cmp);
        candidates
            .into_iter()
            .map(|(p, m)| PlanPeer {
                id: p.key,
                speed: crate::planner::planning_speed(f64::from(p.advert.mem_gbps), m, fastest)
                    .max(1e-3),
                memory_bytes: p.advert.memory_bytes,
                edge_ok: self.may_see_text(&p.key),
            })
            .collect()
    }

    /// Re-plans for the peers now known and sends every assignment not yet confirmed.
    pub fn replan(&self) {
        let quickest = self
            .step_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .quickest();
        let mut st = self.state();
        let peers = self.planning_peers(&st, &quickest);
        if peers.is_empty() && st.plan.is_none() {
            st.plan_error = Some("no peer offers the model yet".into());
            return;
        }
        // A restarted coordinator starts from what the nodes say they hold, so it comes back
        // to the same plan instead of making them reload; it still assigns each span.
        let previous = st.plan.clone().or_else(|| {
            let mut held = st.claimed.clone();
            held.extend(st.loaded.iter().map(|(k, r)| (*k, *r)));
            let mut spans: Vec<Span> = held
                .iter()
                .map(|(k, r)| Span {
                    peer: *k,
                    range: *r,
                })
                .collect();
            spans.sort_by_key(|s| (s.range.start, s.peer.0));
            (!spans.is_empty()).then_some(Plan { epoch: 1, spans })
        });
        match plan(&self.model.shape, &peers, previous.as_ref()) {
            Ok(p) => {
                if st.plan.as_ref().map(|q| q.epoch) != Some(p.epoch) {
                    let line = format!(
                        "plan epoch {}: {} ({})",
                        p.epoch,
                        describe(&p),
                        p.explain(self.model.shape.layers)
                    );
                    self.metrics.plan_changes.inc();
                    self.say(Some("plan"), line);
                }
                st.plan = Some(p);
                st.plan_error = None;
                self.size_sessions(&st);
            }
            Err(e) => {
                if st.plan_error.as_deref() != Some(&e.to_string()) {
                    self.say(None, format!("no plan: {e}"));
                }
                st.plan = None;
                st.plan_error = Some(e.to_string());
            }
        }
        let now = Instant::now();
        let Some(p) = st.plan.clone() else { return };
        for span in p.spans {
            let done = st.loaded.get(&span.peer) == Some(&span.range);
            let waiting = st.pending.contains(&span.peer)
                || st.retry_at.get(&span.peer).is_some_and(|t| *t > now);
            if done || waiting {
                continue;
            }
            st.pending.insert(span.peer);
            let assignment = ShardAssignment {
                model: self.model.model.clone(),
                layers: span.range,
                total_layers: self.model.shape.layers,
                epoch: p.epoch,
            };
            let this = self.clone();
            let peer = span.peer;
            tokio::spawn(async move { this.assign(peer, assignment).await });
        }
    }

    /// Records that `peer`'s connection answered a ping now (`false`: it closed).
    pub fn pinged(&self, peer: PeerId, answered: bool) {
        let mut p = self.pinged.lock().unwrap_or_else(|p| p.into_inner());
        if answered {
            p.insert(peer, Instant::now());
        } else {
            p.remove(&peer);
        }
    }

    /// Whether `peer`'s connection answered a ping within [`ALIVE_WINDOW`]: busy, not gone.
    pub fn alive(&self, peer: PeerId) -> bool {
        self.pinged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            .is_some_and(|t| t.elapsed() < ALIVE_WINDOW)
    }

    /// Sizes the pool's session count from its nodes' memory, unless the operator set one.
    fn size_sessions(&self, st: &PoolState) {
        if !self.auto_sessions {
            return;
        }
        let Some(plan) = st.plan.as_ref() else {
            return;
        };
        let memory = |k: &PublicKey| st.table.get(k).map(|p| p.advert.memory_bytes);
        let Some(n) = crate::capacity::pool_sessions(plan, &self.model.kv, memory) else {
            return;
        };
        let before = self.share.sessions();
        let now = self.share.resize(n);
        if now != before {
            self.say(
                None,
                format!("the pool runs {now} sessions at once (sized by its nodes' memory)"),
            );
        }
    }

    /// Sends one assignment and records the answer.
    async fn assign(&self, key: PublicKey, a: ShardAssignment) {
        let outcome = match peer_id_of(&key) {
            None => Err("not a valid peer key".to_string()),
            Some(peer) => self.send_assignment(peer, &a).await,
        };
        let connected = peer_id_of(&key).is_some_and(|p| {
            self.remote
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&p)
        });
        let mut st = self.state();
        st.pending.remove(&key);
        let who = peer_id_of(&key).map(|p| p.to_string()).unwrap_or_default();
        match outcome {
            Ok(()) => {
                self.say(
                    None,
                    format!(
                        "peer {who} serves blocks {}..{} (epoch {})",
                        a.layers.start, a.layers.end, a.epoch
                    ),
                );
                st.loaded.insert(key, a.layers);
                st.retry_at.remove(&key);
                st.unconnected.remove(&key);
            }
            Err(e) => {
                tracing::warn!(peer = %who, "assignment failed: {e}");
                st.retry_at.insert(key, Instant::now() + ASSIGN_RETRY);
                if connected {
                    st.unconnected.remove(&key);
                } else {
                    st.unconnected.insert(key);
                }
            }
        }
        drop(st);
        self.changed.notify_waiters();
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
    /// bytes; `None` if the stream ended first), all within `timeout`.
    pub(crate) async fn request(
        &self,
        peer: PeerId,
        channel: Channel,
        message: &Message,
        max: usize,
        timeout: Duration,
    ) -> Result<Option<Message>, String> {
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
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    /// The cheapest chain of confirmed spans, with each span's peer id.
    pub fn chain(&self) -> Result<Vec<(Span, PeerId)>, SessionError> {
        {
            let st = self.state();
            if st.plan.is_none() {
                return Err(SessionError::NotReady(
                    st.plan_error
                        .clone()
                        .unwrap_or_else(|| "no peers yet".into()),
                ));
            }
        }
        self.route_blocks(0, self.model.shape.layers, &HashSet::new())
            .ok_or_else(|| SessionError::NotReady("spans are still loading".into()))
    }

    /// The cheapest chain of confirmed spans over blocks `start..end`, avoiding `avoid`.
    /// A peer's compute counts as its measured queue (see [`queued_ms_per_block`]: the
    /// longer of its estimate, from the speed plans give it (a claim counts for no more
    /// than the fastest measured peer), and its recent steps, times the sessions it runs,
    /// so replicas share the load and a slow or crowded one gets fewer) and more the less
    /// it is trusted (by the lower bound of its reputation, so new peers get work, but
    /// after proven ones).
    fn route_blocks(
        &self,
        start: u32,
        end: u32,
        avoid: &HashSet<PeerId>,
    ) -> Option<Vec<(Span, PeerId)>> {
        let load = self.busy.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (times, now) = (
            self.step_times.lock().unwrap_or_else(|p| p.into_inner()),
            Instant::now(),
        );
        let st = self.state();
        let plan = st.plan.as_ref()?;
        let confirmed = Plan {
            epoch: plan.epoch,
            spans: plan
                .spans
                .iter()
                .filter(|s| st.loaded.get(&s.peer) == Some(&s.range))
                .filter(|s| peer_id_of(&s.peer).is_some_and(|p| !avoid.contains(&p)))
                .cloned()
                .collect(),
        };
        let layer_bytes = self.model.shape.layer_bytes as f64;
        // A claimed speed counts for no more than the fastest measured one, as in plans.
        let speeds: HashMap<PublicKey, f64> = self
            .planning_peers(&st, &times.quickest())
            .into_iter()
            .map(|p| (p.id, p.speed))
            .collect();
        let blocks: HashMap<PublicKey, u32> = confirmed
            .spans
            .iter()
            .map(|s| (s.peer, s.range.len()))
            .collect();
        let cost = |key: &PublicKey| {
            let peer = st.table.get(key)?;
            let id = peer_id_of(key);
            let busy = id.and_then(|p| load.get(&p)).copied().unwrap_or(0);
            let measured = id.and_then(|p| times.recent(&p, now)).map(|s| s * 1e3);
            let blocks = blocks.get(key).copied().unwrap_or(1);
            let rtt_ms = peer.rtt_ms.map_or(DEFAULT_RTT_MS, f64::from);
            let speed = speeds
                .get(key)
                .copied()
                .unwrap_or_else(|| f64::from(peer.advert.mem_gbps));
            let estimate = layer_bytes / (speed.max(1e-3) * 1e6);
            let distrust = 1.5 - 0.5 * st.trust.get(key).lower_bound();
            Some(PeerCost {
                rtt_ms,
                ms_per_block: queued_ms_per_block(estimate, measured, rtt_ms, blocks, busy)
                    * distrust,
            })
        };
        route_range(&confirmed, start, end, cost, &HashSet::new())?
            .into_iter()
            .map(|s| peer_id_of(&s.peer).map(|p| (s, p)))
            .collect()
    }

    /// A peer announced it is leaving: plan and route around it at once; its running
    /// sessions move away at their next step.
    pub fn leaving(&self, peer: PeerId, reason: &str) {
        let line = format!("peer leaving {peer}: {reason}");
        self.exclude(peer, LEAVE_BAN, Exclusion::Leaving, "peer", line);
    }

    /// A peer that announced it was leaving (a paused node) advertises again: it is back in
    /// plans and routes.
    pub fn back_from_leave(&self, key: &PublicKey) {
        let back = {
            let mut st = self.state();
            let leaving = st.exclusion(key) == Some(Exclusion::Leaving);
            if leaving {
                st.banned.remove(key);
            }
            leaving
        };
        if back {
            let who = peer_id_of(key).map(|p| p.to_string()).unwrap_or_default();
            let line = format!("peer back {who}: advertising again");
            self.say(Some("peer"), line);
            self.replan();
        }
    }

    /// Whether `peer` is out of plans and routes now (failed, dropped or leaving).
    pub fn excluded(&self, peer: PeerId) -> bool {
        let st = self.state();
        st.key_of(peer).is_some_and(|k| st.is_excluded(&k))
    }

    /// Leaves a peer that failed a step out of plans and routes for [`SUSPECT_FOR`] and
    /// re-plans around it.
    pub fn suspect(&self, peer: PeerId, reason: &str) {
        let line = format!("peer failed {peer}: {reason}");
        self.exclude(peer, SUSPECT_FOR, Exclusion::Failed, "failure", line);
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
            let load = Load::new(self.busy.clone(), chain.iter().map(|(_, p)| *p).collect());
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
        let (id, chain, mut pipe) = self
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
                    chain: chain
                        .iter()
                        .map(|(s, p)| (p.to_string(), s.range))
                        .collect(),
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

/// One line per span, for operators.
pub fn describe(plan: &Plan) -> String {
    plan.spans
        .iter()
        .map(|s| {
            let who = peer_id_of(&s.peer)
                .map(|p| p.to_string())
                .unwrap_or_default();
            format!("{who} {}..{}", s.range.start, s.range.end)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Reroute for Coordinator {
    fn reroute(
        &self,
        start: u32,
        end: u32,
        avoid: &HashSet<PeerId>,
    ) -> Result<Option<Vec<(Span, PeerId)>>, String> {
        {
            let st = self.state();
            if st.plan.is_none() {
                return Err(st
                    .plan_error
                    .clone()
                    .unwrap_or_else(|| "the pool has no plan".into()));
            }
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
        let answering = self
            .step_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .answering(&peer, Instant::now(), ALIVE_WINDOW);
        answering && self.alive(peer)
    }

    fn measured(&self, peer: PeerId, secs: f64, positions: usize) {
        let mut times = self.step_times.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        times.answered(peer, now);
        // Decode steps are what a new session will wait on; prefills cost by their length.
        if positions == 1 {
            times.observe(peer, secs, now);
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
