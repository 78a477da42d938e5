//! Generation on stages held in this process: prefill, then decode token by token through
//! every stage in order, streaming text as it completes and honouring stop strings.
//! `potluck generate` and `potluck bench` use it; a pipeline across peers does the same steps
//! with a network hop between stages.

use crate::error::{EngineError, Result};
use crate::kv_cache::SessionId;
use crate::llama::{Stage, StageInput, StageOutput};
use crate::sampling::Sampler;
use crate::tokenizer::{StreamDecoder, TextTokenizer};
use crate::weights::WeightFile;
use std::time::Instant;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
}

/// Counts and timings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateStats {
    /// Prompt tokens prefilled.
    pub prompt_tokens: usize,
    /// Tokens generated (the end-of-sequence token not counted).
    pub generated_tokens: usize,
    /// Seconds spent on prefill (through the first sampled token).
    pub prefill_secs: f64,
    /// Seconds spent on the decode steps after the first token.
    pub decode_secs: f64,
    /// Why it ended.
    pub finish: FinishReason,
}

impl GenerateStats {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Generated tokens per second after the first.
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// The tokenizer a weight file carries: GGUF metadata, or tokenizer.json beside safetensors.
pub fn load_tokenizer(file: &WeightFile) -> Result<TextTokenizer> {
    match file {
        WeightFile::Gguf(g) => TextTokenizer::from_gguf(g),
        WeightFile::Safetensors { dir, .. } => {
            TextTokenizer::from_tokenizer_json(&dir.join("tokenizer.json"))
        }
    }
}

/// Runs `input` through every stage in order and returns the last stage's logits.
pub fn run_pipeline(
    stages: &mut [Stage],
    session: SessionId,
    pos: usize,
    input: StageInput,
) -> Result<Vec<f32>> {
    let mut x = input;
    for stage in stages.iter_mut() {
        match stage.forward(session, pos, x)? {
            StageOutput::Hidden(h) => x = StageInput::Hidden(h),
            StageOutput::Logits(l) => return Ok(l),
        }
    }
    Err(EngineError::bad_input("the last stage holds no LM head"))
}

/// Holds back text that might be the start of a stop string until it is known not to be.
struct StopFilter<'a> {
    stops: &'a [String],
    text: String,
    emitted: usize,
}

impl StopFilter<'_> {
    /// Adds a piece; returns the text safe to show and whether a stop string was hit.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let search_from = self
            .emitted
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_boundary(&self.text, search_from);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| i + search_from)
            })
            .min();
        if let Some(at) = hit {
            let out = self.text[self.emitted.min(at)..at].to_string();
            self.text.truncate(at);
            self.emitted = at;
            return (out, true);
        }
        let held = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len())
                    .rev()
                    .find(|&n| {
                        self.text.len() >= n
                            && s.is_char_boundary(n)
                            && self.text.ends_with(&s[..n])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let safe = floor_boundary(&self.text, self.text.len() - held).max(self.emitted);
        let out = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (out, false)
    }

    fn finish(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What to generate.
pub struct GenerateRequest<'a> {
    /// Prompt token ids (already templated and tokenized).
    pub prompt: &'a [u32],
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Strings that end the generation (not included in the output).
    pub stop: &'a [String],
}

/// Where the next token comes from: stages in this process with a local sampler, or a
/// pipeline across peers whose last stage samples. The generation loop is the same for both.
pub trait TokenSource {
    /// The model's context window, in positions.
    fn context(&self) -> usize;
    /// Runs `input` at positions `pos..pos + input.len()` and returns the next token.
    /// `history` is every token so far (prompt and generated), for repetition penalties.
    fn next_token(&mut self, pos: usize, input: &[u32], history: &[u32]) -> Result<u32>;
}

/// Stages held in this process, run in order, sampled here.
pub struct LocalPipeline<'a> {
    /// The stages, first to last.
    pub stages: &'a mut [Stage],
    /// The session's cache key.
    pub session: SessionId,
    /// Picks tokens from the last stage's logits.
    pub sampler: &'a mut Sampler,
}

impl TokenSource for LocalPipeline<'_> {
    fn context(&self) -> usize {
        self.stages.first().map_or(0, |s| s.config().context)
    }

    fn next_token(&mut self, pos: usize, input: &[u32], history: &[u32]) -> Result<u32> {
        let logits = run_pipeline(
            self.stages,
            self.session,
            pos,
            StageInput::Tokens(input.to_vec()),
        )?;
        self.sampler.sample(&logits, history)
    }
}

/// Generates from `req.prompt` through `stages`, calling `on_text` with each piece of text as
/// it completes. Returns the whole text and the run's statistics. The session's caches are
/// freed when it ends, by success or error.
pub fn generate(
    stages: &mut [Stage],
    tok: &TextTokenizer,
    session: SessionId,
    req: &GenerateRequest<'_>,
    sampler: &mut Sampler,
    on_text: impl FnMut(&str),
) -> Result<(String, GenerateStats)> {
    let mut local = LocalPipeline {
        stages,
        session,
        sampler,
    };
    let result = generate_with(&mut local, tok, req, on_text);
    for s in local.stages.iter_mut() {
        s.end_session(session);
    }
    result
}

/// Generates from `req.prompt` with tokens from `source`, calling `on_text` with each piece
/// of text as it completes. Returns the whole text and the run's statistics.
pub fn generate_with(
    source: &mut impl TokenSource,
    tok: &TextTokenizer,
    req: &GenerateRequest<'_>,
    mut on_text: impl FnMut(&str),
) -> Result<(String, GenerateStats)> {
    let mut generation = Generation::new(tok, req, source.context())?;
    while let Some((pos, input)) = generation.next_step() {
        let token = source.next_token(pos, input, generation.history())?;
        generation.accept(token, &mut on_text)?;
    }
    Ok(generation.finish(&mut on_text))
}

/// One generation as a state machine: it says which step to run next and takes the token
/// that step produced. The loop that drives it may block ([`generate_with`]) or await (a
/// coordinator keeping many sessions in flight without a thread each), and both run the
/// same rules for stops, limits and statistics.
pub struct Generation<'a> {
    tok: &'a TextTokenizer,
    decoder: StreamDecoder<'a>,
    filter: StopFilter<'a>,
    max_tokens: usize,
    context: usize,
    prompt_len: usize,
    history: Vec<u32>,
    /// Whether prefill is done, so the next step feeds the last token of `history`.
    decoding: bool,
    generated: usize,
    finish: Option<FinishReason>,
    started: Instant,
    first_token_at: Option<Instant>,
}

impl<'a> Generation<'a> {
    /// A generation of `req` in a model with `context` positions; refuses an empty prompt
    /// or one that leaves no room for a token.
    pub fn new(tok: &'a TextTokenizer, req: &GenerateRequest<'a>, context: usize) -> Result<Self> {
        if req.prompt.is_empty() {
            return Err(EngineError::bad_input("the prompt is empty"));
        }
        if req.prompt.len() >= context {
            return Err(EngineError::ContextOverflow {
                needed: req.prompt.len() + 1,
                context,
            });
        }
        Ok(Self {
            tok,
            decoder: tok.stream(),
            filter: StopFilter {
                stops: req.stop,
                text: String::new(),
                emitted: 0,
            },
            max_tokens: req.max_tokens,
            context,
            prompt_len: req.prompt.len(),
            history: req.prompt.to_vec(),
            decoding: false,
            generated: 0,
            finish: None,
            started: Instant::now(),
            first_token_at: None,
        })
    }

    /// The next step to run, as its first position and its input tokens: the whole prompt
    /// first, then one token at a time. `None` once the generation has ended.
    pub fn next_step(&self) -> Option<(usize, &[u32])> {
        if self.finish.is_some() {
            return None;
        }
        let at = if self.decoding {
            self.history.len().saturating_sub(1)
        } else {
            0
        };
        Some((at, self.history.get(at..).unwrap_or_default()))
    }

    /// Every token so far, prompt and generated: what repetition penalties look at.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Takes the token the last step produced, passing newly complete text to `on_text`.
    pub fn accept(&mut self, token: u32, on_text: &mut impl FnMut(&str)) -> Result<()> {
        if self.finish.is_some() {
            return Ok(());
        }
        if self.first_token_at.is_none() {
            self.first_token_at = Some(Instant::now());
        }
        if self.generated >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(());
        }
        if self.tok.is_eos(token) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        self.generated += 1;
        let (shown, stopped) = self.filter.push(&self.decoder.push(token)?);
        if !shown.is_empty() {
            on_text(&shown);
        }
        if stopped {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        self.history.push(token);
        if self.generated == self.max_tokens || self.history.len() >= self.context {
            self.finish = Some(FinishReason::Length);
        } else {
            self.decoding = true;
        }
        Ok(())
    }

    /// Ends the generation: flushes text held back for a stop string that never came, and
    /// returns the whole text and the statistics.
    pub fn finish(mut self, on_text: &mut impl FnMut(&str)) -> (String, GenerateStats) {
        let finish = self.finish.unwrap_or(FinishReason::Length);
        if finish == FinishReason::Length {
            let rest = self.filter.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        let first = self.first_token_at.unwrap_or_else(Instant::now);
        let stats = GenerateStats {
            prompt_tokens: self.prompt_len,
            generated_tokens: self.generated,
            prefill_secs: first.duration_since(self.started).as_secs_f64(),
            decode_secs: first.elapsed().as_secs_f64(),
            finish,
        };
        (self.filter.text, stats)
    }
}
