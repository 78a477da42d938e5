//! Frames on a byte stream: the libp2p protocol names peers open, and async reading and
//! writing of [`codec`](crate::codec) frames over any `futures` reader or writer, with a
//! per-protocol size limit below [`MAX_FRAME`]. Timeouts belong to the caller, who owns a clock.

use crate::codec::{decode_body, decode_header, encode_frame, HEADER, MAX_FRAME};
use crate::error::{ProtocolError, Result};
use futures::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The streams a pool's peers open to each other. Their protocol names carry the pool's tag
/// (a public pool's name, a private pool's id), so peers of different pools sharing a
/// network never take each other's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Stage traffic: one long-lived stream per session and stage; the session's KV cache
    /// lives as long as the stream.
    Stage,
    /// Control: one request and one answer per stream (assignments and their
    /// acknowledgement).
    Control,
    /// Work units: one request and one answer per stream, run on a node's whole model.
    Work,
}

impl Channel {
    /// Every channel.
    pub const ALL: [Channel; 3] = [Channel::Stage, Channel::Control, Channel::Work];

    /// The protocol name of this channel in the pool tagged `pool`.
    pub fn protocol(self, pool: &str) -> String {
        let kind = match self {
            Channel::Stage => "stage",
            Channel::Control => "control",
            Channel::Work => "work",
        };
        format!("/potluck/{pool}/{kind}/1")
    }
}

/// Admission: one hello and one answer per connection, before anything else is served. Not
/// pool-tagged, so a peer of another pool hears why it is refused. Version 2: certificates
/// may name their operator, so a peer of the first layout is refused before it sends one.
pub const ADMIT_PROTOCOL: &str = "/potluck/admit/2";

/// Largest admission frame: a certificate, or an answer listing the pool's revocations.
pub const MAX_ADMIT_FRAME: usize = 1 << 20;

/// Largest work frame: a slice of an embedding request (texts in, vectors out) fits with
/// room; senders split bigger requests.
pub const MAX_WORK_FRAME: usize = 8 << 20;

/// Largest control frame: control messages are small.
pub const MAX_CONTROL_FRAME: usize = 64 << 10;

/// Reads one frame of at most `max` body bytes. `Ok(None)` when the stream ends cleanly
/// before a frame starts; a stream that ends inside a frame is [`ProtocolError::Truncated`].
pub async fn read_frame_async<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Option<T>> {
    match read_header_async(r, max).await? {
        None => Ok(None),
        Some(len) => read_body_async(r, len).await.map(Some),
    }
}

/// Reads a frame header and returns the body length, checked against the version and
/// `max`. `Ok(None)` when the stream ends cleanly first. Callers that wait long for a
/// frame to start but not for one to finish time the two reads apart.
pub async fn read_header_async(
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Option<usize>> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r
            .read(&mut header[got..])
            .await
            .map_err(|_| ProtocolError::Truncated("header"))?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtocolError::Truncated("header"))
            };
        }
        got += n;
    }
    let len = decode_header(&header)?;
    let max = max.min(MAX_FRAME);
    if len > max {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            max: max as u64,
        });
    }
    Ok(Some(len))
}

/// Reads and decodes a body of `len` bytes (a length [`read_header_async`] accepted).
pub async fn read_body_async<T: DeserializeOwned>(
    r: &mut (impl AsyncRead + Unpin),
    len: usize,
) -> Result<T> {
    let mut body = vec![0u8; len.min(MAX_FRAME)];
    r.read_exact(&mut body)
        .await
        .map_err(|_| ProtocolError::Truncated("body"))?;
    decode_body(&body)
}

/// Writes one frame and flushes it.
pub async fn write_frame_async<T: Serialize>(
    w: &mut (impl AsyncWrite + Unpin),
    value: &T,
) -> std::io::Result<()> {
    let frame = encode_frame(value)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame).await?;
    w.flush().await
}
