//! Virtual time: microseconds since the run began, and the [`Now`] the core is told.

use potluck_core::pool::Now;
use std::time::{Duration, Instant};

/// Microseconds since the run began.
pub type Micros = u64;

/// Microseconds in a second.
pub const SECOND: Micros = 1_000_000;

/// The longest wait a draw may schedule, about 30 years: a heavy-tailed distribution's
/// extreme draw still leaves room to add it to any time of a run.
pub const LONGEST: Micros = 1_000_000_000 * SECOND;

/// Seconds as microseconds (negative and non-finite as 0, at most [`LONGEST`]).
pub fn secs(s: f64) -> Micros {
    if s.is_finite() && s > 0.0 {
        ((s * 1e6) as Micros).min(LONGEST)
    } else {
        0
    }
}

/// Unix time the virtual run starts at: a fixed date, so adverts and reputations do not
/// depend on when the simulator runs.
pub const UNIX_START: u64 = 1_800_000_000;

/// Turns virtual time into what the core takes. The core only subtracts instants, so one
/// real instant taken at the start anchors them all without making the run depend on it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock anchored now.
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    /// The core's time at virtual `t`.
    pub fn now(&self, t: Micros) -> Now {
        Now {
            at: self.base + Duration::from_micros(t),
            unix: UNIX_START + t / SECOND,
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
