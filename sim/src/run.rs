//! The simulation: the coordinator's real core ([`PoolCore`]) on a virtual clock, fed the
//! events a pool of simulated machines and clients would send it, with the actions it
//! returns carried out as the daemon would (assignments load, sessions take the chains it
//! routes, checks recompute what it picks).

use crate::batch::Batches;
use crate::clock::{secs, Clock, Micros, SECOND};
use crate::dist::Draws;
use crate::events::{Event, Queue};
use crate::report::Report;
use crate::scenario::{Event as Planned, Scenario};
use crate::sessions::Session;
use crate::stats::{Cost, Histogram, Minute};
use crate::world::{Machine, Maker};
use potluck_core::capacity::KvGeometry;
use potluck_core::peer_table::PeerTable;
use potluck_core::planner::ModelShape;
use potluck_core::pool::{Action, Now, PoolCore, PoolModel};
use potluck_core::trust::Trust;
use potluck_protocol::messages::{CapacityAdvert, DeviceKind, LayerRange, ModelRef};
use potluck_protocol::signed::PublicKey;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// The pool's name on its adverts.
pub(crate) const POOL: &str = "sim";
/// How often the coordinator pings its connections.
const PING_EVERY: Micros = 5 * SECOND;
/// How often the simulator refreshes its index of serving spans (checkers, replicas).
const INDEX_EVERY: Micros = 5 * SECOND;
/// The daemon's timers: redials every quarter second; silent peers and the plan every
/// second.
const REDIAL_EVERY: Micros = SECOND / 4;

/// A machine that crashes once a session has generated so many tokens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crash {
    /// The session, by arrival.
    pub(crate) session: usize,
    /// The hop of its chain whose machine crashes.
    pub(crate) hop: usize,
    /// Tokens the session has by then.
    pub(crate) after: f64,
}

/// One run in progress.
pub struct Sim {
    pub(crate) sc: Scenario,
    pub(crate) seed: u64,
    pub(crate) clock: Clock,
    pub(crate) core: PoolCore,
    pub(crate) model: ModelRef,
    pub(crate) machines: Vec<Machine>,
    pub(crate) by_key: HashMap<PublicKey, usize>,
    pub(crate) q: Queue,
    pub(crate) now: Micros,
    maker: Maker,
    pub(crate) avail: Draws,
    pub(crate) load: Draws,
    pub(crate) cheat: Draws,
    /// Batch jobs' submissions and sizes.
    pub(crate) jobs: Draws,
    /// Batch work units and what runs them.
    pub(crate) batch: Batches,
    pub(crate) sessions: Vec<Session>,
    /// Crashes still to come, each when its session reaches its token count.
    pub(crate) crashes: Vec<Crash>,
    /// Serving spans by range, peers in key order: who can check or replace whom.
    pub(crate) replicas: BTreeMap<(u32, u32), Vec<usize>>,
    /// This minute's figures so far.
    pub(crate) minute: Minute,
    pub(crate) latency: Histogram,
    /// Token latency over the whole run.
    pub(crate) latency_run: Histogram,
    pub(crate) minutes: Vec<Minute>,
    /// Every failover's stall, seconds, from the failure to the replacement answering.
    pub(crate) stalls: Vec<f64>,
    /// Operator lines the core said, by dashboard kind.
    pub(crate) said: BTreeMap<String, u64>,
    /// The first operator lines, for reading a run.
    pub(crate) log: Vec<String>,
    pub(crate) log_cap: usize,
    /// Checks run, by outcome.
    pub(crate) checks: BTreeMap<&'static str, u64>,
    /// Adverts the table refused, by reason.
    pub(crate) refused: BTreeMap<String, u64>,
    /// The core's wall time per decision kind.
    pub(crate) cost: BTreeMap<&'static str, Cost>,
    pub(crate) end: Micros,
}

impl Sim {
    /// A run of `sc` from `seed`, its machines made and its first events scheduled.
    pub fn new(sc: Scenario, seed: u64) -> Self {
        let m = &sc.model;
        let mb = |x: f64| (x * 1e6) as u64;
        let model = ModelRef {
            name: m.name.clone(),
            digest: potluck_protocol::signed::digest(m.name.as_bytes()),
        };
        let served = PoolModel {
            model: model.clone(),
            shape: ModelShape {
                layers: m.layers,
                layer_bytes: mb(m.block_mb).max(1),
                edge_bytes: mb(m.edge_mb),
                reserve_bytes: mb(m.reserve_mb),
            },
            kv: KvGeometry {
                layers: m.layers,
                block_bytes: mb(m.block_mb).max(1),
                edge_bytes: mb(m.edge_mb),
                kv_bytes_per_block_position: 1,
            },
        };
        let table = PeerTable::new(POOL).with_max_peers(sc.max_peers);
        let trust = Trust::new(sc.check_share, Draws::fork(seed, "trust").bits());
        let core = PoolCore::new(served, table, trust, false);
        let end = u64::from(sc.minutes) * 60 * SECOND;
        let mut sim = Self {
            maker: Maker::new(&sc, seed),
            avail: Draws::fork(seed, "availability"),
            load: Draws::fork(seed, "load"),
            cheat: Draws::fork(seed, "cheating"),
            jobs: Draws::fork(seed, "batch"),
            batch: Batches::default(),
            seed,
            clock: Clock::new(),
            core,
            model,
            machines: Vec::new(),
            by_key: HashMap::new(),
            q: Queue::default(),
            now: 0,
            sessions: Vec::new(),
            crashes: Vec::new(),
            replicas: BTreeMap::new(),
            minute: Minute::default(),
            latency: Histogram::default(),
            latency_run: Histogram::default(),
            minutes: Vec::new(),
            stalls: Vec::new(),
            said: BTreeMap::new(),
            log: Vec::new(),
            log_cap: 2000,
            checks: BTreeMap::new(),
            refused: BTreeMap::new(),
            cost: BTreeMap::new(),
            end,
            sc,
        };
        let (cheaters, corrupt) = (sim.sc.cheaters.share, sim.sc.cheaters.corrupt_share);
        for _ in 0..sim.sc.peers {
            let i = sim.add_machine(None, cheaters, corrupt);
            if sim.avail.chance(sim.sc.availability.online_at_start) {
                // Nodes start within the first advert interval, not all in one instant.
                let at = secs(sim.avail.unit() * sim.sc.advert_interval_s as f64);
                sim.q.at(at, Event::On { peer: i });
            } else {
                let off = sim.sc.availability.off_hours.sample(&mut sim.avail);
                sim.q.at(secs(off * 3600.0), Event::On { peer: i });
            }
        }
        for index in 0..sim.sc.events.len() {
            let at = match &sim.sc.events[index] {
                Planned::Departure { at_minute, .. }
                | Planned::Sybil { at_minute, .. }
                | Planned::Session { at_minute, .. } => *at_minute,
                &Planned::CrashServing {
                    session,
                    hop,
                    after_tokens,
                } => {
                    sim.crashes.push(Crash {
                        session,
                        hop,
                        after: after_tokens as f64,
                    });
                    continue;
                }
            };
            sim.q.at(secs(at * 60.0), Event::Scheduled { index });
        }
        sim.q.at(0, Event::Tick);
        sim.next_arrival();
        sim.next_job();
        sim
    }

    /// Runs to the scenario's end and reports.
    pub fn run(mut self) -> (Report, BTreeMap<&'static str, Cost>, Vec<String>) {
        while let Some((at, event)) = self.q.next_before(self.end) {
            self.now = at;
            self.handle(event);
        }
        let cost = std::mem::take(&mut self.cost);
        let log = std::mem::take(&mut self.log);
        (Report::of(&self), cost, log)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::On { peer } => self.on(peer),
            Event::Off {
                peer,
                inc,
                crash,
                back,
            } => self.off(peer, inc, crash, back),
            Event::Pause { peer, inc } => self.pause(peer, inc),
            Event::Advert { peer, inc } => self.advert(peer, inc, true),
            Event::Closed { peer, inc } => self.closed(peer, inc),
            Event::Loaded {
                peer,
                inc,
                assignment,
            } => self.loaded(peer, inc, assignment),
            Event::Arrive => self.arrive(),
            Event::Retry { session } => self.start(session),
            Event::Progress { session, gen } => self.progress(session, gen),
            Event::Failover { session, gen } => self.failover(session, gen),
            Event::Job => self.job(),
            Event::UnitDone { unit, peer, inc } => self.unit_done(unit, peer, inc),
            Event::Tick => self.tick(),
            Event::Scheduled { index } => self.scheduled(index),
        }
    }

    /// The core's time now.
    pub(crate) fn t(&self) -> Now {
        self.clock.now(self.now)
    }

    /// Calls the core for a decision of `kind`, timing it, then carries out what it decided.
    pub(crate) fn decide<T>(
        &mut self,
        kind: &'static str,
        f: impl FnOnce(&mut PoolCore, Now) -> T,
    ) -> T {
        let now = self.t();
        let started = Instant::now();
        let out = f(&mut self.core, now);
        let us = started.elapsed().as_secs_f64() * 1e6;
        self.cost.entry(kind).or_default().add(us);
        self.act();
        out
    }

    /// Times `f`, a decision the simulator takes with the core's policy on its own state
    /// (the batch runner's), as a decision of `kind`.
    pub(crate) fn timed<T>(&mut self, kind: &'static str, f: impl FnOnce(&Self) -> T) -> T {
        let started = Instant::now();
        let out = f(self);
        let us = started.elapsed().as_secs_f64() * 1e6;
        self.cost.entry(kind).or_default().add(us);
        out
    }

    /// Carries out the core's actions.
    fn act(&mut self) {
        for action in self.core.poll() {
            match action {
                Action::Say { kind, line } => {
                    *self.said.entry(kind.unwrap_or("log").into()).or_default() += 1;
                    self.note(line);
                }
                Action::Assign { peer, assignment } => {
                    self.minute.served.assignments += 1;
                    let Some(&i) = self.by_key.get(&peer) else {
                        continue;
                    };
                    let m = &self.machines[i];
                    let blocks = f64::from(assignment.layers.len());
                    let load_s = blocks * self.sc.model.block_mb / (self.sc.model.load_gbps * 1e3)
                        + m.rtt_ms / 1e3;
                    let inc = m.inc;
                    self.q.at(
                        self.now + secs(load_s),
                        Event::Loaded {
                            peer: i,
                            inc,
                            assignment,
                        },
                    );
                }
                Action::NewPlan { .. } => self.minute.served.replans += 1,
                Action::Quarantined { peer, .. } => {
                    if let Some(&i) = self.by_key.get(&peer) {
                        let m = &mut self.machines[i];
                        m.quarantined.get_or_insert(self.now);
                        m.credit = 0.0;
                    }
                }
                Action::Sessions(_) | Action::Changed => {}
            }
        }
    }

    /// Adds `line` to the run's log, stamped with the virtual time, while the log has room.
    pub(crate) fn note(&mut self, line: String) {
        if self.log.len() < self.log_cap {
            let t = self.now as f64 / SECOND as f64;
            self.log.push(format!("{t:10.3} {line}"));
        }
    }

    /// Counts `w` tokens that took `ms` each.
    pub(crate) fn observe(&mut self, ms: f64, w: f64) {
        self.latency.add(ms, w);
        self.latency_run.add(ms, w);
    }

    /// Makes a machine (`class` by index, or drawn) and returns its index.
    pub(crate) fn add_machine(&mut self, class: Option<usize>, cheat: f64, corrupt: f64) -> usize {
        let m = self.maker.make(&self.sc, class, cheat, corrupt);
        let i = self.machines.len();
        let mut m = m;
        m.origin = i as u64 + 1;
        self.by_key.insert(m.key, i);
        self.machines.push(m);
        i
    }

    /// The advert machine `i`'s node sends now.
    pub(crate) fn advert_of(&mut self, i: usize) -> CapacityAdvert {
        let unix = self.t().unix;
        let ttl = 3 * self.sc.advert_interval_s;
        let m = &mut self.machines[i];
        m.seq += 1;
        let class = &self.sc.devices[m.class];
        let mut models = vec![self.model.clone()];
        if self
            .sc
            .batch
            .as_ref()
            .is_some_and(|b| b.model_mb <= class.memory_gb * 1e3)
        {
            models.push(self.batch.model.clone());
        }
        CapacityAdvert {
            pool: POOL.into(),
            device: if class.gpu {
                DeviceKind::Cuda(0)
            } else {
                DeviceKind::Cpu
            },
            memory_bytes: (class.memory_gb * 1e9) as u64,
            gflops: class.gflops as f32,
            mem_gbps: class.mem_gbps as f32,
            threads: 8,
            models,
            loaded: m.holds.map(|r| (self.model.clone(), r)),
            seq: m.seq,
            issued_at: unix,
            expires_at: unix + ttl,
            name: None,
            coordinator: None,
        }
    }

    /// The coordinator's timers, as the daemon runs them.
    fn tick(&mut self) {
        if self.now.is_multiple_of(SECOND) {
            self.decide("expire", |c, now| c.expire_silent(now));
            self.decide("replan", |c, now| c.replan(now.at));
        }
        let dial = self.decide("redial", |c, now| c.due_redials(now));
        for key in dial {
            let Some(&i) = self.by_key.get(&key) else {
                continue;
            };
            if self.machines[i].online {
                // The dial reached it: its connection is open again.
                self.decide("connected", |c, now| {
                    c.connected(&key);
                    c.pinged(key, true, now.at);
                });
            }
        }
        if self.now.is_multiple_of(PING_EVERY) {
            for i in 0..self.machines.len() {
                let m = &self.machines[i];
                if m.online && self.core.knows(&m.key) {
                    self.ping(i);
                }
            }
        }
        self.batch_round();
        if self.now.is_multiple_of(INDEX_EVERY) {
            self.index_replicas();
        }
        if self.now > 0 && self.now.is_multiple_of(60 * SECOND) {
            self.close_minute();
        }
        self.q.at(self.now + REDIAL_EVERY, Event::Tick);
    }

    /// Machine `i`'s connection answers a ping now, with its round trip.
    pub(crate) fn ping(&mut self, i: usize) {
        let (key, rtt_ms) = (self.machines[i].key, self.machines[i].rtt_ms);
        let now = self.t().at;
        self.core.pinged(key, true, now);
        self.core.table_mut().set_rtt(&key, rtt_ms as f32);
    }

    /// Rebuilds the index of serving spans the checks draw from.
    pub(crate) fn index_replicas(&mut self) {
        let serving = self.core.serving(self.t().at);
        self.replicas.clear();
        for span in serving {
            if let Some(&i) = self.by_key.get(&span.peer) {
                self.replicas
                    .entry((span.range.start, span.range.end))
                    .or_default()
                    .push(i);
            }
        }
    }

    /// Files this minute's figures and starts the next.
    fn close_minute(&mut self) {
        for s in 0..self.sessions.len() {
            self.settle(s);
        }
        let at = self.t().at;
        let mut m = std::mem::take(&mut self.minute);
        m.minute = self.minutes.len() as u32;
        m.online = self.machines.iter().filter(|x| x.online).count();
        m.active_peers = self
            .core
            .table()
            .peers()
            .iter()
            .filter(|p| !self.core.is_excluded(&p.key, at))
            .count();
        m.serving_peers = self.core.serving(at).len();
        m.running = self.sessions.iter().filter(|s| s.running()).count();
        m.served.close(60.0, &self.latency);
        m.quarantined = self
            .machines
            .iter()
            .filter(|x| x.quarantined.is_some())
            .count();
        self.latency = Histogram::default();
        self.minutes.push(m);
    }

    /// A scenario event starts.
    fn scheduled(&mut self, index: usize) {
        match self.sc.events[index].clone() {
            Planned::Departure {
                share,
                within_s,
                crash_share,
                come_back,
                ..
            } => {
                let online: Vec<usize> = (0..self.machines.len())
                    .filter(|&i| self.machines[i].online)
                    .collect();
                for i in online {
                    if !self.avail.chance(share) {
                        continue;
                    }
                    let at = self.now + secs(self.avail.unit() * within_s);
                    let crash = self.avail.chance(crash_share);
                    let inc = self.machines[i].inc;
                    if !come_back {
                        self.machines[i].retired = true;
                    }
                    self.q.at(
                        at,
                        Event::Off {
                            peer: i,
                            inc,
                            crash,
                            back: come_back,
                        },
                    );
                }
            }
            Planned::Sybil {
                count,
                cheating_share,
                corrupt_share,
                colluding,
                one_network,
                device,
                ..
            } => {
                let class = device.and_then(|n| self.sc.devices.iter().position(|d| d.name == n));
                let corrupt = corrupt_share.unwrap_or(self.sc.cheaters.corrupt_share);
                for _ in 0..count {
                    let i = self.add_machine(class, cheating_share, corrupt);
                    self.machines[i].colludes = colluding;
                    if one_network {
                        // Past every machine's own: one network for the whole wave.
                        self.machines[i].origin = u64::MAX - index as u64;
                    }
                    self.q.at(self.now, Event::On { peer: i });
                }
            }
            Planned::Session {
                prompt_tokens,
                output_tokens,
                ..
            } => self.new_session(prompt_tokens, output_tokens),
            Planned::CrashServing { .. } => {}
        }
    }

    /// The layer range of a span as the index keys it.
    pub(crate) fn range_key(r: LayerRange) -> (u32, u32) {
        (r.start, r.end)
    }
}
