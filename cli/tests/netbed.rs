//! The multi-host test bed (`deploy/netns/up.sh`): hosts in namespaces behind a router
//! whose links `potluck-netbed delay` holds (this kernel has no `netem`). A TCP handshake
//! between two hosts takes at least the round trip the bed was brought up with, and goes
//! straight through at 0; taking the bed down leaves nothing behind. On it, real `potluck`
//! processes: a pipeline of three hosts at 40 ms and 1% loss generates exactly what one
//! process does (two of them moved to QUIC, one whose UDP is blocked left on TCP), and a
//! node whose link is cut mid-request fails over without the client seeing an error, then
//! rejoins when its link comes back. The NAT tests (`nat.rs`) use the bed's home LANs.

mod common;

use common::bed::{one_at_a_time, Bed, Mapping, NETBED};
use common::Proc;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

impl Bed {
    /// Runs `potluck-netbed` in host `i` (from 1).
    fn on(&self, i: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}{i}", self.prefix), NETBED]);
        cmd.args(args);
        cmd
    }

    /// The median TCP handshake from host 1 to host 2, ms.
    fn rtt(&mut self) -> f64 {
        let at = "203.0.113.12:7999";
        let mut listener = Proc::spawn(self.on(2, &["listen", "--at", at]));
        listener
            .wait_for(Instant::now() + Duration::from_secs(10), |l| {
                l.starts_with("listening ")
            })
            .expect("listener up");
        self.procs.push(listener);
        let out = self
            .on(1, &["rtt", "--to", at, "--count", "9"])
            .output()
            .expect("run the probe");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.trim()
            .strip_prefix("rtt_ms ")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no rtt in {text:?}"))
    }
}

fn namespaces_of(prefix: &str) -> usize {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix(prefix))
        .filter(|rest| {
            let index = rest.strip_prefix('h').unwrap_or(rest);
            *rest == "r" || (!index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
        })
        .count()
}

#[test]
fn the_bed_gives_every_round_trip_its_delay_and_comes_down_clean() {
    if !common::netns::nat_works() {
        common::missing(
            "network namespaces and nftables (root, ip, nft)",
            "run the tests as root with iproute2 and nftables installed",
        );
        return;
    }
    let _turn = one_at_a_time();
    let delayed = Bed::up(2, &[], &["--rtt", "40ms"]).rtt();
    let first = Bed::up(3, &[Mapping::EndpointIndependent], &["--rtt", "0ms"]);
    // Brought up again over itself: rebuilt, not added to.
    let mut bed = Bed::up(
        2,
        &[Mapping::Symmetric],
        &["--rtt", "0ms", "--loss", "0.1%"],
    );
    let prefix = bed.prefix.clone();
    assert_eq!(
        namespaces_of(&prefix),
        5,
        "a router, two hosts, a home's router and the host behind it"
    );
    let straight = bed.rtt();
    drop(bed);
    drop(first);
    assert_eq!(namespaces_of(&prefix), 0, "down.sh left namespaces behind");
    println!("handshake at --rtt 40ms: {delayed:.1} ms; at 0 ms: {straight:.1} ms");
    // A handshake crosses each link once each way: it cannot beat the round trip.
    assert!(delayed >= 40.0, "{delayed} ms at --rtt 40ms");
    assert!(delayed >= straight + 35.0, "{delayed} vs {straight}");
}

/// The peers `coord` printed as serving, until `n` distinct ones have: (peer, start, end).
fn spans(coord: &mut Proc, n: usize) -> Vec<(String, u32, u32)> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let parse = |l: &str| -> Option<(String, u32, u32)> {
        let rest = l.strip_prefix("peer ")?;
        let (peer, rest) = rest.split_once(" serves blocks ")?;
        let (a, b) = rest.split_whitespace().next()?.split_once("..")?;
        Some((peer.to_string(), a.parse().ok()?, b.parse().ok()?))
    };
    let mut out: Vec<(String, u32, u32)> = Vec::new();
    while out.len() < n {
        let line = coord.wait_for(deadline, |l| {
            parse(l).is_some_and(|(p, _, _)| !out.iter().any(|(q, _, _)| *q == p))
        });
        let line = line.unwrap_or_else(|| panic!("only {} spans: {:?}", out.len(), coord.seen));
        out.extend(parse(&line));
    }
    out.sort_by_key(|s| s.1);
    out
}

#[test]
fn a_three_host_pipeline_at_40ms_and_1pct_loss_generates_exactly() {
    if !common::netns::ready() {
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 16);
    let _turn = one_at_a_time();
    let bed = Bed::up(4, &[], &["--rtt", "40ms", "--loss", "1%"]);
    // Host 4's UDP is dropped at the router: its QUIC dial fails and it stays on TCP.
    let blocked = bed.host(4).ip;
    bed.filter(
        "noudp",
        Some(format!(
            "ip saddr {blocked} meta l4proto udp drop\n ip daddr {blocked} meta l4proto udp drop"
        )),
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, api) = bed.coordinator(dir.path(), true);
    // Each node may hold about 12 of the 30 blocks, so the plan needs all three.
    let nodes: Vec<_> = (2..=4)
        .map(|i| bed.node(dir.path(), i, &addr, &["--max-memory", "130M"]))
        .collect();
    let spans = spans(&mut coord, 3);
    assert_eq!((spans[0].1, spans[2].2), (0, 30), "{spans:?}");
    assert!(spans.windows(2).all(|w| w[0].2 == w[1].1), "{spans:?}");
    // Each node dialled the coordinator's TCP address; those whose UDP gets through move to
    // the QUIC address it listens on too.
    let want_transport = |id: &str| {
        if *id == nodes[2].1 {
            "tcp"
        } else {
            "quic"
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pool = bed.host(1).curl(&format!("{api}/api/pool"), None);
        let transports: Vec<(String, String)> = pool["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let field = |k: &str| p[k].as_str().unwrap_or_default().to_string();
                (field("id"), field("transport"))
            })
            .collect();
        if transports.len() == 3 && transports.iter().all(|(id, t)| t == want_transport(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "transports {transports:?}, want QUIC but for {}",
            nodes[2].1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 16});
    let v = bed
        .host(1)
        .curl(&format!("{api}/v1/completions"), Some(&body));
    assert_eq!(v["choices"][0]["text"].as_str(), Some(want.as_str()), "{v}");
}

#[test]
fn a_node_cut_off_mid_request_fails_over_and_rejoins_when_its_link_comes_back() {
    if !common::netns::ready() {
        return;
    }
    let prompt = "1, 2, 3, 4,";
    let tokens = 48;
    let (want, _) = common::local_generate(prompt, false, tokens);
    let _turn = one_at_a_time();
    let bed = Bed::up(3, &[], &["--rtt", "20ms"]);
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, api) = bed.coordinator(dir.path(), false);
    // Two nodes, each holding the whole model: either can carry a session alone.
    let (_a, a) = bed.node(dir.path(), 2, &addr, &[]);
    let (_b, b) = bed.node(dir.path(), 3, &addr, &[]);
    let both = spans(&mut coord, 2);
    assert!(both.iter().all(|s| (s.1, s.2) == (0, 30)), "{both:?}");
    // Each warmed up: the first request of a node is its slowest.
    let warm = json!({"prompt": "Hi", "temperature": 0, "max_tokens": 2});
    for _ in 0..2 {
        bed.host(1)
            .curl(&format!("{api}/v1/completions"), Some(&warm));
    }
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": tokens});
    let client = {
        let (host, api) = (bed.host(1), api.clone());
        std::thread::spawn(move || host.curl(&format!("{api}/v1/completions"), Some(&body)))
    };
    // The session's chain, once it shows on the dashboard.
    let deadline = Instant::now() + Duration::from_secs(30);
    let serving = loop {
        let pool = bed.host(1).curl(&format!("{api}/api/pool"), None);
        let chain = pool["sessions"][0]["chain"][0]["peer"]
            .as_str()
            .map(str::to_string);
        if let Some(peer) = chain {
            break peer;
        }
        assert!(Instant::now() < deadline, "no session showed: {pool}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let cut = if serving == a { 2 } else { 3 };
    assert!(
        serving == a || serving == b,
        "{serving} is neither {a} nor {b}"
    );
    bed.cut(cut, true);
    let v = client.join().expect("client thread");
    assert_eq!(
        v["choices"][0]["text"].as_str(),
        Some(want.as_str()),
        "the cut node's session did not fail over cleanly: {v}"
    );
    assert!(
        coord
            .wait_for(Instant::now() + Duration::from_secs(5), |l| l
                .contains("failed over"))
            .is_some(),
        "no failover logged: {:?}",
        coord.seen
    );
    bed.cut(cut, false);
    // Back on the network, it is heard again and serves.
    let rejoined = format!("peer {serving} serves blocks 0..30");
    let seen_before = coord
        .seen
        .iter()
        .filter(|l| l.starts_with(&rejoined))
        .count();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pool = bed.host(1).curl(&format!("{api}/api/pool"), None);
        let status = pool["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == serving.as_str()))
            .map(|p| p["status"].clone());
        if status.as_ref().is_some_and(|s| s == "serving") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never rejoined ({status:?}, {seen_before} serving lines before): {:?}",
            coord.seen
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
