//! `potluck sim`: runs a scenario of `sim/scenarios/` (by name, or a TOML file) on the
//! simulator and writes what it found.

use anyhow::{Context, Result};
use clap::Args;
use potluck_sim::scenarios::{built_in, BUILT_IN};
use potluck_sim::{html, simulate, Scenario};
use std::path::{Path, PathBuf};

/// `potluck sim` arguments.
#[derive(Args)]
pub struct SimArgs {
    /// A built-in scenario's name (lan-5, city-500, internet-10k, mass-departure,
    /// sybil-wave, cheaters, detection, failover-3), `all` for every one, or a scenario
    /// file (TOML).
    pub scenario: String,
    /// Seed (default: the scenario's own).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Folder for report.json, report.html, timing.json and log.txt (one folder per
    /// scenario inside it with `all`).
    #[arg(long, default_value = "sim-out")]
    pub out: PathBuf,
}

/// Runs `args`' scenario (or every built-in one) and prints a summary of each.
pub fn run(args: &SimArgs) -> Result<()> {
    if args.scenario == "all" {
        for (name, text) in BUILT_IN {
            one(name, text, args.seed, &args.out.join(name))?;
        }
        return Ok(());
    }
    let (name, text) = match built_in(&args.scenario) {
        Some(text) => (args.scenario.clone(), text.to_string()),
        None => {
            let path = Path::new(&args.scenario);
            let text = std::fs::read_to_string(path).with_context(|| {
                let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
                format!(
                    "no built-in scenario {:?} ({}) and no such file",
                    args.scenario,
                    names.join(", ")
                )
            })?;
            (path.display().to_string(), text)
        }
    };
    one(&name, &text, args.seed, &args.out)
}

fn one(name: &str, text: &str, seed: Option<u64>, out: &Path) -> Result<()> {
    let scenario = Scenario::parse(text).with_context(|| format!("scenario {name}"))?;
    let started = std::time::Instant::now();
    let outcome = simulate(scenario, seed);
    let wall = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let r = &outcome.report;
    let write = |file: &str, body: &str| {
        let path = out.join(file);
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))
    };
    write("report.json", &r.to_json())?;
    write("report.html", &html::page(r, &outcome.cost))?;
    let timing = serde_json::json!({ "wall_s": wall, "decisions": outcome.cost });
    write("timing.json", &serde_json::to_string_pretty(&timing)?)?;
    write("log.txt", &(outcome.log.join("\n") + "\n"))?;
    let t = &r.totals.served;
    let c = &r.cheating;
    println!(
        "{}: {} machines, {} virtual minutes in {wall:.1} s: {} sessions ({} failed, {} failovers), {:.0} tok/s, p50 {:.0} ms p99 {:.0} ms, {} plan epochs, stalls p50 {:.1} s p99 {:.1} s, cheaters quarantined {}/{} ({} served, {} of them uncaught; honest quarantined {}), credit Gini {:.2} -> {}",
        r.scenario,
        r.machines,
        r.minutes,
        t.started,
        t.failed,
        t.recovered,
        t.tok_s,
        t.p50_ms,
        t.p99_ms,
        t.replans,
        r.stalls.p50,
        r.stalls.p99,
        c.quarantined,
        c.cheaters,
        c.served,
        c.uncaught,
        c.false_quarantines,
        r.totals.credit_gini,
        out.join("report.html").display()
    );
    Ok(())
}
