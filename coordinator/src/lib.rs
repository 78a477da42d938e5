//! The pool operator's side. Its decisions are free of any network or clock of their own
//! (the caller passes the time), so the simulator can drive the same code: which peers are in
//! the pool (`peer_table`), which blocks each holds (`planner`), and which chain serves a
//! session (`router`). `daemon` runs them on the pool's swarm.

pub mod daemon;
pub mod peer_table;
pub mod planner;
pub mod router;
