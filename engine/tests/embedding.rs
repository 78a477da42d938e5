//! The BERT sentence encoder against sentence-transformers: vectors computed once with the
//! reference library (engine/tests/data/minilm_reference.json says which versions) must be
//! matched to cosine 0.9999 for every text, alone or batched with others.

use potluck_engine::bert::{cosine, Encoder};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
struct Reference {
    texts: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

fn minilm() -> Encoder {
    let p: PathBuf = potluck_engine::cache::default_embedding_model_path().expect("no home");
    assert!(
        p.join("model.safetensors").exists(),
        "{} is missing: run `potluck model fetch all-minilm-l6-v2` (.ci/run does)",
        p.display()
    );
    Encoder::load(&p).expect("load all-MiniLM-L6-v2")
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/minilm_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference file"))
        .expect("reference json")
}

#[test]
fn matches_sentence_transformers() {
    let enc = minilm();
    let r = reference();
    assert_eq!(enc.dimensions(), 384);
    assert_eq!(enc.max_tokens(), 256);
    // Batched: texts of very different lengths share padded batches.
    let (batched, tokens) = enc.embed(&r.texts).expect("embed");
    assert!(
        tokens > 256,
        "the long texts were truncated to 256 tokens each"
    );
    let lowest = batched
        .iter()
        .zip(&r.vectors)
        .map(|(g, w)| cosine(g, w))
        .fold(1.0f32, f32::min);
    let widest = batched
        .iter()
        .zip(&r.vectors)
        .flat_map(|(g, w)| g.iter().zip(w).map(|(a, b)| (a - b).abs()))
        .fold(0.0f32, f32::max);
    eprintln!(
        "against sentence-transformers: lowest cosine {lowest}, largest difference {widest:e}"
    );
    for (i, (got, want)) in batched.iter().zip(&r.vectors).enumerate() {
        let cos = cosine(got, want);
        assert!(cos >= 0.9999, "text {i} {:?}: cosine {cos}", r.texts[i]);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "text {i} has norm {norm}");
    }
    // Alone: padding must not change a text's vector.
    for (i, text) in r.texts.iter().enumerate() {
        let (one, _) = enc.embed(std::slice::from_ref(text)).expect("embed one");
        let cos = cosine(&one[0], &r.vectors[i]);
        assert!(cos >= 0.9999, "text {i} alone: cosine {cos}");
    }
    // Different texts stay apart: the check above is not met by any vector at all.
    assert!(cosine(&batched[0], &batched[1]) < 0.9);
}

#[test]
fn refuses_oversized_input() {
    let enc = minilm();
    let huge = "x".repeat(potluck_engine::bert::MAX_TEXT_BYTES + 1);
    assert!(enc.embed(&[huge]).is_err());
    let many = vec![String::from("a"); potluck_engine::bert::MAX_TEXTS + 1];
    assert!(enc.embed(&many).is_err());
    let (none, tokens) = enc.embed(&[]).expect("no texts is no work");
    assert!(none.is_empty() && tokens == 0);
}
