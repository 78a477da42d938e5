//! Potluck's wire protocol: every message peers exchange, the bounded framing that carries
//! them, signed envelopes and receipts, and tensors on the wire. It knows nothing of sockets
//! or libp2p; the node and coordinator put these frames on their streams.

pub mod codec;
pub mod error;
pub mod hex;
pub mod membership;
pub mod messages;
pub mod receipt;
pub mod signed;
pub mod stream;
pub mod tensor;

pub use error::{ProtocolError, Result};
