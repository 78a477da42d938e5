//! OpenAI's Files and Batches API over the job store: upload a JSONL file
//! (`POST /v1/files`), start a batch on it (`POST /v1/batches`), follow it
//! (`GET /v1/batches/{id}`), cancel it, and download its output and error files
//! (`GET /v1/files/{id}/content`). `GET /api/credits` shows the credit ledger.

use super::state::AppState;
use super::ApiError;
use crate::batch::input::{parse, MAX_FILE_BYTES};
use crate::batch::scheduler::model_of;
use crate::batch::{BatchInfo, Batches, Kind, Store, StoreError};
use crate::pool::Coordinator;
use crate::share::MemberId;
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Prefix of a batch's output file id (the batch id follows).
const OUTPUT_PREFIX: &str = "file-out-";
/// Prefix of a batch's error file id.
const ERRORS_PREFIX: &str = "file-err-";

/// The Files, Batches and credit routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/files",
            post(upload).layer(DefaultBodyLimit::max(MAX_FILE_BYTES + (1 << 20))),
        )
        .route("/v1/files/{id}", get(file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create).get(list))
        .route("/v1/batches/{id}", get(batch))
        .route("/v1/batches/{id}/cancel", post(cancel))
        .route("/api/credits", get(credits))
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                e.to_string(),
            ),
            StoreError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_request_error", e.to_string())
            }
            StoreError::Full(_) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient_storage",
                e.to_string(),
            ),
            StoreError::Sqlite(_) | StoreError::File { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            ),
        }
    }
}

/// Runs `f` on the coordinator's job store, off the async threads (SQLite writes sync to
/// disk).
async fn with_store<T: Send + 'static>(
    app: &AppState,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = runner(app)?.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.to_string(),
            )
        })?
        .map_err(ApiError::from)
}

fn runner(app: &AppState) -> Result<&Arc<Batches>, ApiError> {
    app.batches.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this coordinator keeps no job store",
        )
    })
}

fn file_json(f: &crate::batch::FileInfo) -> Value {
    json!({
        "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
        "filename": f.filename, "purpose": f.purpose,
    })
}

/// A batch in OpenAI's shape, with what the pool can give it under `potluck`.
fn batch_json(app: &AppState, b: &BatchInfo) -> Value {
    let c = &app.pool;
    let mut v = openai_batch(b);
    let quorum = app.batches.as_ref().map_or(0, |r| r.quorum());
    let holders = model_of(c, b.kind).map_or_else(Vec::new, |m| c.holders(&m));
    let origins: std::collections::HashSet<_> = holders.iter().map(|(p, _)| c.origin(*p)).collect();
    let (nodes, origins) = (holders.len(), origins.len());
    let waiting = (b.status == "in_progress" && origins < quorum).then(|| {
        format!(
            "each unit needs {quorum} agreeing results from different operators or networks, and the {nodes} node(s) holding {} now come from {origins}",
            b.model
        )
    });
    v["potluck"] = json!({
        "quorum": quorum,
        "nodes_holding_model": nodes,
        "origins_holding_model": origins,
        "results_returned": b.results,
        "waiting": waiting,
    });
    v
}

/// A batch in OpenAI's shape.
fn openai_batch(b: &BatchInfo) -> Value {
    let finished = b.finished_at;
    let done = matches!(b.status.as_str(), "completed" | "cancelled");
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.kind.endpoint(),
        "model": b.model,
        "errors": b.error.as_ref().map(|e| json!({"object": "list", "data": [{"code": "batch_failed", "message": e}]})),
        "input_file_id": b.input_file_id,
        "completion_window": "24h",
        "status": b.status,
        "output_file_id": (done && b.completed > 0).then(|| format!("{OUTPUT_PREFIX}{}", b.id)),
        "error_file_id": (finished.is_some() && b.failed > 0).then(|| format!("{ERRORS_PREFIX}{}", b.id)),
        "created_at": b.created_at,
        "in_progress_at": b.created_at,
        "expires_at": null,
        "finalizing_at": null,
        "completed_at": (b.status == "completed").then_some(finished).flatten(),
        "failed_at": (b.status == "failed").then_some(finished).flatten(),
        "cancelled_at": (b.status == "cancelled").then_some(finished).flatten(),
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": null,
    })
}

async fn upload(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let c = &app.pool;
    let mut form = form.map_err(|e| {
        ApiError::new(
            e.status(),
            "invalid_request_error",
            format!("the upload must be multipart/form-data: {}", e.body_text()),
        )
    })?;
    let (mut purpose, mut content, mut filename) = (None, None, String::from("upload.jsonl"));
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return Err(ApiError::new(
                    e.status(),
                    "invalid_request_error",
                    format!("could not read the upload: {}", e.body_text()),
                ))
            }
        };
        match field.name() {
            Some("purpose") => {
                purpose = Some(
                    field
                        .text()
                        .await
                        .map_err(|e| ApiError::bad(e.body_text()))?,
                )
            }
            Some("file") => {
                if let Some(name) = field.file_name() {
                    filename = name.chars().take(256).collect();
                }
                let bytes = field.bytes().await.map_err(|e| {
                    ApiError::new(e.status(), "invalid_request_error", e.body_text())
                })?;
                if bytes.len() > MAX_FILE_BYTES {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "invalid_request_error",
                        format!(
                            "the file has {} bytes; at most {MAX_FILE_BYTES}",
                            bytes.len()
                        ),
                    ));
                }
                content = Some(bytes);
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| ApiError::bad("the upload needs a purpose field"))?;
    if purpose != "batch" {
        return Err(ApiError::bad(format!(
            "purpose must be batch (this server keeps files only for batches), not {purpose}"
        )));
    }
    let content = content.ok_or_else(|| ApiError::bad("the upload needs a file field"))?;
    let owner = owner(c, member);
    let info = with_store(&app, move |s| {
        s.add_file(&filename, &purpose, &content, &owner)
    })
    .await?;
    Ok(Json(file_json(&info)))
}

/// `DELETE /v1/files/{id}`: removes an uploaded file (a batch's output goes with the batch).
async fn delete_file(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = &app.pool;
    let owner = owner(c, member);
    if derived(&id).is_some() {
        return Err(ApiError::bad(format!(
            "{id} is a batch's output; it is removed with its batch"
        )));
    }
    let gone = id.clone();
    with_store(&app, move |s| s.delete_file(&id, &owner)).await?;
    Ok(Json(json!({"id": gone, "object": "file", "deleted": true})))
}

async fn file(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = &app.pool;
    let owner = owner(c, member);
    let file = with_store(&app, move |s| match derived(&id) {
        Some((batch, errors)) => {
            // `content` checks the batch is the member's.
            let bytes = content(s, &id, &owner)?.len();
            let b = s.batch(batch)?;
            Ok(json!({
                "id": id, "object": "file", "bytes": bytes, "created_at": b.finished_at.unwrap_or(b.created_at),
                "filename": if errors { "batch_errors.jsonl" } else { "batch_output.jsonl" },
                "purpose": "batch_output",
            }))
        }
        None => {
            s.owns_file(&id, &owner)?;
            Ok(file_json(&s.file(&id)?))
        }
    })
    .await?;
    Ok(Json(file))
}

/// The batch (and whether its error file) a derived file id names.
fn derived(id: &str) -> Option<(&str, bool)> {
    id.strip_prefix(OUTPUT_PREFIX)
        .map(|b| (b, false))
        .or_else(|| id.strip_prefix(ERRORS_PREFIX).map(|b| (b, true)))
}

/// The bytes of file `id`, if it is `owner`'s: an upload, or a batch's output or error file.
fn content(s: &Store, id: &str, owner: &str) -> Result<Vec<u8>, StoreError> {
    match derived(id) {
        Some((batch, errors)) => {
            s.owns_batch(batch, owner)?;
            let (out, err) = s.outputs(batch)?;
            Ok(if errors { err } else { out }.into_bytes())
        }
        None => {
            s.owns_file(id, owner)?;
            s.file_content(id)
        }
    }
}

/// Whose files and batches a request may see: its member's, by name (names are unique, the
/// index of a member is not stable across restarts).
fn owner(c: &Coordinator, member: MemberId) -> String {
    c.share().name(member).to_string()
}

async fn file_content(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let c = &app.pool;
    let owner = owner(c, member);
    let body = with_store(&app, move |s| content(s, &id, &owner)).await?;
    Ok(([(header::CONTENT_TYPE, "application/jsonl")], body).into_response())
}

#[derive(Deserialize)]
struct CreateBody {
    input_file_id: String,
    endpoint: String,
    completion_window: Option<String>,
}

async fn create(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let c = &app.pool;
    let runner = runner(&app)?.clone();
    let body: CreateBody = super::openai::parse(body, super::MAX_BODY_BYTES)?;
    let kind = Kind::of_endpoint(&body.endpoint).ok_or_else(|| {
        ApiError::bad(format!(
            "endpoint must be /v1/chat/completions or /v1/embeddings, not {}",
            body.endpoint
        ))
    })?;
    if body
        .completion_window
        .as_deref()
        .is_some_and(|w| w != "24h")
    {
        return Err(ApiError::bad("completion_window must be 24h"));
    }
    let model = model_of(c, kind)
        .map(|m| m.name)
        .ok_or_else(|| ApiError::bad("this pool serves no embedding model"))?;
    // A file that cannot become a batch is the request's fault (400), not the store's.
    let owner = owner(c, member);
    let info = with_store(&app, move |s| {
        s.owns_file(&body.input_file_id, &owner)?;
        let content = s.file_content(&body.input_file_id)?;
        Ok(match parse(&content, kind, &model) {
            Ok((units, errors)) => {
                Ok(s.create_batch(kind, &model, &body.input_file_id, &units, &errors, &owner)?)
            }
            Err(e) => Err(format!("file {}: {e}", body.input_file_id)),
        })
    })
    .await?
    .map_err(ApiError::bad)?;
    tracing::info!(batch = %info.id, units = info.total, "batch created");
    runner.wake();
    Ok(Json(batch_json(&app, &info)))
}

async fn batch(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = &app.pool;
    let owner = owner(c, member);
    let b = with_store(&app, move |s| {
        s.owns_batch(&id, &owner)?;
        s.batch(&id)
    })
    .await?;
    Ok(Json(batch_json(&app, &b)))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let c = &app.pool;
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let owner = owner(c, member);
    let batches = with_store(&app, move |s| s.batches(limit, Some(&owner))).await?;
    let data: Vec<Value> = batches.iter().map(|b| batch_json(&app, b)).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": batches.first().map(|b| b.id.clone()),
        "last_id": batches.last().map(|b| b.id.clone()),
        "has_more": false,
    })))
}

async fn cancel(
    State(app): State<AppState>,
    Extension(member): Extension<MemberId>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = &app.pool;
    let owner = owner(c, member);
    let b = with_store(&app, move |s| {
        s.owns_batch(&id, &owner)?;
        s.cancel(&id)
    })
    .await?;
    Ok(Json(batch_json(&app, &b)))
}

async fn credits(State(app): State<AppState>) -> Result<Json<Value>, ApiError> {
    let ledger = with_store(&app, |s| s.credits()).await?;
    Ok(Json(json!({"credits": ledger})))
}
