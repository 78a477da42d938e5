//! The event queue: what happens next, in time order, ties broken by the order events were
//! scheduled in (so a run is the same every time).

use crate::clock::Micros;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Something that happens at a virtual time.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Peer `peer` comes online (a new incarnation of its node).
    On { peer: usize },
    /// Peer `peer`'s incarnation `inc` ends: a crash, or a goodbye; `back`: whether it
    /// comes online again after an off period.
    Off {
        peer: usize,
        inc: u32,
        crash: bool,
        back: bool,
    },
    /// An idle-only peer's owner comes back to the machine: it pauses.
    Pause { peer: usize, inc: u32 },
    /// Peer `peer`'s node sends its next advert.
    Advert { peer: usize, inc: u32 },
    /// The coordinator sees a crashed peer's connection close.
    Closed { peer: usize, inc: u32 },
    /// Peer `peer` finished loading what assignment `epoch` gave it.
    Loaded {
        peer: usize,
        inc: u32,
        assignment: potluck_protocol::messages::ShardAssignment,
    },
    /// A client arrives.
    Arrive,
    /// Session `session` asks for a chain again (none was ready).
    Retry { session: usize },
    /// Session `session` (generation `gen`) has run to now: count its tokens.
    Progress { session: usize, gen: u32 },
    /// Session `session`'s step through hop `hop` failed: fail over.
    Failover { session: usize, gen: u32 },
    /// A batch job is submitted.
    Job,
    /// Machine `peer` (incarnation `inc`) finished running work unit `unit`.
    UnitDone { unit: usize, peer: usize, inc: u32 },
    /// The coordinator's timers: silent peers, redials, pings, and the minute's figures.
    Tick,
    /// Scenario event `index` starts.
    Scheduled { index: usize },
}

#[derive(Debug)]
struct Entry {
    at: Micros,
    seq: u64,
    event: Event,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Events waiting to happen.
#[derive(Debug, Default)]
pub struct Queue {
    heap: BinaryHeap<Reverse<Entry>>,
    seq: u64,
}

impl Queue {
    /// Schedules `event` at `at`.
    pub fn at(&mut self, at: Micros, event: Event) {
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            at,
            seq: self.seq,
            event,
        }));
    }

    /// The next event, if it happens no later than `end`.
    pub fn next_before(&mut self, end: Micros) -> Option<(Micros, Event)> {
        if self.heap.peek().is_none_or(|e| e.0.at > end) {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| (e.at, e.event))
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}
