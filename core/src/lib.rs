//! The coordinator's decisions, free of any network, task runtime, database or clock of their
//! own (the caller passes the time), so the daemon and the simulator drive the same code:
//! which peers are in the pool (`peer_table`), which blocks each holds (`planner`), which
//! chain serves a session (`router`, weighing each peer's measured queue from `queue`), how
//! many sessions run at once (`capacity`), whether a stage's result stands (`verify`,
//! `compare`), how far a peer is trusted (`trust`), when a silent peer is dialled again or
//! counts as gone (`redial`), which peers are one voice (`origin`), when a batch unit is done and who runs it next
//! (`quorum`), whose session starts next and whose request is over its limits (`share`), and what people call a
//! peer (`nickname`). `pool` ties them into one state machine that takes events and the time
//! and returns what to do.

pub mod capacity;
pub mod compare;
pub mod nickname;
pub mod origin;
pub mod peer_table;
pub mod planner;
pub mod pool;
pub mod queue;
pub mod quorum;
pub mod redial;
pub mod router;
pub mod share;
pub mod trust;
pub mod verify;
