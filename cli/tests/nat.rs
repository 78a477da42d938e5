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
