//! The stage scheduler. Every session's steps for the loaded stage go into one queue; one
//! worker thread owns the stage and, whenever it is free, takes every ready step up to a
//! token budget and runs them as one batch: one pass over the weights serves all of them.
//! Decode steps go first; prefills fill the rest of the budget a chunk at a time, oldest
//! first, so a long prompt delays other sessions' next tokens by one chunk at most and no
//! session starves. A step whose client is gone is dropped at the next chunk boundary. The
//! network side never waits on compute: it hands steps over and awaits their answers.

use crate::shard::{ShardServer, Step};
use crate::wire::wire_error;
use potluck_protocol::messages::{ErrorCode, StageForward, StageResult, WireError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How much work one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Positions (decode tokens plus prefill chunk rows) in one batch.
    pub max_tokens: usize,
    /// Sessions in one batch.
    pub max_sessions: usize,
}

impl BatchLimits {
    /// The default budget: on a CPU, rows past a few hundred no longer make a pass cheaper
    /// per row, and a bigger chunk only delays the decode steps waiting beside it.
    pub const DEFAULT: BatchLimits = BatchLimits {
        max_tokens: 256,
        max_sessions: 64,
    };
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Longest the worker holds a batch back for sessions it just answered (see
/// [`Worker::gather`]).
const GATHER_MAX: Duration = Duration::from_millis(3);
/// Gathering pays only while sessions come back within this share of a batch's time.
const GATHER_SHARE: f64 = 0.25;
/// Sessions whose return the worker times at most; past it the oldest are forgotten.
const RETURNS_TRACKED: usize = 4096;

/// Rows-per-batch histogram buckets: 1, 2, 3-4, 5-8, ..., 257 and more.
pub const ROW_BUCKETS: usize = 10;

/// What the scheduler has done, for `potluck node status`, bench and tests.
#[derive(Debug)]
pub struct BatchStats {
    /// When the stage started serving.
    pub since: Instant,
    /// Batches run.
    pub batches: AtomicU64,
    /// Rows run, over all batches.
    pub rows: AtomicU64,
    /// Steps (requests) finished.
    pub steps: AtomicU64,
    /// Microseconds steps waited before their first rows ran, summed.
    pub queue_wait_us: AtomicU64,
    /// Microseconds the stage spent computing.
    pub busy_us: AtomicU64,
    /// Microseconds batches were held back for sessions about to return, summed.
    pub gather_us: AtomicU64,
    /// Batches by rows: bucket b holds batches of 2^(b-1)+1 ..= 2^b rows.
    pub row_histogram: [AtomicU64; ROW_BUCKETS],
}

/// Batches and rows run by every stage of this process, for benches that run a pool here.
static PROCESS_BATCHES: AtomicU64 = AtomicU64::new(0);
static PROCESS_ROWS: AtomicU64 = AtomicU64::new(0);

/// (batches, rows) run by every stage queue of this process so far.
pub fn process_totals() -> (u64, u64) {
    (
        PROCESS_BATCHES.load(Ordering::Relaxed),
        PROCESS_ROWS.load(Ordering::Relaxed),
    )
}

impl BatchStats {
    fn record(&self, rows: usize, busy_us: u64) {
        PROCESS_BATCHES.fetch_add(1, Ordering::Relaxed);
        PROCESS_ROWS.fetch_add(rows as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.busy_us.fetch_add(busy_us, Ordering::Relaxed);
        let bucket = (usize::BITS - rows.saturating_sub(1).leading_zeros()) as usize;
        if let Some(b) = self.row_histogram.get(bucket.min(ROW_BUCKETS - 1)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn new() -> Self {
        Self {
            since: Instant::now(),
            batches: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            queue_wait_us: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            gather_us: AtomicU64::new(0),
            row_histogram: Default::default(),
        }
    }

    /// Mean rows per batch so far.
    pub fn mean_rows(&self) -> f64 {
        let b = self.batches.load(Ordering::Relaxed);
        self.rows.load(Ordering::Relaxed) as f64 / b.max(1) as f64
    }

    /// The counters as `potluck node status` shows them: batches, mean rows, the rows
    /// histogram, mean queue wait and the share of time the stage computed.
    pub fn summary(&self) -> serde_json::Value {
        let steps = self.steps.load(Ordering::Relaxed).max(1);
        let busy = self.busy_us.load(Ordering::Relaxed) as f64 / 1e6;
        let histogram: Vec<u64> = self
            .row_histogram
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        serde_json::json!({
            "batches": self.batches.load(Ordering::Relaxed),
            "mean_rows": self.mean_rows(),
            "rows_histogram": histogram,
            "mean_queue_wait_ms": self.queue_wait_us.load(Ordering::Relaxed) as f64 / 1e3 / steps as f64,
            "busy_share": busy / self.since.elapsed().as_secs_f64().max(1e-9),
            "gather_ms": self.gather_us.load(Ordering::Relaxed) as f64 / 1e3,
        })
    }
}

/// A step handed to the worker, with where its answer goes.
struct Job {
    step: Step,
    reply: oneshot::Sender<Result<StageResult, WireError>>,
    cancel: Arc<AtomicBool>,
    queued: Instant,
    started: bool,
}

/// A request as the network side hands it over.
struct Request {
    cache: u64,
    req: StageForward,
    reply: oneshot::Sender<Result<StageResult, WireError>>,
    cancel: Arc<AtomicBool>,
    queued: Instant,
}

enum Msg {
    Step(Request),
    End(u64),
}

/// The queue in front of one loaded stage. Dropping every handle stops its worker and frees
/// the stage.
pub struct StageQueue {
    tx: mpsc::Sender<Msg>,
    stats: Arc<BatchStats>,
}

impl StageQueue {
    /// Starts the worker thread that owns `server`.
    pub fn start(server: ShardServer, limits: BatchLimits) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(BatchStats::new());
        let worker = Worker {
            server,
            limits,
            waiting: Vec::new(),
            stats: stats.clone(),
            answered: HashMap::new(),
            last_batch: Vec::new(),
            return_secs: None,
            batch_secs: 0.0,
        };
        std::thread::Builder::new()
            .name("potluck-stage".into())
            .spawn(move || worker.run(rx))?;
        Ok(Self { tx, stats })
    }

    /// The scheduler's counters.
    pub fn stats(&self) -> Arc<BatchStats> {
        self.stats.clone()
    }

    /// Queues `req` for session cache `cache`; the answer comes when its batch has run (a
    /// bad request is answered at once with its error). Setting `cancel` drops it at the next
    /// chunk boundary.
    pub fn submit(
        &self,
        cache: u64,
        req: StageForward,
        cancel: Arc<AtomicBool>,
    ) -> oneshot::Receiver<Result<StageResult, WireError>> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            cache,
            req,
            reply,
            cancel,
            queued: Instant::now(),
        };
        if let Err(mpsc::SendError(Msg::Step(r))) = self.tx.send(Msg::Step(request)) {
            let _ = r.reply.send(Err(wire_error(
                ErrorCode::Internal,
                "the stage has stopped",
            )));
        }
        answer
    }

    /// Frees a session's cache once its stream has ended.
    pub fn end_session(&self, cache: u64) {
        let _ = self.tx.send(Msg::End(cache));
    }
}

struct Worker {
    server: ShardServer,
    limits: BatchLimits,
    waiting: Vec<Job>,
    stats: Arc<BatchStats>,
    /// When each session's last step was answered, until its next step arrives.
    answered: HashMap<u64, Instant>,
    /// Sessions the last batch answered.
    last_batch: Vec<u64>,
    /// How long answered sessions take to send their next step (moving average).
    return_secs: Option<f64>,
    /// How long batches take to run (moving average).
    batch_secs: f64,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            if self.waiting.is_empty() {
                match rx.recv() {
                    Ok(m) => self.take(m),
                    Err(_) => return,
                }
            }
            while let Ok(m) = rx.try_recv() {
                self.take(m);
            }
            if !self.gather(&rx) {
                return;
            }
            self.waiting.retain(|j| !j.cancel.load(Ordering::Relaxed));
            if !self.waiting.is_empty() {
                self.run_batch();
            }
        }
    }

    /// Holds the next batch back, briefly, for the sessions the last batch answered. Without
    /// it, sessions split into cohorts: while one batch runs, the others' steps arrive and
    /// form the next batch, and the two alternate at half the rows each, paying for two
    /// passes over the weights. Waiting pays only where sessions come back quickly compared
    /// with a batch (one node serving the whole model); where they come back only after
    /// other stages have run (a pipeline), waiting would just idle the stage, and it does
    /// not. Returns false when the queue has closed.
    fn gather(&mut self, rx: &mpsc::Receiver<Msg>) -> bool {
        let Some(back) = self.return_secs else {
            return true;
        };
        if back > self.batch_secs * GATHER_SHARE {
            return true;
        }
        let window = Duration::from_secs_f64(back * 2.0).min(GATHER_MAX);
        let started = Instant::now();
        let deadline = started + window;
        while self
            .last_batch
            .iter()
            .any(|c| self.answered.contains_key(c))
        {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match rx.recv_timeout(left) {
                Ok(m) => self.take(m),
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        self.stats
            .gather_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        true
    }

    fn take(&mut self, m: Msg) {
        if let Msg::Step(r) = &m {
            if let Some(at) = self.answered.remove(&r.cache) {
                let secs = at.elapsed().as_secs_f64();
                let avg = self.return_secs.map_or(secs, |a| a + 0.2 * (secs - a));
                self.return_secs = Some(avg);
            }
        }
        match m {
            Msg::Step(r) => match self.server.prepare(r.cache, r.req) {
                Ok(step) => self.waiting.push(Job {
                    step,
                    reply: r.reply,
                    cancel: r.cancel,
                    queued: r.queued,
                    started: false,
                }),
                Err(e) => {
                    let _ = r.reply.send(Err(e));
                }
            },
            Msg::End(cache) => {
                self.answered.remove(&cache);
                self.waiting.retain(|j| j.step.cache() != cache);
                self.server.end_session(cache);
            }
        }
    }

    /// Picks this batch: (index into `waiting`, rows to run).
    fn pick(&self) -> Vec<(usize, usize)> {
        let BatchLimits {
            max_tokens,
            max_sessions,
        } = self.limits;
        let (max_tokens, max_sessions) = (max_tokens.max(1), max_sessions.max(1));
        let prefill_waits = self.waiting.iter().any(|j| !j.step.is_decode());
        // Decode steps never take the whole budget, nor every session slot, while a prefill
        // waits: the oldest prefill always moves on by a chunk.
        let (decode_budget, decode_sessions) = if prefill_waits {
            (max_tokens - (max_tokens / 4).max(1), max_sessions - 1)
        } else {
            (max_tokens, max_sessions)
        };
        let mut picked = Vec::new();
        let mut rows = 0;
        for (i, j) in self.waiting.iter().enumerate() {
            if picked.len() >= decode_sessions || rows >= decode_budget {
                break;
            }
            if j.step.is_decode() {
                picked.push((i, 1));
                rows += 1;
            }
        }
        for (i, j) in self.waiting.iter().enumerate() {
            if picked.len() >= max_sessions || rows >= max_tokens {
                break;
            }
            if !j.step.is_decode() {
                let take = j.step.remaining().min(max_tokens - rows);
                picked.push((i, take));
                rows += take;
            }
        }
        picked
    }

    fn run_batch(&mut self) {
        let picked = self.pick();
        let rows: usize = picked.iter().map(|(_, t)| t).sum();
        let now = Instant::now();
        let mut slots: Vec<Option<&mut Job>> = self.waiting.iter_mut().map(Some).collect();
        let mut jobs: Vec<&mut Job> = Vec::with_capacity(picked.len());
        for (i, _) in &picked {
            if let Some(j) = slots.get_mut(*i).and_then(Option::take) {
                if !j.started {
                    j.started = true;
                    let waited = now.duration_since(j.queued).as_micros() as u64;
                    self.stats
                        .queue_wait_us
                        .fetch_add(waited, Ordering::Relaxed);
                }
                jobs.push(j);
            }
        }
        let mut batch: Vec<(&mut Step, usize)> = jobs
            .into_iter()
            .zip(&picked)
            .map(|(j, (_, take))| (&mut j.step, *take))
            .collect();
        let answers = self.server.advance(&mut batch);
        drop(batch);
        let busy = now.elapsed();
        self.batch_secs += 0.2 * (busy.as_secs_f64() - self.batch_secs);
        self.stats.record(rows, busy.as_micros() as u64);
        tracing::debug!(
            rows,
            steps = picked.len(),
            busy_ms = busy.as_secs_f64() * 1e3,
            "batch"
        );
        // Answer finished steps; unfinished ones keep their place in the queue.
        let mut done: Vec<(usize, Result<StageResult, WireError>)> = picked
            .iter()
            .zip(answers)
            .filter_map(|((i, _), a)| a.map(|a| (*i, a)))
            .collect();
        done.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        self.last_batch.clear();
        if self.answered.len() + done.len() > RETURNS_TRACKED {
            self.answered.clear();
        }
        let answered_at = Instant::now();
        for (i, answer) in done {
            let job = self.waiting.remove(i);
            self.stats.steps.fetch_add(1, Ordering::Relaxed);
            let cache = job.step.cache();
            if job.reply.send(answer).is_ok() {
                self.answered.insert(cache, answered_at);
                self.last_batch.push(cache);
            }
        }
    }
}
