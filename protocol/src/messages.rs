//! Every message peers exchange, as versioned types (the frame carries the version; see
//! `codec`). Control messages travel by request-response, stage traffic on a long-lived
//! stream per session, adverts by gossip inside a signed envelope.

use crate::signed::{Digest, PublicKey, Signature, Signed};
use crate::tensor::WireTensor;
use serde::{Deserialize, Serialize};

/// Signature domain of capacity adverts.
pub const ADVERT_DOMAIN: &str = "potluck/advert/v1";
/// Signature domain of stage receipts.
pub const RECEIPT_DOMAIN: &str = "potluck/receipt/v1";

/// Where a node computes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// The CPU.
    Cpu,
    /// A CUDA GPU by index.
    Cuda(u32),
}

/// A model as peers name it: short name plus the blake3 of its file, so two peers holding
/// different bytes under one name never end up in one pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    /// Short name, e.g. `smollm2-135m-instruct`.
    pub name: String,
    /// blake3 of the weights file.
    pub digest: Digest,
}

/// A contiguous range of decoder blocks, `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LayerRange {
    /// First block.
    pub start: u32,
    /// One past the last block.
    pub end: u32,
}

impl LayerRange {
    /// Blocks in the range: 0 for an empty or inverted one, which a peer may send.
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no block (`end <= start`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a node offers its pool; gossiped signed, with an expiry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapacityAdvert {
    /// The pool this advert is for.
    pub pool: String,
    /// Device the node computes on.
    pub device: DeviceKind,
    /// Memory the owner lets the node use, bytes.
    pub memory_bytes: u64,
    /// Measured matmul speed.
    pub gflops: f32,
    /// Measured memory bandwidth, GB/s.
    pub mem_gbps: f32,
    /// Compute threads allowed.
    pub threads: u32,
    /// Models in the node's cache.
    pub models: Vec<ModelRef>,
    /// Blocks currently loaded, if any.
    pub loaded: Option<(ModelRef, LayerRange)>,
    /// Increases with every advert of this node, so stale ones are recognised.
    pub seq: u64,
    /// Unix seconds when issued.
    pub issued_at: u64,
    /// Unix seconds after which it must be ignored.
    pub expires_at: u64,
    /// The name its owner gave it (`potluck node --name`), for people to read; see
    /// [`clean_owner_name`] for what a name may hold.
    pub name: Option<String>,
    /// The coordinator this node answers to, so a node that joined through this one (not
    /// through the coordinator) can find it and take its commands.
    pub coordinator: Option<CoordinatorPointer>,
}

/// Most characters in an owner's name for a node.
pub const MAX_OWNER_NAME: usize = 32;
/// Most addresses a [`CoordinatorPointer`] lists.
pub const MAX_POINTER_ADDRS: usize = 8;
/// Longest address, in bytes, a [`CoordinatorPointer`] may list.
pub const MAX_POINTER_ADDR_LEN: usize = 256;

/// A coordinator's peer id and the addresses it listens on, both as text (this crate knows
/// nothing of libp2p; the reader parses them and drops what does not parse).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorPointer {
    /// Its libp2p peer id.
    pub peer: String,
    /// Multiaddrs it can be dialled at.
    pub addrs: Vec<String>,
}

/// What is wrong with an advert's name or coordinator pointer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertFieldError {
    /// The name is not as [`clean_owner_name`] leaves it.
    #[error("the node's name {0:?} is not a clean name of at most {MAX_OWNER_NAME} characters")]
    Name(String),
    /// The pointer lists too many addresses, or its peer id or an address is too long.
    #[error("the coordinator pointer is too large: at most {MAX_POINTER_ADDRS} addresses, and each address and the peer id at most {MAX_POINTER_ADDR_LEN} bytes")]
    Pointer,
}

/// How far in the future an advert may be dated (clocks differ).
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;

/// Why an advert does not hold for a pool now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertNotCurrent {
    /// It is for another pool.
    #[error("advert is for pool '{0}'")]
    WrongPool(String),
    /// Its validity has ended.
    #[error("advert expired at {0}")]
    Expired(u64),
    /// It is dated in the future beyond [`MAX_CLOCK_SKEW_SECS`].
    #[error("advert issued at {0}, in the future")]
    FromFuture(u64),
}

impl CapacityAdvert {
    /// Checks that the advert is for `pool` and holds at unix time `now`: every reader of an
    /// advert (the coordinator's peer table, a node reading its bootstrap peer's pointer)
    /// refuses an old one replayed, or one for another pool.
    pub fn check_current(&self, pool: &str, now: u64) -> Result<(), AdvertNotCurrent> {
        if self.pool != pool {
            return Err(AdvertNotCurrent::WrongPool(self.pool.clone()));
        }
        if self.expires_at <= now {
            return Err(AdvertNotCurrent::Expired(self.expires_at));
        }
        if self.issued_at > now + MAX_CLOCK_SKEW_SECS {
            return Err(AdvertNotCurrent::FromFuture(self.issued_at));
        }
        Ok(())
    }

    /// Checks the fields a person or another node reads as text: a name is clean, a
    /// pointer is small.
    pub fn check_text_fields(&self) -> Result<(), AdvertFieldError> {
        if let Some(name) = &self.name {
            if clean_owner_name(name).as_deref() != Some(name.as_str()) {
                return Err(AdvertFieldError::Name(name.chars().take(40).collect()));
            }
        }
        if let Some(p) = &self.coordinator {
            let long = p.peer.len() > MAX_POINTER_ADDR_LEN
                || p.addrs.iter().any(|a| a.len() > MAX_POINTER_ADDR_LEN);
            if p.addrs.len() > MAX_POINTER_ADDRS || long {
                return Err(AdvertFieldError::Pointer);
            }
        }
        Ok(())
    }
}

/// An owner's name for a node as the pool shows it: letters, digits, spaces and `-_.'`
/// only (nothing a terminal or a page would read as markup or control), trimmed, at most
/// [`MAX_OWNER_NAME`] characters; `None` when nothing is left.
pub fn clean_owner_name(raw: &str) -> Option<String> {
    let kept: String = raw
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.' | '\''))
        .take(MAX_OWNER_NAME)
        .collect();
    let kept = kept.split_whitespace().collect::<Vec<_>>().join(" ");
    (!kept.is_empty()).then_some(kept)
}

/// The coordinator's instruction to load a range of blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardAssignment {
    /// Model to load.
    pub model: ModelRef,
    /// Blocks to hold.
    pub layers: LayerRange,
    /// Total blocks of the model (to know whether this is the first or last stage).
    pub total_layers: u32,
    /// Plan generation this assignment belongs to.
    pub epoch: u64,
}

/// A stage's input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StageInputWire {
    /// Token ids, for the first stage.
    Tokens(Vec<u32>),
    /// Hidden states (positions, hidden), for later stages.
    Hidden(WireTensor),
}

impl StageInputWire {
    /// How many positions it covers (0 for a tensor without dimensions).
    pub fn positions(&self) -> usize {
        match self {
            StageInputWire::Tokens(t) => t.len(),
            StageInputWire::Hidden(h) => h.dims().first().copied().unwrap_or(0),
        }
    }
}

/// How the last stage should pick a token, when it samples itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleSpec {
    /// Temperature (0 = greedy).
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: u32,
    /// Top-p.
    pub top_p: f32,
    /// Min-p.
    pub min_p: f32,
    /// Repetition penalty.
    pub repetition_penalty: f32,
    /// Seed of this step's draw.
    pub seed: u64,
    /// How many top log-probabilities to return.
    pub top_logprobs: u32,
    /// Recent tokens, for the repetition penalty.
    pub history: Vec<u32>,
}

/// Run positions `position..position + n` of a session through a stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageForward {
    /// The generation this belongs to.
    pub session: u64,
    /// Step counter within the session (prefill is 0).
    pub step: u64,
    /// First position of the input.
    pub position: u32,
    /// The input.
    pub input: StageInputWire,
    /// Present on the last stage when it should sample.
    pub sample: Option<SampleSpec>,
}

/// A stage's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StageOutputWire {
    /// Hidden states for the next stage.
    Hidden(WireTensor),
    /// The last stage's pick and its top alternatives (token, log-probability).
    Token {
        /// Chosen token.
        token: u32,
        /// Its log-probability.
        logprob: f32,
        /// Best alternatives, best first.
        top: Vec<(u32, f32)>,
    },
}

/// Numbers that decide how much two honest results may differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumericClass {
    /// Weight type, e.g. "Q4_1".
    pub weights: String,
    /// Accumulation type, e.g. "f32".
    pub accumulation: String,
    /// Device kind.
    pub device: DeviceKind,
}

/// What a receipt vouches for; signed by the node that computed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptBody {
    /// blake3 of the encoded request (session, step, position, sampling).
    pub job: Digest,
    /// blake3 of the encoded input.
    pub input: Digest,
    /// blake3 of the encoded output.
    pub output: Digest,
    /// The model file's digest.
    pub model: Digest,
    /// Blocks that ran.
    pub layers: LayerRange,
    /// How it was computed.
    pub numeric: NumericClass,
}

/// A signed receipt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The claims.
    pub body: ReceiptBody,
    /// The node that signs them.
    pub signer: PublicKey,
    /// Its signature over the encoded body.
    pub signature: Signature,
}

/// A stage's answer to a [`StageForward`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageResult {
    /// Echo of the request's session.
    pub session: u64,
    /// Echo of the request's step.
    pub step: u64,
    /// The output.
    pub output: StageOutputWire,
    /// Signed receipt over job, input and output.
    pub receipt: Receipt,
}

/// Liveness ping with a sequence number and the sender's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increases by one per heartbeat.
    pub seq: u64,
    /// Sender's unix milliseconds.
    pub sent_at_ms: u64,
}

/// A node announcing that it is leaving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    /// Why (shown to operators).
    pub reason: String,
    /// Milliseconds until it stops serving.
    pub deadline_ms: u32,
}

/// Machine-readable error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request was malformed or did not fit the stage.
    BadRequest,
    /// The session is unknown (never started or evicted).
    UnknownSession,
    /// The node holds no such layers or model.
    NotServing,
    /// Out of memory or KV budget.
    Overloaded,
    /// Anything else.
    Internal,
    /// The sender may not ask this of this node (only its coordinator assigns layers and
    /// hands out work).
    NotPermitted,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Kind.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// What a work unit asks of a node holding a whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkTask {
    /// A unit-length sentence vector for each text, in order.
    Embed(Vec<String>),
    /// A greedy completion of a tokenized prompt.
    Complete {
        /// Prompt token ids (templated by the coordinator).
        prompt: Vec<u32>,
        /// Most tokens to generate.
        max_tokens: u32,
    },
}

/// Work a node runs whole on one model it holds entirely: one unit of a batch, or one slice
/// of an online request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkRequest {
    /// The coordinator's id for this piece of work, echoed in the answer.
    pub unit: u64,
    /// The model to run.
    pub model: ModelRef,
    /// What to compute.
    pub task: WorkTask,
}

/// What a work unit produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkOutput {
    /// One row per text (texts, dimensions), f32.
    Embeddings(WireTensor),
    /// A completion's text.
    Completion {
        /// The generated text.
        text: String,
        /// Tokens generated.
        generated: u32,
        /// Whether it ended at an end-of-sequence token (else at `max_tokens`).
        stopped: bool,
    },
}

/// A node's answer to a [`WorkRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkResult {
    /// Echo of the request's unit.
    pub unit: u64,
    /// The output.
    pub output: WorkOutput,
    /// Tokens the work took (the measure of work done, for credit).
    pub tokens: u64,
    /// Signed receipt over the unit, its task and the output.
    pub receipt: Receipt,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// A signed [`CapacityAdvert`] (verify with [`ADVERT_DOMAIN`]).
    Advert(Signed),
    /// Load these layers.
    Assign(ShardAssignment),
    /// Acknowledges an assignment once the layers are loaded.
    Assigned(ShardAssignment),
    /// Run a step.
    Forward(StageForward),
    /// A step's result.
    Result(Box<StageResult>),
    /// Liveness.
    Heartbeat(Heartbeat),
    /// Leaving.
    Leave(Leave),
    /// An error.
    Error(WireError),
    /// Run a work unit (on the work protocol).
    Work(WorkRequest),
    /// A work unit's result.
    WorkDone(Box<WorkResult>),
    /// What a peer presents on connecting (on the admission protocol).
    Hello(crate::membership::Hello),
    /// The answer to a hello.
    Admission(crate::membership::Admission),
    /// Certificates a private pool withdrew (gossiped, each signed by the pool key).
    Revoked(Vec<crate::membership::Revocation>),
}
