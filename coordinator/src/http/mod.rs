//! The coordinator's HTTP side: the OpenAI-compatible API under `/v1` (`openai`), the
//! dashboard and its JSON (`dashboard`), and `/metrics`. Every error is JSON in OpenAI's
//! shape; bodies are size-limited; connections that dawdle over their headers or bodies are
//! cut, so slow clients cannot tie the server up.

pub mod batches;
pub mod dashboard;
pub mod embeddings;
pub mod limits;
pub mod openai;
pub mod responses;
pub mod state;

use crate::pool::{Coordinator, SessionError};
use crate::share::{Limit, MemberId};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
pub use state::AppState;
use std::time::Duration;
use tower::Service;

/// Largest request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How the HTTP server guards itself (who may use the API is the coordinator's
/// [`Share`](crate::share::Share)).
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Time a client gets to send its request headers.
    pub header_timeout: Duration,
    /// Time a client gets to send its whole request body.
    pub body_timeout: Duration,
    /// Connections held open at once; more are closed as they come.
    pub max_connections: usize,
    /// Requests one member (one API key; the open API counts as one) has in flight at
    /// once; more get 429.
    pub max_requests_per_key: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
            max_requests_per_key: limits::DEFAULT_MAX_REQUESTS_PER_KEY,
        }
    }
}

/// What the API's door needs: the coordinator (who is a member, in what standing, within
/// what limits) and each member's requests in flight.
#[derive(Clone)]
struct Door {
    coordinator: Coordinator,
    in_flight: limits::InFlight,
}

/// An error in OpenAI's shape, with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// An error with any status and type.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            param: None,
            message: message.into(),
        }
    }

    /// The same error with OpenAI's machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The same error naming the request field it is about.
    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The JSON body, also sent as the last event of a failed stream.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let (status, kind) = match &e {
            SessionError::NotReady(_) => (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable"),
            SessionError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            SessionError::Failed(_) => (StatusCode::BAD_GATEWAY, "server_error"),
            // Nobody is left to read it.
            SessionError::Cancelled => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        };
        Self::new(status, kind, e.to_string())
    }
}

/// All routes over `app`.
pub fn router(app: AppState, opts: &HttpOptions) -> Router {
    let coordinator = app.pool.clone();
    let api = openai::routes()
        .merge(responses::routes())
        .merge(embeddings::routes())
        .merge(batches::routes())
        .route_layer(middleware::from_fn_with_state(
            Door {
                coordinator: coordinator.clone(),
                in_flight: limits::InFlight::new(opts.max_requests_per_key),
            },
            require_member,
        ));
    let body_timeout = opts.body_timeout;
    Router::new()
        .merge(api)
        .merge(dashboard::routes())
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            next.run(limits::body_deadline(req, body_timeout))
        }))
        .with_state(app)
}

/// Serves `router` on `listener` until the process ends. Each connection gets
/// `opts.header_timeout` to send its headers; past `opts.max_connections` open at once, new
/// ones are closed as they come.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    opts: HttpOptions,
) -> std::io::Result<()> {
    let app = router(state, &opts);
    let connections = limits::Connections::new(opts.max_connections);
    let mut told: Option<std::time::Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, keep serving.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = connections.take() else {
            if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(
                    "{} HTTP connections open; closing new ones until some end",
                    opts.max_connections
                );
                told = Some(std::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let app = app.clone();
        let header_timeout = opts.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                app.clone().call(req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

/// Lets a request through as its member: anyone when the pool has no keys, else the member
/// whose key it carries as a bearer token (401 otherwise), in good standing (403: its
/// certificate expired or was revoked) and within its rate and quota (429, with
/// Retry-After).
/// A member also has at most the door's number of requests in flight (429 past it).
async fn require_member(State(door): State<Door>, mut req: Request, next: Next) -> Response {
    let c = &door.coordinator;
    let share = c.share();
    let member = if share.requires_key() {
        let presented = bearer(req.headers());
        let unauthorized = |message: &str| {
            ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
                .with_code("invalid_api_key")
                .into_response()
        };
        match presented.map(|k| share.member_for_key(k)) {
            Some(Some(m)) => m,
            Some(None) => return unauthorized("incorrect API key"),
            None => {
                return unauthorized("this pool needs an API key: send 'Authorization: Bearer KEY'")
            }
        }
    } else {
        MemberId::POOL
    };
    if let Err(why) = c.member_standing(member) {
        return ApiError::new(StatusCode::FORBIDDEN, "permission_error", why)
            .with_code("membership_invalid")
            .into_response();
    }
    let Some(slot) = door.in_flight.take(member) else {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            format!(
                "this key has {} requests in flight, the most it may; wait for some to end",
                door.in_flight.max()
            ),
        )
        .with_code("too_many_concurrent_requests")
        .into_response();
    };
    if let Err(limit) = share.admit(member, potluck_net::swarm::unix_now()) {
        let code = match limit {
            Limit::Rate { .. } => "rate_limit_exceeded",
            Limit::Quota { .. } => "insufficient_quota",
        };
        let mut answer =
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "requests", limit.to_string())
                .with_code(code)
                .into_response();
        if let Ok(v) = header::HeaderValue::from_str(&limit.retry_after().to_string()) {
            answer.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return answer;
    }
    req.extensions_mut().insert(member);
    limits::hold_until_sent(next.run(req).await, slot)
}

/// The API key a request carries as `Authorization: Bearer KEY`, if it carries one.
pub(crate) fn bearer(headers: &header::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

async fn metrics(State(c): State<Coordinator>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        c.metrics().encode(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    let message = format!(
        "no such route: {path}; this server answers /v1/models, /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/files and /v1/batches"
    );
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
}
