//! Turning logits into a token: greedy, or seeded sampling with temperature, top-k, top-p,
//! min-p and a repetition penalty. The same seed and settings always give the same tokens.

use crate::error::{EngineError, Result};
use crate::rng::Rng;

/// How to pick tokens. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of already-seen tokens by this (1 = off).
    pub repetition_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub penalty_window: usize,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repetition_penalty: 1.0,
            penalty_window: 64,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Rejects settings that have no meaning, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::bad_input(m.to_string()));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition penalty must be a finite number > 0");
        }
        Ok(())
    }
}

/// A token id with its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    /// Token id.
    pub token: u32,
    /// Natural-log probability.
    pub logprob: f32,
}

/// A sampler: the parameters plus the random stream they drive.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler whose random stream starts at `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = Rng::new(params.seed);
        Ok(Self { params, rng })
    }

    /// The parameters in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits`, given the tokens seen so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(EngineError::bad_input("empty logits"));
        }
        let p = &self.params;
        let mut penalized;
        let logits = if p.repetition_penalty != 1.0 && !history.is_empty() {
            penalized = logits.to_vec();
            let start = history.len().saturating_sub(p.penalty_window);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(l) = penalized.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
            &penalized[..]
        } else {
            logits
        };
        if p.temperature == 0.0 {
            return argmax(logits).ok_or_else(|| EngineError::bad_input("no logits"));
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if cand.is_empty() {
            return Err(EngineError::bad_input("every logit is non-finite"));
        }
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|(_, l)| (((l - max) / p.temperature) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (i, &q) in probs[..keep].iter().enumerate() {
            if u < q {
                return Ok(cand[i].0);
            }
            u -= q;
        }
        Ok(cand[keep - 1].0)
    }
}

/// The log-probability of `token` and the `k` most likely tokens under `logits`.
pub fn top_logprobs(logits: &[f32], token: u32, k: usize) -> (f32, Vec<TokenLogprob>) {
    let max = logits
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .filter(|x| x.is_finite())
            .map(|&x| ((x - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let lp = |t: u32| {
        logits
            .get(t as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse)
    };
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_unstable_by(cmp);
    (
        lp(token),
        idx.into_iter()
            .map(|t| TokenLogprob {
                token: t,
                logprob: lp(t),
            })
            .collect(),
    )
}

/// Index of the largest logit (the first one on ties), for greedy decoding.
pub fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}
