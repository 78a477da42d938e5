//! `potluck bench --embed N`: how embedding throughput grows with nodes. A coordinator runs in
//! this process; nodes are `potluck node` processes, each pinned to its own core with one
//! compute thread. N texts are embedded on one node, then a second node joins and the same
//! texts are embedded again, in one run.

use super::args::BenchArgs;
use super::local::{pinned_coordinator, spawn_node, Nodes};
use crate::models::ModelCache;
use anyhow::{bail, Context, Result};
use potluck_coordinator::daemon as coordinator;
use potluck_coordinator::pool::Coordinator;
use potluck_protocol::messages::ModelRef;
use std::time::{Duration, Instant};

/// Measured runs per node count; the median is reported.
const RUNS: usize = 3;

/// Texts of everyday length (8 to 40 words), varied so the batches pad as real ones do.
fn texts(n: usize) -> Vec<String> {
    let words = [
        "volunteers",
        "share",
        "idle",
        "computers",
        "with",
        "their",
        "community",
        "and",
        "the",
        "pool",
        "checks",
        "every",
        "result",
        "before",
        "it",
        "counts",
        "towards",
        "credit",
        "for",
        "work",
        "done",
    ];
    (0..n)
        .map(|i| {
            let len = 8 + (i * 7) % 33;
            (0..len)
                .map(|j| words[(i * 3 + j * 5) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Waits until `n` nodes offer `model`.
async fn wait_holders(c: &Coordinator, model: &ModelRef, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.holders(model).len() < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} nodes offered {} in time",
                c.holders(model).len(),
                model.name
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Median seconds to embed `texts`, after one warm-up request (which loads the encoder).
async fn measure(c: &Coordinator, model: &ModelRef, texts: &[String]) -> Result<(f64, u64)> {
    let holders = c.holders(model).len();
    let warm: Vec<String> = texts.iter().take(64 * holders).cloned().collect();
    c.embed(model, warm).await?;
    let mut secs = Vec::new();
    let mut tokens = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        let done = c.embed(model, texts.to_vec()).await?;
        secs.push(t.elapsed().as_secs_f64());
        tokens = done.tokens;
        let shares: Vec<String> = done.by_peer.iter().map(|(_, n)| n.to_string()).collect();
        eprintln!(
            "  {:.2} s, texts per node: {}",
            t.elapsed().as_secs_f64(),
            shares.join(" + ")
        );
    }
    secs.sort_by(f64::total_cmp);
    Ok((secs[secs.len() / 2], tokens))
}

/// Runs the bench over `n` texts.
pub fn run(cache: &ModelCache, args: &BenchArgs, n: usize) -> Result<()> {
    if n == 0 {
        bail!("--embed needs at least one text");
    }
    let (base, pool, mut cfg) = pinned_coordinator("embed", 2, "--embed")?;
    let model = crate::pool::served_model(cache, &args.model)?;
    let encoder =
        crate::pool::embedding_model(cache, Some(crate::catalog::DEFAULT_EMBEDDING_MODEL))?
            .context("no embedding model")?;
    cfg.embedding_model = Some(encoder.clone());
    let encoder = encoder.model;
    let texts = texts(n);
    let result = crate::pool::runtime()?.block_on(async {
        let running = coordinator::start(cfg, model)?;
        let c = running.coordinator.clone();
        let bootstrap = crate::pool::local_address(running.listening)
            .await?
            .to_string();
        let mut nodes = Nodes(vec![spawn_node(&base, &pool, 0, &bootstrap, &[])?]);
        wait_holders(&c, &encoder, 1).await?;
        println!("embedding {n} texts with {}:", encoder.name);
        let (one, tokens) = measure(&c, &encoder, &texts).await?;
        nodes.0.push(spawn_node(&base, &pool, 1, &bootstrap, &[])?);
        wait_holders(&c, &encoder, 2).await?;
        let (two, _) = measure(&c, &encoder, &texts).await?;
        drop(nodes);
        println!("| nodes | seconds | texts/s | tokens/s |");
        println!("|---|---|---|---|");
        for (k, s) in [(1, one), (2, two)] {
            println!(
                "| {k} | {s:.2} | {:.0} | {:.0} |",
                n as f64 / s,
                tokens as f64 / s
            );
        }
        println!("speed-up with 2 nodes: {:.2}x ({tokens} tokens)", one / two);
        Ok::<_, anyhow::Error>(())
    });
    let _ = std::fs::remove_dir_all(&base);
    result
}
