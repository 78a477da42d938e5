//! A test bed of hosts on one Ethernet segment, each host a network namespace of its own
//! with the address the test gives it, joined by a bridge in the test's own namespace (which
//! is a host too, at [`HUB`]), for tests that need the test's own namespace on the network;
//! hosts with delays, loss and home routers are the bed's (`super::bed`). Made with `ip`
//! (root, as CI runs), deleted on drop with every route it added; nothing leaves the
//! machine.

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
        "ip {}: {} (the network tests make namespaces, and the NAT tests' routers use \
         nftables' nft: run them as root with both installed)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `ip -n ns ARGS`: `ip` inside namespace `ns`.
fn ip_in(ns: &str, args: &[&str]) {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all);
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

    /// A new namespace of the bed (removed on drop), and its index.
    fn namespace(&mut self) -> (String, usize) {
        let n = self.hosts.len();
        let ns = format!("{}h{n}", self.tag);
        // What a killed earlier run of this process id may have left.
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        (ns, n)
    }

    /// A new host at `addr` (IPv4): every other address on the segment is one hop away.
    pub fn host(&mut self, addr: &str) -> Host {
        let (ns, n) = self.namespace();
        let (outer, inner) = (format!("{}v{n}", self.tag), format!("{}i{n}", self.tag));
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns,
        ]);
        ip(&["link", "set", &outer, "master", &self.bridge, "up"]);
        let inside = |args: &[&str]| ip_in(&ns, args);
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

/// Whether this machine can make the beds' namespaces (root) and NAT routers (nftables).
pub fn nat_works() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    root && Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Starts a coordinator listening on the segment at [`HUB`] (besides its API on loopback)
/// with `extra` flags; returns it, the address nodes on the segment dial, and its API.
pub fn segment_coordinator(dir: &std::path::Path, extra: &[&str]) -> (super::Proc, String, String) {
    let listen = format!("/ip4/{HUB}/tcp/0");
    let mut args = vec!["--listen", listen.as_str()];
    args.extend_from_slice(extra);
    let (mut coord, _, api) = super::coordinator(dir, &args);
    let addr = coord
        .wait_for(
            std::time::Instant::now() + std::time::Duration::from_secs(30),
            |l| l.starts_with(&format!("listening /ip4/{HUB}/tcp/")),
        )
        .expect("coordinator listening on the test segment")
        .trim_start_matches("listening ")
        .to_string();
    (coord, addr, api)
}

/// Whether the bed's tests can run here: [`nat_works`], and `curl` to reach APIs inside
/// hosts ([`Host::curl`]). When not, says what is missing (the test then returns, skipped).
pub fn ready() -> bool {
    if !nat_works() {
        super::missing(
            "network namespaces and nftables (root, ip, nft)",
            "run the tests as root with iproute2 and nftables installed",
        );
        return false;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        super::missing("curl", "apt-get install curl");
        return false;
    }
    true
}

/// Starts a node of `pool` that offers a relay on the segment, in `host` (none: the test's
/// own namespace, at [`HUB`]), with no model to serve: a volunteer with a public address
/// (and a peer of the DHT). Returns it and the address it is dialled at.
pub fn relay_node(dir: &std::path::Path, host: Option<&Host>, pool: &str) -> (super::Proc, String) {
    let ip = host.map_or(HUB, |h| h.ip.as_str());
    let empty = dir.join(format!("no-models-{ip}"));
    std::fs::create_dir_all(&empty).expect("make an empty model cache");
    let data = dir.join(format!("relay-{ip}"));
    let listen = format!("/ip4/{ip}/tcp/0");
    let mut cmd = match host {
        Some(h) => h.potluck(),
        None => Command::new(env!("CARGO_BIN_EXE_potluck")),
    };
    cmd.env("POTLUCK_MODELS_DIR", &empty).args([
        "node",
        "--data-dir",
        data.to_str().expect("utf-8 temp path"),
        "--pool",
        pool,
        "--listen",
        &listen,
        "--no-mdns",
        "--relay",
        "on",
        "--threads",
        "1",
    ]);
    let (mut relay, _) = super::start_node(cmd);
    let addr = relay
        .wait_for(
            std::time::Instant::now() + std::time::Duration::from_secs(30),
            |l| l.starts_with(&format!("listening /ip4/{ip}/tcp/")),
        )
        .expect("relay listening")
        .trim_start_matches("listening ")
        .to_string();
    (relay, addr)
}

impl Host {
    /// Runs `curl` inside the host against `host:port/path` (its own loopback reaches
    /// what listens there); returns the JSON answer.
    pub fn curl(&self, url: &str, body: Option<&serde_json::Value>) -> serde_json::Value {
        let url = format!("http://{url}");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns,
            "curl",
            "-sS",
            "--max-time",
            "120",
        ]);
        if let Some(b) = body {
            cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
        }
        let out = cmd.arg(&url).output().expect("run curl");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{url}: {e}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Starts a coordinator inside the host, keeping its state in `data`, listening on the
    /// host's address over TCP with its API on the host's loopback, canaries off, and
    /// `extra` flags; returns it and its API (for [`Host::curl`]).
    pub fn coordinator(&self, data: &std::path::Path, extra: &[&str]) -> (super::Proc, String) {
        let listen = format!("/ip4/{}/tcp/0", self.ip);
        let mut cmd = self.potluck();
        cmd.args([
            "coordinator",
            "--data-dir",
            data.to_str().expect("utf-8 temp path"),
            "--listen",
            &listen,
            "--no-mdns",
            "--http",
            "127.0.0.1:0",
            "--canary-interval",
            "0",
        ]);
        cmd.args(extra);
        let mut coord = super::Proc::spawn(cmd);
        let api = coord
            .wait_for(
                std::time::Instant::now() + std::time::Duration::from_secs(60),
                |l| l.starts_with("api listening on http://"),
            )
            .expect("coordinator API")
            .trim_start_matches("api listening on http://")
            .to_string();
        (coord, api)
    }

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
