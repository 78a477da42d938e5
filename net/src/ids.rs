//! Names and times every part of the swarm side reads: the peer an address or a Potluck key
//! names, and the wall clock in the seconds adverts and certificates are dated in.

use libp2p::identity;

/// The peer an address reaches: its last `/p2p/` part (a relay's circuit address names the
/// relay first and the peer behind it last), if it names one.
pub fn peer_in(addr: &libp2p::Multiaddr) -> Option<libp2p::PeerId> {
    addr.iter()
        .filter_map(|p| match p {
            libp2p::multiaddr::Protocol::P2p(id) => Some(id),
            _ => None,
        })
        .last()
}

/// `addr` ending in `/p2p/peer`: as it is when it already does (a circuit listener's
/// address does), else with it appended.
pub fn with_peer(addr: &libp2p::Multiaddr, peer: libp2p::PeerId) -> libp2p::Multiaddr {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(id)) if id == peer => addr.clone(),
        _ => addr.clone().with(libp2p::multiaddr::Protocol::P2p(peer)),
    }
}

/// The libp2p PeerId that belongs to a Potluck public key.
pub fn peer_id_of(key: &potluck_protocol::signed::PublicKey) -> Option<libp2p::PeerId> {
    let ed = identity::ed25519::PublicKey::try_from_bytes(&key.0).ok()?;
    Some(identity::PublicKey::from(ed).to_peer_id())
}

/// The Potluck public key a peer id names: ed25519 peer ids carry their key inline, so no
/// table is scanned for it. `None` for an id that hashes its key or holds another kind.
pub fn key_of_peer(peer: &libp2p::PeerId) -> Option<potluck_protocol::signed::PublicKey> {
    let hash: &libp2p::multihash::Multihash<64> = peer.as_ref();
    // Multihash code 0 is the identity: the digest is the key itself.
    if hash.code() != 0 {
        return None;
    }
    let key = identity::PublicKey::try_decode_protobuf(hash.digest()).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    Some(potluck_protocol::signed::PublicKey(ed.to_bytes()))
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_id_gives_back_the_key_it_was_made_from() {
        let key = potluck_protocol::signed::Keypair::from_secret(&[7; 32]).public();
        let peer = peer_id_of(&key).unwrap();
        assert_eq!(key_of_peer(&peer), Some(key));
        // A peer id that hashes its key (not an ed25519 one inline) names no Potluck key.
        let hashed = libp2p::multihash::Multihash::wrap(0x12, &[1; 32]).unwrap();
        let peer = libp2p::PeerId::from_multihash(hashed).unwrap();
        assert_eq!(key_of_peer(&peer), None);
    }

    #[test]
    fn the_protocol_names_a_key_as_libp2p_does() {
        for seed in [[0u8; 32], [7; 32], [255; 32]] {
            let key = potluck_protocol::signed::Keypair::from_secret(&seed).public();
            assert_eq!(key.peer_id(), peer_id_of(&key).unwrap().to_string());
        }
    }
}
