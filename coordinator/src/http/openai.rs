//! OpenAI's API shape over the pool: `/v1/chat/completions` and `/v1/completions`, whole or
//! streamed as server-sent events, and `/v1/models`. Fields are checked before a session
//! starts; a client that goes away mid-generation ends its session.

use super::state::AppState;
use super::ApiError;
use crate::pipeline::SessionHandle;
use crate::pool::{Coordinator, SessionRequest};
use crate::share::MemberId;
use crate::template::chat_prompt_ids;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use potluck_engine::chat::ChatMessage;
use potluck_engine::generate::{FinishReason, GenerateStats};
use potluck_engine::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Most tokens one request may ask for.
pub const MAX_TOKENS_LIMIT: u64 = 8192;
/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: u64 = 256;
/// Most stop sequences (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// Most messages in one chat request.
pub const MAX_MESSAGES: usize = 1024;

/// The API routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
}

/// `stop` is a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub(super) struct StreamOptions {
    include_usage: Option<bool>,
}

/// Fields both endpoints share (and the Responses API maps its own onto). Fields this
/// server does not use are ignored, as OpenAI's clients send many.
#[derive(Deserialize, Default)]
pub(super) struct Common {
    pub(super) model: Option<String>,
    pub(super) max_tokens: Option<u64>,
    pub(super) max_completion_tokens: Option<u64>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) seed: Option<u64>,
    pub(super) stop: Option<Stop>,
    pub(super) n: Option<u32>,
    pub(super) stream: Option<bool>,
    pub(super) stream_options: Option<StreamOptions>,
    // Asked for, these would change what an answer is: refused by name, never ignored.
    pub(super) tools: Option<Value>,
    pub(super) tool_choice: Option<Value>,
    pub(super) functions: Option<Value>,
    pub(super) function_call: Option<Value>,
    pub(super) logprobs: Option<Value>,
    pub(super) top_logprobs: Option<Value>,
    pub(super) response_format: Option<Value>,
    /// What the request calls its token limit (`max_tokens` unless an endpoint says), so
    /// a bad one is refused by the name the client sent.
    #[serde(skip)]
    pub(super) max_tokens_param: Option<&'static str>,
}

/// Whether a field's value asks for something (not absent, null, false, 0, "none" or empty).
fn asks(v: &Option<Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => s != "none",
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}

/// Refuses the fields this server does not carry out, naming each.
fn refuse_unsupported(common: &Common) -> Result<(), ApiError> {
    let refuse = |param: &'static str, why: &str| Err(ApiError::bad(why).with_param(param));
    // "auto" with no tools asks for nothing (older clients send it by default).
    let not_auto = |v: &Option<Value>| v.clone().filter(|v| v.as_str() != Some("auto"));
    for (param, value) in [
        ("tools", &common.tools),
        ("tool_choice", &not_auto(&common.tool_choice)),
        ("functions", &common.functions),
        ("function_call", &not_auto(&common.function_call)),
    ] {
        if asks(value) {
            return refuse(
                param,
                &format!("{param}: tool and function calling are not supported; this pool's models answer in text"),
            );
        }
    }
    for (param, value) in [
        ("logprobs", &common.logprobs),
        ("top_logprobs", &common.top_logprobs),
    ] {
        if asks(value) {
            return refuse(
                param,
                &format!("{param}: log probabilities are not returned by this pool"),
            );
        }
    }
    if let Some(format) = common.response_format.as_ref().filter(|v| !v.is_null()) {
        let kind = format.get("type").and_then(Value::as_str).unwrap_or("?");
        if kind != "text" {
            return refuse(
                "response_format",
                &format!("response_format: '{kind}' is not supported; only text is"),
            );
        }
    }
    Ok(())
}

/// A message's content: a string, or a list of parts of which text parts are read.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub(super) struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl Content {
    /// The text of message `at` (e.g. `messages[2]`, in the request's field `param`):
    /// parts whose type is one of `text_kinds` are read; any other part is refused.
    pub(super) fn text(
        self,
        text_kinds: &[&str],
        at: &str,
        param: &'static str,
    ) -> Result<String, ApiError> {
        let parts = match self {
            Content::Text(t) => return Ok(t),
            Content::Parts(parts) => parts,
        };
        let mut text = String::new();
        for p in parts {
            match (p.kind.as_str(), p.text) {
                (kind, Some(t)) if text_kinds.contains(&kind) => text.push_str(&t),
                (kind, _) => {
                    return Err(ApiError::bad(format!(
                        "{at} has a '{kind}' part; only text is supported"
                    ))
                    .with_param(param))
                }
            }
        }
        Ok(text)
    }
}

#[derive(Deserialize)]
struct MessageIn {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<MessageIn>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: String,
    #[serde(flatten)]
    common: Common,
}

/// Which endpoint's shape answers are in.
#[derive(Clone, Copy)]
enum Shape {
    Chat,
    Completion,
}

/// A checked request, ready to run.
pub(super) struct Checked {
    pub(super) req: SessionRequest,
    pub(super) model: String,
    pub(super) stream: bool,
    include_usage: bool,
}

/// The JSON body of a request whose route accepts at most `limit` bytes.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| match e {
        BytesRejection::FailedToBufferBody(_) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body exceeds {limit} bytes"),
            )
        }
        other => ApiError::bad(format!("could not read the request body: {other}")),
    })?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("invalid request: {e}")))
}

fn chat_messages(messages: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages must not be empty"));
    }
    if messages.len() > MAX_MESSAGES {
        return Err(ApiError::bad(format!("at most {MAX_MESSAGES} messages")));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" | "assistant" | "tool" => m.role.as_str(),
                other => {
                    return Err(ApiError::bad(format!(
                        "messages[{i}].role '{other}' is not system, developer, user, assistant or tool"
                    )))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(c) => c.text(&["text"], &format!("messages[{i}]"), "messages")?,
            };
            Ok(ChatMessage::new(role, &content))
        })
        .collect()
}

pub(super) fn check(
    c: &Coordinator,
    common: Common,
    prompt: Vec<u32>,
    member: MemberId,
) -> Result<Checked, ApiError> {
    let served = c.model().model.name.clone();
    if let Some(m) = &common.model {
        if m != &served {
            let message = if c.embedding_model().is_some_and(|e| &e.name == m) {
                format!("'{m}' is this pool's embedding model: send it to /v1/embeddings; chat and completions use '{served}'")
            } else {
                format!(
                    "the model '{m}' does not exist; this pool serves {}",
                    served_models(c)
                )
            };
            return Err(
                ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
                    .with_code("model_not_found")
                    .with_param("model"),
            );
        }
    }
    refuse_unsupported(&common)?;
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only n = 1 is supported"));
    }
    let max_tokens = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
        let param = common.max_tokens_param.unwrap_or("max_tokens");
        return Err(
            ApiError::bad(format!("{param} must be between 1 and {MAX_TOKENS_LIMIT}"))
                .with_param(param),
        );
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature must be between 0 and 2").with_param("temperature"));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p must be in (0, 1]").with_param("top_p"));
    }
    let stop = match common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOPS || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(ApiError::bad(format!(
            "stop takes at most {MAX_STOPS} non-empty strings of up to 256 bytes"
        )));
    }
    let context = c.model().config.context;
    if prompt.len() >= context {
        return Err(ApiError::bad(format!(
            "the prompt has {} tokens; the model's context is {context}",
            prompt.len()
        ))
        .with_code("context_length_exceeded"));
    }
    let sampling = SamplingParams {
        temperature,
        top_k: 0,
        top_p,
        min_p: 0.0,
        seed: common.seed.unwrap_or_else(random_u64),
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let stream = common.stream.unwrap_or(false);
    Ok(Checked {
        req: SessionRequest {
            prompt,
            max_tokens: max_tokens as usize,
            stop,
            sampling,
            handle: Arc::new(SessionHandle::default()),
            member,
        },
        model: served,
        stream,
        include_usage: stream
            && common
                .stream_options
                .unwrap_or_default()
                .include_usage
                .unwrap_or(false),
    })
}

pub(super) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // A failed draw leaves zeros: still a valid seed.
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(stats: &GenerateStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    })
}

/// Ends the session if the handler is dropped (the client hung up) before it finishes.
struct CancelOnDrop(Arc<SessionHandle>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancelled.store(true, Ordering::Relaxed);
    }
}

async fn models(State(c): State<Coordinator>) -> Json<Value> {
    let cards: Vec<Value> = model_names(&c).into_iter().map(model_card).collect();
    Json(json!({"object": "list", "data": cards}))
}

/// What the pool serves, in words, for a 404 that names them.
pub(super) fn served_models(c: &Coordinator) -> String {
    let chat = format!("'{}' (chat and completions)", c.model().model.name);
    match c.embedding_model() {
        Some(e) => format!("{chat} and '{}' (embeddings)", e.name),
        None => chat,
    }
}

/// The pool's models: the chat model, then the sentence encoder if there is one.
fn model_names(c: &Coordinator) -> Vec<&str> {
    let mut names = vec![c.model().model.name.as_str()];
    names.extend(c.embedding_model().map(|m| m.name.as_str()));
    names
}

async fn model(
    State(c): State<Coordinator>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !model_names(&c).contains(&id.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model '{id}' does not exist; this pool serves {}",
                served_models(&c)
            ),
        )
        .with_code("model_not_found"));
    }
    Ok(Json(model_card(&id)))
}

fn model_card(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "potluck"})
}

async fn chat(
    State(c): State<Coordinator>,
    Extension(member): Extension<MemberId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let pool = c.clone();
    let run = move || -> Result<Checked, ApiError> {
        let body: ChatBody = parse(body, super::MAX_BODY_BYTES)?;
        let messages = chat_messages(body.messages)?;
        let prompt = chat_prompt_ids(&pool.model().tokenizer, &messages)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        check(&pool, body.common, prompt, member)
    };
    match off_the_workers(run).await {
        Ok(checked) => answer(c, checked, Shape::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(
    State(c): State<Coordinator>,
    Extension(member): Extension<MemberId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let pool = c.clone();
    let run = move || -> Result<Checked, ApiError> {
        let body: CompletionBody = parse(body, super::MAX_BODY_BYTES)?;
        if body.prompt.is_empty() {
            return Err(ApiError::bad("prompt must not be empty"));
        }
        let prompt = pool
            .model()
            .tokenizer
            .encode(&body.prompt)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        check(&pool, body.common, prompt, member)
    };
    match off_the_workers(run).await {
        Ok(checked) => answer(c, checked, Shape::Completion).await,
        Err(e) => e.into_response(),
    }
}

/// Runs a request's CPU work (its body, template and tokens) off the async workers.
pub(super) async fn off_the_workers<T: Send + 'static>(
    run: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::cpu::run(run).await.unwrap_or_else(|| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "preparing the request failed",
        ))
    })
}

/// Runs a checked request and answers whole or as a stream.
async fn answer(c: Coordinator, checked: Checked, shape: Shape) -> Response {
    if let Err(e) = ready(&c) {
        return e.into_response();
    }
    let id = match shape {
        Shape::Chat => format!("chatcmpl-{:016x}", random_u64()),
        Shape::Completion => format!("cmpl-{:016x}", random_u64()),
    };
    let created = potluck_net::swarm::unix_now();
    let meta = Meta {
        id,
        created,
        model: checked.model.clone(),
        shape,
    };
    if checked.stream {
        return stream(c, checked, meta).into_response();
    }
    match whole(&c, checked.req).await {
        Ok((text, stats)) => Json(meta.whole(&text, &stats)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Refuses a request, before any stream starts, when the pool cannot serve.
pub(super) fn ready(c: &Coordinator) -> Result<(), ApiError> {
    c.chain().map(|_| ()).map_err(|e| {
        c.metrics().failure(e.kind());
        ApiError::from(e)
    })
}

/// Runs a session to its end for a whole (not streamed) answer; a client that hangs up
/// first ends it.
pub(super) async fn whole(
    c: &Coordinator,
    req: SessionRequest,
) -> Result<(String, GenerateStats), ApiError> {
    let _cancel = CancelOnDrop(req.handle.clone());
    c.generate(req, |_| {}).await.map_err(ApiError::from)
}

/// What every answer and chunk of one request repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    shape: Shape,
}

impl Meta {
    fn whole(&self, text: &str, stats: &GenerateStats) -> Value {
        let (object, choice) = match self.shape {
            Shape::Chat => (
                "chat.completion",
                json!({"index": 0, "message": {"role": "assistant", "content": text},
                       "logprobs": null, "finish_reason": finish_reason(stats.finish)}),
            ),
            Shape::Completion => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null,
                       "finish_reason": finish_reason(stats.finish)}),
            ),
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [choice], "usage": usage(stats)})
    }

    /// A streamed chunk carrying `text` (and the role, on a chat's first chunk).
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<FinishReason>) -> Value {
        let reason = finish.map(finish_reason);
        let (object, choice) = match self.shape {
            Shape::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}),
                )
            }
            Shape::Completion => (
                "text_completion",
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                       "finish_reason": reason}),
            ),
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [choice]})
    }

    fn usage_chunk(&self, stats: &GenerateStats) -> Value {
        let object = match self.shape {
            Shape::Chat => "chat.completion.chunk",
            Shape::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "choices": [], "usage": usage(stats)})
    }
}

/// Streams a generation as server-sent events: a chunk per piece of text, a final chunk with
/// the finish reason, the usage when asked, then `[DONE]`. If the client goes away, sending
/// fails and the session is cancelled before its next step.
fn stream(c: Coordinator, checked: Checked, meta: Meta) -> impl IntoResponse {
    // Unbounded because the generation side must never wait on a slow reader; a session's
    // events are bounded by its max_tokens.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let handle = checked.req.handle.clone();
    let include_usage = checked.include_usage;
    tokio::spawn(async move {
        let meta = Arc::new(meta);
        let first = Event::default().data(meta.chunk(None, true, None).to_string());
        if tx.send(first).is_err() {
            return;
        }
        let (pieces, m) = (tx.clone(), meta.clone());
        let cancel = handle.clone();
        let result = c
            .generate(checked.req, move |piece| {
                let ev = Event::default().data(m.chunk(Some(piece), false, None).to_string());
                if pieces.send(ev).is_err() {
                    cancel.cancelled.store(true, Ordering::Relaxed);
                }
            })
            .await;
        let mut tail = Vec::new();
        match result {
            Ok((_, stats)) => {
                tail.push(meta.chunk(None, false, Some(stats.finish)));
                if include_usage {
                    tail.push(meta.usage_chunk(&stats));
                }
            }
            Err(e) => tail.push(ApiError::from(e).body()),
        }
        for v in tail {
            if tx.send(Event::default().data(v.to_string())).is_err() {
                return;
            }
        }
        let _ = tx.send(Event::default().data("[DONE]"));
    });
    sse(rx)
}

/// The server-sent-event answer that sends what arrives on `rx`, with keep-alives, until
/// its sender is gone.
pub(super) fn sse(rx: tokio::sync::mpsc::UnboundedReceiver<Event>) -> impl IntoResponse {
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
