//! Whose voice a peer's result is. One person can start any number of keys, so a quorum of
//! keys proves little; what the pool can tell apart is who runs a machine, where its admin
//! wrote that into the certificate, and otherwise where the machine sits on the internet.
//! Addresses are read off the connection itself, never from what a peer says of itself.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One voice in a batch quorum or a check: results from two peers of one origin count once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// The operator a private pool's certificate names.
    Operator(String),
    /// A network on the internet: an IPv4 /24 or an IPv6 /48, the blocks one party is
    /// usually given; or one host on a local network (private, link-local or carrier-grade
    /// NAT addresses, where every host of a home or a lab shares the first three octets).
    Network(String),
    /// Only the key itself: a peer on the coordinator's own machine (loopback, which its
    /// operator runs).
    Key(String),
    /// Every peer whose address is not known (it reaches the coordinator only through a
    /// relay, or not at all): one voice together, so that keys nobody can place never
    /// outvote one that can be.
    Unknown,
}

impl Origin {
    /// The origin of a peer with libp2p id `peer`, whose certificate names `operator` and
    /// whose connection comes from `ip`.
    pub fn of(peer: &str, operator: Option<&str>, ip: Option<IpAddr>) -> Self {
        if let Some(op) = operator {
            return Origin::Operator(op.to_string());
        }
        match ip.map(canonical) {
            Some(ip) if ip.is_loopback() => Origin::Key(peer.to_string()),
            Some(ip) if !ip.is_unspecified() => Origin::Network(network_of(ip)),
            _ => Origin::Unknown,
        }
    }

    /// Its stored form (`operator:…`, `network:…`, `key:…`, `unknown:`).
    pub fn to_stored(&self) -> String {
        self.to_string()
    }

    /// Reads a stored form; anything else (rows from before origins were kept) is the
    /// peer's key alone.
    pub fn from_stored(stored: &str, peer: &str) -> Self {
        match stored.split_once(':') {
            Some(("operator", v)) => Origin::Operator(v.to_string()),
            Some(("network", v)) => Origin::Network(v.to_string()),
            Some(("key", v)) => Origin::Key(v.to_string()),
            Some(("unknown", "")) => Origin::Unknown,
            _ => Origin::Key(peer.to_string()),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Operator(o) => write!(f, "operator:{o}"),
            Origin::Network(n) => write!(f, "network:{n}"),
            Origin::Key(k) => write!(f, "key:{k}"),
            Origin::Unknown => write!(f, "unknown:"),
        }
    }
}

/// One peer's open connections, oldest first, and the address each comes from (`None`:
/// through a relay, whose address says nothing of the peer's): where [`Origin::of`] reads
/// a peer's address from. A relayed connection, or one closing, never hides a direct one
/// still open.
#[derive(Debug, Clone)]
pub struct Connections<C> {
    open: BTreeMap<C, Option<IpAddr>>,
}

impl<C: Ord> Default for Connections<C> {
    fn default() -> Self {
        Self {
            open: BTreeMap::new(),
        }
    }
}

impl<C: Ord> Connections<C> {
    /// Notes connection `c`, from `ip`.
    pub fn opened(&mut self, c: C, ip: Option<IpAddr>) {
        self.open.insert(c, ip);
    }

    /// Notes that `c` closed; true when none is left open.
    pub fn closed(&mut self, c: &C) -> bool {
        self.open.remove(c);
        self.open.is_empty()
    }

    /// The address of the oldest direct connection still open.
    pub fn address(&self) -> Option<IpAddr> {
        self.open.values().flatten().next().copied()
    }
}

/// An IPv4 address carried in IPv6 is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn network_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) if local_v4(v4) => v4.to_string(),
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        IpAddr::V6(v6) if local_v6(v6) => v6.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let net = Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0);
            format!("{net}/48")
        }
    }
}

/// Private, link-local and carrier-grade NAT addresses: hosts of one local network.
fn local_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_private() || ip.is_link_local() || (a == 100 && (64..128).contains(&b))
}

/// Unique-local (fc00::/7) and link-local (fe80::/10) addresses.
fn local_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(ip: &str) -> Origin {
        Origin::of("p", None, Some(ip.parse().unwrap()))
    }

    #[test]
    fn internet_peers_group_by_block_local_ones_by_host_loopback_by_key() {
        assert_eq!(net("198.51.100.10"), net("198.51.100.250"));
        assert_ne!(net("198.51.100.10"), net("198.51.101.10"));
        assert_eq!(net("198.51.100.10").to_string(), "network:198.51.100.0/24");
        assert_eq!(net("2001:db8:1:2::1"), net("2001:db8:1:ffff::9"));
        assert_ne!(net("2001:db8:1::1"), net("2001:db8:2::1"));
        assert_eq!(net("::ffff:198.51.100.7"), net("198.51.100.8"));
        // Hosts of a home or lab network are told apart by address.
        assert_ne!(net("192.168.1.2"), net("192.168.1.3"));
        assert_ne!(net("10.0.0.2"), net("10.0.0.3"));
        assert_ne!(net("100.64.0.2"), net("100.64.0.3"));
        assert_ne!(net("fd00::2"), net("fd00::3"));
        // On the coordinator's machine: the key alone.
        assert_eq!(net("127.0.0.1"), Origin::Key("p".into()));
        assert_eq!(net("::1"), Origin::Key("p".into()));
        // Unknown, or unspecified: one voice for all of them.
        assert_eq!(Origin::of("p", None, None), Origin::Unknown);
        assert_eq!(Origin::of("q", None, None), Origin::of("p", None, None));
        assert_eq!(net("0.0.0.0"), Origin::Unknown);
        // A named operator outweighs the address.
        assert_eq!(
            Origin::of("p", Some("lab"), Some("198.51.100.1".parse().unwrap())),
            Origin::Operator("lab".into())
        );
    }

    #[test]
    fn a_relayed_or_closing_connection_never_hides_a_direct_one() {
        let direct: IpAddr = "198.51.100.7".parse().unwrap();
        let mut c = Connections::default();
        assert_eq!(c.address(), None);
        c.opened(1, Some(direct));
        c.opened(2, None);
        assert_eq!(c.address(), Some(direct));
        // A second direct connection, from elsewhere, does not move the peer.
        c.opened(3, Some("203.0.113.9".parse().unwrap()));
        assert_eq!(c.address(), Some(direct));
        assert!(!c.closed(&2));
        assert_eq!(c.address(), Some(direct));
        assert!(!c.closed(&1));
        assert_eq!(c.address(), Some("203.0.113.9".parse().unwrap()));
        assert!(!c.closed(&4));
        assert!(c.closed(&3));
        // Only relayed: unknown.
        c.opened(5, None);
        assert_eq!(Origin::of("p", None, c.address()), Origin::Unknown);
    }

    #[test]
    fn stored_origins_read_back_and_old_rows_are_their_key() {
        for o in [
            net("198.51.100.10"),
            net("fd00::2"),
            Origin::Operator("a:b".into()),
            Origin::Key("p".into()),
            Origin::Unknown,
        ] {
            assert_eq!(Origin::from_stored(&o.to_stored(), "q"), o);
        }
        assert_eq!(Origin::from_stored("", "q"), Origin::Key("q".into()));
    }
}
