//! A stage refuses bad input with typed errors and keeps serving; KV caches stay in budget.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use common::*;
use potluck_engine::llama::{Stage, StageInput, StageOutput};
use potluck_engine::sampling::{Sampler, SamplingParams};
use potluck_engine::EngineError;

#[test]
fn bad_inputs_get_typed_errors_and_the_stage_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = synthetic(&dir, spec(GgmlDType::Q8_0));
    let mut s = stages(&file, &[4]);
    let good = step(&mut s, 1, 0, &[1, 2, 3]);
    let (first, rest) = s.split_at_mut(1);
    let (first, second) = (&mut first[0], &mut rest[0]);
    // Token id outside the vocabulary.
    assert!(matches!(
        first.forward(2, 0, StageInput::Tokens(vec![999_999])),
        Err(EngineError::BadInput(_))
    ));
    // Empty input.
    assert!(matches!(
        first.forward(2, 0, StageInput::Tokens(vec![])),
        Err(EngineError::BadInput(_))
    ));
    // Tokens to a middle stage, hidden states to the first.
    assert!(matches!(
        second.forward(2, 0, StageInput::Tokens(vec![1])),
        Err(EngineError::BadInput(_))
    ));
    let h = Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        first.forward(2, 0, StageInput::Hidden(h)),
        Err(EngineError::BadInput(_))
    ));
    // Wrong width, wrong dtype, wrong rank.
    for bad in [
        Tensor::zeros((2, 63), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros((2, 64), candle_core::DType::F16, &Device::Cpu).unwrap(),
        Tensor::zeros((1, 2, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
    ] {
        assert!(matches!(
            second.forward(2, 0, StageInput::Hidden(bad)),
            Err(EngineError::BadInput(_))
        ));
    }
    // A session that was never started, and a position past the session's end.
    assert!(matches!(
        first.forward(77, 5, StageInput::Tokens(vec![1])),
        Err(EngineError::UnknownSession(77))
    ));
    assert!(matches!(
        first.forward(1, 10, StageInput::Tokens(vec![1])),
        Err(EngineError::BadInput(_))
    ));
    // Past the context window.
    let long = vec![1u32; 300];
    assert!(matches!(
        first.forward(3, 0, StageInput::Tokens(long)),
        Err(EngineError::ContextOverflow { .. })
    ));
    // After all that, the same request gives the same answer.
    for st in s.iter_mut() {
        st.end_session(1);
    }
    assert_eq!(step(&mut s, 1, 0, &[1, 2, 3]), good);
}

#[test]
fn replay_after_rollback_reproduces_logits() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = synthetic(&dir, spec(GgmlDType::Q4_1));
    let mut s = stages(&file, &[3, 6]);
    let prompt = [5u32, 6, 7, 8, 9];
    let a = greedy_logits(&mut s, &prompt, 4);
    // Roll back to position 2 and replay the rest of the prompt: same logits as the first time.
    let again = step(&mut s, 1, 2, &prompt[2..]);
    assert_eq!(again, a[0]);
}

#[test]
fn kv_caches_stay_in_budget_with_lru_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = synthetic(&dir, spec(GgmlDType::F32));
    let cfg = file.config().unwrap();
    // Room for two sessions of 32 positions over 8 blocks, not three.
    let per_session = 32 * cfg.kv_bytes_per_position() * cfg.layers;
    let mut stage = Stage::load(&file, 0..cfg.layers, 2 * per_session + 1).unwrap();
    for id in 1..=3u64 {
        assert!(matches!(
            stage.forward(id, 0, StageInput::Tokens(vec![1, 2])),
            Ok(StageOutput::Logits(_))
        ));
    }
    assert_eq!(stage.kv().session_count(), 2);
    assert!(stage.kv().used_bytes() <= stage.kv().budget());
    assert_eq!(
        stage.kv().session_len(1),
        None,
        "the least recently used session is evicted"
    );
    assert_eq!(stage.kv().session_len(3), Some(2));
    // A session that cannot fit even alone is refused, and others are untouched.
    let mut tiny = Stage::load(&file, 0..cfg.layers, per_session / 2).unwrap();
    assert!(matches!(
        tiny.forward(1, 0, StageInput::Tokens(vec![1])),
        Err(EngineError::KvBudget { .. })
    ));
}

#[test]
fn without_eviction_a_full_store_refuses_new_sessions_and_keeps_running_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = synthetic(&dir, spec(GgmlDType::F32));
    let cfg = file.config().unwrap();
    let per_session = 32 * cfg.kv_bytes_per_position() * cfg.layers;
    let mut stage = Stage::load(&file, 0..cfg.layers, 3 * per_session).unwrap();
    stage.set_kv_eviction(false);
    for id in 1..=2u64 {
        assert!(stage.forward(id, 0, StageInput::Tokens(vec![1, 2])).is_ok());
    }
    // Two of three sessions' room is past three quarters: a new session waits.
    assert!(matches!(
        stage.forward(3, 0, StageInput::Tokens(vec![1, 2])),
        Err(EngineError::KvBudget { .. })
    ));
    assert_eq!(
        stage.kv().session_len(1),
        Some(2),
        "running sessions are kept"
    );
    assert_eq!(stage.kv().session_len(3), None);
    // A running session may still grow into the last quarter (32 positions to 64).
    assert!(stage.forward(2, 2, StageInput::Tokens(vec![3; 40])).is_ok());
    assert_eq!(stage.kv().used_bytes(), 3 * per_session);
    // Once one ends, the waiting one fits.
    stage.end_session(1);
    stage.end_session(2);
    assert!(stage.forward(3, 0, StageInput::Tokens(vec![1, 2])).is_ok());
    assert!(stage.forward(3, 2, StageInput::Tokens(vec![3])).is_ok());
}

#[test]
fn last_stage_returns_the_sampled_token_with_top_logprobs() {
    let dir = tempfile::tempdir().unwrap();
    let (_, file) = synthetic(&dir, spec(GgmlDType::Q8_0));
    let mut whole = stages(&file, &[]);
    let logits = step(&mut whole, 1, 0, &[1, 2, 3]);
    let mut s = stages(&file, &[]);
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let t = s[0]
        .forward_sampled(
            1,
            0,
            StageInput::Tokens(vec![1, 2, 3]),
            &mut sampler,
            &[],
            5,
        )
        .unwrap();
    assert_eq!(t.token, potluck_engine::llama::argmax(&logits).unwrap());
    assert_eq!(t.top.len(), 5);
    assert_eq!(t.top[0].token, t.token);
    // All-position logits end with the same last row.
    let mut s2 = stages(&file, &[]);
    let all = s2[0]
        .forward_all_logits(1, 0, StageInput::Tokens(vec![1, 2, 3]))
        .unwrap();
    assert_eq!(all.dims(), &[3, logits.len()]);
    assert_eq!(all.get(2).unwrap().to_vec1::<f32>().unwrap(), logits);
}
