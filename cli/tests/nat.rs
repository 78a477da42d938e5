//! Volunteers behind home routers. A node in a LAN behind a NAT router (one that maps
//! endpoint-independently, one symmetric) dials out to a coordinator on the public segment,
//! joins and serves the model over that one connection, which arrives from the router's
//! address; greedy text through it equals `potluck generate`. The routers are namespaces of
//! the test bed masquerading with nftables (see `common::netns`).

mod common;

use common::netns::{nat_works, Host, Mapping, TestNet, HUB};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

/// The established TCP connections `ss` lists in `host`'s namespace (`None`: the test's
/// own), as (local, peer) address pairs.
fn connections(host: Option<&Host>) -> Vec<(String, String)> {
    let mut cmd = match host {
        Some(h) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &h.ns, "ss"]);
            c
        }
        None => Command::new("ss"),
    };
    let out = cmd
        .args(["-Htn", "state", "established"])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(2);
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

fn port(addr: &str) -> &str {
    addr.rsplit(':').next().unwrap_or("")
}

#[test]
fn a_node_behind_each_kind_of_nat_joins_and_serves_exactly() {
    if !nat_works() {
        common::missing(
            "network namespaces and nftables (root, ip, nft)",
            "run the tests as root with iproute2 and nftables installed",
        );
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    let mut net = TestNet::new();
    for (i, (public, mapping)) in [
        ("203.0.113.20", Mapping::EndpointIndependent),
        ("203.0.113.30", Mapping::Symmetric),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().unwrap();
        let home = net.behind_nat(public, mapping);
        let (mut coord, addr, api) =
            common::netns::segment_coordinator(dir.path(), &["--canary-interval", "0"]);
        let mut cmd = home.potluck();
        let node_listen = format!("/ip4/{}/tcp/0", home.ip);
        cmd.args(common::node_args(
            dir.path(),
            &format!("n{i}"),
            "public",
            &addr,
            &["--listen", &node_listen],
        ));
        let (_node, id) = common::start_node(cmd);
        let line = format!("peer {id} serves blocks 0..30");
        assert!(
            coord
                .wait_for(Instant::now() + Duration::from_secs(90), |l| l
                    .starts_with(&line))
                .is_some(),
            "the node behind a {mapping:?} NAT never served: {:?}",
            coord.seen
        );
        // Its connection reaches the coordinator from the router, never from the LAN.
        let from_home = connections(None)
            .into_iter()
            .filter(|(local, peer)| local.starts_with(HUB) && peer.starts_with(public))
            .count();
        assert!(
            from_home > 0,
            "no connection from {public}: {:?}",
            connections(None)
        );
        assert!(
            !connections(None)
                .iter()
                .any(|(_, peer)| peer.starts_with(&home.ip)),
            "a LAN address reached the segment"
        );
        if mapping == Mapping::EndpointIndependent {
            // The router kept the node's own port: what makes hole punching work later.
            let inside: Vec<String> = connections(Some(&home))
                .into_iter()
                .filter(|(_, peer)| peer.starts_with(HUB))
                .map(|(local, _)| port(&local).to_string())
                .collect();
            let outside: Vec<String> = connections(None)
                .into_iter()
                .filter(|(_, peer)| peer.starts_with(public))
                .map(|(_, peer)| port(&peer).to_string())
                .collect();
            assert!(
                inside.iter().any(|p| outside.contains(p)),
                "ports inside {inside:?}, seen outside {outside:?}"
            );
        }
        // The coordinator's relay holds a circuit for it, and its AutoNAT dial-back (to the
        // router's mapped address) fails, so the pool shows it behind a NAT.
        let deadline = Instant::now() + Duration::from_secs(30);
        let row = loop {
            let (_, pool) = common::get_json(&api, "/api/pool");
            let row = pool["peers"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["id"] == id.as_str()).cloned())
                .unwrap_or_default();
            if row["reachability"] == "behind-nat" || Instant::now() > deadline {
                break row;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(row["reachability"], "behind-nat", "{mapping:?}: {row}");
        assert_eq!(row["relay_reservation"], true, "{mapping:?}: {row}");
        assert_eq!(row["relayed"], false, "its own connection is direct: {row}");
        let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 12});
        let (status, v) = common::post_json(&api, "/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"].as_str(),
            Some(want.as_str()),
            "{mapping:?}: {v}"
        );
    }
}

/// Where a peer of the matrix sits: on the public segment, or behind a router mapping so.
type Place = Option<Mapping>;

fn place_name(p: Place) -> &'static str {
    match p {
        None => "public",
        Some(Mapping::EndpointIndependent) => "endpoint-independent",
        Some(Mapping::Symmetric) => "symmetric",
    }
}

/// What one meeting gave: the node's reachability as the coordinator shows it, and how long
/// after the node started it joined and (when it did) was hole-punched.
struct Met {
    reachability: String,
    relayed: bool,
    joined: Duration,
    punched: Option<Duration>,
}

/// A coordinator at `coord` and a node at `node` meet through a relay volunteer on the
/// public segment: the coordinator (its own relay off) listens through the relay, and the
/// node bootstraps from that circuit address. Once the node serves, greedy text through the
/// pool must equal `want` (for `prompt`).
fn meet(coord: Place, node: Place, prompt: &str, want: &str) -> Met {
    let mut net = TestNet::new();
    let dir = tempfile::tempdir().unwrap();
    let (_relay, relay_addr) = common::netns::relay_node(dir.path(), None, "public");
    let mut place = |p: Place, public: &str| match p {
        None => net.host(public),
        Some(m) => net.behind_nat(public, m),
    };
    let home_a = place(coord, "203.0.113.20");
    let home_b = place(node, "203.0.113.30");
    let coord_quic = format!("/ip4/{}/udp/0/quic-v1", home_a.ip);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut coordinator, api) = home_a.coordinator(
        &dir.path().join("coordinator"),
        &[
            "--listen",
            &coord_quic,
            "--relay",
            "off",
            "--bootstrap",
            &relay_addr,
        ],
    );
    let circuit = coordinator
        .wait_for(deadline, |l| {
            l.starts_with("listening ") && l.contains("/p2p-circuit")
        })
        .unwrap_or_else(|| panic!("no circuit through the relay: {:?}", coordinator.seen))
        .trim_start_matches("listening ")
        .to_string();

    let node_listen = format!("/ip4/{}/tcp/0", home_b.ip);
    let node_quic = format!("/ip4/{}/udp/0/quic-v1", home_b.ip);
    let mut cmd = home_b.potluck();
    cmd.args(common::node_args(
        dir.path(),
        "n",
        "public",
        &circuit,
        &["--listen", &node_listen, "--listen", &node_quic],
    ));
    let started = Instant::now();
    let (_node, id) = common::start_node(cmd);
    let joined = coordinator
        .wait_for(started + Duration::from_secs(60), |l| {
            l.starts_with(&format!("peer joined {id}"))
        })
        .map(|_| started.elapsed())
        .unwrap_or_else(|| panic!("{} never joined: {:?}", place_name(node), coordinator.seen));
    let serves = format!("peer {id} serves blocks 0..30");
    assert!(
        coordinator
            .wait_for(Instant::now() + Duration::from_secs(90), |l| l
                .starts_with(&serves))
            .is_some(),
        "the node never served: {:?}",
        coordinator.seen
    );
    // A hole punch, when one works, comes within a few seconds of the relayed connection.
    let punched = coordinator
        .wait_for(started + Duration::from_secs(15), |l| {
            l.starts_with(&format!("hole punched to {id}"))
        })
        .map(|_| started.elapsed());
    let row = home_a.curl(&format!("{api}/api/pool"), None)["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["id"] == id.as_str()).cloned())
        .unwrap_or_default();
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 12});
    let v = home_a.curl(&format!("{api}/v1/completions"), Some(&body));
    assert_eq!(
        v["choices"][0]["text"].as_str(),
        Some(want),
        "{} to {}: {v}",
        place_name(coord),
        place_name(node)
    );
    Met {
        reachability: row["reachability"].as_str().unwrap_or("none").to_string(),
        relayed: row["relayed"] == true,
        joined,
        punched,
    }
}

/// Two homes: the coordinator behind one router, a node behind another, a relay on the
/// public segment between them. The coordinator listens through the relay, the node dials it
/// through the circuit, and DCUtR punches a direct connection where the routers allow it
/// (both endpoint-independent); behind a symmetric router the pool runs over the relay.
/// Either way the node serves and greedy text equals `potluck generate`.
#[test]
fn two_homes_meet_through_a_relay_and_hole_punch_where_they_can() {
    if !common::netns::ready() {
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    for (node, expect) in [
        (Mapping::EndpointIndependent, "hole-punched"),
        (Mapping::Symmetric, "relayed"),
    ] {
        let met = meet(
            Some(Mapping::EndpointIndependent),
            Some(node),
            prompt,
            &want,
        );
        assert_eq!(met.reachability, expect, "{node:?}");
        assert_eq!(met.relayed, expect == "relayed", "{node:?}");
        assert_eq!(met.punched.is_some(), expect == "hole-punched", "{node:?}");
    }
}

/// The NAT matrix, a bench run by hand (`cargo test -p potluck --test nat nat_matrix --
/// --ignored --nocapture`): every pair of places, how they connected and how fast. Each pair
/// must connect (directly or relayed) and serve exact text.
#[test]
#[ignore]
fn nat_matrix() {
    if !common::netns::ready() {
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    let places = [
        None,
        Some(Mapping::EndpointIndependent),
        Some(Mapping::Symmetric),
    ];
    println!(
        "{:<22} {:<22} {:<8} {:<14} {:>9} {:>9}",
        "coordinator", "node", "path", "reachability", "joined_s", "punched_s"
    );
    for coord in places {
        for node in places {
            let met = meet(coord, node, prompt, &want);
            println!(
                "{:<22} {:<22} {:<8} {:<14} {:>9.2} {:>9}",
                place_name(coord),
                place_name(node),
                if met.relayed { "relayed" } else { "direct" },
                met.reachability,
                met.joined.as_secs_f64(),
                met.punched
                    .map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64()))
            );
        }
    }
}
