//! Volunteers behind home routers. A node in a LAN behind a NAT router (one that maps
//! endpoint-independently, one symmetric) dials out to a coordinator on the public side,
//! joins and serves the model over that one connection, which arrives from the router's
//! address; greedy text through it equals `potluck generate`. Two homes meet through a relay
//! and hole-punch where their routers allow it. The homes are those of the test bed
//! (`deploy/netns/up.sh --home`, see `common::bed`), whose links all have a round trip.

mod common;

use common::bed::{one_at_a_time, Bed, Mapping};
use common::netns::Host;
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

/// The round trip between any two hosts of the bed in these tests.
const RTT: &str = "20ms";

/// The established TCP connections `ss` lists in `host`'s namespace, as (local, peer)
/// address pairs.
fn connections(host: &Host) -> Vec<(String, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &host.ns, "ss"])
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
    if !common::netns::ready() {
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    let _turn = one_at_a_time();
    let mappings = [Mapping::EndpointIndependent, Mapping::Symmetric];
    let bed = Bed::up(1, &mappings, &["--rtt", RTT]);
    let public_host = bed.host(1);
    for (k, mapping) in (1..).zip(mappings) {
        let dir = tempfile::tempdir().unwrap();
        let (home, public) = (bed.home(k), bed.home_router(k).ip);
        let (mut coord, addr, api) = bed.coordinator(dir.path(), false);
        let mut cmd = home.potluck();
        let node_listen = format!("/ip4/{}/tcp/0", home.ip);
        cmd.args(common::node_args(
            dir.path(),
            &format!("n{k}"),
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
        let seen = connections(&public_host);
        let from_home = seen
            .iter()
            .filter(|(local, peer)| local.starts_with(&public_host.ip) && peer.starts_with(&public))
            .count();
        assert!(from_home > 0, "no connection from {public}: {seen:?}");
        assert!(
            !seen.iter().any(|(_, peer)| peer.starts_with(&home.ip)),
            "a LAN address reached the public side: {seen:?}"
        );
        if mapping == Mapping::EndpointIndependent {
            // The router kept the node's own port: what makes hole punching work later.
            let inside: Vec<String> = connections(&home)
                .into_iter()
                .filter(|(_, peer)| peer.starts_with(&public_host.ip))
                .map(|(local, _)| port(&local).to_string())
                .collect();
            let outside: Vec<String> = seen
                .iter()
                .filter(|(_, peer)| peer.starts_with(&public))
                .map(|(_, peer)| port(peer).to_string())
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
            let pool = public_host.curl(&format!("{api}/api/pool"), None);
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
        let v = public_host.curl(&format!("{api}/v1/completions"), Some(&body));
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
        Some(Mapping::Cone) => "cone",
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
    /// When the pool first showed it off the relay.
    direct: Option<Duration>,
}

/// A coordinator at `coord` and a node at `node` meet through a relay volunteer on the
/// public side of a bed with `rtt`: the coordinator (its own relay off) listens through the
/// relay, and the node bootstraps from that circuit address. Once the node serves, greedy
/// text through the pool must equal `want` (for `prompt`).
fn meet(coord: Place, node: Place, rtt: &str, prompt: &str, want: &str) -> Met {
    let homes: Vec<Mapping> = [coord, node].into_iter().flatten().collect();
    let publics = [coord, node].iter().filter(|p| p.is_none()).count();
    // Host 1 is the relay's; the public places take the next hosts, the others the homes.
    let bed = Bed::up(1 + publics, &homes, &["--rtt", rtt]);
    let dir = tempfile::tempdir().unwrap();
    let (_relay, relay_addr) = common::netns::relay_node(dir.path(), Some(&bed.host(1)), "public");
    let (mut hosts, mut homes) = (2.., 1..);
    let mut place = |p: Place| match p {
        None => bed.host(hosts.next().unwrap_or_default()),
        Some(_) => bed.home(homes.next().unwrap_or_default()),
    };
    let home_a = place(coord);
    let home_b = place(node);
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
    // A hole punch, when one works, comes within a few seconds of the relayed connection;
    // a plain dial after a failed one, after the punch's 10 s upgrade timeout.
    let punch_line = format!("hole punched to {id}");
    let deadline = started + Duration::from_secs(25);
    let (mut punched, mut direct) = (None, None);
    // Notes when the coordinator said it punched, if it does within `wait`.
    let saw_punch = |coord: &mut common::Proc, punched: &mut Option<Duration>, wait: Duration| {
        if punched.is_none()
            && coord
                .wait_for(Instant::now() + wait, |l| l.starts_with(&punch_line))
                .is_some()
        {
            *punched = Some(started.elapsed());
        }
    };
    let row = loop {
        saw_punch(&mut coordinator, &mut punched, Duration::from_millis(200));
        let row = home_a.curl(&format!("{api}/api/pool"), None)["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["id"] == id.as_str()).cloned())
            .unwrap_or_default();
        if row["relayed"] == false {
            direct = Some(started.elapsed());
            // The line of the punch that made it direct comes with it.
            saw_punch(&mut coordinator, &mut punched, Duration::from_secs(1));
            break row;
        }
        if Instant::now() > deadline {
            break row;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
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
        direct,
    }
}

/// Two homes: the coordinator behind one router, a node behind another, a relay on the
/// public side between them. The coordinator listens through the relay, the node dials it
/// through the circuit, and DCUtR punches a direct connection where the routers allow it:
/// both endpoint-independent, or a cone facing a symmetric router (the cone lets in the
/// symmetric side's new port once it sent to that address; with the symmetric side as the
/// relay's listener, only its plain dial after the failed punch gets through). Between a
/// port-restricted router
/// and a symmetric one nothing can punch (the symmetric side's port is new to every peer,
/// and only the port sent to may answer), so the pool runs over the relay. Either way the
/// node serves and greedy text equals `potluck generate`.
#[test]
fn two_homes_meet_through_a_relay_and_hole_punch_where_they_can() {
    if !common::netns::ready() {
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    let _turn = one_at_a_time();
    use Mapping::{Cone, EndpointIndependent, Symmetric};
    for (coord, node, relayed) in [
        (EndpointIndependent, EndpointIndependent, false),
        (EndpointIndependent, Symmetric, true),
        (Cone, Symmetric, false),
        (Symmetric, Cone, false),
    ] {
        let met = meet(Some(coord), Some(node), RTT, prompt, &want);
        let pair = format!("{coord:?} to {node:?}");
        assert_eq!(met.relayed, relayed, "{pair}");
        if relayed {
            assert_eq!(met.reachability, "relayed", "{pair}");
            assert!(met.punched.is_none(), "{pair}");
        } else if coord == EndpointIndependent {
            assert_eq!(met.reachability, "hole-punched", "{pair}");
            assert!(met.punched.is_some(), "{pair}");
        }
    }
}

/// The NAT matrix, a bench run by hand (`cargo test -p potluck --test nat nat_matrix --
/// --ignored --nocapture`): every pair of places, how they connected and how fast. Each pair
/// must connect (directly or relayed) and serve exact text. `NAT_PAIR=cone:symmetric` (the
/// coordinator's place, then the node's) runs one pair.
#[test]
#[ignore]
fn nat_matrix() {
    if !common::netns::ready() {
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    let _turn = one_at_a_time();
    let places = [
        None,
        Some(Mapping::EndpointIndependent),
        Some(Mapping::Cone),
        Some(Mapping::Symmetric),
    ];
    println!(
        "{:<22} {:<22} {:<8} {:<14} {:>9} {:>9} {:>9}",
        "coordinator", "node", "path", "reachability", "joined_s", "direct_s", "punched_s"
    );
    let only = std::env::var("NAT_PAIR").unwrap_or_default();
    for coord in places {
        for node in places {
            if !only.is_empty() && only != format!("{}:{}", place_name(coord), place_name(node)) {
                continue;
            }
            let met = meet(coord, node, RTT, prompt, &want);
            let secs = |d: Option<Duration>| {
                d.map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64()))
            };
            println!(
                "{:<22} {:<22} {:<8} {:<14} {:>9.2} {:>9} {:>9}",
                place_name(coord),
                place_name(node),
                if met.relayed { "relayed" } else { "direct" },
                met.reachability,
                met.joined.as_secs_f64(),
                secs(met.direct),
                secs(met.punched)
            );
        }
    }
}
