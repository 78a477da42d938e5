//! Streams under a pool's own protocol names (see [`Channel`]): what a coordinator opens and
//! a node accepts, so that two pools on one network never take each other's streams.

use libp2p::{PeerId, Stream, StreamProtocol};
use potluck_protocol::stream::Channel;

/// Opens and accepts a pool's streams through a [`libp2p_stream::Control`].
#[derive(Clone)]
pub struct PoolStreams {
    control: libp2p_stream::Control,
    protocols: [StreamProtocol; 3],
}

fn index(channel: Channel) -> usize {
    match channel {
        Channel::Stage => 0,
        Channel::Control => 1,
        Channel::Work => 2,
    }
}

impl PoolStreams {
    /// Streams of the pool tagged `tag`, through `control`; an error if the tag cannot be
    /// part of a protocol name.
    pub fn new(control: libp2p_stream::Control, tag: &str) -> Result<Self, String> {
        let name = |c: Channel| {
            StreamProtocol::try_from_owned(c.protocol(tag))
                .map_err(|e| format!("pool {tag:.64} cannot name a protocol: {e}"))
        };
        Ok(Self {
            control,
            protocols: [
                name(Channel::Stage)?,
                name(Channel::Control)?,
                name(Channel::Work)?,
            ],
        })
    }

    /// The protocol of `channel` in this pool.
    pub fn protocol(&self, channel: Channel) -> StreamProtocol {
        self.protocols[index(channel)].clone()
    }

    /// Opens a stream of `channel` to `peer`.
    pub async fn open(&mut self, peer: PeerId, channel: Channel) -> Result<Stream, String> {
        let protocol = self.protocol(channel);
        self.control
            .open_stream(peer, protocol)
            .await
            .map_err(|e| e.to_string())
    }

    /// Incoming streams of `channel`, until this is dropped.
    pub fn accept(&mut self, channel: Channel) -> Result<libp2p_stream::IncomingStreams, String> {
        let protocol = self.protocol(channel);
        self.control
            .accept(protocol.clone())
            .map_err(|e| format!("{protocol}: {e}"))
    }
}
