//! A node dying mid-generation costs a slower token, not an error: a coordinator and three
//! nodes (one serving, two replicas) on loopback; the serving node is killed with SIGKILL
//! at a different point of a 200-token greedy stream each time, and every stream still ends
//! with exactly the text of the run without failures. A frozen node (SIGSTOP) is failed
//! over at the step timeout, not waited for like a busy one. When every node is gone, a
//! running stream ends with a clear error and new requests are refused at once.

mod common;

use common::{raw_http, request, split_answer, sse_events, streamed_text, Proc};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

const PROMPT: &str =
    r#"{"prompt":"1, 2, 3, 4, 5,","temperature":0,"max_tokens":200,"stream":true}"#;

fn pool_json(http: &str) -> Value {
    let raw = raw_http(http, b"GET /api/pool HTTP/1.0\r\n\r\n");
    serde_json::from_str(split_answer(&raw).1).expect("pool JSON")
}

/// Starts a node and waits until the coordinator says it serves the whole model.
fn add_node(
    dir: &std::path::Path,
    name: &str,
    coord: &mut Proc,
    addr: &str,
    nodes: &mut HashMap<String, Proc>,
) {
    let (id, p) = common::serving_node(dir, name, coord, addr, &[], "0..30");
    nodes.insert(id, p);
}

/// Streams PROMPT; after `kill_after` chunks calls `kill` with the session's serving peer.
/// Returns the text and whether the stream ended with [DONE] and no error.
fn stream_and_kill(
    http: &str,
    kill_after: usize,
    mut kill: impl FnMut(&str),
) -> (String, Vec<Value>, bool) {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.write_all(&request("POST", "/v1/completions", &[], PROMPT))
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let mut body = String::new();
    let mut chunks = 0;
    let mut killed = false;
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        if line.starts_with("data: ") {
            chunks += 1;
        }
        body.push_str(&line);
        body.push('\n');
        if !killed && chunks == kill_after {
            let p = pool_json(http);
            let peer = p["sessions"][0]["chain"][0]["peer"]
                .as_str()
                .unwrap_or_else(|| panic!("no running session: {p}"))
                .to_string();
            kill(&peer);
            killed = true;
        }
    }
    let (events, done) = sse_events(&body);
    (streamed_text(&events), events, done)
}

/// A running pool: the coordinator, its bootstrap address, its API, and its nodes by id.
struct Pool {
    coord: Proc,
    addr: String,
    http: String,
    nodes: HashMap<String, Proc>,
}

/// A coordinator and `n` nodes that each hold the whole model (one serves, the rest are
/// replicas).
fn pool(dir: &std::path::Path, n: usize) -> Pool {
    let (mut coord, addr, http) = common::coordinator(dir, &[]);
    let mut nodes = HashMap::new();
    for i in 0..n {
        add_node(dir, &format!("n{i}"), &mut coord, &addr, &mut nodes);
    }
    Pool {
        coord,
        addr,
        http,
        nodes,
    }
}

#[test]
fn killing_the_serving_node_mid_stream_never_changes_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let Pool {
        mut coord,
        addr,
        http,
        mut nodes,
    } = pool(dir.path(), 3);
    let (want, events, done) = stream_and_kill(&http, usize::MAX, |_| {});
    assert!(done && !want.is_empty(), "{events:?}");
    let usage = events.iter().rev().find_map(|e| e.get("usage").cloned());
    let finish = events
        .iter()
        .rev()
        .find_map(|e| e["choices"][0]["finish_reason"].as_str().map(String::from));
    assert_eq!(
        finish.as_deref(),
        Some("length"),
        "the baseline must run all 200 tokens"
    );

    // Different points of the stream; a fresh volunteer replaces each killed one.
    for (round, kill_after) in [3, 10, 25, 50, 80, 110, 140, 170, 190, 2]
        .into_iter()
        .enumerate()
    {
        let mut victim = None;
        let (got, events, done) = stream_and_kill(&http, kill_after, |peer| {
            nodes
                .remove(peer)
                .unwrap_or_else(|| panic!("{peer} is not a node"))
                .kill();
            victim = Some(peer.to_string());
        });
        assert!(victim.is_some(), "round {round}: nothing was killed");
        assert!(
            done && events.iter().all(|e| e.get("error").is_none()),
            "round {round} (kill after {kill_after} chunks) failed: {events:?}"
        );
        assert_eq!(got, want, "round {round}: the text changed");
        let got_usage = events.iter().rev().find_map(|e| e.get("usage").cloned());
        assert_eq!(got_usage, usage, "round {round}");
        add_node(
            dir.path(),
            &format!("r{round}"),
            &mut coord,
            &addr,
            &mut nodes,
        );
    }
    let metrics = raw_http(&http, b"GET /metrics HTTP/1.0\r\n\r\n");
    let value = |name: &str| {
        split_answer(&metrics)
            .1
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let failovers = value("potluck_failover_seconds_count");
    assert!(failovers >= 10.0, "{failovers} failovers counted");
    eprintln!(
        "{failovers} failovers, {:.3} s on average from failure to replacement",
        value("potluck_failover_seconds_sum") / failovers
    );
}

#[test]
fn a_frozen_node_is_failed_over_at_the_step_timeout_not_waited_for_as_busy() {
    let dir = tempfile::tempdir().unwrap();
    let Pool {
        coord: _coord,
        http,
        mut nodes,
        ..
    } = pool(dir.path(), 2);
    let (want, _, done) = stream_and_kill(&http, usize::MAX, |_| {});
    assert!(done && !want.is_empty());
    let mut frozen = None;
    let (got, events, done) = stream_and_kill(&http, 10, |peer| {
        let p = nodes
            .remove(peer)
            .unwrap_or_else(|| panic!("{peer} is not a node"));
        let status = std::process::Command::new("kill")
            .args(["-STOP", &p.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        frozen = Some((p, Instant::now()));
    });
    let (p, at) = frozen.expect("nothing was frozen");
    let took = at.elapsed();
    // Thaw it so dropping it can reap it.
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &p.child.id().to_string()])
        .status();
    assert!(
        done && events.iter().all(|e| e.get("error").is_none()),
        "{events:?}"
    );
    assert_eq!(got, want, "the text changed");
    // Its pings stopped, so it was not taken for busy: the step timeout (30 s) and the
    // failover, not the five minutes a busy node gets.
    assert!(
        took < Duration::from_secs(150),
        "the frozen node was waited for {took:?}"
    );
}

#[test]
fn when_every_node_is_gone_clients_get_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    // The coordinator must outlive the test body: bind it.
    let Pool {
        coord: _coord,
        http,
        mut nodes,
        ..
    } = pool(dir.path(), 2);
    let started = Instant::now();
    let (_, events, _) = stream_and_kill(&http, 5, |_| {
        for (_, p) in nodes.drain() {
            p.kill();
        }
    });
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the stream hung"
    );
    let error = events
        .iter()
        .find_map(|e| e["error"]["message"].as_str())
        .unwrap_or_else(|| panic!("no error event: {events:?}"));
    assert!(error.contains("no node can take over"), "{error}");
    let raw = raw_http(
        &http,
        &request("POST", "/v1/completions", &[], r#"{"prompt":"hi"}"#),
    );
    let (status, body) = split_answer(&raw);
    assert_eq!(status, 503, "{raw}");
    assert!(body.contains("not ready"), "{body}");
}

#[test]
fn a_node_that_leaves_gracefully_hands_its_sessions_over_and_exits_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let Pool {
        mut coord,
        addr,
        http,
        mut nodes,
    } = pool(dir.path(), 3);
    let (want, _, done) = stream_and_kill(&http, usize::MAX, |_| {});
    assert!(done);
    // Different points of the stream, as for crashes; a fresh volunteer replaces each one.
    for (round, leave_after) in [5, 60, 150, 2, 20, 40, 95, 120, 175, 195]
        .into_iter()
        .enumerate()
    {
        let mut leaver = None;
        let (got, events, done) = stream_and_kill(&http, leave_after, |peer| {
            let p = nodes
                .remove(peer)
                .unwrap_or_else(|| panic!("{peer} is not a node"));
            let status = std::process::Command::new("kill")
                .args(["-TERM", &p.child.id().to_string()])
                .status()
                .expect("kill -TERM");
            assert!(status.success());
            leaver = Some((peer.to_string(), p, Instant::now()));
        });
        assert!(
            done && events.iter().all(|e| e.get("error").is_none()),
            "round {round}: {events:?}"
        );
        assert_eq!(got, want, "round {round}: the text changed");
        let (id, mut p, since) = leaver.expect("nobody left");
        let line = format!("peer leaving {id}");
        assert!(
            coord
                .wait_for(Instant::now() + Duration::from_secs(10), |l| l
                    .starts_with(&line))
                .is_some(),
            "the leave was never seen: {:?}",
            coord.seen
        );
        // It exits by itself, well within the 10 s deadline, once its session moved.
        let exited = loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                since.elapsed() < Duration::from_secs(15),
                "{id} did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(exited.success(), "{id} exited with {exited}");
        assert!(
            p.wait_for(Instant::now() + Duration::from_secs(5), |l| l
                .starts_with("left the pool"))
                .is_some(),
            "{:?}",
            p.seen
        );
        add_node(
            dir.path(),
            &format!("r{round}"),
            &mut coord,
            &addr,
            &mut nodes,
        );
    }
}

#[test]
fn a_span_without_replica_is_re_planned_onto_the_others_and_replayed() {
    // Four nodes that each hold about 12 of the 30 blocks: three form the chain and the
    // fourth replicates one span. Killing a node whose span has no replica makes the
    // coordinator re-plan those blocks onto the others, which load them; the session's
    // journal is replayed there and the stream goes on.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    let limit = ["--max-memory", "130M"];
    let mut nodes: HashMap<String, Proc> = (0..4)
        .map(|i| {
            let (p, id) = common::node(dir.path(), &format!("n{i}"), "public", &addr, &limit);
            (id, p)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut served: Vec<(String, String)> = Vec::new();
    while served.len() < 4 {
        let line = coord
            .wait_for(deadline, |l| {
                l.contains(" serves blocks ") && !served.iter().any(|(_, s)| s == l)
            })
            .unwrap_or_else(|| panic!("spans never loaded: {:?}", coord.seen));
        let id = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let range = line
            .split_whitespace()
            .nth(4)
            .unwrap_or_default()
            .to_string();
        served.push((id, line.clone()));
        let _ = range;
    }
    // The span held by one node only.
    let ranges: Vec<String> = served
        .iter()
        .map(|(_, l)| l.split_whitespace().nth(4).unwrap_or_default().to_string())
        .collect();
    let lonely: Vec<&String> = served
        .iter()
        .zip(&ranges)
        .filter(|(_, r)| ranges.iter().filter(|o| o == r).count() == 1)
        .map(|((id, _), _)| id)
        .collect();
    assert!(!lonely.is_empty(), "no unreplicated span: {served:?}");
    let victim = lonely[0].clone();

    let (want, events, done) = stream_and_kill(&http, usize::MAX, |_| {});
    assert!(done, "{events:?} {:?}", coord.seen);
    let (got, events, done) = stream_and_kill(&http, 30, |_| {
        nodes.remove(&victim).expect("the victim runs").kill();
    });
    assert!(
        done && events.iter().all(|e| e.get("error").is_none()),
        "{events:?}\n{:?}",
        coord.seen
    );
    assert_eq!(got, want, "the text changed");
    let replanned = coord.wait_for(Instant::now() + Duration::from_secs(5), |l| {
        l.starts_with("plan epoch ") && !l.contains(&victim)
    });
    assert!(replanned.is_some(), "{:?}", coord.seen);
}

/// Waits for a coordinator line starting with each of `lines`, each within 20 s.
fn expect_lines(coord: &mut Proc, lines: &[String]) {
    for line in lines {
        assert!(
            coord
                .wait_for(Instant::now() + Duration::from_secs(20), |l| l
                    .starts_with(line))
                .is_some(),
            "no {line:?}: {:?}",
            coord.seen
        );
    }
}

#[test]
fn a_node_that_comes_back_is_planned_again_and_a_node_that_stays_away_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    let mut nodes = HashMap::new();
    add_node(dir.path(), "a", &mut coord, &addr, &mut nodes);
    let a = nodes.keys().next().cloned().expect("node a");
    add_node(dir.path(), "b", &mut coord, &addr, &mut nodes);
    let b = nodes.keys().find(|k| **k != a).cloned().expect("node b");
    let (want, _, done) = stream_and_kill(&http, usize::MAX, |_| {});
    assert!(done);
    let soon = || Instant::now() + Duration::from_secs(20);

    // a crashes: the pool routes around it and dials it again, waiting longer each time...
    nodes.remove(&a).expect("node a").kill();
    expect_lines(
        &mut coord,
        &[
            format!("peer unreachable {a}"),
            format!("peer {a} not back; dialling it (try 1), next step in 1.0 s"),
            format!("peer {a} not back; dialling it (try 2), next step in 2.0 s"),
        ],
    );
    // ...and once it restarts with the same identity it is back at once, is planned and
    // loads its span again.
    let serves = format!("peer {a} serves blocks 0..30 (epoch");
    let before = coord.seen.iter().filter(|l| l.starts_with(&serves)).count();
    let restarted = Instant::now();
    let (p, id) = common::node(dir.path(), "a", "public", &addr, &[]);
    assert_eq!(id, a);
    nodes.insert(id, p);
    let back = format!("peer back {a} after ");
    assert!(
        coord.wait_for(soon(), |l| l.starts_with(&back)).is_some(),
        "{:?}",
        coord.seen
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while coord.seen.iter().filter(|l| l.starts_with(&serves)).count() == before {
        assert!(
            Instant::now() < deadline,
            "{a} never served again: {:?}",
            coord.seen
        );
        // Reads what arrives for a moment (the predicate takes nothing).
        let _ = coord.wait_for(Instant::now() + Duration::from_millis(200), |_| false);
    }
    eprintln!(
        "{a} served again {:.1} s after it restarted",
        restarted.elapsed().as_secs_f32()
    );

    // b crashes and stays away: its dials come 1, 2 and 4 s apart, it is gone 8 s after the
    // last, and a takes the work.
    nodes.remove(&b).expect("node b").kill();
    expect_lines(
        &mut coord,
        &[
            format!("peer unreachable {b}"),
            format!("peer {b} not back; dialling it (try 1), next step in 1.0 s"),
            format!("peer {b} not back; dialling it (try 2), next step in 2.0 s"),
            format!("peer {b} not back; dialling it (try 3), next step in 4.0 s"),
            format!("peer {b} not back; dialling it (try 4), next step in 8.0 s"),
            format!("peer gone {b}: not back after 4 dials"),
        ],
    );
    let (got, events, done) = stream_and_kill(&http, usize::MAX, |_| {});
    assert!(
        done && events.iter().all(|e| e.get("error").is_none()),
        "{events:?}"
    );
    assert_eq!(got, want);
    let peers = pool_json(&http)["peers"].clone();
    let ids: Vec<&str> = peers
        .as_array()
        .map(|v| v.iter().filter_map(|p| p["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, vec![a.as_str()], "{peers}");
}
