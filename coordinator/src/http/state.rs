//! What the HTTP routes hold: the pool, and the batch runner when the coordinator keeps a
//! job store. The pool and the batch runner do not own each other; routes that need only
//! the pool take it alone (`State<Coordinator>`).

use crate::batch::Batches;
use crate::pool::Coordinator;
use axum::extract::FromRef;
use std::sync::Arc;

/// The routes' state.
#[derive(Clone)]
pub struct AppState {
    /// Sessions, peers and plans.
    pub pool: Coordinator,
    /// Files, batches and the credit ledger (none: the coordinator keeps no job store).
    pub batches: Option<Arc<Batches>>,
}

impl FromRef<AppState> for Coordinator {
    fn from_ref(app: &AppState) -> Coordinator {
        app.pool.clone()
    }
}
