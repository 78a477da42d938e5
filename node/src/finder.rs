//! How a node that joined through another node finds the pool's coordinator: every node's
//! advert points at the coordinator it answers to (peer id and addresses), and a node reads
//! that pointer in its bootstrap peers' adverts, takes the coordinator's commands (see
//! [`Commanders::learn`]) and dials it. Peers are told apart by the role they announce in
//! identify; addresses come from identify too.

use crate::commanders::Commanders;
use libp2p::{Multiaddr, PeerId};
use potluck_net::swarm::{peer_id_of, Role};
use potluck_protocol::codec::decode_frame;
use potluck_protocol::messages::{
    CapacityAdvert, CoordinatorPointer, Message, ADVERT_DOMAIN, MAX_POINTER_ADDRS,
    MAX_POINTER_ADDR_LEN,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Most peers whose identify this node remembers at once; past that, new ones are not
/// recorded (a node talks to its coordinator, a few bootstrap peers and pipeline neighbours).
const MAX_MET: usize = 1024;

/// What identify told this node of the peers it is connected to.
pub struct Finder {
    commanders: Arc<Commanders>,
    bootstrap: Vec<Multiaddr>,
    met: HashMap<PeerId, (Option<Role>, Vec<Multiaddr>)>,
    /// Addresses a bootstrap peer gave for each learned coordinator.
    told: HashMap<PeerId, Vec<Multiaddr>>,
}

impl Finder {
    /// A finder for a node that obeys `commanders` and was started with `bootstrap`.
    pub fn new(commanders: Arc<Commanders>, bootstrap: &[Multiaddr]) -> Self {
        Self {
            commanders,
            bootstrap: bootstrap.to_vec(),
            met: HashMap::new(),
            told: HashMap::new(),
        }
    }

    /// Records what `peer` said of itself in identify.
    pub fn identified(&mut self, peer: PeerId, agent: &str, listen: &[Multiaddr]) {
        if self.met.len() >= MAX_MET && !self.met.contains_key(&peer) {
            return;
        }
        let addrs = bounded(listen.iter().cloned());
        self.met.insert(peer, (Role::of_agent(agent), addrs));
    }

    /// Forgets a peer whose last connection closed.
    pub fn gone(&mut self, peer: &PeerId) {
        self.met.remove(peer);
    }

    /// The coordinator this node points others at in its advert: the one whose assignment
    /// it took, else a bootstrap peer that says it is a coordinator, else one learned from a
    /// bootstrap peer; with the addresses this node knows for it.
    pub fn pointer(&self) -> Option<CoordinatorPointer> {
        let is_coordinator =
            |p: &PeerId| matches!(self.met.get(p), Some((Some(Role::Coordinator), _)));
        let named = self
            .bootstrap
            .iter()
            .filter_map(potluck_net::swarm::peer_in)
            .find(|p| is_coordinator(p));
        let peer = self
            .commanders
            .assigner()
            .or(named)
            .or_else(|| self.commanders.learned().into_iter().next())?;
        let addrs = self.addresses_of(&peer);
        (!addrs.is_empty()).then(|| CoordinatorPointer {
            peer: peer.to_string(),
            addrs: addrs.iter().map(ToString::to_string).collect(),
        })
    }

    /// Where `peer` may be dialled: what it said in identify, the bootstrap address naming
    /// it, what a bootstrap peer said of it.
    pub fn addresses_of(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let from_identify = self.met.get(peer).map(|(_, a)| a.clone());
        let from_bootstrap = self
            .bootstrap
            .iter()
            .filter(|a| potluck_net::swarm::peer_in(a) == Some(*peer))
            .cloned()
            .collect::<Vec<_>>();
        let told = self.told.get(peer).cloned();
        bounded(
            from_identify
                .into_iter()
                .flatten()
                .chain(from_bootstrap)
                .chain(told.into_iter().flatten()),
        )
    }

    /// Reads a gossiped frame from `source`: when it is a named bootstrap peer's own advert
    /// pointing at a coordinator this node did not yet obey, that coordinator and where to
    /// dial it.
    pub fn heard(&mut self, source: PeerId, data: &[u8]) -> Option<(PeerId, Vec<Multiaddr>)> {
        if !self.commanders.is_named(&source) {
            return None;
        }
        let Ok((Message::Advert(signed), _)) = decode_frame::<Message>(data) else {
            return None;
        };
        if peer_id_of(&signed.signer) != Some(source) {
            return None;
        }
        let advert: CapacityAdvert = signed.verify(ADVERT_DOMAIN).ok()?;
        advert.check_text_fields().ok()?;
        let pointer = advert.coordinator?;
        let coordinator: PeerId = pointer.peer.parse().ok()?;
        let addrs = bounded(pointer.addrs.iter().filter_map(|a| a.parse().ok()));
        let new = self.commanders.learn(source, coordinator);
        if addrs.is_empty() {
            return None;
        }
        self.told.insert(coordinator, addrs.clone());
        // Only coordinators some bootstrap peer names now keep their addresses.
        let named_now = self.commanders.learned();
        self.told.retain(|p, _| named_now.contains(p));
        new.then_some((coordinator, addrs))
    }
}

/// At most [`MAX_POINTER_ADDRS`] distinct addresses of at most [`MAX_POINTER_ADDR_LEN`]
/// bytes, without a `/p2p/` part (the pointer names the peer once).
fn bounded(addrs: impl Iterator<Item = Multiaddr>) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    for mut a in addrs {
        if matches!(a.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
            a.pop();
        }
        if a.to_string().len() <= MAX_POINTER_ADDR_LEN && !out.contains(&a) {
            out.push(a);
        }
        if out.len() == MAX_POINTER_ADDRS {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use potluck_protocol::codec::encode_frame;
    use potluck_protocol::messages::DeviceKind;
    use potluck_protocol::signed::{Keypair, Signed};

    fn keyed(n: u8) -> (Keypair, PeerId) {
        let k = Keypair::from_secret(&[n; 32]);
        let id = peer_id_of(&k.public()).unwrap();
        (k, id)
    }

    fn advert_frame(key: &Keypair, pointer: Option<CoordinatorPointer>) -> Vec<u8> {
        let advert = CapacityAdvert {
            pool: "public".into(),
            device: DeviceKind::Cpu,
            memory_bytes: 1 << 30,
            gflops: 1.0,
            mem_gbps: 1.0,
            threads: 1,
            models: vec![],
            loaded: None,
            seq: 1,
            issued_at: 1,
            expires_at: 2,
            name: None,
            coordinator: pointer,
        };
        encode_frame(&Message::Advert(
            Signed::sign(&advert, ADVERT_DOMAIN, key).unwrap(),
        ))
        .unwrap()
    }

    #[test]
    fn a_node_learns_its_coordinator_from_its_bootstrap_peers_advert_only() {
        let (friend_key, friend) = keyed(1);
        let (stranger_key, stranger) = keyed(2);
        let (_, coordinator) = keyed(3);
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/4001/p2p/{friend}")
            .parse()
            .unwrap();
        let commanders = Arc::new(Commanders::from_bootstrap(&[addr]));
        let mut f = Finder::new(commanders.clone(), &[]);
        let pointer = CoordinatorPointer {
            peer: coordinator.to_string(),
            addrs: vec!["/ip4/127.0.0.1/tcp/7470".into(), "not an address".into()],
        };
        // A stranger's advert, and the friend's advert relayed with another's signature.
        assert_eq!(
            f.heard(
                stranger,
                &advert_frame(&stranger_key, Some(pointer.clone()))
            ),
            None
        );
        assert_eq!(
            f.heard(friend, &advert_frame(&stranger_key, Some(pointer.clone()))),
            None
        );
        assert_eq!(f.heard(friend, b"garbage"), None);
        assert_eq!(f.heard(friend, &advert_frame(&friend_key, None)), None);
        let (who, addrs) = f
            .heard(friend, &advert_frame(&friend_key, Some(pointer.clone())))
            .unwrap();
        assert_eq!(who, coordinator);
        assert_eq!(
            addrs,
            vec!["/ip4/127.0.0.1/tcp/7470".parse::<Multiaddr>().unwrap()]
        );
        assert!(commanders.permits(&coordinator, None, crate::commanders::Order::Assign));
        // Heard again: nothing new to dial; and this node now points at it too.
        assert_eq!(
            f.heard(friend, &advert_frame(&friend_key, Some(pointer))),
            None
        );
        assert_eq!(f.pointer().unwrap().peer, coordinator.to_string());
    }

    #[test]
    fn a_node_points_at_a_bootstrap_peer_that_says_it_is_a_coordinator() {
        let (_, coordinator) = keyed(3);
        let addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/7470/p2p/{coordinator}")
            .parse()
            .unwrap();
        let commanders = Arc::new(Commanders::from_bootstrap(std::slice::from_ref(&addr)));
        let mut f = Finder::new(commanders, &[addr]);
        assert_eq!(f.pointer(), None, "not yet known to be a coordinator");
        let many: Vec<Multiaddr> = (0..20)
            .map(|i| format!("/ip4/10.0.0.{i}/tcp/7470").parse().unwrap())
            .collect();
        f.identified(coordinator, &Role::Coordinator.agent(), &many);
        let p = f.pointer().unwrap();
        assert_eq!(p.peer, coordinator.to_string());
        assert_eq!(p.addrs.len(), MAX_POINTER_ADDRS);
        f.gone(&coordinator);
        assert_eq!(f.pointer(), None);
    }
}
