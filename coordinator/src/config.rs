//! How a coordinator is run: every setting `potluck coordinator` and `up` pass to the
//! daemon, with its defaults.

use crate::model::EmbeddingModel;
use crate::share::MemberSpec;
use libp2p::{Multiaddr, PeerId};
use potluck_net::gate::PoolMembership;
use std::path::PathBuf;
use std::time::Duration;

/// How a coordinator is run.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Identity and state.
    pub data_dir: PathBuf,
    /// The pool it coordinates, and what it presents to the pool's nodes.
    pub pool: PoolMembership,
    /// A private pool's folder, watched for revocations (none: the coordinator learns
    /// them only from its peers).
    pub pool_dir: Option<PathBuf>,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (a relay, when it is behind a NAT).
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN.
    pub mdns: bool,
    /// The circuit relay it serves to the pool's peers behind NATs (none: no relay).
    pub relay: Option<potluck_net::swarm::RelayLimits>,
    /// Most sessions at once (more wait); `None` sizes it by the nodes' memory.
    pub max_sessions: Option<usize>,
    /// Adverts a peer may miss before it is dropped.
    pub missed_heartbeats: u32,
    /// Least share of a trusted peer's results that is spot-checked (new peers: all).
    pub check_share: f64,
    /// Every hop on two peers, a token released only when they agree.
    pub strict: bool,
    /// Time between rounds of canaries (none: no canaries).
    pub canary_interval: Option<Duration>,
    /// The sentence encoder `/v1/embeddings` runs on nodes holding it (none: no embeddings).
    pub embedding_model: Option<EmbeddingModel>,
    /// Agreeing results, of different origins, that validate a batch unit.
    pub batch_quorum: usize,
    /// How much the job store may hold.
    pub store_limits: crate::batch::store::Limits,
    /// How long finished batches and unused uploads are kept (none: until deleted).
    pub retain: Option<Duration>,
    /// When the audit log is rotated, and how many rotated segments are kept.
    pub audit_rotation: crate::audit::Rotation,
    /// How long a work unit (a batch unit or an embedding slice) may take on a node before
    /// it is given to another.
    pub unit_timeout: Duration,
    /// Members: API keys with weights, limits, reserved sessions and certificates.
    pub members: Vec<MemberSpec>,
    /// Plain API keys (the operator's), each its own member without limits.
    pub api_keys: Vec<String>,
    /// Keep text to trusted peers: the first and last stages, embedding slices and batch
    /// units run only on members with the trusted or admin role, or on `trusted_peers`.
    pub private_edges: bool,
    /// Peers trusted with text whatever their certificate says (any pool).
    pub trusted_peers: Vec<PeerId>,
}

/// Days finished batches are kept unless told otherwise.
pub const DEFAULT_RETAIN_DAYS: u64 = 30;

/// How long a work unit may take unless told otherwise.
pub const DEFAULT_UNIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Time between canary rounds unless told otherwise.
pub const DEFAULT_CANARY_INTERVAL: Duration = Duration::from_secs(60);

impl CoordinatorConfig {
    /// A coordinator of `pool` keeping its state in `data_dir`, listening on `listen`
    /// (and on the LAN with `mdns`), with every other setting at its default.
    pub fn new(
        data_dir: PathBuf,
        pool: PoolMembership,
        listen: Vec<Multiaddr>,
        mdns: bool,
    ) -> Self {
        Self {
            data_dir,
            pool,
            pool_dir: None,
            listen,
            bootstrap: Vec::new(),
            mdns,
            relay: Some(potluck_net::swarm::RelayLimits::default()),
            max_sessions: None,
            missed_heartbeats: crate::peer_table::DEFAULT_MISSED_HEARTBEATS,
            check_share: crate::trust::DEFAULT_P_MIN,
            strict: false,
            canary_interval: Some(DEFAULT_CANARY_INTERVAL),
            embedding_model: None,
            batch_quorum: crate::batch::DEFAULT_QUORUM,
            store_limits: crate::batch::store::Limits::default(),
            retain: Some(Duration::from_secs(DEFAULT_RETAIN_DAYS * 86_400)),
            audit_rotation: crate::audit::Rotation::default(),
            unit_timeout: DEFAULT_UNIT_TIMEOUT,
            members: Vec::new(),
            api_keys: Vec::new(),
            private_edges: false,
            trusted_peers: Vec::new(),
        }
    }
}
