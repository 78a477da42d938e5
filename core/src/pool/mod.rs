//! The pool as a state machine: the coordinator's live view of its peers (verified adverts,
//! the plan, spans confirmed loaded, assignments in flight, exclusions, redials, measured
//! queues, reputation) and every decision made from it. Each entry point takes the time
//! ([`Now`]) and what happened; what to do about it (assign, say, resize, quarantine) comes
//! back as [`Action`]s from [`PoolCore::poll`], the way `quinn-proto` hands back transmits.
//! The daemon carries them out over the swarm; the simulator on a virtual clock.

mod action;
mod checking;
mod exclusion;
mod planning;
mod presence;
mod route_index;
mod routing;

pub use action::Action;
pub use exclusion::{
    Exclusion, ALIVE_WINDOW, ASSIGN_RETRY, BAN, LEAVE_BAN, QUARANTINE, SUSPECT_FOR,
};
pub use planning::{describe, DEFER_PLANS_ABOVE, DESCRIBED_SPANS, LARGE_PLAN_EVERY};
pub use routing::NotReady;

use crate::capacity::KvGeometry;
use crate::peer_table::PeerTable;
use crate::planner::{ModelShape, Plan, PlanPeer};
use crate::queue::StepTimes;
use crate::redial::Redials;
use crate::trust::Trust;
use potluck_protocol::messages::{LayerRange, ModelRef};
use potluck_protocol::signed::PublicKey;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;

/// The time as the core is told it: a monotonic instant for waits and backoffs, and unix
/// seconds for what adverts are dated in. The daemon passes the clock; the simulator its
/// virtual one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// For waits, backoffs and measurements.
    pub at: Instant,
    /// Unix seconds, for adverts.
    pub unix: u64,
}

/// The model the pool serves, as the core needs it: what nodes advertise and are assigned,
/// what plans size spans by, and what sizes the session count.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolModel {
    /// Name and digest.
    pub model: ModelRef,
    /// Geometry for the planner.
    pub shape: ModelShape,
    /// Memory geometry for the session count.
    pub kv: KvGeometry,
}

/// Whole-model work a peer has done for the pool since the coordinator started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkTally {
    /// Units (slices) whose results were accepted.
    pub units: u64,
    /// Texts they covered.
    pub items: u64,
    /// Tokens they took.
    pub tokens: u64,
}

/// Who may see the pool's text (first and last stages, whole work units): the daemon's
/// answer comes from certificates and `--trusted-peer`; everyone, unless told.
pub type SeesText = Box<dyn Fn(&PublicKey) -> bool + Send + Sync>;

/// The coordinator's pool and its decisions, with no I/O and no clock of its own.
pub struct PoolCore {
    model: PoolModel,
    /// Whether the session count follows the nodes' memory.
    auto_sessions: bool,
    table: PeerTable,
    plan: Option<Plan>,
    plan_error: Option<String>,
    /// The peers of the last re-plan that kept its plan as it was, and that plan: the
    /// planner is a function of its peers and the previous plan, so the same two give the
    /// same plan again, and a tick with nothing new need not plan a large pool again.
    settled: Option<(Vec<PlanPeer>, Plan)>,
    /// When the last plan was made (see [`planning::LARGE_PLAN_EVERY`]).
    planned_at: Option<Instant>,
    /// Whether a re-plan was put off (see [`DEFER_PLANS_ABOVE`]).
    replan_owed: bool,
    /// Counts changes of what decides whether a chain exists: the plan, confirmed spans,
    /// peers leaving the table (see [`PoolCore::routing_epoch`]).
    routing: u64,
    /// The plan's confirmed spans by range, for routing (see [`route_index`]).
    route_index: Option<route_index::RouteIndex>,
    /// Spans each peer confirmed it serves, on this coordinator's assignment: the only
    /// spans routed to, checked against or asked for second opinions.
    loaded: BTreeMap<PublicKey, LayerRange>,
    /// Spans peers' adverts say they hold that this coordinator has not assigned (a
    /// restarted coordinator's nodes, or a claim): a hint for its first plan, which then
    /// assigns them like any other span. A claim alone is never served from.
    claimed: BTreeMap<PublicKey, LayerRange>,
    /// Assignments in flight.
    pending: BTreeSet<PublicKey>,
    /// When failed assignments may be sent again.
    retry_at: HashMap<PublicKey, Instant>,
    /// Peers whose last assignment failed while no connection to them was open: tried
    /// again as soon as one opens (a node that joined through another node dials in).
    unconnected: HashSet<PublicKey>,
    /// Peers left out of plans until the given time, and why.
    banned: HashMap<PublicKey, (Instant, Exclusion)>,
    /// Peers whose connection closed at the given unix time: what their adverts from before
    /// then say they hold is not trusted (a restarted node has lost its layers).
    stale_since: BTreeMap<PublicKey, u64>,
    /// Unreachable peers being tried again.
    redials: Redials<PublicKey>,
    /// How far each peer is trusted, and the draws that pick its results for checks.
    trust: Trust<PublicKey>,
    /// Whole-model work each peer has done.
    work: HashMap<PublicKey, WorkTally>,
    /// How long decode steps took on each peer lately: its measured queue.
    step_times: StepTimes<PublicKey>,
    /// The fastest speed measured among the peers a plan may use, as of the last plan or
    /// a faster measurement since: what a peer's claim counts for at most.
    fastest: Option<f64>,
    /// Sessions each peer serves now (counted from routing to the session's end).
    busy: HashMap<PublicKey, usize>,
    /// When each peer's connection last answered a ping: the proof of life that adverts
    /// (which a busy node may send late) and step answers (behind a long queue) are not.
    pinged: HashMap<PublicKey, Instant>,
    sees_text: SeesText,
    out: Vec<Action>,
}

impl PoolCore {
    /// A pool of `table`'s peers serving `model`, trusting by `trust`; `auto_sessions`:
    /// the session count follows the nodes' memory ([`Action::Sessions`]).
    pub fn new(
        model: PoolModel,
        table: PeerTable,
        trust: Trust<PublicKey>,
        auto_sessions: bool,
    ) -> Self {
        Self {
            model,
            auto_sessions,
            plan: None,
            plan_error: None,
            settled: None,
            planned_at: None,
            replan_owed: false,
            routing: 0,
            route_index: None,
            loaded: BTreeMap::new(),
            claimed: BTreeMap::new(),
            pending: BTreeSet::new(),
            retry_at: HashMap::new(),
            unconnected: HashSet::new(),
            banned: HashMap::new(),
            stale_since: BTreeMap::new(),
            redials: Redials::new(),
            trust,
            work: HashMap::new(),
            step_times: StepTimes::with_max_peers(table.max_peers()),
            fastest: None,
            busy: HashMap::new(),
            pinged: HashMap::new(),
            sees_text: Box::new(|_| true),
            out: Vec::new(),
            table,
        }
    }

    /// Decides who may see text by `policy` from now on.
    pub fn set_sees_text(&mut self, policy: SeesText) {
        self.sees_text = policy;
    }

    /// Whether the peer with `key` may see the pool's text.
    pub fn may_see_text(&self, key: &PublicKey) -> bool {
        (self.sees_text)(key)
    }

    /// Whether the peer with `key` may be sent what runs on `range`: a first or last
    /// stage's inputs or outputs are the prompt's tokens and the text, so those go only to
    /// peers that may see text.
    pub fn may_serve(&self, key: &PublicKey, range: LayerRange) -> bool {
        let edge = range.start == 0 || range.end >= self.model.shape.layers;
        !edge || self.may_see_text(key)
    }

    /// What to do, in the order it was decided; taking it empties the list.
    pub fn poll(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    /// The served model.
    pub fn model(&self) -> &PoolModel {
        &self.model
    }

    /// Verified peers.
    pub fn table(&self) -> &PeerTable {
        &self.table
    }

    /// The peer table, to take adverts into (then tell [`PoolCore::admitted`] what it
    /// accepted), set round trips, or forget a peer that cannot be named.
    pub fn table_mut(&mut self) -> &mut PeerTable {
        &mut self.table
    }

    /// The current plan, if the pool can hold the model.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Why there is no plan.
    pub fn plan_error(&self) -> Option<&str> {
        self.plan_error.as_deref()
    }

    /// How far peers are trusted.
    pub fn trust(&self) -> &Trust<PublicKey> {
        &self.trust
    }

    /// Whole-model work `key` has done.
    pub fn work(&self, key: &PublicKey) -> WorkTally {
        self.work.get(key).copied().unwrap_or_default()
    }

    /// Counts a whole-model unit `key` did: `items` texts of `tokens` tokens.
    pub fn add_work(&mut self, key: PublicKey, items: u64, tokens: u64) {
        let tally = self.work.entry(key).or_default();
        tally.units += 1;
        tally.items += items;
        tally.tokens = tally.tokens.saturating_add(tokens);
    }

    /// Whether `key` is a peer of the table.
    pub fn knows(&self, key: &PublicKey) -> bool {
        self.table.get(key).is_some()
    }

    /// `key`'s confirmed span, whether an assignment to it is in flight, and why it is
    /// excluded at `now`, if it is.
    pub fn peer_status(
        &self,
        key: &PublicKey,
        now: Instant,
    ) -> (Option<LayerRange>, bool, Option<Exclusion>) {
        (
            self.loaded.get(key).copied(),
            self.pending.contains(key),
            self.exclusion(key, now),
        )
    }

    /// Why `key` is out of plans and routes at `now`, if it is.
    pub fn exclusion(&self, key: &PublicKey, now: Instant) -> Option<Exclusion> {
        self.banned
            .get(key)
            .filter(|(until, _)| *until > now)
            .map(|(_, why)| *why)
    }

    /// Whether `key` is out of plans and routes at `now`.
    pub fn is_excluded(&self, key: &PublicKey, now: Instant) -> bool {
        self.exclusion(key, now).is_some()
    }

    /// Peers that advertise `model` in their cache, are in good standing at `now` and may
    /// see text (a work unit is whole text), fastest first.
    pub fn holders(&self, model: &ModelRef, now: Instant) -> Vec<PublicKey> {
        let mut peers: Vec<_> = self
            .table
            .peers()
            .into_iter()
            .filter(|p| p.advert.models.contains(model) && !self.is_excluded(&p.key, now))
            .filter(|p| self.may_see_text(&p.key))
            .map(|p| (p.key, p.advert.gflops))
            .collect();
        peers.sort_by(|a, b| b.1.total_cmp(&a.1));
        peers.into_iter().map(|(key, _)| key).collect()
    }

    fn say(&mut self, kind: Option<&'static str>, line: String) {
        self.out.push(Action::Say { kind, line });
    }
}
