//! The pools a bench measures: node processes pinned one per core beside a coordinator in
//! this process, their API on loopback, and the memory each node is allowed.

use super::args::BenchArgs;
use crate::models::ModelCache;
use anyhow::{bail, Context, Result};
use potluck_coordinator::http::AppState;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

/// Sessions a bench pool runs at once for `clients` clients.
pub(super) fn bench_sessions(clients: usize) -> usize {
    clients.max(potluck_coordinator::pool::DEFAULT_MAX_SESSIONS)
}

/// Memory for a 1/`share` of the model plus one block (so exactly `share` nodes are
/// needed), with the edges and reserve. A node meant to hold the whole model gets no cap:
/// its KV caches get the default budget, as a user's node would, rather than room for a
/// few sessions.
pub(super) fn share_memory(
    shape: &potluck_coordinator::planner::ModelShape,
    share: u64,
) -> Option<u64> {
    if share <= 1 {
        return None;
    }
    let blocks = (shape.layers as u64).div_ceil(share) + 1;
    Some(shape.reserve_bytes + shape.edge_bytes + blocks * shape.layer_bytes)
}

/// Kills the node processes however the bench ends.
pub(crate) struct Nodes(pub(crate) Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `potluck node` on core `core` with one compute thread, joining through
/// `bootstrap`, with `extra` flags; its data folder is `base/node{core}`.
pub(crate) fn spawn_node(
    base: &std::path::Path,
    pool: &str,
    core: usize,
    bootstrap: &str,
    extra: &[String],
) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the potluck binary")?;
    let dir = base.join(format!("node{core}"));
    Command::new(exe)
        .args(["node", "--pool", pool, "--no-mdns", "--threads", "1"])
        .args(extra)
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--advert-interval", "1"])
        .arg("--cpus")
        .arg(core.to_string())
        .arg("--bootstrap")
        .arg(bootstrap)
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a node")
}

/// For a bench (`flag`) that pins `nodes` node processes one per core: checks the machine
/// has the cores, and returns the folder it keeps its state in, its public pool's name, and
/// the config of a coordinator in this process on loopback.
pub(crate) fn pinned_coordinator(
    tag: &str,
    nodes: usize,
    flag: &str,
) -> Result<(
    std::path::PathBuf,
    String,
    potluck_coordinator::config::CoordinatorConfig,
)> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    if cores < nodes {
        bail!("{flag} pins {nodes} nodes to their own cores; this machine has {cores}");
    }
    let id = std::process::id();
    let base = std::env::temp_dir().join(format!("potluck-bench-{tag}-{id}"));
    let pool = format!("bench-{tag}-{id}");
    let cfg = potluck_coordinator::config::CoordinatorConfig::new(
        base.join("coordinator"),
        potluck_net::gate::PoolMembership::Public { name: pool.clone() },
        vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        false,
    );
    Ok((base, pool, cfg))
}

/// Serves `app`'s HTTP API on a free loopback port; returns its `host:port`.
pub(crate) async fn serve_api(app: AppState) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(potluck_coordinator::http::serve(
        listener,
        app,
        potluck_coordinator::http::HttpOptions::default(),
    ));
    Ok(addr)
}

/// `--pinned MODE`: a coordinator in this process (room for `clients` sessions) and node
/// processes pinned one per core: what its API serves, the folder to remove, the nodes and their
/// data folders.
pub(crate) async fn pinned_pool(
    cache: &ModelCache,
    args: &BenchArgs,
    mode: &str,
    clients: usize,
) -> Result<(
    AppState,
    std::path::PathBuf,
    (Nodes, Vec<std::path::PathBuf>),
)> {
    use potluck_coordinator::daemon as coordinator;
    let model = crate::pool::served_model(cache, &args.model)?;
    let shape = model.shape.clone();
    let (count, share) = match mode {
        "one" => (1, 1),
        "split" => (2, 2),
        "replicas" => (2, 1),
        other => bail!("--pinned takes one, split or replicas, not {other}"),
    };
    let (base, pool, mut cfg) = pinned_coordinator("pinned", count, &format!("--pinned {mode}"))?;
    let memory = share_memory(&shape, share);
    cfg.max_sessions = Some(bench_sessions(clients));
    cfg.check_share = args.check_share;
    let running = coordinator::start(cfg, model)?;
    let (c, app) = (running.coordinator.clone(), running.app());
    let bootstrap = crate::pool::local_address(running.listening)
        .await?
        .to_string();
    let extra: Vec<String> = memory
        .map(|m| vec!["--max-memory".to_string(), m.to_string()])
        .unwrap_or_default();
    let mut nodes = Nodes(Vec::new());
    let mut dirs = Vec::new();
    for core in 0..count {
        nodes
            .0
            .push(spawn_node(&base, &pool, core, &bootstrap, &extra)?);
        dirs.push(base.join(format!("node{core}")));
    }
    c.wait_ready(std::time::Duration::from_secs(120))
        .await
        .context("the pinned pool did not become ready")?;
    // Every node serves before the clients come, or a replica still loading gets no session.
    let deadline = Instant::now() + std::time::Duration::from_secs(120);
    let loaded = |d: &std::path::PathBuf| {
        potluck_node::control::ask(d, potluck_node::control::Command::Status)
            .is_ok_and(|v| !v["loaded"].is_null())
    };
    while !dirs.iter().all(loaded) {
        if Instant::now() > deadline {
            bail!("the pinned nodes did not all load their blocks in time");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    Ok((app, base, (nodes, dirs)))
}

/// Each pinned node's stage batches so far, from its control socket.
pub(super) fn pinned_batches(dirs: &[std::path::PathBuf], nodes: usize) -> String {
    let each: Vec<String> = dirs
        .iter()
        .take(nodes)
        .map(
            |d| match potluck_node::control::ask(d, potluck_node::control::Command::Status) {
                Ok(v) => format!(
                    "{} batches, mean {:.1} rows, busy {:.0}%",
                    v["batches"]["batches"],
                    v["batches"]["mean_rows"].as_f64().unwrap_or(f64::NAN),
                    100.0 * v["batches"]["busy_share"].as_f64().unwrap_or(f64::NAN)
                ),
                Err(e) => format!("no status: {e}"),
            },
        )
        .collect();
    format!("pinned nodes: {}", each.join("; "))
}
