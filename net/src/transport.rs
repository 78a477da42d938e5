//! Which transport a connection runs on, and the QUIC address a peer reached over TCP
//! offers instead: activations move one round trip per token, and QUIC loses less to a lost
//! packet than TCP's in-order stream (no head-of-line wait, no 200 ms minimum retransmit).

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

/// What a connection runs on, as the dashboard and `/api/pool` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP with Noise and yamux.
    Tcp,
    /// QUIC (its own TLS and streams).
    Quic,
    /// A relay's circuit.
    Relay,
}

impl Transport {
    /// The name the dashboard and `/api/pool` show.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
            Transport::Relay => "relay",
        }
    }

    /// What a connection at `addr` runs on.
    pub fn of(addr: &Multiaddr) -> Transport {
        if crate::reach::is_circuit(addr) {
            Transport::Relay
        } else if addr.iter().any(|p| matches!(p, Protocol::QuicV1)) {
            Transport::Quic
        } else {
            Transport::Tcp
        }
    }
}

/// The address to reach `peer` over QUIC instead of the TCP connection this peer dialled at
/// `dialled`: one of the addresses it says it listens on (`listen`) that is QUIC on the same
/// IP as `dialled`, so it crosses the same path (a NAT'd peer's private addresses never
/// match the public one it was dialled at). `None` when `dialled` is no plain TCP address
/// or the peer offers no such QUIC address: TCP stays.
pub fn quic_instead(dialled: &Multiaddr, listen: &[Multiaddr], peer: PeerId) -> Option<Multiaddr> {
    if Transport::of(dialled) != Transport::Tcp {
        return None;
    }
    let ip = dialled.iter().find(|p| is_ip(p))?;
    listen
        .iter()
        .find(|a| {
            Transport::of(a) == Transport::Quic
                && a.iter().next().as_ref() == Some(&ip)
                && !a
                    .iter()
                    .any(|p| matches!(p, Protocol::P2p(other) if other != peer))
        })
        .map(|a| crate::ids::with_peer(a, peer))
}

fn is_ip(p: &Protocol<'_>) -> bool {
    matches!(p, Protocol::Ip4(_) | Protocol::Ip6(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_tcp_peer_that_listens_on_quic_at_the_same_ip_is_reached_over_quic() {
        let peer = PeerId::random();
        let dialled = addr(&format!("/ip4/203.0.113.11/tcp/7470/p2p/{peer}"));
        let listen = [
            addr("/ip4/127.0.0.1/udp/7470/quic-v1"),
            addr("/ip4/203.0.113.11/tcp/7470"),
            addr("/ip4/203.0.113.11/udp/7470/quic-v1"),
        ];
        assert_eq!(
            quic_instead(&dialled, &listen, peer),
            Some(addr(&format!(
                "/ip4/203.0.113.11/udp/7470/quic-v1/p2p/{peer}"
            )))
        );
        assert_eq!(
            quic_instead(&dialled, &listen[..2], peer),
            None,
            "QUIC on another IP only"
        );
        let quic = addr("/ip4/203.0.113.11/udp/7470/quic-v1");
        assert_eq!(quic_instead(&quic, &listen, peer), None, "already QUIC");
        let relay = PeerId::random();
        let circuit = addr(&format!(
            "/ip4/203.0.113.11/tcp/7470/p2p/{relay}/p2p-circuit/p2p/{peer}"
        ));
        assert_eq!(quic_instead(&circuit, &listen, peer), None, "relayed");
        let other = addr(&format!(
            "/ip4/203.0.113.11/udp/7470/quic-v1/p2p/{}",
            PeerId::random()
        ));
        assert_eq!(
            quic_instead(&dialled, &[other], peer),
            None,
            "another peer's address"
        );
    }

    #[test]
    fn transports_are_told_apart() {
        assert_eq!(Transport::of(&addr("/ip4/192.0.2.1/tcp/1")), Transport::Tcp);
        assert_eq!(
            Transport::of(&addr("/ip4/192.0.2.1/udp/1/quic-v1")),
            Transport::Quic
        );
        assert_eq!(
            Transport::of(&addr(&format!("/p2p/{}", PeerId::random()))),
            Transport::Relay
        );
    }
}
