//! Flags every daemon of a pool shares: its data folder, pool, listen addresses and mDNS;
//! the coordinator's default port; sizes as people write them.

use anyhow::Result;
use clap::Args;
use potluck_coordinator::config::CoordinatorConfig;
use potluck_net::gate::PoolMembership;
use potluck_net::swarm::RelayLimits;
use std::path::PathBuf;

/// Flags shared by both daemons.
#[derive(Args, Clone)]
pub struct PoolArgs {
    /// Identity, caches and state live here (one per process on a machine).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The pool to join: a public pool's name, or a private pool's name or id (its folder
    /// here, or a certificate from `potluck pool join`).
    #[arg(long, default_value = "public")]
    pub pool: String,
    /// A private pool's folder (its key and pool.json), when not the default one for --pool;
    /// a daemon holding it admits itself and watches it for revocations.
    #[arg(long)]
    pub pool_dir: Option<PathBuf>,
    /// Listen address (repeatable); default: all interfaces, TCP and QUIC, on port 7470 for
    /// a coordinator (any port if it is taken) and any port for a node.
    #[arg(long)]
    pub listen: Vec<libp2p::Multiaddr>,
    /// Turn off LAN discovery by mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Serve a circuit relay to the pool's peers behind NATs, `on` or `off` (default: on
    /// for a coordinator, off for a node; a node with a public address may offer one).
    #[arg(long, value_parser = ["on", "off"])]
    pub relay: Option<String>,
    /// Circuits the relay carries at once.
    #[arg(long, default_value_t = RelayLimits::default().circuits)]
    pub relay_circuits: usize,
    /// MiB one relayed circuit may carry each way.
    #[arg(long, default_value_t = RelayLimits::default().circuit_bytes >> 20)]
    pub relay_circuit_mib: u64,
    /// Minutes one relayed circuit may stay open.
    #[arg(long, default_value_t = RelayLimits::default().circuit_duration.as_secs() / 60)]
    pub relay_circuit_minutes: u64,
}

/// The port a coordinator (and `up`) listens on unless told otherwise, TCP and QUIC.
pub const COORDINATOR_PORT: u16 = 7470;

impl PoolArgs {
    /// A coordinator of this pool keeping its state in `data_dir`, otherwise at defaults.
    pub fn coordinator_config(&self, data_dir: PathBuf) -> Result<CoordinatorConfig> {
        let (pool, pool_dir) = self.membership(&data_dir, true)?;
        Ok(CoordinatorConfig {
            pool_dir,
            relay: self.relay(true)?,
            ..CoordinatorConfig::new(
                data_dir,
                pool,
                self.listen_at(COORDINATOR_PORT),
                !self.no_mdns,
            )
        })
    }

    /// The relay this daemon serves, if any: `--relay`, else `default_on`, within the
    /// flags' limits.
    pub(super) fn relay(&self, default_on: bool) -> Result<Option<RelayLimits>> {
        if self.relay_circuits == 0
            || self.relay_circuit_mib == 0
            || self.relay_circuit_minutes == 0
        {
            anyhow::bail!("--relay-circuits, --relay-circuit-mib and --relay-circuit-minutes must be at least 1");
        }
        let on = self.relay.as_deref().map_or(default_on, |r| r == "on");
        Ok(on.then(|| RelayLimits {
            circuits: self.relay_circuits,
            circuit_bytes: self.relay_circuit_mib.saturating_mul(1 << 20),
            circuit_duration: std::time::Duration::from_secs(
                self.relay_circuit_minutes.saturating_mul(60),
            ),
            ..RelayLimits::default()
        }))
    }

    /// The pool a daemon keeping its identity in `data_dir` joins (see
    /// [`crate::membership::resolve`]); `default_folder`: look for the pool's folder in the
    /// default place too (coordinators, and nodes beside one).
    pub(super) fn membership(
        &self,
        data_dir: &std::path::Path,
        default_folder: bool,
    ) -> Result<(PoolMembership, Option<PathBuf>)> {
        crate::membership::resolve(
            &self.pool,
            self.pool_dir.as_deref(),
            default_folder,
            data_dir,
        )
    }

    /// The data folder: the flag, else `potluck/<role>` in the user's data folder.
    pub(super) fn data_dir(&self, role: &str) -> Result<PathBuf> {
        match &self.data_dir {
            Some(d) => Ok(d.clone()),
            None => crate::data_dir::default_data_dir(role),
        }
    }

    /// The addresses to listen on: `--listen`, else every interface, TCP and QUIC, on any
    /// port.
    pub(super) fn listen(&self) -> Vec<libp2p::Multiaddr> {
        self.listen_at(0)
    }

    /// [`PoolArgs::listen`] on `port` by default (a coordinator's fixed port, so that its
    /// address survives a restart), or any port with a line saying so when it is taken.
    fn listen_at(&self, port: u16) -> Vec<libp2p::Multiaddr> {
        if !self.listen.is_empty() {
            return self.listen.clone();
        }
        let free = port == 0
            || (std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
                && std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok());
        let port = if free {
            port
        } else {
            println!(
                "port {port} is taken (another coordinator on this machine?): listening on a random port, so nodes need this coordinator's new address after each restart (--listen fixes one)"
            );
            0
        };
        [
            format!("/ip4/0.0.0.0/tcp/{port}"),
            format!("/ip4/0.0.0.0/udp/{port}/quic-v1"),
        ]
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect()
    }
}

/// Parses sizes like `4G`, `512M`, `1024K` or plain bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in '{s}' (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("'{s}' must be positive"));
    }
    Ok((n * mult as f64) as u64)
}
