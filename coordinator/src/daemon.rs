//! `potluck coordinator`: join the pool's swarm, verify every capacity advert into the peer
//! table, and drop peers whose adverts expire. Prints its listen addresses for nodes'
//! `--bootstrap`, and one line per peer that joins or leaves.

use crate::peer_table::{Accepted, AdvertRejection, PeerTable};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, Multiaddr, PeerId};
use potluck_net::swarm::{self, peer_id_of, unix_now, PoolBehaviourEvent};
use potluck_protocol::codec::decode_frame;
use potluck_protocol::messages::Message;
use potluck_protocol::signed::PublicKey;
use std::path::PathBuf;
use std::time::Duration;

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

/// Runs the coordinator until `shutdown` resolves.
pub async fn run(
    cfg: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), swarm::StartError> {
    let swarm::Started { mut swarm, .. } =
        swarm::start(&cfg.data_dir, &cfg.pool, &cfg.listen, &[], cfg.mdns)?;
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
            event = swarm.select_next_some() => match swarm::handle_common(&mut swarm, event) {
                Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. }))) => {
                    let from = message.source.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into());
                    match check_gossip(&mut table, &message.data, message.source, unix_now()) {
                        Ok((Accepted::New, key)) => {
                            if let Some(p) = table.get(&key) {
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
                        Ok((Accepted::Changed, _)) => tracing::info!(%from, "capacity changed"),
                        Ok((Accepted::Refreshed, _)) => {}
                        Err(why) => tracing::warn!(%from, "dropped gossip: {why}"),
                    }
                }
                Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Ping(libp2p::ping::Event { peer, result: Ok(rtt), .. }))) => {
                    let key = table.peers().iter().find(|p| peer_id_of(&p.key) == Some(peer)).map(|p| p.key);
                    if let Some(key) = key {
                        table.set_rtt(&key, rtt.as_secs_f32() * 1000.0);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Why a gossiped frame was dropped.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GossipRejection {
    /// The bytes are not a frame of our protocol (malformed, oversized, other version).
    #[error(transparent)]
    Frame(#[from] potluck_protocol::ProtocolError),
    /// A valid frame, but not an advert.
    #[error("not an advert")]
    NotAnAdvert,
    /// The advert is signed by a key other than the publishing peer's.
    #[error("signed by another peer's key")]
    SignerMismatch,
    /// The peer table refused the advert.
    #[error(transparent)]
    Advert(#[from] AdvertRejection),
}

/// Checks one gossiped frame from `source`: a valid advert, signed by the peer that
/// published it, accepted into `table` at unix time `now`. Returns what changed and the
/// signer's key.
pub fn check_gossip(
    table: &mut PeerTable,
    data: &[u8],
    source: Option<PeerId>,
    now: u64,
) -> Result<(Accepted, PublicKey), GossipRejection> {
    let signed = match decode_frame::<Message>(data)? {
        (Message::Advert(signed), _) => signed,
        _ => return Err(GossipRejection::NotAnAdvert),
    };
    if source.is_none() || peer_id_of(&signed.signer) != source {
        return Err(GossipRejection::SignerMismatch);
    }
    Ok((table.accept(&signed, now)?, signed.signer))
}
