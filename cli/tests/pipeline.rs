//! A pool of real processes: a coordinator and three nodes on 127.0.0.1 split SmolLM2's 30
//! blocks between them, and greedy generation through that pipeline gives exactly what
//! `potluck generate` gives in one process, for raw and chat prompts, short and long; every
//! stage result lands in the coordinator's audit log, which `potluck audit verify` checks.

mod common;

use serde_json::json;
use std::time::{Duration, Instant};

/// Blocks `start..end` of each "peer X serves blocks start..end" line.
fn served_range(line: &str) -> (String, u32, u32) {
    let rest = line.trim_start_matches("peer ");
    let (peer, rest) = rest.split_once(" serves blocks ").expect("a serves line");
    let range = rest.split_whitespace().next().expect("a range");
    let (a, b) = range.split_once("..").expect("start..end");
    (peer.to_string(), a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn three_nodes_split_the_model_and_generate_exactly_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    // Each node may hold about 12 of the 30 blocks, so the plan needs all three.
    let limit = ["--max-memory", "130M"];
    let _nodes: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| common::node(dir.path(), n, "public", &addr, &limit))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut spans = Vec::new();
    while spans.len() < 3 {
        let seen = spans.len();
        let line = coord.wait_for(deadline, |l| {
            l.starts_with("peer ") && l.contains(" serves blocks ") && {
                let (p, _, _) = served_range(l);
                !spans.iter().any(|(q, _, _): &(String, u32, u32)| q == &p)
            }
        });
        let line = line.unwrap_or_else(|| panic!("only {seen} spans loaded: {:?}", coord.seen));
        spans.push(served_range(&line));
    }
    spans.sort_by_key(|s| s.1);
    assert_eq!(spans[0].1, 0, "{spans:?}");
    assert_eq!(spans[2].2, 30, "{spans:?}");
    assert!(spans.windows(2).all(|w| w[0].2 == w[1].1), "{spans:?}");
    assert!(spans.iter().all(|s| s.2 - s.1 < 30), "{spans:?}");

    let cases = [
        ("What is the capital of Japan?", true, 24),
        ("The capital of France is", false, 24),
        (
            "Summarise in one sentence: volunteers pool their idle computers so that a \
             community can run a language model together. Each machine holds a few layers, \
             the coordinator sends activations from one to the next, and every result is \
             signed so that cheaters can be caught and removed from the pool.",
            true,
            16,
        ),
        ("1, 2, 3, 4,", false, 32),
    ];
    let mut tokens = 0;
    for (prompt, chat, max_tokens) in cases {
        let (want, want_tokens) = common::local_generate(prompt, chat, max_tokens);
        let (path, body) = if chat {
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": max_tokens}),
            )
        } else {
            (
                "/v1/completions",
                json!({"prompt": prompt, "temperature": 0, "max_tokens": max_tokens}),
            )
        };
        let (status, v) = common::post_json(&http, path, &body);
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        let got = if chat {
            choice["message"]["content"].as_str()
        } else {
            choice["text"].as_str()
        }
        .unwrap_or_else(|| panic!("no text in {v}"));
        assert_eq!(got, want, "prompt {prompt:?}");
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64(),
            Some(want_tokens),
            "{v}"
        );
        tokens += want_tokens;
    }

    // Every stage result is in the coordinator's audit log, with its receipt, and the log
    // checks out offline; an edited copy does not.
    let log = dir.path().join("coordinator").join("audit.log");
    let verify = |file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
            .args(["audit", "verify", file.to_str().unwrap()])
            .output()
            .unwrap()
    };
    // The writer flushes as soon as its queue drains; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = verify(&log);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verified: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("result verified: "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no verified results: {text}"));
    // Three hops per token (prefill counts as one step).
    assert!(
        verified >= 3 * tokens,
        "{verified} results for {tokens} tokens"
    );
    let edited = dir.path().join("edited.log");
    let original = std::fs::read_to_string(&log).unwrap();
    std::fs::write(
        &edited,
        original.replacen("\"verified\"", "\"rejected\"", 1),
    )
    .unwrap();
    let out = verify(&edited);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2: the entry does not match its hash"),
        "{err}"
    );
}
