//! Checking volunteers' work on real processes: a coordinator and four nodes that each hold
//! the whole model, one of them corrupting every output it signs. Its first checked session
//! (or the first check it is asked to run on another's) gets it quarantined; honest nodes'
//! results pass their checks; once it is out, every answer is the honest one; and the
//! audit log records it all and verifies offline.

mod common;

use common::post_json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Starts a node and waits until the coordinator says it serves the whole model.
fn add_node(
    dir: &std::path::Path,
    name: &str,
    coord: &mut common::Proc,
    addr: &str,
    extra: &[&str],
) -> (String, common::Proc) {
    common::serving_node(dir, name, coord, addr, extra, "0..30")
}

/// `n` greedy completions at once; their texts.
fn round(http: &str, n: usize) -> Vec<String> {
    let body = json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (http, body) = (http.to_string(), body.clone());
            std::thread::spawn(move || post_json(&http, "/v1/completions", &body))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            let (status, v): (u16, Value) = h.join().expect("client thread");
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn a_node_that_corrupts_its_outputs_is_quarantined_and_honest_ones_never_are() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    let mut nodes = HashMap::new();
    for name in ["a", "b", "c"] {
        let (id, p) = add_node(dir.path(), name, &mut coord, &addr, &[]);
        nodes.insert(id, p);
    }
    let (cheat, p) = add_node(
        dir.path(),
        "cheat",
        &mut coord,
        &addr,
        &["--corrupt", "1:noise"],
    );
    nodes.insert(cheat.clone(), p);
    let (want, _) = common::local_generate("The capital of France is", false, 12);

    // Rounds of four sessions at once spread over the four nodes until the cheat is caught.
    let mut rounds = 0;
    let mut wrong = 0;
    let line = common::until_quarantined(&mut coord, &cheat, 10, Duration::from_millis(500), |n| {
        rounds = n;
        wrong += round(&http, 4).iter().filter(|t| **t != want).count();
    });
    // Caught on its own work, or as the checker of another's: its recomputation disagreed
    // with the checked peer and a third one.
    let as_worker = line.contains("failed a spot check");
    assert!(
        as_worker || line.contains("recomputation disagreed with two other peers"),
        "{line}"
    );
    if as_worker {
        assert!(wrong > 0, "{line}");
    }
    common::never_quarantined(&coord, nodes.keys().filter(|k| **k != cheat));
    // From now on every answer is the honest one.
    for _ in 0..2 {
        for text in round(&http, 4) {
            assert_eq!(text, want);
        }
    }
    let pool: Value = {
        let raw = common::raw_http(&http, b"GET /api/pool HTTP/1.0\r\n\r\n");
        serde_json::from_str(common::split_answer(&raw).1).unwrap()
    };
    let status: HashMap<String, String> = pool["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or_default().to_string(),
                p["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(status.get(&cheat).map(String::as_str), Some("quarantined"));
    // Its reputation (the bound the router weighs peers by) is below every checked honest
    // node's.
    let reputation = |p: &Value| p["reputation"].as_f64().unwrap_or(f64::NAN);
    let peers = pool["peers"].as_array().unwrap();
    let cheat_rep = peers
        .iter()
        .find(|p| p["id"] == cheat.as_str())
        .map(reputation)
        .unwrap();
    for p in peers.iter().filter(|p| p["id"] != cheat.as_str()) {
        if p["checked_jobs"].as_u64().unwrap_or(0) > 0 {
            assert!(reputation(p) > cheat_rep, "{p} vs {cheat_rep}");
        }
    }

    // The audit log: a failed check and the quarantine for the cheat, passed checks for the
    // others, and it verifies.
    let log = dir.path().join("coordinator").join("audit.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let entries: Vec<Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let entries: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v["entry"].clone())
            .collect();
        if entries.iter().any(|e| e["kind"] == "quarantine") || Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let checks = |peer: &str, verdict: &str| {
        entries
            .iter()
            .filter(|e| e["kind"] == "check" && e["peer"] == peer && e["verdict"] == verdict)
            .count()
    };
    if as_worker {
        assert!(checks(&cheat, "fail") > 0);
    }
    assert_eq!(checks(&cheat, "pass"), 0);
    let honest_pass: usize = nodes
        .keys()
        .filter(|k| **k != cheat)
        .map(|k| checks(k, "pass"))
        .sum();
    let honest_fail: usize = nodes
        .keys()
        .filter(|k| **k != cheat)
        .map(|k| checks(k, "fail"))
        .sum();
    assert!(
        honest_pass > 0 && honest_fail == 0,
        "{honest_pass} {honest_fail}"
    );
    assert!(entries
        .iter()
        .any(|e| e["kind"] == "quarantine" && e["peer"] == cheat.as_str()));
    common::potluck_ok(&["audit", "verify", log.to_str().unwrap()]);
    eprintln!(
        "caught after {rounds} rounds; {wrong} wrong answers before; {honest_pass} honest checks passed"
    );
}

/// A counter from the coordinator's `/metrics`.
fn metric(http: &str, name: &str) -> f64 {
    let raw = common::raw_http(http, b"GET /metrics HTTP/1.0\r\n\r\n");
    common::split_answer(&raw)
        .1
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A coordinator serving a tiny quantized model (the engine writes it from a fixed seed)
/// from a private cache, so thousands of checks take seconds; `extra` goes to the
/// coordinator. Returns it, its bootstrap address, its API and the cache folder.
fn tiny_pool(dir: &std::path::Path, extra: &[&str]) -> (common::Proc, String, String, String) {
    let models = dir.join("models");
    let file = dir.join("tiny.gguf");
    let spec = potluck_engine::synthetic::SyntheticSpec {
        dtype: candle_core::quantized::GgmlDType::Q4_1,
        context: 1024,
        ..Default::default()
    };
    potluck_engine::synthetic::write_gguf(&spec, &file).unwrap();
    let models = models.to_str().unwrap().to_string();
    let fetched = std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
        .args(["--models-dir", &models, "model", "fetch", "tiny", "--from"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    let mut args = vec!["--models-dir", &models, "--model", "tiny"];
    args.extend_from_slice(extra);
    let (coord, addr, http) = common::coordinator(dir, &args);
    (coord, addr, http, models)
}

/// Starts a node on the tiny model's cache and waits until it serves the whole model.
fn add_tiny_node(
    dir: &std::path::Path,
    name: &str,
    coord: &mut common::Proc,
    addr: &str,
    models: &str,
    extra: &[&str],
) -> (String, common::Proc) {
    let mut args = vec!["--models-dir", models];
    args.extend_from_slice(extra);
    common::serving_node(dir, name, coord, addr, &args, "0..8")
}

/// `n` sampled completions at once on the tiny model, each with its own seed.
fn tiny_round(http: &str, n: usize, round: usize) {
    let clients: Vec<_> = (0..n)
        .map(|i| {
            let http = http.to_string();
            let body = json!({"prompt": "Once upon a time", "max_tokens": 200,
                              "temperature": 0.8, "seed": round * 10 + i});
            std::thread::spawn(move || post_json(&http, "/v1/completions", &body))
        })
        .collect();
    for c in clients {
        let (status, v) = c.join().expect("client");
        assert_eq!(status, 200, "{v}");
    }
}

/// Waits until the count `name` in `/metrics` stops moving (checks run after sessions).
fn settle(http: &str, name: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = -1.0;
    loop {
        let now = metric(http, name);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn honest_nodes_pass_ten_thousand_checks_and_are_never_quarantined() {
    // Every job checked; the nodes differ in thread count, as volunteers' machines do, and
    // tokens are sampled.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http, models) = tiny_pool(dir.path(), &["--check-share", "1"]);
    let _nodes: Vec<_> = [("a", "1"), ("b", "2"), ("c", "1")]
        .iter()
        .map(|(name, threads)| {
            add_tiny_node(
                dir.path(),
                name,
                &mut coord,
                &addr,
                &models,
                &["--threads", threads],
            )
        })
        .collect();
    let recomputed = "potluck_checks_total{kind=\"recomputed\"}";
    let mut rounds = 0;
    while metric(&http, recomputed) < 10_000.0 {
        rounds += 1;
        assert!(
            rounds <= 100,
            "too slow: {} checks",
            metric(&http, recomputed)
        );
        tiny_round(&http, 6, rounds);
        settle(&http, recomputed);
    }
    let fails = metric(&http, "potluck_checks_total{kind=\"spot_fail\"}");
    let unsure = metric(&http, "potluck_checks_total{kind=\"spot_inconclusive\"}");
    let passes = metric(&http, "potluck_checks_total{kind=\"spot_pass\"}");
    assert_eq!((fails, unsure), (0.0, 0.0), "honest work failed checks");
    assert!(passes > 0.0);
    assert!(
        !coord.seen.iter().any(|l| l.starts_with("peer quarantined")),
        "{:?}",
        coord.seen
    );
    eprintln!(
        "{} results recomputed in {passes} checked jobs over {rounds} rounds: none failed",
        metric(&http, recomputed)
    );
}

#[test]
fn a_node_corrupting_five_percent_of_its_outputs_is_caught_within_its_first_jobs() {
    // Default check share. The cheat is new, so its first job is checked whole; with 5% of
    // 200 outputs corrupt, nearly every job of it holds a corrupt one.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http, models) = tiny_pool(dir.path(), &[]);
    let mut honest = Vec::new();
    for name in ["a", "b", "c"] {
        honest.push(add_tiny_node(
            dir.path(),
            name,
            &mut coord,
            &addr,
            &models,
            &[],
        ));
    }
    let (cheat, _p) = add_tiny_node(
        dir.path(),
        "cheat",
        &mut coord,
        &addr,
        &models,
        &["--corrupt", "0.05:zeros:11"],
    );
    let mut rounds = 0;
    common::until_quarantined(&mut coord, &cheat, 20, Duration::from_millis(200), |n| {
        rounds = n;
        tiny_round(&http, 4, n);
        settle(&http, "potluck_checks_total{kind=\"recomputed\"}");
    });
    // Its jobs before the quarantine, from the audit log: sessions it served.
    let log = dir.path().join("coordinator").join("audit.log");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut sessions = std::collections::HashSet::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let e = &v["entry"];
        if e["kind"] == "quarantine" && e["peer"] == cheat.as_str() {
            break;
        }
        if e["kind"] == "result" && e["peer"] == cheat.as_str() {
            sessions.insert(e["session"].as_u64());
        }
    }
    eprintln!(
        "caught after {} of its jobs ({rounds} rounds)",
        sessions.len()
    );
    // In warm-up every job is checked: it is caught by its first job's check, give or take
    // the jobs it took on while that check ran (and one more if that job was clean, 0.95^200).
    assert!(
        sessions.len() <= 8,
        "{} jobs before it was caught",
        sessions.len()
    );
    common::never_quarantined(&coord, honest.iter().map(|(id, _)| id));
}

#[test]
fn in_strict_mode_no_corrupted_token_reaches_the_client() {
    // Every hop runs on two nodes and a token goes out only when they agree; one of four
    // nodes corrupts a third of its outputs.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http, models) = tiny_pool(dir.path(), &["--verify", "strict"]);
    let _honest: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|name| add_tiny_node(dir.path(), name, &mut coord, &addr, &models, &[]))
        .collect();
    let (cheat, _p) = add_tiny_node(
        dir.path(),
        "cheat",
        &mut coord,
        &addr,
        &models,
        &["--corrupt", "0.3:noise:5"],
    );
    let prompt = "Once upon a time";
    let want = {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
            .args(["--models-dir", &models, "generate", "--model", "tiny"])
            .args([
                "--prompt",
                prompt,
                "--max-tokens",
                "40",
                "--temperature",
                "0",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string()
    };
    let body = json!({"prompt": prompt, "max_tokens": 40, "temperature": 0});
    let quarantined = format!("peer quarantined {cheat}");
    let mut answers = 0;
    for round in 0..8 {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (http, body) = (http.clone(), body.clone());
                std::thread::spawn(move || post_json(&http, "/v1/completions", &body))
            })
            .collect();
        for c in clients {
            let (status, v) = c.join().expect("client");
            if status != 200 {
                let _ = coord.wait_for(Instant::now() + Duration::from_millis(500), |_| false);
                panic!("round {round}: {v}\n{:?}", coord.seen);
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or_default();
            assert_eq!(text, want, "round {round}: a corrupted token got out");
            answers += 1;
        }
        if round >= 1 && coord.seen.iter().any(|l| l.starts_with(&quarantined)) {
            break;
        }
    }
    let _ = coord.wait_for(Instant::now() + Duration::from_secs(5), |l| {
        l.starts_with(&quarantined)
    });
    let disputes = metric(&http, "potluck_checks_total{kind=\"strict_dispute\"}");
    let agreed = metric(&http, "potluck_checks_total{kind=\"strict_agree\"}");
    eprintln!("{answers} answers, all honest; {agreed} steps agreed, {disputes} disputed");
    assert!(
        disputes > 0.0,
        "the cheat was never in a chain: {:?}",
        coord.seen
    );
    assert!(
        coord.seen.iter().any(|l| l.starts_with(&quarantined)),
        "{:?}",
        coord.seen
    );
}

#[test]
fn canaries_catch_a_cheat_that_no_session_has_used_yet() {
    // Two honest nodes serve and check each other: their agreed jobs become known answers.
    // Then an honest node and a cheat join; no session runs, yet canaries (those jobs,
    // replayed as new work) pass the honest one and quarantine the cheat.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http, models) = tiny_pool(dir.path(), &["--canary-interval", "1"]);
    let mut nodes: Vec<_> = ["a", "b"]
        .iter()
        .map(|name| add_tiny_node(dir.path(), name, &mut coord, &addr, &models, &[]))
        .collect();
    tiny_round(&http, 4, 1);
    settle(&http, "potluck_checks_total{kind=\"spot_pass\"}");
    assert!(metric(&http, "potluck_checks_total{kind=\"spot_pass\"}") > 0.0);
    nodes.push(add_tiny_node(
        dir.path(),
        "c",
        &mut coord,
        &addr,
        &models,
        &[],
    ));
    let (cheat, _p) = add_tiny_node(
        dir.path(),
        "cheat",
        &mut coord,
        &addr,
        &models,
        &["--corrupt", "1:zeros"],
    );
    let line = coord
        .wait_for(Instant::now() + Duration::from_secs(30), |l| {
            l.starts_with(&format!("peer quarantined {cheat}"))
        })
        .unwrap_or_else(|| panic!("the cheat was never caught: {:?}", coord.seen));
    assert!(line.contains("failed a canary"), "{line}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&http, "potluck_checks_total{kind=\"canary_pass\"}") == 0.0 {
        assert!(Instant::now() < deadline, "no canary passed");
        std::thread::sleep(Duration::from_millis(200));
    }
    common::never_quarantined(&coord, nodes.iter().map(|(id, _)| id));
}

#[test]
fn forged_and_replayed_receipts_are_refused_and_their_nodes_dropped() {
    // One node changes outputs after signing them, another answers with an earlier step's
    // signed result. Both are refused on arrival and dropped; their sessions move to the
    // honest node and every client call succeeds with the honest text.
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http, models) = tiny_pool(dir.path(), &[]);
    let honest = add_tiny_node(dir.path(), "honest", &mut coord, &addr, &models, &[]);
    let (forger, _f) = add_tiny_node(
        dir.path(),
        "forger",
        &mut coord,
        &addr,
        &models,
        &["--corrupt", "0.5:forge"],
    );
    let (replayer, _r) = add_tiny_node(
        dir.path(),
        "replayer",
        &mut coord,
        &addr,
        &models,
        &["--corrupt", "0.5:replay"],
    );
    let prompt = "Once upon a time";
    let body = json!({"prompt": prompt, "max_tokens": 30, "temperature": 0});
    let mut texts = std::collections::HashSet::new();
    for round in 0..6 {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let (http, body) = (http.clone(), body.clone());
                std::thread::spawn(move || post_json(&http, "/v1/completions", &body))
            })
            .collect();
        for c in clients {
            let (status, v) = c.join().expect("client");
            if status != 200 {
                // Everything the coordinator said up to now, to tell why.
                let _ = coord.wait_for(Instant::now() + Duration::from_secs(2), |_| false);
                panic!(
                    "round {round}: {status} {v}; coordinator: {:#?}",
                    coord.seen
                );
            }
            texts.insert(
                v["choices"][0]["text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    assert_eq!(texts.len(), 1, "answers differ: {texts:?}");
    for (cheat, why) in [(&forger, "output"), (&replayer, "job")] {
        let line = coord
            .wait_for(Instant::now() + Duration::from_secs(10), |l| {
                l.starts_with(&format!("peer dropped {cheat}"))
            })
            .unwrap_or_else(|| panic!("{cheat} was not dropped: {:?}", coord.seen));
        assert!(
            line.contains(&format!("receipt's {why} digest does not match")),
            "{line}"
        );
    }
    assert!(!coord
        .seen
        .iter()
        .any(|l| l.starts_with(&format!("peer dropped {}", honest.0))));
}

/// `id`'s run of valid checked results in a row, from the dashboard.
fn valid_streak(http: &str, id: &str) -> u64 {
    let raw = common::raw_http(http, b"GET /api/pool HTTP/1.0\r\n\r\n");
    let pool: Value = serde_json::from_str(common::split_answer(&raw).1).unwrap_or_default();
    pool["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == id)
        .and_then(|p| p["valid_streak"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_fresh_key_cannot_get_a_proven_node_quarantined_on_its_word_alone() {
    // Two honest nodes check each other until both have a record of their own; one goes.
    // A fresh key that corrupts everything then takes the same blocks. It is the only
    // replica, so it checks the proven node's work and disagrees, but one fresh key's word
    // does not condemn a proven node: with no proven third opinion that is inconclusive.
    // The proven node's check of the fresh key's work stands, and it is the one caught.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Every result is checked, so the fresh key checks the proven node from its first job.
    let (mut coord, addr, http, models) = tiny_pool(d, &["--check-share", "1"]);
    let (a, _pa) = add_tiny_node(d, "a", &mut coord, &addr, &models, &[]);
    let (b, pb) = add_tiny_node(d, "b", &mut coord, &addr, &models, &[]);
    let mut rounds = 0;
    while valid_streak(&http, &a) < 10 || valid_streak(&http, &b) < 10 {
        rounds += 1;
        assert!(
            rounds <= 40,
            "no record after {rounds} rounds: {:?}",
            coord.seen
        );
        tiny_round(&http, 4, rounds);
        settle(&http, "potluck_checks_total{kind=\"spot_pass\"}");
    }
    drop(pb);
    let gone = [
        format!("peer unreachable {b}"),
        format!("peer leaving {b}"),
        format!("peer left {b}"),
    ];
    assert!(
        coord
            .wait_for(Instant::now() + Duration::from_secs(30), |l| gone
                .iter()
                .any(|g| l.starts_with(g)))
            .is_some(),
        "{:?}",
        coord.seen
    );
    let (sybil, _ps) = add_tiny_node(
        d,
        "sybil",
        &mut coord,
        &addr,
        &models,
        &["--corrupt", "1:zeros"],
    );
    common::until_quarantined(&mut coord, &sybil, 20, Duration::from_millis(200), |n| {
        tiny_round(&http, 4, 100 + n);
        settle(&http, "potluck_checks_total{kind=\"recomputed\"}");
    });
    // More of the proven node's work, then every check settled: the proven node was never
    // condemned, whichever of the two was checked first (the old rule quarantined it on the
    // fresh key's word; `pool::checks::settle`'s unit tests pin the rule itself).
    tiny_round(&http, 4, 200);
    settle(&http, "potluck_checks_total{kind=\"recomputed\"}");
    common::never_quarantined(&coord, [&a]);
}
