//! The libp2p side shared by nodes and coordinators: one swarm definition, the pool's topic
//! names, the persistent identity and its conversion to a libp2p key. Message contents live in `protocol`.

pub mod identity;
pub mod swarm;
