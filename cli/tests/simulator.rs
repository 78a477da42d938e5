//! The simulator against the real thing it models: its spot checks in a busy simulated pool
//! catch cheaters as soon, by jobs served, as `potluck bench --detection` says the policy
//! alone does (the same `Trust` the coordinator runs, with no pool around it); and a node
//! killed mid-session in a real three-node pool fails over as the simulator, told only what
//! that pool's adverts say and how fast its steps were, predicts: the same plan, the same
//! failover decision, the same stall within 30%.

mod common;

use common::{get_json, potluck_ok, request, Proc};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

/// `potluck bench --detection`'s horizons, in jobs.
const HORIZONS: [u64; 7] = [10, 50, 100, 500, 1000, 2000, 5000];
/// Simulated peers per cell of the bench's table.
const TRIALS: usize = 1000;

/// The bench's detection probabilities at each horizon for floor `p_min` and cheat share
/// `x`, as printed (`0.05`, `0.2`).
fn bench_row(p_min: &str, x: &str) -> Vec<f64> {
    let out = potluck_ok(&["bench", "--detection", &TRIALS.to_string()]);
    let row = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.len() > 2 && w[0] == p_min && w[1] == x)
        .unwrap_or_else(|| panic!("no row for p_min {p_min} x {x}:\n{out}"));
    // Each cell is "simulated (formula)".
    let cells: Vec<f64> = row[2..]
        .iter()
        .filter(|c| !c.starts_with('('))
        .map(|c| c.parse().expect("a probability"))
        .collect();
    assert_eq!(cells.len(), HORIZONS.len(), "{row:?}");
    cells
}

#[test]
fn simulated_checks_catch_cheaters_as_soon_as_the_policy_alone_predicts() {
    let bench = bench_row("0.05", "0.05");
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut known, mut caught, mut cheaters) = ([0u64; 7], [0u64; 7], 0);
    for seed in 1..=4 {
        let out = dir.path().join(seed.to_string());
        let out_arg = out.to_string_lossy().into_owned();
        potluck_ok(&[
            "sim",
            "detection",
            "--seed",
            &seed.to_string(),
            "--out",
            &out_arg,
        ]);
        let text = std::fs::read_to_string(out.join("report.json")).expect("report.json");
        let report: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        cheaters += report["cheating"]["cheaters"].as_u64().unwrap_or(0);
        let curve = report["cheating"]["detection"].as_array().expect("a curve");
        for (i, point) in curve.iter().enumerate() {
            assert_eq!(point["jobs"].as_u64(), Some(HORIZONS[i]));
            known[i] += point["known"].as_u64().unwrap_or(0);
            caught[i] += point["caught"].as_u64().unwrap_or(0);
        }
    }
    let mut compared = 0;
    for i in 0..HORIZONS.len() {
        // Where the run ended before most uncaught cheaters served that many jobs, the
        // ones known are mostly the caught: no estimate.
        if known[i] * 4 < cheaters * 3 {
            continue;
        }
        compared += 1;
        let sim = caught[i] as f64 / known[i] as f64;
        // Both are binomial estimates: a band of three standard deviations of their
        // difference, about the pooled share (never narrower than 0.03, for shares near 1).
        let n = known[i] as f64;
        let pooled = (caught[i] as f64 + bench[i] * TRIALS as f64) / (n + TRIALS as f64);
        let band =
            (3.0 * (pooled * (1.0 - pooled) * (1.0 / n + 1.0 / TRIALS as f64)).sqrt()).max(0.03);
        assert!(
            (sim - bench[i]).abs() <= band,
            "within {} jobs: simulated pool {sim:.3} ({} of {}), policy alone {:.3}, band ±{band:.3}",
            HORIZONS[i],
            caught[i],
            known[i],
            bench[i]
        );
    }
    assert!(
        compared >= 3,
        "too few cheaters served enough jobs: {known:?} of {cheaters}"
    );
}

/// Tokens the stream of the failover test generates, and the one it is killed after.
const OUTPUT: usize = 140;
const KILL_AFTER: usize = 80;

/// A greedy completion of `OUTPUT` tokens, streamed: when each chunk came (seconds after
/// the request went out), the ids of the chains serving it at chunk 2 and after the kill,
/// and the session's prompt length. After `kill_after` chunks, `kill` gets the first
/// hop's peer (never, with `None`).
struct Streamed {
    at: Vec<f64>,
    before: Value,
    after: Value,
    prompt_tokens: u64,
}

fn stream(
    http: &str,
    prompt: &str,
    kill_after: Option<usize>,
    mut kill: impl FnMut(&str),
) -> Streamed {
    let body = serde_json::json!({
        "prompt": prompt, "temperature": 0, "max_tokens": OUTPUT, "stream": true,
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(http).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let sent = Instant::now();
    s.write_all(&request("POST", "/v1/completions", &[], &body))
        .expect("send");
    let mut out = Streamed {
        at: Vec::new(),
        before: Value::Null,
        after: Value::Null,
        prompt_tokens: 0,
    };
    let mut opening = true;
    for line in BufReader::new(s).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        assert!(!data.contains("\"error\""), "the stream failed: {data}");
        if data == "[DONE]" {
            break;
        }
        // The first chunk goes out before any step, the last one only says why it ended.
        let chunk: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        let choice = &chunk["choices"][0];
        if !choice["finish_reason"].is_null() || std::mem::replace(&mut opening, false) {
            continue;
        }
        out.at.push(sent.elapsed().as_secs_f64());
        let n = out.at.len();
        if n == 2 || Some(n) == kill_after.map(|k| k + 10) {
            let (_, pool) = get_json(http, "/api/pool");
            let session = pool["sessions"][0].clone();
            if n == 2 {
                out.prompt_tokens = session["prompt_tokens"].as_u64().unwrap_or(0);
                out.before = session["chain"].clone();
            } else {
                out.after = session["chain"].clone();
            }
        }
        if Some(n) == kill_after {
            let peer = out.before[0]["peer"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            kill(&peer);
        }
    }
    assert_eq!(out.at.len(), OUTPUT, "the stream ended early");
    out
}

/// Waits for the coordinator's verdict on more than `results` results of `peer` at once.
fn checked(coord: &mut Proc, peer: &str, results: usize) {
    let tag = format!("peer={peer}");
    coord
        .wait_for(Instant::now() + Duration::from_secs(60), |l| {
            l.contains(&tag)
                && l.split_once(" results: ")
                    .and_then(|(head, _)| head.rsplit(' ').next()?.parse::<usize>().ok())
                    .is_some_and(|n| n > results)
        })
        .unwrap_or_else(|| panic!("{peer}'s results were never checked\n{:#?}", coord.seen));
}

/// The median of `xs`.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The ranges of a plan line's spans, sorted, and why it is so: "plan epoch N: P a..b, ...
/// (why)".
fn plan_of(line: &str) -> (Vec<String>, String) {
    let rest = line.split_once(": ").map_or("", |(_, r)| r);
    let (spans, why) = rest.split_once(" (").unwrap_or((rest, ""));
    let mut ranges: Vec<String> = spans
        .split(", ")
        .filter_map(|s| s.split_whitespace().nth(1))
        .map(str::to_string)
        .collect();
    ranges.sort();
    (ranges, why.trim_end_matches(')').to_string())
}

/// The ranges of `/api/pool`'s plan, sorted, and its reason.
fn pool_plan(pool: &Value) -> (Vec<String>, String) {
    let mut ranges: Vec<String> = pool["plan"]["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| format!("{}..{}", s["start"], s["end"]))
        .collect();
    ranges.sort();
    let why = pool["plan"]["why"].as_str().unwrap_or_default().to_string();
    (ranges, why)
}

#[test]
fn a_node_killed_mid_session_fails_over_as_the_simulator_predicts() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    let mut nodes: HashMap<String, Proc> = HashMap::new();
    for i in 0..3 {
        let (id, p) = common::serving_node(
            dir.path(),
            &format!("n{i}"),
            &mut coord,
            &addr,
            &[],
            "0..30",
        );
        nodes.insert(id, p);
    }
    // A prompt long enough that its prefill is a part of the stall worth predicting.
    let prompt: String = (1..=40).map(|i| format!("{i}, ")).collect();
    let prompt = prompt.trim_end();
    let (_, pool) = get_json(&http, "/api/pool");
    let plan_before = pool_plan(&pool);

    // What the simulator is told: the adverts, the model's shape, and how long this pool's
    // prefills and steps take when nothing fails: taken over both streams (all but the
    // failed one's stall), as one sample of each is at the mercy of a busy machine.
    // Each node first serves a session (three at once spread over the three copies), so
    // neither the measured steps nor the replacement's replay pay a first run's page faults.
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                let body = serde_json::json!({"prompt": prompt, "temperature": 0, "max_tokens": 4});
                let (status, answer) = common::post_json(&http, "/v1/completions", &body);
                assert_eq!(status, 200, "{answer}");
            });
        }
    });
    // Every result of a new peer is recomputed by another: a check running through the
    // failover would share this machine's two cores with the replay, which the simulator's
    // machines do not. So each stream starts once the checks of what came before are done.
    for peer in nodes.keys() {
        checked(&mut coord, peer, 1);
    }
    let calm = stream(&http, prompt, None, |_| {});
    checked(
        &mut coord,
        calm.before[0]["peer"].as_str().unwrap_or_default(),
        10,
    );
    let mut victim = String::new();
    let failed = stream(&http, prompt, Some(KILL_AFTER), |peer| {
        victim = peer.to_string();
        nodes.remove(peer).expect("the serving node runs").kill();
    });
    let gaps = |at: &[f64]| -> Vec<f64> { at.windows(2).map(|w| w[1] - w[0]).collect() };
    let mut failed_gaps = gaps(&failed.at);
    failed_gaps.sort_by(f64::total_cmp);
    let gap = failed_gaps.pop().unwrap_or(0.0);
    let step_s = median([gaps(&calm.at), failed_gaps].concat());
    let ttft_s = (calm.at[0] + failed.at[0]) / 2.0;
    let (_, pool_after) = get_json(&http, "/api/pool");
    // Everything the coordinator said up to its failover, read, so a reload after it counts.
    coord
        .wait_for(Instant::now() + Duration::from_secs(30), |l| {
            l.contains("failed over: ")
        })
        .unwrap_or_else(|| panic!("the coordinator never failed over\n{:#?}", coord.seen));

    let scenario = scenario(&pool, calm.prompt_tokens, step_s, ttft_s);
    let file = dir.path().join("failover-3.toml");
    std::fs::write(&file, &scenario).expect("write the scenario");
    let out = dir.path().join("sim");
    potluck_ok(&[
        "sim",
        file.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let log = std::fs::read_to_string(out.join("log.txt")).expect("log.txt");
    let context = format!(
        "scenario:\n{scenario}\nsimulated:\n{log}\nreal:\n{:#?}",
        coord.seen
    );
    let lines: Vec<&str> = log.lines().collect();
    let over = lines
        .iter()
        .position(|l| l.contains("session 0 failed over: "))
        .unwrap_or_else(|| panic!("the simulated session never failed over\n{context}"));
    let plan_lines = |range: &[&str]| -> Vec<(Vec<String>, String)> {
        range
            .iter()
            .filter_map(|l| {
                l.split_once(" plan epoch ")
                    .map(|(_, p)| plan_of(&format!("plan epoch {p}")))
            })
            .collect()
    };
    // The same plan: three whole copies, and two once the killed node is gone.
    let crashed = lines
        .iter()
        .position(|l| l.contains(" peer unreachable "))
        .unwrap_or(over);
    let sim_before = plan_lines(&lines[..crashed]).pop().unwrap_or_default();
    assert_eq!(
        sim_before, plan_before,
        "the plans differ before the crash\n{context}"
    );
    let sim_after = plan_lines(&lines).pop().unwrap_or_default();
    assert_eq!(
        sim_after,
        pool_plan(&pool_after),
        "the plans differ after the crash\n{context}"
    );

    // The same failover decision: the killed hop's blocks go whole to a copy that already
    // served them, with nothing loaded for it.
    let chain = |c: &Value| -> Vec<(String, String)> {
        c.as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                (
                    h["peer"].as_str().unwrap_or_default().to_string(),
                    format!("{}..{}", h["start"], h["end"]),
                )
            })
            .collect()
    };
    let (before, after) = (chain(&failed.before), chain(&failed.after));
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0].0, victim, "still on the killed node");
    assert_eq!(after[0].1, before[0].1, "the blocks moved differently");
    let served = format!("peer {} serves blocks ", after[0].0);
    let loads = coord.seen.iter().filter(|l| l.starts_with(&served)).count();
    assert_eq!(
        loads, 1,
        "the replacement loaded its blocks again\n{context}"
    );
    let decision = lines[over];
    let moved = format!("blocks {} from ", before[0].1);
    assert!(
        decision.contains(&moved)
            && decision.contains(&format!(
                " 0..30 (hops 0..=0, {} steps replayed)",
                KILL_AFTER - 1
            )),
        "the simulated failover decided otherwise: {decision}\n{context}"
    );

    // The same stall: the real one is the longest wait between two tokens; the simulated
    // one ends when the replacement has replayed, and the next token takes one more step.
    let stalled: f64 = decision
        .rsplit_once("stalled ")
        .and_then(|(_, s)| s.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("no stall in {decision}"));
    let predicted = stalled + step_s;
    let ratio = predicted / gap;
    let took = coord
        .seen
        .iter()
        .find(|l| l.contains("failed over: "))
        .and_then(|l| {
            l.split_once("took=")
                .map(|(_, t)| t.split_whitespace().next().unwrap_or("").to_string())
        })
        .unwrap_or_default();
    eprintln!("measured stall {gap:.3} s (failover took {took}), simulated {predicted:.3} s (ratio {ratio:.2}); step {step_s:.4} s, first token {ttft_s:.3} s");
    assert!(
        (0.7..=1.3).contains(&ratio),
        "measured stall {gap:.3} s, simulated {predicted:.3} s\n{context}"
    );
}

/// The scenario of the pool `pool` describes (three machines, as its adverts say), whose
/// steps took `step_s` and whose first token `ttft_s` after a prompt of `prompt` tokens,
/// running the failover test's session.
fn scenario(pool: &Value, prompt: u64, step_s: f64, ttft_s: f64) -> String {
    let model = &pool["model"];
    let layers = model["layers"].as_u64().unwrap_or(0);
    let mb = |v: &Value| v.as_f64().unwrap_or(0.0) / 1e6;
    let block_mb = mb(&model["layer_bytes"]);
    let peer = &pool["peers"][0];
    let memory_gb = peer["memory_bytes"].as_f64().unwrap_or(0.0) / 1e9;
    let rtt_ms = peer["rtt_ms"].as_f64().unwrap_or(0.0);
    // A decode step reads every block's weights once: the bandwidth that takes `step_s`.
    let step_ms = step_s * 1e3 - rtt_ms;
    let mem_gbps = layers as f64 * block_mb / step_ms;
    // A prefill's arithmetic: 2 FLOPs per weight per position, a weight per half byte.
    let flops = 2.0 * block_mb * 1e6 * 2.0 * prompt as f64 * layers as f64;
    let gflops = flops / ((ttft_s * 1e3 - rtt_ms) * 1e6);
    format!(
        r#"name = "failover-3"
description = "A coordinator and three nodes on one machine, each holding the whole model; the serving node is killed {KILL_AFTER} tokens into a session."
peers = 3
minutes = 2
advert_interval_s = 1

[model]
name = "{name}"
layers = {layers}
block_mb = {block_mb}
edge_mb = {edge_mb}
reserve_mb = {reserve_mb}

[[devices]]
name = "this-machine"
share = 1.0
memory_gb = {memory_gb}
mem_gbps = {mem_gbps}
gflops = {gflops}

[availability]
on_hours = {{ kind = "fixed", value = 100.0 }}
off_hours = {{ kind = "fixed", value = 100.0 }}
# The pipeline's wait before it reopens a broken stream (coordinator's RETRY_BACKOFF).
crash_detect_s = 0.05

[network]
regions = [{{ name = "loopback", share = 1.0 }}]
rtt_ms = [[{rtt_ms}]]
uplink_mbps = {{ kind = "fixed", value = 10000.0 }}

[load]
sessions_per_minute = 0.0
prompt_tokens = {{ kind = "fixed", value = {prompt} }}
output_tokens = {{ kind = "fixed", value = {OUTPUT} }}

[[events]]
kind = "session"
at_minute = 0.5
prompt_tokens = {prompt}
output_tokens = {OUTPUT}

[[events]]
kind = "crash-serving"
session = 0
after_tokens = {KILL_AFTER}
"#,
        name = model["name"].as_str().unwrap_or("model"),
        edge_mb = mb(&model["edge_bytes"]),
        reserve_mb = mb(&model["reserve_bytes"]),
    )
}
