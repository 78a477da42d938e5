//! `potluck coordinator`: join the pool's swarm, verify every capacity advert into the peer
//! table, and drop peers whose adverts expire. Prints its listen addresses for nodes'
//! `--bootstrap`, and one line per peer that joins or leaves.

use crate::peer_table::{Accepted, PeerTable};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, identity as p2p_identity, mdns, Multiaddr, PeerId};
use potluck_net::identity;
use potluck_net::swarm::{self, advert_topic, PoolBehaviourEvent};
use potluck_protocol::codec::decode_frame;
use potluck_protocol::messages::Message;
use potluck_protocol::signed::PublicKey;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How a coordinator is run.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Identity and state.
    pub data_dir: PathBuf,
    /// The pool it coordinates.
    pub pool: String,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Whether to discover peers on the LAN.
    pub mdns: bool,
}

/// Why the coordinator stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The swarm could not start.
    #[error(transparent)]
    Swarm(#[from] swarm::SwarmError),
    /// An address could not be listened on.
    #[error("{0}")]
    Address(String),
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The libp2p PeerId that belongs to an advert signer's key.
pub fn peer_id_of(key: &PublicKey) -> Option<PeerId> {
    let ed = p2p_identity::ed25519::PublicKey::try_from_bytes(&key.0).ok()?;
    Some(p2p_identity::PublicKey::from(ed).to_peer_id())
}

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    cfg: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    let key = identity::load_or_create(&cfg.data_dir)?;
    let mut swarm = swarm::build(swarm::libp2p_keypair(key.secret())?, cfg.mdns)?;
    println!("peer id {}", swarm.local_peer_id());
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| CoordinatorError::Address(format!("listen on {addr}: {e}")))?;
    }
    let topic = advert_topic(&cfg.pool);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| CoordinatorError::Address(format!("subscribe: {e}")))?;
    let mut table = PeerTable::new(&cfg.pool);
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = expiry.tick() => {
                for gone in table.expire(unix_now()) {
                    let id = peer_id_of(&gone).map(|p| p.to_string()).unwrap_or_default();
                    println!("peer left {id} (advert expired)");
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    println!("listening {address}/p2p/{}", swarm.local_peer_id());
                }
                SwarmEvent::Behaviour(PoolBehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. })) => {
                    on_gossip(&mut table, message);
                }
                SwarmEvent::Behaviour(PoolBehaviourEvent::Identify(libp2p::identify::Event::Received { peer_id, info, .. })) => {
                    if info.protocol_version != swarm::IDENTIFY_PROTOCOL {
                        tracing::warn!(%peer_id, version = %info.protocol_version, "not a Potluck peer; disconnecting");
                        let _ = swarm.disconnect_peer_id(peer_id);
                    } else {
                        for addr in info.listen_addrs {
                            swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                        }
                    }
                }
                SwarmEvent::Behaviour(PoolBehaviourEvent::Ping(libp2p::ping::Event { peer, result: Ok(rtt), .. })) => {
                    if let Some(p) = table.peers().iter().find(|p| peer_id_of(&p.key) == Some(peer)).map(|p| p.key) {
                        table.set_rtt(&p, rtt.as_secs_f32() * 1000.0);
                    }
                }
                SwarmEvent::Behaviour(PoolBehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (peer_id, addr) in found {
                        swarm.behaviour_mut().kad.add_address(&peer_id, addr.clone());
                        let _ = swarm.dial(addr);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Checks one gossiped frame: a valid advert, signed by the peer that published it.
fn on_gossip(table: &mut PeerTable, message: gossipsub::Message) {
    let from = message
        .source
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    let signed = match decode_frame::<Message>(&message.data) {
        Ok((Message::Advert(signed), _)) => signed,
        Ok((other, _)) => {
            tracing::warn!(%from, "dropped gossip: not an advert ({other:?})");
            return;
        }
        Err(e) => {
            tracing::warn!(%from, "dropped gossip: {e}");
            return;
        }
    };
    if peer_id_of(&signed.signer) != message.source {
        tracing::warn!(%from, "dropped advert: signed by another peer's key");
        return;
    }
    match table.accept(&signed, unix_now()) {
        Ok(Accepted::New) => {
            if let Some(p) = table.get(&signed.signer) {
                let a = &p.advert;
                println!(
                    "peer joined {from} device {:?} memory {} MB threads {} gflops {:.1} mem {:.1} GB/s",
                    a.device,
                    a.memory_bytes >> 20,
                    a.threads,
                    a.gflops,
                    a.mem_gbps
                );
            }
        }
        Ok(Accepted::Changed) => tracing::info!(%from, "capacity changed"),
        Ok(Accepted::Refreshed) => {}
        Err(e) => tracing::warn!(%from, "dropped advert: {e}"),
    }
}
