//! `potluck bench --queued N`: what N clients waiting at once cost the coordinator. The
//! pool is a coordinator in this process and one `potluck node` process, so this process's
//! memory and threads are the coordinator's (plus the clients' own sockets, which makes the
//! figure an upper bound). Every request is sent and held unread; once the pool counts them
//! all, running or waiting for a slot, the process is measured, and then the clients hang up.

use super::args::BenchArgs;
use crate::models::ModelCache;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// How long the pool gets to count every client.
const SETTLE: Duration = Duration::from_secs(120);

/// A value of this process's `/proc/self/status` (kB for memory).
fn status(key: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/self/status"))
}

/// Runs the measurement with `clients` clients.
pub fn run(cache: &ModelCache, args: &BenchArgs, clients: usize) -> Result<()> {
    if clients == 0 {
        bail!("--queued must be at least 1");
    }
    crate::pool::runtime()?.block_on(async {
        let (app, base, _nodes) = super::local::pinned_pool(cache, args, "one", 1).await?;
        let c = app.pool.clone();
        let addr = super::local::serve_api(app).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (rss_before, threads_before) = (status("VmRSS")?, status("Threads")?);
        let mut held = Vec::with_capacity(clients);
        for i in 0..clients {
            let s = crate::load::send(&addr, &crate::load::request_body(i, args.gen_tokens)).await?;
            held.push(s);
        }
        let deadline = Instant::now() + SETTLE;
        let counted = loop {
            let usage = c.share().usage(potluck_net::swarm::unix_now());
            let (running, waiting) = usage
                .iter()
                .fold((0, 0), |(r, w), u| (r + u.running, w + u.waiting));
            if running + waiting >= clients || Instant::now() > deadline {
                break (running, waiting);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (rss, threads) = (status("VmRSS")?, status("Threads")?);
        drop(held);
        let _ = std::fs::remove_dir_all(&base);
        let mib = |kb: u64| kb as f64 / 1024.0;
        println!(
            "{clients} clients: {} running, {} waiting for a slot; coordinator process {:.1} MiB before, {:.1} MiB with them (+{:.1} MiB, the clients' sockets included); threads {threads_before} -> {threads}",
            counted.0,
            counted.1,
            mib(rss_before),
            mib(rss),
            mib(rss.saturating_sub(rss_before))
        );
        if counted.0 + counted.1 < clients {
            bail!("the pool counted only {} of {clients} clients", counted.0 + counted.1);
        }
        Ok(())
    })
}
