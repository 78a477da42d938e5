//! A volunteer in charge of its machine, with real processes: `potluck node pause` takes the
//! running node out of the pool within seconds (the pool plans around it as if it had left,
//! so with no other node the API says it cannot serve), `status` says so, and `resume` brings
//! it back.

mod common;

use common::{raw_http, request, small_pool, split_answer};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

/// `potluck node VERB --data-dir DIR`: its JSON answer.
fn control(dir: &std::path::Path, verb: &str) -> Value {
    let dir = dir.to_str().expect("utf-8 temp path");
    let out = common::potluck_ok(&["node", verb, "--data-dir", dir]);
    serde_json::from_str(&out).expect("a JSON state")
}

fn chat_status(http: &str) -> u16 {
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    let raw = raw_http(
        http,
        &request("POST", "/v1/chat/completions", &[], &body.to_string()),
    );
    split_answer(&raw).0
}

/// Waits (a minute at most) until the API answers a chat with `status`.
fn until_chat(http: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = chat_status(http);
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chat kept answering {got}, not {status}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn pause_takes_a_node_out_and_resume_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("n");
    let (mut coord, _node, http) = small_pool(dir.path(), &["--embedding-model", "none"]);
    assert_eq!(chat_status(&http), 200);
    let status = control(&node_dir, "status");
    assert_eq!(status["state"], "serving", "{status}");
    assert_eq!(status["loaded"]["end"], 30, "{status}");

    let paused = control(&node_dir, "pause");
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(paused["reason"], "paused by its owner", "{paused}");
    common::expect_line(
        &mut coord,
        "the pause",
        &["peer leaving ", "paused by its owner"],
        10,
    );
    // The only node is out: the pool cannot serve, and says so.
    until_chat(&http, 503);
    assert_eq!(control(&node_dir, "status")["state"], "paused");

    let resumed = control(&node_dir, "resume");
    assert_eq!(resumed["state"], "serving", "{resumed}");
    common::expect_line(&mut coord, "the node's return", &["peer back "], 20);
    until_chat(&http, 200);

    // Nobody listens on a folder without a running node.
    let out = Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(["node", "status", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node is running"));
}
