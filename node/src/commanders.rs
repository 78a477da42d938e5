//! Who may command this node: assign its layers (which reloads them and ends every session
//! on the old ones) and hand it work units. Being admitted to the pool is not enough; in a
//! public pool everyone is admitted. A node obeys the coordinators it joined through (the
//! peer ids of its `--bootstrap` addresses) and, in a private pool, members whose certificate
//! makes them admins. A node given no bootstrap peer id (found its coordinator on the LAN by
//! mDNS) obeys the first peer that assigns it layers, and only that one, for as long as it
//! runs.

use libp2p::{Multiaddr, PeerId};
use potluck_net::swarm::peer_in;
use potluck_protocol::membership::Role;
use std::collections::HashSet;
use std::sync::Mutex;

/// The peers this node takes commands from.
#[derive(Debug, Default)]
pub struct Commanders {
    named: HashSet<PeerId>,
    /// The first assigner, when no peer was named.
    pinned: Mutex<Option<PeerId>>,
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
            pinned: Mutex::new(None),
        }
    }

    /// Whether `peer`, whose certificate (if any) gives it `role`, may give `order`.
    pub fn permits(&self, peer: &PeerId, role: Option<Role>, order: Order) -> bool {
        if self.named.contains(peer) || role == Some(Role::Admin) {
            return true;
        }
        if !self.named.is_empty() {
            return false;
        }
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
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
}
