//! `POST /v1/embeddings` on a real pool: a coordinator and two nodes as `potluck` processes on
//! 127.0.0.1. Many inputs are split across both nodes and come back in order, equal to
//! all-MiniLM-L6-v2 run in this process; bad requests get clear errors; a node that dies
//! costs a slower answer, not an error.

mod common;

use common::{node, post_json, raw_http, request, split_answer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match i % 4 {
            0 => format!("Sentence {i} is about volunteers who share idle computers."),
            1 => format!("Número {i}: la piscine est fermée le dimanche."),
            2 => format!("{i} "),
            _ => "word ".repeat(i % 50 + 1),
        })
        .collect()
}

fn vectors(answer: &Value) -> Vec<Vec<f32>> {
    let data = answer["data"].as_array().expect("data");
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i, "out of order: {d}");
            serde_json::from_value(d["embedding"].clone()).expect("a float vector")
        })
        .collect()
}

fn work_units(http: &str) -> Vec<u64> {
    let raw = raw_http(http, &request("GET", "/api/pool", &[], ""));
    let (status, body) = split_answer(&raw);
    assert_eq!(status, 200, "{raw}");
    let pool: Value = serde_json::from_str(body).expect("pool JSON");
    pool["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["work"]["units"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn embeddings_are_split_across_nodes_exact_and_survive_a_node_dying() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    let (_a, id_a) = node(dir.path(), "a", "public", &addr, &[]);
    let (b, id_b) = node(dir.path(), "b", "public", &addr, &[]);
    common::wait_joined(&mut coord, [&id_a, &id_b]);

    let inputs = texts(200);
    let (status, answer) = post_json(&http, "/v1/embeddings", &json!({"input": inputs}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model"], "all-minilm-l6-v2");
    let got = vectors(&answer);
    let (want, tokens) = common::local_embed(&inputs);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let cos = potluck_engine::bert::cosine(g, w);
        assert!(cos >= 0.9999, "input {i}: cosine {cos}");
    }
    assert_eq!(answer["usage"]["prompt_tokens"], tokens);
    let units = work_units(&http);
    assert_eq!(units.len(), 2);
    assert!(
        units.iter().all(|&u| u > 0),
        "both nodes should have taken slices: {units:?}"
    );

    // base64 (the official client's default) carries the same floats.
    let (status, b64) = post_json(
        &http,
        "/v1/embeddings",
        &json!({"input": inputs[0], "encoding_format": "base64", "model": "all-minilm-l6-v2"}),
    );
    assert_eq!(status, 200, "{b64}");
    let text = b64["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("valid base64");
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(floats, got[0]);

    // Bad requests: clear errors, and the pool keeps serving.
    for (body, status, needle) in [
        (json!({"input": []}), 400, "must not be empty"),
        (json!({"input": [""]}), 400, "input 0 is empty"),
        (json!({"input": vec!["a"; 2049]}), 400, "at most 2048"),
        (json!({"input": [[1, 2, 3]]}), 400, "token arrays"),
        (json!({"input": "x".repeat(70_000)}), 400, "bytes; at most"),
        (
            json!({"input": "hi", "model": "nope"}),
            404,
            "does not exist",
        ),
        (
            json!({"input": "hi", "encoding_format": "hex"}),
            400,
            "float or base64",
        ),
        (json!({"input": "hi", "dimensions": 8}), 400, "fixed width"),
        (json!({"inputs": "hi"}), 400, "invalid request"),
    ] {
        let (got, answer) = post_json(&http, "/v1/embeddings", &body);
        assert_eq!(got, status, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{body}: {answer}");
    }

    // Node b dies while a big request is running: its slice goes to a, and the answer is
    // whole and right.
    let many = texts(800);
    let (want, _) = common::local_embed(&many);
    let before = work_units(&http);
    let request = {
        let (http, many) = (http.clone(), many.clone());
        std::thread::spawn(move || post_json(&http, "/v1/embeddings", &json!({"input": many})))
    };
    let started = Instant::now() + Duration::from_secs(30);
    while work_units(&http)[1] == before[1] && Instant::now() < started {
        std::thread::sleep(Duration::from_millis(20));
    }
    b.kill();
    let (status, answer) = request.join().expect("the request thread");
    assert_eq!(status, 200, "{answer}");
    let again = vectors(&answer);
    assert_eq!(again.len(), want.len());
    for (i, (g, w)) in again.iter().zip(&want).enumerate() {
        let cos = potluck_engine::bert::cosine(g, w);
        assert!(cos >= 0.9999, "after the kill, input {i}: cosine {cos}");
    }
    let failed = coord.wait_for(Instant::now() + Duration::from_secs(5), |l| {
        l.contains("embedding slice failed") && l.contains(&id_b)
    });
    assert!(
        failed.is_some(),
        "b died with slices left, yet none failed over: {:?}",
        coord.seen
    );
}

#[test]
fn a_node_that_corrupts_its_embeddings_is_caught_by_checks_and_honest_ones_never_are() {
    // Online slices are spot-checked like stage results: a new node's every slice is
    // recomputed on another node beside the request. Noise that keeps vectors unit length
    // (so the norm check passes) is caught there.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    let (_a, id_a) = node(dir.path(), "a", "public", &addr, &[]);
    let (_b, id_b) = node(dir.path(), "b", "public", &addr, &[]);
    let (_c, cheat) = node(
        dir.path(),
        "cheat",
        "public",
        &addr,
        &["--corrupt", "1:noise"],
    );
    common::wait_joined(&mut coord, [&id_a, &id_b, &cheat]);
    let line =
        common::until_quarantined(&mut coord, &cheat, 20, Duration::from_millis(500), |_| {
            let (status, answer) = post_json(&http, "/v1/embeddings", &json!({"input": texts(96)}));
            assert_eq!(status, 200, "{answer}");
        });
    assert!(
        line.contains("failed an embedding check")
            || line.contains("recomputation disagreed with two other peers"),
        "{line}"
    );
    common::never_quarantined(&coord, [&id_a, &id_b]);
    // From now on every answer is the honest one.
    let inputs = texts(64);
    let (status, answer) = post_json(&http, "/v1/embeddings", &json!({"input": inputs}));
    assert_eq!(status, 200, "{answer}");
    let (want, _) = common::local_embed(&inputs);
    for (i, (g, w)) in vectors(&answer).iter().zip(&want).enumerate() {
        let cos = potluck_engine::bert::cosine(g, w);
        assert!(cos >= 0.9999, "input {i}: cosine {cos}");
    }
}
