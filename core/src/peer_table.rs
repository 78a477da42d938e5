//! The pool as the coordinator sees it: peers whose signed capacity adverts verified, each
//! kept until the coordinator decides it is gone (see `silent`). Anything doubtful is
//! refused with a reason.

pub use potluck_protocol::messages::MAX_CLOCK_SKEW_SECS;
use potluck_protocol::messages::{AdvertNotCurrent, CapacityAdvert, ADVERT_DOMAIN};
use potluck_protocol::signed::{PublicKey, Signed};
use std::collections::{BTreeSet, HashMap};
use thiserror::Error;

/// Longest validity an advert may claim; longer ones are refused so a departed peer cannot
/// linger.
pub const MAX_ADVERT_TTL_SECS: u64 = 600;

/// Most peers a table holds unless told otherwise: far more than a community pool has, and
/// a bound on what a flood of fresh keys can cost. Silent peers leave room as they go.
pub const DEFAULT_MAX_PEERS: usize = 4096;

/// Why an advert was refused.
#[derive(Debug, Error, PartialEq)]
pub enum AdvertRejection {
    /// Signature, key or encoding is bad.
    #[error("bad advert: {0}")]
    Invalid(#[from] potluck_protocol::ProtocolError),
    /// It is for another pool, expired, or dated in the future beyond the allowed skew.
    #[error(transparent)]
    NotCurrent(#[from] AdvertNotCurrent),
    /// It claims a longer validity than allowed.
    #[error("advert claims {0} s of validity")]
    TtlTooLong(u64),
    /// It claims loaded blocks `start..end` with `end <= start`.
    #[error("advert claims the empty block range {0}..{1}")]
    EmptyRange(u32, u32),
    /// Its name or coordinator pointer is not as the protocol bounds them.
    #[error("bad advert: {0}")]
    Text(#[from] potluck_protocol::messages::AdvertFieldError),
    /// The table holds its most peers; a new one waits until others go.
    #[error("the pool's peer table is full ({0} peers)")]
    Full(usize),
    /// An advert with this sequence number or a later one was already accepted.
    #[error("stale advert (seq {got}, have {have})")]
    Stale {
        /// Its sequence number.
        got: u64,
        /// The newest accepted.
        have: u64,
    },
}

/// A peer known to the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// Its key (and identity).
    pub key: PublicKey,
    /// Its latest verified advert.
    pub advert: CapacityAdvert,
    /// Measured round-trip time, when known.
    pub rtt_ms: Option<f32>,
    /// Unix time its latest advert arrived.
    pub last_heard: u64,
    /// Unix time its latest refresh (an advert that changed nothing), or its first advert,
    /// arrived: where the next heartbeat gap is counted from.
    pub last_refresh: u64,
    /// Seconds before its recent refreshes (adverts that changed nothing), newest last (at
    /// most [`HEARTBEAT_GAPS`]).
    pub gaps: Vec<u64>,
}

/// Gaps between adverts kept per peer to estimate its heartbeat.
pub const HEARTBEAT_GAPS: usize = 4;

impl Peer {
    /// Its heartbeat: the longest recent gap before an advert that changed nothing.
    /// Adverts sent on a change are not counted, and refreshes sent early are shorter, so
    /// the longest gap is the regular interval.
    pub fn interval(&self) -> Option<u64> {
        self.gaps.iter().copied().max()
    }
}

/// What accepting an advert changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A peer the table did not know.
    New,
    /// A known peer whose capacity changed.
    Changed,
    /// A known peer re-announcing the same capacity.
    Refreshed,
    /// A known peer with the same capacity that holds other blocks now (it loaded what
    /// it was assigned): nothing a plan is made from changed.
    Holds,
}

/// Verified peers of one pool.
#[derive(Debug)]
pub struct PeerTable {
    pool: String,
    /// Looked up at every step a router weighs (fast).
    peers: HashMap<PublicKey, Peer>,
    /// The same keys in order, so every walk over the peers is deterministic without a
    /// sort.
    order: BTreeSet<PublicKey>,
    /// Peers whose round trip changed since the router last asked (see
    /// [`PeerTable::take_rtt_changes`]); `None` once more changed than it keeps.
    rtt_changed: Option<Vec<PublicKey>>,
    missed: u32,
    max_peers: usize,
}

/// Adverts a peer may miss before it is dropped, unless told otherwise.
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 3;

impl PeerTable {
    /// An empty table for `pool`.
    pub fn new(pool: &str) -> Self {
        Self {
            pool: pool.to_string(),
            peers: HashMap::new(),
            order: BTreeSet::new(),
            rtt_changed: Some(Vec::new()),
            missed: DEFAULT_MISSED_HEARTBEATS,
            max_peers: DEFAULT_MAX_PEERS,
        }
    }

    /// Holds at most `n` peers (at least one).
    pub fn with_max_peers(mut self, n: usize) -> Self {
        self.max_peers = n.max(1);
        self
    }

    /// Counts peers as silent after `k` missed adverts (at their own pace), or when an
    /// advert expires, whichever comes first; one late advert is never enough (`k` is at
    /// least 2).
    pub fn with_missed_heartbeats(mut self, k: u32) -> Self {
        self.missed = k.max(2);
        self
    }

    /// Verifies and records a signed advert received at unix time `now`.
    pub fn accept(&mut self, signed: &Signed, now: u64) -> Result<Accepted, AdvertRejection> {
        let advert: CapacityAdvert = signed.verify(ADVERT_DOMAIN)?;
        self.admit(signed.signer, advert, now)
    }

    /// Records `advert`, whose signature by `key` is already verified (the daemon verifies
    /// in [`PeerTable::accept`]; the simulator's peers sign nothing), with every other check
    /// an advert gets.
    pub fn admit(
        &mut self,
        key: PublicKey,
        advert: CapacityAdvert,
        now: u64,
    ) -> Result<Accepted, AdvertRejection> {
        advert.check_current(&self.pool, now)?;
        if let Some((_, r)) = advert.loaded.as_ref().filter(|(_, r)| r.is_empty()) {
            return Err(AdvertRejection::EmptyRange(r.start, r.end));
        }
        advert.check_text_fields()?;
        let ttl = advert.expires_at.saturating_sub(advert.issued_at.min(now));
        if ttl > MAX_ADVERT_TTL_SECS {
            return Err(AdvertRejection::TtlTooLong(ttl));
        }
        let full = self.peers.len() >= self.max_peers;
        match self.peers.get_mut(&key) {
            Some(p) if advert.seq <= p.advert.seq => Err(AdvertRejection::Stale {
                got: advert.seq,
                have: p.advert.seq,
            }),
            Some(p) => {
                let outcome = if !same_capacity(&p.advert, &advert) {
                    Accepted::Changed
                } else if p.advert.loaded != advert.loaded {
                    Accepted::Holds
                } else {
                    Accepted::Refreshed
                };
                let changed = outcome != Accepted::Refreshed;
                // An advert sent on a change comes early by nature (a fresh node sends a
                // few within its first seconds): only the gaps between refreshes time the
                // heartbeat.
                let gap = now.saturating_sub(p.last_refresh);
                if !changed {
                    p.last_refresh = now;
                }
                if gap > 0 && !changed {
                    if p.gaps.len() == HEARTBEAT_GAPS {
                        p.gaps.remove(0);
                    }
                    p.gaps.push(gap);
                }
                p.last_heard = now;
                p.advert = advert;
                Ok(outcome)
            }
            None if full => Err(AdvertRejection::Full(self.max_peers)),
            None => {
                self.order.insert(key);
                self.peers.insert(
                    key,
                    Peer {
                        key,
                        advert,
                        rtt_ms: None,
                        last_heard: now,
                        last_refresh: now,
                        gaps: Vec::new(),
                    },
                );
                Ok(Accepted::New)
            }
        }
    }

    /// Peers whose adverts expired by `now`, or that missed the set number of heartbeats.
    /// They stay in the table: the caller decides whether they are gone.
    pub fn silent(&self, now: u64) -> Vec<PublicKey> {
        let missed = u64::from(self.missed);
        let mut silent: Vec<PublicKey> = self
            .unordered()
            .filter(|p| {
                let missed_beats = p
                    .interval()
                    .is_some_and(|i| now > p.last_heard + missed * i);
                p.advert.expires_at <= now || missed_beats
            })
            .map(|p| p.key)
            .collect();
        silent.sort();
        silent
    }

    /// Forgets a peer (it left, or was banned).
    pub fn remove(&mut self, key: &PublicKey) -> bool {
        self.order.remove(key);
        self.peers.remove(key).is_some()
    }

    /// Records a measured round-trip time.
    pub fn set_rtt(&mut self, key: &PublicKey, rtt_ms: f32) {
        let Some(p) = self.peers.get_mut(key) else {
            return;
        };
        if p.rtt_ms == Some(rtt_ms) {
            return;
        }
        p.rtt_ms = Some(rtt_ms);
        let room = self.peers.len().max(64);
        if let Some(changed) = self.rtt_changed.as_mut() {
            if changed.len() < room {
                changed.push(*key);
            } else {
                self.rtt_changed = None;
            }
        }
    }

    /// The peers whose round trip changed since the last call, or `None` when more did
    /// than were kept (then every one may have).
    pub fn take_rtt_changes(&mut self) -> Option<Vec<PublicKey>> {
        self.rtt_changed.replace(Vec::new())
    }

    /// A peer by key.
    pub fn get(&self, key: &PublicKey) -> Option<&Peer> {
        self.peers.get(key)
    }

    /// Every known peer, in key order (deterministic for planning).
    pub fn peers(&self) -> Vec<&Peer> {
        self.iter().collect()
    }

    /// Every known peer, in key order, without collecting them.
    pub fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.order.iter().filter_map(|k| self.peers.get(k))
    }

    /// Every known peer in no particular order, for what does not depend on it (counts,
    /// and decisions that order peers themselves): faster than [`PeerTable::iter`].
    pub fn unordered(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// The most peers it holds.
    pub fn max_peers(&self) -> usize {
        self.max_peers
    }

    /// Number of peers.
    pub fn len(&self) -> usize {
        self.peers.len()
    }

    /// Whether no peer is known.
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

/// Whether two adverts offer the same capacity (ignoring what they hold, sequence and
/// validity).
fn same_capacity(a: &CapacityAdvert, b: &CapacityAdvert) -> bool {
    a.device == b.device
        && a.memory_bytes == b.memory_bytes
        && a.threads == b.threads
        && a.models == b.models
        && (a.gflops - b.gflops).abs() <= 0.1 * a.gflops.abs().max(b.gflops.abs())
}
