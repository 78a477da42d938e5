//! Why a frame or message from a peer was refused.

use thiserror::Error;

/// Every way a peer's bytes can be rejected. None of them is fatal to the receiver: the
/// frame is dropped (and the peer with it, at the caller's discretion) and serving goes on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The length prefix announces more than the hard maximum.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The input ended before the frame did.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// The peer speaks another protocol version.
    #[error("protocol version {got} is not supported (this build speaks {want})")]
    Version {
        /// Version in the frame.
        got: u16,
        /// Version this build speaks.
        want: u16,
    },
    /// The body is not a valid encoding of the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes left over after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// The signature does not verify against the signer's key, or the key is invalid.
    #[error("bad signature: {0}")]
    BadSignature(&'static str),
    /// A tensor whose header and data disagree, or that exceeds the limits.
    #[error("bad tensor: {0}")]
    BadTensor(String),
    /// The message was valid once but has expired.
    #[error("expired {0} seconds ago")]
    Expired(u64),
}

/// Protocol result type.
pub type Result<T> = std::result::Result<T, ProtocolError>;
