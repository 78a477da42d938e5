//! `potluck coordinator`: what a coordinator serves and how (its flags), the models it
//! serves, and its HTTP API.

use super::args::PoolArgs;
use super::runtime::{runtime, stop_signal};
use crate::models::ModelCache;
use anyhow::{Context, Result};
use clap::Args;
use potluck_coordinator::config::CoordinatorConfig;
use potluck_coordinator::daemon as coordinator;
use potluck_coordinator::http::{AppState, HttpOptions};
use potluck_coordinator::model::{EmbeddingModel, ServedModel};
use potluck_coordinator::pool::Coordinator;
use potluck_net::gate::PoolMembership;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `potluck coordinator`.
#[derive(Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// What a coordinator serves and where.
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Model to serve: short name, Hugging Face id or path.
    #[arg(long, default_value = crate::catalog::DEFAULT_MODEL)]
    pub model: String,
    /// Address of the OpenAI-compatible HTTP API and the dashboard.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// A peer to dial at start, with its /p2p/ id (repeatable): a relay on a public address
    /// that this coordinator, behind a NAT with --relay off, is reached through.
    #[arg(long)]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// An API key clients must send as a bearer token (repeatable); none: the API is open.
    #[arg(long)]
    pub api_key: Vec<String>,
    /// A file of API keys, one per line (blank lines and # comments are skipped).
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// The pool's members (JSON: {"members": [{"name", "api_key", "certificate", "weight",
    /// "requests_per_minute", "tokens_per_day", "reserved_sessions"}]}): their keys, shares,
    /// limits and reserved sessions. See docs/pools.md.
    #[arg(long)]
    pub members: Option<PathBuf>,
    /// Adverts a node may miss before it is dropped from routing (at least 2; the node's own
    /// advert validity, 3 intervals, also ends it).
    #[arg(long, default_value_t = potluck_coordinator::peer_table::DEFAULT_MISSED_HEARTBEATS)]
    pub missed_heartbeats: u32,
    /// Most sessions the pool runs at once; further requests wait their turn. By default
    /// as many as the nodes' KV caches hold at 512 positions a session, following the plan.
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Seconds a client gets to send its request headers (and three times that for its
    /// whole body, however the bytes come).
    #[arg(long, default_value_t = 10)]
    pub http_header_timeout: u64,
    /// HTTP connections held open at once; more are closed as they come.
    #[arg(long, default_value_t = potluck_coordinator::http::limits::DEFAULT_MAX_CONNECTIONS)]
    pub http_max_connections: usize,
    /// Requests one API key (or, without keys, the whole API) may have in flight at once,
    /// streams included; more get 429.
    #[arg(long, default_value_t = potluck_coordinator::http::limits::DEFAULT_MAX_REQUESTS_PER_KEY)]
    pub max_requests_per_key: usize,
    /// Least share of a trusted node's jobs recomputed on another node and compared (new
    /// nodes: every job until 10 in a row check out), 0 to 1; 0 turns spot checks off.
    #[arg(long, default_value_t = potluck_coordinator::trust::DEFAULT_P_MIN)]
    pub check_share: f64,
    /// How nodes' results are verified: `sampled` (spot checks beside generation) or
    /// `strict` (every hop on two nodes; a token goes out only when they agree).
    #[arg(long, default_value = "sampled")]
    pub verify: String,
    /// Seconds between rounds of canaries (jobs with known answers, sent as new work);
    /// 0: none.
    #[arg(long, default_value_t = potluck_coordinator::config::DEFAULT_CANARY_INTERVAL.as_secs())]
    pub canary_interval: u64,
    /// Sentence encoder for /v1/embeddings, run on the nodes that hold it; `none`: no
    /// embeddings. Default: all-minilm-l6-v2 when it is in the model cache.
    #[arg(long)]
    pub embedding_model: Option<String>,
    /// Agreeing results that validate a batch unit (1 to 5), each from a different
    /// operator (as private pools' certificates name them) or, where none is named, a
    /// different network (an internet /24 or /48, or a LAN host).
    #[arg(long, default_value_t = potluck_coordinator::batch::DEFAULT_QUORUM)]
    pub batch_quorum: usize,
    /// Most MiB the job store (uploaded files, batches, results) may hold; uploads and
    /// batches past it are refused with 507.
    #[arg(long, default_value_t = potluck_coordinator::batch::store::DEFAULT_MAX_STORE_BYTES >> 20)]
    pub max_store_mib: u64,
    /// MiB of the data folder's disk kept free: uploads and batches that would leave less
    /// are refused with 507.
    #[arg(long, default_value_t = potluck_coordinator::batch::store::DEFAULT_MIN_FREE_BYTES >> 20)]
    pub min_free_disk_mib: u64,
    /// Days finished batches (with their results) and unused uploads are kept; 0 keeps
    /// them until deleted. The credit ledger is always kept.
    #[arg(long, default_value_t = potluck_coordinator::config::DEFAULT_RETAIN_DAYS)]
    pub retain_days: u64,
    /// MiB at which the audit log is rotated (to audit.log.<entries>; the chain goes on in
    /// a new audit.log).
    #[arg(long, default_value_t = potluck_coordinator::audit::DEFAULT_MAX_BYTES >> 20)]
    pub audit_max_mib: u64,
    /// Rotated audit log segments kept; older ones are removed.
    #[arg(long, default_value_t = potluck_coordinator::audit::DEFAULT_KEEP)]
    pub audit_keep: usize,
    /// Keep text on trusted members: the first and last stages of every chain, embedding
    /// slices and batch units run only on nodes whose certificate has the trusted or admin
    /// role, or that --trusted-peer names.
    #[arg(long)]
    pub private_edges: bool,
    /// A node trusted with text under --private-edges, by peer id (repeatable).
    #[arg(long)]
    pub trusted_peer: Vec<libp2p::PeerId>,
    /// Seconds a work unit (a batch unit or an embedding slice) may take on a node before
    /// it goes to another.
    #[arg(long, default_value_t = potluck_coordinator::config::DEFAULT_UNIT_TIMEOUT.as_secs())]
    pub unit_timeout: u64,
}

impl ServeArgs {
    /// The configuration of a coordinator of `pool` keeping its state in `data_dir`, as
    /// these flags tune it.
    pub fn coordinator_config(
        &self,
        cache: &ModelCache,
        pool: &PoolArgs,
        data_dir: PathBuf,
    ) -> Result<CoordinatorConfig> {
        if !(0.0..=1.0).contains(&self.check_share) {
            anyhow::bail!("--check-share must be from 0 to 1");
        }
        if self.unit_timeout == 0 {
            anyhow::bail!("--unit-timeout must be at least 1 second");
        }
        if !(1..=potluck_coordinator::batch::scheduler::MAX_REPLICAS).contains(&self.batch_quorum) {
            anyhow::bail!("--batch-quorum must be from 1 to 5");
        }
        let strict = match self.verify.as_str() {
            "sampled" => false,
            "strict" => true,
            other => anyhow::bail!("--verify takes sampled or strict, not {other}"),
        };
        let cfg = CoordinatorConfig {
            max_sessions: self.max_sessions,
            missed_heartbeats: self.missed_heartbeats,
            check_share: self.check_share,
            strict,
            canary_interval: (self.canary_interval > 0)
                .then(|| Duration::from_secs(self.canary_interval)),
            embedding_model: embedding_model(cache, self.embedding_model.as_deref())?,
            batch_quorum: self.batch_quorum,
            store_limits: potluck_coordinator::batch::store::Limits {
                max_bytes: self.max_store_mib.saturating_mul(1 << 20),
                min_free_bytes: self.min_free_disk_mib.saturating_mul(1 << 20),
            },
            retain: (self.retain_days > 0)
                .then(|| Duration::from_secs(self.retain_days.saturating_mul(86_400))),
            audit_rotation: potluck_coordinator::audit::Rotation {
                max_bytes: self.audit_max_mib.max(1).saturating_mul(1 << 20),
                keep: self.audit_keep,
            },
            unit_timeout: Duration::from_secs(self.unit_timeout),
            api_keys: self.api_keys()?,
            private_edges: self.private_edges,
            trusted_peers: self.trusted_peer.clone(),
            bootstrap: self.bootstrap.clone(),
            members: self.member_specs()?,
            ..pool.coordinator_config(data_dir)?
        };
        // A private pool's API is for its members: open, it may face only this machine.
        let private = matches!(cfg.pool, PoolMembership::Private { .. });
        if private
            && cfg.members.is_empty()
            && cfg.api_keys.is_empty()
            && !self.http.ip().is_loopback()
        {
            anyhow::bail!(
                "a private pool's API on {} needs keys: give members theirs with --members, or set --api-key",
                self.http
            );
        }
        Ok(cfg)
    }

    fn member_specs(&self) -> Result<Vec<potluck_coordinator::share::MemberSpec>> {
        let Some(f) = &self.members else {
            return Ok(Vec::new());
        };
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading members from {}", f.display()))?;
        potluck_coordinator::share::parse_members(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))
    }

    fn api_keys(&self) -> Result<Vec<String>> {
        let mut keys = self.api_key.clone();
        if let Some(f) = &self.api_keys_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading API keys from {}", f.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        if keys.iter().any(|k| k.len() < 8) {
            anyhow::bail!("API keys must be at least 8 characters");
        }
        Ok(keys)
    }

    fn http_options(&self) -> Result<HttpOptions> {
        if self.http_header_timeout == 0 {
            anyhow::bail!("--http-header-timeout must be at least 1 second");
        }
        Ok(HttpOptions {
            header_timeout: Duration::from_secs(self.http_header_timeout),
            body_timeout: Duration::from_secs(3 * self.http_header_timeout),
            max_connections: self.http_max_connections,
            max_requests_per_key: self.max_requests_per_key,
        })
    }
}

/// The model a coordinator serves, read from the cache.
pub fn served_model(cache: &ModelCache, model: &str) -> Result<ServedModel> {
    let (path, model_ref) = cache.model_ref(model)?;
    ServedModel::open(&path, model_ref).with_context(|| format!("reading {}", path.display()))
}

/// The sentence encoder to serve: `flag` resolved (fetched when needed), `none` for none,
/// and without a flag the default one if it is already cached.
pub fn embedding_model(cache: &ModelCache, flag: Option<&str>) -> Result<Option<EmbeddingModel>> {
    let name = match flag {
        Some("none") => return Ok(None),
        Some(name) => name,
        None if cache
            .manifest()?
            .contains_key(crate::catalog::DEFAULT_EMBEDDING_MODEL) =>
        {
            crate::catalog::DEFAULT_EMBEDDING_MODEL
        }
        None => return Ok(None),
    };
    let (path, model) = cache.model_ref(name)?;
    if !potluck_engine::bert::Encoder::is_encoder_dir(&path) {
        anyhow::bail!(
            "{name} is not a sentence encoder (a folder with a BERT config.json and tokenizer.json)"
        );
    }
    Ok(Some(EmbeddingModel::open(&path, model)?))
}

/// Binds the HTTP API and serves it on a task; prints where.
pub(super) async fn start_http(serve: &ServeArgs, app: AppState) -> Result<SocketAddr> {
    let opts = serve.http_options()?;
    let addr = serve.http;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP API to {addr}"))?;
    let bound = listener.local_addr()?;
    println!("api listening on http://{bound}");
    tokio::spawn(async move {
        if let Err(e) = potluck_coordinator::http::serve(listener, app, opts).await {
            tracing::error!("HTTP API stopped: {e}");
        }
    });
    Ok(bound)
}

/// Runs `potluck coordinator`.
pub fn run_coordinator(cache: &ModelCache, args: CoordinatorArgs) -> Result<()> {
    let model = served_model(cache, &args.serve.model)?;
    let cfg =
        args.serve
            .coordinator_config(cache, &args.pool, args.pool.data_dir("coordinator")?)?;
    runtime()?.block_on(async {
        let running = coordinator::start(cfg, model)?;
        println!("{}", serves_line(&running.coordinator));
        start_http(&args.serve, running.app()).await?;
        stop_signal().await;
        Ok(())
    })
}

/// What a coordinator serves, in a line.
pub(super) fn serves_line(c: &Coordinator) -> String {
    let chat = format!("serving {} (chat and completions)", c.model().model.name);
    match c.embedding_model() {
        Some(e) => format!("{chat} and {} (embeddings)", e.name),
        None => format!("{chat}; no embeddings (--embedding-model NAME adds them)"),
    }
}
