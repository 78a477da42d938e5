//! The pool operator's side. Its decisions are free of any network or clock of their own
//! (the caller passes the time), so the simulator can drive the same code: which peers are in
//! the pool (`peer_table`), which blocks each holds (`planner`), which chain serves a session
//! (`router`, weighing each peer's measured queue from `queue`), how many sessions run at
//! once (`capacity`), and whether a stage's result stands (`verify`). `pool` keeps the live
//! state and runs sessions through `pipeline`; `daemon` runs it all on the pool's swarm;
//! `http` serves the API.

pub mod audit;
pub mod batch;
pub mod capacity;
pub mod compare;
pub mod config;
pub mod cpu;
pub mod daemon;
pub mod http;
pub mod metrics;
pub mod model;
pub mod nickname;
pub mod origin;
pub mod peer_table;
pub mod pipeline;
pub mod planner;
pub mod pool;
pub mod queue;
pub mod redial;
pub mod revocations;
pub mod router;
pub mod share;
pub mod spotcheck;
pub mod template;
pub mod trust;
pub mod verify;
