//! Batched steps: many sessions' rows in one forward give each session exactly (== on f32)
//! what it gets alone, whatever the batch holds beside it, however its prefill is chunked,
//! and while other sessions join and leave. A bad item fails alone.

mod common;

use candle_core::quantized::GgmlDType;
use common::*;
use potluck_engine::llama::{argmax, BatchItem, Stage, StageInput, StageOutput};
use potluck_engine::rng::Rng;
use potluck_engine::weights::WeightFile;
use potluck_engine::EngineError;

/// One session's script: its prompt, and every step's logits when run alone.
struct Script {
    prompt: Vec<u32>,
    /// Tokens fed after the prompt (the solo run's greedy picks).
    decoded: Vec<u32>,
    /// Logits after the prompt, then after each decoded token.
    logits: Vec<Vec<f32>>,
}

fn solo(file: &WeightFile, cuts: &[usize], prompt: Vec<u32>, decode: usize) -> Script {
    let mut chain = stages(file, cuts);
    let mut logits = vec![step(&mut chain, 1, 0, &prompt)];
    let mut decoded = Vec::new();
    for i in 0..decode {
        let next = argmax(logits.last().unwrap()).unwrap();
        decoded.push(next);
        logits.push(step(&mut chain, 1, prompt.len() + i, &[next]));
    }
    Script {
        prompt,
        decoded,
        logits,
    }
}

/// Runs one batch through every stage of `chain`; an item's error stops it at that stage.
fn batch_step(chain: &mut [Stage], items: Vec<BatchItem>) -> Vec<Result<Vec<f32>, EngineError>> {
    let mut live: Vec<(usize, BatchItem)> = items.into_iter().enumerate().collect();
    let mut out: Vec<Option<Result<Vec<f32>, EngineError>>> = live.iter().map(|_| None).collect();
    for stage in chain.iter_mut() {
        let (slots, batch): (Vec<usize>, Vec<BatchItem>) = live.drain(..).unzip();
        for (slot, (item, result)) in slots
            .into_iter()
            .zip(batch.iter().zip(stage.forward_batch(batch.clone())))
        {
            match result {
                Err(e) => out[slot] = Some(Err(e)),
                Ok(StageOutput::Logits(l)) => out[slot] = Some(Ok(l)),
                Ok(StageOutput::Hidden(h)) => live.push((
                    slot,
                    BatchItem {
                        input: StageInput::Hidden(h),
                        ..item.clone()
                    },
                )),
            }
        }
    }
    out.into_iter()
        .map(|o| o.expect("every item ends"))
        .collect()
}

/// Where a session is in its script during the batched run.
struct Cursor {
    id: u64,
    script: usize,
    /// Prompt positions prefilled so far.
    prefilled: usize,
    /// Decode steps done.
    decoded: usize,
}

/// Runs `n` sessions with prompts of different lengths through `cuts`-split stages: each
/// round a random subset of the live sessions steps (a random-size prefill chunk or one
/// decode token), new sessions join over time and finished ones leave. Every result must
/// equal the solo run's.
fn check_batched(file: &WeightFile, cuts: &[usize], n: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let vocab = file.config().unwrap().vocab as u64;
    let scripts: Vec<Script> = (0..n)
        .map(|_| {
            let len = 1 + (rng.next_u64() % 40) as usize;
            let prompt = (0..len).map(|_| (rng.next_u64() % vocab) as u32).collect();
            solo(file, cuts, prompt, 1 + (rng.next_u64() % 6) as usize)
        })
        .collect();
    let mut chain = stages(file, cuts);
    let mut waiting: Vec<usize> = (0..n).collect();
    let mut live: Vec<Cursor> = Vec::new();
    let mut next_id = 100;
    let mut rounds = 0;
    while !waiting.is_empty() || !live.is_empty() {
        rounds += 1;
        assert!(rounds < 10_000, "the run does not end");
        // Up to three sessions join each round.
        for _ in 0..(rng.next_u64() % 4) {
            if let Some(s) = waiting.pop() {
                live.push(Cursor {
                    id: next_id,
                    script: s,
                    prefilled: 0,
                    decoded: 0,
                });
                next_id += 1;
            }
        }
        let mut items = Vec::new();
        let mut who = Vec::new();
        for (i, c) in live.iter().enumerate() {
            if rng.next_u64().is_multiple_of(4) {
                continue; // sits this round out
            }
            let s = &scripts[c.script];
            let (pos, tokens) = if c.prefilled < s.prompt.len() {
                let left = s.prompt.len() - c.prefilled;
                let take = 1 + (rng.next_u64() as usize) % left;
                (
                    c.prefilled,
                    s.prompt[c.prefilled..c.prefilled + take].to_vec(),
                )
            } else {
                (s.prompt.len() + c.decoded, vec![s.decoded[c.decoded]])
            };
            items.push(BatchItem {
                session: c.id,
                pos,
                input: StageInput::Tokens(tokens),
            });
            who.push(i);
        }
        let results = batch_step(&mut chain, items.clone());
        let mut finished = Vec::new();
        for ((i, item), result) in who.into_iter().zip(&items).zip(results) {
            let c = &mut live[i];
            let s = &scripts[c.script];
            let logits = result.unwrap_or_else(|e| panic!("session {} failed: {e}", c.id));
            let expect = if c.prefilled < s.prompt.len() {
                c.prefilled += item.input.len();
                (c.prefilled == s.prompt.len()).then(|| &s.logits[0])
            } else {
                c.decoded += 1;
                Some(&s.logits[c.decoded])
            };
            if let Some(expect) = expect {
                assert!(
                    &logits == expect,
                    "{n} sessions, split {cuts:?}: session {} at position {} differs from its solo run (max diff {})",
                    c.id,
                    item.pos,
                    max_abs_diff(&logits, expect)
                );
            }
            if c.decoded == s.decoded.len() {
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let c = live.remove(i);
            for stage in chain.iter_mut() {
                assert!(stage.end_session(c.id));
            }
        }
    }
    for stage in &chain {
        assert_eq!(stage.kv().session_count(), 0, "every session left");
    }
}

#[test]
fn batched_sessions_match_solo_runs_for_every_weight_type() {
    let dir = tempfile::tempdir().unwrap();
    for (i, dtype) in [
        GgmlDType::F32,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
    ]
    .into_iter()
    .enumerate()
    {
        let (_, file) = synthetic(&dir, spec(dtype));
        let layers = file.config().unwrap().layers;
        for (j, n) in [1, 2, 7, 16, 33].into_iter().enumerate() {
            let cuts: Vec<usize> = if j % 2 == 0 { vec![] } else { vec![layers / 2] };
            check_batched(&file, &cuts, n, 1000 + 10 * i as u64 + j as u64);
        }
    }
}

#[test]
fn batched_safetensors_match_solo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(GgmlDType::F32);
    for (k, dtype) in [candle_core::DType::F32, candle_core::DType::F16]
        .into_iter()
        .enumerate()
    {
        let path = dir.path().join(format!("st{k}"));
        potluck_engine::synthetic::write_safetensors(&s, &path, dtype).unwrap();
        let file = WeightFile::open(&path).unwrap();
        check_batched(&file, &[3], 16, 77 + k as u64);
    }
}

#[test]
fn smollm2_batched_sessions_match_solo_runs() {
    let file = WeightFile::open(&smollm2_path()).unwrap();
    check_batched(&file, &[], 7, 5);
    check_batched(&file, &[11], 4, 6);
}

#[test]
fn a_bad_item_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = synthetic(&dir, spec(GgmlDType::Q8_0));
    let good = solo(&file, &[], vec![5, 6, 7, 8], 2);
    let mut chain = stages(&file, &[]);
    let context = file.config().unwrap().context;
    let items = vec![
        // Never started: position 3 of an unknown session.
        BatchItem {
            session: 9,
            pos: 3,
            input: StageInput::Tokens(vec![1]),
        },
        BatchItem {
            session: 1,
            pos: 0,
            input: StageInput::Tokens(good.prompt.clone()),
        },
        // Outside the vocabulary.
        BatchItem {
            session: 2,
            pos: 0,
            input: StageInput::Tokens(vec![u32::MAX]),
        },
        // Past the context window.
        BatchItem {
            session: 3,
            pos: 0,
            input: StageInput::Tokens(vec![1; context + 1]),
        },
        // The same session twice in one batch.
        BatchItem {
            session: 1,
            pos: 0,
            input: StageInput::Tokens(vec![1]),
        },
        BatchItem {
            session: 4,
            pos: 0,
            input: StageInput::Tokens(vec![]),
        },
    ];
    let out = chain[0].forward_batch(items);
    assert!(
        matches!(out[0], Err(EngineError::UnknownSession(9))),
        "{:?}",
        out[0].as_ref().err()
    );
    match &out[1] {
        Ok(StageOutput::Logits(l)) => assert!(l == &good.logits[0]),
        other => panic!("the good item failed: {:?}", other.as_ref().err()),
    }
    assert!(out[2].is_err());
    assert!(matches!(out[3], Err(EngineError::ContextOverflow { .. })));
    assert!(out[4].is_err());
    assert!(out[5].is_err());
    // The good session goes on as if alone.
    let next = argmax(&good.logits[0]).unwrap();
    let out = chain[0].forward_batch(vec![BatchItem {
        session: 1,
        pos: good.prompt.len(),
        input: StageInput::Tokens(vec![next]),
    }]);
    match &out[0] {
        Ok(StageOutput::Logits(l)) => assert!(l == &good.logits[1]),
        other => panic!("the good session failed: {:?}", other.as_ref().err()),
    }
    assert_eq!(
        chain[0].kv().session_count(),
        1,
        "failed items hold no cache"
    );
}
