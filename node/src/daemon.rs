//! `potluck node`: measure the machine, join the pool's swarm, keep a signed capacity advert
//! on the pool's gossip topic (on start, on change, and every interval, with expiry), and
//! serve the layers the coordinator assigns.

use crate::probe::{probe, Capacity, Limits};
use crate::serve::{LocalModel, Server};
use futures::StreamExt;
use libp2p::{gossipsub, Multiaddr};
use potluck_net::swarm;
use potluck_protocol::codec::encode_frame;
use potluck_protocol::messages::{CapacityAdvert, LayerRange, Message, ModelRef, ADVERT_DOMAIN};
use potluck_protocol::signed::{Keypair, Signed};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How a node is run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Identity, caches and state.
    pub data_dir: PathBuf,
    /// Pool to join.
    pub pool: String,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial first (each with its /p2p/ id).
    pub bootstrap: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN.
    pub mdns: bool,
    /// The owner's limits.
    pub limits: Limits,
    /// How often to re-advertise.
    pub advert_interval: Duration,
    /// How long an advert stays valid.
    pub advert_ttl: Duration,
    /// Models in the local cache that the node offers.
    pub models: Vec<LocalModel>,
    /// The owner's memory cap, which weights and KV caches share (none: caches get the
    /// engine's default budget).
    pub memory_cap: Option<u64>,
    /// How often to measure the machine again (free memory and speed change).
    pub probe_interval: Duration,
}

/// What an advert says besides the measured capacity.
#[derive(Debug, Clone, Default)]
pub struct Offer {
    /// Models the node can load.
    pub models: Vec<ModelRef>,
    /// Blocks loaded now.
    pub loaded: Option<(ModelRef, LayerRange)>,
}

/// Builds and signs the advert for `cap`.
pub fn signed_advert(
    key: &Keypair,
    pool: &str,
    cap: &Capacity,
    offer: &Offer,
    seq: u64,
    ttl: Duration,
) -> Option<Signed> {
    let now = swarm::unix_now();
    let advert = CapacityAdvert {
        pool: pool.to_string(),
        device: cap.device.clone(),
        memory_bytes: cap.memory_bytes,
        gflops: cap.gflops,
        mem_gbps: cap.mem_gbps,
        threads: cap.threads,
        models: offer.models.clone(),
        loaded: offer.loaded.clone(),
        seq,
        issued_at: now,
        expires_at: now + ttl.as_secs().max(1),
    };
    Signed::sign(&advert, ADVERT_DOMAIN, key).ok()
}

/// Runs the node until `shutdown` resolves.
pub async fn run(
    cfg: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), swarm::StartError> {
    let swarm::Started {
        mut swarm,
        key,
        topic,
    } = swarm::start(
        &cfg.data_dir,
        &cfg.pool,
        &cfg.listen,
        &cfg.bootstrap,
        cfg.mdns,
    )?;
    let mut capacity = probe(&cfg.limits);
    tracing::info!(?capacity, "capacity measured");
    let mut reprobe = tokio::time::interval(cfg.probe_interval);
    reprobe.tick().await;
    let server = Server::new(
        cfg.models.clone(),
        Keypair::from_secret(&key.secret()),
        cfg.memory_cap,
    );
    server
        .accept(swarm.behaviour().streams.new_control())
        .map_err(swarm::StartError::Address)?;
    let mut loaded = server.loaded();
    let mut offer = Offer {
        models: server.models(),
        loaded: None,
    };
    // Sequence numbers start from the clock so a restarted node's adverts are never stale.
    let mut seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut ticker = tokio::time::interval(cfg.advert_interval);
    // Until the first advert gets out (no peer subscribed yet), retry every second.
    let mut retry = tokio::time::interval(Duration::from_secs(1));
    let mut published = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down");
                return Ok(());
            }
            _ = ticker.tick() => published = false,
            _ = reprobe.tick() => {
                let limits = cfg.limits.clone();
                if let Ok(now) = tokio::task::spawn_blocking(move || probe(&limits)).await {
                    if now != capacity {
                        tracing::info!(?now, "capacity re-measured");
                        capacity = now;
                        published = false;
                    }
                }
            }
            Ok(()) = loaded.changed() => {
                offer.loaded = loaded.borrow_and_update().clone();
                published = false;
            }
            _ = retry.tick(), if !published => {}
            event = swarm.select_next_some() => {
                swarm::handle_common(&mut swarm, event);
                continue;
            }
        }
        if !published {
            seq += 1;
            let Some(advert) =
                signed_advert(&key, &cfg.pool, &capacity, &offer, seq, cfg.advert_ttl)
            else {
                continue;
            };
            let Ok(frame) = encode_frame(&Message::Advert(advert)) else {
                continue;
            };
            match swarm
                .behaviour_mut()
                .gossipsub
                .publish(topic.clone(), frame)
            {
                Ok(_) => {
                    tracing::info!(seq, "advert published");
                    published = true;
                }
                Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
                Err(e) => tracing::warn!("advert not published: {e}"),
            }
        }
    }
}
