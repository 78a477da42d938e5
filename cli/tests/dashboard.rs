//! The dashboard in a real browser: headless Chromium loads `/` from a running 3-node pool;
//! once its script has polled `/api/pool`, the page lists every peer as serving and draws
//! the layer map. A screenshot is kept as a test artifact.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Runs headless Chromium on `url` with `args`, long enough for a few polls.
fn browse(browser: &str, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--window-size=1280,800",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium")
}

#[test]
fn the_dashboard_shows_a_running_three_node_pool_in_chromium() {
    let Some(browser) = chromium() else {
        common::missing("chromium", "apt-get install chromium (.ci/run does)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, http) = common::coordinator(dir.path(), &[]);
    let nodes: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| common::node(dir.path(), n, "public", &addr, &["--max-memory", "130M"]))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (_, id) in &nodes {
        let line = format!("peer {id} serves blocks ");
        assert!(
            coord.wait_for(deadline, |l| l.starts_with(&line)).is_some(),
            "{id} never served: {:?}",
            coord.seen
        );
    }
    let url = format!("http://{http}/");
    let out = browse(browser, &url, &["--dump-dom"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    for (_, id) in &nodes {
        assert!(
            dom.contains(&format!("data-peer=\"{id}\"")),
            "{id} not listed: {dom}"
        );
    }
    // Peers go by names people can read, in the table, the layer map and the events; no
    // event line carries a whole id.
    for (_, id) in &nodes {
        let name = potluck_coordinator::nickname::of(id);
        assert!(
            dom.matches(&name).count() >= 2,
            "{name} ({id}) not named: {dom}"
        );
    }
    let events = dom
        .split("id=\"events\"")
        .nth(1)
        .and_then(|rest| rest.split("</ul>").next())
        .unwrap_or_default();
    assert!(
        !events.contains("12D3KooW"),
        "an event names a peer by its id: {events}"
    );
    // The chart of the last minutes has its first points.
    assert!(dom.contains("class=\"tps\" points=\"0.0,"), "{dom}");
    assert!(dom.contains("class=\"sessions\" points=\"0.0,"), "{dom}");
    assert_eq!(dom.matches("class=\"status-serving\"").count(), 3, "{dom}");
    assert_eq!(dom.matches("class=\"cell\"").count(), 3, "{dom}");
    assert!(dom.contains("smollm2-135m-instruct (30 layers)"), "{dom}");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = browse(
        browser,
        &url,
        &[&format!("--screenshot={}", shot.display())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("dashboard screenshot: {}", shot.display());
}
