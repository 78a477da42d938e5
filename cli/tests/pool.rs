//! Real `potluck` processes on 127.0.0.1: nodes find a coordinator by its bootstrap address,
//! their signed adverts land in its peer table, pools stay apart, and a node that stops is
//! dropped once dialling it again fails.

mod common;

use common::node;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn nodes_join_by_bootstrap_pools_stay_apart_and_silent_nodes_expire() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, addr, _) = common::coordinator(dir.path(), &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut a, id_a) = node(dir.path(), "a", "public", &addr, &[]);
    let (_b, id_b) = node(dir.path(), "b", "public", &addr, &[]);
    let (_other, id_other) = node(dir.path(), "other", "elsewhere", &addr, &[]);
    for id in [&id_a, &id_b] {
        let joined = coord.wait_for(deadline, |l| l.starts_with(&format!("peer joined {id} ")));
        assert!(
            joined.is_some(),
            "{id} never joined; coordinator said {:?}",
            coord.seen
        );
    }
    let line = coord
        .wait_for(deadline, |l| l.starts_with(&format!("peer joined {id_a} ")))
        .unwrap();
    assert!(
        line.contains("device Cpu") && line.contains("threads 1"),
        "{line}"
    );
    // A node of another pool shares the swarm but never the pool's topic.
    let soon = Instant::now() + Duration::from_secs(3);
    assert!(
        coord
            .wait_for(soon, |l| l.starts_with(&format!("peer joined {id_other}")))
            .is_none(),
        "{:?}",
        coord.seen
    );
    // Node a stops: the coordinator routes around it at once, dials it again for a while
    // and then drops it, not b.
    let _ = a.child.kill();
    let left = coord.wait_for(Instant::now() + Duration::from_secs(30), |l| {
        l.starts_with(&format!("peer gone {id_a}"))
    });
    assert!(
        left.is_some(),
        "{id_a} was never dropped; coordinator said {:?}",
        coord.seen
    );
    assert!(!coord
        .seen
        .iter()
        .any(|l| l.starts_with(&format!("peer gone {id_b}"))
            || l.starts_with(&format!("peer unreachable {id_b}"))));
}

#[test]
fn a_node_refuses_an_identity_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    std::fs::create_dir_all(&data).unwrap();
    let key = data.join("identity.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_potluck"))
            .args([
                "node",
                "--data-dir",
                &data.to_string_lossy(),
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("error: ") && err.contains("chmod 600"),
            "{err}"
        );
    }
}
