//! What a node serves on its libp2p streams: control requests (load these layers) and stage
//! sessions, one stream each. Each loaded stage computes on its own scheduler thread, which
//! batches every session's steps (see [`crate::batcher`]), so the network side never waits on
//! compute; a bad frame ends only the stream that sent it, with a logged reason.

use crate::batcher::{BatchLimits, StageQueue};
use crate::commanders::{Commanders, Order};
use crate::local_model::weight_label;
pub use crate::local_model::LocalModel;
use crate::shard::ShardServer;
use crate::wire::wire_error;
use futures::StreamExt;
use libp2p::{PeerId, Stream};
use potluck_engine::kv_cache::stage_kv_budget;
use potluck_engine::llama::Stage;
use potluck_engine::weights::{stage_weight_bytes, WeightFile};
use potluck_net::gate::Gate;
use potluck_net::streams::PoolStreams;
use potluck_protocol::codec::MAX_FRAME;
use potluck_protocol::messages::{
    ErrorCode, LayerRange, Message, ModelRef, ShardAssignment, StageForward, WireError,
};
use potluck_protocol::signed::Keypair;
use potluck_protocol::stream::{
    read_body_async, read_frame_async, read_header_async, write_frame_async, Channel,
    MAX_CONTROL_FRAME, MAX_WORK_FRAME,
};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a control request may take to arrive.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A stage stream with no request for this long is closed and its cache freed.
const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// A stage stream of a peer that is not this node's coordinator that has not sent its first
/// request by then is closed: an honest peer opens a session to use it.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The idle limit for sessions of a peer that is not this node's coordinator.
const FOREIGN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Stage sessions at once from one peer that is not this node's coordinator (sessions come
/// from coordinators; a stranger's may not crowd them out).
pub const MAX_FOREIGN_SESSIONS: usize = 2;
/// Share of the stage's KV budget one session of such a peer may hold: with
/// [`MAX_FOREIGN_SESSIONS`], a peer holds at most a quarter.
const FOREIGN_KV_SHARE: usize = 8;
/// Once a frame's header has arrived, its body must follow within this.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// The layers a node holds now and the server that runs them.
pub struct Serving {
    /// What was assigned.
    pub assignment: ShardAssignment,
    queue: StageQueue,
    /// Most positions a session of a peer that is not this node's coordinator may reach.
    foreign_positions: usize,
}

struct Inner {
    models: Vec<LocalModel>,
    key: Keypair,
    memory_cap: Option<u64>,
    batch: BatchLimits,
    current: Mutex<Option<Arc<Serving>>>,
    // One load at a time: two assignments racing would both hold memory.
    loading: tokio::sync::Mutex<()>,
    next_cache: AtomicU64,
    loaded: watch::Sender<Option<(ModelRef, LayerRange)>>,
    /// Stage streams open now.
    active: AtomicUsize,
    /// Stage streams open now per peer that is not this node's coordinator.
    foreign: Mutex<std::collections::HashMap<PeerId, usize>>,
    /// Set when the node is leaving: new sessions are refused.
    leaving: AtomicBool,
    /// Why and since when the node is paused (its owner, a busy machine, its schedule): new
    /// sessions and work are refused, and running sessions end after [`PAUSE_GRACE`].
    paused: Mutex<Option<(Instant, String)>>,
    /// Runs whole-model work units.
    workers: crate::work::Workers,
    /// Outputs to corrupt (test builds only).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    faults: Option<crate::fault::FaultPlan>,
}

/// How long running sessions go on after their node is paused, time for the coordinator
/// to move them: "pause within seconds".
pub const PAUSE_GRACE: Duration = Duration::from_secs(3);

/// Counts a stage stream of a peer that is not this node's coordinator while it lives.
struct Foreign<'a> {
    open: &'a Mutex<std::collections::HashMap<PeerId, usize>>,
    peer: PeerId,
}

impl<'a> Foreign<'a> {
    /// Counts one more stream of `peer`, unless it has [`MAX_FOREIGN_SESSIONS`] already.
    fn count(
        open: &'a Mutex<std::collections::HashMap<PeerId, usize>>,
        peer: PeerId,
    ) -> Option<Self> {
        let mut map = open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = map.entry(peer).or_default();
        if *n >= MAX_FOREIGN_SESSIONS {
            return None;
        }
        *n += 1;
        Some(Self { open, peer })
    }
}

impl Drop for Foreign<'_> {
    fn drop(&mut self) {
        let mut map = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// Counts a stage stream as active while it lives.
struct ActiveStream<'a>(&'a AtomicUsize);

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The node's serving side; cheap to clone into stream tasks.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    /// A server for the models in the node's cache, signing with `key`. With a
    /// `memory_cap`, a stage's KV caches get what the cap leaves after its weights; without,
    /// [`potluck_engine::kv_cache::DEFAULT_KV_BUDGET`].
    /// Each loaded stage batches its sessions' steps within `batch`.
    /// `faults` corrupts outputs on purpose; only test builds accept it (see
    /// [`crate::fault`]).
    pub fn new(
        models: Vec<LocalModel>,
        key: Keypair,
        memory_cap: Option<u64>,
        batch: BatchLimits,
        faults: Option<crate::fault::FaultPlan>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                workers: crate::work::Workers::new(
                    models.clone(),
                    Keypair::from_secret(&key.secret()),
                    faults,
                ),
                models,
                key,
                memory_cap,
                batch,
                current: Mutex::new(None),
                loading: tokio::sync::Mutex::new(()),
                next_cache: AtomicU64::new(1),
                loaded: watch::channel(None).0,
                active: AtomicUsize::new(0),
                foreign: Mutex::new(std::collections::HashMap::new()),
                leaving: AtomicBool::new(false),
                paused: Mutex::new(None),
                faults,
            }),
        }
    }

    /// The models this node can serve.
    pub fn models(&self) -> Vec<ModelRef> {
        self.inner.models.iter().map(|m| m.model.clone()).collect()
    }

    /// What is loaded now; changes whenever an assignment completes.
    pub fn loaded(&self) -> watch::Receiver<Option<(ModelRef, LayerRange)>> {
        self.inner.loaded.subscribe()
    }

    fn current(&self) -> Option<Arc<Serving>> {
        self.inner.current.lock().ok().and_then(|c| c.clone())
    }

    /// Loads the assigned layers from the local cache (a no-op when they are already
    /// loaded) and returns the assignment once they serve.
    pub async fn assign(&self, a: ShardAssignment) -> Result<ShardAssignment, WireError> {
        let _one_at_a_time = self.inner.loading.lock().await;
        if let Some(cur) = self.current() {
            if cur.assignment.model == a.model && cur.assignment.layers == a.layers {
                return Ok(a);
            }
        }
        let local = self
            .inner
            .models
            .iter()
            .find(|m| m.model == a.model)
            .cloned()
            .ok_or_else(|| {
                wire_error(
                    ErrorCode::NotServing,
                    format!("model {} is not in this node's cache", a.model.name),
                )
            })?;
        let (key, cap, range) = (
            Keypair::from_secret(&self.inner.key.secret()),
            self.inner.memory_cap,
            a.layers,
        );
        let expected_total = a.total_layers;
        let model = a.model.clone();
        #[cfg(feature = "fault-injection")]
        let faults = self.inner.faults;
        let server = tokio::task::spawn_blocking(move || {
            let file = WeightFile::open(&local.path)?;
            let total = file.config()?.layers;
            if total != expected_total as usize {
                return Err(potluck_engine::EngineError::bad_input(format!(
                    "the assignment says {expected_total} blocks, the model has {total}"
                )));
            }
            let weights = weight_label(&file);
            let budget = kv_budget(&file, range, expected_total, cap);
            let per_position = file
                .config()?
                .kv_bytes_per_position()
                .saturating_mul(range.len() as usize)
                .max(1);
            let foreign_positions = budget / FOREIGN_KV_SHARE / per_position;
            let mut stage = Stage::load(&file, range.start as usize..range.end as usize, budget)?;
            // Every cached session here has a live stream: refuse new work when full
            // (the coordinator waits) rather than break a running session.
            stage.set_kv_eviction(false);
            let server = ShardServer::new(stage, model, key, &weights);
            #[cfg(feature = "fault-injection")]
            let server = server.with_faults(faults);
            Ok((server, foreign_positions))
        })
        .await
        .map_err(|e| wire_error(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| wire_error(ErrorCode::BadRequest, e.to_string()))?;
        let (server, foreign_positions) = server;
        let queue = StageQueue::start(server, self.inner.batch)
            .map_err(|e| wire_error(ErrorCode::Internal, format!("no stage thread: {e}")))?;
        let serving = Arc::new(Serving {
            assignment: a.clone(),
            queue,
            foreign_positions,
        });
        if let Ok(mut cur) = self.inner.current.lock() {
            *cur = Some(serving);
        }
        self.inner
            .loaded
            .send_replace(Some((a.model.clone(), a.layers)));
        tracing::info!(model = %a.model.name, start = a.layers.start, end = a.layers.end, "layers loaded");
        Ok(a)
    }

    /// The loaded stage's batch counters, if a stage is loaded.
    pub fn batch_stats(&self) -> Option<Arc<crate::batcher::BatchStats>> {
        self.current().map(|s| s.queue.stats())
    }

    /// Stage sessions (streams) open now.
    pub fn active_sessions(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// Refuses new sessions from now on; running ones go on until their streams close.
    pub fn start_leaving(&self) {
        self.inner.leaving.store(true, Ordering::Relaxed);
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        self.inner
            .paused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes no new sessions or work, for `reason`; running sessions end after
    /// [`PAUSE_GRACE`] (the coordinator moves them to other nodes).
    pub fn pause(&self, reason: &str) {
        let mut p = self.pause_state();
        if p.is_none() {
            *p = Some((Instant::now(), reason.to_string()));
        }
    }

    /// Serves again after [`Server::pause`].
    pub fn resume(&self) {
        *self.pause_state() = None;
    }

    /// Why the node is paused, if it is.
    pub fn paused(&self) -> Option<String> {
        self.pause_state().as_ref().map(|(_, why)| why.clone())
    }

    /// Why a new session or work unit is refused now, if it is.
    fn not_taking(&self) -> Option<String> {
        if self.inner.leaving.load(Ordering::Relaxed) {
            return Some("this node is leaving the pool".into());
        }
        self.paused()
            .map(|why| format!("this node is paused: {why}"))
    }

    /// Why a running session must end now: its node has been paused past the grace time.
    fn cut_short(&self) -> Option<String> {
        self.pause_state()
            .as_ref()
            .filter(|(since, _)| since.elapsed() >= PAUSE_GRACE)
            .map(|(_, why)| format!("this node is paused: {why}"))
    }

    /// Accepts control, stage and work streams of `streams`' pool until it is dropped, from
    /// peers its `gate` admits; assignments and work units only from `commanders`.
    pub fn accept(
        &self,
        mut streams: PoolStreams,
        gate: Gate,
        commanders: Arc<Commanders>,
    ) -> Result<(), String> {
        for channel in Channel::ALL {
            let mut incoming = streams.accept(channel)?;
            let this = self.clone();
            let gate = gate.clone();
            let commanders = commanders.clone();
            tokio::spawn(async move {
                while let Some((peer, stream)) = incoming.next().await {
                    let this = this.clone();
                    let gate = gate.clone();
                    let commanders = commanders.clone();
                    tokio::spawn(async move {
                        if !gate.wait_admitted(&peer).await {
                            tracing::warn!(%peer, "refused a {channel:?} stream from peer {peer}: not admitted to this pool");
                            return;
                        }
                        let may = |order| commanders.permits(&peer, gate.role(&peer), order);
                        match channel {
                            Channel::Stage => {
                                let commander = may(Order::Work);
                                this.serve_stage(peer, stream, commander).await
                            }
                            Channel::Work => this.serve_work(peer, stream, may).await,
                            Channel::Control => this.serve_control(peer, stream, may).await,
                        }
                    });
                }
            });
        }
        Ok(())
    }

    /// One work unit: a request, its result (or why not), and the stream ends.
    async fn serve_work(&self, peer: PeerId, mut stream: Stream, may: impl Fn(Order) -> bool) {
        let Some(request) =
            one_request(peer, &mut stream, MAX_WORK_FRAME, FRAME_TIMEOUT, "work").await
        else {
            return;
        };
        let stop = self.not_taking();
        let answer = match request {
            Message::Work(_) if !may(Order::Work) => refuse(peer, "work units"),
            _ if stop.is_some() => {
                Message::Error(wire_error(ErrorCode::NotServing, stop.unwrap_or_default()))
            }
            Message::Work(req) => match self.inner.workers.run(req).await {
                Ok(r) => Message::WorkDone(Box::new(r)),
                Err(e) => {
                    tracing::info!(%peer, "work unit refused: {}", e.message);
                    Message::Error(e)
                }
            },
            other => Message::Error(wire_error(
                ErrorCode::BadRequest,
                format!("not a work request: {}", kind(&other)),
            )),
        };
        send_answer(peer, &mut stream, &answer, "work").await;
    }

    async fn serve_control(&self, peer: PeerId, mut stream: Stream, may: impl Fn(Order) -> bool) {
        let Some(request) = one_request(
            peer,
            &mut stream,
            MAX_CONTROL_FRAME,
            CONTROL_READ_TIMEOUT,
            "control",
        )
        .await
        else {
            return;
        };
        let answer = match request {
            Message::Assign(_) if !may(Order::Assign) => refuse(peer, "layer assignments"),
            Message::Assign(a) => {
                tracing::info!(%peer, start = a.layers.start, end = a.layers.end, epoch = a.epoch, "assignment");
                match self.assign(a).await {
                    Ok(a) => Message::Assigned(a),
                    Err(e) => Message::Error(e),
                }
            }
            other => Message::Error(wire_error(
                ErrorCode::BadRequest,
                format!("not a control request: {}", kind(&other)),
            )),
        };
        send_answer(peer, &mut stream, &answer, "control").await;
    }

    /// One session: requests in order on one stream, its cache freed when the stream ends.
    /// A peer that is not this node's `commander` gets at most [`MAX_FOREIGN_SESSIONS`] at
    /// once, each within its share of the KV budget and a shorter idle limit.
    async fn serve_stage(&self, peer: PeerId, mut stream: Stream, commander: bool) {
        self.inner.active.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveStream(&self.inner.active);
        let _foreign = if commander {
            None
        } else {
            match Foreign::count(&self.inner.foreign, peer) {
                Some(f) => Some(f),
                None => {
                    tracing::info!(%peer, "refused a stage session from {peer}: it has {MAX_FOREIGN_SESSIONS} open and is not this node's coordinator");
                    let why = format!("at most {MAX_FOREIGN_SESSIONS} sessions at once from a peer that is not this node's coordinator");
                    let answer = Message::Error(wire_error(ErrorCode::Overloaded, why));
                    let _ = write_frame_async(&mut stream, &answer).await;
                    return;
                }
            }
        };
        let cache = self.inner.next_cache.fetch_add(1, Ordering::Relaxed);
        let mut pinned: Option<Arc<Serving>> = None;
        // A coordinator opens every hop of a chain at once, and the last waits for the first
        // hops' prefill; a stranger gets little time to start.
        let mut idle = if commander {
            SESSION_IDLE_TIMEOUT
        } else {
            FIRST_REQUEST_TIMEOUT
        };
        loop {
            let req = match self.next_request(&mut stream, idle).await {
                Ok(Some(req)) => req,
                Ok(None) => break,
                Err(why) => {
                    tracing::warn!(%peer, "dropped stage stream: {why}");
                    break;
                }
            };
            idle = if commander {
                SESSION_IDLE_TIMEOUT
            } else {
                FOREIGN_IDLE_TIMEOUT
            };
            let stop = if pinned.is_some() {
                self.cut_short()
            } else {
                self.not_taking()
            };
            let serving = match (&pinned, self.current()) {
                _ if stop.is_some() => {
                    Err(wire_error(ErrorCode::NotServing, stop.unwrap_or_default()))
                }
                (Some(p), Some(c)) if Arc::ptr_eq(p, &c) => Ok(c),
                (None, Some(c)) => {
                    pinned = Some(c.clone());
                    Ok(c)
                }
                (Some(_), _) => Err(wire_error(
                    ErrorCode::NotServing,
                    "this node was re-assigned; the session's layers are gone",
                )),
                (None, None) => Err(wire_error(ErrorCode::NotServing, "no layers loaded")),
            };
            let over = (req.position as usize).saturating_add(req.input.positions());
            let serving = serving.and_then(|s| {
                if !commander && over > s.foreign_positions {
                    Err(wire_error(
                        ErrorCode::Overloaded,
                        format!(
                            "a session of a peer that is not this node's coordinator may hold at most {} positions",
                            s.foreign_positions
                        ),
                    ))
                } else {
                    Ok(s)
                }
            });
            let answer = match serving {
                Err(e) => Message::Error(e),
                Ok(s) => match self.compute(&s, cache, req, &mut stream).await {
                    Some(Ok(r)) => Message::Result(Box::new(r)),
                    Some(Err(e)) => Message::Error(e),
                    None => {
                        tracing::info!(%peer, "stage stream closed while its step waited; step dropped");
                        break;
                    }
                },
            };
            if let Err(e) = write_frame_async(&mut stream, &answer).await {
                tracing::warn!(%peer, "stage answer not sent: {e}");
                break;
            }
        }
        if let Some(s) = pinned {
            s.queue.end_session(cache);
        }
    }

    /// Hands a step to the stage's scheduler and waits for its answer, watching the stream
    /// meanwhile: `None` when the peer closes it (or sends out of turn) first, and the step
    /// is then dropped at its next chunk boundary.
    async fn compute(
        &self,
        serving: &Serving,
        cache: u64,
        req: StageForward,
        stream: &mut Stream,
    ) -> Option<Result<potluck_protocol::messages::StageResult, WireError>> {
        let cancel = Arc::new(AtomicBool::new(false));
        let answer = serving.queue.submit(cache, req, cancel.clone());
        let mut probe = [0u8; 1];
        tokio::select! {
            a = answer => Some(a.unwrap_or_else(|_| {
                Err(wire_error(ErrorCode::Internal, "the stage stopped"))
            })),
            // A request/answer stream carries nothing while a step runs: a read that returns
            // means the peer hung up (or broke the protocol).
            _ = futures::AsyncReadExt::read(stream, &mut probe) => {
                cancel.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// The next request on a stage stream: `Ok(None)` when the peer ends the session or
    /// stays idle past `idle`, an error (to log) for anything that is not a forward request.
    async fn next_request(
        &self,
        stream: &mut Stream,
        idle: Duration,
    ) -> Result<Option<StageForward>, String> {
        let header = tokio::time::timeout(idle, read_header_async(&mut *stream, MAX_FRAME)).await;
        let len = match header {
            Err(_) => {
                tracing::info!("stage stream idle; closing");
                return Ok(None);
            }
            Ok(Ok(None)) => return Ok(None),
            Ok(Ok(Some(len))) => len,
            Ok(Err(e)) => return Err(e.to_string()),
        };
        // Once a frame has started, the rest must follow promptly.
        match tokio::time::timeout(FRAME_TIMEOUT, read_body_async::<Message>(stream, len)).await {
            Err(_) => Err(format!(
                "a {len}-byte frame did not arrive within {FRAME_TIMEOUT:?}"
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(Message::Forward(req))) => Ok(Some(req)),
            Ok(Ok(other)) => Err(format!("unexpected {}", kind(&other))),
        }
    }
}

/// The request on a one-shot `what` stream (at most `max` bytes, within `timeout`); `None`,
/// logged, when none comes.
async fn one_request(
    peer: PeerId,
    stream: &mut Stream,
    max: usize,
    timeout: Duration,
    what: &str,
) -> Option<Message> {
    match tokio::time::timeout(timeout, read_frame_async::<Message>(stream, max)).await {
        Err(_) => {
            tracing::warn!(%peer, "dropped {what} stream: no request in time");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, "dropped {what} stream: {e}");
            None
        }
        Ok(Ok(request)) => request,
    }
}

/// Writes the answer on a one-shot `what` stream.
async fn send_answer(peer: PeerId, stream: &mut Stream, answer: &Message, what: &str) {
    if let Err(e) = write_frame_async(stream, answer).await {
        tracing::warn!(%peer, "{what} answer not sent: {e}");
    }
}

/// Bytes the KV caches of a stage holding `range` of `total` blocks may take under
/// `memory_cap` (see [`stage_kv_budget`]).
fn kv_budget(file: &WeightFile, range: LayerRange, total: u32, memory_cap: Option<u64>) -> usize {
    let (block, edge) = file.footprint();
    let weights = stage_weight_bytes(block, edge, range.start, range.end, total);
    stage_kv_budget(memory_cap, weights)
}

/// The answer to a peer that may not command this node, logged.
fn refuse(peer: PeerId, what: &str) -> Message {
    tracing::warn!(%peer, "refused {what} from peer {peer}: it is not this node's coordinator");
    Message::Error(wire_error(
        ErrorCode::NotPermitted,
        format!("only this node's coordinator may send it {what}"),
    ))
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Advert(_) => "advert",
        Message::Assign(_) => "assign",
        Message::Assigned(_) => "assigned",
        Message::Forward(_) => "forward",
        Message::Result(_) => "result",
        Message::Heartbeat(_) => "heartbeat",
        Message::Leave(_) => "leave",
        Message::Error(_) => "error",
        Message::Work(_) => "work",
        Message::WorkDone(_) => "work result",
        Message::Hello(_) => "hello",
        Message::Admission(_) => "admission",
        Message::Revoked(_) => "revoked",
    }
}
