//! `POST /v1/embeddings` in OpenAI's shape: the inputs are split across the nodes holding the
//! pool's sentence encoder, and the vectors come back in order, as floats or base64.

use super::openai::parse;
use super::state::AppState;
use super::ApiError;
use crate::batch::input::input_texts;
use crate::pool::Coordinator;
use crate::share::MemberId;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};
use base64::Engine as _;
use potluck_engine::bert::MAX_TEXTS;
use potluck_protocol::messages::ModelRef;
use serde::Deserialize;
use serde_json::{json, Value};

/// Largest embeddings request body: many inputs at once is the point of the endpoint.
pub const MAX_EMBED_BODY_BYTES: usize = 16 << 20;

/// The embeddings route.
pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/v1/embeddings",
        post(embeddings).layer(DefaultBodyLimit::max(MAX_EMBED_BODY_BYTES)),
    )
}

#[derive(Deserialize)]
struct EmbeddingsBody {
    /// One string or a list of strings (see [`input_texts`]).
    input: Value,
    model: Option<String>,
    encoding_format: Option<String>,
    dimensions: Option<usize>,
}

/// A checked request: the encoder, the texts, and whether to answer in base64.
type Checked = (ModelRef, Vec<String>, bool);

fn check(c: &Coordinator, body: EmbeddingsBody) -> Result<Checked, ApiError> {
    let model = c.embedding_model().cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this pool serves no embedding model (start the coordinator with --embedding-model)",
        )
    })?;
    if let Some(asked) = body.model.as_deref().filter(|m| *m != model.name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "the model '{asked}' does not exist; this pool serves {}",
                super::openai::served_models(c)
            ),
        )
        .with_code("model_not_found")
        .with_param("model"));
    }
    let texts = input_texts(&body.input, MAX_TEXTS).map_err(ApiError::bad)?;
    let base64 = match body.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "encoding_format must be float or base64, not {other}"
            )))
        }
    };
    if body.dimensions.is_some() {
        return Err(ApiError::bad(
            "dimensions is not supported: this model's vectors have a fixed width",
        ));
    }
    Ok((model, texts, base64))
}

async fn embeddings(
    State(c): State<Coordinator>,
    Extension(member): Extension<MemberId>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body: EmbeddingsBody = parse(body, MAX_EMBED_BODY_BYTES)?;
    let (model, texts, base64) = check(&c, body)?;
    let done = c.embed(&model, texts).await?;
    c.share()
        .record(member, done.tokens, potluck_net::swarm::unix_now());
    let data: Vec<Value> = done
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
    })))
}
