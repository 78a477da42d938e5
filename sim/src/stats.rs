//! What a run counts as it goes: the figures of each virtual minute, latency histograms,
//! failover stalls, and the core's own time per decision (kept apart: it is wall time, so
//! it differs between runs).

use serde::Serialize;
use std::collections::BTreeMap;

/// Buckets per doubling of a latency histogram (about 3% wide).
const PER_DOUBLING: f64 = 24.0;
/// The smallest latency told apart, ms.
const FLOOR_MS: f64 = 0.01;

/// A histogram of milliseconds in log-spaced buckets, weighted: percentiles without
/// keeping every sample, the same on every run.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    buckets: BTreeMap<u32, f64>,
    weight: f64,
}

impl Histogram {
    /// Counts `ms` with weight `w` (tokens at that latency).
    pub fn add(&mut self, ms: f64, w: f64) {
        if !(ms.is_finite() && w.is_finite() && w > 0.0) {
            return;
        }
        let b = ((ms.max(FLOOR_MS) / FLOOR_MS).log2() * PER_DOUBLING) as u32;
        *self.buckets.entry(b).or_default() += w;
        self.weight += w;
    }

    /// The `q` quantile (0 to 1), ms, at its bucket's middle; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        let target = q.clamp(0.0, 1.0) * self.weight;
        let mut seen = 0.0;
        for (b, w) in &self.buckets {
            seen += w;
            if seen >= target {
                return FLOOR_MS * 2f64.powf((f64::from(*b) + 0.5) / PER_DOUBLING);
            }
        }
        0.0
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.weight == 0.0
    }
}

/// What sessions and the plan did over a stretch of a run: a minute, or all of it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Served {
    /// Sessions started (given a chain).
    pub started: u64,
    /// Sessions that ended with all their tokens.
    pub completed: u64,
    /// Sessions given up (no chain in time, or no replacement).
    pub failed: u64,
    /// Failovers that found a replacement.
    pub recovered: u64,
    /// Tokens generated.
    pub tokens: f64,
    /// Tokens per second served.
    pub tok_s: f64,
    /// Median time between a session's tokens, ms.
    pub p50_ms: f64,
    /// 99th percentile of it, ms.
    pub p99_ms: f64,
    /// New plan epochs.
    pub replans: u64,
    /// Assignments sent.
    pub assignments: u64,
}

impl Served {
    /// Adds `other`'s counts (not its rates or percentiles) to these.
    pub fn add(&mut self, other: &Served) {
        self.started += other.started;
        self.completed += other.completed;
        self.failed += other.failed;
        self.recovered += other.recovered;
        self.tokens += other.tokens;
        self.replans += other.replans;
        self.assignments += other.assignments;
    }

    /// Sets the rate and percentiles for `secs` seconds whose token latency is `latency`.
    pub fn close(&mut self, secs: f64, latency: &Histogram) {
        self.tok_s = self.tokens / secs.max(1e-9);
        self.p50_ms = latency.quantile(0.5);
        self.p99_ms = latency.quantile(0.99);
    }
}

/// The figures of one virtual minute.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Minute {
    /// Which minute (0 first).
    pub minute: u32,
    /// Peers the coordinator counts in the pool at its end, excluded ones left out.
    pub active_peers: usize,
    /// Machines online at its end (the coordinator may not know yet).
    pub online: usize,
    /// Peers serving a confirmed span at its end.
    pub serving_peers: usize,
    /// Sessions running at its end.
    pub running: usize,
    /// What was served in it.
    #[serde(flatten)]
    pub served: Served,
    /// Peers quarantined so far.
    pub quarantined: usize,
    /// Batch work units validated in it.
    #[serde(skip_serializing_if = "is_zero")]
    pub units_validated: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Wall time the core took per kind of decision (not part of the deterministic report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    /// Decisions of this kind.
    pub calls: u64,
    /// Total microseconds.
    pub total_us: f64,
    /// Slowest, microseconds.
    pub max_us: f64,
}

impl Cost {
    /// Counts one decision of `us` microseconds.
    pub fn add(&mut self, us: f64) {
        self.calls += 1;
        self.total_us += us;
        self.max_us = self.max_us.max(us);
    }

    /// Mean microseconds per decision.
    pub fn mean_us(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.total_us / self.calls as f64
        }
    }
}

/// Gini coefficient of `shares` (0: all equal, towards 1: one holds everything).
pub fn gini(shares: &[f64]) -> f64 {
    let mut v: Vec<f64> = shares.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    let total: f64 = v.iter().sum();
    if n == 0 || total <= 0.0 {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let weighted: f64 = v
        .iter()
        .enumerate()
        .map(|(i, x)| (2.0 * (i as f64 + 1.0) - n as f64 - 1.0) * x)
        .sum();
    weighted / (n as f64 * total)
}

/// The `q` quantile of sorted `v` (nearest rank); 0 when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_land_within_a_bucket() {
        let mut h = Histogram::default();
        for i in 1..=1000 {
            h.add(f64::from(i), 1.0);
        }
        let p50 = h.quantile(0.5);
        assert!((p50 / 500.0 - 1.0).abs() < 0.04, "{p50}");
        assert!((h.quantile(0.99) / 990.0 - 1.0).abs() < 0.04);
        assert_eq!(Histogram::default().quantile(0.5), 0.0);
    }

    #[test]
    fn gini_of_equal_and_of_one_holder() {
        assert_eq!(gini(&[1.0, 1.0, 1.0, 1.0]), 0.0);
        let g = gini(&[0.0, 0.0, 0.0, 10.0]);
        assert!((g - 0.75).abs() < 1e-12, "{g}");
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 1.0), 4.0);
    }
}
