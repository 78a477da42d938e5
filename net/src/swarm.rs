//! The libp2p swarm every Potluck peer (node or coordinator) runs: QUIC and TCP (noise,
//! yamux), identify, ping, gossipsub for signed adverts, Kademlia for finding peers across the
//! internet, mDNS on a LAN, and libp2p streams for stage traffic and control.

use crate::gate::{Drops, Gate, PoolMembership};
use crate::gated::Gated;
use crate::streams::PoolStreams;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{gossipsub, identify, identity, kad, mdns, noise, ping, tcp, yamux, Swarm};
use potluck_protocol::codec::decode_frame;
use potluck_protocol::messages::Message;
use std::time::Duration;

pub use crate::ids::{key_of_peer, peer_id_of, peer_in, unix_now};

/// The identify protocol version every Potluck peer announces.
pub const IDENTIFY_PROTOCOL: &str = "/potluck/id/1";

/// What a peer is in its pool, announced in identify's agent version so a node that joined
/// through another node can tell the coordinator among the peers it meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// Plans the pool and commands its nodes.
    Coordinator,
    /// Serves blocks and work units.
    Node,
}

impl PeerKind {
    /// The agent version a peer of this kind announces.
    pub fn agent(self) -> String {
        let role = match self {
            PeerKind::Coordinator => "coordinator",
            PeerKind::Node => "node",
        };
        format!("potluck-{role}/{}", env!("CARGO_PKG_VERSION"))
    }

    /// The kind an announced agent version names (a claim: the peer chose it).
    pub fn of_agent(agent: &str) -> Option<PeerKind> {
        let (name, _) = agent.split_once('/')?;
        match name {
            "potluck-coordinator" => Some(PeerKind::Coordinator),
            "potluck-node" => Some(PeerKind::Node),
            _ => None,
        }
    }
}

/// Largest gossip message: an advert is a few hundred bytes.
pub const MAX_GOSSIP_BYTES: usize = 64 << 10;

/// The gossip topic a pool's adverts travel on; named by pool so pools never mix.
pub fn advert_topic(pool: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("/potluck/{pool}/adverts/1"))
}

/// Everything a Potluck peer speaks. Identify, gossipsub and Kademlia are shut to a peer
/// until the pool's gate admits it ([`Gated`]); ping carries nothing and the streams check
/// the gate themselves.
#[derive(NetworkBehaviour)]
pub struct PoolBehaviour {
    /// Exchanges listen addresses and protocol versions.
    pub identify: Gated<identify::Behaviour>,
    /// Liveness and RTT.
    pub ping: ping::Behaviour,
    /// Adverts.
    pub gossipsub: Gated<gossipsub::Behaviour>,
    /// Internet discovery.
    pub kad: Gated<kad::Behaviour<kad::store::MemoryStore>>,
    /// LAN discovery, when enabled.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Stage and control streams, opened and accepted through a [`libp2p_stream::Control`]
    /// outside the event loop.
    pub streams: libp2p_stream::Behaviour,
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

/// Builds the swarm for `key`, a peer of `kind`, with mDNS when `use_mdns`, its protocols
/// open to the peers `gate` admits.
pub fn build(
    key: identity::Keypair,
    kind: PeerKind,
    use_mdns: bool,
    gate: &Gate,
) -> Result<Swarm<PoolBehaviour>, SwarmError> {
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
                identify: Gated::new(
                    identify::Behaviour::new(
                        identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                            .with_agent_version(kind.agent()),
                    ),
                    gate,
                ),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                gossipsub: Gated::new(gossipsub, gate),
                kad: Gated::new(
                    kad::Behaviour::new(peer_id, kad::store::MemoryStore::new(peer_id)),
                    gate,
                ),
                mdns: mdns.into(),
                streams: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

/// Why a peer could not join its pool's swarm.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The identity could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// The swarm could not be built.
    #[error(transparent)]
    Swarm(#[from] SwarmError),
    /// An address could not be listened on or dialled, or the topic not joined.
    #[error("{0}")]
    Address(String),
}

/// A peer's running swarm, with the identity it signs with, its pool's advert topic, the
/// pool's gate and its streams.
pub struct Started {
    /// The swarm, listening and subscribed.
    pub swarm: Swarm<PoolBehaviour>,
    /// The key that signs adverts and receipts (the PeerId's key).
    pub key: potluck_protocol::signed::Keypair,
    /// The pool's advert topic.
    pub topic: gossipsub::IdentTopic,
    /// Admission: who may be served; already answering hellos.
    pub gate: Gate,
    /// Peers the gate wants disconnected; the swarm loop carries it out.
    pub drops: Drops,
    /// Streams under the pool's protocol names.
    pub streams: PoolStreams,
}

/// Loads (or creates) the identity in `data_dir`, builds the swarm of a peer of `kind`,
/// listens on `listen`, dials `bootstrap` and joins `pool`'s advert topic, answering hellos
/// at its gate. Prints the peer id and the pool for operators and scripts.
pub fn start(
    data_dir: &std::path::Path,
    kind: PeerKind,
    pool: &PoolMembership,
    listen: &[libp2p::Multiaddr],
    bootstrap: &[libp2p::Multiaddr],
    use_mdns: bool,
) -> Result<Started, StartError> {
    let key = crate::identity::load_or_create(data_dir)?;
    let (gate, drops) = Gate::new(pool.clone());
    let mut swarm = build(libp2p_keypair(key.secret())?, kind, use_mdns, &gate)?;
    println!("peer id {}", swarm.local_peer_id());
    println!("{}", pool.describe());
    gate.serve(swarm.behaviour().streams.new_control())
        .map_err(StartError::Address)?;
    let streams = PoolStreams::new(swarm.behaviour().streams.new_control(), gate.tag())
        .map_err(StartError::Address)?;
    for addr in listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Address(format!("listen on {addr}: {e}")))?;
    }
    for addr in bootstrap {
        if let Some(peer) = peer_in(addr) {
            swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
        }
        swarm
            .dial(addr.clone())
            .map_err(|e| StartError::Address(format!("dial {addr}: {e}")))?;
    }
    let topic = advert_topic(gate.tag());
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| StartError::Address(format!("subscribe: {e}")))?;
    Ok(Started {
        swarm,
        key,
        topic,
        gate,
        drops,
        streams,
    })
}

/// Handles the swarm events every peer treats alike (listen addresses, identify, mDNS,
/// admission at `gate`, gossiped revocations) and returns the rest for the caller: new and
/// closed connections too, after the gate has seen them, gossip only from peers the gate
/// admits, and identify only from admitted Potluck peers.
pub fn handle_common(
    swarm: &mut Swarm<PoolBehaviour>,
    gate: &Gate,
    event: libp2p::swarm::SwarmEvent<PoolBehaviourEvent>,
) -> Option<libp2p::swarm::SwarmEvent<PoolBehaviourEvent>> {
    use libp2p::swarm::SwarmEvent;
    match &event {
        SwarmEvent::ConnectionEstablished {
            peer_id,
            endpoint,
            num_established,
            ..
        } => {
            tracing::info!(%peer_id, addr = %endpoint.get_remote_address(), "connected");
            if num_established.get() == 1 {
                gate.connected(*peer_id, swarm.behaviour().streams.new_control());
            }
            return Some(event);
        }
        SwarmEvent::ConnectionClosed {
            peer_id,
            num_established: 0,
            ..
        } => {
            gate.disconnected(peer_id);
            return Some(event);
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::Gossipsub(gossipsub::Event::Message {
            message,
            ..
        })) => {
            if !message.source.is_some_and(|p| gate.admitted(&p)) {
                tracing::debug!(source = ?message.source, "dropped gossip from a peer not admitted");
                return None;
            }
            if let Ok((Message::Revoked(list), _)) = decode_frame::<Message>(&message.data) {
                // Signatures are checked off the swarm's task, within the sender's budget.
                if let Some(from) = message.source {
                    let gate = gate.clone();
                    tokio::task::spawn_blocking(move || {
                        let new = gate.revoke_from(&from, &list);
                        if !new.is_empty() {
                            tracing::info!(%from, "{} certificates revoked by the pool", new.len());
                        }
                    });
                }
                return None;
            }
            return Some(event);
        }
        _ => {}
    }
    match event {
        SwarmEvent::NewListenAddr { address, .. } => {
            println!("listening {address}/p2p/{}", swarm.local_peer_id());
            None
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::Identify(identify::Event::Received {
            peer_id,
            info,
            connection_id,
        })) => {
            if !gate.admitted(&peer_id) {
                tracing::debug!(%peer_id, "identify from a peer not admitted; ignored");
            } else if info.protocol_version != IDENTIFY_PROTOCOL {
                tracing::warn!(%peer_id, version = %info.protocol_version, "not a Potluck peer; disconnecting");
                let _ = swarm.disconnect_peer_id(peer_id);
            } else {
                for addr in &info.listen_addrs {
                    swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, addr.clone());
                }
                return Some(SwarmEvent::Behaviour(PoolBehaviourEvent::Identify(
                    identify::Event::Received {
                        peer_id,
                        info,
                        connection_id,
                    },
                )));
            }
            None
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
            None
        }
        other => Some(other),
    }
}
