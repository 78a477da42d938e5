//! Finding a pool by its id. A node given only its pool's id and a peer of the wider DHT
//! (a relay volunteer of another pool, which knows nothing of this one's adverts) finds the
//! pool's coordinator through Kademlia, where the coordinator announced itself as a provider
//! of the pool's key; when the coordinator restarts on another host of the bed (its
//! identity carried over), the node finds it there again. Greedy text through the pool
//! equals `potluck generate` both times. The hosts are the test bed's (`common::bed`), 20 ms
//! apart.

mod common;

use common::bed::{one_at_a_time, Bed};
use common::netns::Host;
use serde_json::json;
use std::time::{Duration, Instant};

/// Starts the pool's coordinator in `host`, keeping its identity in `data`, announcing the
/// pool through the DHT peer at `dht`; returns it and its API inside the host.
fn coordinator_in(host: &Host, data: &std::path::Path, dht: &str) -> (common::Proc, String) {
    host.coordinator(data, &["--pool", "city", "--bootstrap", dht])
}

#[test]
fn a_node_finds_its_pool_by_id_and_again_after_the_coordinator_moves() {
    if !common::netns::ready() {
        return;
    }
    let prompt = "The capital of France is";
    let (want, _) = common::local_generate(prompt, false, 12);
    let _turn = one_at_a_time();
    let bed = Bed::up(4, &[], &["--rtt", "20ms"]);
    let dir = tempfile::tempdir().unwrap();
    let dht_host = bed.host(1);
    let (_dht, dht) = common::netns::relay_node(dir.path(), Some(&dht_host), "elsewhere");
    let first = bed.host(2);
    let data = dir.path().join("coordinator");
    let (mut coord, api) = coordinator_in(&first, &data, &dht);

    // The node knows the pool's id and the DHT peer, nothing of the coordinator.
    let home = bed.host(4);
    let listen = format!("/ip4/{}/tcp/0", home.ip);
    let mut cmd = home.potluck();
    cmd.args(common::node_args(
        dir.path(),
        "n",
        "city",
        &dht,
        &["--listen", &listen],
    ));
    let (mut node, id) = common::start_node(cmd);
    let serves = format!("peer {id} serves blocks 0..30");
    let found = |node: &mut common::Proc| {
        node.wait_for(Instant::now() + Duration::from_secs(60), |l| {
            l.starts_with("found the pool's coordinator") && l.contains("in the DHT")
        })
        .is_some()
    };
    assert!(found(&mut node), "never found: {:?}", node.seen);
    assert!(
        coord
            .wait_for(Instant::now() + Duration::from_secs(90), |l| l
                .starts_with(&serves))
            .is_some(),
        "never served: {:?} {:?}",
        coord.seen,
        node.seen
    );
    let body = json!({"prompt": prompt, "temperature": 0, "max_tokens": 12});
    let v = first.curl(&format!("{api}/v1/completions"), Some(&body));
    assert_eq!(v["choices"][0]["text"].as_str(), Some(want.as_str()), "{v}");

    // The coordinator moves to another machine with its identity; the node's only way to
    // it is the DHT again.
    coord.kill();
    let second = bed.host(3);
    let (mut coord, api) = coordinator_in(&second, &data, &dht);
    assert!(
        coord
            .wait_for(Instant::now() + Duration::from_secs(90), |l| l
                .starts_with(&serves))
            .is_some(),
        "never served after the move: {:?} {:?}",
        coord.seen,
        node.seen
    );
    let v = second.curl(&format!("{api}/v1/completions"), Some(&body));
    assert_eq!(v["choices"][0]["text"].as_str(), Some(want.as_str()), "{v}");
}
