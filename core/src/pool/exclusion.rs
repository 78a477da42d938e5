//! Why a peer is out of plans and routes, and for how long.

use std::time::Duration;

/// How long to wait before re-sending a failed assignment.
pub const ASSIGN_RETRY: Duration = Duration::from_secs(10);
/// How long a peer that failed a step stays out of plans and routes (it comes back after,
/// if it is still advertising).
pub const SUSPECT_FOR: Duration = Duration::from_secs(20);
/// How long a leaving peer stays out of plans (its adverts stop; it is gone by then).
pub const LEAVE_BAN: Duration = Duration::from_secs(60);
/// A peer whose connection answered a ping this recently is alive, however late its adverts
/// or answers (pings come every 5 s; two may be lost to a loaded machine).
pub const ALIVE_WINDOW: Duration = Duration::from_secs(12);
/// How long a peer that broke the protocol or sent an unverifiable result stays out.
pub const BAN: Duration = Duration::from_secs(600);
/// How long a peer that failed a spot check stays out.
pub const QUARANTINE: Duration = Duration::from_secs(3600);

/// Why a peer is out of plans and routes, weakest first: a stronger reason is never
/// overridden by a weaker one while it lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exclusion {
    /// It failed a step; it comes back after [`SUSPECT_FOR`].
    Failed,
    /// Its connection closed; it is back when it can be reached again.
    Unreachable,
    /// It announced it is leaving.
    Leaving,
    /// It broke the protocol or sent a result that does not verify.
    Dropped,
    /// A recomputation of its work disagreed with it.
    Quarantined,
}

impl Exclusion {
    /// A short name for the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            Exclusion::Failed => "failed",
            Exclusion::Unreachable => "unreachable",
            Exclusion::Leaving => "leaving",
            Exclusion::Dropped => "dropped",
            Exclusion::Quarantined => "quarantined",
        }
    }
}
