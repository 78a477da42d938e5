//! The pool operator's side: the daemon shell around the decisions of `potluck_core`
//! (re-exported here under their own names: `peer_table`, `planner`, `router`, `queue`,
//! `capacity`, `verify`, `compare`, `trust`, `redial`, `origin`, `nickname`). `pool` keeps
//! the live state and runs sessions through `pipeline`; `spotcheck` replays work on other
//! peers; `batch` keeps durable work units in SQLite; `daemon` runs it all on the pool's
//! swarm; `http` serves the API and the dashboard; `audit` signs every verdict.

pub mod audit;
pub mod batch;
pub mod config;
pub mod cpu;
pub mod daemon;
pub mod http;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod pool;
pub mod revocations;
pub mod share;
pub mod spotcheck;
pub mod template;

// The decisions live in the core crate; their paths stay where the daemon's code and tests
// know them.
pub use potluck_core::{
    capacity, compare, nickname, origin, peer_table, planner, queue, redial, router, trust, verify,
};
