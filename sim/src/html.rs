//! The report as one self-contained page: inline SVG plots, no scripts, nothing fetched.

use crate::report::{Report, Spread};
use crate::stats::Cost;
use std::collections::BTreeMap;
use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 200.0;
const PAD: f64 = 40.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart of `series` (name, one value per minute).
fn lines(title: &str, unit: &str, series: &[(&str, Vec<f64>)]) -> String {
    let n = series.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|x| x.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let x = |i: usize| PAD + (W - 2.0 * PAD) * i as f64 / (n.max(2) - 1) as f64;
    let y = |v: f64| H - PAD / 2.0 - (H - PAD) * (v / top);
    let mut svg = format!(
        "<h3>{}</h3><svg width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        esc(title),
        esc(title)
    );
    let _ = write!(
        svg,
        "<line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#999\"/>\
         <text x=\"2\" y=\"{t}\" font-size=\"11\">{top:.1} {u}</text>\
         <text x=\"2\" y=\"{b}\" font-size=\"11\">0</text>\
         <text x=\"{r}\" y=\"{H}\" font-size=\"11\" text-anchor=\"end\">minute {last}</text>",
        b = H - PAD / 2.0,
        r = W - PAD,
        t = PAD / 2.0 + 4.0,
        u = esc(unit),
        last = n.saturating_sub(1)
    );
    for (k, (name, v)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let points: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(i, val)| format!("{:.1},{:.1}", x(i), y(val.max(0.0))))
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <text x=\"{lx}\" y=\"{ly}\" font-size=\"11\" fill=\"{colour}\">{}</text>",
            points.join(" "),
            esc(name),
            lx = PAD + 110.0 + 110.0 * k as f64,
            ly = PAD / 2.0 + 4.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Bars of a spread's histogram.
fn bars(title: &str, s: &Spread, u: &str) -> String {
    let top = s.histogram.iter().copied().max().unwrap_or(0).max(1) as f64;
    let n = s.histogram.len().max(1) as f64;
    let bw = (W - 2.0 * PAD) / n;
    if s.count == 0 {
        return format!("<h3>{}</h3><p>none</p>", esc(title));
    }
    let mut svg = format!(
        "<h3>{}</h3><p>{} in all; median {:.2} {u}, p90 {:.2}, p99 {:.2}, max {:.2}</p>\
         <svg width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        esc(title),
        s.count,
        s.p50,
        s.p90,
        s.p99,
        s.max,
        esc(title)
    );
    for (i, c) in s.histogram.iter().enumerate() {
        let h = (H - PAD) * *c as f64 / top;
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{:.0}-{:.0} {u}: {c}</title></rect>",
            PAD + bw * i as f64,
            H - PAD / 2.0 - h,
            (bw - 1.0).max(1.0),
            COLOURS[0],
            s.bucket * i as f64,
            s.bucket * (i + 1) as f64,
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{PAD}\" y=\"{H}\" font-size=\"11\">0</text>\
         <text x=\"{r}\" y=\"{H}\" font-size=\"11\" text-anchor=\"end\">{:.0}+ {u}</text></svg>",
        s.bucket * (n - 1.0),
        r = W - PAD,
    );
    svg
}

fn table<'a>(rows: impl IntoIterator<Item = (String, String)> + 'a) -> String {
    let mut t = String::from("<table>");
    for (k, v) in rows {
        let _ = write!(t, "<tr><th>{}</th><td>{}</td></tr>", esc(&k), esc(&v));
    }
    t.push_str("</table>");
    t
}

/// The page for `r`, with the core's wall time per decision (`cost`, which varies between
/// runs) in its last section.
pub fn page(r: &Report, cost: &BTreeMap<&'static str, Cost>) -> String {
    let col = |f: fn(&crate::stats::Minute) -> f64| r.per_minute.iter().map(f).collect();
    let t = &r.totals.served;
    let c = &r.cheating;
    let mut out = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>potluck sim: {name}</title>\
         <style>body{{font-family:sans-serif;max-width:700px;margin:2em auto}}\
         th{{text-align:left;padding-right:1em;font-weight:normal;color:#555}}</style></head><body>\
         <h1>potluck sim: {name}</h1><p>{desc}</p>",
        name = esc(&r.scenario),
        desc = esc(&r.description)
    );
    out.push_str(&table([
        ("seed".into(), r.seed.to_string()),
        ("virtual minutes".into(), r.minutes.to_string()),
        ("machines".into(), r.machines.to_string()),
        ("sessions started".into(), t.started.to_string()),
        ("completed".into(), t.completed.to_string()),
        ("failed".into(), t.failed.to_string()),
        ("failovers recovered".into(), t.recovered.to_string()),
        ("tokens per second".into(), format!("{:.1}", t.tok_s)),
        (
            "token latency p50 / p99".into(),
            format!("{:.1} / {:.1} ms", t.p50_ms, t.p99_ms),
        ),
        ("plan epochs".into(), t.replans.to_string()),
        ("credit Gini".into(), format!("{:.3}", r.totals.credit_gini)),
        (
            "cheaters served / caught / uncaught".into(),
            format!("{} / {} / {}", c.served, c.quarantined, c.uncaught),
        ),
        (
            "cheaters that gave a wrong answer / of them uncaught".into(),
            format!("{} / {}", c.cheated, c.cheated_uncaught),
        ),
        (
            "honest peers quarantined".into(),
            c.false_quarantines.to_string(),
        ),
    ]));
    out.push_str(&lines(
        "Served tokens per second",
        "tok/s",
        &[("tok/s", col(|m| m.served.tok_s))],
    ));
    out.push_str(&lines(
        "Peers",
        "peers",
        &[
            ("online", col(|m| m.online as f64)),
            ("active", col(|m| m.active_peers as f64)),
            ("serving", col(|m| m.serving_peers as f64)),
        ],
    ));
    out.push_str(&lines(
        "Token latency",
        "ms",
        &[
            ("p50", col(|m| m.served.p50_ms)),
            ("p99", col(|m| m.served.p99_ms)),
        ],
    ));
    out.push_str(&lines(
        "Sessions per minute",
        "sessions",
        &[
            ("started", col(|m| m.served.started as f64)),
            ("failed", col(|m| m.served.failed as f64)),
            ("recovered", col(|m| m.served.recovered as f64)),
        ],
    ));
    out.push_str(&lines(
        "Re-plans per minute",
        "epochs",
        &[("re-plans", col(|m| m.served.replans as f64))],
    ));
    out.push_str(&bars("Failover stalls", &r.stalls, "s"));
    out.push_str(&bars(
        "Time to quarantine a cheater",
        &c.time_to_quarantine,
        "s",
    ));
    if let Some(b) = &r.batch {
        out.push_str("<h3>Batch work</h3>");
        out.push_str(&table([
            ("jobs / units".into(), format!("{} / {}", b.jobs, b.units)),
            (
                "validated / of them wrong".into(),
                format!("{} / {}", b.validated, b.validated_wrong),
            ),
            (
                "unresolvable / open at the end".into(),
                format!("{} / {}", b.unresolvable, b.open),
            ),
            (
                "assignments / lost to departures".into(),
                format!("{} / {}", b.assignments, b.lost),
            ),
            (
                "results outvoted / of them right".into(),
                format!("{} / {}", b.outvoted, b.outvoted_right),
            ),
        ]));
        out.push_str(&lines(
            "Work units validated per minute",
            "units",
            &[("validated", col(|m| m.units_validated as f64))],
        ));
        out.push_str(&bars(
            "Time from a job's submission to a unit's validation",
            &b.latency,
            "s",
        ));
    }
    out.push_str("<h3>Checks</h3>");
    out.push_str(&table(
        r.checks.iter().map(|(k, v)| (k.clone(), v.to_string())),
    ));
    out.push_str(
        "<h3>The core's time per decision</h3><p>Wall time on the machine that ran this, so \
         it differs between runs (the rest of this page does not).</p>",
    );
    out.push_str(&table(cost.iter().map(|(k, c)| {
        (
            k.to_string(),
            format!(
                "{} calls, mean {:.1} µs, max {:.0} µs",
                c.calls,
                c.mean_us(),
                c.max_us
            ),
        )
    })));
    out.push_str("</body></html>\n");
    out
}
