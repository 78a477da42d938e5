//! A pool in one process (a coordinator and its nodes on loopback), for `up` and for
//! benches, and the address a volunteer pastes to join it.

use super::args::PoolArgs;
use super::node::{node_config, NodeLimits};
use crate::models::ModelCache;
use anyhow::{Context, Result};
use potluck_coordinator::config::CoordinatorConfig;
use potluck_coordinator::daemon as coordinator;
use potluck_coordinator::model::ServedModel;
use potluck_coordinator::pool::Coordinator;
use potluck_node::daemon::{self as node};
use std::time::Duration;

/// A pool started in this process: its coordinator and each node's peer id and task
/// (aborting a task is the node crashing: its connections close).
pub struct LocalPool {
    /// The coordinator.
    pub coordinator: Coordinator,
    /// The coordinator's address for other machines' nodes to bootstrap from: a network
    /// address where it listens on one, else loopback.
    pub bootstrap: libp2p::Multiaddr,
    /// What its HTTP API serves (the coordinator and its batch runner).
    pub app: potluck_coordinator::http::AppState,
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
    let (c, app) = (running.coordinator.clone(), running.app());
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
        app,
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
