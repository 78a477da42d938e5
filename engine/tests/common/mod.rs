//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use candle_core::quantized::GgmlDType;
use potluck_engine::kv_cache::SessionId;
use potluck_engine::llama::{Stage, StageInput, StageOutput};
use potluck_engine::synthetic::{write_gguf, SyntheticSpec};
use potluck_engine::weights::WeightFile;
use std::ops::Range;
use std::path::PathBuf;

/// KV budget used by tests: ample for the tiny models and short SmolLM2 runs.
pub const BUDGET: usize = 256 << 20;

/// The default model as `.ci/run` fetches it (same cache rules as `potluck`).
pub fn smollm2_path() -> PathBuf {
    let p = potluck_engine::cache::default_model_path().expect("no home directory");
    assert!(
        p.exists(),
        "{} is missing: run `potluck model fetch smollm2-135m-instruct` (.ci/run does)",
        p.display()
    );
    p
}

/// Writes a synthetic GGUF of `dtype` into `dir` and opens it.
pub fn synthetic(dir: &tempfile::TempDir, spec: SyntheticSpec) -> (PathBuf, WeightFile) {
    let path = dir
        .path()
        .join(format!("synthetic-{:?}-{}.gguf", spec.dtype, spec.seed));
    write_gguf(&spec, &path).expect("write synthetic gguf");
    let file = WeightFile::open(&path).expect("open synthetic gguf");
    (path, file)
}

/// A spec with the given tensor type; k-quants need rows of 256.
pub fn spec(dtype: GgmlDType) -> SyntheticSpec {
    let kquant = matches!(
        dtype,
        GgmlDType::Q2K | GgmlDType::Q3K | GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K
    );
    if kquant {
        SyntheticSpec {
            hidden: 256,
            ff: 512,
            heads: 4,
            kv_heads: 2,
            layers: 4,
            dtype,
            ..SyntheticSpec::default()
        }
    } else {
        SyntheticSpec {
            dtype,
            ..SyntheticSpec::default()
        }
    }
}

/// Loads `file` as stages cut at `cuts` (block indices, ascending, inside 1..layers).
pub fn stages(file: &WeightFile, cuts: &[usize]) -> Vec<Stage> {
    let layers = file.config().expect("config").layers;
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(layers);
    bounds
        .windows(2)
        .map(|w| Stage::load(file, w[0]..w[1], BUDGET).expect("load stage"))
        .collect()
}

/// Runs tokens through the chain and returns the last stage's logits.
pub fn step(stages: &mut [Stage], session: SessionId, pos: usize, tokens: &[u32]) -> Vec<f32> {
    let mut x = StageInput::Tokens(tokens.to_vec());
    for s in stages.iter_mut() {
        match s.forward(session, pos, x).expect("forward") {
            StageOutput::Hidden(h) => x = StageInput::Hidden(h),
            StageOutput::Logits(l) => return l,
        }
    }
    panic!("no stage returned logits");
}

/// Logits after the prompt and after each of `decode` greedy steps.
pub fn greedy_logits(stages: &mut [Stage], prompt: &[u32], decode: usize) -> Vec<Vec<f32>> {
    let mut out = vec![step(stages, 1, 0, prompt)];
    for i in 0..decode {
        let next = potluck_engine::llama::argmax(out.last().expect("logits")).expect("argmax");
        out.push(step(stages, 1, prompt.len() + i, &[next]));
    }
    out
}

/// Largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// Random cut points: `k - 1` distinct sorted blocks in 1..layers, from a fixed seed.
pub fn random_cuts(rng: &mut potluck_engine::rng::Rng, layers: usize, k: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    while cuts.len() < k - 1 {
        let c = 1 + (rng.next_u64() as usize) % (layers - 1);
        if !cuts.contains(&c) {
            cuts.push(c);
        }
    }
    cuts.sort_unstable();
    cuts
}

/// Block ranges of a cut list, for messages.
pub fn ranges(layers: usize, cuts: &[usize]) -> Vec<Range<usize>> {
    let mut b = vec![0];
    b.extend_from_slice(cuts);
    b.push(layers);
    b.windows(2).map(|w| w[0]..w[1]).collect()
}

/// Small builders on the synthetic spec.
pub trait SyntheticSpecExt: Sized {
    /// The same spec with the LM head tied or not.
    fn with_tied(self, tied: bool) -> Self;
    /// The same spec with another tensor type.
    fn with_dtype(self, dtype: GgmlDType) -> Self;
}

impl SyntheticSpecExt for SyntheticSpec {
    fn with_tied(self, tied: bool) -> Self {
        SyntheticSpec { tied, ..self }
    }
    fn with_dtype(self, dtype: GgmlDType) -> Self {
        SyntheticSpec { dtype, ..self }
    }
}
