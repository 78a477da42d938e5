//! SETI@home mode on real processes: `potluck batch submit` cuts a JSONL file into work units
//! that run on two nodes, each unit validated by two agreeing results. The coordinator is
//! killed with SIGKILL mid-batch and restarted on the same data: the batch resumes and its
//! output has every valid line exactly once, right; bad lines are reported by number; the
//! credit ledger names both nodes. A node that corrupts its results is outvoted and
//! quarantined, and its credit voided; units of a node that hangs time out and run elsewhere.

mod common;

use common::{node, Proc};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// A coordinator also listening on `port`, so nodes find it again after a restart.
fn start_coordinator(dir: &std::path::Path, port: u16) -> (Proc, String) {
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let (p, _, api) = common::coordinator(dir, &["--listen", &listen, "--canary-interval", "0"]);
    (p, api)
}

/// Writes `lines` (JSONL) to `name` in `dir`; returns the path.
fn write_lines(dir: &std::path::Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// `potluck batch submit PATH --kind KIND`: the answer and what it printed to stderr.
fn submit(path: &std::path::Path, kind: &str, url: &str) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(["batch", "submit"])
        .arg(path)
        .args(["--kind", kind, "--coordinator", url])
        .output()
        .expect("run potluck");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The output lines of a finished batch.
fn results(id: &str, url: &str) -> Vec<Value> {
    common::potluck_ok(&["batch", "results", id, "--coordinator", url])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// The first vector of an embedding output line.
fn vector_of(line: &Value) -> Vec<f32> {
    serde_json::from_value(line["response"]["body"]["data"][0]["embedding"].clone())
        .expect("an embedding")
}

fn status(api: &str, id: &str) -> Value {
    let raw = common::raw_http(
        api,
        &common::request("GET", &format!("/v1/batches/{id}"), &[], ""),
    );
    let (code, body) = common::split_answer(&raw);
    assert_eq!(code, 200, "{raw}");
    serde_json::from_str(body).expect("batch JSON")
}

fn wait_status(api: &str, id: &str, deadline: Instant, pred: impl Fn(&Value) -> bool) -> Value {
    loop {
        let s = status(api, id);
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "batch never got there: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "Work unit {i}: volunteers compute and the pool checks {}.",
                i * 7
            )
        })
        .collect()
}

/// Submits a batch embedding [`texts`]`(n)` through `url`, written to `dir`; its id.
fn submit_embeddings(dir: &std::path::Path, n: usize, url: &str) -> String {
    let lines: Vec<String> = texts(n)
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"custom_id": format!("u{i}"), "body": {"input": t}}).to_string())
        .collect();
    let (ok, id, err) = submit(&write_lines(dir, "in.jsonl", &lines), "embed", url);
    assert!(ok, "{err}");
    id
}

#[test]
fn a_batch_survives_a_killed_coordinator_and_every_line_comes_out_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let (mut coord, api) = start_coordinator(dir.path(), port);
    let bootstrap = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", {
        let line = coord
            .wait_for(Instant::now() + Duration::from_secs(30), |l| {
                l.starts_with("peer id ")
            })
            .expect("coordinator id");
        line.trim_start_matches("peer id ").to_string()
    });
    let (_a, id_a) = node(dir.path(), "a", "public", &bootstrap, &[]);
    let (_b, id_b) = node(dir.path(), "b", "public", &bootstrap, &[]);
    common::wait_joined(&mut coord, [&id_a, &id_b]);

    // 150 lines, two of them bad (lines 4 and 77).
    let inputs = texts(150);
    let lines: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| match i {
            3 => "{not json".to_string(),
            76 => json!({"custom_id": "bad", "body": {"input": []}}).to_string(),
            _ => json!({"custom_id": format!("u{i}"), "method": "POST", "url": "/v1/embeddings", "body": {"input": t}}).to_string(),
        })
        .collect();
    let path = write_lines(dir.path(), "in.jsonl", &lines);
    let url = format!("http://{api}");
    let (ok, id, err) = submit(&path, "embed", &url);
    assert!(ok && id.starts_with("batch_"), "{id} {err}");

    // Kill -9 once some units are validated but not all.
    let s = wait_status(&api, &id, Instant::now() + Duration::from_secs(120), |s| {
        s["request_counts"]["completed"].as_u64().unwrap_or(0) >= 10
    });
    assert_eq!(s["request_counts"]["total"], 150, "{s}");
    assert_eq!(
        s["status"], "in_progress",
        "the batch ended before the kill: {s}"
    );
    assert_eq!(s["potluck"]["quorum"], 2, "{s}");
    assert_eq!(s["potluck"]["nodes_holding_model"], 2, "{s}");
    assert!(s["potluck"]["waiting"].is_null(), "{s}");
    coord.kill();
    let (coord, api) = start_coordinator(dir.path(), port);
    let url = format!("http://{api}");
    let s = wait_status(&api, &id, Instant::now() + Duration::from_secs(240), |s| {
        s["status"] == "completed"
    });
    assert_eq!(s["request_counts"]["completed"], 148, "{s}");
    assert_eq!(s["request_counts"]["failed"], 2, "{s}");

    // Every good line exactly once, in order, with the right vectors.
    let lines = results(&id, &url);
    assert_eq!(lines.len(), 148);
    let mut seen: HashMap<String, usize> = HashMap::new();
    let wanted: Vec<(usize, &String)> = inputs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 76)
        .collect();
    let (vectors, _) =
        common::local_embed(&wanted.iter().map(|(_, t)| (*t).clone()).collect::<Vec<_>>());
    for (line, ((i, _), want)) in lines.iter().zip(wanted.iter().zip(&vectors)) {
        let custom = line["custom_id"].as_str().expect("custom_id").to_string();
        assert_eq!(custom, format!("u{i}"));
        *seen.entry(custom).or_default() += 1;
        let cos = potluck_engine::bert::cosine(&vector_of(line), want);
        assert!(cos >= 0.9999, "line {i}: cosine {cos}");
    }
    assert!(seen.values().all(|&n| n == 1));

    // The bad lines, by number.
    let errors = common::potluck_ok(&["batch", "results", &id, "--errors", "--coordinator", &url]);
    let numbers: Vec<u64> = errors
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON")["error"]["line"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(numbers, vec![4, 77], "{errors}");

    // Both nodes are credited; each unit was computed twice.
    let ledger = common::potluck_ok(&["pool", "credits", "--coordinator", &url]);
    for id in [&id_a, &id_b] {
        assert!(ledger.contains(id.as_str()), "{id} missing from {ledger}");
    }
    let raw = common::raw_http(&api, &common::request("GET", "/api/credits", &[], ""));
    let credits: Value = serde_json::from_str(common::split_answer(&raw).1).expect("credits");
    let units: u64 = credits["credits"]
        .as_array()
        .expect("ledger")
        .iter()
        .map(|c| c["units"].as_u64().unwrap_or(0))
        .sum();
    assert!(units >= 2 * 148, "every unit credits its quorum: {credits}");
    // The dashboard's data carries the same ledger and the batch, in aggregate: no batch or
    // file id, which anyone could then read with any key.
    let raw = common::raw_http(&api, &common::request("GET", "/api/pool", &[], ""));
    let pool: Value = serde_json::from_str(common::split_answer(&raw).1).expect("pool");
    assert_eq!(pool["credits"], credits["credits"], "{pool}");
    assert!(pool["batches"]
        .as_array()
        .expect("batches")
        .iter()
        .any(|b| b["completed"] == 148 && b["status"] == "completed"));
    assert!(
        !raw.contains(id.as_str()) && !raw.contains("file-"),
        "{raw}"
    );
    common::never_quarantined(&coord, [&id_a, &id_b]);

    // Chat units: greedy, so both nodes give the text one process gives.
    let prompts = ["What is the capital of Japan?", "Name a primary colour."];
    let chat: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let body = json!({"messages": [{"role": "user", "content": p}], "max_tokens": 12});
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
        })
        .collect();
    let (ok, chat_id, err) = submit(&write_lines(dir.path(), "chat.jsonl", &chat), "chat", &url);
    assert!(ok, "{err}");
    let s = wait_status(
        &api,
        &chat_id,
        Instant::now() + Duration::from_secs(180),
        |s| s["status"] == "completed",
    );
    assert_eq!(s["request_counts"]["completed"], 2, "{s}");
    for (v, p) in results(&chat_id, &url).iter().zip(prompts) {
        let (want, generated) = common::local_generate(p, true, 12);
        let body = &v["response"]["body"];
        assert_eq!(body["choices"][0]["message"]["content"], want, "{v}");
        assert_eq!(body["usage"]["completion_tokens"], generated, "{v}");
    }

    // Bad submissions: clear errors.
    let (ok, _, err) = submit(&write_lines(dir.path(), "empty.jsonl", &[]), "embed", &url);
    assert!(!ok && err.contains("empty"), "{err}");
    let (ok, _, err) = submit(&path, "images", &url);
    assert!(!ok && err.contains("chat or embed"), "{err}");
}

#[test]
fn a_cheating_node_is_outvoted_and_a_hung_one_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, api) = common::coordinator(
        dir.path(),
        &["--canary-interval", "0", "--unit-timeout", "3"],
    );
    let (_a, id_a) = node(dir.path(), "a", "public", &addr, &[]);
    let (_b, id_b) = node(dir.path(), "b", "public", &addr, &[]);
    let (_c, id_c) = node(dir.path(), "c", "public", &addr, &["--corrupt", "1:noise"]);
    let (_d, id_d) = node(dir.path(), "d", "public", &addr, &["--corrupt", "1:stall"]);
    // Honest vectors, but a claim of 2^63 tokens for each unit, for credit.
    let (_e, id_e) = node(
        dir.path(),
        "e",
        "public",
        &addr,
        &["--corrupt", "1:inflate"],
    );
    common::wait_joined(&mut coord, [&id_a, &id_b, &id_c, &id_d, &id_e]);
    let url = format!("http://{api}");
    let id = submit_embeddings(dir.path(), 30, &url);
    let s = wait_status(&api, &id, Instant::now() + Duration::from_secs(180), |s| {
        s["status"] == "completed"
    });
    assert_eq!(s["request_counts"]["completed"], 30, "{s}");
    let line = format!("peer quarantined {id_c}");
    assert!(
        coord
            .wait_for(Instant::now() + Duration::from_secs(5), |l| l
                .starts_with(&line))
            .is_some(),
        "the cheat was never quarantined: {:?}",
        coord.seen
    );
    common::never_quarantined(&coord, [&id_a, &id_b]);
    // Credit is what the coordinator counts: no claim past what the texts can take, and the
    // ledger still answers.
    let bound: u64 = texts(30).iter().map(|t| t.len() as u64 + 2).sum();
    let (status, credits) = common::get_json(&api, "/api/credits");
    assert_eq!(status, 200, "{credits}");
    let rows = credits["credits"].as_array().cloned().unwrap_or_default();
    assert!(!rows.is_empty(), "{credits}");
    for row in &rows {
        let tokens = row["tokens"].as_u64().unwrap_or(u64::MAX);
        assert!(
            tokens <= bound,
            "{row} (the texts take at most {bound} tokens)"
        );
    }
    // The hung node's units timed out and ran elsewhere.
    let timed_out = coord.wait_for(Instant::now() + Duration::from_secs(5), |l| {
        l.contains("batch unit failed") && l.contains(&id_d) && l.contains("no answer within")
    });
    assert!(timed_out.is_some(), "{:?}", coord.seen);
    // Every output line is the honest answer.
    let (want, _) = common::local_embed(&texts(30));
    for (line, w) in results(&id, &url).iter().zip(&want) {
        assert!(potluck_engine::bert::cosine(&vector_of(line), w) >= 0.9999);
    }
    // Bad API calls get OpenAI-shaped errors, and the coordinator keeps serving.
    let cancel = format!("/v1/batches/{id}/cancel");
    for (method, path, body, status, needle) in [
        ("POST", "/v1/files", "{}", 400, "multipart/form-data"),
        (
            "POST",
            "/v1/batches",
            r#"{"input_file_id": "file-nope", "endpoint": "/v1/embeddings"}"#,
            404,
            "not found",
        ),
        (
            "POST",
            "/v1/batches",
            r#"{"input_file_id": "x", "endpoint": "/v1/completions"}"#,
            400,
            "endpoint must be",
        ),
        ("POST", "/v1/batches", "[1]", 400, "invalid request"),
        ("GET", "/v1/batches/batch_nope", "", 404, "not found"),
        ("GET", "/v1/files/file-nope/content", "", 404, "not found"),
        ("POST", cancel.as_str(), "", 409, "cannot be cancelled"),
    ] {
        let raw = common::raw_http(&api, &common::request(method, path, &[], body));
        let (got, answer) = common::split_answer(&raw);
        assert_eq!(got, status, "{method} {path}: {raw}");
        let v: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {raw}"));
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{method} {path}: {raw}");
    }
    let raw = common::raw_http(&api, &common::request("GET", "/api/credits", &[], ""));
    let credits: Value = serde_json::from_str(common::split_answer(&raw).1).expect("credits");
    for c in credits["credits"].as_array().expect("ledger") {
        if c["peer"] == id_c.as_str() {
            assert_eq!(c["flops"], 0.0, "the cheat keeps no credit: {credits}");
        }
    }
}

/// Runs a batch of `n` embedding units on a pool whose two nodes `pair` share one origin:
/// each unit is answered once and none validates, however long they wait; then `third`, of
/// another origin, joins and the batch completes with it in every unit's quorum.
fn one_origin_is_one_voice(
    coord: &mut Proc,
    api: &str,
    pair: [&String; 2],
    third: impl FnOnce() -> (Proc, String),
) {
    const N: u64 = 8;
    common::wait_joined(coord, pair);
    let dir = tempfile::tempdir().unwrap();
    let id = submit_embeddings(dir.path(), N as usize, &format!("http://{api}"));
    let s = wait_status(api, &id, Instant::now() + Duration::from_secs(120), |s| {
        s["potluck"]["results_returned"].as_u64().unwrap_or(0) >= N
    });
    let waiting = s["potluck"]["waiting"].as_str().unwrap_or("");
    assert!(waiting.contains("come from 1"), "{s}");
    // Left alone, the two keys would agree with each other: give them the time to.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let s = status(api, &id);
        assert_eq!(
            s["request_counts"]["completed"], 0,
            "one origin validated: {s}"
        );
        assert_eq!(
            s["potluck"]["results_returned"], N,
            "one origin asked twice: {s}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_third, third_id) = third();
    common::wait_joined(coord, [&third_id]);
    let s = wait_status(api, &id, Instant::now() + Duration::from_secs(120), |s| {
        s["status"] == "completed"
    });
    assert_eq!(s["request_counts"]["completed"], N, "{s}");
    let (code, credits) = common::get_json(api, "/api/credits");
    assert_eq!(code, 200, "{credits}");
    let units = |peer: &String| {
        credits["credits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["peer"] == peer.as_str())
            .map(|r| r["units"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(units(&third_id), N, "{credits}");
    assert_eq!(units(pair[0]) + units(pair[1]), N, "{credits}");
}

#[test]
fn two_keys_on_one_network_are_one_voice_in_a_quorum() {
    use common::netns::TestNet;
    let dir = tempfile::tempdir().unwrap();
    let mut net = TestNet::new();
    // Two machines in one /24 on the internet, and one elsewhere.
    let hosts = [
        net.host("198.51.100.10"),
        net.host("198.51.100.11"),
        net.host("203.0.113.10"),
    ];
    let (mut coord, addr, api) =
        common::netns::segment_coordinator(dir.path(), &["--canary-interval", "0"]);
    let start = |i: usize| {
        let host = &hosts[i];
        let mut cmd = host.potluck();
        let listen = format!("/ip4/{}/tcp/0", host.ip);
        cmd.args(common::node_args(
            dir.path(),
            &format!("n{i}"),
            "public",
            &addr,
            &["--listen", &listen],
        ));
        common::start_node(cmd)
    };
    let (_a, id_a) = start(0);
    let (_b, id_b) = start(1);
    one_origin_is_one_voice(&mut coord, &api, [&id_a, &id_b], || start(2));
}

#[test]
fn one_operators_machines_are_one_voice_in_a_quorum() {
    use common::pools::{create, join, path};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    create(d, "lab");
    // On loopback every key would count alone; the certificates say whose machines they are.
    join(d, "lab", "a", &["--operator", "alice"]);
    join(d, "lab", "b", &["--operator", "alice"]);
    join(d, "lab", "c", &["--operator", "bob"]);
    let pool_dir = d.join("lab");
    let (mut coord, addr, api) = common::coordinator(
        &d.join("owner"),
        &[
            "--pool",
            "lab",
            "--pool-dir",
            path(&pool_dir),
            "--canary-interval",
            "0",
        ],
    );
    let (_a, id_a) = node(d, "a", "lab", &addr, &[]);
    let (_b, id_b) = node(d, "b", "lab", &addr, &[]);
    one_origin_is_one_voice(&mut coord, &api, [&id_a, &id_b], || {
        node(d, "c", "lab", &addr, &[])
    });
}

/// `POST /v1/files` of `content` as `name`, multipart as clients send it: the status and
/// the JSON answer.
fn upload(api: &str, name: &str, content: &str) -> (u16, Value) {
    let boundary = "potluck-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let head = format!(
        "POST /v1/files HTTP/1.0\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let raw = common::raw_http(api, (head + &body).as_bytes());
    let (code, answer) = common::split_answer(&raw);
    (code, serde_json::from_str(answer).unwrap_or(Value::Null))
}

/// A tmpfs of `mib` MiB mounted on `at` (root, as CI runs), unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, mib: u32) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a tmpfs (the full-disk test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(at.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}

#[test]
fn a_full_disk_refuses_uploads_with_507_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("coordinator");
    let disk = SmallDisk::mount(&data, 48);
    let (mut coord, _, api) = common::coordinator(
        dir.path(),
        &["--min-free-disk-mib", "8", "--canary-interval", "0"],
    );
    let line = format!(
        "{}\n",
        json!({"custom_id": "x", "body": {"input": "y".repeat(400)}})
    );
    let chunk = line.repeat((1 << 20) / line.len());
    let get = |path: &str| {
        let raw = common::raw_http(&api, &common::request("GET", path, &[], ""));
        let (code, body) = common::split_answer(&raw);
        (code, body.len())
    };
    let delete = |id: &str| {
        let raw = common::raw_http(
            &api,
            &common::request("DELETE", &format!("/v1/files/{id}"), &[], ""),
        );
        common::split_answer(&raw).0
    };
    // Uploads until the store would leave its disk less than it keeps free.
    let mut kept = Vec::new();
    let refused = loop {
        let (code, answer) = upload(&api, "part.jsonl", &chunk);
        match code {
            200 => kept.push(answer["id"].as_str().expect("a file id").to_string()),
            _ => break (code, answer),
        }
        assert!(
            kept.len() < 48,
            "a 48 MiB disk took {} 1 MiB files",
            kept.len()
        );
    };
    assert_eq!(refused.0, 507, "{}", refused.1);
    assert_eq!(
        refused.1["error"]["type"], "insufficient_storage",
        "{}",
        refused.1
    );
    assert!(refused.1["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("kept free"));
    assert!(!kept.is_empty());
    // Another program fills the disk to the last byte.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 65536]).is_ok() {}
    }
    let (code, answer) = upload(&api, "more.jsonl", &line);
    assert_eq!(code, 507, "{answer}");
    // What was accepted is whole, the coordinator goes on serving, and a delete still runs
    // (on the reserve the store set aside).
    for id in &kept {
        assert_eq!(
            get(&format!("/v1/files/{id}/content")),
            (200, chunk.len()),
            "{id}"
        );
    }
    assert_eq!(get("/v1/models").0, 200);
    assert_eq!(delete(&kept[0]), 200);
    assert_eq!(get(&format!("/v1/files/{}", kept[0])).0, 404);
    assert!(
        coord.child.try_wait().unwrap().is_none(),
        "the coordinator died"
    );
    // Once the disk has room again, so does the store.
    std::fs::remove_file(&filler).unwrap();
    for id in &kept[1..] {
        assert_eq!(delete(id), 200);
    }
    let (code, answer) = upload(&api, "again.jsonl", &chunk);
    assert_eq!(code, 200, "{answer}");
    assert!(
        data.join("jobs.sqlite.reserve").exists(),
        "the reserve was not set aside again"
    );
    drop(coord);
    drop(disk);
}
