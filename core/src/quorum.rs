//! When a batch work unit is done, and who runs it next. Each unit goes to peers of
//! different origins (see [`Origin`]) holding its model whole; results of `quorum` origins
//! that agree validate it and credit the peers that gave them, so one party's many keys are
//! one voice. A disagreement asks one more peer, up to [`MAX_REPLICAS`]; peers outvoted by a
//! quorum are to be quarantined. The caller keeps the results and says what agrees: the
//! daemon compares stored answers, the simulator its machines' outputs.

use crate::origin::Origin;
use std::collections::HashSet;

/// Results that must agree before a unit counts, unless configured otherwise.
pub const DEFAULT_QUORUM: usize = 2;
/// Most results one unit may collect before it is given up as unresolvable.
pub const MAX_REPLICAS: usize = 5;
/// Units one peer runs at once (a second one hides the round trip).
pub const PER_PEER: usize = 2;

/// A unit's results, read once per round: whose voice each is, and the largest group of
/// them that agree.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    /// Indices of the largest set of results that all agree with one of them.
    pub group: Vec<usize>,
    /// Results returned.
    pub results: usize,
    /// Origins the agreeing group speaks for: the votes it has.
    pub voices: usize,
}

impl Tally {
    /// The tally of results `answers`, the `i`th from a peer of `origins[i]`, where
    /// `agrees` says whether two honest peers could have given two answers. Of the groups
    /// that agree, the one with the most voices counts (then the larger, then the earlier):
    /// many keys of one origin never hide a quorum of others.
    pub fn of<A>(origins: &[&Origin], answers: &[A], agrees: impl Fn(&A, &A) -> bool) -> Self {
        let mut best = (0, Vec::new());
        for a in answers {
            let group: Vec<usize> = answers
                .iter()
                .enumerate()
                .filter(|(_, b)| agrees(a, b))
                .map(|(j, _)| j)
                .collect();
            let voices = voices_of(origins, &group);
            if (voices, group.len()) > (best.0, best.1.len()) {
                best = (voices, group);
            }
        }
        Self {
            results: answers.len(),
            voices: best.0,
            group: best.1,
        }
    }
}

/// Distinct origins among the results at `group`.
fn voices_of(origins: &[&Origin], group: &[usize]) -> usize {
    let voices: HashSet<&Origin> = group
        .iter()
        .filter_map(|&i| origins.get(i).copied())
        .collect();
    voices.len()
}

/// What a unit's results decide.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Quorum: the results at `agreeing` stand and earn credit; those at `outvoted` were
    /// wrong, their peers to be quarantined.
    Validated {
        /// The agreeing group, the first its representative.
        agreeing: Vec<usize>,
        /// The others.
        outvoted: Vec<usize>,
    },
    /// [`MAX_REPLICAS`] results and no quorum among them: the unit fails.
    Unresolvable,
    /// Still open: this many more peers should run it now (0: wait for those running).
    Open {
        /// Assignments to start.
        wanted: usize,
    },
}

/// The batch policy: how many origins must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quorum(usize);

impl Default for Quorum {
    fn default() -> Self {
        Self(DEFAULT_QUORUM)
    }
}

impl Quorum {
    /// Validates by `n` agreeing origins (1 to [`MAX_REPLICAS`]).
    pub fn new(n: usize) -> Self {
        Self(n.clamp(1, MAX_REPLICAS))
    }

    /// Origins that must agree.
    pub fn get(self) -> usize {
        self.0
    }

    /// What `tally` decides for a unit `running` peers are running now. An open unit wants
    /// enough assignments for a quorum if every result agreed, plus one per result that did
    /// not add a voice.
    pub fn outcome(self, tally: &Tally, running: usize) -> Outcome {
        if tally.voices >= self.0 && !tally.group.is_empty() {
            let outvoted = (0..tally.results)
                .filter(|i| !tally.group.contains(i))
                .collect();
            return Outcome::Validated {
                agreeing: tally.group.clone(),
                outvoted,
            };
        }
        if tally.results >= MAX_REPLICAS {
            return Outcome::Unresolvable;
        }
        let target = (self.0 + tally.results).saturating_sub(tally.voices);
        Outcome::Open {
            wanted: target
                .min(MAX_REPLICAS)
                .saturating_sub(tally.results + running),
        }
    }
}

/// Up to `n` of `candidates` (in preference order, each with its origin and the units it
/// runs now) for a unit, least busy first: not full ([`PER_PEER`]), not `excluded` (it has
/// answered the unit, runs it, or is of an origin that has), and each of an origin not
/// picked twice here.
pub fn pick<K: Clone>(
    candidates: &[(K, Origin, usize)],
    excluded: impl Fn(&K, &Origin) -> bool,
    n: usize,
) -> Vec<(K, Origin)> {
    let mut free: Vec<(usize, usize, &K, &Origin)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, (k, origin, load))| *load < PER_PEER && !excluded(k, origin))
        .map(|(rank, (k, origin, load))| (*load, rank, k, origin))
        .collect();
    free.sort_by_key(|(load, rank, _, _)| (*load, *rank));
    let mut picked: Vec<(K, Origin)> = Vec::new();
    for (_, _, k, origin) in free {
        if picked.len() < n && !picked.iter().any(|(_, o)| o == origin) {
            picked.push((k.clone(), origin.clone()));
        }
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(n: &str) -> Origin {
        Origin::Network(n.into())
    }

    #[test]
    fn the_agreeing_group_with_most_voices_wins() {
        let eq = |a: &i32, b: &i32| a == b;
        let (a, b, c) = (net("a"), net("b"), net("c"));
        assert!(Tally::of(&[], &[] as &[i32], eq).group.is_empty());
        assert_eq!(Tally::of(&[&a], &[7], eq).group, vec![0]);
        assert_eq!(Tally::of(&[&a, &b, &c], &[1, 2, 1], eq).group, vec![0, 2]);
        // A tie keeps the earliest group.
        assert_eq!(Tally::of(&[&a, &b], &[3, 4], eq).group, vec![0]);
        // Three keys of one network lose to two networks that agree.
        let t = Tally::of(&[&a, &a, &a, &b, &c], &[1, 1, 1, 2, 2], eq);
        assert_eq!((t.group, t.voices), (vec![3, 4], 2));
    }

    #[test]
    fn a_quorum_needs_origins_not_keys() {
        let q = Quorum::new(2);
        let eq = |a: &i32, b: &i32| a == b;
        let (a, b, c) = (net("a"), net("b"), net("c"));
        // Nothing back yet: two peers at once, none more while they run.
        let none = Tally::of(&[], &[] as &[i32], eq);
        assert_eq!(q.outcome(&none, 0), Outcome::Open { wanted: 2 });
        assert_eq!(q.outcome(&none, 2), Outcome::Open { wanted: 0 });
        // Two agreeing keys of one network are one voice: one more origin is wanted.
        let one = Tally::of(&[&a, &a], &[5, 5], eq);
        assert_eq!(one.voices, 1);
        assert_eq!(q.outcome(&one, 0), Outcome::Open { wanted: 1 });
        // Two origins agree over a third's wrong answer: it stands, the third is outvoted.
        let t = Tally::of(&[&a, &b, &c], &[5, 6, 5], eq);
        assert_eq!(
            q.outcome(&t, 1),
            Outcome::Validated {
                agreeing: vec![0, 2],
                outvoted: vec![1]
            }
        );
        // Disagreement asks one more, and five answers without a quorum give up.
        let split = Tally::of(&[&a, &b], &[5, 6], eq);
        assert_eq!(q.outcome(&split, 0), Outcome::Open { wanted: 1 });
        let origins: Vec<Origin> = (0..5).map(|i| net(&i.to_string())).collect();
        let refs: Vec<&Origin> = origins.iter().collect();
        let five = Tally::of(&refs, &[1, 2, 3, 4, 5], eq);
        assert_eq!(q.outcome(&five, 0), Outcome::Unresolvable);
        assert_eq!(Quorum::new(0).get(), 1);
        assert_eq!(Quorum::new(99).get(), MAX_REPLICAS);
    }

    #[test]
    fn picks_spread_over_origins_and_spare_the_busy() {
        let c = vec![
            ("full", net("x"), PER_PEER),
            ("busy", net("y"), 1),
            ("idle-a", net("a"), 0),
            ("idle-a2", net("a"), 0),
            ("idle-b", net("b"), 0),
        ];
        let picked: Vec<&str> = pick(&c, |_, _| false, 3).into_iter().map(|p| p.0).collect();
        assert_eq!(picked, vec!["idle-a", "idle-b", "busy"]);
        let picked: Vec<&str> = pick(&c, |_, o| *o == net("a"), 5)
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(picked, vec!["idle-b", "busy"]);
    }
}
