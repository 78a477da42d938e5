//! The multi-host test bed of `deploy/netns/up.sh`, for tests: hosts in namespaces behind a
//! router that holds each link for half the round trip and drops the share of packets it was
//! told to, and home LANs behind NAT routers of either [`Mapping`]. Taken down on drop.

use super::netns::Host;
use super::Proc;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// `potluck-netbed`, which holds the bed's links.
pub const NETBED: &str = env!("CARGO_BIN_EXE_potluck-netbed");

/// How a home router maps its LAN's connections to its one public address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Endpoint-independent: a LAN host's port keeps its public port whoever it talks to
    /// (Linux masquerade keeps the source port when it is free), as most home routers do;
    /// only the address and port a LAN connection went to may answer it (port-restricted).
    EndpointIndependent,
    /// The same mapping, and any port of an address the LAN sent to may reach the LAN port
    /// (an address-restricted cone).
    Cone,
    /// Symmetric: every connection gets a random public port (`masquerade fully-random`),
    /// as carrier-grade NATs and some corporate firewalls do.
    Symmetric,
}

impl Mapping {
    /// What `up.sh --home` calls it.
    fn flag(self) -> &'static str {
        match self {
            Mapping::EndpointIndependent => "ei",
            Mapping::Cone => "cone",
            Mapping::Symmetric => "symmetric",
        }
    }
}

/// The tests of a binary share one bed's name (its prefix is the process id's), so they
/// take turns: each holds this while its beds are up.
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock().unwrap_or_else(|p| p.into_inner())
}

/// A script of `deploy/netns/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/netns/{name}"))
}

/// A bed brought up by `up.sh` under a prefix of this process's own; down on drop.
pub struct Bed {
    /// Its namespaces' prefix.
    pub prefix: String,
    /// Processes to stop before it comes down.
    pub procs: Vec<Proc>,
    hosts: usize,
}

impl Bed {
    /// `hosts` hosts on the public side and a home LAN behind each of `homes`' routers,
    /// with `up.sh`'s other flags `args` (`--rtt 40ms`, `--loss 1%`). A bed of the same
    /// process already up is rebuilt (hold [`one_at_a_time`] around a test's beds).
    pub fn up(hosts: usize, homes: &[Mapping], args: &[&str]) -> Bed {
        let prefix = format!("nb{}", std::process::id() % 100_000);
        let mut cmd = Command::new(script("up.sh"));
        cmd.args(["--prefix", &prefix, "--hosts", &hosts.to_string()]);
        for home in homes {
            cmd.args(["--home", home.flag()]);
        }
        let out = cmd
            .args(args)
            .env("POTLUCK_NETBED", NETBED)
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
            hosts,
        }
    }

    /// Host `i` (from 1) of the public side, at 203.0.113.(10+i).
    pub fn host(&self, i: usize) -> Host {
        Host {
            ns: format!("{}{i}", self.prefix),
            ip: format!("203.0.113.{}", 10 + i),
        }
    }

    /// The host in home `k` (from 1), at 198.51.100.2 in its own LAN.
    pub fn home(&self, k: usize) -> Host {
        Host {
            ns: format!("{}h{k}", self.prefix),
            ip: "198.51.100.2".to_string(),
        }
    }

    /// Home `k`'s router, on the public side at the home's one public address.
    pub fn home_router(&self, k: usize) -> Host {
        self.host(self.hosts + k)
    }

    /// Cuts host `i`'s link at the router (every packet to or from it dropped), or mends it.
    pub fn cut(&self, i: usize, cut: bool) {
        let ip = self.host(i).ip;
        self.filter(
            &format!("cut{i}"),
            cut.then(|| format!("ip saddr {ip} drop\n ip daddr {ip} drop")),
        );
    }

    /// Puts the router's nftables table `name` in place with `rules` in its forward chain,
    /// or deletes it (`None`).
    pub fn filter(&self, name: &str, rules: Option<String>) {
        let router = format!("{}r", self.prefix);
        let rules = match rules {
            Some(rules) => format!(
                "table ip {name} {{\n chain f {{\n type filter hook forward priority -10;\n \
                 {rules}\n }}\n}}\n"
            ),
            None => format!("delete table ip {name}\n"),
        };
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &router, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run nft");
        use std::io::Write;
        nft.stdin
            .take()
            .expect("nft's stdin")
            .write_all(rules.as_bytes())
            .expect("write the rules");
        let out = nft.wait_with_output().expect("nft ran");
        assert!(
            out.status.success(),
            "nft {rules}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a coordinator in host 1 (its API on the host's loopback), listening on TCP and,
    /// with `quic`, on QUIC too; returns it, the TCP address nodes dial and the API.
    pub fn coordinator(&self, dir: &std::path::Path, quic: bool) -> (Proc, String, String) {
        let host = self.host(1);
        let deadline = Instant::now() + Duration::from_secs(60);
        let quic_at = format!("/ip4/{}/udp/0/quic-v1", host.ip);
        let extra = if quic {
            vec!["--listen", quic_at.as_str()]
        } else {
            vec![]
        };
        let (mut coord, api) = host.coordinator(&dir.join("coordinator"), &extra);
        let addr = coord
            .wait_for(deadline, |l| {
                l.starts_with(&format!("listening /ip4/{}/tcp/", host.ip))
            })
            .expect("coordinator listening")
            .trim_start_matches("listening ")
            .to_string();
        (coord, addr, api)
    }

    /// Starts a node in host `i` joining through `addr`; returns it and its peer id.
    pub fn node(
        &self,
        dir: &std::path::Path,
        i: usize,
        addr: &str,
        extra: &[&str],
    ) -> (Proc, String) {
        let host = self.host(i);
        let listen = format!("/ip4/{}/tcp/0", host.ip);
        let mut args = vec!["--listen", listen.as_str()];
        args.extend_from_slice(extra);
        let mut cmd = host.potluck();
        cmd.args(super::node_args(
            dir,
            &format!("n{i}"),
            "public",
            addr,
            &args,
        ));
        super::start_node(cmd)
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
