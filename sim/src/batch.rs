//! Batch jobs as the coordinator's batch runner handles them, with the core's policy
//! ([`potluck_core::quorum`]): every quarter second the open units (the oldest
//! [`WINDOW`]) are tallied; validated ones credit the machines that agreed and quarantine
//! the outvoted, and units that want more results go to the least busy holders of the
//! units' model, each of another origin. A machine's answer is right, or wrong the way its
//! spot-checked work is (colluders' wrong answers agree, anyone else's are each its own).

use crate::clock::{secs, Micros, SECOND};
use crate::events::Event;
use crate::run::Sim;
use crate::scenario::BatchLoad;
use crate::world::prefill_ms;
use potluck_core::compare::Verdict;
use potluck_core::origin::Origin;
use potluck_core::quorum::{self, Outcome, Quorum};
use potluck_protocol::messages::ModelRef;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

/// Open units looked at per round (the daemon's window).
const WINDOW: usize = 512;

/// One work unit.
#[derive(Debug, Clone)]
struct Unit {
    /// Tokens it computes.
    tokens: u64,
    /// When its job was submitted.
    submitted: Micros,
    /// Results back: the machine, its origin, and its answer (`None`: right).
    results: Vec<(usize, Origin, Option<u64>)>,
    /// Machines running it now, with the incarnation they started it in.
    running: Vec<(usize, u32)>,
}

/// What batch work did over a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BatchTotals {
    /// Jobs submitted.
    pub jobs: u64,
    /// Units submitted.
    pub units: u64,
    /// Units validated by a quorum.
    pub validated: u64,
    /// Of them, validated with a wrong answer (cheaters of one party outvoting the honest).
    pub validated_wrong: u64,
    /// Units given up: no quorum among the most results a unit may collect.
    pub unresolvable: u64,
    /// Units still open at the end.
    pub open: u64,
    /// Assignments sent.
    pub assignments: u64,
    /// Assignments whose machine went away before answering.
    pub lost: u64,
    /// Results outvoted by a quorum (their machines quarantined).
    pub outvoted: u64,
    /// Of them, right answers outvoted (honest machines wrongly quarantined).
    pub outvoted_right: u64,
    /// Seconds from a job's submission to each of its units' validation.
    pub latency: crate::report::Spread,
}

/// The batch runner's state in a run.
#[derive(Debug)]
pub(crate) struct Batches {
    /// The units' model as adverts name it.
    pub(crate) model: ModelRef,
    units: Vec<Unit>,
    /// Units not yet decided, oldest first.
    open: BTreeSet<usize>,
    /// Units each machine runs now.
    busy: HashMap<usize, usize>,
    /// Seconds to validation of each validated unit.
    latency: Vec<f64>,
    totals: BatchTotals,
}

impl Default for Batches {
    fn default() -> Self {
        Self {
            model: ModelRef {
                name: "batch-units".into(),
                digest: potluck_protocol::signed::digest(b"batch-units"),
            },
            units: Vec::new(),
            open: BTreeSet::new(),
            busy: HashMap::new(),
            latency: Vec::new(),
            totals: BatchTotals::default(),
        }
    }
}

impl Batches {
    /// The totals so far.
    pub(crate) fn totals(&self) -> BatchTotals {
        let mut t = self.totals.clone();
        t.open = self.open.len() as u64;
        t.latency = crate::report::Spread::of(self.latency.clone(), 1.0, 60);
        t
    }
}

impl Sim {
    fn batch_load(&self) -> Option<&BatchLoad> {
        self.sc.batch.as_ref()
    }

    /// Schedules the next job submission.
    pub(crate) fn next_job(&mut self) {
        let Some(rate) = self.batch_load().map(|b| b.jobs_per_hour) else {
            return;
        };
        if rate > 0.0 {
            let wait = self.jobs.exponential(3600.0 / rate);
            self.q.at(self.now + secs(wait).max(1), Event::Job);
        }
    }

    /// A job is submitted: its units open.
    pub(crate) fn job(&mut self) {
        if let Some(b) = self.sc.batch.clone() {
            self.batch.totals.jobs += 1;
            for _ in 0..b.units_per_job {
                let tokens = b.unit_tokens.sample(&mut self.jobs).round().max(1.0) as u64;
                let id = self.batch.units.len();
                self.batch.units.push(Unit {
                    tokens,
                    submitted: self.now,
                    results: Vec::new(),
                    running: Vec::new(),
                });
                self.batch.open.insert(id);
                self.batch.totals.units += 1;
            }
        }
        self.next_job();
    }

    /// One look at the open units, as the daemon's batch runner takes every quarter second.
    pub(crate) fn batch_round(&mut self) {
        let Some(quorum) = self.batch_load().map(|b| Quorum::new(b.quorum)) else {
            return;
        };
        let open: Vec<usize> = self.batch.open.iter().take(WINDOW).copied().collect();
        let mut holders: Option<Vec<(usize, Origin)>> = None;
        for id in open {
            let outcome = self.timed("batch", |sim| {
                let unit = &sim.batch.units[id];
                let origins: Vec<&Origin> = unit.results.iter().map(|r| &r.1).collect();
                let answers: Vec<Option<u64>> = unit.results.iter().map(|r| r.2).collect();
                let tally = quorum::Tally::of(&origins, &answers, |a, b| a == b);
                quorum.outcome(&tally, unit.running.len())
            });
            match outcome {
                Outcome::Open { wanted: 0 } => {}
                Outcome::Open { wanted } => {
                    let peers = match &holders {
                        Some(h) => h,
                        None => holders.insert(self.holders()),
                    };
                    let candidates: Vec<(usize, Origin, usize)> = peers
                        .iter()
                        .map(|(i, o)| (*i, o.clone(), self.batch.busy.get(i).copied().unwrap_or(0)))
                        .collect();
                    let picked = self.timed("batch", |sim| {
                        let unit = &sim.batch.units[id];
                        let asked: Vec<usize> = unit.running.iter().map(|r| r.0).collect();
                        let heard: Vec<Origin> = asked
                            .iter()
                            .map(|&i| sim.origin_of(i))
                            .chain(unit.results.iter().map(|r| r.1.clone()))
                            .collect();
                        let excluded = |i: &usize, o: &Origin| {
                            asked.contains(i)
                                || unit.results.iter().any(|r| r.0 == *i)
                                || heard.contains(o)
                        };
                        quorum::pick(&candidates, excluded, wanted)
                    });
                    for (peer, _) in picked {
                        self.assign_unit(id, peer);
                    }
                }
                Outcome::Unresolvable => {
                    self.batch.totals.unresolvable += 1;
                    self.batch.open.remove(&id);
                }
                Outcome::Validated { agreeing, outvoted } => {
                    self.validated(id, &agreeing, &outvoted)
                }
            }
        }
    }

    /// Machines the core counts as holding the units' model, fastest first, with origins.
    fn holders(&mut self) -> Vec<(usize, Origin)> {
        let model = self.batch.model.clone();
        let keys = self.decide("batch", |c, now| c.holders(&model, now.at));
        keys.iter()
            .filter_map(|k| self.by_key.get(k).copied())
            .map(|i| (i, self.origin_of(i)))
            .collect()
    }

    /// Machine `i`'s origin as the coordinator reads it off its connection.
    fn origin_of(&self, i: usize) -> Origin {
        Origin::Network(self.machines[i].origin.to_string())
    }

    /// Sends unit `id` to machine `peer`: it answers after the round trip and the unit's
    /// arithmetic, slowed by the other unit it may be running.
    fn assign_unit(&mut self, id: usize, peer: usize) {
        let Some(model_mb) = self.batch_load().map(|b| b.model_mb) else {
            return;
        };
        let busy = self.batch.busy.entry(peer).or_default();
        *busy += 1;
        let sharing = *busy as f64;
        let m = &self.machines[peer];
        let class = &self.sc.devices[m.class];
        let unit = &mut self.batch.units[id];
        let ms = prefill_ms(class, model_mb, 1, unit.tokens) * sharing + m.rtt_ms;
        unit.running.push((peer, m.inc));
        let inc = m.inc;
        self.batch.totals.assignments += 1;
        self.q.at(
            self.now + secs(ms / 1e3).max(1),
            Event::UnitDone {
                unit: id,
                peer,
                inc,
            },
        );
    }

    /// Machine `peer` finished unit `id`: its answer joins the results, unless its node is
    /// gone (the assignment fails and the unit runs elsewhere).
    pub(crate) fn unit_done(&mut self, id: usize, peer: usize, inc: u32) {
        if let Some(n) = self.batch.busy.get_mut(&peer) {
            *n = n.saturating_sub(1);
        }
        let unit = &mut self.batch.units[id];
        unit.running.retain(|r| *r != (peer, inc));
        let m = &self.machines[peer];
        if !(m.online && m.inc == inc) {
            self.batch.totals.lost += 1;
            return;
        }
        if !self.batch.open.contains(&id) {
            return;
        }
        let c = m.corrupts;
        let wrong = (c > 0.0 && self.cheat.chance(c)).then(|| self.wrong_answer(peer));
        let origin = self.origin_of(peer);
        self.batch.units[id].results.push((peer, origin, wrong));
    }

    /// Unit `id` stands: credit to the agreeing machines not quarantined, trust to every
    /// one that answered, and quarantine for the outvoted.
    fn validated(&mut self, id: usize, agreeing: &[usize], outvoted: &[usize]) {
        self.batch.open.remove(&id);
        let unit = self.batch.units[id].clone();
        let t = &mut self.batch.totals;
        t.validated += 1;
        self.minute.units_validated += 1;
        let winner = agreeing.first().and_then(|&i| unit.results.get(i));
        if winner.is_some_and(|w| w.2.is_some()) {
            t.validated_wrong += 1;
        }
        self.batch
            .latency
            .push((self.now - unit.submitted) as f64 / SECOND as f64);
        // Credit in the sessions' unit, blocks × tokens: a unit's arithmetic over a block's.
        let credit = unit.tokens as f64 * self.batch_load().map_or(0.0, |b| b.model_mb)
            / self.sc.model.block_mb;
        let at = self.t().at;
        for &(peer, ..) in agreeing.iter().filter_map(|&i| unit.results.get(i)) {
            let key = self.machines[peer].key;
            let quarantined = self.core.is_quarantined(&key, at);
            let m = &mut self.machines[peer];
            m.served += credit;
            if !quarantined {
                m.credit += credit;
            }
            self.decide("verdict", |c, now| {
                c.record_trust(&key, Verdict::Pass, now.unix)
            });
        }
        for &(peer, _, answer) in outvoted.iter().filter_map(|&i| unit.results.get(i)) {
            self.batch.totals.outvoted += 1;
            if answer.is_none() {
                self.batch.totals.outvoted_right += 1;
            }
            let key = self.machines[peer].key;
            self.machines[peer].served += credit;
            let why = format!("outvoted on batch unit {id}");
            self.decide("verdict", |c, now| {
                c.record_trust(&key, Verdict::Fail, now.unix);
                c.quarantine(&key, &why, now);
            });
        }
    }
}
