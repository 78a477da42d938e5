//! Clients' sessions: they arrive by a Poisson process with a daily curve, take the chain
//! the core routes, generate tokens at the speed their hops really have, and fail over the
//! way the coordinator's pipeline does (the smallest window of hops around the failed one
//! the core can reroute, polled until [`FAILOVER_PATIENCE`]).

use crate::clock::{secs, Micros, SECOND};
use crate::events::Event;
use crate::run::Sim;
use crate::scenario::CorruptUnit;
use crate::world::{decode_ms, prefill_ms};
use potluck_core::planner::Span;
use potluck_core::router::{windows_around, FAILOVER_PATIENCE, FAILOVER_POLL};
use potluck_protocol::messages::LayerRange;
use potluck_protocol::signed::PublicKey;
use std::collections::HashSet;

/// How often a running session's tokens are counted and its hops' step times reported.
const PROGRESS_EVERY: Micros = 10 * SECOND;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No chain yet.
    Waiting,
    /// Generating.
    Running,
    /// A hop failed at `since`; failing over.
    Stalled {
        /// When the failed step was sent.
        since: Micros,
    },
    /// All its tokens came.
    Done,
    /// Given up.
    Failed,
}

/// One hop of a session's chain.
#[derive(Debug, Clone)]
pub struct Hop {
    /// The machine.
    pub peer: usize,
    /// Its blocks.
    pub range: LayerRange,
    /// Tokens it computed for this session.
    pub tokens: f64,
    /// Whether the core picked its work in this session for a check.
    pub picked: bool,
    /// What its output was, if it was wrong: colluders' wrong answers agree (0), others'
    /// are each their own.
    pub wrong: Option<u64>,
}

/// One client's session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Prompt tokens.
    pub prompt: u64,
    /// Tokens to generate.
    pub output: u64,
    /// When the client arrived.
    pub arrived: Micros,
    /// Tokens generated so far.
    pub generated: f64,
    /// Its chain.
    pub hops: Vec<Hop>,
    /// Bumped whenever its scheduled progress is void.
    pub gen: u32,
    /// Tokens are counted up to here.
    pub last: Micros,
    /// Milliseconds per token now.
    pub step_ms: f64,
    /// Where it is.
    pub state: State,
    /// Peers its failovers avoid.
    pub avoid: HashSet<PublicKey>,
    /// The core's routing epoch when it last found no chain: asking again before it moves
    /// would find none again (see `PoolCore::routing_epoch`).
    pub tried: Option<u64>,
}

impl Session {
    /// Whether it holds a chain (running or failing over).
    pub fn running(&self) -> bool {
        matches!(self.state, State::Running | State::Stalled { .. })
    }
}

impl Sim {
    /// Sessions per minute at virtual time `t`: the scenario's rate on its daily curve.
    fn rate(&self, t: Micros) -> f64 {
        let l = &self.sc.load;
        let hour = l.start_hour + t as f64 / (3600.0 * SECOND as f64);
        let phase = 2.0 * std::f64::consts::PI * (hour - 18.0) / 24.0;
        l.sessions_per_minute * (1.0 + l.daily_swing * phase.cos())
    }

    /// Schedules the next candidate arrival (thinned to the daily curve on arrival).
    pub(crate) fn next_arrival(&mut self) {
        let peak = self.sc.load.sessions_per_minute * (1.0 + self.sc.load.daily_swing);
        if peak <= 0.0 {
            return;
        }
        let wait = self.load.exponential(60.0 / peak);
        self.q.at(self.now + secs(wait).max(1), Event::Arrive);
    }

    /// A candidate client arrives.
    pub(crate) fn arrive(&mut self) {
        let peak = self.sc.load.sessions_per_minute * (1.0 + self.sc.load.daily_swing);
        if self.load.chance(self.rate(self.now) / peak) {
            let l = &self.sc.load;
            let prompt = l.prompt_tokens.sample(&mut self.load).round().max(1.0);
            let output = l.output_tokens.sample(&mut self.load).round().max(1.0);
            self.new_session(prompt as u64, output as u64);
        }
        self.next_arrival();
    }

    /// A client arrives now with a prompt of `prompt` tokens, wanting `output`.
    pub(crate) fn new_session(&mut self, prompt: u64, output: u64) {
        self.sessions.push(Session {
            prompt,
            output,
            arrived: self.now,
            generated: 0.0,
            hops: Vec::new(),
            gen: 0,
            last: self.now,
            step_ms: 0.0,
            state: State::Waiting,
            avoid: HashSet::new(),
            tried: None,
        });
        self.start(self.sessions.len() - 1);
    }

    /// Session `s` asks the core for a chain; it waits a second between tries, up to the
    /// client's patience.
    pub(crate) fn start(&mut self, s: usize) {
        if self.sessions[s].state != State::Waiting {
            return;
        }
        let epoch = self.core.routing_epoch();
        let hops = if self.sessions[s].tried == Some(epoch) {
            None
        } else {
            let chain = self.decide("route", |c, now| c.chain(now.at));
            chain.ok().and_then(|spans| self.hops_of(&spans))
        };
        let Some(hops) = hops else {
            self.sessions[s].tried = Some(epoch);
            if self.now - self.sessions[s].arrived >= secs(self.sc.load.wait_s) {
                self.sessions[s].state = State::Failed;
                self.minute.served.failed += 1;
            } else {
                self.q.at(self.now + SECOND, Event::Retry { session: s });
            }
            return;
        };
        let prompt = self.sessions[s].prompt;
        let prefill = self.prefill_ms(&hops, prompt);
        self.take_hops(s, &hops);
        let session = &mut self.sessions[s];
        session.hops = hops;
        session.state = State::Running;
        session.last = self.now + secs(prefill / 1e3);
        self.minute.served.started += 1;
        self.schedule_progress(s);
    }

    /// Hops over `spans`, each picked for a check or not; `None` if a peer is unknown.
    fn hops_of(&mut self, spans: &[Span]) -> Option<Vec<Hop>> {
        let mut hops = Vec::with_capacity(spans.len());
        for span in spans {
            let peer = *self.by_key.get(&span.peer)?;
            let key = span.peer;
            let picked = self.decide("pick", |c, _| c.pick_for_check(&key));
            let wrong = self.wrong_job(peer);
            hops.push(Hop {
                peer,
                range: span.range,
                tokens: 0.0,
                picked,
                wrong,
            });
        }
        Some(hops)
    }

    /// Session `s` now runs on `hops`: the core counts their load, the machines know it.
    fn take_hops(&mut self, s: usize, hops: &[Hop]) {
        let keys: Vec<PublicKey> = hops.iter().map(|h| self.machines[h.peer].key).collect();
        self.core.load(&keys);
        for h in hops {
            self.machines[h.peer].sessions.insert(s);
        }
    }

    /// Milliseconds to run a prompt of `positions` positions through `hops`, in one step.
    fn prefill_ms(&self, hops: &[Hop], positions: u64) -> f64 {
        hops.iter()
            .map(|h| {
                let m = &self.machines[h.peer];
                let class = &self.sc.devices[m.class];
                let send = self.sc.model.hidden_kb * 8.0 * positions as f64 / m.uplink_mbps;
                m.rtt_ms
                    + send
                    + prefill_ms(class, self.sc.model.block_mb, h.range.len(), positions)
            })
            .sum()
    }

    /// Milliseconds to replay a session's journal through replacement `hops`: its prompt,
    /// then each of its `steps` decode steps one by one, as the pipeline replays them (a
    /// batched replay would round differently and change the text).
    fn replay_ms(&self, hops: &[Hop], prompt: u64, steps: u64) -> f64 {
        self.prefill_ms(hops, prompt) + steps as f64 * self.step_ms(hops)
    }

    /// Milliseconds one decode step takes through `hops` now.
    fn step_ms(&self, hops: &[Hop]) -> f64 {
        hops.iter().map(|h| self.hop_ms(h)).sum()
    }

    /// Milliseconds one hop's step takes now (its batch is every session it serves).
    fn hop_ms(&self, h: &Hop) -> f64 {
        let m = &self.machines[h.peer];
        let class = &self.sc.devices[m.class];
        let send = self.sc.model.hidden_kb * 8.0 / m.uplink_mbps;
        let batch = m.sessions.len().max(1);
        m.rtt_ms + send + decode_ms(class, self.sc.model.block_mb, h.range.len(), batch)
    }

    /// Schedules session `s`'s next count, at most [`PROGRESS_EVERY`] on.
    fn schedule_progress(&mut self, s: usize) {
        let step_ms = self.step_ms(&self.sessions[s].hops);
        let session = &mut self.sessions[s];
        session.step_ms = step_ms.max(1e-3);
        let left = (session.output as f64 - session.generated).max(0.0);
        let mut until = left * session.step_ms / 1e3;
        if let Some(c) = self.crashes.iter().find(|c| c.session == s) {
            // Counted again when its tokens reach the crash's.
            until = until.min((c.after - session.generated).max(0.0) * session.step_ms / 1e3);
        }
        let at = session.last.max(self.now) + secs(until).clamp(1, PROGRESS_EVERY);
        let gen = session.gen;
        self.q.at(at, Event::Progress { session: s, gen });
    }

    /// Counts session `s`'s tokens up to now.
    pub(crate) fn settle(&mut self, s: usize) {
        let session = &self.sessions[s];
        if session.state != State::Running || self.now <= session.last {
            return;
        }
        let dt_ms = (self.now - session.last) as f64 / 1e3;
        let left = (session.output as f64 - session.generated).max(0.0);
        let tokens = (dt_ms / session.step_ms).min(left);
        let step_ms = session.step_ms;
        for h in 0..self.sessions[s].hops.len() {
            let (peer, blocks) = {
                let hop = &self.sessions[s].hops[h];
                (hop.peer, hop.range.len())
            };
            let corrupts = self.machines[peer].corrupts;
            let per_token = self.sc.cheaters.unit == CorruptUnit::Token;
            if per_token && corrupts > 0.0 && self.sessions[s].hops[h].wrong.is_none() {
                let p = 1.0 - (1.0 - corrupts).powf(tokens);
                if self.cheat.chance(p) {
                    let id = self.wrong_answer(peer);
                    self.sessions[s].hops[h].wrong = Some(id);
                }
            }
            self.sessions[s].hops[h].tokens += tokens;
            let m = &mut self.machines[peer];
            m.credit += tokens * f64::from(blocks);
            m.served += tokens * f64::from(blocks);
        }
        let session = &mut self.sessions[s];
        session.generated += tokens;
        session.last = self.now;
        self.minute.served.tokens += tokens;
        self.observe(step_ms, tokens);
    }

    /// Session `s` has run to now.
    pub(crate) fn progress(&mut self, s: usize, gen: u32) {
        let session = &self.sessions[s];
        if session.gen != gen || session.state != State::Running {
            return;
        }
        self.settle(s);
        self.crash_due(s);
        let now = self.t().at;
        let hops: Vec<(PublicKey, f64)> = self.sessions[s]
            .hops
            .iter()
            .map(|h| (self.machines[h.peer].key, self.hop_ms(h) / 1e3))
            .collect();
        self.decide("measured", |c, _| {
            for (key, secs) in hops {
                c.measured(key, secs, 1, now);
            }
        });
        let session = &self.sessions[s];
        if session.generated + 1e-9 >= session.output as f64 {
            self.finish(s, State::Done);
        } else {
            self.schedule_progress(s);
        }
    }

    /// Crashes the machine of session `s`'s chain that the scenario crashes once the session
    /// has its tokens now, if any (for good: a node killed mid-stream).
    fn crash_due(&mut self, s: usize) {
        let generated = self.sessions[s].generated;
        let Some(at) = self
            .crashes
            .iter()
            .position(|c| c.session == s && generated + 1e-9 >= c.after)
        else {
            return;
        };
        let crash = self.crashes.remove(at);
        let Some(peer) = self.sessions[s].hops.get(crash.hop).map(|h| h.peer) else {
            return;
        };
        let inc = self.machines[peer].inc;
        self.q.at(
            self.now,
            Event::Off {
                peer,
                inc,
                crash: true,
                back: false,
            },
        );
        self.machines[peer].retired = true;
    }

    /// Session `s` ends as `state`: its hops are released and their picked work checked.
    fn finish(&mut self, s: usize, state: State) {
        self.settle(s);
        let hops = std::mem::take(&mut self.sessions[s].hops);
        self.release(s, hops, state == State::Done);
        self.sessions[s].state = state;
        self.sessions[s].gen += 1;
        match state {
            State::Done => self.minute.served.completed += 1,
            _ => self.minute.served.failed += 1,
        }
    }

    /// Session `s` leaves `hops`; with `check`, their picked work is checked.
    fn release(&mut self, s: usize, hops: Vec<Hop>, check: bool) {
        let keys: Vec<PublicKey> = hops.iter().map(|h| self.machines[h.peer].key).collect();
        self.core.unload(&keys);
        for h in hops {
            let m = &mut self.machines[h.peer];
            m.sessions.remove(&s);
            if h.tokens > 0.0 {
                m.jobs += 1;
            }
            if check && h.picked && h.tokens > 0.0 {
                self.check(&h);
            }
        }
    }

    /// Machine `peer` of session `s`'s chain is gone. After a crash the step in flight fails
    /// when its connection closes, `detect` on; after a goodbye (`None`) the step in flight
    /// is answered and the next one goes elsewhere.
    pub(crate) fn broken(&mut self, s: usize, peer: usize, detect: Option<Micros>) {
        self.settle(s);
        let step = secs(self.sessions[s].step_ms / 1e3);
        let session = &mut self.sessions[s];
        let since = match session.state {
            State::Running => self.now,
            State::Stalled { since } => since,
            _ => return,
        };
        if !session.hops.iter().any(|h| h.peer == peer) {
            return;
        }
        session.state = State::Stalled { since };
        session.gen += 1;
        let gen = session.gen;
        self.q.at(
            self.now + detect.unwrap_or(step),
            Event::Failover { session: s, gen },
        );
    }

    /// Session `s` fails over every hop whose peer is gone or excluded, as the pipeline
    /// does; it polls until [`FAILOVER_PATIENCE`] for replacements to load.
    pub(crate) fn failover(&mut self, s: usize, gen: u32) {
        let State::Stalled { since } = self.sessions[s].state else {
            return;
        };
        if self.sessions[s].gen != gen {
            return;
        }
        let mut replay = 0.0;
        let mut moved = Vec::new();
        loop {
            let at = self.t().at;
            let dead = self.sessions[s].hops.iter().position(|h| {
                let m = &self.machines[h.peer];
                !m.online || self.core.is_excluded(&m.key, at)
            });
            let Some(i) = dead else { break };
            let failed = self.machines[self.sessions[s].hops[i].peer].key;
            if !self.core.is_excluded(&failed, at) {
                self.decide("suspect", |c, now| {
                    c.suspect(&failed, "its step failed", now)
                });
            }
            if self.sessions[s].avoid.insert(failed) {
                self.sessions[s].tried = None;
            }
            if self.core.no_plan().is_some() {
                self.finish(s, State::Failed);
                return;
            }
            let n = self.sessions[s].hops.len();
            let mut offer = None;
            let epoch = self.core.routing_epoch();
            let windows = if self.sessions[s].tried == Some(epoch) {
                Vec::new()
            } else {
                windows_around(i, n)
            };
            for (lo, hi) in windows {
                let hops = &self.sessions[s].hops;
                let (a, b) = (hops[lo].range.start, hops[hi].range.end);
                let avoid = self.sessions[s].avoid.clone();
                let chain = self.decide("reroute", |c, now| c.route(a, b, &avoid, now.at));
                if let Some(hops) = chain.and_then(|spans| self.hops_of(&spans)) {
                    offer = Some((lo, hi, hops));
                    break;
                }
            }
            let Some((lo, hi, new)) = offer else {
                self.sessions[s].tried = Some(epoch);
                if self.now - since >= secs(FAILOVER_PATIENCE.as_secs_f64()) {
                    self.finish(s, State::Failed);
                } else {
                    let poll = secs(FAILOVER_POLL.as_secs_f64());
                    self.q
                        .at(self.now + poll, Event::Failover { session: s, gen });
                }
                return;
            };
            let session = &self.sessions[s];
            // The journal: the prompt's step, then one per token but the newest (whose step
            // failed, and is sent again after).
            let steps = (session.generated as u64).saturating_sub(1);
            replay += self.replay_ms(&new, session.prompt, steps);
            let spans: Vec<String> = new
                .iter()
                .map(|h| {
                    let key = self.machines[h.peer].key;
                    format!("{} {}..{}", key.peer_id(), h.range.start, h.range.end)
                })
                .collect();
            moved.push(format!(
                "blocks {a}..{b} from {} to {} (hops {lo}..={hi}, {steps} steps replayed)",
                failed.peer_id(),
                spans.join(", "),
                a = self.sessions[s].hops[lo].range.start,
                b = self.sessions[s].hops[hi].range.end,
            ));
            self.take_hops(s, &new);
            let old: Vec<Hop> = self.sessions[s].hops.splice(lo..=hi, new).collect();
            self.release(s, old, true);
        }
        let resume = self.now + secs(replay / 1e3);
        let stall = (resume - since) as f64 / SECOND as f64;
        self.stalls.push(stall);
        self.note(format!(
            "session {s} failed over: {}; stalled {stall:.3} s",
            moved.join("; ")
        ));
        self.minute.served.recovered += 1;
        let session = &mut self.sessions[s];
        session.state = State::Running;
        session.last = resume;
        let waited = session.step_ms + stall * 1e3;
        self.observe(waited, 1.0);
        self.schedule_progress(s);
    }
}
