//! The one place that turns messages into bytes and back: bincode 2 (serde) inside a frame of
//! `u32` little-endian length, version `u16`, body. Decoding is bounded: a frame longer than
//! [`MAX_FRAME`] is refused before anything is allocated, and bincode's own limit stops a
//! lying length inside the body from allocating more than the frame holds.

use crate::error::{ProtocolError, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The protocol version this build speaks; frames of any other version are refused.
/// Version 2: adverts carry an owner's name and a pointer to the node's coordinator.
pub const PROTOCOL_VERSION: u16 = 2;

/// Hard upper bound of one frame's body: enough for an 8k-token prefill's hidden states of a
/// 4096-wide model in f16 (64 MiB), no more.
pub const MAX_FRAME: usize = 64 << 20;

/// Bytes of the frame header: length (u32) then version (u16).
pub const HEADER: usize = 6;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_FRAME>()
}

/// Encodes a value's body alone (what signatures cover).
pub fn encode_body<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let body = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len: body.len() as u64,
            max: MAX_FRAME as u64,
        });
    }
    Ok(body)
}

/// Decodes a whole body; trailing bytes are an error, so one encoding means one message.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len: body.len() as u64,
            max: MAX_FRAME as u64,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(ProtocolError::Trailing(body.len() - used));
    }
    Ok(value)
}

/// A complete frame: header then body.
pub fn encode_frame<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let body = encode_body(value)?;
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads a frame header: the body length, checked against the limit, after the version check.
pub fn decode_header(header: &[u8; HEADER]) -> Result<usize> {
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            got: version,
            want: PROTOCOL_VERSION,
        });
    }
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME as u64,
        });
    }
    Ok(len)
}

/// Decodes one frame at the start of `bytes`; returns the value and the bytes consumed.
pub fn decode_frame<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize)> {
    let header: &[u8; HEADER] = bytes
        .get(..HEADER)
        .and_then(|h| h.try_into().ok())
        .ok_or(ProtocolError::Truncated("header"))?;
    let len = decode_header(header)?;
    let body = bytes
        .get(HEADER..HEADER + len)
        .ok_or(ProtocolError::Truncated("body"))?;
    Ok((decode_body(body)?, HEADER + len))
}

/// Reads one frame from a blocking reader (a stream), allocating only what the header
/// announced and the limit allows.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl std::io::Read) -> Result<T> {
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header)
        .map_err(|_| ProtocolError::Truncated("header"))?;
    let len = decode_header(&header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|_| ProtocolError::Truncated("body"))?;
    decode_body(&body)
}
