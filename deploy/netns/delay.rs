//! `potluck-netbed`: what the multi-host test bed needs and this kernel lacks (it has no
//! `netem`). `delay --tun NAME --ms D` holds every packet the kernel routes into TUN device
//! NAME for D milliseconds and hands it back, in order: a router namespace that routes a
//! host's address into its TUN, and sends what comes back out of the TUN on to the host
//! (an `ip rule iif NAME` table), gives that host's link D ms of one-way delay. `rtt --to
//! ADDR:PORT --count N` prints the median TCP handshake to ADDR (one round trip), and
//! `listen --at ADDR:PORT` accepts and drops connections for it, so the bed can measure the
//! delay it made. Loss and rate are nftables' and tbf's.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Largest packet a TUN hands over (its default MTU is 1500; GSO is off without vnet headers).
const MAX_PACKET: usize = 65_536;
/// Most packets held at once; beyond it a packet is dropped, as a full router queue drops.
const MAX_HELD: usize = 100_000;
/// Longest delay one link may be given.
const MAX_DELAY_MS: u64 = 10_000;

const USAGE: &str = "usage: potluck-netbed delay --tun NAME --ms D | rtt --to ADDR:PORT [--count N] | listen --at ADDR:PORT";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("delay") => delay(&args[1..]),
        Some("rtt") => rtt(&args[1..]),
        Some("listen") => listen(&args[1..]),
        _ => Err(USAGE.to_string()),
    };
    if let Err(e) = result {
        eprintln!("potluck-netbed: {e}");
        std::process::exit(2);
    }
}

/// The value after `--name` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Opens the TUN device `name` (made beforehand with `ip tuntap add`), without packet info.
fn open_tun(name: &str) -> Result<File, String> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("{name:?}: a device name is 1 to 15 bytes"));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    // struct ifreq: the name, then the flags in the union's first two bytes.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `ifr` is large enough for,
    // on a descriptor this function owns.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(format!(
            "attaching to {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(file)
}

/// Packets waiting out their delay, oldest first, and whether the reader has stopped.
type Held = (Mutex<(VecDeque<(Instant, Vec<u8>)>, bool)>, Condvar);

fn delay(args: &[String]) -> Result<(), String> {
    let tun = flag(args, "--tun").ok_or(USAGE)?;
    let ms: u64 = flag(args, "--ms")
        .ok_or(USAGE)?
        .parse()
        .map_err(|e| format!("--ms: {e}"))?;
    if ms > MAX_DELAY_MS {
        return Err(format!("--ms: at most {MAX_DELAY_MS}"));
    }
    let hold = Duration::from_millis(ms);
    let mut reader = open_tun(tun)?;
    // SAFETY: dup gives a new descriptor of the same open TUN, owned by `writer` alone.
    let dup = unsafe { libc::dup(reader.as_raw_fd()) };
    if dup < 0 {
        return Err(format!("dup: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `dup` is a fresh descriptor nobody else owns.
    let mut writer = unsafe { File::from_raw_fd(dup) };
    let held: Arc<Held> = Arc::new((Mutex::new((VecDeque::new(), false)), Condvar::new()));
    let out = held.clone();
    let sender = std::thread::spawn(move || {
        let (lock, wake) = &*out;
        loop {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            let due = loop {
                match q.0.front() {
                    Some((due, _)) => break *due,
                    None if q.1 => return,
                    None => q = wake.wait(q).unwrap_or_else(|p| p.into_inner()),
                }
            };
            let now = Instant::now();
            if due > now {
                drop(wake.wait_timeout(q, due - now));
                continue;
            }
            let Some((_, packet)) = q.0.pop_front() else {
                continue;
            };
            drop(q);
            // A packet the kernel refuses back (its route went away) is lost, as on a wire.
            let _ = writer.write(&packet);
        }
    });
    println!("delaying {tun} by {ms} ms");
    let mut buf = vec![0u8; MAX_PACKET];
    let (lock, wake) = &*held;
    let stopped = loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(format!("reading {tun}: {e}")),
        };
        let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
        if q.0.len() < MAX_HELD {
            q.0.push_back((Instant::now() + hold, buf[..n].to_vec()));
            wake.notify_one();
        }
    };
    lock.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
    wake.notify_one();
    let _ = sender.join();
    stopped
}

fn rtt(args: &[String]) -> Result<(), String> {
    let to: std::net::SocketAddr = flag(args, "--to")
        .ok_or(USAGE)?
        .parse()
        .map_err(|e| format!("--to: {e}"))?;
    let count: usize = flag(args, "--count")
        .unwrap_or("10")
        .parse()
        .map_err(|e| format!("--count: {e}"))?;
    let mut times = Vec::new();
    for _ in 0..count.clamp(1, 1000) {
        let started = Instant::now();
        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .map_err(|e| format!("connecting to {to}: {e}"))?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(20));
    }
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(0.0);
    println!("rtt_ms {median:.2}");
    Ok(())
}

fn listen(args: &[String]) -> Result<(), String> {
    let at = flag(args, "--at").ok_or(USAGE)?;
    let listener = std::net::TcpListener::bind(at).map_err(|e| format!("{at}: {e}"))?;
    println!("listening {at}");
    for conn in listener.incoming() {
        drop(conn);
    }
    Ok(())
}
