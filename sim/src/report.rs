//! What a run found, as JSON: the same scenario and seed give the same bytes (wall times
//! are kept apart, in [`crate::stats::Cost`]).

use crate::batch::BatchTotals;
use crate::clock::SECOND;
use crate::run::Sim;
use crate::stats::{gini, quantile, Minute, Served};
use crate::world::Machine;
use serde::Serialize;
use std::collections::BTreeMap;

/// A run's findings.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// What it shows.
    pub description: String,
    /// The seed it ran with.
    pub seed: u64,
    /// Virtual minutes run.
    pub minutes: u32,
    /// Machines made (at the start and by events).
    pub machines: usize,
    /// Whole-run figures.
    pub totals: Totals,
    /// Failover stalls, seconds.
    pub stalls: Spread,
    /// Checks, by outcome.
    pub checks: BTreeMap<String, u64>,
    /// Cheaters: how many, how fast caught.
    pub cheating: Cheating,
    /// Batch work, when the scenario has jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<BatchTotals>,
    /// Adverts the coordinator refused, by reason.
    pub refused: BTreeMap<String, u64>,
    /// Operator lines, by dashboard kind.
    pub lines: BTreeMap<String, u64>,
    /// Each minute's figures.
    pub per_minute: Vec<Minute>,
}

/// Whole-run figures.
#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// What was served over the run.
    #[serde(flatten)]
    pub served: Served,
    /// Most peers the coordinator counted active in a minute.
    pub peak_active: usize,
    /// Gini coefficient of credit over machines that served.
    pub credit_gini: f64,
}

/// A distribution of seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    /// How many.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Counts in buckets of `bucket` seconds from 0 (the last holds everything beyond).
    pub histogram: Vec<usize>,
    /// Bucket width, seconds.
    pub bucket: f64,
}

impl Spread {
    /// The spread of `v`, its histogram `buckets` buckets of `bucket` seconds.
    pub(crate) fn of(mut v: Vec<f64>, bucket: f64, buckets: usize) -> Self {
        v.sort_by(f64::total_cmp);
        let mut histogram = vec![0; buckets];
        for x in &v {
            let b = ((x / bucket) as usize).min(buckets - 1);
            histogram[b] += 1;
        }
        Self {
            count: v.len(),
            p50: quantile(&v, 0.5),
            p90: quantile(&v, 0.9),
            p99: quantile(&v, 0.99),
            max: v.last().copied().unwrap_or(0.0),
            histogram,
            bucket,
        }
    }
}

/// Cheaters and honest peers under checks.
#[derive(Debug, Clone, Serialize)]
pub struct Cheating {
    /// Cheating machines whose nodes ran.
    pub cheaters: usize,
    /// Of them, those that served work.
    pub served: usize,
    /// Cheaters quarantined by the end (for their own work, or for lying as checkers).
    pub quarantined: usize,
    /// Cheaters that served and were never caught.
    pub uncaught: usize,
    /// Cheaters that gave a wrong answer (one that never did is no different from an
    /// honest peer, and no check can tell).
    pub cheated: usize,
    /// Of them, never caught: the ones that matter.
    pub cheated_uncaught: usize,
    /// Seconds from a cheater's first start to its quarantine.
    pub time_to_quarantine: Spread,
    /// Honest machines quarantined.
    pub false_quarantines: usize,
    /// How soon checks catch a cheater's own work, by jobs served: what `potluck bench
    /// --detection` predicts for the policy alone.
    pub detection: Vec<Detection>,
}

/// Cheaters caught within a number of their jobs.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    /// Jobs.
    pub jobs: u64,
    /// Cheaters whose fate within that many jobs is known: caught by then, or served that
    /// many.
    pub known: usize,
    /// Of them, caught.
    pub caught: usize,
}

/// Job counts the detection curve is read at (`potluck bench --detection`'s horizons).
pub const DETECTION_AT: [u64; 7] = [10, 50, 100, 500, 1000, 2000, 5000];

impl Report {
    /// The report of `sim` as it stands.
    pub fn of(sim: &Sim) -> Self {
        let minutes = &sim.minutes;
        let mut served = Served::default();
        for m in minutes {
            served.add(&m.served);
        }
        served.close(f64::from(sim.sc.minutes) * 60.0, &sim.latency_run);
        let ran = sim.machines.iter().filter(|m| m.joined.is_some());
        let cheaters: Vec<_> = ran.clone().filter(|m| m.corrupts > 0.0).collect();
        let serving: Vec<_> = cheaters.iter().filter(|m| m.served > 0.0).collect();
        let caught: Vec<f64> = cheaters
            .iter()
            .filter_map(|m| Some((m.quarantined? - m.joined?) as f64 / SECOND as f64))
            .collect();
        let credit: Vec<f64> = ran
            .clone()
            .filter(|m| m.served > 0.0)
            .map(|m| m.credit)
            .collect();
        Report {
            scenario: sim.sc.name.clone(),
            description: sim.sc.description.clone(),
            seed: sim.seed,
            minutes: sim.sc.minutes,
            machines: sim.machines.len(),
            totals: Totals {
                served,
                peak_active: minutes.iter().map(|m| m.active_peers).max().unwrap_or(0),
                credit_gini: gini(&credit),
            },
            stalls: Spread::of(sim.stalls.clone(), 1.0, 30),
            checks: sim
                .checks
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            cheating: Cheating {
                cheaters: cheaters.len(),
                served: serving.len(),
                quarantined: cheaters.iter().filter(|m| m.quarantined.is_some()).count(),
                uncaught: serving.iter().filter(|m| m.quarantined.is_none()).count(),
                cheated: cheaters.iter().filter(|m| m.wrong > 0).count(),
                cheated_uncaught: cheaters
                    .iter()
                    .filter(|m| m.wrong > 0 && m.quarantined.is_none())
                    .count(),
                time_to_quarantine: Spread::of(caught, 60.0, 60),
                false_quarantines: ran
                    .filter(|m| m.corrupts == 0.0 && m.quarantined.is_some())
                    .count(),
                detection: DETECTION_AT
                    .iter()
                    .map(|&n| {
                        let caught = |m: &&&Machine| m.caught_job.is_some_and(|j| j <= n);
                        Detection {
                            jobs: n,
                            known: cheaters.iter().filter(|m| caught(m) || m.jobs >= n).count(),
                            caught: cheaters.iter().filter(caught).count(),
                        }
                    })
                    .collect(),
            },
            batch: sim.sc.batch.as_ref().map(|_| sim.batch.totals()),
            refused: sim.refused.clone(),
            lines: sim.said.clone(),
            per_minute: minutes.clone(),
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}
