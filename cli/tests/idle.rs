//! An idle-only node, a real process: it serves while its machine is idle, pauses within
//! seconds when other processes load the machine's CPUs, and resumes once they stop.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn an_idle_only_node_pauses_under_load_and_resumes_after() {
    let dir = tempfile::tempdir().unwrap();
    let (mut coord, mut node, _http) = common::small_pool_with_node(
        dir.path(),
        &["--embedding-model", "none"],
        &[
            "--idle-only",
            "--idle-threshold",
            "0.5",
            "--idle-resume-after",
            "2",
        ],
    );

    // Load every CPU from this process (another process, as the node sees it).
    let stop = Arc::new(AtomicBool::new(false));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let burners: Vec<_> = (0..cores)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let paused = node.wait_for(Instant::now() + Duration::from_secs(30), |l| {
        l.starts_with("paused: its machine is busy")
    });
    stop.store(true, Ordering::Relaxed);
    for b in burners {
        b.join().unwrap();
    }
    assert!(paused.is_some(), "the node never paused: {:#?}", node.seen);
    common::expect_line(
        &mut coord,
        "the pause",
        &["peer leaving ", "its machine is busy"],
        10,
    );
    common::expect_line(&mut node, "the resumption", &["resumed"], 30);
    common::expect_line(&mut coord, "the node's return", &["peer back "], 20);
}
