//! What one client may hold of the HTTP server: a whole-body deadline (a body trickled a
//! byte at a time is cut when its time is up, not kept alive by every byte), a cap on open
//! connections, and a cap on each member's requests in flight (streams included, until
//! their last event).

use crate::share::MemberId;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

/// Connections the server holds open at once unless told otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Requests one member (or, without keys, the whole open API) has in flight at once
/// unless told otherwise.
pub const DEFAULT_MAX_REQUESTS_PER_KEY: usize = 1024;

/// Replaces `req`'s body with one that fails once `within` has passed since now, however
/// the bytes come.
pub fn body_deadline(req: Request, within: Duration) -> Request {
    let deadline = Box::pin(tokio::time::sleep(within));
    req.map(|inner| {
        Body::new(Deadline {
            inner,
            deadline,
            within,
        })
    })
}

/// A body that fails when its deadline passes.
struct Deadline {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    within: Duration,
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(format!(
                "the request body did not arrive within {} s",
                this.within.as_secs()
            ))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Open connections, counted against a cap.
#[derive(Debug, Clone)]
pub struct Connections {
    open: Arc<std::sync::atomic::AtomicUsize>,
    max: usize,
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Connections {
    /// At most `max` (at least one) connections.
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max: max.max(1),
        }
    }

    /// A slot for a new connection, or `None` when all are taken.
    pub fn take(&self) -> Option<ConnectionSlot> {
        use std::sync::atomic::Ordering;
        self.open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(self.open.clone()))
    }
}

/// Requests in flight per member, counted against a cap.
#[derive(Debug, Clone)]
pub struct InFlight {
    counts: Arc<Mutex<HashMap<MemberId, usize>>>,
    max: usize,
}

/// One counted request; uncounted when dropped.
#[derive(Debug)]
pub struct RequestSlot {
    counts: Arc<Mutex<HashMap<MemberId, usize>>>,
    member: MemberId,
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = c.get_mut(&self.member) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.member);
            }
        }
    }
}

impl InFlight {
    /// At most `max` (at least one) requests in flight per member.
    pub fn new(max: usize) -> Self {
        Self {
            counts: Arc::default(),
            max: max.max(1),
        }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for one more of `member`'s requests, or `None` when it has the most.
    pub fn take(&self, member: MemberId) -> Option<RequestSlot> {
        let mut c = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = c.entry(member).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(RequestSlot {
            counts: self.counts.clone(),
            member,
        })
    }
}

/// `response`, holding `slot` until its body has been sent (a stream ends with its last
/// event, or when the client goes).
pub fn hold_until_sent(response: Response, slot: RequestSlot) -> Response {
    response.map(|inner| Body::new(Held { inner, _slot: slot }))
}

/// A body that holds a request slot while it lives.
struct Held {
    inner: Body,
    _slot: RequestSlot,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_come_back_when_dropped() {
        let conns = Connections::new(2);
        let (a, b) = (conns.take(), conns.take());
        assert!(a.is_some() && b.is_some());
        assert!(conns.take().is_none());
        drop(a);
        assert!(conns.take().is_some());

        let flights = InFlight::new(1);
        let (one, two) = (MemberId(1), MemberId(2));
        let held = flights.take(one);
        assert!(held.is_some());
        assert!(flights.take(one).is_none(), "one member's cap");
        assert!(flights.take(two).is_some(), "others are not affected");
        drop(held);
        assert!(flights.take(one).is_some());
    }
}
