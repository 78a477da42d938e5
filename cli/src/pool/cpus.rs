//! `--cpus`: the cores a node may run on.

use anyhow::Result;

/// CPU cores a node may run on.
#[derive(Debug, Clone)]
pub struct CpuList(pub Vec<usize>);

/// Parses a core list like `0,2` or `0-3`.
pub fn parse_cpus(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.trim()
                .parse()
                .map_err(|_| format!("bad core number in '{s}'"))?,
            b.trim()
                .parse()
                .map_err(|_| format!("bad core number in '{s}'"))?,
        );
        if a > b || b >= 1024 {
            return Err(format!("bad core range '{part}'"));
        }
        out.extend(a..=b);
    }
    Ok(CpuList(out))
}

/// Keeps this process (and the threads it starts later) on `cpus`.
#[cfg(target_os = "linux")]
pub(super) fn pin_to_cpus(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET indexes below CPU_SETSIZE (checked by
    // parse_cpus' bound of 1024), and sched_setaffinity reads the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            anyhow::bail!(
                "cannot run on cores {cpus:?}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub(super) fn pin_to_cpus(_cpus: &[usize]) -> Result<()> {
    anyhow::bail!("--cpus is only available on Linux")
}
