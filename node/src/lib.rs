//! The volunteer daemon's parts that do not touch the network: its persistent identity, the
//! probe that measures what its machine can give, and the stage server that runs the layers
//! it was assigned and signs a receipt for every result.

pub mod identity;
pub mod probe;
pub mod shard;
