//! `potluck generate`: load a model (split into stages if asked), render the prompt, stream
//! tokens to stdout and report speed on stderr.

use crate::models::ModelCache;
use anyhow::{bail, Context, Result};
use clap::Args;
use potluck_coordinator::template::chat_prompt_ids;
use potluck_engine::chat::ChatMessage;
use potluck_engine::generate::{generate, load_tokenizer, GenerateRequest};
use potluck_engine::llama::{Stage, DEFAULT_KV_BUDGET};
use potluck_engine::sampling::{Sampler, SamplingParams};
use potluck_engine::tokenizer::TextTokenizer;
use potluck_engine::weights::WeightFile;
use std::io::Write;

/// Flags of `potluck generate`.
#[derive(Args)]
pub struct GenerateArgs {
    /// Model: short name, Hugging Face id or path to a GGUF file / safetensors folder.
    #[arg(long, default_value = crate::catalog::DEFAULT_MODEL)]
    pub model: String,
    /// The prompt (the user's message with --chat).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop when this string is generated (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Run the model as this many stages in one process (tests the pipeline split).
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
}

/// Sampling flags shared by commands that generate.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens below min-p times the best token's probability.
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// The engine's parameters, validated.
    pub fn params(&self) -> Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        };
        p.validate()?;
        Ok(p)
    }
}

/// A model loaded as `n` stages of near-equal block counts, with its tokenizer.
pub fn load_stages(
    cache: &ModelCache,
    model: &str,
    n: usize,
) -> Result<(Vec<Stage>, TextTokenizer)> {
    let path = cache.resolve(model)?;
    let file = WeightFile::open(&path).with_context(|| format!("loading {}", path.display()))?;
    let layers = file.config()?.layers;
    if n == 0 || n > layers {
        bail!("--stages must be between 1 and the model's {layers} blocks");
    }
    let mut stages = Vec::with_capacity(n);
    for i in 0..n {
        let range = i * layers / n..(i + 1) * layers / n;
        stages.push(Stage::load(&file, range, DEFAULT_KV_BUDGET)?);
    }
    let tok = load_tokenizer(&file)?;
    Ok((stages, tok))
}

/// Prompt token ids: the raw prompt, or the prompt as a user turn in the chat template.
pub fn prompt_ids(
    tok: &TextTokenizer,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    if !chat {
        return Ok(tok.encode(prompt)?);
    }
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(ChatMessage::new("system", s));
    }
    msgs.push(ChatMessage::new("user", prompt));
    Ok(chat_prompt_ids(tok, &msgs)?)
}

/// Runs `potluck generate`.
pub fn run(cache: &ModelCache, args: GenerateArgs) -> Result<()> {
    crate::set_threads(args.threads)?;
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let params = args.sampling.params()?;
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let (mut stages, tok) = load_stages(cache, &args.model, args.stages)?;
    let ids = prompt_ids(&tok, &args.prompt, args.chat, args.system.as_deref())?;
    let mut sampler = Sampler::new(params)?;
    let req = GenerateRequest {
        prompt: &ids,
        max_tokens: args.max_tokens,
        stop: &args.stop,
    };
    let mut out = std::io::stdout().lock();
    let (_, stats) = generate(&mut stages, &tok, 1, &req, &mut sampler, |piece| {
        // Its reader left (`potluck generate ... | head -c 20`): stop, as Unix tools do.
        // SIGPIPE stays ignored here, or a template worker that died would kill this
        // process without a word on the next render.
        if out
            .write_all(piece.as_bytes())
            .and_then(|()| out.flush())
            .is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        {
            std::process::exit(0);
        }
    })?;
    let _ = writeln!(out);
    print_stats(&stats);
    Ok(())
}

/// The speed line on stderr after a generation (scripts and tests read its counts).
pub fn print_stats(stats: &potluck_engine::generate::GenerateStats) {
    // Not `eprintln!`, which panics when stderr's reader has gone (SIGPIPE is ignored).
    let _ = writeln!(
        std::io::stderr(),
        "prefill: {} tokens, {:.1} t/s; decode: {} tokens, {:.1} t/s",
        stats.prompt_tokens,
        stats.prefill_tps(),
        stats.generated_tokens,
        stats.decode_tps()
    );
}
