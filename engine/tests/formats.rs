//! Every supported tensor type and both file formats compute the same model.

mod common;

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use common::*;
use potluck_engine::config::{Llama3Scaling, LlamaConfig};
use potluck_engine::synthetic::write_safetensors;
use potluck_engine::synthetic::SyntheticSpec;
use potluck_engine::weights::WeightFile;

fn prompt() -> Vec<u32> {
    (0..17).map(|i| (i * 29 % 260) as u32).collect()
}

#[test]
fn gguf_and_safetensors_forms_agree() {
    // Same weights; GGUF stores Q/K permuted and uses interleaved RoPE, HF uses split halves.
    let dir = tempfile::tempdir().unwrap();
    for tied in [false, true] {
        let s = common::SyntheticSpecExt::with_tied(spec(GgmlDType::F32), tied);
        let (_, gguf) = synthetic(&dir, s.clone());
        let st_dir = dir.path().join(format!("st-{tied}"));
        write_safetensors(&s, &st_dir, DType::F32).unwrap();
        let st = WeightFile::open(&st_dir).unwrap();
        // GGUF stores epsilon as f32, config.json as f64: compare the rest exactly.
        let (cg, cs) = (gguf.config().unwrap(), st.config().unwrap());
        assert!((cg.rms_eps - cs.rms_eps).abs() < 1e-9);
        assert_eq!(
            LlamaConfig { rms_eps: 0.0, ..cg },
            LlamaConfig { rms_eps: 0.0, ..cs }
        );
        let a = greedy_logits(&mut stages(&gguf, &[3]), &prompt(), 6);
        let b = greedy_logits(&mut stages(&st, &[5]), &prompt(), 6);
        for (x, y) in a.iter().zip(&b) {
            assert!(
                max_abs_diff(x, y) < 1e-3,
                "formats differ by {}",
                max_abs_diff(x, y)
            );
        }
    }
}

#[test]
fn llama3_rope_scaling_agrees_across_formats_and_changes_the_model() {
    // GGUF carries the scaling as rope_freqs.weight divisors, config.json as rope_scaling.
    let dir = tempfile::tempdir().unwrap();
    let scaling = Llama3Scaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 64,
    };
    let s = SyntheticSpec {
        llama3_scaling: Some(scaling.clone()),
        ..spec(GgmlDType::F32)
    };
    let (_, gguf) = synthetic(&dir, s.clone());
    let st_dir = dir.path().join("st");
    write_safetensors(&s, &st_dir, DType::F32).unwrap();
    let st = WeightFile::open(&st_dir).unwrap();
    assert_eq!(st.config().unwrap().llama3_scaling, Some(scaling));
    // A long prompt, so positions reach the wavelengths the scaling changes.
    let long: Vec<u32> = (0..120).map(|i| (i * 31 % 260) as u32).collect();
    let a = greedy_logits(&mut stages(&gguf, &[2]), &long, 3);
    let b = greedy_logits(&mut stages(&st, &[6]), &long, 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            max_abs_diff(x, y) < 1e-3,
            "formats differ by {}",
            max_abs_diff(x, y)
        );
    }
    let (_, plain) = synthetic(
        &dir,
        SyntheticSpec {
            seed: s.seed,
            ..spec(GgmlDType::F32)
        },
    );
    let c = greedy_logits(&mut stages(&plain, &[]), &long, 0);
    assert!(max_abs_diff(&a[0], &c[0]) > 1e-3, "scaling had no effect");
}

#[test]
fn half_precision_safetensors_run_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(GgmlDType::F32);
    let reference = {
        let d = dir.path().join("f32");
        write_safetensors(&s, &d, DType::F32).unwrap();
        greedy_logits(
            &mut stages(&WeightFile::open(&d).unwrap(), &[]),
            &prompt(),
            0,
        )
    };
    for dtype in [DType::F16, DType::BF16] {
        let d = dir.path().join(format!("{dtype:?}"));
        write_safetensors(&s, &d, dtype).unwrap();
        let got = greedy_logits(
            &mut stages(&WeightFile::open(&d).unwrap(), &[4]),
            &prompt(),
            0,
        );
        let c = cosine(&reference[0], &got[0]);
        assert!(c > 0.99, "{dtype:?} cosine to f32 is {c}");
    }
}

#[test]
fn every_gguf_tensor_type_runs_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let types = [
        (GgmlDType::F16, 0.999),
        (GgmlDType::Q8_0, 0.99),
        (GgmlDType::Q5_0, 0.95),
        (GgmlDType::Q5_1, 0.95),
        (GgmlDType::Q4_0, 0.9),
        (GgmlDType::Q4_1, 0.9),
        (GgmlDType::Q6K, 0.95),
        (GgmlDType::Q5K, 0.93),
        (GgmlDType::Q4K, 0.9),
        (GgmlDType::Q3K, 0.75),
        // 2-bit weights on Gaussian random matrices keep only the rough direction.
        (GgmlDType::Q2K, 0.6),
    ];
    for (dtype, floor) in types {
        let s = spec(dtype);
        let (_, reference) = synthetic(
            &dir,
            common::SyntheticSpecExt::with_dtype(s.clone(), GgmlDType::F32),
        );
        let (_, file) = synthetic(&dir, s);
        let a = greedy_logits(&mut stages(&reference, &[]), &prompt(), 0);
        let b = greedy_logits(&mut stages(&file, &[2]), &prompt(), 0);
        let c = cosine(&a[0], &b[0]);
        assert!(c > floor, "{dtype:?}: cosine to f32 is {c}, floor {floor}");
    }
}

#[test]
fn gguf_v3_header_loads() {
    let dir = tempfile::tempdir().unwrap();
    let (path, v2) = synthetic(&dir, spec(GgmlDType::Q8_0));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
    let v3_path = dir.path().join("v3.gguf");
    std::fs::write(&v3_path, bytes).unwrap();
    let v3 = WeightFile::open(&v3_path).unwrap();
    assert_eq!(
        greedy_logits(&mut stages(&v2, &[]), &prompt(), 2),
        greedy_logits(&mut stages(&v3, &[]), &prompt(), 2)
    );
}
