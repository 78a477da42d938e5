//! How each peer can be reached, as this peer sees it, and this peer's own standing behind a
//! NAT: what AutoNAT's dial-backs found, which connections run through a relay's circuit,
//! which were upgraded by a DCUtR hole punch, and who holds a circuit reservation here.
//! The swarm loop feeds it ([`crate::swarm::handle_common`]); the dashboard reads it.

use crate::transport::Transport;
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
    quic: HashSet<ConnectionId>,
    /// A dial under way to move this peer's traffic (see [`Move`]).
    moving: Option<Move>,
    /// A move to QUIC was tried (once while the peer stays connected: a failed one leaves
    /// TCP, and identify's later pushes do not dial again).
    quic_tried: bool,
    /// A direct dial to a relayed peer's own addresses was tried (once, likewise).
    direct_tried: bool,
    /// A plain dial after a failed hole punch was tried (once, likewise).
    plain_tried: bool,
    /// What the last AutoNAT dial-back to it (by this peer) found.
    dialled_back: Option<bool>,
    /// It holds a circuit reservation at this peer's relay.
    reserved_here: bool,
}

/// A dial that, once open, takes a peer's traffic off other connections, which close.
#[derive(Debug, Clone, Copy)]
struct Move {
    dial: ConnectionId,
    /// The TCP connection a QUIC dial replaces; `None`: a direct dial replaces every
    /// relayed one.
    retire: Option<ConnectionId>,
}

impl PeerReach {
    /// Marks a move by the dial `to`, retiring `retire` (or every relayed connection), unless
    /// what it would reach is `already` open, its kind was `tried` (then set), or another
    /// move is under way; whether it is to be made.
    fn begin_move(
        &mut self,
        already: bool,
        tried: impl FnOnce(&mut PeerReach) -> &mut bool,
        to: ConnectionId,
        retire: Option<ConnectionId>,
    ) -> bool {
        if already || self.moving.is_some() {
            return false;
        }
        let tried = tried(self);
        if *tried {
            return false;
        }
        *tried = true;
        self.moving = Some(Move { dial: to, retire });
        true
    }

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
    /// What its traffic with this peer runs on now.
    pub transport: Transport,
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
        match Transport::of(addr) {
            Transport::Relay => {
                p.relayed.insert(conn);
            }
            Transport::Quic => {
                p.direct.insert(conn);
                p.quic.insert(conn);
            }
            Transport::Tcp => {
                p.direct.insert(conn);
            }
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
            p.quic.remove(&conn);
            if p.moving
                .is_some_and(|m| m.dial == conn || m.retire == Some(conn))
            {
                p.moving = None;
            }
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

    /// Whether to move `peer` from the TCP connection `from` to QUIC by the dial `to`: not
    /// when a QUIC connection to it is open, a move is under way, or one was tried. Marks it.
    pub fn move_to_quic(&self, peer: PeerId, from: ConnectionId, to: ConnectionId) -> bool {
        let mut s = self.lock();
        let p = s.peers.entry(peer).or_default();
        let open = !p.quic.is_empty();
        p.begin_move(open, |p| &mut p.quic_tried, to, Some(from))
    }

    /// Whether to dial `peer`, reached only through relays, at its own addresses by the dial
    /// `to` (it may be public, or this peer's NAT may let its dial out through): not when a
    /// direct connection is open, a move is under way, or one was tried. Marks it.
    pub fn dial_direct(&self, peer: PeerId, to: ConnectionId) -> bool {
        let mut s = self.lock();
        let p = s.peers.entry(peer).or_default();
        let open = !p.direct.is_empty();
        p.begin_move(open, |p| &mut p.direct_tried, to, None)
    }

    /// Whether to dial `peer`, still reached only through relays, as a plain dialer at the
    /// addresses a hole punch just failed on, by the dial `to`. The punch's dial takes the
    /// upgrade's listener role, counting on a TCP simultaneous open, which a symmetric NAT
    /// never gives (its port is new to every destination): if the other side's router let
    /// the SYN in (a cone, opened by the other side's own punching dial), the other side
    /// accepted it as a listener too and both waited. A plain dial leaves it the listener.
    /// Not when a direct connection is open, a move is under way, or one was tried.
    pub fn dial_plain(&self, peer: PeerId, to: ConnectionId) -> bool {
        let mut s = self.lock();
        let p = s.peers.entry(peer).or_default();
        let open = !p.direct.is_empty() || p.relayed.is_empty();
        p.begin_move(open, |p| &mut p.plain_tried, to, None)
    }

    /// Whether `conn` to `peer` runs through a relay.
    pub fn is_relayed(&self, peer: &PeerId, conn: ConnectionId) -> bool {
        self.lock()
            .peers
            .get(peer)
            .is_some_and(|p| p.relayed.contains(&conn))
    }

    /// The connection `conn` to `peer` opened: the connections it replaces, when it is the
    /// dial of a move (the caller closes them, so streams take the new one).
    pub fn moved(&self, peer: PeerId, conn: ConnectionId) -> Vec<ConnectionId> {
        let mut s = self.lock();
        let Some(p) = s.peers.get_mut(&peer) else {
            return Vec::new();
        };
        match p.moving {
            Some(m) if m.dial == conn => {
                p.moving = None;
                match m.retire {
                    Some(tcp) => vec![tcp],
                    None => p.relayed.iter().copied().collect(),
                }
            }
            _ => Vec::new(),
        }
    }

    /// The dial `conn` failed: whether it was a move's (what it would replace stays).
    pub fn move_failed(&self, peer: PeerId, conn: ConnectionId) -> bool {
        let mut s = self.lock();
        let Some(p) = s.peers.get_mut(&peer) else {
            return false;
        };
        let failed = p.moving.is_some_and(|m| m.dial == conn);
        if failed {
            p.moving = None;
        }
        failed
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
            transport: if p.direct.is_empty() && !p.relayed.is_empty() {
                Transport::Relay
            } else if !p.quic.is_empty() {
                Transport::Quic
            } else {
                Transport::Tcp
            },
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
    fn a_move_closes_what_it_replaces_once_its_dial_opens_and_is_tried_once() {
        let reach = Reach::default();
        let peer = PeerId::random();
        let c = ConnectionId::new_unchecked;
        reach.opened(peer, c(1), &addr("/ip4/192.0.2.1/tcp/7470"), true);
        assert!(reach.move_to_quic(peer, c(1), c(2)));
        assert!(!reach.move_to_quic(peer, c(1), c(3)), "one move at a time");
        assert_eq!(reach.moved(peer, c(9)), vec![], "another connection");
        reach.opened(peer, c(2), &addr("/ip4/192.0.2.1/udp/7470/quic-v1"), true);
        assert_eq!(reach.moved(peer, c(2)), vec![c(1)], "the TCP one closes");
        reach.closed(peer, c(1));
        assert_eq!(reach.of(&peer).unwrap().transport, Transport::Quic);

        let tcp_only = PeerId::random();
        reach.opened(tcp_only, c(4), &addr("/ip4/192.0.2.2/tcp/1"), true);
        assert!(reach.move_to_quic(tcp_only, c(4), c(5)));
        assert!(reach.move_failed(tcp_only, c(5)));
        assert!(!reach.move_failed(tcp_only, c(5)), "reported once");
        assert!(!reach.move_to_quic(tcp_only, c(4), c(6)), "tried once");
        assert_eq!(reach.of(&tcp_only).unwrap().transport, Transport::Tcp);

        let (relay, behind) = (PeerId::random(), PeerId::random());
        let circuit = addr(&format!(
            "/ip4/192.0.2.3/tcp/1/p2p/{relay}/p2p-circuit/p2p/{behind}"
        ));
        reach.opened(behind, c(7), &circuit, true);
        assert!(reach.is_relayed(&behind, c(7)));
        assert_eq!(reach.of(&behind).unwrap().transport, Transport::Relay);
        assert!(reach.dial_direct(behind, c(8)));
        reach.opened(behind, c(8), &addr("/ip4/192.0.2.3/tcp/2"), true);
        assert_eq!(
            reach.moved(behind, c(8)),
            vec![c(7)],
            "the relayed one closes"
        );
        assert!(!reach.dial_direct(behind, c(10)), "direct already");
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
