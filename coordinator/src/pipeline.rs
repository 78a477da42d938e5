//! One session's chain of stages across peers: a long-lived stream to each span's peer,
//! requests sent hop by hop from the coordinator (Petals' client-driven pipeline), every
//! result verified before its output moves on, and every stage's inputs and receipts kept
//! for replay and later checks.

mod error;
mod hop;
mod strict;

pub use error::PipelineError;
pub(crate) use hop::{check_hop, exchange, never_busy, open_stream, Hop};
pub use hop::{
    step_timeout, ChainModel, CheckJob, BUSY_PATIENCE, STEP_TIMEOUT, STEP_TIMEOUT_PER_POSITION,
};

use crate::audit::AuditLog;
use crate::metrics::Metrics;
use crate::planner::Span;
use crate::router::{windows_around, FAILOVER_PATIENCE, FAILOVER_POLL};
use libp2p::PeerId;
use potluck_engine::sampling::SamplingParams;
use potluck_net::streams::PoolStreams;
use potluck_protocol::messages::{
    ErrorCode, LayerRange, Receipt, SampleSpec, StageForward, StageInputWire, StageOutputWire,
    StageResult,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Top alternatives every last stage reports with its token, for spot checks.
pub const CHECK_TOP_LOGPROBS: u32 = 5;

/// Times a hop's stream is reopened (and its journal replayed) after it breaks.
pub const STREAM_RETRIES: u32 = 3;
/// Wait before the first reopening; it doubles with each further attempt.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);
/// How long a step waits, in total, on a node whose caches are full before giving up.
pub const OVERLOAD_PATIENCE: Duration = Duration::from_secs(60);

/// What others may see of a running session, and the switch that ends it.
#[derive(Debug, Default)]
pub struct SessionHandle {
    /// Tokens sampled so far.
    pub tokens: AtomicU64,
    /// Set to end the session before its next step.
    pub cancelled: AtomicBool,
    /// The chain serving it now, (peer id, blocks) per hop: what it opened on, then each
    /// failover's replacement.
    pub chain: std::sync::Mutex<Vec<(String, LayerRange)>>,
}

impl SessionHandle {
    /// The chain serving the session now.
    pub fn chain(&self) -> Vec<(String, LayerRange)> {
        self.chain.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What a pipeline asks of its pool when a hop fails or is slow: where else its blocks are,
/// and whom to stop counting on.
pub trait Reroute: Send + Sync {
    /// Loaded spans covering blocks `start..end` as a chain, avoiding `avoid`: `Ok(None)`
    /// while the pool is still loading a replacement, `Err(why)` when no plan can cover the
    /// blocks now (waiting would be a hang).
    fn reroute(
        &self,
        start: u32,
        end: u32,
        avoid: &HashSet<PeerId>,
    ) -> Result<Option<Vec<(Span, PeerId)>>, String>;
    /// Whether `peer` is out of plans and routes now (leaving, failed or dropped), so
    /// sessions should move off it before their next step.
    fn excluded(&self, peer: PeerId) -> bool;
    /// Reports that `peer` failed a step, so plans and routes stop counting on it.
    fn failed(&self, peer: PeerId, why: &PipelineError);
    /// Whether `peer` is busy rather than gone or stalling: its connection answered a ping
    /// and it answered some session's step lately, so a late answer is worth waiting for.
    fn busy(&self, _peer: PeerId) -> bool {
        false
    }
    /// Reports that a step of `positions` input positions on `peer` took `secs`, queue and
    /// compute and round trip, as this session saw it.
    fn measured(&self, _peer: PeerId, _secs: f64, _positions: usize) {}
}

/// What a pipeline asks of its pool to check its hops' work: whether a job is picked, where
/// to send it, and strict mode's second and third opinions.
pub trait Checks: Send + Sync {
    /// Whether `peer`'s work in a session (its job), which just started, is to be
    /// spot-checked.
    fn pick(&self, _peer: PeerId) -> bool {
        false
    }
    /// Takes picked results to check beside generation (the session does not wait).
    fn check_later(&self, _job: CheckJob) {}
    /// Whether `peer` failed a spot check: what it fed downstream is suspect too.
    fn quarantined(&self, _peer: PeerId) -> bool {
        false
    }
    /// A loaded span of exactly `range` on a peer other than `not` (strict mode's second
    /// opinion).
    fn twin(&self, _range: LayerRange, _not: &[PeerId]) -> Option<(Span, PeerId)> {
        None
    }
    /// A loaded span of exactly `range` on a peer other than `not` fit to settle a dispute
    /// between `disputants` (strict mode's third opinion): by the rules of spot checks'
    /// third opinions.
    fn decider(
        &self,
        _range: LayerRange,
        _not: &[PeerId],
        _disputants: &[PeerId],
    ) -> Option<(Span, PeerId)> {
        None
    }
    /// Reports that two other peers agreed against `peer`'s result.
    fn disputed(&self, _peer: PeerId, _why: &str) {}
}

/// A pool a session runs in: it reroutes and it checks.
pub trait SessionPool: Reroute + Checks {}

impl<T: Reroute + Checks> SessionPool for T {}

/// A hop with a fresh stream for each span of `chain`, in order.
async fn open_hops(
    control: &mut PoolStreams,
    chain: Vec<(Span, PeerId)>,
) -> Result<Vec<Hop>, PipelineError> {
    let mut hops = Vec::with_capacity(chain.len());
    for (span, peer) in chain {
        hops.push(Hop {
            span,
            peer,
            label: peer.to_string(),
            stream: open_stream(control, peer).await?,
            journal: Vec::new(),
            picked: Vec::new(),
            checked: None,
            twin: None,
        });
    }
    Ok(hops)
}

/// Shows `hops` as the chain serving the session of `handle`.
fn publish_chain(handle: &SessionHandle, hops: &[Hop]) {
    let chain = hops
        .iter()
        .map(|h| (h.label.clone(), h.span.range))
        .collect();
    *handle.chain.lock().unwrap_or_else(|p| p.into_inner()) = chain;
}

/// Everything a session's pipeline needs besides its chain.
pub struct SessionContext {
    /// The session's id (echoed in receipts).
    pub session: u64,
    /// The model's identity and geometry.
    pub model: ChainModel,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Where steps, checks and failovers are counted.
    pub metrics: Arc<Metrics>,
    /// Live counters and the cancel switch.
    pub handle: Arc<SessionHandle>,
    /// The pool to ask for replacements when a hop fails and to check hops' work (none:
    /// fail instead, check nothing).
    pub pool: Option<Arc<dyn SessionPool>>,
    /// Where every verdict on a stage result is recorded (none: nowhere).
    pub audit: Option<AuditLog>,
    /// Dropped when the session ends: whatever the pool counts for it.
    pub guard: Option<Box<dyn Send + Sync>>,
    /// Every hop on two peers, a step going on only when they agree.
    pub strict: bool,
}

/// A session's pipeline across peers.
pub struct RemotePipeline {
    control: PoolStreams,
    hops: Vec<Hop>,
    session: u64,
    step: u64,
    model: ChainModel,
    sampling: SamplingParams,
    receipts: Vec<Receipt>,
    metrics: Arc<Metrics>,
    handle: Arc<SessionHandle>,
    pool: Option<Arc<dyn SessionPool>>,
    audit: Option<AuditLog>,
    avoid: HashSet<PeerId>,
    _guard: Option<Box<dyn Send + Sync>>,
    strict: bool,
}

impl RemotePipeline {
    /// Opens a stream to every span of `chain` (with its peer id), in order.
    pub async fn open(
        control: &mut PoolStreams,
        chain: Vec<(Span, PeerId)>,
        ctx: SessionContext,
    ) -> Result<Self, PipelineError> {
        let SessionContext {
            session,
            model,
            sampling,
            metrics,
            handle,
            pool,
            audit,
            guard,
            strict,
        } = ctx;
        let hops = open_hops(control, chain).await?;
        publish_chain(&handle, &hops);
        Ok(Self {
            control: control.clone(),
            hops,
            session,
            step: 0,
            model,
            sampling,
            receipts: Vec::new(),
            metrics,
            handle,
            pool,
            audit,
            avoid: HashSet::new(),
            _guard: guard,
            strict,
        })
    }

    /// Every verified receipt so far, hop by hop and step by step.
    pub fn receipts(&self) -> &[Receipt] {
        &self.receipts
    }

    /// The requests each hop was sent, first hop first.
    pub fn journals(&self) -> Vec<&[StageForward]> {
        self.hops.iter().map(|h| h.journal.as_slice()).collect()
    }

    /// How the last stage should pick this step's token.
    fn sample_spec(&self, history: &[u32]) -> SampleSpec {
        let p = &self.sampling;
        SampleSpec {
            temperature: p.temperature,
            top_k: p.top_k as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            // A fresh draw per step, reproducible from the session's seed.
            seed: p.seed ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            // Spot checks compare the alternatives too.
            top_logprobs: CHECK_TOP_LOGPROBS,
            history: if p.repetition_penalty == 1.0 {
                Vec::new()
            } else {
                history[history.len().saturating_sub(p.penalty_window)..].to_vec()
            },
        }
    }

    /// Runs one step through every hop and returns the sampled token. A hop that fails is
    /// replaced (see [`RemotePipeline::failover`]) and the step goes on from that hop.
    pub async fn step(
        &mut self,
        pos: usize,
        tokens: &[u32],
        history: &[u32],
    ) -> Result<u32, PipelineError> {
        if self.handle.cancelled.load(Ordering::Relaxed) {
            return Err(PipelineError::Cancelled);
        }
        let started = Instant::now();
        let sample = self.sample_spec(history);
        let timeout = step_timeout(tokens.len());
        // Move off peers that are leaving (or were dropped) before they are gone.
        if let Some(reroute) = self.pool.clone() {
            let mut i = 0;
            while i < self.hops.len() {
                let peer = self.hops[i].peer;
                if reroute.excluded(peer) {
                    // A cheat's outputs went into the caches of every hop after it: those
                    // hops are rebuilt too, from its honest inputs.
                    let (through, reason) = if reroute.quarantined(peer) {
                        (self.hops.len() - 1, "quarantined")
                    } else {
                        (i, "leaving the pool")
                    };
                    let cause = PipelineError::Stage {
                        peer,
                        reason: reason.into(),
                    };
                    // Nothing of this step has run yet: the input stays the step's own.
                    let (resume, _) = self.failover(i, cause, timeout, through).await?;
                    i = resume;
                }
                i += 1;
            }
        }
        let mut input = StageInputWire::Tokens(tokens.to_vec());
        let mut i = 0;
        while i < self.hops.len() {
            let last = i + 1 == self.hops.len();
            let req = StageForward {
                session: self.session,
                step: self.step,
                position: pos as u32,
                input: input.clone(),
                sample: last.then(|| sample.clone()),
            };
            let hop_started = Instant::now();
            let answer = if self.strict {
                self.call_strict(i, &req, timeout).await
            } else {
                self.call(i, &req, timeout).await
            };
            let result = match answer {
                Ok(r) => r,
                Err(e) => {
                    if matches!(e, PipelineError::Rejected { .. }) {
                        self.metrics.check("rejected");
                    }
                    if !e.worth_failing_over() {
                        return Err(e);
                    }
                    let (resume, resent) = self.failover(i, e, timeout, i).await?;
                    if let Some(earlier) = resent {
                        input = earlier;
                    }
                    i = resume;
                    continue;
                }
            };
            self.metrics.check("verified");
            let hop_secs = hop_started.elapsed().as_secs_f64();
            if let Some(r) = &self.pool {
                r.measured(self.hops[i].peer, hop_secs, req.input.positions());
            }
            // Strict mode compares every result already.
            let reroute = self.pool.clone().filter(|_| !self.strict);
            let hop = &mut self.hops[i];
            self.metrics.stage(&hop.label, hop_secs);
            hop.journal.push(req);
            // A hop's work in a session is one job: checked whole, or not at all.
            let peer = hop.peer;
            if *hop
                .checked
                .get_or_insert_with(|| reroute.is_some_and(|r| r.pick(peer)))
            {
                hop.picked.push((*result).clone());
            }
            let StageResult {
                output, receipt, ..
            } = *result;
            self.receipts.push(receipt);
            match output {
                StageOutputWire::Hidden(h) => {
                    input = StageInputWire::Hidden(h);
                    i += 1;
                }
                StageOutputWire::Token { token, .. } => {
                    if self.step > 0 {
                        self.metrics
                            .time_per_token
                            .observe(started.elapsed().as_secs_f64());
                    }
                    self.step += 1;
                    self.metrics.token();
                    self.handle.tokens.fetch_add(1, Ordering::Relaxed);
                    return Ok(token);
                }
            }
        }
        Err(PipelineError::NoToken)
    }

    /// Whether a late hop is worth waiting for: the session is still wanted and its peer
    /// is busy, not gone (see [`Reroute::busy`]).
    fn patience(&self) -> impl Fn(PeerId) -> bool + Sync + 'static {
        let (reroute, handle) = (self.pool.clone(), self.handle.clone());
        move |peer| {
            !handle.cancelled.load(Ordering::Relaxed)
                && reroute.as_ref().is_some_and(|r| r.busy(peer))
        }
    }

    /// Sends `req` to hop `i` and returns its verified result. A broken stream, or a node
    /// that no longer has the session (its cache was evicted, or it restarted), is reopened
    /// and the hop's journal replayed (rebuilding the session's cache there) before `req` is
    /// sent again, up to [`STREAM_RETRIES`] times. A node whose caches are full is waited
    /// for, up to [`OVERLOAD_PATIENCE`].
    async fn call(
        &mut self,
        i: usize,
        req: &StageForward,
        timeout: Duration,
    ) -> Result<Box<StageResult>, PipelineError> {
        let mut attempt = 0;
        let mut waited = Duration::ZERO;
        let mut wait = Duration::from_millis(20);
        let last = i + 1 == self.hops.len();
        let busy = self.patience();
        loop {
            let answer = exchange(&mut self.hops[i], req, timeout, &busy).await;
            match answer {
                // Full caches free up as other sessions end: wait our turn.
                Err(PipelineError::Refused {
                    code: ErrorCode::Overloaded,
                    ..
                }) if waited < OVERLOAD_PATIENCE => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                    wait = (wait * 2).min(Duration::from_millis(500));
                }
                Err(
                    e @ (PipelineError::Stage { .. }
                    | PipelineError::Refused {
                        code: ErrorCode::UnknownSession,
                        ..
                    }),
                ) if attempt < STREAM_RETRIES => {
                    attempt += 1;
                    tracing::debug!(attempt, "{e}; reopening and replaying");
                    tokio::time::sleep(RETRY_BACKOFF * 2u32.pow(attempt - 1)).await;
                    // The same span on the same peer, replayed like any replacement.
                    let same = vec![(self.hops[i].span.clone(), self.hops[i].peer)];
                    let journal = self.hops[i].journal.clone();
                    match self.replacement(same, &journal, last, timeout).await {
                        Ok(mut fresh) => {
                            if let Some(hop) = fresh.pop() {
                                let old = std::mem::replace(&mut self.hops[i], hop);
                                self.retire(old);
                            }
                        }
                        // A node takes one incoming stream at a time off its connection
                        // and drops (resets) one that arrives while it is still taking the
                        // last: under a burst of sessions the reopened stream can go the
                        // same way. The old hop fails again at once and counts an attempt.
                        Err(PipelineError::Stage { .. }) if attempt < STREAM_RETRIES => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
                Ok(result) => {
                    check_hop(
                        &self.model,
                        self.audit.as_ref(),
                        &self.hops[i],
                        last,
                        req,
                        &result,
                    )?;
                    return Ok(result);
                }
            }
        }
    }

    /// Replaces hop `i`, which failed with `cause`, by spans of other peers: a replica of its
    /// blocks at once, or whatever the pool re-plans and loads within [`FAILOVER_PATIENCE`].
    /// A re-plan may cut the blocks differently, so the smallest run of hops around `i` (and
    /// reaching at least hop `through`) that the pool can cover is replaced. The first
    /// replaced hop's journal (its inputs before this step) is replayed through the
    /// replacement, which rebuilds the session's caches there. Returns where the step goes on: the first replaced hop, and the input it was
    /// sent this step when that is not hop `i`.
    async fn failover(
        &mut self,
        i: usize,
        cause: PipelineError,
        timeout: Duration,
        through: usize,
    ) -> Result<(usize, Option<StageInputWire>), PipelineError> {
        let Some(reroute) = self.pool.clone() else {
            return Err(cause);
        };
        let failed = cause.peer().unwrap_or(self.hops[i].peer);
        // A node re-planned onto other blocks is healthy: only its old span is gone, and
        // the pool no longer offers it.
        let reassigned = matches!(
            cause,
            PipelineError::Refused {
                code: ErrorCode::NotServing,
                ..
            }
        );
        if !reassigned {
            if !reroute.excluded(failed) {
                reroute.failed(failed, &cause);
            }
            self.avoid.insert(failed);
        }
        let failed_range = self.hops[i].span.range;
        let no_replacement = |why: String| PipelineError::NoReplacement {
            start: failed_range.start,
            end: failed_range.end,
            why,
            cause: cause.to_string(),
        };
        let started = Instant::now();
        loop {
            if self.handle.cancelled.load(Ordering::Relaxed) {
                return Err(PipelineError::Cancelled);
            }
            let mut offer = None;
            for (lo, hi) in windows_around(i, self.hops.len()) {
                if hi < through {
                    continue;
                }
                let (a, b) = (self.hops[lo].span.range.start, self.hops[hi].span.range.end);
                if let Some(chain) = reroute
                    .reroute(a, b, &self.avoid)
                    .map_err(&no_replacement)?
                {
                    offer = Some((lo, hi, chain));
                    break;
                }
            }
            if let Some((lo, hi, chain)) = offer {
                // Requests of this step already answered by hop `lo` are sent again after.
                let (history, now): (Vec<StageForward>, Vec<StageForward>) = self.hops[lo]
                    .journal
                    .iter()
                    .cloned()
                    .partition(|r| r.step < self.step);
                let was_last = hi + 1 == self.hops.len();
                match self.replacement(chain, &history, was_last, timeout).await {
                    Ok(hops) => {
                        let took = started.elapsed();
                        tracing::info!(
                            session = self.session,
                            %failed,
                            start = self.hops[lo].span.range.start,
                            end = self.hops[hi].span.range.end,
                            replayed = history.len(),
                            ?took,
                            "failed over: {cause}"
                        );
                        self.metrics.failover(took.as_secs_f64());
                        let old: Vec<Hop> = self.hops.splice(lo..=hi, hops).collect();
                        publish_chain(&self.handle, &self.hops);
                        for hop in old {
                            self.retire(hop);
                        }
                        let resume = (lo < i).then(|| now.into_iter().next().map(|r| r.input));
                        return Ok((lo, resume.flatten()));
                    }
                    Err(e) => {
                        if let Some(peer) = e.peer() {
                            reroute.failed(peer, &e);
                            self.avoid.insert(peer);
                        }
                        continue;
                    }
                }
            }
            if started.elapsed() >= FAILOVER_PATIENCE {
                return Err(no_replacement(format!(
                    "none loaded within {FAILOVER_PATIENCE:?}"
                )));
            }
            tokio::time::sleep(FAILOVER_POLL).await;
        }
    }

    /// Opens `chain` and replays `journal` (the requests a failed hop was sent) through it;
    /// `was_last`: the failed hop ended the model. Also reopens a hop on its own peer.
    async fn replacement(
        &mut self,
        chain: Vec<(Span, PeerId)>,
        journal: &[StageForward],
        was_last: bool,
        timeout: Duration,
    ) -> Result<Vec<Hop>, PipelineError> {
        let mut hops = open_hops(&mut self.control, chain).await?;
        let n = hops.len();
        let busy = self.patience();
        // Step by step, as the failed hop got them: the rebuilt cache is then bit for bit
        // what the failed node held (a batched replay rounds differently), and the text
        // goes on exactly as it would have.
        for old in journal {
            let mut input = old.input.clone();
            for (j, hop) in hops.iter_mut().enumerate() {
                let last = was_last && j + 1 == n;
                let req = StageForward {
                    session: old.session,
                    step: old.step,
                    position: old.position,
                    input,
                    sample: if last { old.sample.clone() } else { None },
                };
                let result = exchange(hop, &req, timeout, &busy).await?;
                check_hop(&self.model, self.audit.as_ref(), hop, last, &req, &result)?;
                hop.journal.push(req);
                input = match result.output {
                    StageOutputWire::Hidden(h) => StageInputWire::Hidden(h),
                    // Only the model's last block samples, and nothing follows it.
                    StageOutputWire::Token { .. } => break,
                };
            }
        }
        Ok(hops)
    }

    /// Hands a hop that leaves the chain over for its picked results to be checked.
    fn retire(&self, hop: Hop) {
        let (Some(reroute), Some(last_pick)) = (&self.pool, hop.picked.last()) else {
            return;
        };
        let upto = hop
            .journal
            .iter()
            .position(|r| r.step == last_pick.step)
            .map_or(hop.journal.len(), |i| i + 1);
        let mut journal = hop.journal;
        journal.truncate(upto);
        reroute.check_later(CheckJob {
            last: matches!(last_pick.output, StageOutputWire::Token { .. }),
            span: hop.span,
            peer: hop.peer,
            journal,
            picked: hop.picked,
        });
    }

    /// The model's context window, in positions.
    pub fn context(&self) -> usize {
        self.model.context
    }

    /// Ends the session: closes every stream so each node frees the session's cache, and
    /// hands picked results over for checking.
    pub async fn close(mut self) {
        use futures::AsyncWriteExt;
        for hop in &mut self.hops {
            let _ = hop.stream.close().await;
        }
        for hop in std::mem::take(&mut self.hops) {
            self.retire(hop);
        }
    }
}
