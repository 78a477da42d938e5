//! What this machine can give the pool, measured rather than assumed: device, memory the
//! owner allows (and the OS has free), threads, matmul GFLOP/s and memory bandwidth.

use candle_core::{Device, Tensor};
use potluck_protocol::messages::DeviceKind;
use std::time::{Duration, Instant};

/// The measured capacity of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// Where it computes.
    pub device: DeviceKind,
    /// Memory it may use: the owner's cap, or what the OS reports available.
    pub memory_bytes: u64,
    /// Threads it may use.
    pub threads: u32,
    /// Measured f32 matmul speed.
    pub gflops: f32,
    /// Measured streaming read bandwidth, GB/s.
    pub mem_gbps: f32,
}

/// The owner's limits.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Most bytes of memory to use.
    pub max_memory: Option<u64>,
    /// Most compute threads.
    pub threads: Option<usize>,
}

/// Bytes the OS reports available (MemAvailable), if it says.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs the probe: about a quarter of a second of measurement.
pub fn probe(limits: &Limits) -> Capacity {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = limits.threads.unwrap_or(cores).clamp(1, cores.max(1));
    let os_free = available_memory().unwrap_or(0);
    let memory_bytes = match limits.max_memory {
        Some(cap) if os_free > 0 => cap.min(os_free),
        Some(cap) => cap,
        None => os_free,
    };
    Capacity {
        device: DeviceKind::Cpu,
        memory_bytes,
        threads: threads as u32,
        gflops: measure_gflops(Duration::from_millis(150)),
        mem_gbps: measure_bandwidth(Duration::from_millis(100)),
    }
}

/// Best observed f32 matmul rate over repeated 256^3 products on the CPU.
fn measure_gflops(budget: Duration) -> f32 {
    const N: usize = 256;
    let (Ok(a), Ok(b)) = (
        Tensor::ones((N, N), candle_core::DType::F32, &Device::Cpu),
        Tensor::ones((N, N), candle_core::DType::F32, &Device::Cpu),
    ) else {
        return 0.0;
    };
    let start = Instant::now();
    let mut best = 0f32;
    while start.elapsed() < budget {
        let t = Instant::now();
        if a.matmul(&b).is_err() {
            return 0.0;
        }
        let secs = t.elapsed().as_secs_f32().max(1e-9);
        best = best.max((2 * N * N * N) as f32 / secs / 1e9);
    }
    best
}

/// Best observed rate of summing a 64 MiB buffer, larger than most caches.
fn measure_bandwidth(budget: Duration) -> f32 {
    let buf = vec![1u64; 8 << 20];
    let start = Instant::now();
    let mut best = 0f32;
    while start.elapsed() < budget {
        let t = Instant::now();
        let sum: u64 = buf.iter().fold(0u64, |acc, &x| acc.wrapping_add(x));
        std::hint::black_box(sum);
        let secs = t.elapsed().as_secs_f32().max(1e-9);
        best = best.max((buf.len() * 8) as f32 / secs / 1e9);
    }
    best
}
