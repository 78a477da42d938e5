//! The dashboard: one static page (HTML, CSS and JS embedded in the binary, no build step)
//! that polls `/api/pool`, the pool's state as JSON: peers with their capacity, span, status
//! and round trip, named for people (`nickname`) and this machine's own marked; the plan's
//! layer map and why it looks so; running sessions; live tokens/s and a chart of the last
//! minutes; recent events.

use super::state::AppState;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use potluck_net::swarm::peer_id_of;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

const PAGE: &str = include_str!("../../assets/dashboard.html");

/// The dashboard's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/api/pool", get(pool))
}

async fn page() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-cache")], Html(PAGE))
}

/// The pool's state; members' names and usage only to admins (see
/// [`crate::pool::Coordinator::sees_members`]), a member its own row, everyone the totals. Built off
/// the async workers: it reads the job store.
async fn pool(State(app): State<AppState>, headers: axum::http::HeaderMap) -> Json<Value> {
    let c = &app.pool;
    let member = super::bearer(&headers).and_then(|k| c.share().member_for_key(k));
    let view = if c.sees_members(member) {
        Members::All
    } else {
        Members::Own(member)
    };
    Json(
        crate::cpu::run(move || snapshot(&app, view))
            .await
            .unwrap_or_default(),
    )
}

/// Whose rows of the members table a snapshot shows.
#[derive(Debug, Clone, Copy)]
pub enum Members {
    /// Everyone's (an admin, or an open API).
    All,
    /// The caller's own, if it presented a member's key.
    Own(Option<crate::share::MemberId>),
}

/// The pool's state as the dashboard (and scripts) read it, with `members`' rows.
pub fn snapshot(app: &AppState, members: Members) -> Value {
    let c = &app.pool;
    let model = c.model();
    let (peers, plan) = {
        let core = c.core();
        let plan = core.plan().cloned();
        let peers: Vec<_> = core
            .table()
            .peers()
            .iter()
            .map(|p| {
                (
                    p.key,
                    p.advert.clone(),
                    p.rtt_ms,
                    core.trust().get(&p.key),
                    core.work(&p.key),
                )
            })
            .collect();
        (peers, plan)
    };
    let peers: Vec<Value> = peers
        .into_iter()
        .map(|(key, a, rtt, trust, work)| {
            let (loaded, loading, excluded) = c.peer_status(&key);
            let planned = plan.as_ref().and_then(|p| p.span_of(&key)).map(|s| s.range);
            let status = if let Some(why) = excluded {
                why.as_str()
            } else if loaded.is_some() && loaded == planned {
                "serving"
            } else if loading {
                "loading"
            } else if planned.is_some() {
                "assigned"
            } else {
                "idle"
            };
            let id = peer_id_of(&key);
            let reach = id.and_then(|p| c.reach_of(&p));
            let text_id = id.map(|p| p.to_string()).unwrap_or_default();
            let nickname = crate::nickname::of(&text_id);
            // An owner's name is the owner's claim: the key's nickname stays beside it, so
            // two nodes both called "ada" are still two.
            let name = match &a.name {
                Some(owner) => format!("{owner} ({nickname})"),
                None => nickname.clone(),
            };
            json!({
                "id": text_id,
                "name": name,
                "nickname": nickname,
                "owner_name": a.name,
                "local": id.is_some_and(|p| c.is_local(&p)),
                "device": format!("{:?}", a.device),
                "memory_bytes": a.memory_bytes,
                "threads": a.threads,
                "gflops": a.gflops,
                "mem_gbps": a.mem_gbps,
                "rtt_ms": rtt,
                // Public, hole-punched, relayed, behind-nat or unknown; whether its traffic
                // runs through a relay now; whether it holds a circuit at this relay.
                "reachability": reach.as_ref().map_or("unknown", |r| r.reachability.as_str()),
                "relayed": reach.as_ref().is_some_and(|r| r.relayed_now),
                "relay_reservation": reach.as_ref().is_some_and(|r| r.reserved_here),
                "transport": reach.as_ref().map(|r| r.transport.as_str()),
                "layers": planned.map(|r| [r.start, r.end]),
                "status": status,
                // The lower confidence bound the router weighs peers by, and its evidence.
                "reputation": trust.lower_bound(),
                "checked_jobs": trust.checked,
                "valid_streak": trust.consecutive_valid,
                "advert_expires_at": a.expires_at,
                // Whole-model work units (embedding slices) it ran.
                "work": {"units": work.units, "items": work.items, "tokens": work.tokens},
            })
        })
        .collect();
    let spans: Vec<Value> = plan
        .as_ref()
        .map(|p| {
            p.spans
                .iter()
                .map(|s| {
                    json!({
                        "peer": peer_id_of(&s.peer).map(|p| p.to_string()).unwrap_or_default(),
                        "start": s.range.start,
                        "end": s.range.end,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let sessions: Vec<Value> = c
        .sessions()
        .into_iter()
        .map(|(id, s)| {
            json!({
                "id": format!("{id:016x}"),
                "started": s.started,
                "prompt_tokens": s.prompt_tokens,
                "generated": s.handle.tokens.load(Ordering::Relaxed),
                "chain": s.handle.chain().iter().map(|(p, r)| json!({"peer": p, "start": r.start, "end": r.end})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let plan_error = c.core().plan_error().map(str::to_string);
    // The ledger and recent batches, when the coordinator keeps a job store.
    let (credits, batches) = app.batches.as_ref().map_or((Vec::new(), Vec::new()), |b| {
        let credits = b.store.credits().unwrap_or_default();
        // Batches in aggregate: no batch or file id, which would let anyone holding some
        // key fetch another member's prompts and outputs.
        let batches: Vec<Value> = b
            .store
            .batches(10, None)
            .unwrap_or_default()
            .iter()
            .map(|b| {
                json!({"kind": b.kind.as_str(), "model": b.model, "status": b.status,
                       "created_at": b.created_at, "finished_at": b.finished_at,
                       "total": b.total, "completed": b.completed, "failed": b.failed})
            })
            .collect();
        (credits, batches)
    });
    let usage = c.share().usage(potluck_net::swarm::unix_now());
    let totals = json!({
        "members": usage.len(),
        "requests": usage.iter().map(|u| u.requests).sum::<u64>(),
        "tokens": usage.iter().map(|u| u.tokens).sum::<u64>(),
        "running": usage.iter().map(|u| u.running).sum::<usize>(),
        "waiting": usage.iter().map(|u| u.waiting).sum::<usize>(),
    });
    let rows: Vec<_> = match members {
        Members::All => usage,
        Members::Own(None) => Vec::new(),
        Members::Own(Some(m)) => {
            let name = c.share().name(m);
            usage.into_iter().filter(|u| u.name == name).collect()
        }
    };
    json!({
        "members": rows,
        "member_totals": totals,
        "credits": credits,
        "batches": batches,
        // The shape the planner weighs peers' memory against (what `potluck sim` needs to
        // plan as this pool does).
        "model": {"name": model.model.name, "layers": model.shape.layers,
                  "layer_bytes": model.shape.layer_bytes, "edge_bytes": model.shape.edge_bytes,
                  "reserve_bytes": model.shape.reserve_bytes,
                  "digest": blake3::Hash::from(model.model.digest).to_hex().to_string()},
        "peers": peers,
        "plan": {"epoch": plan.as_ref().map(|p| p.epoch), "spans": spans, "error": plan_error,
                 "why": plan.as_ref().map(|p| p.explain(model.shape.layers))},
        "sessions": sessions,
        "tokens_per_second": c.metrics().tokens_per_second(),
        "history": c.metrics().history(),
        "events": c.events(),
    })
}
