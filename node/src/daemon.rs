//! `potluck node`: measure the machine, join the pool's swarm, and keep a signed capacity
//! advert on the pool's gossip topic (on start, on change, and every interval, with expiry).

use crate::probe::{probe, Capacity, Limits};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, mdns, Multiaddr, PeerId};
use potluck_net::identity;
use potluck_net::swarm::{self, advert_topic, PoolBehaviourEvent};
use potluck_protocol::codec::encode_frame;
use potluck_protocol::messages::{CapacityAdvert, Message, ADVERT_DOMAIN};
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
}

/// Why the node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The swarm could not start.
    #[error(transparent)]
    Swarm(#[from] swarm::SwarmError),
    /// An address could not be listened on or dialled.
    #[error("{0}")]
    Address(String),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds and signs the advert for `cap`.
pub fn signed_advert(
    key: &Keypair,
    pool: &str,
    cap: &Capacity,
    seq: u64,
    ttl: Duration,
) -> Option<Signed> {
    let now = unix_now();
    let advert = CapacityAdvert {
        pool: pool.to_string(),
        device: cap.device.clone(),
        memory_bytes: cap.memory_bytes,
        gflops: cap.gflops,
        mem_gbps: cap.mem_gbps,
        threads: cap.threads,
        models: Vec::new(),
        loaded: None,
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
) -> Result<(), NodeError> {
    let key = identity::load_or_create(&cfg.data_dir)?;
    let mut swarm = swarm::build(swarm::libp2p_keypair(key.secret())?, cfg.mdns)?;
    let local = *swarm.local_peer_id();
    println!("peer id {local}");
    let capacity = probe(&cfg.limits);
    tracing::info!(?capacity, "capacity measured");
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NodeError::Address(format!("listen on {addr}: {e}")))?;
    }
    for addr in &cfg.bootstrap {
        if let Some(peer) = peer_of(addr) {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        }
        swarm
            .dial(addr.clone())
            .map_err(|e| NodeError::Address(format!("dial {addr}: {e}")))?;
    }
    let topic = advert_topic(&cfg.pool);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| NodeError::Address(format!("subscribe: {e}")))?;
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
            _ = retry.tick(), if !published => {}
            event = swarm.select_next_some() => {
                handle_event(&mut swarm, event);
                continue;
            }
        }
        if !published {
            seq += 1;
            let Some(advert) = signed_advert(&key, &cfg.pool, &capacity, seq, cfg.advert_ttl)
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

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

fn handle_event(
    swarm: &mut libp2p::Swarm<swarm::PoolBehaviour>,
    event: SwarmEvent<PoolBehaviourEvent>,
) {
    match event {
        SwarmEvent::NewListenAddr { address, .. } => {
            println!("listening {address}/p2p/{}", swarm.local_peer_id());
        }
        SwarmEvent::ConnectionEstablished {
            peer_id, endpoint, ..
        } => {
            tracing::info!(%peer_id, addr = %endpoint.get_remote_address(), "connected");
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::Identify(
            libp2p::identify::Event::Received { peer_id, info, .. },
        )) => {
            if info.protocol_version != swarm::IDENTIFY_PROTOCOL {
                tracing::warn!(%peer_id, version = %info.protocol_version, "not a Potluck peer; disconnecting");
                let _ = swarm.disconnect_peer_id(peer_id);
                return;
            }
            for addr in info.listen_addrs {
                swarm.behaviour_mut().kad.add_address(&peer_id, addr);
            }
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
            for (peer_id, addr) in found {
                tracing::info!(%peer_id, %addr, "found on the LAN");
                swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, addr.clone());
                let _ = swarm.dial(addr);
            }
        }
        _ => {}
    }
}
