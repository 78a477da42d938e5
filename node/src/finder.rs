//! How a node that joined through another node finds the pool's coordinator: every node's
//! advert points at the coordinator it answers to (peer id and addresses), and a node reads
//! that pointer in its bootstrap peers' adverts, takes the coordinator's commands (see
//! [`Commanders::learn`]) and dials it. Peers are told apart by the role they announce in
//! identify; addresses come from identify too.

use crate::commanders::Commanders;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use potluck_net::swarm::{peer_id_of, peer_in, PeerKind};
use potluck_protocol::codec::decode_frame;
use potluck_protocol::messages::{
    CapacityAdvert, CoordinatorPointer, Message, ADVERT_DOMAIN, MAX_POINTER_ADDRS,
    MAX_POINTER_ADDR_LEN,
};
use std::collections::HashMap;
use std::sync::Arc;

/// Most peers besides bootstrap peers and learned coordinators whose identify this node
/// remembers at once: it only ever reads those that say they are coordinators (a node found
/// by mDNS points at the one it obeys).
const MAX_MET: usize = 1024;

/// What identify and bootstrap peers told this node of where its coordinator is.
pub struct Finder {
    commanders: Arc<Commanders>,
    bootstrap: Vec<Multiaddr>,
    pool: String,
    met: HashMap<PeerId, (Option<PeerKind>, Vec<Multiaddr>)>,
    /// Addresses a bootstrap peer gave for each coordinator it names now.
    told: HashMap<PeerId, Vec<Multiaddr>>,
    /// The newest advert heard from each bootstrap peer, so an old one replayed is ignored.
    newest: HashMap<PeerId, u64>,
}

/// A coordinator pointer read in a bootstrap peer's advert.
#[derive(Debug, PartialEq, Eq)]
pub struct Pointed {
    /// The bootstrap peer that names it.
    pub via: PeerId,
    /// The coordinator.
    pub coordinator: PeerId,
    /// Whether this node did not obey it before.
    pub new: bool,
}

impl Finder {
    /// A finder for a node of `pool` (its gossip tag) that obeys `commanders` and was
    /// started with `bootstrap`.
    pub fn new(commanders: Arc<Commanders>, bootstrap: &[Multiaddr], pool: &str) -> Self {
        Self {
            commanders,
            bootstrap: bootstrap.to_vec(),
            pool: pool.to_string(),
            met: HashMap::new(),
            told: HashMap::new(),
            newest: HashMap::new(),
        }
    }

    /// Records what `peer` said of itself in identify.
    pub fn identified(&mut self, peer: PeerId, agent: &str, listen: &[Multiaddr]) {
        let kind = PeerKind::of_agent(agent);
        let ours = self.commanders.is_named(&peer) || self.commanders.learned().contains(&peer);
        let room = self.met.len() < MAX_MET || self.met.contains_key(&peer);
        if ours || (kind == Some(PeerKind::Coordinator) && room) {
            self.met
                .insert(peer, (kind, bounded(listen.iter().cloned())));
        }
    }

    /// Whether a coordinator this node obeys is connected (identified and not gone).
    pub fn has_coordinator(&self) -> bool {
        self.met
            .iter()
            .any(|(p, (kind, _))| *kind == Some(PeerKind::Coordinator) && self.commanders.obeys(p))
    }

    /// Forgets a peer whose last connection closed.
    pub fn gone(&mut self, peer: &PeerId) {
        self.met.remove(peer);
    }

    /// The coordinator this node points others at in its advert, with the addresses this
    /// node knows for it: the first of the one whose assignment it took (while it still
    /// obeys it), a bootstrap peer that says it is a coordinator, or one learned from a
    /// bootstrap peer, for which it knows an address.
    pub fn pointer(&self) -> Option<CoordinatorPointer> {
        let is_coordinator =
            |p: &PeerId| matches!(self.met.get(p), Some((Some(PeerKind::Coordinator), _)));
        let assigner = self
            .commanders
            .assigner()
            .filter(|p| self.commanders.obeys(p));
        let named = self
            .bootstrap
            .iter()
            .filter_map(peer_in)
            .filter(|p| is_coordinator(p));
        assigner
            .into_iter()
            .chain(named)
            .chain(self.commanders.learned())
            .find_map(|peer| {
                let addrs = self.addresses_of(&peer);
                (!addrs.is_empty()).then(|| CoordinatorPointer {
                    peer: peer.to_string(),
                    addrs: addrs.iter().map(ToString::to_string).collect(),
                })
            })
    }

    /// Where `peer` may be dialled, the addresses known to reach it first: the bootstrap
    /// address naming it, what a bootstrap peer said of it, then what it said of itself in
    /// identify (loopback last: it reaches only this machine).
    pub fn addresses_of(&self, peer: &PeerId) -> Vec<Multiaddr> {
        let from_bootstrap = self
            .bootstrap
            .iter()
            .filter(|a| peer_in(a) == Some(*peer))
            .cloned();
        let told = self.told.get(peer).into_iter().flatten().cloned();
        let mut own: Vec<Multiaddr> = self
            .met
            .get(peer)
            .map(|(_, a)| a.clone())
            .unwrap_or_default();
        own.sort_by_key(is_loopback);
        bounded(from_bootstrap.chain(told).chain(own))
    }

    /// Reads a gossiped frame from `source` at unix time `now`: a named bootstrap peer's own
    /// current advert (for this pool, unexpired, newer than the last heard from it) that
    /// points at a coordinator. Anything else, an old advert replayed included, is ignored.
    pub fn heard(&mut self, source: PeerId, data: &[u8], now: u64) -> Option<Pointed> {
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
        advert.check_current(&self.pool, now).ok()?;
        advert.check_text_fields().ok()?;
        if self
            .newest
            .get(&source)
            .is_some_and(|seq| advert.seq <= *seq)
        {
            return None;
        }
        self.newest.insert(source, advert.seq);
        let pointer = advert.coordinator?;
        let coordinator: PeerId = pointer.peer.parse().ok()?;
        let addrs = bounded(pointer.addrs.iter().filter_map(|a| a.parse().ok()));
        let new = self.commanders.learn(source, coordinator);
        if !addrs.is_empty() {
            self.told.insert(coordinator, addrs);
        }
        // Only coordinators some bootstrap peer names now keep their addresses.
        let named_now = self.commanders.learned();
        self.told.retain(|p, _| named_now.contains(p));
        named_now.contains(&coordinator).then_some(Pointed {
            via: source,
            coordinator,
            new,
        })
    }
}

/// Whether an address reaches only this machine.
fn is_loopback(a: &Multiaddr) -> bool {
    a.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// At most [`MAX_POINTER_ADDRS`] distinct addresses of at most [`MAX_POINTER_ADDR_LEN`]
/// bytes, without a `/p2p/` part (the pointer names the peer once).
fn bounded(addrs: impl Iterator<Item = Multiaddr>) -> Vec<Multiaddr> {
    let mut out: Vec<Multiaddr> = Vec::new();
    for mut a in addrs {
        if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
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

    const NOW: u64 = 1_000_000;

    fn keyed(n: u8) -> (Keypair, PeerId) {
        let k = Keypair::from_secret(&[n; 32]);
        let id = peer_id_of(&k.public()).unwrap();
        (k, id)
    }

    fn addr_of(peer: PeerId, port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}/p2p/{peer}")
            .parse()
            .unwrap()
    }

    /// A frame of `key`'s advert number `seq`, issued at `issued` for 30 s, for `pool`.
    fn advert_frame(
        key: &Keypair,
        pool: &str,
        seq: u64,
        issued: u64,
        pointer: Option<CoordinatorPointer>,
    ) -> Vec<u8> {
        let advert = CapacityAdvert {
            pool: pool.into(),
            device: DeviceKind::Cpu,
            memory_bytes: 1 << 30,
            gflops: 1.0,
            mem_gbps: 1.0,
            threads: 1,
            models: vec![],
            loaded: None,
            seq,
            issued_at: issued,
            expires_at: issued + 30,
            name: None,
            coordinator: pointer,
        };
        encode_frame(&Message::Advert(
            Signed::sign(&advert, ADVERT_DOMAIN, key).unwrap(),
        ))
        .unwrap()
    }

    fn pointer_to(peer: PeerId, port: u16) -> CoordinatorPointer {
        CoordinatorPointer {
            peer: peer.to_string(),
            addrs: vec![format!("/ip4/10.0.0.1/tcp/{port}"), "not an address".into()],
        }
    }

    #[test]
    fn a_node_learns_its_coordinator_from_its_bootstrap_peers_current_advert_only() {
        let (friend_key, friend) = keyed(1);
        let (stranger_key, stranger) = keyed(2);
        let (_, coordinator) = keyed(3);
        let bootstrap = [addr_of(friend, 4001)];
        let commanders = Arc::new(Commanders::from_bootstrap(&bootstrap));
        let mut f = Finder::new(commanders.clone(), &bootstrap, "public");
        let to = pointer_to(coordinator, 7470);
        let heard = |f: &mut Finder, from, frame: Vec<u8>| f.heard(from, &frame, NOW);
        // A stranger's advert; the friend's relayed with another's signature; garbage; one
        // for another pool; an expired one; one dated an hour ahead; one with no pointer.
        let cases = [
            (
                stranger,
                advert_frame(&stranger_key, "public", 1, NOW, Some(to.clone())),
            ),
            (
                friend,
                advert_frame(&stranger_key, "public", 1, NOW, Some(to.clone())),
            ),
            (friend, b"garbage".to_vec()),
            (
                friend,
                advert_frame(&friend_key, "lab", 1, NOW, Some(to.clone())),
            ),
            (
                friend,
                advert_frame(&friend_key, "public", 1, NOW - 60, Some(to.clone())),
            ),
            (
                friend,
                advert_frame(&friend_key, "public", 1, NOW + 3600, Some(to.clone())),
            ),
            (friend, advert_frame(&friend_key, "public", 1, NOW, None)),
        ];
        for (from, frame) in cases {
            assert_eq!(heard(&mut f, from, frame), None);
        }
        assert!(!commanders.obeys(&coordinator));
        let got = heard(
            &mut f,
            friend,
            advert_frame(&friend_key, "public", 2, NOW, Some(to.clone())),
        );
        assert_eq!(
            got,
            Some(Pointed {
                via: friend,
                coordinator,
                new: true
            })
        );
        assert_eq!(
            f.addresses_of(&coordinator),
            vec!["/ip4/10.0.0.1/tcp/7470".parse::<Multiaddr>().unwrap()]
        );
        assert!(commanders.permits(&coordinator, None, crate::commanders::Order::Assign));
        // Heard again: not new, and this node now points at it too.
        let again = heard(
            &mut f,
            friend,
            advert_frame(&friend_key, "public", 3, NOW, Some(to)),
        );
        assert_eq!(again.map(|p| p.new), Some(false));
        assert_eq!(f.pointer().unwrap().peer, coordinator.to_string());
        // The friend moves to another coordinator; an old advert replayed cannot move it back.
        let (_, other) = keyed(4);
        let moved = advert_frame(&friend_key, "public", 5, NOW, Some(pointer_to(other, 7471)));
        assert_eq!(
            heard(&mut f, friend, moved).map(|p| p.coordinator),
            Some(other)
        );
        let replayed = advert_frame(
            &friend_key,
            "public",
            4,
            NOW,
            Some(pointer_to(coordinator, 7470)),
        );
        assert_eq!(heard(&mut f, friend, replayed), None);
        assert!(!commanders.obeys(&coordinator));
        assert!(
            f.addresses_of(&coordinator).is_empty(),
            "addresses of a coordinator no one names are dropped"
        );
        // The old coordinator assigned this node once; it is no longer what the node points at.
        assert_eq!(f.pointer().unwrap().peer, other.to_string());
    }

    #[test]
    fn a_node_points_at_a_bootstrap_peer_that_says_it_is_a_coordinator_by_its_pasted_address() {
        let (_, coordinator) = keyed(3);
        let pasted: Multiaddr = format!("/ip4/203.0.113.7/tcp/7470/p2p/{coordinator}")
            .parse()
            .unwrap();
        let commanders = Arc::new(Commanders::from_bootstrap(std::slice::from_ref(&pasted)));
        let mut f = Finder::new(commanders, std::slice::from_ref(&pasted), "public");
        assert_eq!(f.pointer(), None, "not yet known to be a coordinator");
        let mut many: Vec<Multiaddr> = vec!["/ip4/127.0.0.1/tcp/7470".parse().unwrap()];
        many.extend((0..20).map(|i| format!("/ip4/10.0.0.{i}/tcp/7470").parse().unwrap()));
        f.identified(coordinator, &PeerKind::Coordinator.agent(), &many);
        let p = f.pointer().unwrap();
        assert_eq!(p.peer, coordinator.to_string());
        assert_eq!(p.addrs.len(), MAX_POINTER_ADDRS);
        // The address the owner pasted comes first; loopback never crowds out the others.
        assert_eq!(p.addrs[0], "/ip4/203.0.113.7/tcp/7470");
        assert!(
            !p.addrs.iter().any(|a| a.starts_with("/ip4/127.")),
            "{:?}",
            p.addrs
        );
        f.gone(&coordinator);
        assert_eq!(f.pointer(), None);
    }

    #[test]
    fn strangers_announcing_themselves_as_nodes_are_not_remembered() {
        let (_, coordinator) = keyed(3);
        let bootstrap = [addr_of(coordinator, 7470)];
        let mut f = Finder::new(
            Arc::new(Commanders::from_bootstrap(&bootstrap)),
            &bootstrap,
            "public",
        );
        for n in 10..200u8 {
            f.identified(keyed(n).1, &PeerKind::Node.agent(), &[]);
        }
        assert!(f.met.is_empty());
        f.identified(coordinator, &PeerKind::Coordinator.agent(), &[]);
        assert_eq!(f.met.len(), 1);
    }
}
