//! Names people can read for peers: `brisk-otter-3f` instead of a 52-character libp2p id.
//! Derived from the id alone, so every coordinator, dashboard and log gives a peer the same
//! name. A name is for telling peers apart at a glance, not for trusting one: there are only
//! 2^18 of them, and a fresh key with a given name takes seconds to find. The full id stays
//! beside it (the dashboard's tooltip) for when it matters.

const ADJECTIVES: [&str; 32] = [
    "amber", "bold", "brisk", "calm", "clever", "cosy", "crisp", "dapper", "eager", "fair",
    "gentle", "glad", "hardy", "humble", "jolly", "keen", "kind", "lively", "lucky", "merry",
    "mellow", "nimble", "plucky", "proud", "quick", "quiet", "rosy", "steady", "sunny", "swift",
    "tidy", "witty",
];

const NOUNS: [&str; 32] = [
    "badger", "beaver", "bison", "crane", "dingo", "eagle", "ferret", "finch", "gecko", "heron",
    "ibex", "koala", "lark", "lemur", "lynx", "marten", "moose", "newt", "otter", "owl", "panda",
    "puffin", "quail", "raven", "robin", "seal", "shrew", "stoat", "swan", "tapir", "vole", "wren",
];

/// The nickname of the peer whose id is `peer` (its text form).
pub fn of(peer: &str) -> String {
    let h = blake3::hash(peer.as_bytes());
    let [a, n, x, ..] = *h.as_bytes();
    format!(
        "{}-{}-{x:02x}",
        ADJECTIVES[usize::from(a) % ADJECTIVES.len()],
        NOUNS[usize::from(n) % NOUNS.len()]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_keeps_its_name_and_others_get_other_names() {
        let a = "12D3KooWMGMngtWtmrLgwXYWBLuPAc6FGSs81dnyFXZSW2qLcFbV";
        let b = "12D3KooWBeUMmiz6o5zZg5x64YonE5uzAs1FXmKXhAe6XZcd2Rca";
        assert_eq!(of(a), of(a));
        assert_ne!(of(a), of(b));
        let name = of(a);
        let parts: Vec<&str> = name.split('-').collect();
        assert_eq!(parts.len(), 3);
        assert!(ADJECTIVES.contains(&parts[0]) && NOUNS.contains(&parts[1]));
        // A thousand ids, few repeats: names tell peers of one pool apart.
        let names: std::collections::HashSet<String> =
            (0..1000).map(|i| of(&format!("peer-{i}"))).collect();
        assert!(names.len() > 990, "{} distinct", names.len());
    }
}
