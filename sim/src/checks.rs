//! Spot checks as the coordinator runs them, on simulated outputs: the core picks a hop's
//! work in a session for a check; a replica of its span recomputes it; a disagreement
//! goes to a third peer (proven peers first, and only proven ones when the checked peer is
//! proven), whose answer decides who lied, and three different answers to a fourth.
//! Outputs are right, or wrong: colluding peers' wrong answers agree with each other,
//! anyone else's are each their own.

use crate::run::Sim;
use crate::scenario::CorruptUnit;
use crate::sessions::Hop;
use potluck_core::compare::Verdict;

/// Colluders' shared wrong answer.
const COLLUDED: u64 = 0;

impl Sim {
    /// A wrong answer of machine `peer`: the colluders' shared one, or a new one (counted as
    /// its cheating).
    pub(crate) fn wrong_answer(&mut self, peer: usize) -> u64 {
        self.machines[peer].wrong += 1;
        if self.machines[peer].colludes {
            COLLUDED
        } else {
            self.cheat.bits() | 1
        }
    }

    /// What machine `peer` answers when it recomputes `tokens` tokens.
    fn recompute(&mut self, peer: usize, tokens: f64) -> Option<u64> {
        let c = self.machines[peer].corrupts;
        let p = match self.sc.cheaters.unit {
            CorruptUnit::Token => 1.0 - (1.0 - c).powf(tokens),
            CorruptUnit::Job => c,
        };
        (c > 0.0 && self.cheat.chance(p)).then(|| self.wrong_answer(peer))
    }

    /// Whether machine `peer` corrupts a job it starts, when cheaters corrupt whole jobs:
    /// its wrong answer if so.
    pub(crate) fn wrong_job(&mut self, peer: usize) -> Option<u64> {
        let c = self.machines[peer].corrupts;
        let per_job = self.sc.cheaters.unit == CorruptUnit::Job;
        (per_job && c > 0.0 && self.cheat.chance(c)).then(|| self.wrong_answer(peer))
    }

    /// Checks `hop`'s work: recomputed by a replica of its span, disputes settled by a
    /// third, three different answers by a fourth; verdicts go to the core's reputation and
    /// quarantine.
    pub(crate) fn check(&mut self, hop: &Hop) {
        let at = self.t().at;
        let key = Self::range_key(hop.range);
        let candidates: Vec<usize> = self
            .replicas
            .get(&key)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&j| j != hop.peer)
                    .filter(|&j| self.machines[j].online)
                    .filter(|&j| !self.core.is_excluded(&self.machines[j].key, at))
                    .collect()
            })
            .unwrap_or_default();
        let candidates = self.apart(candidates, &[hop.peer], false);
        if candidates.is_empty() {
            self.count("unchecked: no replica");
            return;
        }
        let checker = candidates[self.decide("draw", |c, _| c.draw(candidates.len()))];
        let theirs = self.recompute(checker, hop.tokens);
        let peer_key = self.machines[hop.peer].key;
        if theirs == hop.wrong {
            if hop.wrong.is_some() {
                self.count("missed: checker agreed on a wrong answer");
            } else {
                self.count("pass");
            }
            self.verdict(hop.peer, Verdict::Pass, None);
            return;
        }
        let proven = self.core.proven(&peer_key);
        let others: Vec<usize> = candidates.into_iter().filter(|&j| j != checker).collect();
        let Some(decider) = self.opinion(&others, &[hop.peer, checker], proven) else {
            self.count("inconclusive: no third opinion");
            return;
        };
        let third = self.recompute(decider, hop.tokens);
        if third == theirs {
            self.caught(hop, "caught");
        } else if third == hop.wrong {
            self.count("lying checker caught");
            self.verdict(hop.peer, Verdict::Pass, None);
            self.lied(checker);
        } else {
            // Three different answers: a fourth peer of none of their origins decides.
            let rest: Vec<usize> = others.into_iter().filter(|&j| j != decider).collect();
            let Some(fourth) = self.opinion(&rest, &[hop.peer, checker, decider], proven) else {
                self.count("inconclusive: three answers");
                return;
            };
            let answer = self.recompute(fourth, hop.tokens);
            if answer == hop.wrong {
                self.count("lying checker caught by a fourth");
                self.verdict(hop.peer, Verdict::Pass, None);
                self.lied(checker);
            } else if answer == theirs {
                self.caught(hop, "caught by a fourth");
            } else if answer == third {
                self.caught(hop, "caught with its checker by a fourth");
                self.lied(checker);
            } else {
                self.count("inconclusive: four answers");
            }
        }
    }

    /// Another opinion on a dispute among `from`, drawn from `candidates` as the
    /// coordinator draws one: of none of their origins where there is one (only such, for
    /// a `proven` peer's dispute), proven peers first (only proven ones for a `proven` peer).
    fn opinion(&mut self, candidates: &[usize], from: &[usize], proven: bool) -> Option<usize> {
        let others = self.apart(candidates.to_vec(), from, proven);
        let (good, new): (Vec<usize>, Vec<usize>) = others
            .into_iter()
            .partition(|&j| self.core.proven(&self.machines[j].key));
        let pool = if proven || !good.is_empty() {
            good
        } else {
            new
        };
        if pool.is_empty() {
            return None;
        }
        Some(pool[self.decide("draw", |c, _| c.draw(pool.len()))])
    }

    /// `hop`'s peer is shown wrong (`outcome`, unless its answer was right after all).
    fn caught(&mut self, hop: &Hop, outcome: &'static str) {
        self.count(if hop.wrong.is_some() {
            outcome
        } else {
            "false: honest peer outvoted"
        });
        let m = &mut self.machines[hop.peer];
        if hop.wrong.is_some() && m.caught_job.is_none() {
            m.caught_job = Some(m.jobs);
        }
        self.verdict(hop.peer, Verdict::Fail, Some("failed a spot check"));
    }

    /// A checker is shown wrong by two other peers.
    fn lied(&mut self, checker: usize) {
        self.verdict(
            checker,
            Verdict::Fail,
            Some("its recomputation disagreed with two other peers"),
        );
    }

    /// The `candidates` of another origin than every machine of `from`; when there are
    /// none, all of them unless `only_apart` (the coordinator's rule).
    fn apart(&self, candidates: Vec<usize>, from: &[usize], only_apart: bool) -> Vec<usize> {
        let taken: Vec<u64> = from.iter().map(|&i| self.machines[i].origin).collect();
        let (apart, near): (Vec<usize>, Vec<usize>) = candidates
            .into_iter()
            .partition(|&j| !taken.contains(&self.machines[j].origin));
        if apart.is_empty() && !only_apart {
            near
        } else {
            apart
        }
    }

    /// Records `verdict` on machine `peer`; a failure with `why` quarantines it.
    fn verdict(&mut self, peer: usize, verdict: Verdict, why: Option<&str>) {
        let key = self.machines[peer].key;
        self.decide("verdict", |c, now| {
            c.record_trust(&key, verdict, now.unix);
            if let Some(why) = why {
                c.quarantine(&key, why, now);
            }
        });
    }

    fn count(&mut self, outcome: &'static str) {
        *self.checks.entry(outcome).or_default() += 1;
    }
}
