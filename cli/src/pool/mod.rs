//! `potluck node`, `potluck coordinator` and `potluck up` (both in one process): the
//! daemons of a pool. One file per concern: the flags every daemon shares (`args`), the
//! node (`node`, with `cpus`), the coordinator (`serve`), `up`, the pool in one process that
//! `up` and the benches start (`local`), and the runtime they run on (`runtime`).

mod args;
mod cpus;
mod local;
mod node;
mod runtime;
mod serve;
mod up;

pub use args::PoolArgs;
pub use local::{local_address, start_local_pool, LocalPool};
pub use node::{run_node, NodeArgs, NodeLimits};
pub use runtime::runtime;
pub use serve::{embedding_model, run_coordinator, served_model, CoordinatorArgs};
pub use up::{run_up, UpArgs};
