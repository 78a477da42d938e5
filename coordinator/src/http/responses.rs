//! OpenAI's Responses API (`/v1/responses`), the text subset newer clients use: `input` as a
//! string or a list of messages with text parts, `instructions`, `max_output_tokens`,
//! `temperature`, `top_p`, whole or streamed as typed server-sent events. It runs the same
//! chat session as `/v1/chat/completions`, so greedy text is the same. What this pool cannot
//! carry out (tools, stored conversations, images, structured output) is refused by name.

use super::openai::{check, off_the_workers, random_u64, ready, whole, Checked, Common, Content};
use super::state::AppState;
use super::ApiError;
use crate::pool::Coordinator;
use crate::share::MemberId;
use crate::template::chat_prompt_ids;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use potluck_engine::chat::ChatMessage;
use potluck_engine::generate::{FinishReason, GenerateStats};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The route.
pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/responses", post(responses))
}

/// `input`: one user message as a string, or a list of items.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<Item>),
}

/// An input item; only messages (`type` absent or "message") are served.
#[derive(Deserialize)]
struct Item {
    #[serde(rename = "type")]
    kind: Option<String>,
    role: Option<String>,
    content: Option<Content>,
}

#[derive(Deserialize)]
struct ResponsesBody {
    model: Option<String>,
    input: Input,
    instructions: Option<String>,
    max_output_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stream: Option<bool>,
    // Asked for, these would change the answer: refused by name.
    include: Option<Value>,
    reasoning: Option<Value>,
    prompt: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    top_logprobs: Option<Value>,
    text: Option<Value>,
    previous_response_id: Option<String>,
    conversation: Option<Value>,
    background: Option<bool>,
}

/// The conversation a request's `instructions` and `input` make.
fn conversation(instructions: Option<String>, input: Input) -> Result<Vec<ChatMessage>, ApiError> {
    let mut messages: Vec<ChatMessage> = instructions
        .filter(|i| !i.is_empty())
        .map(|i| ChatMessage::new("system", &i))
        .into_iter()
        .collect();
    let items = match input {
        Input::Text(t) if t.is_empty() => {
            return Err(ApiError::bad("input must not be empty").with_param("input"))
        }
        Input::Text(t) => {
            messages.push(ChatMessage::new("user", &t));
            return Ok(messages);
        }
        Input::Items(items) => items,
    };
    if items.is_empty() {
        return Err(ApiError::bad("input must not be empty").with_param("input"));
    }
    if items.len() > super::openai::MAX_MESSAGES {
        return Err(ApiError::bad(format!(
            "input holds at most {} items",
            super::openai::MAX_MESSAGES
        ))
        .with_param("input"));
    }
    for (i, item) in items.into_iter().enumerate() {
        let kind = item.kind.as_deref().unwrap_or("message");
        if kind != "message" {
            return Err(ApiError::bad(format!(
                "input[{i}] is a '{kind}' item; only messages with text are served"
            ))
            .with_param("input"));
        }
        let role = match item.role.as_deref() {
            Some("system" | "developer") => "system",
            Some(r @ ("user" | "assistant")) => r,
            other => {
                return Err(ApiError::bad(format!(
                    "input[{i}].role {other:?} is not system, developer, user or assistant"
                ))
                .with_param("input"))
            }
        };
        let text = match item.content {
            None => String::new(),
            Some(c) => c.text(
                &["input_text", "output_text", "text"],
                &format!("input[{i}]"),
                "input",
            )?,
        };
        messages.push(ChatMessage::new(role, &text));
    }
    Ok(messages)
}

/// Refuses what the Responses API asks for that this pool does not do, naming the field.
fn refuse_unserved(body: &ResponsesBody) -> Result<(), ApiError> {
    let refuse = |param: &'static str, why: String| Err(ApiError::bad(why).with_param(param));
    if body.previous_response_id.is_some()
        || body.conversation.as_ref().is_some_and(|v| !v.is_null())
    {
        let param = if body.previous_response_id.is_some() {
            "previous_response_id"
        } else {
            "conversation"
        };
        return refuse(
            param,
            format!("{param}: this pool stores no responses; send the whole conversation in input"),
        );
    }
    if body
        .include
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return refuse(
            "include",
            "include: this pool returns no extra output (log probabilities, sources or reasoning)"
                .into(),
        );
    }
    if body.reasoning.as_ref().is_some_and(|r| !r.is_null()) {
        return refuse(
            "reasoning",
            "reasoning: this pool's models do not reason in a separate channel".into(),
        );
    }
    if body.prompt.as_ref().is_some_and(|p| !p.is_null()) {
        return refuse(
            "prompt",
            "prompt: this pool stores no prompt templates; send the text in input".into(),
        );
    }
    if body.background == Some(true) {
        return refuse(
            "background",
            "background: responses are answered while the request waits; for queued work use /v1/batches".into(),
        );
    }
    let format = body
        .text
        .as_ref()
        .and_then(|t| t.get("format"))
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("text");
    if format != "text" {
        return refuse(
            "text.format",
            format!("text.format: '{format}' is not supported; only text is"),
        );
    }
    Ok(())
}

async fn responses(
    State(c): State<Coordinator>,
    Extension(member): Extension<MemberId>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let pool = c.clone();
    let run = move || -> Result<(Checked, Echo), ApiError> {
        let body: ResponsesBody = super::openai::parse(body, super::MAX_BODY_BYTES)?;
        refuse_unserved(&body)?;
        let echo = Echo {
            instructions: body.instructions.clone(),
            max_output_tokens: body.max_output_tokens,
            temperature: body.temperature.map_or(1.0, echo_float),
            top_p: body.top_p.map_or(1.0, echo_float),
        };
        let messages = conversation(body.instructions, body.input)?;
        let prompt = chat_prompt_ids(&pool.model().tokenizer, &messages)
            .map_err(|e| ApiError::bad(e.to_string()))?;
        let common = Common {
            model: body.model,
            max_tokens: body.max_output_tokens,
            temperature: body.temperature,
            top_p: body.top_p,
            stream: body.stream,
            tools: body.tools,
            tool_choice: body.tool_choice,
            top_logprobs: body.top_logprobs,
            max_tokens_param: Some("max_output_tokens"),
            ..Common::default()
        };
        Ok((check(&pool, common, prompt, member)?, echo))
    };
    let (checked, echo) = match off_the_workers(run).await {
        Ok(ready) => ready,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = ready(&c) {
        return e.into_response();
    }
    let meta = Meta {
        id: format!("resp_{:016x}{:016x}", random_u64(), random_u64()),
        item: format!("msg_{:016x}{:016x}", random_u64(), random_u64()),
        created: potluck_net::swarm::unix_now(),
        model: checked.model.clone(),
        echo,
    };
    if checked.stream {
        return stream(c, checked, meta).into_response();
    }
    match whole(&c, checked.req).await {
        Ok((text, stats)) => Json(meta.response(Some((&text, &stats)))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Settings a response repeats back, as OpenAI's do.
struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<u64>,
    temperature: f64,
    top_p: f64,
}

/// A setting as the client wrote it: 0.7 read as an f32 is 0.699999988, which would be
/// echoed so; its shortest decimal form is what was sent.
fn echo_float(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// What one response's object and events share.
struct Meta {
    id: String,
    item: String,
    created: u64,
    model: String,
    echo: Echo,
}

impl Meta {
    /// The assistant's message item: done with `text` (cut short at the token limit or
    /// not), or in progress with none yet.
    fn message(&self, text: Option<(&str, FinishReason)>) -> Value {
        let (status, content) = match text {
            Some((t, FinishReason::Stop)) => ("completed", json!([output_text(t)])),
            Some((t, FinishReason::Length)) => ("incomplete", json!([output_text(t)])),
            None => ("in_progress", json!([])),
        };
        json!({"type": "message", "id": self.item, "status": status, "role": "assistant",
               "content": content})
    }

    /// The response object: finished when `done` gives its text and stats, else in progress.
    fn response(&self, done: Option<(&str, &GenerateStats)>) -> Value {
        let (status, incomplete, output, usage) = match done {
            None => ("in_progress", Value::Null, json!([]), Value::Null),
            Some((text, stats)) => {
                let (status, incomplete) = match stats.finish {
                    FinishReason::Stop => ("completed", Value::Null),
                    FinishReason::Length => ("incomplete", json!({"reason": "max_output_tokens"})),
                };
                let usage = json!({
                    "input_tokens": stats.prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": stats.generated_tokens,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": stats.prompt_tokens + stats.generated_tokens,
                });
                (
                    status,
                    incomplete,
                    json!([self.message(Some((text, stats.finish)))]),
                    usage,
                )
            }
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created,
            "status": status, "error": null, "incomplete_details": incomplete,
            "model": self.model, "output": output, "usage": usage,
            "instructions": self.echo.instructions,
            "max_output_tokens": self.echo.max_output_tokens,
            "temperature": self.echo.temperature, "top_p": self.echo.top_p,
            "parallel_tool_calls": false, "tool_choice": "none", "tools": [],
            "text": {"format": {"type": "text"}}, "store": false, "metadata": {},
        })
    }
}

fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": []})
}

/// Numbers and names the events of one streamed response.
struct Events {
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
    seq: u64,
}

impl Events {
    /// Sends an event of `kind` with `fields`; whether the client is still there.
    fn send(&mut self, kind: &str, mut fields: Value) -> bool {
        if let Some(map) = fields.as_object_mut() {
            map.insert("type".into(), json!(kind));
            map.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        let ev = Event::default().event(kind).data(fields.to_string());
        self.tx.send(ev).is_ok()
    }
}

/// Streams a response as OpenAI's typed events: created, in progress, the message and its
/// text part opened, a delta per piece of text, then each closed, then completed (or
/// incomplete at max_output_tokens, or an error event). A client that goes away cancels
/// the session before its next step.
fn stream(c: Coordinator, checked: Checked, meta: Meta) -> impl IntoResponse {
    // Unbounded for the same reason as chat streams: generation never waits on a reader;
    // a session's events are bounded by its token limit.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let handle = checked.req.handle.clone();
    tokio::spawn(async move {
        let meta = Arc::new(meta);
        let mut ev = Events { tx, seq: 0 };
        let part = json!({"item_id": meta.item, "output_index": 0, "content_index": 0});
        let opened = ev.send("response.created", json!({"response": meta.response(None)}))
            && ev.send(
                "response.in_progress",
                json!({"response": meta.response(None)}),
            )
            && ev.send(
                "response.output_item.added",
                json!({"output_index": 0, "item": meta.message(None)}),
            )
            && ev.send(
                "response.content_part.added",
                json!({"item_id": meta.item, "output_index": 0, "content_index": 0,
                       "part": output_text("")}),
            );
        if !opened {
            return;
        }
        let pieces = Arc::new(std::sync::Mutex::new(ev));
        let (sink, cancel) = (pieces.clone(), handle.clone());
        let delta_of = part.clone();
        let result = c
            .generate(checked.req, move |piece| {
                let mut fields = delta_of.clone();
                fields["delta"] = json!(piece);
                fields["logprobs"] = json!([]);
                let mut ev = sink.lock().unwrap_or_else(|p| p.into_inner());
                if !ev.send("response.output_text.delta", fields) {
                    cancel.cancelled.store(true, Ordering::Relaxed);
                }
            })
            .await;
        let mut ev = pieces.lock().unwrap_or_else(|p| p.into_inner());
        let (text, stats) = match result {
            Ok(done) => done,
            Err(e) => {
                let body = ApiError::from(e).body();
                let err = &body["error"];
                ev.send(
                    "error",
                    json!({"code": err["code"], "message": err["message"], "param": err["param"]}),
                );
                return;
            }
        };
        let mut done = part.clone();
        done["text"] = json!(text);
        done["logprobs"] = json!([]);
        let mut part_done = part;
        part_done["part"] = output_text(&text);
        let finished = meta.response(Some((&text, &stats)));
        let last = match stats.finish {
            FinishReason::Stop => "response.completed",
            FinishReason::Length => "response.incomplete",
        };
        let _ = ev.send("response.output_text.done", done)
            && ev.send("response.content_part.done", part_done)
            && ev.send(
                "response.output_item.done",
                json!({"output_index": 0, "item": meta.message(Some((&text, stats.finish)))}),
            )
            && ev.send(last, json!({"response": finished}));
    });
    super::openai::sse(rx)
}
