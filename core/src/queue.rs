//! Each peer's queue as this coordinator measures it: a moving average of how long the decode
//! steps of its sessions took there. A node batching many sessions, serving other
//! coordinators too, or slower than its advert claims shows it here long before its adverts
//! would, so new sessions go where the measured wait is shortest. The caller passes the time.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How long a measurement speaks for a peer; after that its advert's estimate stands again.
pub const FRESH: Duration = Duration::from_secs(10);
/// Weight of the newest step in the average.
const NEWEST: f64 = 0.2;

/// Recent decode-step times per peer, and when each last answered any step.
#[derive(Debug)]
pub struct StepTimes<K> {
    seen: HashMap<K, Seen>,
    max_peers: usize,
}

/// What is known of one peer.
#[derive(Debug, Default)]
struct Seen {
    /// When it last answered a step of any length.
    answered: Option<Instant>,
    /// Its decode steps' moving average, seconds, and when the last was measured.
    step: Option<(f64, Instant)>,
    /// The lowest that average has been: what the peer can do, for planning.
    quickest: Option<f64>,
}

impl Seen {
    /// Whether anything here is still within [`FRESH`] of `now`.
    fn fresh(&self, now: Instant) -> bool {
        let at = |t: Instant| now.saturating_duration_since(t) < FRESH;
        self.answered.is_some_and(at) || self.step.is_some_and(|(_, t)| at(t))
    }
}

impl<K> Default for StepTimes<K> {
    fn default() -> Self {
        Self::with_max_peers(crate::peer_table::DEFAULT_MAX_PEERS)
    }
}

impl<K> StepTimes<K> {
    /// Remembers at most `n` peers (at least one): as many as the pool may hold, so a
    /// large pool's peers are all measured.
    pub fn with_max_peers(n: usize) -> Self {
        Self {
            seen: HashMap::new(),
            max_peers: n.max(1),
        }
    }
}

impl<K: Hash + Eq> StepTimes<K> {
    /// `peer`'s entry, made room for among at most `max_peers` (stale ones go first);
    /// `None` when every remembered peer is fresh and `peer` is not among them.
    fn entry(&mut self, peer: K, now: Instant) -> Option<&mut Seen> {
        if self.seen.len() >= self.max_peers && !self.seen.contains_key(&peer) {
            self.seen.retain(|_, s| s.fresh(now));
            if self.seen.len() >= self.max_peers {
                return None;
            }
        }
        Some(self.seen.entry(peer).or_default())
    }

    /// Records that `peer` answered a step (of any length) at `now`.
    pub fn answered(&mut self, peer: K, now: Instant) {
        if let Some(s) = self.entry(peer, now) {
            s.answered = Some(now);
        }
    }

    /// Whether `peer` answered some step within `window` of `now`: it is making progress.
    pub fn answering(&self, peer: &K, now: Instant, window: Duration) -> bool {
        self.seen
            .get(peer)
            .and_then(|s| s.answered)
            .is_some_and(|at| now.saturating_duration_since(at) < window)
    }

    /// Records a decode step of `secs` on `peer` at `now`.
    pub fn observe(&mut self, peer: K, secs: f64, now: Instant) {
        if !secs.is_finite() || secs < 0.0 {
            return;
        }
        let Some(s) = self.entry(peer, now) else {
            return;
        };
        let avg = match s.step {
            Some((avg, at)) if now.saturating_duration_since(at) < FRESH => {
                avg + NEWEST * (secs - avg)
            }
            _ => secs,
        };
        s.step = Some((avg, now));
        s.quickest = Some(s.quickest.map_or(avg, |q| q.min(avg)));
    }

    /// `peer`'s average step time if measured within [`FRESH`] of `now`, and its quickest
    /// ever, seconds (routing weighs both at once).
    pub fn times(&self, peer: &K, now: Instant) -> (Option<f64>, Option<f64>) {
        let Some(s) = self.seen.get(peer) else {
            return (None, None);
        };
        let recent = s
            .step
            .filter(|(_, at)| now.saturating_duration_since(*at) < FRESH)
            .map(|(secs, _)| secs);
        (recent, s.quickest)
    }

    /// The quickest average step time measured on `peer`, seconds.
    pub fn quickest_of(&self, peer: &K) -> Option<f64> {
        self.seen.get(peer).and_then(|s| s.quickest)
    }
}

/// What one block on a peer costs a new session, milliseconds: the longer of its advert's
/// estimate and its measured step (less the round trip, spread over its `blocks`), times the
/// sessions it would then serve from here. Measured time already holds the queue that other
/// coordinators' sessions make.
pub fn queued_ms_per_block(
    estimate_ms: f64,
    measured_ms: Option<f64>,
    rtt_ms: f64,
    blocks: u32,
    busy: usize,
) -> f64 {
    let measured = measured_ms.map_or(0.0, |m| (m - rtt_ms).max(0.0) / f64::from(blocks.max(1)));
    estimate_ms.max(measured) * (1.0 + busy as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_average_and_go_stale() {
        let t0 = Instant::now();
        let mut times = StepTimes::default();
        times.observe(1u8, 0.010, t0);
        times.observe(1u8, 0.020, t0 + Duration::from_millis(10));
        let avg = times.times(&1, t0 + Duration::from_millis(20)).0.unwrap();
        assert!((avg - 0.012).abs() < 1e-9, "{avg}");
        // Nonsense is ignored.
        times.observe(1u8, f64::NAN, t0);
        times.observe(1u8, -1.0, t0);
        assert_eq!(times.times(&1, t0 + Duration::from_millis(20)).0, Some(avg));
        assert_eq!(times.times(&2, t0).0, None);
        // Stale measurements speak for nobody, and a new one starts afresh.
        let later = t0 + FRESH + Duration::from_secs(1);
        assert_eq!(times.times(&1, later).0, None);
        times.observe(1u8, 0.5, later);
        assert_eq!(times.times(&1, later).0, Some(0.5));
        // Answers of any step show progress for a while.
        let window = Duration::from_secs(12);
        assert!(!times.answering(&1, t0, window));
        times.answered(1u8, t0);
        assert!(times.answering(&1, t0 + Duration::from_secs(11), window));
        assert!(!times.answering(&1, t0 + window, window));
        assert!(!times.answering(&2, t0, window));
    }

    #[test]
    fn the_measured_queue_outweighs_the_advert_and_sessions_count() {
        // Nothing measured: the estimate, scaled by the sessions it would serve.
        assert_eq!(queued_ms_per_block(0.1, None, 1.0, 10, 0), 0.1);
        assert_eq!(queued_ms_per_block(0.1, None, 1.0, 10, 3), 0.4);
        // A node whose steps take 41 ms over 10 blocks behind a 1 ms round trip costs 4 ms
        // a block, whatever its advert says.
        assert_eq!(queued_ms_per_block(0.1, Some(41.0), 1.0, 10, 0), 4.0);
        // A measurement faster than the estimate does not make a peer look faster.
        assert_eq!(queued_ms_per_block(0.1, Some(0.5), 1.0, 10, 1), 0.2);
        // Of two replicas serving equally many sessions, the one measured slower costs more.
        let quick = queued_ms_per_block(0.1, Some(11.0), 1.0, 10, 2);
        let slow = queued_ms_per_block(0.1, Some(31.0), 1.0, 10, 2);
        assert!(quick < slow);
    }
}
