//! `potluck node`: its flags, the owner's limits, commands for a running node, and the
//! node's configuration from the model cache.

use super::args::{parse_bytes, PoolArgs};
use super::cpus::{parse_cpus, pin_to_cpus, CpuList};
use super::runtime::{runtime, stop_signal};
use crate::models::ModelCache;
use anyhow::Result;
use clap::Args;
use potluck_node::daemon::{self as node, NodeConfig};
use potluck_node::probe::Limits;
use potluck_node::serve::LocalModel;
use std::path::PathBuf;
use std::time::Duration;

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

impl NodeLimits {
    /// Refuses limits a node cannot keep, and applies the CPU ones to this process.
    pub(super) fn check(&self) -> Result<()> {
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

/// The node's configuration: the cache's verified models, the owner's limits. With
/// `beside_coordinator` (`potluck up`), the node finds a private pool's folder where its
/// coordinator does and admits itself with the pool key too.
pub(super) fn node_config(
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
        relay: pool.relay(false)?,
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
