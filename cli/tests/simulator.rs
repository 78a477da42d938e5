//! The simulator against the real thing it models: its spot checks in a busy simulated pool
//! catch cheaters as soon, by jobs served, as `potluck bench --detection` says the policy
//! alone does (the same `Trust` the coordinator runs, with no pool around it).

mod common;

use common::potluck_ok;

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
