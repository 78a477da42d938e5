//! The exactness property: any split of a model into stages gives bit-identical logits to the
//! whole model run as one stage.

mod common;

use candle_core::quantized::GgmlDType;
use common::*;
use potluck_engine::rng::Rng;

fn check_splits(
    file: &potluck_engine::weights::WeightFile,
    prompt: &[u32],
    decode: usize,
    trials: &[usize],
    seed: u64,
) {
    let layers = file.config().unwrap().layers;
    let reference = greedy_logits(&mut stages(file, &[]), prompt, decode);
    let mut rng = Rng::new(seed);
    for &k in trials {
        let cuts = random_cuts(&mut rng, layers, k);
        let got = greedy_logits(&mut stages(file, &cuts), prompt, decode);
        for (step, (a, b)) in reference.iter().zip(&got).enumerate() {
            assert!(
                a == b,
                "split {:?} differs from one stage at step {step} (max diff {})",
                ranges(layers, &cuts),
                max_abs_diff(a, b)
            );
        }
    }
}

#[test]
fn synthetic_splits_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    for (i, dtype) in [
        GgmlDType::F32,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
    ]
    .into_iter()
    .enumerate()
    {
        let (_, file) = synthetic(&dir, spec(dtype));
        let prompt: Vec<u32> = (0..23).map(|i| (i * 37 % 250) as u32).collect();
        check_splits(&file, &prompt, 5, &[2, 3, 4, 8], 100 + i as u64);
    }
}

#[test]
fn synthetic_chunked_prefill_splits_are_bit_identical() {
    // A prompt longer than one prefill chunk exercises the chunk boundary in every stage.
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(GgmlDType::Q8_0);
    s.context = 1200;
    let (_, file) = synthetic(&dir, s);
    let prompt: Vec<u32> = (0..700).map(|i| (i * 13 % 260) as u32).collect();
    check_splits(&file, &prompt, 2, &[2, 5], 9);
}

#[test]
fn smollm2_splits_are_bit_identical() {
    let file = potluck_engine::weights::WeightFile::open(&smollm2_path()).unwrap();
    let tok = potluck_engine::generate::load_tokenizer(&file).unwrap();
    for (i, text) in [
        "The capital of France is",
        "Volunteers pool their idle computers so that",
    ]
    .iter()
    .enumerate()
    {
        let prompt = tok.encode(text).unwrap();
        check_splits(&file, &prompt, 4, &[2, 3, 5], 40 + i as u64);
    }
}
