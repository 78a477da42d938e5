//! Many users at once, over real processes on 127.0.0.1: 32 streaming clients through a
//! two-node pipeline each get exactly what `potluck generate` gives (their steps batched on
//! every stage), 16 concurrent requests to `potluck up` at its default threads all succeed,
//! nodes under full CPU load are never declared gone, and 200 sessions in flight cost the
//! coordinator no thread each.

mod common;

use common::{raw_http, request, split_answer, sse_events, streamed_text};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A streamed greedy chat completion: its text.
fn stream_chat(http: &str, prompt: &str, max_tokens: usize) -> String {
    let body = json!({"messages": [{"role": "user", "content": prompt}],
                      "temperature": 0, "max_tokens": max_tokens, "stream": true});
    let raw = raw_http(
        http,
        &request("POST", "/v1/chat/completions", &[], &body.to_string()),
    );
    let (status, rest) = split_answer(&raw);
    assert_eq!(status, 200, "{raw}");
    let (events, done) = sse_events(rest);
    assert!(done, "the stream did not finish: {raw}");
    streamed_text(&events)
}

/// Non-streamed greedy chat completions from `n` clients at once: each status and body.
fn concurrent_chats(http: &str, n: usize, max_tokens: usize) -> Vec<(u16, serde_json::Value)> {
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let http = http.to_string();
            std::thread::spawn(move || {
                let prompt = format!("Tell me something about the number {i}.");
                let body = json!({"messages": [{"role": "user", "content": prompt}],
                                  "temperature": 0, "max_tokens": max_tokens});
                common::post_json(&http, "/v1/chat/completions", &body)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The blocks `start..end` of a "peer X serves blocks start..end ..." line.
fn served(line: &str) -> Option<(u32, u32)> {
    let range = line
        .split(" serves blocks ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let (a, b) = range.split_once("..")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Waits until the coordinator says two nodes serve a split of the model: a first span
/// and a last one, neither the whole.
fn wait_split(coord: &mut common::Proc) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let first = |(a, b): (u32, u32)| a == 0 && b < 30;
    let last = |(a, b): (u32, u32)| a > 0 && b == 30;
    for want in [&first as &dyn Fn((u32, u32)) -> bool, &last] {
        assert!(
            coord
                .wait_for(deadline, |l| served(l).is_some_and(want))
                .is_some(),
            "the model was not split over the two nodes: {:?}",
            coord.seen
        );
    }
}

#[test]
fn thirty_two_streaming_clients_through_a_batched_pipeline_match_local_generation() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &["--max-sessions", "64"]);
    // Each node may hold about 18 of the 30 blocks, so the plan needs both.
    let limit = ["--max-memory", "180M"];
    let _a = common::node(dir.path(), "a", "public", &addr, &limit);
    let _b = common::node(dir.path(), "b", "public", &addr, &limit);
    wait_split(&mut coord);
    let prompts = [
        "What is the capital of Japan?",
        "Name three colours.",
        "Why do people share their computers?",
        "Write a haiku about bread.",
        "What is 2 + 2?",
        "Say hello in French.",
        "What is a volunteer?",
        "Describe the sea in one sentence.",
    ];
    let max_tokens = 24;
    let want: Vec<String> = prompts
        .iter()
        .map(|p| common::local_generate(p, true, max_tokens).0)
        .collect();
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (http, prompt) = (http.clone(), prompts[i % prompts.len()]);
            std::thread::spawn(move || stream_chat(&http, prompt, max_tokens))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let got = c.join().unwrap();
        assert_eq!(
            got,
            want[i % prompts.len()],
            "client {i} ({:?}) got other text than potluck generate",
            prompts[i % prompts.len()]
        );
    }
}

#[test]
fn sixteen_concurrent_requests_to_potluck_up_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let http = format!("127.0.0.1:{port}");
    let data = dir.path().join("up");
    let mut up = common::Proc::start(&[
        "up",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--no-mdns",
        "--http",
        &http,
    ]);
    assert!(
        up.wait_for(Instant::now() + Duration::from_secs(120), |l| l
            .starts_with("pool ready"))
            .is_some(),
        "potluck up never got ready: {:?}",
        up.seen
    );
    // With no --max-sessions, the node's memory sizes the session count: its default 1 GiB
    // of cache holds dozens of 512-position sessions, enough for all 16 at once.
    let sized = up
        .seen
        .iter()
        .find_map(|l| {
            l.strip_prefix("the pool runs ")?
                .strip_suffix(" sessions at once (sized by its nodes' memory)")?
                .parse::<usize>()
                .ok()
        })
        .unwrap_or_else(|| panic!("the session count was not sized by memory: {:?}", up.seen));
    assert!(sized >= 16, "{sized} sessions");
    for round in 0..2 {
        for (i, (status, v)) in concurrent_chats(&http, 16, 64).into_iter().enumerate() {
            assert_eq!(status, 200, "round {round}, client {i}: {v}");
            assert!(
                v["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0,
                "{v}"
            );
        }
    }
    // Lines logged meanwhile.
    let _ = up.wait_for(Instant::now() + Duration::from_secs(1), |_| false);
    assert!(
        !up.seen.iter().any(|l| l.starts_with("peer unreachable")),
        "its node was declared unreachable: {:?}",
        up.seen
    );
}

#[test]
fn nodes_under_full_cpu_load_are_never_declared_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    // Adverts at the default pace: the first ones, sent on changes, come close together,
    // and a coordinator that learned its heartbeat from them alone would expect the next
    // one far too soon.
    let limit = ["--max-memory", "180M", "--advert-interval", "10"];
    let _a = common::node(dir.path(), "a", "public", &addr, &limit);
    let _b = common::node(dir.path(), "b", "public", &addr, &limit);
    wait_split(&mut coord);
    // Busy loops on every core (and more), for a bounded time, beside the pool's own work.
    let stop = Arc::new(AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..cores * 2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(90);
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let before = coord.seen.len();
    let started = Instant::now();
    // Requests keep the stages computing while the machine is loaded.
    while started.elapsed() < Duration::from_secs(25) {
        for (i, (status, v)) in concurrent_chats(&http, 8, 32).into_iter().enumerate() {
            assert_eq!(status, 200, "client {i}: {v}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
    let _ = coord.wait_for(Instant::now() + Duration::from_secs(1), |_| false);
    for bad in ["peer unreachable", "no plan"] {
        assert!(
            !coord.seen[before..].iter().any(|l| l.starts_with(bad)),
            "a busy node was taken for gone ({bad}): {:?}",
            &coord.seen[before..]
        );
    }
}

/// A value from `/proc/<pid>/status`, e.g. "Threads" or "VmRSS" (in kB).
fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

#[test]
fn two_hundred_sessions_in_flight_cost_the_coordinator_no_thread_each() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (coord, _node, http) = common::small_pool(dir.path(), &["--max-sessions", "256"]);
    let pid = coord.child.id();
    let threads_before = proc_status(pid, "Threads");
    let clients = 200;
    // Every client's request goes out before any answer is read: all of them are sessions
    // in flight at once, their tokens waiting in the sockets.
    let streams: Vec<std::net::TcpStream> = (0..clients)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(&http).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
            let body = json!({"messages": [{"role": "user", "content": format!("Count to {i}.")}],
                              "temperature": 0, "max_tokens": 16, "stream": true});
            s.write_all(&request(
                "POST",
                "/v1/chat/completions",
                &[],
                &body.to_string(),
            ))
            .unwrap();
            s
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut most_sessions, mut most_threads) = (0, 0);
    while Instant::now() < deadline && most_sessions < clients * 3 / 4 {
        let (_, pool) = common::get_json(&http, "/api/pool");
        let running = pool["sessions"].as_array().map_or(0, |s| s.len());
        most_sessions = most_sessions.max(running);
        most_threads = most_threads.max(proc_status(pid, "Threads"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        most_sessions >= clients * 3 / 4,
        "only {most_sessions} of {clients} sessions were ever in flight at once"
    );
    println!(
        "{most_sessions} sessions in flight: coordinator threads {threads_before} idle, at most {most_threads} meanwhile"
    );
    assert!(
        most_threads < threads_before + 32,
        "{most_sessions} sessions in flight took the coordinator from {threads_before} to {most_threads} threads"
    );
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let raw = String::from_utf8_lossy(&raw);
        let (status, rest) = split_answer(&raw);
        assert_eq!(status, 200, "client {i}: {raw}");
        let (events, done) = sse_events(rest);
        assert!(
            done && !streamed_text(&events).is_empty(),
            "client {i}: {raw}"
        );
    }
}
