//! Runs open work units on the pool until quorum: the shell around the core's batch policy
//! ([`potluck_core::quorum`]: who runs a unit, when its results validate it, who is
//! outvoted). Each unit goes to peers of different origins holding its model whole (least
//! busy, then fastest, first); validated units credit the peers that agreed, outvoted peers
//! are quarantined and their credit voided. A unit whose peer fails or times out simply runs
//! elsewhere.

use super::input::{chat_line, embed_texts};
use super::store::{Asked, Kind, OpenUnit, Store};
use crate::compare::{vectors_agree, Verdict};
use crate::origin::Origin;
use crate::pool::{embedded, verify_work, Coordinator, Refusal};
use crate::template::chat_prompt_ids;
use libp2p::PeerId;
use potluck_core::quorum::{self, Outcome, Quorum};
use potluck_engine::chat::ChatMessage;
use potluck_protocol::codec::encode_body;
use potluck_protocol::messages::{ModelRef, WorkOutput, WorkRequest, WorkTask};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

pub use crate::compare::EMBED_AGREEMENT;
pub use potluck_core::quorum::{DEFAULT_QUORUM, MAX_REPLICAS};
/// How often the queue is looked at when nothing wakes it.
const TICK: Duration = Duration::from_millis(250);
/// Open units looked at per round.
const WINDOW: usize = 512;

/// A peer's answer as kept in the store until the unit is decided.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Embeddings {
        vectors: Vec<Vec<f32>>,
        tokens: u64,
    },
    Completion {
        text: String,
        generated: u32,
        stopped: bool,
        tokens: u64,
    },
}

impl Answer {
    fn tokens(&self) -> u64 {
        match self {
            Answer::Embeddings { tokens, .. } | Answer::Completion { tokens, .. } => *tokens,
        }
    }

    /// Whether two honest peers could have given these two answers.
    fn agrees(&self, other: &Answer) -> bool {
        match (self, other) {
            (
                Answer::Embeddings {
                    vectors: a,
                    tokens: ta,
                },
                Answer::Embeddings {
                    vectors: b,
                    tokens: tb,
                },
            ) => {
                // The same row comparison as hidden states under spot checks; honest nodes
                // count the same tokens with the same tokenizer.
                ta == tb && vectors_agree(a, b)
            }
            (
                Answer::Completion {
                    text: a,
                    generated: x,
                    ..
                },
                Answer::Completion {
                    text: b,
                    generated: y,
                    ..
                },
            ) => a == b && x == y,
            _ => false,
        }
    }
}

/// A unit's results, read once per round: who gave each answer, and what they decide.
struct Tally {
    peers: Vec<Asked>,
    answers: Vec<Answer>,
    outcome: Outcome,
}

impl Tally {
    fn of(unit: &OpenUnit, quorum: Quorum) -> Self {
        let (peers, answers): (Vec<Asked>, Vec<Answer>) = unit
            .results
            .iter()
            .filter_map(|(asked, o)| Some((asked.clone(), serde_json::from_str(o).ok()?)))
            .unzip();
        let origins: Vec<&Origin> = peers.iter().map(|a| &a.origin).collect();
        let tally = quorum::Tally::of(&origins, &answers, Answer::agrees);
        Self {
            outcome: quorum.outcome(&tally, unit.running.len()),
            peers,
            answers,
        }
    }
}

/// The batch runner: the store, the quorum, and what runs now.
pub struct Batches {
    /// The durable store.
    pub store: Arc<Store>,
    quorum: Quorum,
    wake: Notify,
    /// Units running on each peer now.
    busy: Mutex<HashMap<PeerId, usize>>,
}

impl Batches {
    /// A runner over `store` validating each unit by `quorum` agreeing results.
    pub fn new(store: Arc<Store>, quorum: usize) -> Arc<Self> {
        Arc::new(Self {
            store,
            quorum: Quorum::new(quorum),
            wake: Notify::new(),
            busy: Mutex::new(HashMap::new()),
        })
    }

    /// Results that must agree.
    pub fn quorum(&self) -> usize {
        self.quorum.get()
    }

    /// Looks at the queue now (a batch arrived).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Runs units on `c`'s pool until the process ends.
    pub fn spawn(self: &Arc<Self>, c: Coordinator) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.round(&c) {
                    tracing::warn!("batch round: {e}");
                }
                let _ = tokio::time::timeout(TICK, this.wake.notified()).await;
            }
        });
    }

    /// One look at the open units: decide those with enough results, send the others.
    fn round(self: &Arc<Self>, c: &Coordinator) -> Result<(), super::store::StoreError> {
        let units = self.store.open_units(WINDOW)?;
        if units.is_empty() {
            return Ok(());
        }
        let mut holders: HashMap<Kind, Vec<(PeerId, Origin)>> = HashMap::new();
        for unit in units {
            let Some(model) = model_of(c, unit.kind) else {
                self.store
                    .fail_unit(unit.id, "this pool serves no model for this kind of unit")?;
                continue;
            };
            let tally = Tally::of(&unit, self.quorum);
            let wanted = match self.decide(c, &unit, &model, &tally)? {
                Some(0) | None => continue,
                Some(n) => n,
            };
            let peers = holders.entry(unit.kind).or_insert_with(|| {
                c.holders(&model)
                    .into_iter()
                    .map(|(p, _)| (p, c.origin(p)))
                    .collect()
            });
            for (peer, origin) in self.pick(peers, &unit, wanted) {
                let assignment =
                    self.store
                        .start_assignment(unit.id, &peer.to_string(), &origin)?;
                *self.lock_busy().entry(peer).or_default() += 1;
                let (this, c, unit, model) = (self.clone(), c.clone(), unit.clone(), model.clone());
                tokio::spawn(async move {
                    this.run(&c, peer, assignment, &unit, model).await;
                    if let Some(n) = this.lock_busy().get_mut(&peer) {
                        *n = n.saturating_sub(1);
                    }
                    this.wake();
                });
            }
        }
        Ok(())
    }

    fn lock_busy(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, usize>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Up to `n` of `peers` for `unit`, by the core's pick over what each runs now.
    fn pick(&self, peers: &[(PeerId, Origin)], unit: &OpenUnit, n: usize) -> Vec<(PeerId, Origin)> {
        let busy = self.lock_busy();
        let candidates: Vec<(PeerId, Origin, usize)> = peers
            .iter()
            .map(|(p, o)| (*p, o.clone(), busy.get(p).copied().unwrap_or(0)))
            .collect();
        quorum::pick(
            &candidates,
            |p, origin| unit.asked(&p.to_string()) || unit.heard_from(origin),
            n,
        )
    }

    /// Validates or gives up on `unit` if its results allow; otherwise the assignments it
    /// wants now (`None`: it is decided).
    fn decide(
        &self,
        c: &Coordinator,
        unit: &OpenUnit,
        model: &ModelRef,
        tally: &Tally,
    ) -> Result<Option<usize>, super::store::StoreError> {
        let Tally {
            peers,
            answers,
            outcome,
        } = tally;
        match outcome {
            Outcome::Open { wanted } => Ok(Some(*wanted)),
            Outcome::Unresolvable => {
                self.store.fail_unit(
                    unit.id,
                    &format!(
                        "{MAX_REPLICAS} results and no {} of them from different operators or networks agree",
                        self.quorum.get()
                    ),
                )?;
                Ok(None)
            }
            Outcome::Validated { agreeing, outvoted } => {
                let Some(winner) = agreeing.first().and_then(|&i| answers.get(i)) else {
                    return Ok(Some(0));
                };
                let id = |i: &usize| peers.get(*i).and_then(|a| a.peer.parse::<PeerId>().ok());
                // A quarantined peer earns nothing, even for a result that agrees.
                let credited: Vec<String> = agreeing
                    .iter()
                    .filter_map(id)
                    .filter(|p| !c.is_quarantined(*p))
                    .map(|p| p.to_string())
                    .collect();
                let tokens = winner.tokens();
                let flops = tokens as f64 * c.flops_per_token(unit.kind == Kind::Embed) as f64;
                let body = response_body(unit, winner, &model.name);
                if self
                    .store
                    .validate(unit.id, &body.to_string(), tokens, flops, &credited)?
                {
                    for p in agreeing.iter().filter_map(id) {
                        c.record_trust(p, Verdict::Pass);
                    }
                    for p in outvoted.iter().filter_map(id) {
                        c.record_trust(p, Verdict::Fail);
                        c.quarantine(p, &format!("outvoted on batch unit {}", unit.id));
                    }
                }
                Ok(None)
            }
        }
    }

    /// Runs one assignment and records what came of it.
    async fn run(
        &self,
        c: &Coordinator,
        peer: PeerId,
        assignment: i64,
        unit: &OpenUnit,
        model: ModelRef,
    ) {
        let outcome = self.exchange(c, peer, assignment, unit, model).await;
        let recorded = match outcome {
            Ok((answer, receipt)) => match serde_json::to_string(&answer) {
                Ok(json) => self
                    .store
                    .returned(assignment, &json, answer.tokens(), &receipt),
                Err(e) => self.store.failed(assignment, &e.to_string()),
            },
            Err(refusal) => {
                let why = c.blame(peer, &refusal, "batch unit");
                let failed = self.store.failed(assignment, &why);
                match refusal {
                    // The unit's own input is at fault: no other peer would do better.
                    Refusal::Rejected(_) => {
                        failed.and_then(|()| self.store.fail_unit(unit.id, &why))
                    }
                    _ => failed,
                }
            }
        };
        if let Err(e) = recorded {
            tracing::warn!("recording assignment {assignment}: {e}");
        }
    }

    async fn exchange(
        &self,
        c: &Coordinator,
        peer: PeerId,
        assignment: i64,
        unit: &OpenUnit,
        model: ModelRef,
    ) -> Result<(Answer, Vec<u8>), Refusal> {
        let body: Value = serde_json::from_str(&unit.body)
            .map_err(|e| Refusal::Rejected(format!("stored body unreadable: {e}")))?;
        let task = match unit.kind {
            Kind::Embed => WorkTask::Embed(embed_texts(&body).map_err(Refusal::Rejected)?),
            Kind::Chat => {
                let line = chat_line(&body).map_err(Refusal::Rejected)?;
                let messages: Vec<ChatMessage> = line
                    .messages
                    .into_iter()
                    .map(|(role, content)| ChatMessage { role, content })
                    .collect();
                let pool = c.clone();
                let prompt =
                    crate::cpu::run(move || chat_prompt_ids(&pool.model().tokenizer, &messages))
                        .await
                        .ok_or_else(|| Refusal::Rejected("preparing the prompt failed".into()))?
                        .map_err(|e| Refusal::Rejected(e.to_string()))?;
                if prompt.len() >= c.model().config.context {
                    return Err(Refusal::Rejected(format!(
                        "the prompt has {} tokens; the model's context is {}",
                        prompt.len(),
                        c.model().config.context
                    )));
                }
                WorkTask::Complete {
                    prompt,
                    max_tokens: line.max_tokens as u32,
                }
            }
        };
        let req = WorkRequest {
            unit: assignment as u64,
            model,
            task,
        };
        let key = potluck_net::swarm::key_of_peer(&peer)
            .filter(|k| c.core().knows(k))
            .ok_or_else(|| Refusal::Declined("peer left".into()))?;
        let result = c.send_work(peer, &req).await?;
        verify_work(&key, &req, &result).map_err(Refusal::Failed)?;
        // Credit counts what the coordinator can count itself, not the node's claim.
        let answer = match (&req.task, &result.output) {
            (WorkTask::Embed(texts), _) => {
                let (vectors, tokens) = embedded(&result, texts).map_err(Refusal::Failed)?;
                Answer::Embeddings { vectors, tokens }
            }
            (WorkTask::Complete { max_tokens, .. }, WorkOutput::Completion { generated, .. })
                if generated > max_tokens =>
            {
                return Err(Refusal::Failed(format!(
                    "claims {generated} tokens generated of at most {max_tokens}"
                )));
            }
            (
                WorkTask::Complete { prompt, .. },
                WorkOutput::Completion {
                    text,
                    generated,
                    stopped,
                },
            ) => Answer::Completion {
                text: text.clone(),
                generated: *generated,
                stopped: *stopped,
                tokens: prompt.len() as u64 + u64::from(*generated),
            },
            (WorkTask::Complete { .. }, WorkOutput::Embeddings(_)) => {
                return Err(Refusal::Failed("embeddings answering a completion".into()));
            }
        };
        let receipt = encode_body(&result.receipt).map_err(|e| Refusal::Failed(e.to_string()))?;
        Ok((answer, receipt))
    }
}

/// The model units of `kind` run on, if the pool serves one.
pub(crate) fn model_of(c: &Coordinator, kind: Kind) -> Option<ModelRef> {
    match kind {
        Kind::Embed => c.embedding_model().cloned(),
        Kind::Chat => Some(c.model().model.clone()),
    }
}

/// The OpenAI response body of a validated unit.
fn response_body(unit: &OpenUnit, answer: &Answer, model: &str) -> Value {
    match answer {
        Answer::Embeddings { vectors, tokens } => json!({
            "object": "list",
            "data": vectors.iter().enumerate().map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": v})).collect::<Vec<_>>(),
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
        Answer::Completion {
            text,
            generated,
            stopped,
            tokens,
        } => json!({
            "id": format!("chatcmpl-{}-{}", unit.batch, unit.id),
            "object": "chat.completion",
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": if *stopped { "stop" } else { "length" },
            }],
            "usage": {
                "prompt_tokens": tokens.saturating_sub(u64::from(*generated)),
                "completion_tokens": generated,
                "total_tokens": tokens,
            },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emb(x: f32) -> Answer {
        let v = vec![x, (1.0 - x * x).sqrt()];
        Answer::Embeddings {
            vectors: vec![v],
            tokens: 3,
        }
    }

    #[test]
    fn the_largest_agreeing_group_wins() {
        let origins: Vec<Origin> = (0..3).map(|i| Origin::Network(i.to_string())).collect();
        let origins: Vec<&Origin> = origins.iter().collect();
        // Two honest answers a hair apart agree; a corrupted one does not.
        let answers = [emb(0.6), emb(0.0), emb(0.600_001)];
        let tally = quorum::Tally::of(&origins, &answers, Answer::agrees);
        assert_eq!(tally.group, vec![0, 2]);
        let a = Answer::Completion {
            text: "hi".into(),
            generated: 1,
            stopped: true,
            tokens: 9,
        };
        let b = Answer::Completion {
            text: "ho".into(),
            generated: 1,
            stopped: true,
            tokens: 9,
        };
        assert!(!a.agrees(&b) && a.agrees(&a.clone()) && !a.agrees(&emb(1.0)));
    }
}
