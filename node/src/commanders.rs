//! Who may command this node: assign its layers (which reloads them and ends every session
//! on the old ones) and hand it work units. Being admitted to the pool is not enough; in a
//! public pool everyone is admitted. A node obeys the coordinators it joined through (the
//! peer ids of its `--bootstrap` addresses) and, in a private pool, members whose certificate
//! makes them admins. A node given no bootstrap peer id (found its coordinator on the LAN by
//! mDNS) obeys the first peer that assigns it layers, and only that one, for as long as it
//! runs.
//!
//! A node may join through another node rather than through the coordinator (the address a
//! friend pasted). It then also obeys the coordinator that bootstrap peer says, in its own
//! signed advert, that it answers to: choosing a peer to join through is trusting its word
//! on who runs the pool, and only a named bootstrap peer's word counts.

use libp2p::{Multiaddr, PeerId};
use potluck_net::swarm::peer_in;
use potluck_protocol::membership::Role;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// The peers this node takes commands from.
#[derive(Debug, Default)]
pub struct Commanders {
    named: HashSet<PeerId>,
    /// The first assigner, when no peer was named.
    pinned: Mutex<Option<PeerId>>,
    /// The coordinator each named bootstrap peer says it answers to.
    learned: Mutex<HashMap<PeerId, PeerId>>,
    /// The peer whose assignment this node last took.
    assigner: Mutex<Option<PeerId>>,
}

/// What a peer asks for: an assignment may pin the node's commander; a work unit never does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Load these layers.
    Assign,
    /// Run this work unit.
    Work,
}

impl Commanders {
    /// The peer ids named in `bootstrap` (their `/p2p/` parts).
    pub fn from_bootstrap(bootstrap: &[Multiaddr]) -> Self {
        let named = bootstrap.iter().filter_map(peer_in).collect();
        Self {
            named,
            ..Self::default()
        }
    }

    /// Whether `peer` is one of the bootstrap peers this node was started with.
    pub fn is_named(&self, peer: &PeerId) -> bool {
        self.named.contains(peer)
    }

    /// Records that the named bootstrap peer `via` answers to `coordinator`; whether that is
    /// news (a coordinator this node did not obey before). Anyone else's word is ignored.
    pub fn learn(&self, via: PeerId, coordinator: PeerId) -> bool {
        if !self.is_named(&via) || self.is_named(&coordinator) {
            return false;
        }
        let mut learned = lock(&self.learned);
        let new = !learned.values().any(|c| *c == coordinator);
        learned.insert(via, coordinator);
        new
    }

    /// Records a coordinator found under the pool's id in the DHT; whether that is news.
    /// It is obeyed as a named peer's word would be: a node that asked the DHT for its
    /// pool's coordinators chose to trust the answer, and in a private pool the gate let it
    /// connect only with a certificate the pool key signed.
    pub fn found(&self, coordinator: PeerId) -> bool {
        if self.is_named(&coordinator) {
            return false;
        }
        let mut learned = lock(&self.learned);
        let new = !learned.values().any(|c| *c == coordinator);
        learned.insert(coordinator, coordinator);
        new
    }

    /// The coordinators learned from bootstrap peers or found in the DHT.
    pub fn learned(&self) -> Vec<PeerId> {
        let mut out: Vec<PeerId> = lock(&self.learned).values().copied().collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether this node takes orders from `peer` now (a bootstrap peer, a coordinator one
    /// names, or the peer it pinned); admins aside.
    pub fn obeys(&self, peer: &PeerId) -> bool {
        self.is_named(peer)
            || lock(&self.learned).values().any(|c| c == peer)
            || *lock(&self.pinned) == Some(*peer)
    }

    /// The peer whose assignment this node last took, if any.
    pub fn assigner(&self) -> Option<PeerId> {
        *lock(&self.assigner)
    }

    /// Whether `peer`, whose certificate (if any) gives it `role`, may give `order`.
    pub fn permits(&self, peer: &PeerId, role: Option<Role>, order: Order) -> bool {
        let ok = self.decide(peer, role, order);
        if ok && order == Order::Assign {
            *lock(&self.assigner) = Some(*peer);
        }
        ok
    }

    fn decide(&self, peer: &PeerId, role: Option<Role>, order: Order) -> bool {
        if role == Some(Role::Admin) || self.obeys(peer) {
            return true;
        }
        if !self.named.is_empty() {
            return false;
        }
        let mut pinned = lock(&self.pinned);
        match *pinned {
            Some(p) => p == *peer,
            None if order == Order::Assign => {
                *pinned = Some(*peer);
                tracing::info!(%peer, "this node takes commands from {peer} from now on (the first peer to assign it layers)");
                true
            }
            None => false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> PeerId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes([n; 32]).unwrap();
        key.public().to_peer_id()
    }

    #[test]
    fn only_bootstrap_peers_and_admins_command_a_node_that_named_its_coordinator() {
        let coordinator = peer(1);
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{coordinator}")
            .parse()
            .unwrap();
        let c = Commanders::from_bootstrap(&[addr]);
        assert!(c.permits(&coordinator, None, Order::Assign));
        assert!(c.permits(&coordinator, None, Order::Work));
        assert!(!c.permits(&peer(2), None, Order::Assign));
        assert!(!c.permits(&peer(2), Some(Role::Member), Order::Work));
        assert!(!c.permits(&peer(2), Some(Role::Trusted), Order::Assign));
        assert!(c.permits(&peer(3), Some(Role::Admin), Order::Assign));
    }

    #[test]
    fn a_node_found_by_mdns_obeys_its_first_assigner_only() {
        let c = Commanders::from_bootstrap(&[]);
        assert!(!c.permits(&peer(1), None, Order::Work), "work does not pin");
        assert!(c.permits(&peer(1), None, Order::Assign));
        assert!(c.permits(&peer(1), None, Order::Work));
        assert!(!c.permits(&peer(2), None, Order::Assign));
        assert!(!c.permits(&peer(2), None, Order::Work));
    }

    #[test]
    fn a_node_that_joined_through_a_node_obeys_the_coordinator_that_node_names() {
        let friend = peer(1);
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{friend}")
            .parse()
            .unwrap();
        let c = Commanders::from_bootstrap(&[addr]);
        let coordinator = peer(2);
        assert!(!c.permits(&coordinator, None, Order::Assign));
        // A stranger's word does not count, nor does naming a bootstrap peer.
        assert!(!c.learn(peer(3), peer(4)));
        assert!(!c.permits(&peer(4), None, Order::Assign));
        assert!(!c.learn(friend, friend));
        assert!(c.learn(friend, coordinator));
        assert!(!c.learn(friend, coordinator), "heard before");
        assert!(c.permits(&coordinator, None, Order::Assign));
        assert_eq!(c.assigner(), Some(coordinator));
        assert_eq!(c.learned(), vec![coordinator]);
        // The friend moved to another coordinator: the old one is obeyed no more.
        assert!(c.learn(friend, peer(5)));
        assert!(!c.permits(&coordinator, None, Order::Work));
        assert!(c.permits(&peer(5), None, Order::Work));
    }
}
