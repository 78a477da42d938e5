//! LAN discovery: a node with no bootstrap address finds the coordinator by mDNS and gets its
//! layers. mDNS ignores loopback, so the test makes its own network namespace with a veth pair
//! (`unshare`), where the multicast stays; a pid namespace takes both processes down with it.

mod common;

use common::Proc;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether this host lets an unprivileged test make network namespaces.
fn namespaces_work() -> bool {
    Command::new("unshare")
        .args([
            "-rn", "ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_node_finds_the_coordinator_by_mdns_with_no_flags() {
    if !namespaces_work() {
        common::missing(
            "network namespaces (unshare -rn, veth)",
            "run the tests as root with iproute2's ip",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_potluck");
    let (c, n) = (dir.path().join("c"), dir.path().join("n"));
    let script = format!(
        "ip link add v0 type veth peer name v1 && \
         ip addr add 10.77.0.1/24 dev v0 && ip addr add 10.77.0.2/24 dev v1 && \
         ip link set v0 up && ip link set v1 up && ip link set lo up && \
         {{ '{bin}' node --data-dir '{}' --advert-interval 1 --threads 1 & }} && \
         '{bin}' coordinator --data-dir '{}' --http 127.0.0.1:0",
        n.display(),
        c.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-rnpf", "--kill-child", "sh", "-c", &script]);
    let mut pool = Proc::spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(60);
    let node_id = pool
        .wait_for(deadline, |l| l.starts_with("peer id "))
        .expect("no peer id printed");
    let joined = pool.wait_for(deadline, |l| l.starts_with("peer joined "));
    assert!(joined.is_some(), "nobody joined: {:?}", pool.seen);
    let serves = pool.wait_for(deadline, |l| l.contains(" serves blocks 0..30"));
    assert!(serves.is_some(), "no span loaded: {:?}", pool.seen);
    assert!(
        pool.seen.iter().any(|l| l.contains("found on the LAN")),
        "not found by mDNS: {:?} (first id {node_id})",
        pool.seen
    );
}
