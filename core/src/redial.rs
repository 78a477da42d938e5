//! Trying a dropped peer again before giving up on it. A peer whose connection closed, or
//! that missed its adverts, is left out of routing at once; it is then dialled after
//! [`FIRST_WAIT`], and again after twice the wait each time it has not come back, [`TRIES`]
//! times. It is back the moment it advertises again (a restarted node dials us itself); it
//! is gone if it has not by the end of the last wait. Kept apart from the swarm and the
//! clock so the schedule can be tested on its own.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Wait before the first dial.
pub const FIRST_WAIT: Duration = Duration::from_millis(500);
/// Dials before a peer counts as gone: after waits of 0.5, 1, 2 and 4 s, and gone 8 s after
/// the last one (15.5 s in all).
pub const TRIES: u32 = 4;

/// What is due for a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Dial it now (try `try_no` of [`TRIES`]); the next step comes after `next_in`.
    Dial {
        /// Which try this is, from 1.
        try_no: u32,
        /// Wait until the next step.
        next_in: Duration,
    },
    /// It never came back: it is gone.
    Gone,
}

#[derive(Debug)]
struct Redial {
    tries: u32,
    wait: Duration,
    at: Instant,
}

/// The peers being tried again, and when.
#[derive(Debug)]
pub struct Redials<K> {
    peers: HashMap<K, Redial>,
}

impl<K> Default for Redials<K> {
    fn default() -> Self {
        Self {
            peers: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq + Ord + Copy> Redials<K> {
    /// An empty schedule.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts trying `peer` again from `now`; false if it already is.
    pub fn start(&mut self, peer: K, now: Instant) -> bool {
        if self.peers.contains_key(&peer) {
            return false;
        }
        self.peers.insert(
            peer,
            Redial {
                tries: 0,
                wait: FIRST_WAIT,
                at: now + FIRST_WAIT,
            },
        );
        true
    }

    /// Whether `peer` is being tried again.
    pub fn contains(&self, peer: &K) -> bool {
        self.peers.contains_key(peer)
    }

    /// What is due by `now`, per peer, in peer order. Gone peers are forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<(K, Due)> {
        let mut out = Vec::new();
        for (peer, r) in &mut self.peers {
            if r.at > now {
                continue;
            }
            if r.tries == TRIES {
                out.push((*peer, Due::Gone));
                continue;
            }
            r.tries += 1;
            r.wait *= 2;
            r.at = now + r.wait;
            out.push((
                *peer,
                Due::Dial {
                    try_no: r.tries,
                    next_in: r.wait,
                },
            ));
        }
        for (peer, due) in &out {
            if *due == Due::Gone {
                self.peers.remove(peer);
            }
        }
        // In peer order, not the map's: the same schedule gives the same dials.
        out.sort_by_key(|(peer, _)| *peer);
        out
    }

    /// `peer` is back: stops trying it. Returns the dials it took, or None if it was not
    /// being tried.
    pub fn reached(&mut self, peer: &K) -> Option<u32> {
        self.peers.remove(peer).map(|r| r.tries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_until_the_peer_counts_as_gone() {
        let mut r = Redials::new();
        let mut now = Instant::now();
        assert!(r.start(7u8, now));
        assert!(!r.start(7, now), "one schedule per peer");
        assert!(r.due(now).is_empty(), "not before the first wait");
        now += FIRST_WAIT;
        let mut seen = Vec::new();
        loop {
            let due = r.due(now);
            assert_eq!(due.len(), 1, "{due:?}");
            assert!(r.due(now).is_empty(), "each step once");
            match due[0].1 {
                Due::Dial { try_no, next_in } => {
                    seen.push((try_no, next_in.as_secs()));
                    now += next_in;
                }
                Due::Gone => break,
            }
        }
        assert_eq!(
            seen,
            vec![(1, 1), (2, 2), (3, 4), (4, 8)],
            "exponential backoff"
        );
        assert!(!r.contains(&7), "a gone peer is forgotten");
        assert!(r.due(now + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn a_peer_that_comes_back_is_no_longer_tried() {
        let mut r = Redials::new();
        let now = Instant::now();
        r.start(1u8, now);
        r.start(2u8, now);
        assert_eq!(r.due(now + FIRST_WAIT).len(), 2);
        assert_eq!(r.reached(&1), Some(1));
        assert_eq!(r.reached(&1), None, "reached once");
        let later: Vec<u8> = r
            .due(now + Duration::from_secs(60))
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(later, vec![2]);
        assert!(r.start(1, now), "it can be tried again after a new drop");
    }
}
