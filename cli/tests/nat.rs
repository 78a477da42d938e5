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

/// Two homes: the coordinator behind one router, a node behind another, a relay on the
/// public segment between them. The coordinator listens through the relay, the node dials it
/// through the circuit, and DCUtR punches a direct connection where the routers allow it
/// (both endpoint-independent); behind a symmetric router the pool runs over the relay.
/// Either way the node serves and greedy text equals `potluck generate`.
#[test]
fn two_homes_meet_through_a_relay_and_hole_punch_where_they_can() {
    if !nat_works() {
        common::missing(
            "network namespaces and nftables (root, ip, nft)",
            "run the tests as root with iproute2 and nftables installed",
        );
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        common::missing("curl", "apt-get install curl");
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    for (i, node_mapping) in [Mapping::EndpointIndependent, Mapping::Symmetric]
        .into_iter()
        .enumerate()
    {
        let mut net = TestNet::new();
        let dir = tempfile::tempdir().unwrap();
        let (relay, relay_addr) = common::netns::relay_node(dir.path(), None, "public");

        let home_a = net.behind_nat("203.0.113.20", Mapping::EndpointIndependent);
        let home_b = net.behind_nat("203.0.113.30", node_mapping);
        let coord_data = dir.path().join("coordinator");
        let coord_listen = format!("/ip4/{}/tcp/0", home_a.ip);
        let coord_quic = format!("/ip4/{}/udp/0/quic-v1", home_a.ip);
        let mut cmd = home_a.potluck();
        cmd.args([
            "coordinator",
            "--data-dir",
            coord_data.to_str().unwrap(),
            "--listen",
            &coord_listen,
            "--listen",
            &coord_quic,
            "--no-mdns",
            "--http",
            "127.0.0.1:0",
            "--relay",
            "off",
            "--canary-interval",
            "0",
            "--bootstrap",
            &relay_addr,
        ]);
        let mut coord = common::Proc::spawn(cmd);
        let deadline = Instant::now() + Duration::from_secs(60);
        let api = coord
            .wait_for(deadline, |l| l.starts_with("api listening on http://"))
            .expect("coordinator API")
            .trim_start_matches("api listening on http://")
            .to_string();
        let circuit = coord
            .wait_for(deadline, |l| {
                l.starts_with("listening ") && l.contains("/p2p-circuit")
            })
            .unwrap_or_else(|| panic!("no circuit through the relay: {:?}", coord.seen))
            .trim_start_matches("listening ")
            .to_string();

        let node_listen = format!("/ip4/{}/tcp/0", home_b.ip);
        let node_quic = format!("/ip4/{}/udp/0/quic-v1", home_b.ip);
        let mut cmd = home_b.potluck();
        cmd.args(common::node_args(
            dir.path(),
            &format!("n{i}"),
            "public",
            &circuit,
            &["--listen", &node_listen, "--listen", &node_quic],
        ));
        let (_node, id) = common::start_node(cmd);
        let line = format!("peer {id} serves blocks 0..30");
        assert!(
            coord
                .wait_for(Instant::now() + Duration::from_secs(90), |l| l
                    .starts_with(&line))
                .is_some(),
            "the node behind a {node_mapping:?} NAT never served: {:?}",
            coord.seen
        );
        let expect = match node_mapping {
            Mapping::EndpointIndependent => "hole-punched",
            Mapping::Symmetric => "relayed",
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let row = loop {
            let pool = home_a.curl(&format!("{api}/api/pool"), None);
            let row = pool["peers"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["id"] == id.as_str()).cloned())
                .unwrap_or_default();
            if row["reachability"] == expect || Instant::now() > deadline {
                break row;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(
            row["reachability"], expect,
            "{node_mapping:?}: {row} {:?}",
            coord.seen
        );
        assert_eq!(row["relayed"], expect == "relayed", "{row}");
        let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 12});
        let v = home_a.curl(&format!("{api}/v1/completions"), Some(&body));
        assert_eq!(
            v["choices"][0]["text"].as_str(),
            Some(want.as_str()),
            "{node_mapping:?}: {v}"
        );
        drop(relay);
    }
}
