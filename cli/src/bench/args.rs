//! The flags of `potluck bench`: which measurement, and its sizes.

use clap::Args;

/// Flags of `potluck bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Model: short name or path.
    #[arg(long, default_value = crate::catalog::DEFAULT_MODEL)]
    pub model: String,
    /// Compute threads.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens for the decode measurement.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Split the model into this many in-process stages.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// Also run through a pool of this many nodes (in this process, over loopback libp2p),
    /// each allowed about 1/N of the model.
    #[arg(long)]
    pub pool: Option<usize>,
    /// Instead: this many streaming API clients at once (against --url, or a pool of
    /// --pool nodes, default 1, started here), each generating --gen-tokens tokens.
    #[arg(long)]
    pub clients: Option<usize>,
    /// Instead: the coordinator's cost of this many clients waiting at once: a pool of one
    /// pinned node, every request sent and held, this process's memory and threads before
    /// and with them.
    #[arg(long)]
    pub queued: Option<usize>,
    /// The API to load (host:port); default: a pool started in this process.
    #[arg(long)]
    pub url: Option<String>,
    /// Instead: the stall a node crash costs a running session, with --prompt-tokens of
    /// context: `replica` (2 nodes holding the whole model; the serving one crashes) or
    /// `replan` (3 nodes holding half each; one whose span has no replica crashes and its
    /// blocks are re-planned onto the others).
    #[arg(long)]
    pub failover: Option<String>,
    /// Instead: how far honest recomputations of stage results fall from the originals
    /// (the spot checks' tolerances), over this many sessions of --gen-tokens tokens.
    #[arg(long)]
    pub checks: Option<usize>,
    /// Instead: the engine's batched step in this process, at 1, 4, 16 and 64 sessions (or
    /// these, comma-separated): each session prefills --prompt-tokens, then all decode
    /// --gen-tokens tokens together, one batch per step.
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    pub batched: Option<Vec<usize>>,
    /// With --clients: the pool is a coordinator here and `potluck node` processes, each
    /// pinned to its own core with one thread: `one` node, two as a pipeline `split`, or two
    /// whole-model `replicas`; stage parallelism is then real on a small machine.
    #[arg(long)]
    pub pinned: Option<String>,
    /// With --clients: copies of each span in the pool started here (spot checks need a
    /// second copy to recompute on).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// With --clients: rounds of the load run on the same pool (later rounds show the
    /// checks' cost once nodes are trusted).
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// With --clients or --failover: least share of jobs spot-checked (new nodes: all);
    /// 0: no spot checks.
    #[arg(long, default_value_t = potluck_coordinator::trust::DEFAULT_P_MIN)]
    pub check_share: f64,
    /// Instead: how soon the check policy catches a cheating peer, simulated over this
    /// many peers per setting.
    #[arg(long)]
    pub detection: Option<usize>,
    /// Instead: embedding throughput of this many texts on 1 node, then on 2 (each a
    /// `potluck node` process pinned to its own core), in one run.
    #[arg(long)]
    pub embed: Option<usize>,
}
