//! Moves to a better connection: a peer reached over TCP that also listens on QUIC, a peer
//! met only through a relay that may be dialled at its own addresses, and a plain dial
//! after a hole punch's failed. Each dials once per peer (see [`Reach`] for the marks); the
//! connections a move replaces close once its dial opens (see `swarm::handle_common`), and
//! stay if it fails.

use crate::reach::Reach;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour};
use libp2p::{Multiaddr, PeerId, Swarm};

/// Dials `peer` over QUIC when this peer reached it over TCP on `conn` and it listens on
/// QUIC at the same IP (see [`crate::transport::quic_instead`]).
pub fn prefer_quic(
    swarm: &mut Swarm<impl NetworkBehaviour>,
    reach: &Reach,
    peer: PeerId,
    conn: ConnectionId,
    listen: &[Multiaddr],
) {
    let Some(dialled) = reach.dialled_at(conn) else {
        return;
    };
    if let Some(quic) = crate::transport::quic_instead(&dialled, listen, peer) {
        dial(swarm, reach, peer, vec![quic], |to| {
            reach.move_to_quic(peer, conn, to)
        });
    }
}

/// Dials `peer` at its own addresses when this peer meets it only through a relay (on
/// `conn`): a public peer, or one this peer's NAT lets a dial out reach, needs no relay nor
/// hole punch (and DCUtR may still punch if this fails).
pub fn prefer_direct(
    swarm: &mut Swarm<impl NetworkBehaviour>,
    reach: &Reach,
    peer: PeerId,
    conn: ConnectionId,
    listen: &[Multiaddr],
) {
    if !reach.is_relayed(&peer, conn) {
        return;
    }
    let own: Vec<Multiaddr> = listen
        .iter()
        .filter(|a| !crate::reach::is_circuit(a))
        .map(|a| crate::ids::with_peer(a, peer))
        .collect();
    dial(swarm, reach, peer, own, |to| reach.dial_direct(peer, to));
}

/// After a dial to a peer reached only through relays failed (a hole punch's, when it
/// tried its addresses), dials them once more as a plain dialer: see [`Reach::dial_plain`].
pub fn redial_plain(
    swarm: &mut Swarm<impl NetworkBehaviour>,
    reach: &Reach,
    peer: PeerId,
    error: &DialError,
) {
    let DialError::Transport(tried) = error else {
        return;
    };
    let addrs: Vec<Multiaddr> = tried
        .iter()
        .map(|(a, _)| a.clone())
        .filter(|a| !crate::reach::is_circuit(a))
        .collect();
    dial(swarm, reach, peer, addrs, |to| reach.dial_plain(peer, to));
}

/// Dials `peer` at `addrs` when `mark` (given the dial's id) says this move is to be made.
fn dial(
    swarm: &mut Swarm<impl NetworkBehaviour>,
    reach: &Reach,
    peer: PeerId,
    addrs: Vec<Multiaddr>,
    mark: impl FnOnce(ConnectionId) -> bool,
) {
    if addrs.is_empty() {
        return;
    }
    let opts = DialOpts::peer_id(peer)
        .addresses(addrs)
        .condition(PeerCondition::Always)
        .build();
    let id = opts.connection_id();
    if !mark(id) {
        return;
    }
    tracing::info!(%peer, "dialling it for a better connection");
    if let Err(e) = swarm.dial(opts) {
        reach.move_failed(peer, id);
        tracing::info!(%peer, "no better connection, staying on this one: {e}");
    }
}
