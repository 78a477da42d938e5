//! `potluck up`: a coordinator and a node in one process, ready to answer, saying what it
//! serves and how to add machines.

use super::args::PoolArgs;
use super::local::launch_local_pool;
use super::node::NodeLimits;
use super::runtime::{runtime, stop_signal};
use super::serve::{served_model, serves_line, start_http, ServeArgs};
use crate::generate::{prompt_ids, SamplingArgs};
use crate::models::ModelCache;
use anyhow::{Context, Result};
use clap::Args;
use potluck_coordinator::pool::{Coordinator, SessionRequest};
use std::io::Write;
use std::time::Duration;

/// Flags of `potluck up`.
#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub limits: NodeLimits,
    /// Answer this prompt (as a chat message) once the pool is ready, then exit.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Most tokens to generate for --prompt.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Runs `potluck up`: a coordinator and a node in one process, joined over loopback.
pub fn run_up(cache: &ModelCache, mut args: UpArgs) -> Result<()> {
    args.limits.check()?;
    if args.prompt.is_some() {
        // One prompt answered here needs no other machine to reach this one.
        if args.pool.listen.is_empty() {
            args.pool.listen = vec!["/ip4/127.0.0.1/tcp/0".parse()?];
        }
        args.pool.no_mdns = true;
    }
    let params = args.sampling.params()?;
    if args.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    let model = served_model(cache, &args.serve.model)?;
    let base = args.pool.data_dir("up")?;
    // `up` is the one command a new user runs: it serves embeddings too, unless told not to.
    let encoder = crate::catalog::DEFAULT_EMBEDDING_MODEL;
    // Not for one `--prompt`, which needs only the chat model.
    if args.prompt.is_none()
        && args.serve.embedding_model.is_none()
        && cache.verify(encoder).is_err()
    {
        println!("fetching {encoder} for /v1/embeddings (--embedding-model none skips it)");
        if let Err(e) = cache.fetch(encoder, None) {
            println!("serving no embeddings: {encoder} could not be fetched ({e:#})");
        }
    }
    runtime()?.block_on(async {
        let pool = launch_local_pool(
            cache,
            &args.pool,
            model,
            &base,
            std::slice::from_ref(&args.limits),
            args.serve.coordinator_config(cache, &args.pool, base.join("coordinator"))?,
        )
        .await?;
        let c = pool.coordinator.clone();
        for (peer, _) in &pool.nodes {
            c.mark_local(*peer);
        }
        println!("{}", serves_line(&c));
        let Some(prompt) = args.prompt else {
            // The API and dashboard come up at once: while the pool is not ready they say
            // why (a 503 with the reason, the dashboard's plan), and Ctrl-C works throughout.
            let http = start_http(&args.serve, pool.app.clone()).await?;
            println!("dashboard: http://{http}/");
            let (named, admitted) = match args.pool.pool.as_str() {
                "public" => (String::new(), ""),
                name => (
                    format!(" --pool {name}"),
                    " (each with its certificate from `potluck pool invite`, see docs/pools.md)",
                ),
            };
            println!(
                "add machines with: potluck node{named} --bootstrap {}{admitted}",
                pool.bootstrap
            );
            tokio::select! {
                () = announce_ready(&c) => {
                    println!("try: curl http://{http}/v1/chat/completions -H 'content-type: application/json' -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}],\"max_tokens\":40}}'");
                    stop_signal().await;
                }
                () = stop_signal() => {}
            }
            println!("stopped");
            return Ok(());
        };
        tokio::select! {
            ready = c.wait_ready(Duration::from_secs(120)) => {
                ready.context("the pool did not become ready")?;
            }
            () = stop_signal() => {
                println!("stopped before the pool was ready");
                return Ok(());
            }
        }
        let ids = prompt_ids(&c.model().tokenizer, &prompt, true, None)?;
        let req = SessionRequest {
            prompt: ids,
            max_tokens: args.max_tokens,
            stop: Vec::new(),
            sampling: params,
            handle: Default::default(),
            member: Default::default(),
        };
        let generation = c.generate(req, |piece| {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        });
        tokio::select! {
            done = generation => {
                let (_, stats) = done?;
                println!();
                crate::generate::print_stats(&stats);
            }
            () = stop_signal() => println!("\nstopped"),
        }
        Ok(())
    })
}

/// Waits until the pool serves, saying so, and every half minute until then why not.
async fn announce_ready(c: &Coordinator) {
    let mut said = String::new();
    loop {
        match c.wait_ready(Duration::from_secs(30)).await {
            Ok(()) => {
                println!("pool ready");
                return;
            }
            Err(e) => {
                let why = e.to_string();
                if why != said {
                    println!("not serving yet: {why}");
                    said = why;
                }
            }
        }
    }
}
