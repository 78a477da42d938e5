//! What a simulation runs: a pool's peers, how they come and go, the network between them,
//! the clients' load and what happens on the way, read from a TOML file
//! (`sim/scenarios/*.toml`). Every field a file may leave out has the default named here.

use crate::dist::Dist;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most peers a scenario may start or add (the simulator holds them all in memory).
pub const MAX_PEERS: usize = 1_000_000;
/// Longest virtual run, minutes (a week).
pub const MAX_MINUTES: u32 = 7 * 24 * 60;

/// Why a scenario cannot run.
#[derive(Debug, Error)]
pub enum ScenarioError {
    /// The file is not TOML of this schema.
    #[error("scenario does not parse: {0}")]
    Parse(#[from] toml::de::Error),
    /// A value is out of its range.
    #[error("scenario is invalid: {0}")]
    Invalid(String),
}

/// One simulated pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, for reports.
    pub name: String,
    /// What it shows, in a sentence.
    #[serde(default)]
    pub description: String,
    /// Peers at the start (online or not, see [`Availability::online_at_start`]).
    pub peers: usize,
    /// Virtual minutes to run.
    pub minutes: u32,
    /// Seed, unless the command line gives one.
    #[serde(default = "one")]
    pub seed: u64,
    /// The coordinator's peer table bound.
    #[serde(default = "default_max_peers")]
    pub max_peers: usize,
    /// Floor of the spot-check share (`--check-share`).
    #[serde(default = "default_check_share")]
    pub check_share: f64,
    /// Seconds between a node's adverts (`--advert-interval`).
    #[serde(default = "default_advert_interval")]
    pub advert_interval_s: u64,
    /// The model served.
    pub model: ModelSpec,
    /// Device classes peers are drawn from.
    pub devices: Vec<DeviceClass>,
    /// How peers come and go.
    pub availability: Availability,
    /// The network between the coordinator and the peers.
    pub network: Network,
    /// Clients' load.
    pub load: Load,
    /// Batch jobs of work units (none if absent).
    #[serde(default)]
    pub batch: Option<BatchLoad>,
    /// Peers that corrupt their results.
    #[serde(default)]
    pub cheaters: Cheaters,
    /// Things that happen at set times.
    #[serde(default)]
    pub events: Vec<Event>,
}

fn one() -> u64 {
    1
}
fn default_max_peers() -> usize {
    potluck_core::peer_table::DEFAULT_MAX_PEERS
}
fn default_check_share() -> f64 {
    potluck_core::trust::DEFAULT_P_MIN
}
fn default_advert_interval() -> u64 {
    10
}

/// The served model's geometry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Its name.
    pub name: String,
    /// Decoder blocks.
    pub layers: u32,
    /// Megabytes of one block's weights.
    pub block_mb: f64,
    /// Megabytes of the embedding or head a first or last stage holds.
    pub edge_mb: f64,
    /// Megabytes each node keeps for caches and scratch.
    #[serde(default = "default_reserve")]
    pub reserve_mb: f64,
    /// Kilobytes of activations one hop sends per position.
    #[serde(default = "default_hidden_kb")]
    pub hidden_kb: f64,
    /// Gigabytes per second a node loads weights from its disk.
    #[serde(default = "default_disk")]
    pub load_gbps: f64,
}

fn default_reserve() -> f64 {
    256.0
}
fn default_hidden_kb() -> f64 {
    4.0
}
fn default_disk() -> f64 {
    1.0
}

/// A kind of machine volunteers bring.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceClass {
    /// Its name.
    pub name: String,
    /// Share of peers of this class.
    pub share: f64,
    /// Memory the owner lets the node use, GB (the owner's `--max-memory` cap).
    pub memory_gb: f64,
    /// Memory bandwidth, GB/s (what bounds a decode step).
    pub mem_gbps: f64,
    /// Matmul speed, GFLOP/s (what bounds a prefill, and each extra session in a batch).
    pub gflops: f64,
    /// Whether it is a GPU.
    #[serde(default)]
    pub gpu: bool,
}

/// How peers come and go.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Availability {
    /// How long a peer stays on, hours.
    pub on_hours: Dist,
    /// How long it stays off, hours.
    pub off_hours: Dist,
    /// Share of peers online at the start.
    #[serde(default = "one_f")]
    pub online_at_start: f64,
    /// Share of ends of an on period that are crashes (no goodbye) rather than leaves.
    #[serde(default)]
    pub crash_share: f64,
    /// Seconds before the coordinator sees a crashed peer's connection close.
    #[serde(default = "default_crash_detect")]
    pub crash_detect_s: f64,
    /// Share of peers run `--idle-only`: they pause whenever their owner uses the machine.
    #[serde(default)]
    pub idle_only_share: f64,
    /// How often an idle-only peer's owner comes back to the machine, per hour.
    #[serde(default)]
    pub pauses_per_hour: f64,
    /// How long such a pause lasts, minutes.
    #[serde(default = "default_pause")]
    pub pause_minutes: Dist,
}

fn one_f() -> f64 {
    1.0
}
fn default_crash_detect() -> f64 {
    5.0
}
fn default_pause() -> Dist {
    Dist::Exponential { mean: 10.0 }
}

/// The network, as a coordinate model: regions with round trips between them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Regions and the share of peers in each; the coordinator is in the first.
    pub regions: Vec<Region>,
    /// Round trip between regions, ms (`rtt_ms[a][b]`, square).
    pub rtt_ms: Vec<Vec<f64>>,
    /// Added to each peer's round trip, ms, drawn once per peer: uniform in [0, jitter).
    #[serde(default)]
    pub jitter_ms: f64,
    /// Share of peers behind NATs they cannot be dialled through: reached via a relay.
    #[serde(default)]
    pub relayed_share: f64,
    /// What the relay adds to a round trip, ms.
    #[serde(default)]
    pub relay_ms: f64,
    /// Each peer's uplink, Mbit/s.
    #[serde(default = "default_uplink")]
    pub uplink_mbps: Dist,
}

fn default_uplink() -> Dist {
    Dist::Fixed { value: 100.0 }
}

/// A region of the network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Its name.
    pub name: String,
    /// Share of peers in it.
    pub share: f64,
}

/// Clients' load.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Mean sessions started per minute (a Poisson process).
    pub sessions_per_minute: f64,
    /// How far the rate swings over a day: `rate × (1 + swing × cos(2π (hour − 18) / 24))`.
    #[serde(default)]
    pub daily_swing: f64,
    /// Hour of the day the run starts at.
    #[serde(default = "default_start_hour")]
    pub start_hour: f64,
    /// Prompt length, tokens.
    pub prompt_tokens: Dist,
    /// Output length, tokens.
    pub output_tokens: Dist,
    /// How long a client waits for the pool to serve it, seconds.
    #[serde(default = "default_wait")]
    pub wait_s: f64,
}

fn default_start_hour() -> f64 {
    12.0
}
fn default_wait() -> f64 {
    30.0
}

/// Batch jobs: each a set of work units (embeddings, or completions of a small model) that
/// peers holding the units' model whole run until a quorum of origins agrees.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLoad {
    /// Mean jobs submitted per hour (a Poisson process); a job's units arrive at once.
    pub jobs_per_hour: f64,
    /// Work units per job.
    pub units_per_job: usize,
    /// Tokens one unit computes.
    pub unit_tokens: Dist,
    /// Megabytes of the units' model: every machine with room for it caches it whole.
    pub model_mb: f64,
    /// Origins whose agreeing results validate a unit (`--batch-quorum`).
    #[serde(default = "default_quorum")]
    pub quorum: usize,
}

fn default_quorum() -> usize {
    potluck_core::quorum::DEFAULT_QUORUM
}

/// Peers that corrupt results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cheaters {
    /// Share of peers that cheat.
    #[serde(default)]
    pub share: f64,
    /// Share of a cheater's outputs it corrupts.
    #[serde(default)]
    pub corrupt_share: f64,
    /// What `corrupt_share` is a share of.
    #[serde(default)]
    pub unit: CorruptUnit,
}

/// What a cheater corrupts a share of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CorruptUnit {
    /// Each output (token) it computes: a long session's work is almost surely wrong.
    #[default]
    Token,
    /// Each job (its hop's work in one session, which a check covers whole): the unit of
    /// `potluck bench --detection`.
    Job,
}

/// Something that happens at a set time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Event {
    /// A share of the online peers leave within a window.
    Departure {
        /// When it starts, minutes into the run.
        at_minute: f64,
        /// Share of online peers that leave.
        share: f64,
        /// Over how many seconds.
        within_s: f64,
        /// Share of them that crash instead of saying goodbye.
        #[serde(default)]
        crash_share: f64,
        /// Whether they come back (after an off period) or are gone for the run.
        #[serde(default)]
        come_back: bool,
    },
    /// Many new identities join at once.
    Sybil {
        /// When, minutes into the run.
        at_minute: f64,
        /// How many.
        count: usize,
        /// Share of them that cheat (at the scenario's corrupt share, or `corrupt_share`).
        #[serde(default = "one_f")]
        cheating_share: f64,
        /// The share of their outputs they corrupt.
        #[serde(default)]
        corrupt_share: Option<f64>,
        /// Whether their wrong answers agree with each other (a coordinated attack, which
        /// can outvote an honest peer), rather than each being its own.
        #[serde(default)]
        colluding: bool,
        /// Whether they all connect from one network (one origin to the coordinator, so
        /// none of them checks another).
        #[serde(default)]
        one_network: bool,
        /// Device class, by name (drawn as for any peer if absent).
        #[serde(default)]
        device: Option<String>,
    },
    /// One client session, besides the load's: for following a single session through the
    /// pool (as a test of the real processes does).
    Session {
        /// When the client arrives, minutes into the run.
        at_minute: f64,
        /// Prompt tokens.
        prompt_tokens: u64,
        /// Tokens to generate.
        output_tokens: u64,
    },
    /// The machine serving one hop of a session crashes once that session has generated
    /// some tokens (a node killed mid-stream).
    CrashServing {
        /// The session, counting from 0 in the order sessions arrived.
        session: usize,
        /// Which hop of its chain, from 0.
        #[serde(default)]
        hop: usize,
        /// Tokens the session has when the machine crashes.
        after_tokens: u64,
    },
}

/// Whether `x` is a finite number no less than 0.
fn at_least_zero(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

impl Scenario {
    /// Reads and checks a scenario.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text)?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every value is in range, so a run never meets a nonsense parameter.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |what: String| Err(ScenarioError::Invalid(what));
        let share = |x: f64| (0.0..=1.0).contains(&x);
        let added: usize = self
            .events
            .iter()
            .map(|e| match e {
                Event::Sybil { count, .. } => *count,
                _ => 0,
            })
            .sum();
        if self.peers + added > MAX_PEERS {
            return bad(format!("more than {MAX_PEERS} peers"));
        }
        if self.minutes == 0 || self.minutes > MAX_MINUTES {
            return bad(format!("minutes must be 1 to {MAX_MINUTES}"));
        }
        if !share(self.check_share) {
            return bad("check_share must be 0 to 1".into());
        }
        if self.advert_interval_s == 0 || self.advert_interval_s > 300 {
            return bad("advert_interval_s must be 1 to 300".into());
        }
        let m = &self.model;
        if m.layers == 0 || m.layers > 1024 {
            return bad("model.layers must be 1 to 1024".into());
        }
        for (what, x) in [
            ("block_mb", m.block_mb),
            ("load_gbps", m.load_gbps),
            ("hidden_kb", m.hidden_kb),
        ] {
            if !(x.is_finite() && x > 0.0) {
                return bad(format!("model.{what} must be positive"));
            }
        }
        if !(m.edge_mb.is_finite() && m.edge_mb >= 0.0 && m.reserve_mb >= 0.0) {
            return bad("model.edge_mb and reserve_mb must be at least 0".into());
        }
        if self.devices.is_empty() {
            return bad("at least one device class".into());
        }
        for d in &self.devices {
            let fine = [d.share, d.memory_gb, d.mem_gbps, d.gflops]
                .iter()
                .all(|x| x.is_finite() && *x >= 0.0);
            if !fine || d.mem_gbps <= 0.0 || d.gflops <= 0.0 {
                return bad(format!("device {:?} needs positive speeds", d.name));
            }
        }
        let a = &self.availability;
        for dist in [&a.on_hours, &a.off_hours, &a.pause_minutes] {
            if let Some(why) = dist.invalid() {
                return bad(why);
            }
        }
        let shares_ok = [a.online_at_start, a.crash_share, a.idle_only_share]
            .iter()
            .all(|x| share(*x));
        if !(shares_ok && at_least_zero(a.crash_detect_s) && at_least_zero(a.pauses_per_hour)) {
            return bad("availability shares must be 0 to 1, times at least 0".into());
        }
        let n = &self.network;
        if n.regions.is_empty()
            || n.rtt_ms.len() != n.regions.len()
            || n.rtt_ms.iter().any(|row| row.len() != n.regions.len())
        {
            return bad("network.rtt_ms must be square, one row per region".into());
        }
        if n.rtt_ms
            .iter()
            .flatten()
            .any(|x| !(x.is_finite() && *x >= 0.0))
            || !share(n.relayed_share)
            || !(n.jitter_ms >= 0.0 && n.relay_ms >= 0.0)
        {
            return bad("network times must be at least 0, shares 0 to 1".into());
        }
        if let Some(why) = n.uplink_mbps.invalid() {
            return bad(why);
        }
        let l = &self.load;
        for dist in [&l.prompt_tokens, &l.output_tokens] {
            if let Some(why) = dist.invalid() {
                return bad(why);
            }
        }
        if !(at_least_zero(l.sessions_per_minute)
            && share(l.daily_swing)
            && at_least_zero(l.wait_s))
        {
            return bad("load rates and waits must be at least 0, the swing 0 to 1".into());
        }
        if let Some(b) = &self.batch {
            if let Some(why) = b.unit_tokens.invalid() {
                return bad(why);
            }
            let quorum = 1..=potluck_core::quorum::MAX_REPLICAS;
            if !(at_least_zero(b.jobs_per_hour)
                && (1..=100_000).contains(&b.units_per_job)
                && b.model_mb.is_finite()
                && b.model_mb > 0.0
                && quorum.contains(&b.quorum))
            {
                return bad(format!(
                    "batch needs jobs_per_hour at least 0, 1 to 100000 units a job, a positive model_mb and a quorum of 1 to {}",
                    potluck_core::quorum::MAX_REPLICAS
                ));
            }
        }
        if !share(self.cheaters.share) || !share(self.cheaters.corrupt_share) {
            return bad("cheater shares must be 0 to 1".into());
        }
        for e in &self.events {
            match e {
                Event::Departure {
                    at_minute,
                    share: s,
                    within_s,
                    crash_share,
                    ..
                } => {
                    if !(share(*s) && share(*crash_share) && *at_minute >= 0.0 && *within_s >= 0.0)
                    {
                        return bad("a departure needs shares 0 to 1 and times at least 0".into());
                    }
                }
                Event::Sybil {
                    at_minute,
                    cheating_share,
                    corrupt_share,
                    device,
                    ..
                } => {
                    if !(*at_minute >= 0.0
                        && share(*cheating_share)
                        && corrupt_share.is_none_or(share))
                    {
                        return bad("a sybil wave needs shares 0 to 1, a time at least 0".into());
                    }
                    if let Some(name) = device {
                        if !self.devices.iter().any(|d| &d.name == name) {
                            return bad(format!("a sybil wave names no device class {name:?}"));
                        }
                    }
                }
                Event::Session {
                    at_minute,
                    prompt_tokens,
                    output_tokens,
                } => {
                    if !(*at_minute >= 0.0 && *prompt_tokens > 0 && *output_tokens > 0) {
                        return bad("a session needs a time at least 0 and tokens".into());
                    }
                }
                Event::CrashServing { after_tokens, .. } => {
                    if *after_tokens == 0 {
                        return bad("a crash-serving event needs after_tokens of 1 or more".into());
                    }
                }
            }
        }
        Ok(())
    }
}
