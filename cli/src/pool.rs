//! `potluck node` and `potluck coordinator`: the two daemons of a pool.

use anyhow::{Context, Result};
use clap::Args;
use potluck_coordinator::daemon::{self as coordinator, CoordinatorConfig};
use potluck_node::daemon::{self as node, NodeConfig};
use potluck_node::probe::Limits;
use std::path::PathBuf;
use std::time::Duration;

/// Flags shared by both daemons.
#[derive(Args, Clone)]
pub struct PoolArgs {
    /// Identity, caches and state live here (one per process on a machine).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The pool to join.
    #[arg(long, default_value = "public")]
    pub pool: String,
    /// Listen address (repeatable); default: all interfaces, TCP and QUIC, any port.
    #[arg(long)]
    pub listen: Vec<libp2p::Multiaddr>,
    /// Turn off LAN discovery by mDNS.
    #[arg(long)]
    pub no_mdns: bool,
}

impl PoolArgs {
    fn listen(&self) -> Vec<libp2p::Multiaddr> {
        if !self.listen.is_empty() {
            return self.listen.clone();
        }
        ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

/// Flags of `potluck node`.
#[derive(Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    /// A peer to join through, as a multiaddr ending in /p2p/<id> (repeatable).
    #[arg(long)]
    pub bootstrap: Vec<libp2p::Multiaddr>,
    /// Most memory to use, e.g. 4G or 512M.
    #[arg(long, value_parser = parse_bytes)]
    pub max_memory: Option<u64>,
    /// Most compute threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute device: cpu (cuda:N needs a CUDA build).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Seconds between adverts.
    #[arg(long, default_value_t = 10)]
    pub advert_interval: u64,
}

/// Flags of `potluck coordinator`.
#[derive(Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
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

fn runtime() -> Result<tokio::runtime::Runtime> {
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

/// Runs `potluck node`.
pub fn run_node(args: NodeArgs) -> Result<()> {
    if args.device != "cpu" {
        anyhow::bail!(
            "--device {} is not available in this build (cpu only)",
            args.device
        );
    }
    if args.threads == Some(0) {
        anyhow::bail!("--threads must be at least 1");
    }
    if args.advert_interval == 0 {
        anyhow::bail!("--advert-interval must be at least 1 second");
    }
    crate::set_threads(args.threads)?;
    let interval = Duration::from_secs(args.advert_interval);
    let cfg = NodeConfig {
        data_dir: args.pool.data_dir.clone(),
        pool: args.pool.pool.clone(),
        listen: args.pool.listen(),
        bootstrap: args.bootstrap,
        mdns: !args.pool.no_mdns,
        limits: Limits {
            max_memory: args.max_memory,
            threads: args.threads,
        },
        advert_interval: interval,
        advert_ttl: interval * 3,
    };
    runtime()?.block_on(node::run(cfg, stop_signal()))?;
    Ok(())
}

/// Runs `potluck coordinator`.
pub fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let cfg = CoordinatorConfig {
        data_dir: args.pool.data_dir.clone(),
        pool: args.pool.pool.clone(),
        listen: args.pool.listen(),
        mdns: !args.pool.no_mdns,
    };
    runtime()?.block_on(coordinator::run(cfg, stop_signal()))?;
    Ok(())
}
