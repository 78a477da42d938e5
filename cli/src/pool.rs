//! `potluck node`, `potluck coordinator` and `potluck up` (both in one process): the
//! daemons of a pool.

use crate::generate::{prompt_ids, SamplingArgs};
use crate::models::ModelCache;
use anyhow::{Context, Result};
use clap::Args;
use potluck_coordinator::config::CoordinatorConfig;
use potluck_coordinator::daemon as coordinator;
use potluck_coordinator::http::HttpOptions;
use potluck_coordinator::model::{EmbeddingModel, ServedModel};
use potluck_coordinator::pool::{Coordinator, SessionRequest};
use potluck_net::gate::PoolMembership;
use potluck_node::daemon::{self as node, NodeConfig};
use potluck_node::probe::Limits;
use potluck_node::serve::LocalModel;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Flags shared by both daemons.
#[derive(Args, Clone)]
pub struct PoolArgs {
    /// Identity, caches and state live here (one per process on a machine).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The pool to join: a public pool's name, or a private pool's name or id (its folder
    /// here, or a certificate from `potluck pool join`).
    #[arg(long, default_value = "public")]
    pub pool: String,
    /// A private pool's folder (its key and pool.json), when not the default one for --pool;
    /// a daemon holding it admits itself and watches it for revocations.
    #[arg(long)]
    pub pool_dir: Option<PathBuf>,
    /// Listen address (repeatable); default: all interfaces, TCP and QUIC, on port 7470 for
    /// a coordinator (any port if it is taken) and any port for a node.
    #[arg(long)]
    pub listen: Vec<libp2p::Multiaddr>,
    /// Turn off LAN discovery by mDNS.
    #[arg(long)]
    pub no_mdns: bool,
}

/// The port a coordinator (and `up`) listens on unless told otherwise, TCP and QUIC.
pub const COORDINATOR_PORT: u16 = 7470;

impl PoolArgs {
    /// A coordinator of this pool keeping its state in `data_dir`, otherwise at defaults.
    pub fn coordinator_config(&self, data_dir: PathBuf) -> Result<CoordinatorConfig> {
        let (pool, pool_dir) = self.membership(&data_dir, true)?;
        Ok(CoordinatorConfig {
            pool_dir,
            ..CoordinatorConfig::new(
                data_dir,
                pool,
                self.listen_at(COORDINATOR_PORT),
                !self.no_mdns,
            )
        })
    }

    /// The pool a daemon keeping its identity in `data_dir` joins (see
    /// [`crate::membership::resolve`]); `default_folder`: look for the pool's folder in the
    /// default place too (coordinators, and nodes beside one).
    fn membership(
        &self,
        data_dir: &std::path::Path,
        default_folder: bool,
    ) -> Result<(PoolMembership, Option<PathBuf>)> {
        crate::membership::resolve(
            &self.pool,
            self.pool_dir.as_deref(),
            default_folder,
            data_dir,
        )
    }

    /// The data folder: the flag, else `potluck/<role>` in the user's data folder.
    fn data_dir(&self, role: &str) -> Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => crate::data_dir::default_data_dir(role),
        }
    }

    /// The addresses to listen on: `--listen`, else every interface, TCP and QUIC, on any
    /// port.
    fn listen(&self) -> Vec<libp2p::Multiaddr> {
        self.listen_at(0)
    }

    /// [`PoolArgs::listen`] on `port` by default (a coordinator's fixed port, so that its
    /// address survives a restart), or any port with a line saying so when it is taken.
    fn listen_at(&self, port: u16) -> Vec<libp2p::Multiaddr> {
        if !self.listen.is_empty() {
            return self.listen.clone();
        }
        let free = port == 0
            || (std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
                && std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok());
        let port = if free {
            port
        } else {
            println!(
                "port {port} is taken (another coordinator on this machine?): listening on a random port, so nodes need this coordinator's new address after each restart (--listen fixes one)"
            );
            0
        };
        [
            format!("/ip4/0.0.0.0/tcp/{port}"),
            format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
        ]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect()
    }
}

/// Flags of `potluck node`, or a command for the node already running.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct NodeArgs {
    /// Talk to the node running with this data folder instead of starting one.
    #[command(subcommand)]
    pub control: Option<NodeControl>,
    #[command(flatten)]
    pub pool: PoolArgs,
    /// A peer to join through, as a multiaddr ending in /p2p/<id> (repeatable): the
    /// coordinator, or any node of the pool (the node then finds the coordinator).
    #[arg(long)]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// A name for this node on the pool's dashboard, e.g. "ada's laptop" (letters, digits,
    /// spaces and -_.' only, at most 32 characters); the pool shows its nickname beside it.
    #[arg(long, value_parser = parse_name)]
    pub name: Option<String>,
    #[command(flatten)]
    pub limits: NodeLimits,
}

/// Accepts an owner's name for a node only as the pool would show it.
fn parse_name(s: &str) -> Result<String, String> {
    use potluck_protocol::messages::{clean_owner_name, MAX_OWNER_NAME};
    match clean_owner_name(s) {
        Some(clean) if clean == s => Ok(clean),
        _ => Err(format!(
            "a name holds letters, digits, single spaces and -_.' only, at most {MAX_OWNER_NAME} characters"
        )),
    }
}

/// Commands for a running node, over its local control socket.
#[derive(clap::Subcommand, Clone)]
pub enum NodeControl {
    /// Stop taking work (running sessions move to other nodes within seconds).
    Pause {
        /// The running node's data folder (default: the node's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Take work again.
    Resume {
        /// The running node's data folder (default: the node's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print what the node is doing, as JSON.
    Status {
        /// The running node's data folder (default: the node's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

/// Runs a command on the node that runs with its data folder.
fn control_node(control: NodeControl) -> Result<()> {
    use potluck_node::control::{ask, Command};
    let (command, dir) = match control {
        NodeControl::Pause { data_dir } => (Command::Pause, data_dir),
        NodeControl::Resume { data_dir } => (Command::Resume, data_dir),
        NodeControl::Status { data_dir } => (Command::Status, data_dir),
    };
    let dir = dir.map_or_else(|| crate::data_dir::default_data_dir("node"), Ok)?;
    let state = ask(&dir, command)?;
    println!("{}", serde_json::to_string_pretty(&state)?);
    Ok(())
}

/// What a volunteer lets its node use.
#[derive(Args, Clone)]
pub struct NodeLimits {
    /// Most memory to use, e.g. 4G or 512M.
    #[arg(long, value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Most compute threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run only on these CPU cores, e.g. `2,3` or `0-3` (Linux).
    #[arg(long, value_parser = parse_cpus)]
    pub cpus: Option<CpuList>,
    /// Compute device: cpu (cuda:N needs a CUDA build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seconds between adverts.
    #[arg(long, default_value_t = 10)]
    pub advert_interval: u64,
    /// Seconds between measurements of free memory and speed.
    #[arg(long, default_value_t = 300)]
    pub probe_interval: u64,
    /// Work only while the rest of this machine is nearly idle: pause within seconds when
    /// other processes use more than --idle-threshold of its CPUs.
    #[arg(long)]
    pub idle_only: bool,
    /// With --idle-only: the share of all CPUs (0 to 1) other processes may use.
    #[arg(long, default_value_t = 0.25)]
    pub idle_threshold: f32,
    /// With --idle-only: seconds the machine must stay below the threshold before the
    /// node works again.
    #[arg(long, default_value_t = 60)]
    pub idle_resume_after: u64,
    /// Work only in this daily window of local time, e.g. 22:00-07:00 (repeatable).
    #[arg(long)]
    pub schedule: Vec<potluck_node::idle::Window>,
    /// On Ctrl-C or SIGTERM, seconds running sessions get to move to other nodes.
    #[arg(long, default_value_t = 10)]
    pub leave_deadline: u64,
    /// Most positions (decode tokens plus prefill rows) the stage runs in one batch; a
    /// longer prompt is prefilled a chunk of this size at a time beside other sessions.
    #[arg(long, default_value_t = potluck_node::batcher::BatchLimits::DEFAULT.max_tokens)]
    pub max_batch_tokens: usize,
    /// Most sessions in one batch.
    #[arg(long, default_value_t = potluck_node::batcher::BatchLimits::DEFAULT.max_sessions)]
    pub max_batch_sessions: usize,
    /// Test builds only: corrupt a share of outputs, RATE:KIND[:SEED] with KIND one of
    /// noise, zeros, skip, stale (wrong results, honestly signed), forge, replay (receipts
    /// that do not match) or stall (work units never answered), to exercise the pool's
    /// checks.
    #[arg(long, hide = true)]
    pub corrupt: Option<potluck_node::fault::FaultPlan>,
}

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

/// Flags of `potluck up`.
#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub limits: NodeLimits,
    /// Answer this prompt (as a chat message) once the pool is ready, then exit.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Most tokens to generate for --prompt.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Parses sizes like `4G`, `512M`, `1024K` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in '{s}' (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("'{s}' must be positive"));
    }
    Ok((n * mult as f64) as u64)
}

/// The multi-threaded runtime the daemons run on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting tokio")
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

impl NodeLimits {
    fn check(&self) -> Result<()> {
        if self.device != "cpu" {
            anyhow::bail!(
                "--device {} is not available in this build (cpu only)",
                self.device
            );
        }
        if self.max_batch_tokens == 0 || self.max_batch_sessions == 0 {
            anyhow::bail!("--max-batch-tokens and --max-batch-sessions must be at least 1");
        }
        if self.advert_interval == 0 || self.probe_interval == 0 {
            anyhow::bail!("--advert-interval and --probe-interval must be at least 1 second");
        }
        if !(self.idle_threshold > 0.0 && self.idle_threshold < 1.0) {
            anyhow::bail!("--idle-threshold is a share of the CPUs, above 0 and below 1");
        }
        if self.corrupt.is_some() && !potluck_node::fault::AVAILABLE {
            anyhow::bail!("--corrupt needs a build with the fault-injection feature (tests only)");
        }
        if let Some(cpus) = &self.cpus {
            pin_to_cpus(&cpus.0)?;
        }
        crate::set_threads(self.threads)
    }
}

/// CPU cores a node may run on.
#[derive(Debug, Clone)]
pub struct CpuList(pub Vec<usize>);

/// Parses a core list like `0,2` or `0-3`.
pub fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim()
                .parse()
                .map_err(|_| format!("bad core number in '{s}'"))?,
            b.trim()
                .parse()
                .map_err(|_| format!("bad core number in '{s}'"))?,
        );
        if a > b || b >= 1024 {
            return Err(format!("bad core range '{part}'"));
        }
        out.extend(a..=b);
    }
    Ok(CpuList(out))
}

/// Keeps this process (and the threads it starts later) on `cpus`.
#[cfg(target_os = "linux")]
fn pin_to_cpus(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET indexes below CPU_SETSIZE (checked by
    // parse_cpus' bound of 1024), and sched_setaffinity reads the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!(
                "cannot run on cores {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn pin_to_cpus(_cpus: &[usize]) -> Result<()> {
    anyhow::bail!("--cpus is only available on Linux")
}

/// The node's configuration: the cache's verified models, the owner's limits. With
/// `beside_coordinator` (`potluck up`), the node finds a private pool's folder where its
/// coordinator does and admits itself with the pool key too.
fn node_config(
    cache: &ModelCache,
    pool: &PoolArgs,
    beside_coordinator: bool,
    data_dir: PathBuf,
    listen: Vec<libp2p::Multiaddr>,
    bootstrap: Vec<libp2p::Multiaddr>,
    limits: &NodeLimits,
) -> Result<NodeConfig> {
    let models: Vec<LocalModel> = cache
        .offered()?
        .into_iter()
        .map(|(path, model)| LocalModel { model, path })
        .collect();
    if models.is_empty() {
        tracing::warn!(
            "no models cached; this node cannot serve until one is (potluck model fetch {})",
            crate::catalog::DEFAULT_MODEL
        );
    }
    let interval = Duration::from_secs(limits.advert_interval);
    Ok(NodeConfig {
        pool: pool.membership(&data_dir, beside_coordinator)?.0,
        data_dir,
        listen,
        bootstrap,
        mdns: !pool.no_mdns,
        limits: Limits {
            max_memory: limits.max_memory,
            threads: limits.threads,
        },
        advert_interval: interval,
        advert_ttl: interval * 3,
        models,
        memory_cap: limits.max_memory,
        probe_interval: Duration::from_secs(limits.probe_interval),
        leave_deadline: Duration::from_secs(limits.leave_deadline),
        faults: limits.corrupt,
        idle_only: limits.idle_only.then(|| {
            (
                limits.idle_threshold,
                Duration::from_secs(limits.idle_resume_after),
            )
        }),
        schedule: limits.schedule.clone(),
        batch: potluck_node::batcher::BatchLimits {
            max_tokens: limits.max_batch_tokens,
            max_sessions: limits.max_batch_sessions,
        },
        name: None,
    })
}

/// Runs `potluck node`.
pub fn run_node(cache: &ModelCache, args: NodeArgs) -> Result<()> {
    if let Some(control) = args.control {
        return control_node(control);
    }
    args.limits.check()?;
    let mut cfg = node_config(
        cache,
        &args.pool,
        false,
        args.pool.data_dir("node")?,
        args.pool.listen(),
        args.bootstrap,
        &args.limits,
    )?;
    cfg.name = args.name;
    runtime()?.block_on(node::run(cfg, stop_signal()))?;
    Ok(())
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
async fn start_http(serve: &ServeArgs, c: Coordinator) -> Result<SocketAddr> {
    let opts = serve.http_options()?;
    let addr = serve.http;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP API to {addr}"))?;
    let bound = listener.local_addr()?;
    println!("api listening on http://{bound}");
    tokio::spawn(async move {
        if let Err(e) = potluck_coordinator::http::serve(listener, c, opts).await {
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
        start_http(&args.serve, running.coordinator.clone()).await?;
        stop_signal().await;
        Ok(())
    })
}

/// Runs `potluck up`: a coordinator and a node in one process, joined over loopback.
pub fn run_up(cache: &ModelCache, mut args: UpArgs) -> Result<()> {
    args.limits.check()?;
    if args.prompt.is_some() {
        // One prompt answered here needs no other machine to reach this one.
        if args.pool.listen.is_empty() {
            args.pool.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
        }
        args.pool.no_mdns = true;
    }
    let params = args.sampling.params()?;
    if args.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let model = served_model(cache, &args.serve.model)?;
    let base = args.pool.data_dir("up")?;
    // `up` is the one command a new user runs: it serves embeddings too, unless told not to.
    let encoder = crate::catalog::DEFAULT_EMBEDDING_MODEL;
    // Not for one `--prompt`, which needs only the chat model.
    if args.prompt.is_none()
        && args.serve.embedding_model.is_none()
        && cache.verify(encoder).is_err()
    {
        println!("fetching {encoder} for /v1/embeddings (--embedding-model none skips it)");
        if let Err(e) = cache.fetch(encoder, None) {
            println!("serving no embeddings: {encoder} could not be fetched ({e:#})");
        }
    }
    runtime()?.block_on(async {
        let pool = launch_local_pool(
            cache,
            &args.pool,
            model,
            &base,
            std::slice::from_ref(&args.limits),
            args.serve.coordinator_config(cache, &args.pool, base.join("coordinator"))?,
        )
        .await?;
        let c = pool.coordinator.clone();
        for (peer, _) in &pool.nodes {
            c.mark_local(*peer);
        }
        println!("{}", serves_line(&c));
        let Some(prompt) = args.prompt else {
            // The API and dashboard come up at once: while the pool is not ready they say
            // why (a 503 with the reason, the dashboard's plan), and Ctrl-C works throughout.
            let http = start_http(&args.serve, c.clone()).await?;
            println!("dashboard: http://{http}/");
            let (named, admitted) = match args.pool.pool.as_str() {
                "public" => (String::new(), ""),
                name => (
                    format!(" --pool {name}"),
                    " (each with its certificate from `potluck pool invite`, see docs/pools.md)",
                ),
            };
            println!(
                "add machines with: potluck node{named} --bootstrap {}{admitted}",
                pool.bootstrap
            );
            tokio::select! {
                () = announce_ready(&c) => {
                    println!("try: curl http://{http}/v1/chat/completions -H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":40}}'");
                    stop_signal().await;
                }
                () = stop_signal() => {}
            }
            println!("stopped");
            return Ok(());
        };
        tokio::select! {
            ready = c.wait_ready(Duration::from_secs(120)) => {
                ready.context("the pool did not become ready")?;
            }
            () = stop_signal() => {
                println!("stopped before the pool was ready");
                return Ok(());
            }
        }
        let ids = prompt_ids(&c.model().tokenizer, &prompt, true, None)?;
        let req = SessionRequest {
            prompt: ids,
            max_tokens: args.max_tokens,
            stop: Vec::new(),
            sampling: params,
            handle: Default::default(),
            member: Default::default(),
        };
        let generation = c.generate(req, |piece| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        });
        tokio::select! {
            done = generation => {
                let (_, stats) = done?;
                println!();
                crate::generate::print_stats(&stats);
            }
            () = stop_signal() => println!("\nstopped"),
        }
        Ok(())
    })
}

/// What a coordinator serves, in a line.
fn serves_line(c: &Coordinator) -> String {
    let chat = format!("serving {} (chat and completions)", c.model().model.name);
    match c.embedding_model() {
        Some(e) => format!("{chat} and {} (embeddings)", e.name),
        None => format!("{chat}; no embeddings (--embedding-model NAME adds them)"),
    }
}

/// Waits until the pool serves, saying so, and every half minute until then why not.
async fn announce_ready(c: &Coordinator) {
    let mut said = String::new();
    loop {
        match c.wait_ready(Duration::from_secs(30)).await {
            Ok(()) => {
                println!("pool ready");
                return;
            }
            Err(e) => {
                let why = e.to_string();
                if why != said {
                    println!("not serving yet: {why}");
                    said = why;
                }
            }
        }
    }
}

/// A pool started in this process: its coordinator and each node's peer id and task
/// (aborting a task is the node crashing: its connections close).
pub struct LocalPool {
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The coordinator's address for other machines' nodes to bootstrap from: a network
    /// address where it listens on one, else loopback.
    pub bootstrap: libp2p::Multiaddr,
    /// The nodes.
    pub nodes: Vec<(libp2p::PeerId, tokio::task::JoinHandle<()>)>,
}

/// Starts a coordinator as `cfg` says and one node per entry of `nodes` in this process,
/// the nodes joined to it over loopback; returns once a chain of loaded spans covers the
/// model.
pub async fn start_local_pool(
    cache: &ModelCache,
    pool: &PoolArgs,
    model: ServedModel,
    base: &std::path::Path,
    nodes: &[NodeLimits],
    cfg: CoordinatorConfig,
) -> Result<LocalPool> {
    let local = launch_local_pool(cache, pool, model, base, nodes, cfg).await?;
    local
        .coordinator
        .wait_ready(Duration::from_secs(120))
        .await
        .context("the pool did not become ready")?;
    Ok(local)
}

/// [`start_local_pool`], returning as soon as the coordinator listens and the nodes are
/// started, before the pool is ready.
pub async fn launch_local_pool(
    cache: &ModelCache,
    pool: &PoolArgs,
    model: ServedModel,
    base: &std::path::Path,
    nodes: &[NodeLimits],
    cfg: CoordinatorConfig,
) -> Result<LocalPool> {
    // Listening on every interface, it has an address for other machines; each
    // interface's address is reported as it comes up.
    let wide = cfg.listen.iter().any(|a| {
        a.iter().any(|p| {
            matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
                || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
        })
    });
    let running = coordinator::start(cfg, model)?;
    let c = running.coordinator.clone();
    let mut addrs = running.listening.clone();
    let bootstrap = local_address(running.listening).await?;
    let public = if wide {
        tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                if let Some(a) = network_address(&addrs.borrow_and_update()) {
                    return Some(a);
                }
                addrs.changed().await.ok()?;
            }
        })
        .await
        .ok()
        .flatten()
    } else {
        None
    }
    .unwrap_or_else(|| bootstrap.clone());
    let mut tasks = Vec::new();
    for (i, limits) in nodes.iter().enumerate() {
        let dir = if nodes.len() == 1 {
            base.join("node")
        } else {
            base.join(format!("node{i}"))
        };
        let node_cfg = node_config(
            cache,
            pool,
            true,
            dir,
            vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            vec![bootstrap.clone()],
            limits,
        )?;
        let key = potluck_net::identity::load_or_create(&node_cfg.data_dir)?;
        let peer = potluck_net::swarm::peer_id_of(&key.public())
            .context("the node's key is not a libp2p key")?;
        let task = tokio::spawn(async move {
            if let Err(e) = node::run(node_cfg, std::future::pending()).await {
                tracing::error!("a local node stopped: {e}");
            }
        });
        tasks.push((peer, task));
    }
    Ok(LocalPool {
        coordinator: c,
        bootstrap: public,
        nodes: tasks,
    })
}

/// The first address in `addrs` another machine can reach: IPv4 TCP, neither loopback
/// nor unspecified.
fn network_address(addrs: &[libp2p::Multiaddr]) -> Option<libp2p::Multiaddr> {
    use libp2p::multiaddr::Protocol;
    addrs
        .iter()
        .find(|a| {
            let mut parts = a.iter();
            matches!(
                (parts.next(), parts.next()),
                (Some(Protocol::Ip4(ip)), Some(Protocol::Tcp(_))) if !ip.is_loopback() && !ip.is_unspecified()
            )
        })
        .cloned()
}

/// The coordinator's first loopback TCP address, once it listens.
pub async fn local_address(
    mut listening: tokio::sync::watch::Receiver<Vec<libp2p::Multiaddr>>,
) -> Result<libp2p::Multiaddr> {
    let pick = |addrs: &[libp2p::Multiaddr]| {
        addrs
            .iter()
            .find(|a| {
                let s = a.to_string();
                s.starts_with("/ip4/127.0.0.1/tcp/")
            })
            .or_else(|| addrs.first())
            .cloned()
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(a) = pick(&listening.borrow_and_update()) {
                return Ok(a);
            }
            listening
                .changed()
                .await
                .context("the coordinator stopped")?;
        }
    })
    .await
    .context("the coordinator did not start listening")?
}
