//! What the coordinator counts, in Prometheus' text format at `/metrics`: tokens in and out,
//! time to first token and per token, each peer's stage latency, plan changes, failures and
//! result checks. Also the short window of token times the dashboard's live tokens/s reads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window the live tokens/s figure averages over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A peer, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    /// Its libp2p id.
    pub peer: String,
}

/// A kind of event, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// What happened.
    pub kind: String,
}

type HistogramFamily = Family<PeerLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

fn count(family: &Family<KindLabel, Counter>, kind: &str) {
    family.get_or_create(&KindLabel { kind: kind.into() }).inc();
}

/// Every metric the coordinator keeps.
pub struct Metrics {
    registry: Registry,
    /// Prompt tokens prefilled.
    pub tokens_in: Counter,
    /// Tokens generated.
    pub tokens_out: Counter,
    /// Seconds from request to first token.
    pub time_to_first_token: Histogram,
    /// Seconds per generated token after the first.
    pub time_per_token: Histogram,
    /// Seconds each peer's stage took per step, network included.
    pub stage_latency: HistogramFamily,
    /// Plans made with a new epoch.
    pub plan_changes: Counter,
    /// Failed sessions and stages, by kind.
    pub failures: Family<KindLabel, Counter>,
    /// Stage results checked, by outcome.
    pub checks: Family<KindLabel, Counter>,
    /// Sessions running now.
    pub sessions: Gauge,
    /// Seconds from a hop's failure until its replacement has replayed the session.
    pub failovers: Histogram,
    /// Seconds spent recomputing results for spot checks, network included (compare with
    /// the sum of stage latencies for the checks' overhead).
    pub check_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Texts embedded by the pool's nodes.
    pub embedded_texts: Counter,
    recent_tokens: Mutex<VecDeque<Instant>>,
    history: Mutex<VecDeque<Sample>>,
}

/// One point of the dashboard's chart.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// Unix seconds.
    pub at: u64,
    /// Tokens generated per second then.
    pub tokens_per_second: f64,
    /// Sessions running then.
    pub sessions: i64,
}

/// Samples kept: ten minutes at one every five seconds.
pub const HISTORY: usize = 120;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, registered under `potluck_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("potluck");
        let m = Self {
            tokens_in: Counter::default(),
            tokens_out: Counter::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            time_per_token: latency_histogram(),
            stage_latency: HistogramFamily::new_with_constructor(latency_histogram),
            plan_changes: Counter::default(),
            failures: Family::default(),
            checks: Family::default(),
            sessions: Gauge::default(),
            failovers: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            check_seconds: Counter::default(),
            embedded_texts: Counter::default(),
            recent_tokens: Mutex::new(VecDeque::new()),
            history: Mutex::new(VecDeque::new()),
            registry: Registry::default(),
        };
        registry.register("tokens_in", "Prompt tokens prefilled", m.tokens_in.clone());
        registry.register("tokens_out", "Tokens generated", m.tokens_out.clone());
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from request to first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "time_per_token_seconds",
            "Seconds per generated token after the first",
            m.time_per_token.clone(),
        );
        registry.register(
            "stage_latency_seconds",
            "Seconds a peer's stage took per step, network included",
            m.stage_latency.clone(),
        );
        registry.register(
            "plan_changes",
            "Plans with a new epoch",
            m.plan_changes.clone(),
        );
        registry.register("failures", "Failures by kind", m.failures.clone());
        registry.register(
            "checks",
            "Stage results checked, by outcome",
            m.checks.clone(),
        );
        registry.register("sessions", "Sessions running now", m.sessions.clone());
        registry.register(
            "failover_seconds",
            "Seconds from a hop's failure until its replacement has replayed the session",
            m.failovers.clone(),
        );
        registry.register(
            "check_seconds",
            "Seconds spent recomputing results for spot checks, network included",
            m.check_seconds.clone(),
        );
        registry.register(
            "embedded_texts",
            "Texts embedded by the pool's nodes",
            m.embedded_texts.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a failure of `kind`.
    pub fn failure(&self, kind: &str) {
        count(&self.failures, kind);
    }

    /// Counts a checked result with `outcome`.
    pub fn check(&self, outcome: &str) {
        count(&self.checks, outcome);
    }

    /// Records a failover that took `secs`.
    pub fn failover(&self, secs: f64) {
        self.failovers.observe(secs);
    }

    /// Records a step's time on `peer`.
    pub fn stage(&self, peer: &str, secs: f64) {
        self.stage_latency
            .get_or_create(&PeerLabel { peer: peer.into() })
            .observe(secs);
    }

    /// Counts one generated token now, for the counters and the live rate.
    pub fn token(&self) {
        self.tokens_out.inc();
        let now = Instant::now();
        let mut q = self.recent_tokens.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(now);
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
        {
            q.pop_front();
        }
    }

    /// Tokens per second over the last [`RATE_WINDOW`].
    pub fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let q = self.recent_tokens.lock().unwrap_or_else(|p| p.into_inner());
        let n = q
            .iter()
            .filter(|t| now.duration_since(**t) <= RATE_WINDOW)
            .count();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }

    /// Notes tokens/s and sessions now (unix time `at`), for the chart of the last
    /// minutes; the oldest samples go.
    pub fn sample(&self, at: u64) {
        let point = Sample {
            at,
            tokens_per_second: self.tokens_per_second(),
            sessions: self.sessions.get(),
        };
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.push_back(point);
        while h.len() > HISTORY {
            h.pop_front();
        }
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Everything in Prometheus' text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
