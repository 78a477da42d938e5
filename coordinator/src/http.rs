//! The coordinator's OpenAI-compatible HTTP API: `GET /v1/models`,
//! `POST /v1/chat/completions` and `POST /v1/completions`, answered whole. Errors come in
//! OpenAI's JSON shape with fitting status codes; bodies are size-limited and every field is
//! checked before a session starts.

use crate::pool::{Coordinator, SessionError, SessionRequest};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use potluck_engine::chat::{chat_prompt_ids, ChatMessage};
use potluck_engine::generate::FinishReason;
use potluck_engine::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most tokens one request may ask for.
pub const MAX_TOKENS_LIMIT: u64 = 8192;
/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: u64 = 256;

/// The API's routes over `coordinator`.
pub fn router(coordinator: Coordinator) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(coordinator)
}

/// Serves the API on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coordinator: Coordinator,
) -> std::io::Result<()> {
    axum::serve(listener, router(coordinator)).await
}

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"message": self.message, "type": self.kind, "param": null, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let (status, kind) = match &e {
            SessionError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            SessionError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            SessionError::Failed(_) => (StatusCode::BAD_GATEWAY, "server_error"),
        };
        Self {
            status,
            kind,
            message: e.to_string(),
        }
    }
}

/// `stop` is a string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Fields both endpoints share.
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    stream: Option<bool>,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: String,
    #[serde(flatten)]
    common: Common,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// Checks the shared fields; returns the session request for `prompt` and the model name.
fn session_request(
    c: &Coordinator,
    common: Common,
    prompt: Vec<u32>,
) -> Result<(SessionRequest, String), ApiError> {
    let served = c.model().model.name.clone();
    if let Some(m) = &common.model {
        if m != &served {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: format!("the model '{m}' does not exist; this pool serves '{served}'"),
            });
        }
    }
    if common.stream == Some(true) {
        return Err(ApiError::bad("stream: true is not supported yet"));
    }
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only n = 1 is supported"));
    }
    let max_tokens = common
        .max_completion_tokens
        .or(common.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
        return Err(ApiError::bad(format!(
            "max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"
        )));
    }
    let stop = match common.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::bad("at most 4 stop sequences"));
    }
    let sampling = SamplingParams {
        temperature: common.temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: common.top_p.unwrap_or(1.0),
        min_p: 0.0,
        seed: common.seed.unwrap_or_else(rand_seed),
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .map_err(|e| ApiError::bad(e.to_string()))?;
    Ok((
        SessionRequest {
            prompt,
            max_tokens: max_tokens as usize,
            stop,
            sampling,
        },
        served,
    ))
}

fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(stats: &potluck_engine::generate::GenerateStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    })
}

fn id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand_seed())
}

async fn models(State(c): State<Coordinator>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": c.model().model.name, "object": "model", "created": 0, "owned_by": "potluck"}],
    }))
}

async fn chat(State(c): State<Coordinator>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let body: ChatBody = parse(&body)?;
    if body.messages.is_empty() {
        return Err(ApiError::bad("messages must not be empty"));
    }
    let prompt = chat_prompt_ids(&c.model().tokenizer, &body.messages)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let (req, model) = session_request(&c, body.common, prompt)?;
    let (text, stats) = c.generate(req, |_| {}).await?;
    Ok(Json(json!({
        "id": id("chatcmpl"),
        "object": "chat.completion",
        "created": potluck_net::swarm::unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason(stats.finish),
        }],
        "usage": usage(&stats),
    })))
}

async fn completions(State(c): State<Coordinator>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let body: CompletionBody = parse(&body)?;
    if body.prompt.is_empty() {
        return Err(ApiError::bad("prompt must not be empty"));
    }
    let prompt = c
        .model()
        .tokenizer
        .encode(&body.prompt)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let (req, model) = session_request(&c, body.common, prompt)?;
    let (text, stats) = c.generate(req, |_| {}).await?;
    Ok(Json(json!({
        "id": id("cmpl"),
        "object": "text_completion",
        "created": potluck_net::swarm::unix_now(),
        "model": model,
        "choices": [{
            "index": 0,
            "text": text,
            "finish_reason": finish_reason(stats.finish),
            "logprobs": null,
        }],
        "usage": usage(&stats),
    })))
}
