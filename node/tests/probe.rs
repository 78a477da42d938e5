//! The capacity probe measures something and honours the owner's limits.

use potluck_node::probe::{probe, Limits};

#[test]
fn the_probe_measures_and_honours_limits() {
    let c = probe(&Limits {
        max_memory: Some(1 << 30),
        threads: Some(1),
    });
    assert_eq!(c.threads, 1);
    assert!(c.memory_bytes <= 1 << 30 && c.memory_bytes > 0);
    assert!(c.gflops > 0.0 && c.mem_gbps > 0.0, "{c:?}");
}
