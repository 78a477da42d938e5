//! Runs open work units on the pool until quorum. Each unit goes to `quorum` peers of
//! different origins (operators where certificates name them, else networks: see
//! [`Origin`]) holding its model whole (least busy, then fastest, first); results of that many
//! origins that agree validate it and credit the peers that gave them, so one party's many
//! keys are one voice. A disagreement asks one more peer, up to
//! [`MAX_REPLICAS`]; peers outvoted by a quorum are quarantined and their credit voided. A
//! unit whose peer fails or times out simply runs elsewhere.

use super::input::{chat_line, embed_texts};
use super::store::{Asked, Kind, OpenUnit, Store};
use crate::compare::{vectors_agree, Verdict};
use crate::origin::Origin;
use crate::pool::{embedded, verify_work, Coordinator, Refusal};
use crate::template::chat_prompt_ids;
use libp2p::PeerId;
use potluck_engine::chat::ChatMessage;
use potluck_protocol::codec::encode_body;
use potluck_protocol::messages::{ModelRef, WorkOutput, WorkRequest, WorkTask};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Results that must agree before a unit counts, unless configured otherwise.
pub const DEFAULT_QUORUM: usize = 2;
/// Most results one unit may collect before it is given up as unresolvable.
pub const MAX_REPLICAS: usize = 5;
/// Units one peer runs at once (a second one hides the round trip).
const PER_PEER: usize = 2;
pub use crate::compare::EMBED_AGREEMENT;
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

/// A unit's results, read once per round: who gave each answer, and the largest group of
/// answers that agree.
struct Tally {
    peers: Vec<Asked>,
    answers: Vec<Answer>,
    group: Vec<usize>,
}

impl Tally {
    fn of(unit: &OpenUnit) -> Self {
        let (peers, answers): (Vec<Asked>, Vec<Answer>) = unit
            .results
            .iter()
            .filter_map(|(asked, o)| Some((asked.clone(), serde_json::from_str(o).ok()?)))
            .unzip();
        let group = largest_agreeing(&answers);
        Self {
            peers,
            answers,
            group,
        }
    }

    /// How many origins the agreeing group speaks for: the votes it has.
    fn voices(&self) -> usize {
        let origins: std::collections::HashSet<&Origin> = self
            .group
            .iter()
            .filter_map(|&i| self.peers.get(i).map(|a| &a.origin))
            .collect();
        origins.len()
    }
}

/// The batch runner: the store, the quorum, and what runs now.
pub struct Batches {
    /// The durable store.
    pub store: Arc<Store>,
    quorum: usize,
    wake: Notify,
    /// Units running on each peer now.
    busy: Mutex<HashMap<PeerId, usize>>,
}

impl Batches {
    /// A runner over `store` validating each unit by `quorum` agreeing results.
    pub fn new(store: Arc<Store>, quorum: usize) -> Arc<Self> {
        Arc::new(Self {
            store,
            quorum: quorum.clamp(1, MAX_REPLICAS),
            wake: Notify::new(),
            busy: Mutex::new(HashMap::new()),
        })
    }

    /// Results that must agree.
    pub fn quorum(&self) -> usize {
        self.quorum
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
            let tally = Tally::of(&unit);
            if self.decide(c, &unit, &model, &tally)? {
                continue;
            }
            let wanted = self.wanted(&unit, &tally);
            if wanted == 0 {
                continue;
            }
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

    /// How many more assignments `unit` needs now: enough for a quorum if every result
    /// agreed, plus one per result that did not add a voice.
    fn wanted(&self, unit: &OpenUnit, tally: &Tally) -> usize {
        let answers = tally.answers.len();
        let target = (self.quorum + answers).saturating_sub(tally.voices());
        target
            .min(MAX_REPLICAS)
            .saturating_sub(answers + unit.running.len())
    }

    /// Up to `n` peers for `unit`, least busy first: not full, and each of an origin that
    /// has not answered it, is not running it, and is not picked twice here.
    fn pick(&self, peers: &[(PeerId, Origin)], unit: &OpenUnit, n: usize) -> Vec<(PeerId, Origin)> {
        let busy = self.lock_busy();
        let mut free: Vec<(usize, usize, &(PeerId, Origin))> = peers
            .iter()
            .enumerate()
            .filter(|(_, (p, origin))| !unit.asked(&p.to_string()) && !unit.heard_from(origin))
            .map(|(rank, p)| (busy.get(&p.0).copied().unwrap_or(0), rank, p))
            .filter(|(load, _, _)| *load < PER_PEER)
            .collect();
        free.sort_by_key(|(load, rank, _)| (*load, *rank));
        let mut picked: Vec<(PeerId, Origin)> = Vec::new();
        for (_, _, (peer, origin)) in free {
            if picked.len() < n && !picked.iter().any(|(_, o)| o == origin) {
                picked.push((*peer, origin.clone()));
            }
        }
        picked
    }

    /// Validates or gives up on `unit` if its results allow; true if it is decided.
    fn decide(
        &self,
        c: &Coordinator,
        unit: &OpenUnit,
        model: &ModelRef,
        tally: &Tally,
    ) -> Result<bool, super::store::StoreError> {
        let Tally {
            peers,
            answers,
            group,
        } = tally;
        if tally.voices() >= self.quorum {
            let Some(winner) = group.first().and_then(|&i| answers.get(i)) else {
                return Ok(false);
            };
            // A quarantined peer earns nothing, even for a result that agrees.
            let credited: Vec<String> = group
                .iter()
                .filter_map(|&i| peers.get(i).map(|a| a.peer.clone()))
                .filter(|p| p.parse::<PeerId>().is_ok_and(|id| !c.is_quarantined(id)))
                .collect();
            let tokens = winner.tokens();
            let flops = tokens as f64 * c.flops_per_token(unit.kind == Kind::Embed) as f64;
            let body = response_body(unit, winner, &model.name);
            if self
                .store
                .validate(unit.id, &body.to_string(), tokens, flops, &credited)?
            {
                for (i, asked) in peers.iter().enumerate() {
                    let Ok(id) = asked.peer.parse::<PeerId>() else {
                        continue;
                    };
                    if group.contains(&i) {
                        c.record_trust(id, Verdict::Pass);
                    } else {
                        c.record_trust(id, Verdict::Fail);
                        c.quarantine(id, &format!("outvoted on batch unit {}", unit.id));
                    }
                }
            }
            return Ok(true);
        }
        if answers.len() >= MAX_REPLICAS {
            self.store.fail_unit(
                unit.id,
                &format!(
                    "{MAX_REPLICAS} results and no {} of them from different operators or networks agree",
                    self.quorum
                ),
            )?;
            return Ok(true);
        }
        Ok(false)
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

/// Indices of the largest set of answers that all agree with one of them.
fn largest_agreeing(answers: &[Answer]) -> Vec<usize> {
    (0..answers.len())
        .map(|i| {
            (0..answers.len())
                .filter(|&j| {
                    answers
                        .get(i)
                        .zip(answers.get(j))
                        .is_some_and(|(a, b)| a.agrees(b))
                })
                .collect::<Vec<_>>()
        })
        .max_by_key(Vec::len)
        .unwrap_or_default()
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
        assert!(largest_agreeing(&[]).is_empty());
        assert_eq!(largest_agreeing(&[emb(1.0)]), vec![0]);
        // Two honest answers a hair apart agree; a corrupted one does not.
        let answers = [emb(0.6), emb(0.0), emb(0.600_001)];
        assert_eq!(largest_agreeing(&answers), vec![0, 2]);
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
