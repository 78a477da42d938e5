//! What the core decided, for the shell around it to carry out.

use potluck_protocol::messages::ShardAssignment;
use potluck_protocol::signed::PublicKey;

/// One thing to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Tell the operator `line`; with a `kind` it is a dashboard event too.
    Say {
        /// `peer`, `plan`, `failure` or `check`, for the dashboard.
        kind: Option<&'static str>,
        /// What happened.
        line: String,
    },
    /// Send `assignment` to `peer`, then report the answer to
    /// [`super::PoolCore::assigned`].
    Assign {
        /// Who.
        peer: PublicKey,
        /// What it should load.
        assignment: ShardAssignment,
    },
    /// The plan moved to a new epoch.
    NewPlan {
        /// Its epoch.
        epoch: u64,
    },
    /// The pool's nodes' memory holds `n` sessions at once.
    Sessions(usize),
    /// `peer` was quarantined: what keeps its credit voids it; `excluded` says whether it
    /// took effect now (not already out for longer), and then the verdict goes on record.
    Quarantined {
        /// Who.
        peer: PublicKey,
        /// Why, and what was voided.
        detail: String,
        /// Whether the exclusion took effect now.
        excluded: bool,
    },
    /// The pool changed: whoever waits for a chain looks again.
    Changed,
}
