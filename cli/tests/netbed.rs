//! The multi-host test bed (`deploy/netns/up.sh`): hosts in namespaces behind a router
//! whose links `potluck-netbed delay` holds (this kernel has no `netem`). A TCP handshake
//! between two hosts takes at least the round trip the bed was brought up with, and goes
//! straight through at 0; taking the bed down leaves nothing behind.

mod common;

use common::Proc;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_potluck-netbed");

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/netns/{name}"))
}

/// A bed brought up by `up.sh` under a prefix of this process's own; down on drop.
struct Bed {
    prefix: String,
    procs: Vec<Proc>,
}

impl Bed {
    fn up(args: &[&str]) -> Bed {
        let prefix = format!("nb{}", std::process::id() % 100_000);
        let out = Command::new(script("up.sh"))
            .args(["--prefix", &prefix])
            .args(args)
            .env("POTLUCK_NETBED", BIN)
            .output()
            .expect("run deploy/netns/up.sh");
        assert!(
            out.status.success(),
            "up.sh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Bed {
            prefix,
            procs: Vec::new(),
        }
    }

    /// Runs `potluck-netbed` in host `i` (from 1).
    fn on(&self, i: usize, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}{i}", self.prefix), BIN]);
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

impl Drop for Bed {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = Command::new(script("down.sh"))
            .args(["--prefix", &self.prefix])
            .output();
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
            *rest == "r" || (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
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
    let delayed = Bed::up(&["--hosts", "2", "--rtt", "40ms"]).rtt();
    let first = Bed::up(&["--hosts", "3", "--rtt", "0ms"]);
    // Brought up again over itself: rebuilt, not added to.
    let mut bed = Bed::up(&["--hosts", "2", "--rtt", "0ms", "--loss", "0.1%"]);
    let prefix = bed.prefix.clone();
    assert_eq!(namespaces_of(&prefix), 3, "a router and two hosts");
    let straight = bed.rtt();
    drop(bed);
    drop(first);
    assert_eq!(namespaces_of(&prefix), 0, "down.sh left namespaces behind");
    println!("handshake at --rtt 40ms: {delayed:.1} ms; at 0 ms: {straight:.1} ms");
    // A handshake crosses each link once each way: it cannot beat the round trip.
    assert!(delayed >= 40.0, "{delayed} ms at --rtt 40ms");
    assert!(delayed >= straight + 35.0, "{delayed} vs {straight}");
}
