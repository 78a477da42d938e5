//! The volunteer daemon: its persistent identity, the probe that measures what its machine
//! can give, the stage server that runs the layers it was assigned and signs a receipt for
//! every result, and the daemon loop that keeps it in its pool's swarm.

pub mod batcher;
pub mod commanders;
pub mod control;
pub mod daemon;
pub mod fault;
pub mod finder;
pub mod idle;
pub mod local_model;
pub mod probe;
pub mod serve;
pub mod shard;
mod wire;
pub mod work;
