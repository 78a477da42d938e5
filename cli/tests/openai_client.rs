//! The official `openai` Python package (installed with pip into a virtualenv under the
//! target folder) drives a real pool: whole and streamed chat, a completion, whole and
//! streamed Responses, the model list, embeddings (as the client asks by default, base64,
//! and as floats), a batch through Files and Batches, and errors; greedy text equals
//! `potluck generate`'s.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const OPENAI_VERSION: &str = "openai==1.109.1";
const KEY: &str = "sk-potluck-client-test";

/// A virtualenv with the openai package; made once and reused.
fn venv() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let python = dir.join("bin").join("python");
    let ready = dir.join(".installed");
    if std::fs::read_to_string(&ready).is_ok_and(|v| v == OPENAI_VERSION) {
        return python;
    }
    let status = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&dir)
        .status()
        .expect("python3 -m venv");
    assert!(status.success(), "could not make a virtualenv");
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            OPENAI_VERSION,
        ])
        .output()
        .expect("pip install openai");
    assert!(
        out.status.success(),
        "pip install {OPENAI_VERSION} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&ready, OPENAI_VERSION).unwrap();
    python
}

#[test]
fn the_official_openai_client_gets_what_potluck_generate_gives() {
    let python = venv();
    let dir = tempfile::tempdir().unwrap();
    // One node: a batch unit is validated by that node's result alone.
    let (_coord, _node, http) =
        common::small_pool(dir.path(), &["--api-key", KEY, "--batch-quorum", "1"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_client.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(format!("http://{http}/v1"))
        .arg(KEY)
        .arg("smollm2-135m-instruct")
        .output()
        .expect("run the client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON from the client");

    let (chat, chat_tokens) = common::local_generate("What is the capital of Japan?", true, 24);
    assert_eq!(v["chat"], chat, "{v}");
    assert_eq!(v["stream"], chat, "{v}");
    assert_eq!(v["chat_usage"], chat_tokens, "{v}");
    assert_eq!(v["stream_usage"], chat_tokens, "{v}");
    for field in ["responses", "responses_stream", "responses_stream_final"] {
        assert_eq!(v[field], chat, "{field}: {v}");
    }
    assert_eq!(v["responses_tokens"], chat_tokens, "{v}");
    assert_eq!(v["chat_finish"], "stop", "{v}");
    let (completion, _) = common::local_generate("The capital of France is", false, 16);
    assert_eq!(v["completion"], completion, "{v}");
    assert_eq!(
        v["models"],
        serde_json::json!(["smollm2-135m-instruct", "all-minilm-l6-v2"]),
        "{v}"
    );
    let texts = [
        "The capital of Japan is Tokyo.".to_string(),
        "Volunteers pool idle computers.".to_string(),
    ];
    let (want, tokens) = common::local_embed(&texts);
    assert_eq!(v["embedding_tokens"], tokens, "{v}");
    for format in ["embeddings_default", "embeddings_float"] {
        let got: Vec<Vec<f32>> = serde_json::from_value(v[format].clone()).expect(format);
        assert_eq!(got.len(), 2, "{format}: {v}");
        for (g, w) in got.iter().zip(&want) {
            let cos = potluck_engine::bert::cosine(g, w);
            assert!(cos >= 0.9999, "{format}: cosine {cos}");
        }
    }
    assert_eq!(v["batch_status"], "completed", "{v}");
    assert_eq!(v["batch_counts"], serde_json::json!([2, 2]), "{v}");
    let lines = v["batch_lines"].as_array().expect("batch lines");
    assert_eq!(lines.len(), 2, "{v}");
    for (i, (line, w)) in lines.iter().zip(&want).enumerate() {
        assert_eq!(line[0], format!("b{i}"), "{v}");
        let got: Vec<f32> = serde_json::from_value(line[1].clone()).expect("a vector");
        assert!(potluck_engine::bert::cosine(&got, w) >= 0.9999, "{v}");
    }
    assert_eq!(v["unknown_model"], 404, "{v}");
    assert_eq!(v["wrong_key"], 401, "{v}");
}
