//! Holds a libp2p behaviour's protocols shut on a connection until the pool's [`Gate`] admits
//! the peer. In a private pool a stranger may connect (it must, to present its certificate),
//! but until it is admitted nothing it sends on identify, Kademlia or gossipsub is read and
//! nothing is sent to it: it learns no adverts, no addresses, no peers, and its gossip is not
//! passed on. A peer refused is disconnected with its held streams unread.
//!
//! The gate judges a peer after its connection (and so its handlers) exist, so the shutting
//! is per connection handler: it takes in the streams the peer opens (the remote's protocol
//! negotiation succeeds, so an honest member's handlers are not marked unsupported) but holds
//! them, and it does not run the inner handler, so nothing queued for the peer leaves, until
//! the behaviour tells it the peer is in. Public pools admit everyone at once.

use crate::gate::Gate;
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, SubstreamProtocol, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Most streams a not-yet-admitted peer may have held on one connection and behaviour; more
/// are dropped unread. An honest peer opens one or two per protocol.
const MAX_HELD: usize = 8;

/// A behaviour whose handlers stay shut for a peer until the gate admits it.
pub struct Gated<B> {
    inner: B,
    gate: Gate,
    admissions: mpsc::UnboundedReceiver<PeerId>,
    connections: HashMap<PeerId, Vec<ConnectionId>>,
    opening: VecDeque<(PeerId, ConnectionId)>,
}

impl<B> Gated<B> {
    /// `inner`, shut to peers `gate` has not admitted.
    pub fn new(inner: B, gate: &Gate) -> Self {
        Self {
            inner,
            gate: gate.clone(),
            admissions: gate.admissions(),
            connections: HashMap::new(),
            opening: VecDeque::new(),
        }
    }
}

impl<B> std::ops::Deref for Gated<B> {
    type Target = B;
    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B> std::ops::DerefMut for Gated<B> {
    fn deref_mut(&mut self) -> &mut B {
        &mut self.inner
    }
}

/// What a [`Gated`] behaviour tells its handlers: the peer is in, or the inner behaviour's
/// own event.
#[derive(Debug)]
pub enum GatedIn<E> {
    /// The gate admitted the peer: run the inner handler and hand it the held streams.
    Open,
    /// For the inner handler.
    Inner(E),
}

impl<B: NetworkBehaviour> NetworkBehaviour for Gated<B> {
    type ConnectionHandler = GatedHandler<THandler<B>>;
    type ToSwarm = B::ToSwarm;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let handler = self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )?;
        Ok(GatedHandler::new(handler, self.gate.admitted(&peer)))
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        let handler = self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )?;
        Ok(GatedHandler::new(handler, self.gate.admitted(&peer)))
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(c) => {
                self.connections
                    .entry(c.peer_id)
                    .or_default()
                    .push(c.connection_id);
            }
            FromSwarm::ConnectionClosed(c) => {
                if let Some(list) = self.connections.get_mut(&c.peer_id) {
                    list.retain(|id| *id != c.connection_id);
                    if list.is_empty() {
                        self.connections.remove(&c.peer_id);
                    }
                }
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer_id: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer_id, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        while let Poll::Ready(Some(peer)) = self.admissions.poll_recv(cx) {
            if let Some(list) = self.connections.get(&peer) {
                self.opening.extend(list.iter().map(|c| (peer, *c)));
            }
        }
        if let Some((peer_id, connection)) = self.opening.pop_front() {
            return Poll::Ready(ToSwarm::NotifyHandler {
                peer_id,
                handler: NotifyHandler::One(connection),
                event: GatedIn::Open,
            });
        }
        self.inner.poll(cx).map(|e| e.map_in(GatedIn::Inner))
    }
}

/// A connection handler that neither runs nor reads until it is opened.
pub struct GatedHandler<H: ConnectionHandler> {
    inner: H,
    open: bool,
    held: Vec<FullyNegotiatedInbound<H::InboundProtocol, H::InboundOpenInfo>>,
}

impl<H: ConnectionHandler> GatedHandler<H> {
    fn new(inner: H, open: bool) -> Self {
        Self {
            inner,
            open,
            held: Vec::new(),
        }
    }
}

impl<H: ConnectionHandler> ConnectionHandler for GatedHandler<H> {
    type FromBehaviour = GatedIn<H::FromBehaviour>;
    type ToBehaviour = H::ToBehaviour;
    type InboundProtocol = H::InboundProtocol;
    type OutboundProtocol = H::OutboundProtocol;
    type InboundOpenInfo = H::InboundOpenInfo;
    type OutboundOpenInfo = H::OutboundOpenInfo;

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol, Self::InboundOpenInfo> {
        self.inner.listen_protocol()
    }

    fn on_behaviour_event(&mut self, event: Self::FromBehaviour) {
        match event {
            GatedIn::Open => {
                self.open = true;
                for stream in self.held.drain(..) {
                    self.inner
                        .on_connection_event(ConnectionEvent::FullyNegotiatedInbound(stream));
                }
            }
            GatedIn::Inner(e) => self.inner.on_behaviour_event(e),
        }
    }

    fn connection_keep_alive(&self) -> bool {
        self.inner.connection_keep_alive()
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<
        ConnectionHandlerEvent<Self::OutboundProtocol, Self::OutboundOpenInfo, Self::ToBehaviour>,
    > {
        if !self.open {
            return Poll::Pending;
        }
        self.inner.poll(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::ToBehaviour>> {
        if !self.open {
            return Poll::Ready(None);
        }
        self.inner.poll_close(cx)
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<
            Self::InboundProtocol,
            Self::OutboundProtocol,
            Self::InboundOpenInfo,
            Self::OutboundOpenInfo,
        >,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(stream) if !self.open => {
                if self.held.len() < MAX_HELD {
                    self.held.push(stream);
                } else {
                    tracing::debug!("a peer not yet admitted opened too many streams; dropped");
                }
            }
            other => self.inner.on_connection_event(other),
        }
    }
}
