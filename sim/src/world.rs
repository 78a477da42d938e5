//! The simulated machines as they really are (the coordinator only learns what their
//! adverts say and what their steps take): device, place in the network, honesty, whether
//! they are on, and what their node holds.

use crate::clock::Micros;
use crate::dist::Draws;
use crate::scenario::{DeviceClass, Scenario};
use potluck_protocol::messages::LayerRange;
use potluck_protocol::signed::PublicKey;
use std::collections::BTreeSet;

/// One volunteer's machine.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Its node's identity.
    pub key: PublicKey,
    /// Index of its device class.
    pub class: usize,
    /// Round trip to the coordinator, ms (region, jitter and relay included).
    pub rtt_ms: f64,
    /// Uplink, Mbit/s.
    pub uplink_mbps: f64,
    /// Share of its outputs it corrupts (0: honest).
    pub corrupts: f64,
    /// The network it connects from (the coordinator's `origin`: checks pick checkers of
    /// another one); each honest machine its own.
    pub origin: u64,
    /// Whether its wrong answers agree with other colluders' (a coordinated Sybil wave).
    pub colludes: bool,
    /// Whether its owner runs it idle-only.
    pub idle_only: bool,
    /// Whether its node runs now.
    pub online: bool,
    /// Which run of its node this is: events of an earlier run are void.
    pub inc: u32,
    /// The sequence number of its next advert.
    pub seq: u64,
    /// The span its node holds now.
    pub holds: Option<LayerRange>,
    /// Sessions whose chains use it.
    pub sessions: BTreeSet<usize>,
    /// When its node first started.
    pub joined: Option<Micros>,
    /// When it was first quarantined.
    pub quarantined: Option<Micros>,
    /// Blocks × tokens it served, the pool's credit (voided when quarantined).
    pub credit: f64,
    /// Blocks × tokens it served, voided or not.
    pub served: f64,
    /// Wrong answers it gave (a session's hop, a check's recomputation, a batch unit).
    pub wrong: u64,
    /// Jobs it finished (its hops' work in sessions).
    pub jobs: u64,
    /// The job whose check caught its own work, counting from 1.
    pub caught_job: Option<u64>,
    /// Whether a departure took it for good.
    pub retired: bool,
}

/// Makes machines as the scenario's distributions say.
pub struct Maker {
    draws: Draws,
    shares: Vec<f64>,
    regions: Vec<f64>,
}

impl Maker {
    /// A maker for `scenario`'s machines, drawing from `seed`.
    pub fn new(scenario: &Scenario, seed: u64) -> Self {
        Self {
            draws: Draws::fork(seed, "machines"),
            shares: scenario.devices.iter().map(|d| d.share).collect(),
            regions: scenario.network.regions.iter().map(|r| r.share).collect(),
        }
    }

    /// A new machine at `now`: of `class` if given, else drawn; cheating at `corrupts` if
    /// it is drawn a cheater with probability `cheat_share`.
    pub fn make(
        &mut self,
        scenario: &Scenario,
        class: Option<usize>,
        cheat_share: f64,
        corrupts: f64,
    ) -> Machine {
        let d = &mut self.draws;
        let class = class.unwrap_or_else(|| d.pick(&self.shares));
        let net = &scenario.network;
        let region = d.pick(&self.regions);
        let relayed = d.chance(net.relayed_share);
        let rtt_ms = net.rtt_ms[0][region]
            + net.jitter_ms * d.unit()
            + if relayed { net.relay_ms } else { 0.0 };
        let uplink_mbps = net.uplink_mbps.sample(d).max(0.1);
        let cheats = d.chance(cheat_share);
        let idle_only = d.chance(scenario.availability.idle_only_share);
        Machine {
            key: PublicKey(d.bytes32()),
            class,
            rtt_ms,
            uplink_mbps,
            corrupts: if cheats { corrupts } else { 0.0 },
            colludes: false,
            origin: 0,
            idle_only,
            online: false,
            inc: 0,
            seq: 0,
            holds: None,
            sessions: BTreeSet::new(),
            joined: None,
            quarantined: None,
            credit: 0.0,
            served: 0.0,
            wrong: 0,
            jobs: 0,
            caught_job: None,
            retired: false,
        }
    }
}

/// Milliseconds a `class` machine takes to run `blocks` blocks of `block_mb` for one
/// position of each of `batch` sessions at once: reading the weights bounds a decode step
/// (memory bandwidth), and each further session in the batch adds its arithmetic.
pub fn decode_ms(class: &DeviceClass, block_mb: f64, blocks: u32, batch: usize) -> f64 {
    let read = block_mb / class.mem_gbps;
    let per_session = flops_ms(class, block_mb, 1);
    f64::from(blocks) * (read + per_session * batch.saturating_sub(1) as f64)
}

/// Milliseconds a `class` machine takes to run `blocks` blocks over `positions` positions
/// (a prefill, or a replay after a failover): arithmetic-bound past a few positions.
pub fn prefill_ms(class: &DeviceClass, block_mb: f64, blocks: u32, positions: u64) -> f64 {
    let read = block_mb / class.mem_gbps;
    f64::from(blocks) * read.max(flops_ms(class, block_mb, positions))
}

/// Arithmetic of `positions` positions through one block: 2 FLOPs per weight, a 4-bit
/// weight per half byte.
fn flops_ms(class: &DeviceClass, block_mb: f64, positions: u64) -> f64 {
    let weights = block_mb * 1e6 * 2.0;
    2.0 * weights * positions as f64 / (class.gflops * 1e9) * 1e3
}
