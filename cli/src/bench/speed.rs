//! Prefill and decode speed on this machine, in one process and through a pool of nodes on
//! loopback beside it; the batched step; many clients at once; the stall of a failover.

use super::args::BenchArgs;
use super::local::{bench_sessions, pinned_batches, pinned_pool, serve_api, share_memory};
use crate::models::ModelCache;
use anyhow::{bail, Context, Result};
use potluck_engine::generate::{LocalPipeline, TokenSource};
use potluck_engine::sampling::{Sampler, SamplingParams};
use potluck_net::swarm::RelayLimits;
use std::time::Instant;

/// Medians of one configuration.
struct Speeds {
    prefill_tps: f64,
    decode_tps: f64,
    /// Seconds of one prefill and of one decode token.
    prefill_secs: f64,
    token_secs: f64,
}

/// One run: prefill `prompt`, then decode `gen_tokens` greedily; seconds of each part.
fn one_run(source: &mut impl TokenSource, prompt: &[u32], gen_tokens: usize) -> Result<(f64, f64)> {
    let mut history = prompt.to_vec();
    let t = Instant::now();
    let mut next = source.next_token(0, prompt, &history)?;
    let pf = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..gen_tokens {
        history.push(next);
        next = source.next_token(history.len() - 1, &[next], &history)?;
    }
    Ok((pf, t.elapsed().as_secs_f64()))
}

/// A pool session stepped from a blocking thread, so one timing loop serves local stages
/// and pools alike (the coordinator itself drives sessions from async code).
struct Blocking<'a> {
    pipe: &'a mut potluck_coordinator::pipeline::RemotePipeline,
    handle: &'a tokio::runtime::Handle,
}

impl TokenSource for Blocking<'_> {
    fn context(&self) -> usize {
        self.pipe.context()
    }

    fn next_token(
        &mut self,
        pos: usize,
        input: &[u32],
        history: &[u32],
    ) -> potluck_engine::error::Result<u32> {
        self.handle
            .block_on(self.pipe.step(pos, input, history))
            .map_err(|e| potluck_engine::EngineError::Pipeline(e.to_string()))
    }
}

/// One warm-up run, then the medians of `runs` measured ones; `run` gets a session id.
fn medians(
    runs: usize,
    prompt_len: usize,
    gen_tokens: usize,
    mut run: impl FnMut(u64) -> Result<(f64, f64)>,
) -> Result<Speeds> {
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    for i in 0..=runs {
        let (pf, dc) = run(i as u64 + 1)?;
        if i > 0 {
            prefill.push(pf);
            decode.push(dc / gen_tokens as f64);
        }
    }
    let (prefill_secs, token_secs) = (median(&mut prefill), median(&mut decode));
    Ok(Speeds {
        prefill_tps: prompt_len as f64 / prefill_secs,
        decode_tps: 1.0 / token_secs,
        prefill_secs,
        token_secs,
    })
}

/// The same measurement through a pool of `nodes` in-process nodes on loopback.
fn pool_speeds(
    cache: &ModelCache,
    args: &BenchArgs,
    nodes: usize,
    prompt: &[u32],
    greedy: SamplingParams,
) -> Result<Speeds> {
    crate::pool::runtime()?.block_on(async {
        let (pool, base) = bench_pool(cache, args, nodes).await?;
        let c = pool.coordinator;
        let (prompt, gen, runs) = (prompt.to_vec(), args.gen_tokens, args.runs);
        let speeds = tokio::task::spawn_blocking(move || {
            let handle = tokio::runtime::Handle::current();
            medians(runs, prompt.len(), gen, |_| {
                let (_, _, mut pipe) =
                    handle.block_on(c.open_session(greedy.clone(), Default::default()))?;
                let r = one_run(
                    &mut Blocking {
                        pipe: &mut pipe,
                        handle: &handle,
                    },
                    &prompt,
                    gen,
                );
                handle.block_on(pipe.close());
                r
            })
        })
        .await
        .context("the pool bench stopped")?;
        let _ = std::fs::remove_dir_all(&base);
        speeds
    })
}

/// A pool of `nodes` nodes in this process on loopback, each allowed a 1/N share of the
/// model plus one block (so exactly N are needed), and the folder it keeps its state in.
async fn bench_pool(
    cache: &ModelCache,
    args: &BenchArgs,
    nodes: usize,
) -> Result<(crate::pool::LocalPool, std::path::PathBuf)> {
    bench_pool_with(cache, args, nodes, nodes).await
}

/// Like [`bench_pool`], each node allowed a 1/`share` of the model plus one block.
async fn bench_pool_with(
    cache: &ModelCache,
    args: &BenchArgs,
    nodes: usize,
    share: usize,
) -> Result<(crate::pool::LocalPool, std::path::PathBuf)> {
    use crate::pool::{served_model, start_local_pool, NodeLimits, PoolArgs};
    let model = served_model(cache, &args.model)?;
    let shape = model.shape.clone();
    if nodes == 0 || nodes > shape.layers as usize {
        bail!(
            "--pool must be between 1 and the model's {} blocks",
            shape.layers
        );
    }
    let limits = NodeLimits {
        max_memory: share_memory(&shape, share as u64),
        threads: args.threads,
        device: "cpu".into(),
        advert_interval: 1,
        probe_interval: 300,
        leave_deadline: 10,
        corrupt: None,
        cpus: None,
        idle_only: false,
        idle_threshold: 0.25,
        idle_resume_after: 60,
        schedule: Vec::new(),
        max_batch_tokens: potluck_node::batcher::BatchLimits::DEFAULT.max_tokens,
        max_batch_sessions: potluck_node::batcher::BatchLimits::DEFAULT.max_sessions,
    };
    let id = std::process::id();
    let base = std::env::temp_dir().join(format!("potluck-bench-{id}"));
    let pool = PoolArgs {
        data_dir: Some(base.clone()),
        pool: format!("bench-{id}"),
        pool_dir: None,
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
        no_mdns: true,
        relay: None,
        relay_circuits: RelayLimits::default().circuits,
        relay_circuit_mib: RelayLimits::default().circuit_bytes >> 20,
        relay_circuit_minutes: RelayLimits::default().circuit_duration.as_secs() / 60,
    };
    let c = start_local_pool(
        cache,
        &pool,
        model,
        &base,
        &vec![limits; nodes],
        potluck_coordinator::config::CoordinatorConfig {
            check_share: args.check_share,
            // Every client runs at once: the bench measures the stages' batching, and the
            // small caches it gives its nodes would otherwise size the pool at a few.
            max_sessions: args.clients.map(bench_sessions),
            ..pool.coordinator_config(base.join("coordinator"))?
        },
    )
    .await?;
    Ok((c, base))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `--batched`: decode speed of one stage holding the whole model when every step runs the
/// rows of N sessions as one batch, beside N = 1 in the same run.
pub(super) fn batched(cache: &ModelCache, args: &BenchArgs, sizes: &[usize]) -> Result<()> {
    use potluck_engine::llama::{BatchItem, StageInput, StageOutput};
    let sizes: Vec<usize> = if sizes.is_empty() {
        vec![1, 4, 16, 64]
    } else {
        sizes.to_vec()
    };
    let (mut stages, tok) = crate::generate::load_stages(cache, &args.model, 1)?;
    let stage = &mut stages[0];
    let seed_text = "The quick brown fox jumps over the lazy dog. Potluck pools idle computers. ";
    let mut prompt = tok.encode(&seed_text.repeat(1 + args.prompt_tokens / 8))?;
    prompt.truncate(args.prompt_tokens);
    if prompt.len() + args.gen_tokens > stage.config().context {
        bail!("prompt + generated tokens exceed the model's context");
    }
    let mut base = None;
    for &n in &sizes {
        if n == 0 {
            bail!("--batched sizes must be at least 1");
        }
        let ids: Vec<u64> = (0..n as u64).map(|i| 1_000 + i).collect();
        let items = |pos: usize, tokens: &[Vec<u32>]| -> Vec<BatchItem> {
            ids.iter()
                .zip(tokens)
                .map(|(&session, t)| BatchItem {
                    session,
                    pos,
                    input: StageInput::Tokens(t.clone()),
                })
                .collect()
        };
        let t = Instant::now();
        let mut next = pick_all(stage.forward_batch(items(0, &vec![prompt.clone(); n])))?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..args.gen_tokens {
            let tokens: Vec<Vec<u32>> = next.iter().map(|&t| vec![t]).collect();
            next = pick_all(stage.forward_batch(items(prompt.len() + i, &tokens)))?;
        }
        let decode = t.elapsed().as_secs_f64();
        for id in &ids {
            stage.end_session(*id);
        }
        let tps = (n * args.gen_tokens) as f64 / decode;
        let gain = *base.get_or_insert(tps);
        println!(
            "batched step, {n:>3} sessions: prefill {:.1} t/s, decode {tps:.1} t/s overall ({:.2}x one session), {:.2} ms per step",
            (n * prompt.len()) as f64 / prefill,
            tps / gain,
            decode * 1e3 / args.gen_tokens as f64
        );
    }
    fn pick_all(out: Vec<potluck_engine::Result<StageOutput>>) -> Result<Vec<u32>> {
        out.into_iter()
            .map(|o| match o? {
                StageOutput::Logits(l) => potluck_engine::llama::argmax(&l).context("no logits"),
                StageOutput::Hidden(_) => bail!("the stage returned no logits"),
            })
            .collect()
    }
    Ok(())
}

/// Running totals of the spot checks' cost, from the coordinator's metrics.
#[derive(Default)]
struct CheckTotals {
    /// Stage results served and verified.
    served: f64,
    /// Requests recomputed by checkers.
    redone: f64,
    /// Seconds of stage latency, summed over results.
    work: f64,
    /// Seconds spent recomputing.
    checking: f64,
    /// Job verdicts: pass, inconclusive, fail.
    verdicts: [f64; 3],
}

impl CheckTotals {
    fn read(metrics: &str) -> Self {
        let sum = |prefix: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let kind = |k: &str| sum(&format!("potluck_checks_total{{kind=\"{k}\"}}"));
        Self {
            served: kind("verified"),
            redone: kind("recomputed"),
            work: sum("potluck_stage_latency_seconds_sum"),
            checking: sum("potluck_check_seconds_total"),
            verdicts: [
                kind("spot_pass"),
                kind("spot_inconclusive"),
                kind("spot_fail"),
            ],
        }
    }

    /// What happened between `before` and now, as one line.
    fn since(&self, before: &Self) -> String {
        let (served, redone) = (self.served - before.served, self.redone - before.redone);
        let (work, checking) = (self.work - before.work, self.checking - before.checking);
        let v: Vec<f64> = (0..3)
            .map(|i| self.verdicts[i] - before.verdicts[i])
            .collect();
        format!(
            "spot checks recomputed {} of {} stage results ({:.1}%), {checking:.1} s beside {work:.1} s of stage latency ({:.1}%); jobs: {} pass, {} inconclusive, {} fail",
            redone as u64,
            served as u64,
            100.0 * redone / served.max(1.0),
            100.0 * checking / work.max(1e-9),
            v[0] as u64,
            v[1] as u64,
            v[2] as u64
        )
    }
}

/// `--clients N`: the load run.
pub(super) fn load(cache: &ModelCache, args: &BenchArgs, clients: usize) -> Result<()> {
    if clients == 0 || args.gen_tokens == 0 {
        bail!("--clients and --gen-tokens must be at least 1");
    }
    let report = crate::pool::runtime()?.block_on(async {
        if let Some(url) = &args.url {
            let addr = url.trim_start_matches("http://").trim_end_matches('/');
            let r = crate::load::run(addr, clients, args.gen_tokens).await;
            println!("{}", r.line());
            return Ok::<_, anyhow::Error>(r);
        }
        let (app, base, pinned) = match &args.pinned {
            Some(mode) => {
                let (app, base, nodes) = pinned_pool(cache, args, mode, clients).await?;
                (app, base, Some(nodes))
            }
            None => {
                let spans = args.pool.unwrap_or(1);
                let (pool, base) =
                    bench_pool_with(cache, args, spans * args.replicas.max(1), spans).await?;
                (pool.app, base, None)
            }
        };
        let c = app.pool.clone();
        let addr = serve_api(app).await?;
        let mut report = None;
        let mut before = CheckTotals::default();
        for round in 1..=args.rounds.max(1) {
            let r = crate::load::run(&addr, clients, args.gen_tokens).await;
            // Checks run after their sessions; let them finish before counting their cost.
            c.wait_checks().await;
            let now = CheckTotals::read(&c.metrics().encode());
            println!("round {round}: {}", r.line());
            if let Some((nodes, dirs)) = &pinned {
                println!("round {round}: {}", pinned_batches(dirs, nodes.0.len()));
            }
            println!("round {round}: {}", now.since(&before));
            before = now;
            let failed = r.completed < r.clients;
            report = Some(r);
            if failed {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&base);
        report.context("no round ran")
    })?;
    if report.completed < report.clients {
        bail!(
            "{} of {} clients failed",
            report.clients - report.completed,
            report.clients
        );
    }
    Ok(())
}

/// `--failover MODE`: the time from a node's crash to the session's next token, beside the
/// time of an ordinary token in the same session.
pub(super) fn failover(cache: &ModelCache, args: &BenchArgs, mode: &str) -> Result<()> {
    let (nodes, share) = match mode {
        "replica" => (2, 1),
        "replan" => (3, 2),
        other => bail!("--failover takes replica or replan, not {other}"),
    };
    if args.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    crate::pool::runtime()?.block_on(async {
        let (pool, base) = bench_pool_with(cache, args, nodes, share).await?;
        let c = pool.coordinator.clone();
        let text = "The quick brown fox jumps over the lazy dog. Potluck pools idle computers. ";
        let mut prompt = c
            .model()
            .tokenizer
            .encode(&text.repeat(1 + args.prompt_tokens / 8))?;
        prompt.truncate(args.prompt_tokens);
        let (_, chain, mut pipe) = c
            .open_session(SamplingParams::default(), Default::default())
            .await?;
        // The crash: the serving node, or one whose blocks have no replica.
        let victim = {
            let spans = c.core().plan().map(|p| p.spans.clone()).unwrap_or_default();
            chain
                .iter()
                .find(|(s, _)| mode == "replica" || spans.iter().filter(|o| o.range == s.range).count() == 1)
                .map(|(_, p)| *p)
                .context("no node to crash")?
        };
        let crash = pool
            .nodes
            .iter()
            .find(|(p, _)| *p == victim)
            .map(|(_, t)| t.abort_handle())
            .context("the victim is not a local node")?;
        let mut history = prompt.clone();
        let mut next = pipe.step(0, &prompt, &history).await?;
        let mut times = Vec::new();
        for i in 0..=8 {
            if i == 8 {
                crash.abort();
            }
            history.push(next);
            let t = Instant::now();
            next = pipe.step(history.len() - 1, &[next], &history).await?;
            times.push(t.elapsed().as_secs_f64());
        }
        let stall = times.pop().unwrap_or_default();
        let (ordinary, replayed) = (median(&mut times), history.len());
        let _ = std::fs::remove_dir_all(&base);
        println!(
            "failover ({mode}) with {replayed} tokens of context: ordinary token {:.1} ms, crash to next token {:.1} ms",
            ordinary * 1000.0,
            stall * 1000.0
        );
        Ok(())
    })
}

/// The speed of prefill and decode in one process (split into `--stages`), and through a
/// pool of `--pool` nodes beside it.
pub(super) fn measure(cache: &ModelCache, args: &BenchArgs) -> Result<()> {
    let (mut stages, tok) = crate::generate::load_stages(cache, &args.model, args.stages)?;
    let ctx = stages[0].config().context;
    if args.prompt_tokens + args.gen_tokens > ctx {
        bail!("prompt + generated tokens exceed the model's context of {ctx}");
    }
    let seed_text = "The quick brown fox jumps over the lazy dog. Potluck pools idle computers. ";
    let mut prompt = tok.encode(&seed_text.repeat(1 + args.prompt_tokens / 8))?;
    prompt.truncate(args.prompt_tokens);
    let greedy = SamplingParams::default();
    let mut sampler = Sampler::new(greedy.clone())?;
    let local = medians(args.runs, prompt.len(), args.gen_tokens, |session| {
        let mut p = LocalPipeline {
            stages: &mut stages,
            session,
            sampler: &mut sampler,
        };
        let r = one_run(&mut p, &prompt, args.gen_tokens);
        for s in stages.iter_mut() {
            s.end_session(session);
        }
        r
    })?;
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "model {} threads {threads} stages {}: prefill {} tokens {:.1} t/s, decode {} tokens {:.1} t/s (median of {})",
        args.model,
        args.stages,
        prompt.len(),
        local.prefill_tps,
        args.gen_tokens,
        local.decode_tps,
        args.runs
    );
    let Some(nodes) = args.pool else {
        return Ok(());
    };
    drop(stages);
    let pool = pool_speeds(cache, args, nodes, &prompt, greedy)?;
    let hops = nodes as f64;
    println!(
        "pool of {nodes} nodes: prefill {:.1} t/s ({:.2}x one process), decode {:.1} t/s ({:.2}x); cost per hop: {:.2} ms per decode token, {:.2} ms per {}-token prefill",
        pool.prefill_tps,
        pool.prefill_tps / local.prefill_tps,
        pool.decode_tps,
        pool.decode_tps / local.decode_tps,
        (pool.token_secs - local.token_secs) * 1000.0 / hops,
        (pool.prefill_secs - local.prefill_secs) * 1000.0 / hops,
        prompt.len(),
    );
    Ok(())
}
