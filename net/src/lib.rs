//! The libp2p side shared by nodes and coordinators: one swarm definition, the pool's topic
//! and protocol names, admission at connection, the persistent identity and its conversion
//! to a libp2p key. Message contents live in `protocol`.

pub mod gate;
pub mod gated;
pub mod identity;
pub mod ids;
pub mod moves;
pub mod pool_id;
pub mod reach;
pub mod streams;
pub mod swarm;
pub mod transport;
