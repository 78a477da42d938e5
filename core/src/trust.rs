//! How much the pool trusts each peer, and so how often its results are checked. BOINC's
//! adaptive replication: a new peer is checked on every result until it has
//! [`WARMUP`] consecutive valid ones, then with probability `max(p_min, 1 / consecutive)`;
//! one failure starts it over. Reputation is Beta(1 + valid, 1 + invalid) with old evidence
//! decaying, and the router prefers peers by its lower confidence bound. No clock or network
//! here: callers pass the time, so the simulator and benches drive the same code.

use potluck_engine::rng::Rng;
use std::collections::HashMap;
use std::hash::Hash;

use crate::compare::Verdict;

/// Consecutive valid results before a peer is checked less than always.
pub const WARMUP: u32 = 10;
/// Default floor of the check probability.
pub const DEFAULT_P_MIN: f64 = 0.05;
/// Evidence loses half its weight in this many seconds (a week).
pub const HALF_LIFE_SECS: f64 = 7.0 * 24.0 * 3600.0;
/// Standard deviations below the mean for the lower confidence bound.
const LCB_Z: f64 = 1.0;

/// What the pool knows of one peer's honesty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerTrust {
    /// Valid results in a row since the last failure.
    pub consecutive_valid: u32,
    /// Decayed count of valid checked results.
    pub valid: f64,
    /// Decayed count of failed checks.
    pub invalid: f64,
    /// Results checked in all.
    pub checked: u64,
    /// Results produced and not picked for a check since the last check: voided if it is
    /// caught cheating.
    pub unchecked: u64,
    /// Unix seconds of the last update (for decay).
    pub updated: f64,
}

impl PeerTrust {
    /// The chance its next result is checked.
    pub fn check_probability(&self, p_min: f64) -> f64 {
        if self.consecutive_valid < WARMUP {
            1.0
        } else {
            (1.0 / f64::from(self.consecutive_valid)).max(p_min)
        }
    }

    /// Whether it has a record of its own: [`WARMUP`] valid checked results in a row. A
    /// peer without one (a new identity, or one that failed lately) cannot condemn another
    /// alone, and a peer with one is not condemned by one other peer's word (Sybils).
    pub fn proven(&self) -> bool {
        self.consecutive_valid >= WARMUP
    }

    fn decay(&mut self, now: f64) {
        let dt = (now - self.updated).max(0.0);
        let f = 0.5f64.powf(dt / HALF_LIFE_SECS);
        self.valid *= f;
        self.invalid *= f;
        self.updated = now;
    }

    /// Mean of Beta(1 + valid, 1 + invalid) minus one standard deviation: high only with
    /// both a good record and enough of it.
    pub fn lower_bound(&self) -> f64 {
        let (a, b) = (1.0 + self.valid, 1.0 + self.invalid);
        let n = a + b;
        let mean = a / n;
        let var = a * b / (n * n * (n + 1.0));
        (mean - LCB_Z * var.sqrt()).clamp(0.0, 1.0)
    }
}

/// Every peer's trust, and the draws that pick results for checking.
#[derive(Debug)]
pub struct Trust<K> {
    p_min: f64,
    peers: HashMap<K, PeerTrust>,
    // Draws must not be predictable from the wire, only reproducible here.
    rng: Rng,
}

impl<K: Hash + Eq + Clone> Trust<K> {
    /// Checks at least a share `p_min` of trusted peers' results; `seed` drives the draws.
    pub fn new(p_min: f64, seed: u64) -> Self {
        Self {
            p_min: p_min.clamp(0.0, 1.0),
            peers: HashMap::new(),
            rng: Rng::new(seed),
        }
    }

    /// The floor of the check probability.
    pub fn p_min(&self) -> f64 {
        self.p_min
    }

    /// A uniform pick among `n` choices (0 when `n` is 0).
    pub fn draw(&mut self, n: usize) -> usize {
        ((self.rng.next_f64() * n as f64) as usize).min(n.saturating_sub(1))
    }

    /// Decides whether `peer`'s new result is checked. A floor of 0 turns checks off,
    /// warm-up included.
    pub fn pick(&mut self, peer: &K) -> bool {
        if self.p_min == 0.0 {
            return false;
        }
        let p = self
            .peers
            .get(peer)
            .map_or(1.0, |t| t.check_probability(self.p_min));
        let picked = self.rng.next_f64() < p;
        if !picked {
            self.peers.entry(peer.clone()).or_default().unchecked += 1;
        }
        picked
    }

    /// Records a check's verdict on one of `peer`'s results at unix time `now`. An
    /// inconclusive check is no evidence either way.
    pub fn record(&mut self, peer: &K, verdict: Verdict, now: f64) {
        let t = self.peers.entry(peer.clone()).or_default();
        t.decay(now);
        match verdict {
            Verdict::Pass => {
                t.consecutive_valid = t.consecutive_valid.saturating_add(1);
                t.valid += 1.0;
                t.checked += 1;
                t.unchecked = 0;
            }
            Verdict::Fail => {
                t.consecutive_valid = 0;
                t.invalid += 1.0;
                t.checked += 1;
            }
            Verdict::Inconclusive => {}
        }
    }

    /// `peer`'s record (a default one for peers never seen).
    pub fn get(&self, peer: &K) -> PeerTrust {
        self.peers.get(peer).cloned().unwrap_or_default()
    }

    /// Voids `peer`'s results produced since its last passed check; returns how many.
    pub fn void_unchecked(&mut self, peer: &K) -> u64 {
        self.peers
            .get_mut(peer)
            .map_or(0, |t| std::mem::take(&mut t.unchecked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_peers_are_always_checked_then_less_and_less_down_to_the_floor() {
        let mut t = Trust::new(0.05, 1);
        let peer = 1u8;
        for i in 0..WARMUP {
            assert_eq!(t.get(&peer).check_probability(0.05), 1.0, "result {i}");
            assert!(t.pick(&peer));
            t.record(&peer, Verdict::Pass, 0.0);
        }
        assert_eq!(t.get(&peer).check_probability(0.05), 0.1);
        for _ in 0..90 {
            t.record(&peer, Verdict::Pass, 0.0);
        }
        assert_eq!(t.get(&peer).check_probability(0.05), 0.05, "the floor");
        // One failure starts it over.
        t.record(&peer, Verdict::Fail, 0.0);
        assert_eq!(t.get(&peer).consecutive_valid, 0);
        assert_eq!(t.get(&peer).check_probability(0.05), 1.0);
        // Inconclusive checks change nothing.
        let before = t.get(&peer);
        t.record(&peer, Verdict::Inconclusive, 0.0);
        assert_eq!(t.get(&peer), before);
    }

    #[test]
    fn picks_follow_the_probability() {
        let mut t = Trust::new(0.05, 7);
        let peer = 2u8;
        for _ in 0..1000 {
            t.record(&peer, Verdict::Pass, 0.0);
        }
        let picked = (0..100_000).filter(|_| t.pick(&peer)).count();
        assert!(
            (4_000..6_000).contains(&picked),
            "{picked} of 100000 at p=0.05"
        );
        assert_eq!(t.void_unchecked(&peer), 100_000 - picked as u64);
        assert_eq!(t.void_unchecked(&peer), 0);
        let mut off = Trust::new(0.0, 7);
        assert!(
            (0..1000).all(|_| !off.pick(&peer)),
            "a floor of 0 checks nothing"
        );
    }

    #[test]
    fn reputation_needs_a_record_and_decays() {
        let mut t = Trust::new(0.05, 1);
        let (fresh, good, bad) = (1u8, 2u8, 3u8);
        for _ in 0..50 {
            t.record(&good, Verdict::Pass, 0.0);
        }
        for _ in 0..5 {
            t.record(&bad, Verdict::Pass, 0.0);
        }
        t.record(&bad, Verdict::Fail, 0.0);
        let lcb = |t: &Trust<u8>, k: &u8| t.get(k).lower_bound();
        assert!(lcb(&t, &good) > lcb(&t, &fresh));
        assert!(lcb(&t, &good) > lcb(&t, &bad));
        assert!(lcb(&t, &good) > 0.9, "{}", lcb(&t, &good));
        // A year later the record has faded back towards a stranger's.
        t.record(&good, Verdict::Inconclusive, 365.0 * 24.0 * 3600.0);
        assert!(lcb(&t, &good) < 0.5, "{}", lcb(&t, &good));
    }
}
