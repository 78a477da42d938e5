//! The simulator on its scenarios: every file of the folder is built in and runs; runs are
//! reproducible from their seed; and what the scenarios promise holds.

use potluck_sim::scenarios::{built_in, BUILT_IN};
use potluck_sim::{simulate, Report, Scenario};

fn scenario(name: &str) -> Scenario {
    let text = built_in(name).unwrap_or_else(|| panic!("no scenario {name}"));
    Scenario::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn run(s: Scenario, seed: u64) -> Report {
    simulate(s, Some(seed)).report
}

#[test]
fn every_scenario_in_the_folder_is_built_in_and_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .expect("scenario folder")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    files.sort();
    let mut names: Vec<String> = BUILT_IN.iter().map(|(n, _)| format!("{n}.toml")).collect();
    names.sort();
    assert_eq!(files, names, "sim/scenarios and scenarios::BUILT_IN differ");
    for (name, text) in BUILT_IN {
        let s = Scenario::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&s.name, name, "a scenario's name is its file's");
    }
}

#[test]
fn a_bad_scenario_is_refused_with_the_reason() {
    let mut text = built_in("lan-5")
        .unwrap()
        .replace("layers = 32", "layers = 0");
    let e = Scenario::parse(&text).unwrap_err().to_string();
    assert!(e.contains("model.layers"), "{e}");
    text = built_in("lan-5")
        .unwrap()
        .replace("seed = 1", "seed = 1\nsped = 2");
    let e = Scenario::parse(&text).unwrap_err().to_string();
    assert!(e.contains("sped"), "{e}");
    text = built_in("lan-5")
        .unwrap()
        .replace("rtt_ms = [[0.5]]", "rtt_ms = [[0.5, 1.0]]");
    let e = Scenario::parse(&text).unwrap_err().to_string();
    assert!(e.contains("square"), "{e}");
}

#[test]
fn the_same_seed_gives_the_same_report_byte_for_byte() {
    let a = run(scenario("lan-5"), 7).to_json();
    let b = run(scenario("lan-5"), 7).to_json();
    assert_eq!(a, b);
    let c = run(scenario("lan-5"), 8).to_json();
    assert_ne!(a, c, "another seed is another run");
    let r: serde_json::Value = serde_json::from_str(&a).unwrap();
    assert!(r["totals"]["tokens"].as_f64().unwrap() > 0.0, "{a}");
}

#[test]
fn a_home_lan_serves_its_sessions() {
    let r = run(scenario("lan-5"), 1);
    let t = &r.totals.served;
    assert!(t.started > 20, "{}", r.to_json());
    assert!(t.completed >= t.started * 8 / 10, "{}", r.to_json());
    assert_eq!(r.per_minute.len(), 30);
    assert!(r.per_minute.iter().all(|m| m.online <= 5));
}

#[test]
fn when_thirty_percent_leave_in_a_minute_no_session_fails() {
    let r = run(scenario("mass-departure"), 1);
    let before = &r.per_minute[8];
    let after = &r.per_minute[15];
    assert!(
        after.online * 10 <= before.online * 8,
        "the departure took peers: {} then {}",
        before.online,
        after.online
    );
    assert!(
        r.totals.served.recovered > 0,
        "sessions failed over: {}",
        r.to_json()
    );
    assert_eq!(r.totals.served.failed, 0, "{}", r.to_json());
    assert!(r.stalls.count > 0 && r.stalls.max < 60.0, "{:?}", r.stalls);
}

#[test]
fn every_cheater_that_cheats_is_quarantined_and_no_honest_peer_is() {
    let r = run(scenario("cheaters"), 1);
    let c = &r.cheating;
    assert!(c.cheaters > 20, "{c:?}");
    assert!(c.served > 0 && c.cheated > 20, "{c:?}");
    assert_eq!(c.cheated_uncaught, 0, "{}", r.to_json());
    assert_eq!(c.false_quarantines, 0, "{}", r.to_json());
    // Batch units beside the sessions: each validated right, the cheaters' wrong answers
    // outvoted, no right one.
    let b = r.batch.as_ref().expect("the scenario has batch jobs");
    assert!(b.units >= 5000, "{b:?}");
    assert_eq!(b.validated + b.open, b.units, "{b:?}");
    assert_eq!((b.validated_wrong, b.unresolvable), (0, 0), "{b:?}");
    assert!(b.outvoted > 0 && b.outvoted_right == 0, "{b:?}");
    assert!(r.per_minute.iter().map(|m| m.units_validated).sum::<u64>() == b.validated);
}

#[test]
fn a_colluding_sybil_wave_from_one_network_is_caught_without_condemning_honest_peers() {
    let r = run(scenario("sybil-wave"), 1);
    let c = &r.cheating;
    assert_eq!(c.cheaters, 1000, "{c:?}");
    assert!(c.served > 100, "the wave got work: {c:?}");
    assert!(c.uncaught * 100 <= c.served, "{c:?}");
    assert_eq!(c.false_quarantines, 0, "{}", r.to_json());
    // A thousand keys agreeing on wrong batch answers are one voice: never a quorum.
    let b = r.batch.as_ref().expect("the scenario has batch jobs");
    assert!(b.validated >= 5000, "{b:?}");
    assert_eq!((b.validated_wrong, b.outvoted_right), (0, 0), "{b:?}");
    assert!(
        b.outvoted > 0,
        "the wave's wrong answers were outvoted: {b:?}"
    );
}

#[test]
fn a_heavy_tail_that_draws_centuries_is_clamped_not_a_crash() {
    // Peers go off within a minute and draw how long they stay off from a tail that
    // reaches past any clock.
    let text = built_in("lan-5")
        .unwrap()
        .replace(
            r#"on_hours = { kind = "weibull", shape = 1.5, scale = 6.0 }"#,
            r#"on_hours = { kind = "fixed", value = 0.01 }"#,
        )
        .replace(
            r#"off_hours = { kind = "exponential", mean = 0.5 }"#,
            r#"off_hours = { kind = "log-normal", mu = 20.0, sigma = 40.0 }"#,
        );
    assert!(
        text.contains("mu = 20.0") && text.contains("value = 0.01"),
        "{text}"
    );
    let r = run(Scenario::parse(&text).expect("a scenario"), 1);
    assert_eq!(r.per_minute.len(), 30);
}

#[test]
fn a_crash_mid_session_moves_its_blocks_whole_and_replays_every_step() {
    let out = simulate(scenario("failover-3"), None);
    let r = &out.report;
    assert_eq!(r.totals.served.recovered, 1, "{}", r.to_json());
    assert_eq!(r.totals.served.failed, 0, "{}", r.to_json());
    let line = out
        .log
        .iter()
        .find(|l| l.contains("session 0 failed over: "))
        .unwrap_or_else(|| panic!("no failover in {:#?}", out.log));
    // The dead hop's blocks whole to one other copy; the prompt's step, then the 79 tokens
    // before the one whose step failed.
    assert!(
        line.contains("blocks 0..30 from ")
            && line.contains(" 0..30 (hops 0..=0, 79 steps replayed)"),
        "{line}"
    );
    // The connection's close (50 ms), the prompt's prefill (150 positions over 30 blocks of
    // 5.36 MB at 200 GFLOP/s: 0.48 s) and 79 steps (30 blocks at 8.2 GB/s: 19.6 ms each).
    assert_eq!(r.stalls.count, 1, "{:?}", r.stalls);
    assert!((1.95..=2.2).contains(&r.stalls.max), "{:?}", r.stalls);
}
