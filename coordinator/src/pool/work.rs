//! Whole-model work on the pool: an embedding request is cut into slices that run on the
//! peers holding the encoder whole. Each peer pulls the next slice when its last is done, so
//! faster peers take more; a slice whose peer fails goes back to the queue for another, and
//! every result must carry a valid receipt from the peer that sent it. Slices are spot-checked
//! like stage results (see `embed_checks`).

use super::{Coordinator, SessionError};
use libp2p::PeerId;
use potluck_net::swarm::peer_id_of;
use potluck_protocol::messages::{
    ErrorCode, Message, ModelRef, WorkOutput, WorkRequest, WorkResult, WorkTask,
};
use potluck_protocol::receipt::work_ids;
use potluck_protocol::signed::PublicKey;
use potluck_protocol::stream::{Channel, MAX_WORK_FRAME};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Texts per slice at most: small enough that two peers share even a modest request, large
/// enough that a slice's round trip is small beside its compute.
pub const SLICE_TEXTS: usize = 32;
/// Text bytes per slice at most, well inside [`MAX_WORK_FRAME`].
const SLICE_BYTES: usize = MAX_WORK_FRAME / 4;
/// How far a returned vector's length may be from 1 before the result is refused.
const NORM_SLACK: f32 = 1e-2;

/// An embedding request's answer.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// One unit-length vector per input, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the inputs took.
    pub tokens: u64,
    /// Peers that computed slices, with the number of texts each did.
    pub by_peer: Vec<(PeerId, usize)>,
}

/// A slice of the request: where its texts start, and the texts.
pub(super) struct Slice {
    pub(super) start: usize,
    pub(super) texts: Vec<String>,
}

/// A slice's checked answer.
#[derive(Clone)]
pub(super) struct SliceAnswer {
    /// One unit-length vector per text.
    pub(super) vectors: Vec<Vec<f32>>,
    /// Tokens it counts for.
    pub(super) tokens: u64,
    /// The peer's receipt over it.
    pub(super) receipt: potluck_protocol::messages::Receipt,
    /// The work unit it answered.
    pub(super) unit: u64,
}

/// Cuts `texts` into slices of at most [`SLICE_TEXTS`] texts and [`SLICE_BYTES`] bytes.
fn slices(texts: Vec<String>) -> VecDeque<Slice> {
    let mut out = VecDeque::new();
    let mut cur = Slice {
        start: 0,
        texts: Vec::new(),
    };
    let mut bytes = 0;
    for (i, t) in texts.into_iter().enumerate() {
        if !cur.texts.is_empty()
            && (cur.texts.len() >= SLICE_TEXTS || bytes + t.len() > SLICE_BYTES)
        {
            out.push_back(std::mem::replace(
                &mut cur,
                Slice {
                    start: i,
                    texts: Vec::new(),
                },
            ));
            bytes = 0;
        }
        bytes += t.len();
        cur.texts.push(t);
    }
    if !cur.texts.is_empty() {
        out.push_back(cur);
    }
    out
}

/// Why a work unit came back without a result.
pub(crate) enum Refusal {
    /// The peer cannot take it (not holding the model, leaving): another peer should.
    Declined(String),
    /// The peer says the unit itself is bad (its input does not fit the model).
    Rejected(String),
    /// The peer failed it or answered wrongly.
    Failed(String),
}

/// Checks that `result` answers `req` and carries a valid receipt by `key` over it.
pub(crate) fn verify_work(
    key: &PublicKey,
    req: &WorkRequest,
    result: &WorkResult,
) -> Result<(), String> {
    if result.unit != req.unit {
        return Err("answer to another unit".into());
    }
    if &result.receipt.signer != key {
        return Err("receipt signed by another key".into());
    }
    result
        .receipt
        .verify()
        .map_err(|e| format!("receipt does not verify: {e}"))?;
    let (job, input, output) =
        work_ids(req, &result.output).map_err(|e| format!("cannot hash: {e}"))?;
    let body = &result.receipt.body;
    if body.job != job || body.input != input || body.output != output {
        return Err("receipt does not match the unit or its output".into());
    }
    if body.model != req.model.digest {
        return Err("receipt names another model".into());
    }
    Ok(())
}

/// The vectors of an embedding answer to `texts`, and the tokens it counts for. A node
/// reports its own count, outside its receipt; credit and quota believe it only up to the
/// most `texts` can take: one token per byte, plus the two markers a sentence encoder adds.
pub(crate) fn embedded(
    result: &WorkResult,
    texts: &[String],
) -> Result<(Vec<Vec<f32>>, u64), String> {
    let vectors = embeddings_of(&result.output, texts.len())?;
    let bound = texts
        .iter()
        .map(|t| (t.len() as u64).saturating_add(2))
        .fold(0, u64::saturating_add);
    Ok((vectors, result.tokens.min(bound)))
}

/// The unit-length vectors of an embedding answer for `texts` texts.
fn embeddings_of(output: &WorkOutput, texts: usize) -> Result<Vec<Vec<f32>>, String> {
    let WorkOutput::Embeddings(tensor) = output else {
        return Err("not embeddings".into());
    };
    let dims = tensor.dims();
    let values = tensor.to_f32().map_err(|e| format!("bad tensor: {e}"))?;
    let [rows, width] = dims.as_slice() else {
        return Err(format!("embeddings of shape {dims:?}"));
    };
    if *rows != texts || *width == 0 {
        return Err(format!("{rows} vectors of width {width} for {texts} texts"));
    }
    let vectors: Vec<Vec<f32>> = values.chunks(*width).map(<[f32]>::to_vec).collect();
    for v in &vectors {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !norm.is_finite() || (norm - 1.0).abs() > NORM_SLACK {
            return Err(format!("a vector of length {norm}, not unit length"));
        }
    }
    Ok(vectors)
}

impl Coordinator {
    /// Peers that advertise `model` in their cache, are in good standing and may see text,
    /// fastest first (see [`potluck_core::pool::PoolCore::holders`]).
    pub fn holders(&self, model: &ModelRef) -> Vec<(PeerId, PublicKey)> {
        let keys = self.core().holders(model, std::time::Instant::now());
        keys.into_iter()
            .filter_map(|k| Some((peer_id_of(&k)?, k)))
            .collect()
    }

    /// Sentence vectors for `texts` on `model`, computed across the peers holding it.
    pub async fn embed(
        &self,
        model: &ModelRef,
        texts: Vec<String>,
    ) -> Result<Embedded, SessionError> {
        let total = texts.len();
        let holders = self.holders(model);
        if holders.is_empty() {
            return Err(SessionError::NotReady(format!(
                "no node holds {}; nodes offer it after `potluck model fetch {}`",
                model.name, model.name
            )));
        }
        let queue = Arc::new(Mutex::new(slices(texts)));
        let done = Arc::new(Mutex::new(Vec::<(usize, Vec<Vec<f32>>, u64, PeerId)>::new()));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let workers = holders.into_iter().map(|(peer, key)| {
            let (queue, done, failures) = (queue.clone(), done.clone(), failures.clone());
            async move {
                loop {
                    let Some(slice) = queue.lock().ok().and_then(|mut q| q.pop_front()) else {
                        return;
                    };
                    match self.run_slice(peer, &key, model, &slice).await {
                        Ok(answer) => {
                            // Picked as stage results are: every slice of a new peer, a
                            // share of a proven one's.
                            if self.pick_for_check(peer) {
                                self.check_slice_later(peer, model.clone(), &slice, &answer);
                            }
                            let SliceAnswer {
                                vectors, tokens, ..
                            } = answer;
                            self.core().add_work(key, vectors.len() as u64, tokens);
                            if let Ok(mut d) = done.lock() {
                                d.push((slice.start, vectors, tokens, peer));
                            }
                        }
                        Err(refusal) => {
                            let why = self.blame(peer, &refusal, "embedding slice");
                            if let Ok(mut f) = failures.lock() {
                                f.push(format!("{peer}: {why}"));
                            }
                            // Another peer takes it; this one is out for this request.
                            if let Ok(mut q) = queue.lock() {
                                q.push_front(slice);
                            }
                            return;
                        }
                    }
                }
            }
        });
        futures::future::join_all(workers).await;
        let left = queue.lock().map(|q| q.len()).unwrap_or(0);
        if left > 0 {
            let why = failures.lock().map(|f| f.join("; ")).unwrap_or_default();
            return Err(SessionError::Failed(format!(
                "{left} slices found no node to run them ({why})"
            )));
        }
        let mut parts = std::mem::take(&mut *done.lock().unwrap_or_else(|p| p.into_inner()));
        parts.sort_by_key(|p| p.0);
        let mut vectors = Vec::with_capacity(total);
        let mut tokens = 0;
        let mut by_peer: Vec<(PeerId, usize)> = Vec::new();
        for (_, v, t, peer) in parts {
            match by_peer.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, n)) => *n += v.len(),
                None => by_peer.push((peer, v.len())),
            }
            tokens = u64::saturating_add(tokens, t);
            vectors.extend(v);
        }
        self.metrics().embedded_texts.inc_by(vectors.len() as u64);
        Ok(Embedded {
            vectors,
            tokens,
            by_peer,
        })
    }

    /// What a refused unit says of `peer`: a failure (`what` failed) suspects it, so it is
    /// routed around for a while; a decline or a rejection of the input does not. Returns
    /// why, for the caller's records.
    pub(crate) fn blame(&self, peer: PeerId, refusal: &Refusal, what: &str) -> String {
        match refusal {
            Refusal::Declined(why) | Refusal::Rejected(why) => why.clone(),
            Refusal::Failed(why) => {
                tracing::warn!(%peer, "{what} failed: {why}");
                self.suspect(peer, &format!("{what}: {why}"));
                why.clone()
            }
        }
    }

    /// Sends one slice to `peer` and checks its answer.
    pub(super) async fn run_slice(
        &self,
        peer: PeerId,
        key: &PublicKey,
        model: &ModelRef,
        slice: &Slice,
    ) -> Result<SliceAnswer, Refusal> {
        let req = WorkRequest {
            unit: self.fresh_session(),
            model: model.clone(),
            task: WorkTask::Embed(slice.texts.clone()),
        };
        let result = self.send_work(peer, &req).await?;
        verify_work(key, &req, &result).map_err(Refusal::Failed)?;
        let (vectors, tokens) = embedded(&result, &slice.texts).map_err(Refusal::Failed)?;
        Ok(SliceAnswer {
            vectors,
            tokens,
            receipt: result.receipt,
            unit: req.unit,
        })
    }

    /// One work unit on `peer`: a stream, the request, its answer.
    pub(crate) async fn send_work(
        &self,
        peer: PeerId,
        req: &WorkRequest,
    ) -> Result<WorkResult, Refusal> {
        let answer = self
            .request(
                peer,
                Channel::Work,
                &Message::Work(req.clone()),
                MAX_WORK_FRAME,
                self.unit_timeout,
            )
            .await
            .map_err(Refusal::Failed)?;
        match answer {
            Some(Message::WorkDone(r)) => Ok(*r),
            // A node that serves no such model, or takes work from another coordinator.
            Some(Message::Error(e))
                if matches!(e.code, ErrorCode::NotServing | ErrorCode::NotPermitted) =>
            {
                Err(Refusal::Declined(e.message))
            }
            Some(Message::Error(e)) if e.code == ErrorCode::BadRequest => {
                Err(Refusal::Rejected(e.message))
            }
            Some(Message::Error(e)) => Err(Refusal::Failed(format!("{:?}: {}", e.code, e.message))),
            _ => Err(Refusal::Failed("unexpected answer".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_keep_order_and_limits() {
        let texts: Vec<String> = (0..70).map(|i| format!("text {i}")).collect();
        let s = slices(texts.clone());
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.iter().map(|s| s.start).collect::<Vec<_>>(),
            vec![0, 32, 64]
        );
        let joined: Vec<String> = s.into_iter().flat_map(|s| s.texts).collect();
        assert_eq!(joined, texts);
        let big = vec!["x".repeat(SLICE_BYTES / 2 + 1); 3];
        assert_eq!(slices(big).len(), 3, "byte limit splits");
        assert!(slices(Vec::new()).is_empty());
    }
}
