//! `potluck coordinator`: join the pool's swarm, verify every capacity advert into the peer
//! table, and drop peers whose adverts expire. Prints its listen addresses for nodes'
//! `--bootstrap`, and one line per peer that joins or leaves.

use crate::peer_table::{Accepted, PeerTable};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{gossipsub, Multiaddr};
use potluck_net::swarm::{self, peer_id_of, unix_now, PoolBehaviourEvent};
use potluck_protocol::codec::decode_frame;
use potluck_protocol::messages::Message;
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
                    on_gossip(&mut table, message);
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
