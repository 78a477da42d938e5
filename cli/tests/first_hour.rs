//! A new user's first hour with `potluck up`: the API and dashboard come up at once and
//! say why nothing is served yet, Ctrl-C works while the pool waits for a plan, and the one
//! line `up` prints for adding a machine, pasted as it is, adds one; a node that joins
//! through another node (not the coordinator) finds the coordinator and serves, under the
//! name its owner gave it.

mod common;

use std::time::{Duration, Instant};

/// Starts `potluck up` with a node too small to hold a block, its API on a free port.
fn starved_up(dir: &std::path::Path) -> (common::Proc, String) {
    let http = format!("127.0.0.1:{}", common::free_port());
    let up = common::Proc::start(&[
        "up",
        "--data-dir",
        dir.join("up").to_str().unwrap(),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--max-memory",
        "20M",
        "--http",
        &http,
    ]);
    (up, http)
}

/// Sends SIGINT, as Ctrl-C does, and waits up to 20 s for the process to end.
fn interrupt(p: &mut common::Proc) -> bool {
    let pid = p.child.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if p.child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn ctrl_c_stops_up_while_it_waits_for_a_plan_and_the_api_says_why_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, http) = starved_up(dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    assert!(
        up.wait_for(deadline, |l| l.starts_with("add machines with: "))
            .is_some(),
        "{:?}",
        up.seen
    );
    let chat = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
    let (code, body) = common::post_json(&http, "/v1/chat/completions", &chat);
    assert_eq!(code, 503, "{body}");
    let why = body["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("not ready"), "{body}");
    // The dashboard knows `up`'s own node for this machine's, by a name.
    let deadline = Instant::now() + Duration::from_secs(30);
    let local = loop {
        let (_, pool) = common::get_json(&http, "/api/pool");
        let peers = pool["peers"].as_array().cloned().unwrap_or_default();
        if let Some(p) = peers.iter().find(|p| p["local"] == true) {
            break p.clone();
        }
        assert!(Instant::now() < deadline, "no local peer: {pool}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let id = local["id"].as_str().unwrap_or_default();
    assert_eq!(
        local["name"],
        potluck_coordinator::nickname::of(id).as_str()
    );
    assert!(
        interrupt(&mut up),
        "Ctrl-C did not stop potluck up: {:?}",
        up.seen
    );
    assert!(
        up.wait_for(Instant::now() + Duration::from_secs(2), |l| l == "stopped")
            .is_some(),
        "{:?}",
        up.seen
    );
}

#[test]
fn the_line_up_prints_for_adding_a_machine_adds_one_pasted_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let (mut up, http) = starved_up(dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = up
        .wait_for(deadline, |l| l.starts_with("add machines with: "))
        .unwrap_or_else(|| panic!("{:?}", up.seen));
    let command = line.trim_start_matches("add machines with: potluck ");
    let mut args: Vec<String> = command.split_whitespace().map(String::from).collect();
    assert_eq!(args.first().map(String::as_str), Some("node"), "{line}");
    // Its own data folder and a loopback listener, as a second machine would have its own.
    let data = dir.path().join("volunteer");
    args.extend(
        [
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut node = common::Proc::start(&args);
    assert!(
        up.wait_for(Instant::now() + Duration::from_secs(120), |l| l
            == "pool ready")
            .is_some(),
        "the pasted node never made the pool ready: {:?}",
        up.seen
    );
    let chat =
        serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let (code, body) = common::post_json(&http, "/v1/chat/completions", &chat);
    assert_eq!(code, 200, "{body}");
    // The volunteer's node says, in words, that it joined and what it serves.
    let deadline = Instant::now() + Duration::from_secs(10);
    for line in [
        "joined pool public",
        "serving blocks 0..30 of smollm2-135m-instruct",
    ] {
        assert!(
            node.wait_for(deadline, |l| l.starts_with(line)).is_some(),
            "no {line:?}: {:?}",
            node.seen
        );
    }
    // `up` serves embeddings as well, with no flag, and said so.
    let serves =
        "serving smollm2-135m-instruct (chat and completions) and all-minilm-l6-v2 (embeddings)";
    assert!(up.seen.iter().any(|l| l == serves), "{:?}", up.seen);
    let (code, body) = common::post_json(
        &http,
        "/v1/embeddings",
        &serde_json::json!({"input": ["a volunteer's first hour"]}),
    );
    assert_eq!(code, 200, "{body}");
    assert!(interrupt(&mut up), "Ctrl-C did not stop potluck up");
}

#[test]
fn nodes_that_join_through_other_nodes_find_the_coordinator_and_serve_a_split() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    // Each node holds about 12 of the 30 blocks, so the plan needs all three; only the
    // first knows the coordinator's address. The second joins through the first (which
    // serves nothing yet: no plan fits it alone), the third through the second.
    let limit = ["--max-memory", "130M"];
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut first, first_id) = common::node(dir.path(), "first", "public", &addr, &limit);
    let first_addr = first.loopback_addr(deadline);
    let named = [&limit[..], &["--name", "ada's laptop"]].concat();
    let (mut second, second_id) = common::node(dir.path(), "second", "public", &first_addr, &named);
    let second_addr = second.loopback_addr(deadline);
    let (mut third, third_id) = common::node(dir.path(), "third", "public", &second_addr, &limit);
    let coordinator_id = addr.rsplit('/').next().unwrap().to_string();
    for (node, via) in [(&mut second, &first_id), (&mut third, &second_id)] {
        let found = format!("found the pool's coordinator {coordinator_id} through {via}");
        assert!(
            node.wait_for(deadline, |l| l == found).is_some(),
            "{found:?} never said: {:?}",
            node.seen
        );
    }
    for id in [&first_id, &second_id, &third_id] {
        common::expect_line(
            &mut coord,
            "a span of the split",
            &[id, " serves blocks "],
            120,
        );
    }
    for node in [&mut first, &mut second, &mut third] {
        common::expect_line(node, "its blocks", &["serving blocks "], 30);
    }
    let (want, _) = common::local_generate("The capital of France is", false, 12);
    let (code, body) = common::post_json(
        &http,
        "/v1/completions",
        &serde_json::json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 12}),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body["choices"][0]["text"].as_str(),
        Some(want.as_str()),
        "{body}"
    );
    // The owner's name is on the dashboard, with the key's nickname beside it.
    let (_, pool) = common::get_json(&http, "/api/pool");
    let peers = pool["peers"].as_array().cloned().unwrap_or_default();
    let second_peer = peers
        .iter()
        .find(|p| p["id"] == second_id.as_str())
        .unwrap_or_else(|| panic!("{pool}"));
    let nickname = potluck_coordinator::nickname::of(&second_id);
    assert_eq!(
        second_peer["name"],
        format!("ada's laptop ({nickname})"),
        "{pool}"
    );
    assert_eq!(second_peer["owner_name"], "ada's laptop");
    common::never_quarantined(&coord, [&first_id, &second_id, &third_id]);
}

#[test]
fn a_name_a_page_would_read_as_markup_is_refused_at_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args([
            "node",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--name",
            "<b>admin</b>",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("letters, digits"), "{err}");
}
