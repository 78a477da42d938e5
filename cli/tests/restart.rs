//! A coordinator that crashes and restarts finds its nodes again by itself (they dial their
//! bootstrap address again, with backoff) and comes back to the same plan, so no node
//! reloads its layers, and generation gives the same text as before.

mod common;

use common::Proc;
use std::time::{Duration, Instant};

fn start_coordinator(dir: &std::path::Path, port: u16) -> (Proc, String) {
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let (p, _, http) = common::coordinator(dir, &["--listen", &listen]);
    (p, http)
}

/// The "serves blocks" lines of each node, keyed by peer id.
fn spans(coord: &mut Proc, ids: &[String]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    ids.iter()
        .map(|id| {
            let line = format!("peer {id} serves blocks ");
            let got = coord
                .wait_for(deadline, |l| l.starts_with(&line))
                .unwrap_or_else(|| panic!("{id} never served: {:?}", coord.seen));
            got.split(" (").next().unwrap_or_default().to_string()
        })
        .collect()
}

fn chat(http: &str) -> String {
    let (status, v) = common::post_json(
        http,
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "What is the capital of Japan?"}],
                            "temperature": 0, "max_tokens": 16}),
    );
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_restarted_coordinator_gets_its_nodes_and_plan_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let (mut coord, http) = start_coordinator(dir.path(), port);
    let addr = format!(
        "/ip4/127.0.0.1/tcp/{port}/p2p/{}",
        coord
            .wait_for(Instant::now() + Duration::from_secs(30), |l| l
                .starts_with("peer id "))
            .unwrap()
            .trim_start_matches("peer id ")
    );
    let mut nodes: Vec<(Proc, String)> = ["a", "b", "c"]
        .iter()
        .map(|n| common::node(dir.path(), n, "public", &addr, &["--max-memory", "130M"]))
        .collect();
    let ids: Vec<String> = nodes.iter().map(|(_, id)| id.clone()).collect();
    let before = spans(&mut coord, &ids);
    let answer = chat(&http);

    coord.kill();
    let (mut coord, http) = start_coordinator(dir.path(), port);
    let after = spans(&mut coord, &ids);
    assert_eq!(before, after, "the plan changed");
    assert_eq!(chat(&http), answer);
    // Nobody reloaded: every node loaded its layers exactly once.
    for (p, id) in &mut nodes {
        let _ = p.wait_for(Instant::now() + Duration::from_millis(500), |_| false);
        let loads = p
            .seen
            .iter()
            .filter(|l| l.contains("layers loaded"))
            .count();
        assert_eq!(
            loads, 1,
            "{id} loaded its layers {loads} times: {:?}",
            p.seen
        );
    }
}
