//! How each peer can be reached, as this peer sees it, and this peer's own standing behind a
//! NAT: what AutoNAT's dial-backs found, which connections run through a relay's circuit,
//! which were upgraded by a DCUtR hole punch, and who holds a circuit reservation here.
//! The swarm loop feeds it ([`crate::swarm::handle_common`]); the dashboard reads it.

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::{Multiaddr, PeerId};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// Most relays a peer behind a NAT listens through at once.
pub const MAX_RELAYS: usize = 2;

/// How a peer can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// A dial back to it worked: it accepts connections from anyone.
    Public,
    /// Behind a NAT; a hole punch gave a direct connection.
    HolePunched,
    /// Reached only through a relay's circuit.
    Relayed,
    /// Behind a NAT, connected only over the connection it opened itself.
    BehindNat,
    /// Not known yet (no dial back has been tried).
    Unknown,
}

impl Reachability {
    /// The name the dashboard and `/api/pool` show.
    pub fn as_str(self) -> &'static str {
        match self {
            Reachability::Public => "public",
            Reachability::HolePunched => "hole-punched",
            Reachability::Relayed => "relayed",
            Reachability::BehindNat => "behind-nat",
            Reachability::Unknown => "unknown",
        }
    }
}

/// What is known of one peer's connections and reachability.
#[derive(Debug, Default)]
struct PeerReach {
    direct: HashSet<ConnectionId>,
    relayed: HashSet<ConnectionId>,
    punched: HashSet<ConnectionId>,
    /// What the last AutoNAT dial-back to it (by this peer) found.
    dialled_back: Option<bool>,
    /// It holds a circuit reservation at this peer's relay.
    reserved_here: bool,
}

impl PeerReach {
    fn classify(&self) -> Reachability {
        if !self.punched.is_empty() {
            Reachability::HolePunched
        } else if self.dialled_back == Some(true) {
            Reachability::Public
        } else if self.direct.is_empty() && !self.relayed.is_empty() {
            Reachability::Relayed
        } else if self.dialled_back == Some(false) || self.reserved_here {
            Reachability::BehindNat
        } else {
            Reachability::Unknown
        }
    }
}

#[derive(Debug, Default)]
struct State {
    peers: HashMap<PeerId, PeerReach>,
    /// Where this peer dialled its outbound connections.
    dialled: HashMap<ConnectionId, Multiaddr>,
    /// Relays this peer listens through (asked or confirmed).
    relays: HashSet<PeerId>,
    listeners: HashMap<ListenerId, PeerId>,
    /// What AutoNAT says of this peer itself.
    own_public: Option<bool>,
}

/// A peer's one picture of reachability, shared between its swarm loop and its readers.
#[derive(Debug, Clone, Default)]
pub struct Reach(Arc<Mutex<State>>);

/// One peer's row, for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerReachView {
    /// How it can be reached.
    pub reachability: Reachability,
    /// Whether its traffic with this peer runs through a relay now.
    pub relayed_now: bool,
    /// Whether it holds a circuit reservation at this peer's relay.
    pub reserved_here: bool,
}

/// Whether a connection at `addr` runs through a relay's circuit: a dialled circuit names
/// it, and one accepted through a relay knows its remote only as `/p2p/<id>`, with no
/// network address of its own.
pub fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
        || !addr.iter().any(|p| {
            matches!(
                p,
                Protocol::Ip4(_)
                    | Protocol::Ip6(_)
                    | Protocol::Dns(_)
                    | Protocol::Dns4(_)
                    | Protocol::Dns6(_)
                    | Protocol::Memory(_)
            )
        })
}

impl Reach {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a cache of what the swarm reported; a panic elsewhere leaves it usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to `peer` at `addr` opened (`dialled` by this peer, or accepted).
    pub fn opened(&self, peer: PeerId, conn: ConnectionId, addr: &Multiaddr, dialled: bool) {
        let mut s = self.lock();
        let p = s.peers.entry(peer).or_default();
        if is_circuit(addr) {
            p.relayed.insert(conn);
        } else {
            p.direct.insert(conn);
        }
        if dialled {
            s.dialled.insert(conn, addr.clone());
        }
    }

    /// A connection closed; a peer with none left is forgotten, bar what AutoNAT found.
    pub fn closed(&self, peer: PeerId, conn: ConnectionId) {
        let mut s = self.lock();
        s.dialled.remove(&conn);
        if let Some(p) = s.peers.get_mut(&peer) {
            p.direct.remove(&conn);
            p.relayed.remove(&conn);
            p.punched.remove(&conn);
            if p.direct.is_empty() && p.relayed.is_empty() && p.dialled_back.is_none() {
                s.peers.remove(&peer);
            }
        }
    }

    /// Where this peer dialled one of its connections (none for accepted ones).
    pub fn dialled_at(&self, conn: ConnectionId) -> Option<Multiaddr> {
        self.lock().dialled.get(&conn).cloned()
    }

    /// A hole punch to `peer` gave the direct connection `conn`; returns the relayed
    /// connections to it, which the caller closes so streams take the direct one.
    pub fn punched(&self, peer: PeerId, conn: ConnectionId) -> Vec<ConnectionId> {
        let mut s = self.lock();
        let p = s.peers.entry(peer).or_default();
        p.punched.insert(conn);
        p.direct.insert(conn);
        p.relayed.iter().copied().collect()
    }

    /// This peer's AutoNAT server dialled `peer` back: `ok` when that worked.
    pub fn dialled_back(&self, peer: PeerId, ok: bool) {
        self.lock().peers.entry(peer).or_default().dialled_back = Some(ok);
    }

    /// `peer` took (or lost) a circuit reservation at this peer's relay.
    pub fn reserved(&self, peer: PeerId, held: bool) {
        self.lock().peers.entry(peer).or_default().reserved_here = held;
    }

    /// What AutoNAT concluded of this peer itself.
    pub fn set_own(&self, public: Option<bool>) {
        self.lock().own_public = public;
    }

    /// Whether this peer should listen through `relay`: it is not known to be public, it
    /// does not already, and it listens through fewer than [`MAX_RELAYS`]. Marks it taken.
    pub fn take_relay(&self, relay: PeerId) -> bool {
        let mut s = self.lock();
        if s.own_public == Some(true) || s.relays.contains(&relay) || s.relays.len() >= MAX_RELAYS {
            return false;
        }
        s.relays.insert(relay)
    }

    /// The listener `id` listens through `relay`.
    pub fn relay_listener(&self, id: ListenerId, relay: PeerId) {
        self.lock().listeners.insert(id, relay);
    }

    /// Listening through `relay` failed or ended; another may be taken.
    pub fn drop_relay(&self, relay: &PeerId) {
        self.lock().relays.remove(relay);
    }

    /// The listener `id` closed; returns the relay it listened through, if it did.
    pub fn listener_closed(&self, id: ListenerId) -> Option<PeerId> {
        let mut s = self.lock();
        let relay = s.listeners.remove(&id)?;
        s.relays.remove(&relay);
        Some(relay)
    }

    /// How `peer` can be reached, if this peer has met it.
    pub fn of(&self, peer: &PeerId) -> Option<PeerReachView> {
        let s = self.lock();
        let p = s.peers.get(peer)?;
        Some(PeerReachView {
            reachability: p.classify(),
            relayed_now: p.direct.is_empty() && !p.relayed.is_empty(),
            reserved_here: p.reserved_here,
        })
    }

    /// What AutoNAT says of this peer: public, behind a NAT, or not known yet.
    pub fn own(&self) -> Option<bool> {
        self.lock().own_public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_is_classified_by_what_was_seen() {
        let reach = Reach::default();
        let peer = PeerId::random();
        let relay = PeerId::random();
        let circuit = addr(&format!(
            "/ip4/203.0.113.10/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{peer}"
        ));
        reach.opened(peer, ConnectionId::new_unchecked(1), &circuit, true);
        assert_eq!(
            reach.dialled_at(ConnectionId::new_unchecked(1)),
            Some(circuit)
        );
        assert_eq!(reach.of(&peer).unwrap().reachability, Reachability::Relayed);
        assert!(reach.of(&peer).unwrap().relayed_now);
        let direct = ConnectionId::new_unchecked(2);
        let to_close = reach.punched(peer, direct);
        assert_eq!(to_close, vec![ConnectionId::new_unchecked(1)]);
        reach.closed(peer, ConnectionId::new_unchecked(1));
        let view = reach.of(&peer).unwrap();
        assert_eq!(view.reachability, Reachability::HolePunched);
        assert!(!view.relayed_now);
        reach.closed(peer, direct);
        assert!(
            reach.of(&peer).is_none(),
            "a peer with no connection is forgotten"
        );

        let home = PeerId::random();
        reach.opened(
            home,
            ConnectionId::new_unchecked(3),
            &addr("/ip4/198.51.100.1/tcp/5000"),
            false,
        );
        assert_eq!(reach.dialled_at(ConnectionId::new_unchecked(3)), None);
        assert_eq!(reach.of(&home).unwrap().reachability, Reachability::Unknown);
        reach.reserved(home, true);
        assert_eq!(
            reach.of(&home).unwrap().reachability,
            Reachability::BehindNat
        );
        reach.dialled_back(home, true);
        assert_eq!(reach.of(&home).unwrap().reachability, Reachability::Public);
    }

    #[test]
    fn a_circuit_address_reaches_the_peer_behind_the_relay() {
        let (relay, peer) = (PeerId::random(), PeerId::random());
        let circuit = addr(&format!(
            "/ip4/192.0.2.1/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{peer}"
        ));
        assert_eq!(crate::ids::peer_in(&circuit), Some(peer));
        assert!(is_circuit(&circuit));
        assert!(
            is_circuit(&addr(&format!("/p2p/{peer}"))),
            "accepted through a relay"
        );
        assert!(!is_circuit(&addr("/ip4/192.0.2.1/tcp/4001")));
        assert_eq!(crate::ids::with_peer(&circuit, peer), circuit);
        let plain = addr("/ip4/192.0.2.1/tcp/4001");
        assert_eq!(
            crate::ids::with_peer(&plain, peer),
            addr(&format!("/ip4/192.0.2.1/tcp/4001/p2p/{peer}"))
        );
    }

    #[test]
    fn relays_are_taken_once_and_not_when_public() {
        let reach = Reach::default();
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert!(reach.take_relay(a));
        assert!(!reach.take_relay(a), "one listener per relay");
        assert!(reach.take_relay(b));
        assert!(!reach.take_relay(c), "at most MAX_RELAYS");
        reach.drop_relay(&a);
        reach.set_own(Some(true));
        assert!(!reach.take_relay(c), "a public peer needs no relay");
    }
}
