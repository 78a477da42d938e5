//! `potluck bench`: prefill and decode speed on this machine, as medians of several runs.

use crate::models::ModelCache;
use anyhow::{bail, Result};
use clap::Args;
use potluck_engine::generate::run_pipeline;
use potluck_engine::llama::{argmax, StageInput};
use std::time::Instant;

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
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `potluck bench`.
pub fn run(cache: &ModelCache, args: BenchArgs) -> Result<()> {
    crate::set_threads(args.threads)?;
    if args.runs == 0 || args.prompt_tokens == 0 || args.gen_tokens == 0 {
        bail!("--runs, --prompt-tokens and --gen-tokens must be at least 1");
    }
    let (mut stages, tok) = crate::generate::load_stages(cache, &args.model, args.stages)?;
    let ctx = stages[0].config().context;
    if args.prompt_tokens + args.gen_tokens > ctx {
        bail!("prompt + generated tokens exceed the model's context of {ctx}");
    }
    let seed_text = "The quick brown fox jumps over the lazy dog. Potluck pools idle computers. ";
    let mut prompt = tok.encode(&seed_text.repeat(1 + args.prompt_tokens / 8))?;
    prompt.truncate(args.prompt_tokens);
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    // One warm-up run, then the measured ones.
    for run in 0..=args.runs {
        let session = run as u64 + 1;
        let t = Instant::now();
        let logits = run_pipeline(&mut stages, session, 0, StageInput::Tokens(prompt.clone()))?;
        let pf = t.elapsed().as_secs_f64();
        let mut next = argmax(&logits).unwrap_or(0);
        let t = Instant::now();
        for i in 0..args.gen_tokens {
            let logits = run_pipeline(
                &mut stages,
                session,
                prompt.len() + i,
                StageInput::Tokens(vec![next]),
            )?;
            next = argmax(&logits).unwrap_or(0);
        }
        let dc = t.elapsed().as_secs_f64();
        for s in stages.iter_mut() {
            s.end_session(session);
        }
        if run > 0 {
            prefill.push(prompt.len() as f64 / pf);
            decode.push(args.gen_tokens as f64 / dc);
        }
    }
    let threads: usize = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    println!(
        "model {} threads {threads} stages {}: prefill {} tokens {:.1} t/s, decode {} tokens {:.1} t/s (median of {})",
        args.model,
        args.stages,
        prompt.len(),
        median(&mut prefill),
        args.gen_tokens,
        median(&mut decode),
        args.runs
    );
    Ok(())
}
