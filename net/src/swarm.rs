//! The libp2p swarm every Potluck peer (node or coordinator) runs: QUIC and TCP (noise,
//! yamux), identify, ping, gossipsub for signed adverts, Kademlia for finding peers across the
//! internet, mDNS on a LAN, libp2p streams for stage traffic and control, and for NATs:
//! AutoNAT (am I reachable?), circuit relay v2 (a client everywhere, a server where the
//! operator offers one) and DCUtR hole punching from a relayed connection to a direct one.

use crate::gate::{Drops, Gate, PoolMembership};
use crate::gated::Gated;
use crate::reach::Reach;
use crate::streams::PoolStreams;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, dcutr, gossipsub, identify, identity, kad, mdns, noise, ping, relay, tcp, yamux, Swarm,
};
use potluck_protocol::codec::decode_frame;
use potluck_protocol::messages::Message;
use std::time::Duration;

pub use crate::ids::{key_of_peer, peer_id_of, peer_in, unix_now, with_peer};

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
    /// Reachability probes: asks peers to dial back, and dials back for admitted ones.
    pub autonat: Gated<autonat::Behaviour>,
    /// Listening through (and dialling over) other peers' relays.
    pub relay_client: relay::client::Behaviour,
    /// Serving circuits to admitted peers, when the operator offers a relay.
    pub relay: Toggle<Gated<relay::Behaviour>>,
    /// Upgrading relayed connections to direct ones by hole punching.
    pub dcutr: dcutr::Behaviour,
}

/// What a relay this peer serves allows: how many reservations and circuits, and how long
/// and how many bytes a circuit may carry (a pipeline's activations are a few KiB a token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Peers that may hold a reservation at once.
    pub reservations: usize,
    /// Circuits open at once.
    pub circuits: usize,
    /// Circuits one peer may have open at once.
    pub circuits_per_peer: usize,
    /// Longest a circuit stays open.
    pub circuit_duration: Duration,
    /// Most bytes a circuit carries, each way.
    pub circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            reservations: 256,
            circuits: 64,
            circuits_per_peer: 8,
            circuit_duration: Duration::from_secs(30 * 60),
            circuit_bytes: 256 << 20,
        }
    }
}

impl RelayLimits {
    fn config(&self) -> relay::Config {
        relay::Config {
            max_reservations: self.reservations,
            max_reservations_per_peer: 2,
            reservation_duration: Duration::from_secs(60 * 60),
            max_circuits: self.circuits,
            max_circuits_per_peer: self.circuits_per_peer,
            max_circuit_duration: self.circuit_duration,
            max_circuit_bytes: self.circuit_bytes,
            ..relay::Config::default()
        }
    }
}

/// The name Potluck's DHT speaks: its own, so it never mixes with another network's.
pub const KAD_PROTOCOL: libp2p::StreamProtocol = libp2p::StreamProtocol::new("/potluck/kad/1");

/// Kademlia on Potluck's own protocol name; a peer serving a relay is public by its
/// operator's word and answers DHT queries at once, others once AutoNAT confirms an address.
fn kademlia(peer_id: libp2p::PeerId, public: bool) -> kad::Behaviour<kad::store::MemoryStore> {
    let mut config = kad::Config::new(KAD_PROTOCOL);
    config.set_query_timeout(Duration::from_secs(20));
    let mut kad =
        kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), config);
    if public {
        kad.set_mode(Some(kad::Mode::Server));
    }
    kad
}

/// AutoNAT as a pool wants it: probes soon after joining and again every few minutes, and
/// dial-backs for peers on any address (a LAN pool's are private ones).
fn autonat_config() -> autonat::Config {
    autonat::Config {
        boot_delay: Duration::from_secs(1),
        retry_interval: Duration::from_secs(10),
        refresh_interval: Duration::from_secs(5 * 60),
        throttle_server_period: Duration::from_secs(5),
        confidence_max: 1,
        timeout: Duration::from_secs(10),
        only_global_ips: false,
        ..autonat::Config::default()
    }
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

/// Builds the swarm for `key`, a peer of `kind`, with mDNS when `use_mdns`, a relay within
/// `relay`'s limits when given, its protocols open to the peers `gate` admits.
pub fn build(
    key: identity::Keypair,
    kind: PeerKind,
    use_mdns: bool,
    relay: Option<RelayLimits>,
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
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| err(&e))?
        .with_behaviour(|key, relay_client| {
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
                kad: Gated::new(kademlia(peer_id, relay.is_some()), gate),
                mdns: mdns.into(),
                streams: libp2p_stream::Behaviour::new(),
                autonat: Gated::new(autonat::Behaviour::new(peer_id, autonat_config()), gate),
                relay_client,
                relay: relay
                    .map(|limits| Gated::new(relay::Behaviour::new(peer_id, limits.config()), gate))
                    .into(),
                dcutr: dcutr::Behaviour::new(peer_id),
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
    /// How peers can be reached, kept by [`handle_common`].
    pub reach: Reach,
}

/// Loads (or creates) the identity in `data_dir`, builds the swarm of a peer of `kind`
/// (serving a relay within `relay` when given), listens on `listen`, dials `bootstrap` and
/// joins `pool`'s advert topic, answering hellos at its gate. Prints the peer id and the pool
/// for operators and scripts.
pub fn start(
    data_dir: &std::path::Path,
    kind: PeerKind,
    pool: &PoolMembership,
    listen: &[libp2p::Multiaddr],
    bootstrap: &[libp2p::Multiaddr],
    use_mdns: bool,
    relay: Option<RelayLimits>,
) -> Result<Started, StartError> {
    let key = crate::identity::load_or_create(data_dir)?;
    let (gate, drops) = Gate::new(pool.clone());
    let mut swarm = build(libp2p_keypair(key.secret())?, kind, use_mdns, relay, &gate)?;
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
        reach: Reach::default(),
    })
}

/// Handles the swarm events every peer treats alike (listen addresses, identify, mDNS,
/// admission at `gate`, gossiped revocations) and returns the rest for the caller: new and
/// closed connections too, after the gate has seen them, gossip only from peers the gate
/// admits, and identify only from admitted Potluck peers.
pub fn handle_common(
    swarm: &mut Swarm<PoolBehaviour>,
    gate: &Gate,
    reach: &Reach,
    event: libp2p::swarm::SwarmEvent<PoolBehaviourEvent>,
) -> Option<libp2p::swarm::SwarmEvent<PoolBehaviourEvent>> {
    use libp2p::swarm::SwarmEvent;
    match &event {
        SwarmEvent::ConnectionEstablished {
            peer_id,
            connection_id,
            endpoint,
            num_established,
            ..
        } => {
            let addr = endpoint.get_remote_address();
            tracing::info!(%peer_id, %addr, "connected");
            reach.opened(*peer_id, *connection_id, addr, endpoint.is_dialer());
            // Streams pick any of a peer's connections; leaving the new one alone moves them.
            for old in reach.moved(*peer_id, *connection_id) {
                tracing::info!(%peer_id, %addr, "moved to a better connection; the old one closes");
                swarm.close_connection(old);
            }
            if num_established.get() == 1 {
                gate.connected(*peer_id, swarm.behaviour().streams.new_control());
            }
            return Some(event);
        }
        SwarmEvent::ConnectionClosed {
            peer_id,
            connection_id,
            num_established,
            ..
        } => {
            reach.closed(*peer_id, *connection_id);
            if *num_established == 0 {
                gate.disconnected(peer_id);
            }
            return Some(event);
        }
        SwarmEvent::OutgoingConnectionError {
            connection_id,
            peer_id: Some(peer_id),
            error,
        } => {
            if reach.move_failed(*peer_id, *connection_id) {
                tracing::info!(%peer_id, "no better connection, staying on this one: {error}");
            } else {
                crate::moves::redial_plain(swarm, reach, *peer_id, error);
            }
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
            println!("listening {}", with_peer(&address, *swarm.local_peer_id()));
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
                if info.protocols.contains(&relay::HOP_PROTOCOL_NAME) {
                    listen_through(swarm, reach, peer_id, connection_id);
                }
                crate::moves::prefer_quic(swarm, reach, peer_id, connection_id, &info.listen_addrs);
                crate::moves::prefer_direct(
                    swarm,
                    reach,
                    peer_id,
                    connection_id,
                    &info.listen_addrs,
                );
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
        SwarmEvent::ListenerClosed { listener_id, .. } => {
            if let Some(relay) = reach.listener_closed(listener_id) {
                println!("no longer reachable through relay {relay}");
            }
            None
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::Autonat(event)) => {
            on_autonat(reach, event);
            None
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::RelayClient(event)) => {
            if let relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal: false,
                ..
            } = event
            {
                println!("reachable through relay {relay_peer_id}");
            }
            None
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::Relay(event)) => {
            match event {
                relay::Event::ReservationReqAccepted { src_peer_id, .. } => {
                    reach.reserved(src_peer_id, true)
                }
                relay::Event::ReservationTimedOut { src_peer_id } => {
                    reach.reserved(src_peer_id, false)
                }
                relay::Event::CircuitReqAccepted {
                    src_peer_id,
                    dst_peer_id,
                } => tracing::info!(%src_peer_id, %dst_peer_id, "relaying a circuit"),
                other => tracing::debug!(?other, "relay"),
            }
            None
        }
        SwarmEvent::Behaviour(PoolBehaviourEvent::Dcutr(dcutr::Event {
            remote_peer_id,
            result,
        })) => {
            match result {
                Ok(direct) => {
                    println!("hole punched to {remote_peer_id}: direct now");
                    // Streams pick any of a peer's connections; leaving only the direct one
                    // moves the stage traffic off the relay.
                    for relayed in reach.punched(remote_peer_id, direct) {
                        swarm.close_connection(relayed);
                    }
                }
                Err(e) => {
                    tracing::info!(peer = %remote_peer_id, "hole punch failed, staying relayed: {e}")
                }
            }
            None
        }
        other => Some(other),
    }
}

/// Listens through `relay` (met on `conn`) when this peer is not known to be public and
/// has relays to spare, at the address it dialled the relay on, so peers that cannot dial it
/// directly reach it through a circuit at once.
fn listen_through(
    swarm: &mut Swarm<PoolBehaviour>,
    reach: &Reach,
    relay: libp2p::PeerId,
    conn: libp2p::swarm::ConnectionId,
) {
    use libp2p::multiaddr::Protocol;
    // A peer serving a relay is a public one; circuits are for those that are not.
    if swarm.behaviour().relay.is_enabled() {
        return;
    }
    let Some(dialled) = reach.dialled_at(conn) else {
        return;
    };
    if crate::reach::is_circuit(&dialled) || !reach.take_relay(relay) {
        return;
    }
    let mut addr: libp2p::Multiaddr = dialled
        .iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect();
    addr = addr.with(Protocol::P2p(relay)).with(Protocol::P2pCircuit);
    match swarm.listen_on(addr.clone()) {
        Ok(id) => reach.relay_listener(id, relay),
        Err(e) => {
            tracing::warn!(%addr, "listening through a relay: {e}");
            reach.drop_relay(&relay);
        }
    }
}

/// Keeps AutoNAT's findings: this peer's own status, and the dial-backs it made for others.
fn on_autonat(reach: &Reach, event: autonat::Event) {
    use autonat::{Event, InboundProbeError, InboundProbeEvent, NatStatus, ResponseError};
    match event {
        Event::StatusChanged { new, .. } => {
            let public = match &new {
                NatStatus::Public(addr) => {
                    println!("reachable: public at {addr}");
                    Some(true)
                }
                NatStatus::Private => {
                    println!("reachable: behind a NAT (dial-backs fail); relays carry inbound");
                    Some(false)
                }
                NatStatus::Unknown => None,
            };
            reach.set_own(public);
        }
        Event::InboundProbe(InboundProbeEvent::Response { peer, .. }) => {
            reach.dialled_back(peer, true)
        }
        Event::InboundProbe(InboundProbeEvent::Error {
            peer,
            error: InboundProbeError::Response(ResponseError::DialError),
            ..
        }) => reach.dialled_back(peer, false),
        other => tracing::debug!(?other, "autonat"),
    }
}
