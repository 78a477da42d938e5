//! A test bed of hosts on one Ethernet segment, each host a network namespace of its own
//! with the address the test gives it, joined by a bridge in the test's own namespace (which
//! is a host too, at [`HUB`]). Made with `ip` (root, as CI runs), deleted on drop with every
//! route it added; nothing leaves the machine.

use std::process::Command;
use std::sync::{Mutex, MutexGuard};

/// The address of the test's own namespace on the segment: a coordinator started by the
/// test with `--listen /ip4/192.0.2.1/tcp/0` is reachable from every host at it.
pub const HUB: &str = "192.0.2.1";

/// One test bed at a time per test binary (they share [`HUB`]).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (the network tests make namespaces: run them as root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// The segment and its hosts; removed on drop.
pub struct TestNet {
    tag: String,
    bridge: String,
    hosts: Vec<String>,
    _turn: MutexGuard<'static, ()>,
}

/// A host on the segment: its namespace and address.
pub struct Host {
    /// The namespace's name.
    pub ns: String,
    /// Its address.
    pub ip: String,
}

impl TestNet {
    /// A new segment with only the test's namespace on it.
    pub fn new() -> Self {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let tag = format!("pl{}", std::process::id() % 100_000);
        let bridge = format!("{tag}br");
        // What a killed earlier run of this process id may have left.
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let net = Self {
            tag,
            bridge,
            hosts: Vec::new(),
            _turn: turn,
        };
        ip(&["addr", "add", &format!("{HUB}/24"), "dev", &net.bridge]);
        ip(&["link", "set", &net.bridge, "up"]);
        net
    }

    /// A new host at `addr` (IPv4): every other address on the segment is one hop away.
    pub fn host(&mut self, addr: &str) -> Host {
        let n = self.hosts.len();
        let ns = format!("{}h{n}", self.tag);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        let (outer, inner) = (format!("{}v{n}", self.tag), format!("{}i{n}", self.tag));
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns,
        ]);
        ip(&["link", "set", &outer, "master", &self.bridge, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", ns.as_str()];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["link", "set", "lo", "up"]);
        inside(&["addr", "add", &format!("{addr}/32"), "dev", &inner]);
        inside(&["link", "set", &inner, "up"]);
        inside(&["route", "add", "default", "dev", &inner]);
        ip(&["route", "add", &format!("{addr}/32"), "dev", &self.bridge]);
        Host {
            ns,
            ip: addr.to_string(),
        }
    }
}

impl Host {
    /// `potluck` to be run inside the host.
    pub fn potluck(&self) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, env!("CARGO_BIN_EXE_potluck")]);
        cmd
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        // Its routes go with it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}
