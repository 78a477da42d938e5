//! The libp2p swarm every Potluck peer (node or coordinator) runs: QUIC and TCP (noise, yamux), identify, ping, gossipsub for signed
//! adverts, Kademlia for finding peers across the internet, and mDNS on a LAN.

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{gossipsub, identify, identity, kad, mdns, noise, ping, tcp, yamux, Swarm};
use std::time::Duration;

/// The identify protocol version every Potluck peer announces.
pub const IDENTIFY_PROTOCOL: &str = "/potluck/id/1";

/// Largest gossip message: an advert is a few hundred bytes.
pub const MAX_GOSSIP_BYTES: usize = 64 << 10;

/// The gossip topic a pool's adverts travel on; named by pool so pools never mix.
pub fn advert_topic(pool: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("/potluck/{pool}/adverts/1"))
}

/// Everything a Potluck peer speaks.
#[derive(NetworkBehaviour)]
pub struct PoolBehaviour {
    /// Exchanges listen addresses and protocol versions.
    pub identify: identify::Behaviour,
    /// Liveness and RTT.
    pub ping: ping::Behaviour,
    /// Adverts.
    pub gossipsub: gossipsub::Behaviour,
    /// Internet discovery.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// LAN discovery, when enabled.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// A transport or behaviour failed to initialise.
    #[error("starting libp2p: {0}")]
    Init(String),
}

/// The libp2p keypair of a peer, from the same secret that signs its receipts.
pub fn libp2p_keypair(secret: [u8; 32]) -> Result<identity::Keypair, SwarmError> {
    let mut s = secret;
    identity::Keypair::ed25519_from_bytes(&mut s).map_err(|e| SwarmError::Init(e.to_string()))
}

/// Builds the swarm for `key`, with mDNS when `use_mdns`.
pub fn build(key: identity::Keypair, use_mdns: bool) -> Result<Swarm<PoolBehaviour>, SwarmError> {
    let err = |e: &dyn std::fmt::Display| SwarmError::Init(e.to_string());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| err(&e))?
        .with_quic()
        .with_behaviour(|key| {
            let peer_id = key.public().to_peer_id();
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                .max_transmit_size(MAX_GOSSIP_BYTES)
                .build()
                .map_err(|e| e.to_string())?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let mdns = if use_mdns {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            Ok(PoolBehaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    IDENTIFY_PROTOCOL.into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                gossipsub,
                kad: kad::Behaviour::new(peer_id, kad::store::MemoryStore::new(peer_id)),
                mdns: mdns.into(),
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}
