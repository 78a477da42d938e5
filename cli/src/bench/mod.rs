//! `potluck bench`: what the project's speed figures come from. By default prefill and
//! decode speed on this machine, as medians of several runs; with `--pool N`, the same
//! through a pipeline of N nodes on loopback, measured in the same run as one process, with
//! the cost of each hop.
//!
//! One file per kind of measurement: `speed` (one process beside a pool, the batched step,
//! many clients, failover), `embed`, `queued` (the coordinator's cost of waiting clients),
//! `checks` (the spot checks' tolerances and detection); `local` starts the pools they
//! measure.

mod args;
mod checks;
mod embed;
mod local;
mod queued;
mod speed;

use crate::models::ModelCache;
use anyhow::{bail, Result};
pub use args::BenchArgs;

/// Runs `potluck bench`.
pub fn run(cache: &ModelCache, args: BenchArgs) -> Result<()> {
    crate::set_threads(args.threads)?;
    if let Some(clients) = args.clients {
        return speed::load(cache, &args, clients);
    }
    if let Some(mode) = &args.failover {
        return speed::failover(cache, &args, mode);
    }
    if let Some(texts) = args.embed {
        return embed::run(cache, &args, texts);
    }
    if let Some(clients) = args.queued {
        return queued::run(cache, &args, clients);
    }
    if let Some(trials) = args.detection {
        return checks::detection(trials);
    }
    if let Some(sessions) = args.checks {
        return checks::run(cache, &args.model, sessions, args.gen_tokens);
    }
    if args.runs == 0 || args.prompt_tokens == 0 || args.gen_tokens == 0 {
        bail!("--runs, --prompt-tokens and --gen-tokens must be at least 1");
    }
    if let Some(sizes) = &args.batched {
        return speed::batched(cache, &args, sizes);
    }
    speed::measure(cache, &args)
}
