//! A discrete-event simulator of large pools. It drives the coordinator's real core
//! (`potluck-core`'s [`PoolCore`](potluck_core::pool::PoolCore): peer table, planner,
//! router, checks, reputation, quarantine, redials) on a virtual clock with the events a
//! pool of simulated volunteers and clients would send it, and reports what happened: the
//! same scenario and seed give the same report, byte for byte.

pub mod batch;
pub mod checks;
pub mod clock;
pub mod dist;
pub mod events;
pub mod html;
pub mod peers;
pub mod report;
pub mod run;
pub mod scenario;
pub mod scenarios;
pub mod sessions;
pub mod stats;
pub mod world;

pub use report::Report;
pub use scenario::{Scenario, ScenarioError};
pub use stats::Cost;

use std::collections::BTreeMap;

/// A finished run: the deterministic report, and the core's wall time per decision.
pub struct Outcome {
    /// What happened.
    pub report: Report,
    /// The core's time per decision kind (varies between runs).
    pub cost: BTreeMap<&'static str, Cost>,
    /// The core's first operator lines, with their virtual times.
    pub log: Vec<String>,
}

/// Runs `scenario` from `seed` (the scenario's own seed if `None`).
pub fn simulate(scenario: Scenario, seed: Option<u64>) -> Outcome {
    let seed = seed.unwrap_or(scenario.seed);
    let (report, cost, log) = run::Sim::new(scenario, seed).run();
    Outcome { report, cost, log }
}
