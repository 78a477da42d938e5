//! When a volunteer's machine may work. `--idle-only` pauses the node while the rest of the
//! machine (everything but this node) keeps the CPUs busier than a threshold, and resumes
//! it once the machine has been calm for a while; schedule windows (`--schedule 22:00-07:00`,
//! local time) keep work to the hours its owner chose.

use std::time::{Duration, Instant};

/// How long the machine must stay busy before the node pauses: "within seconds", and not on
/// one spike.
pub const BUSY_AFTER: Duration = Duration::from_secs(2);

/// CPU time counters: the machine's total and busy ticks, and this process's.
#[derive(Debug, Clone, Copy)]
struct Ticks {
    total: u64,
    busy: u64,
    ours: u64,
}

/// Measures the share of the machine's CPU time used by everything but this process.
#[derive(Debug, Default)]
pub struct LoadSampler {
    last: Option<Ticks>,
}

fn read_ticks() -> Option<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4)?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some(Ticks {
        total,
        busy: total.saturating_sub(idle),
        ours: utime + stime,
    })
}

impl LoadSampler {
    /// The share (0 to 1) of all CPUs that other processes used since the last call; `None`
    /// on the first call or where the counters cannot be read.
    pub fn sample(&mut self) -> Option<f32> {
        let now = read_ticks()?;
        let before = self.last.replace(now)?;
        let total = now.total.saturating_sub(before.total);
        if total == 0 {
            return None;
        }
        let busy = now.busy.saturating_sub(before.busy);
        let ours = now.ours.saturating_sub(before.ours);
        Some((busy.saturating_sub(ours) as f32 / total as f32).clamp(0.0, 1.0))
    }
}

/// Decides, from load samples, when an idle-only node must pause and when it may resume.
#[derive(Debug)]
pub struct IdleGate {
    threshold: f32,
    resume_after: Duration,
    busy: bool,
    /// Since when the load has been on the other side of the threshold.
    crossed: Option<Instant>,
}

impl IdleGate {
    /// Pauses while others use more than `threshold` of the machine; resumes after
    /// `resume_after` below it.
    pub fn new(threshold: f32, resume_after: Duration) -> Self {
        Self {
            threshold,
            resume_after,
            busy: false,
            crossed: None,
        }
    }

    /// Takes a load sample at `now`; whether the machine counts as busy now.
    pub fn update(&mut self, load: f32, now: Instant) -> bool {
        let over = load > self.threshold;
        if over == self.busy {
            self.crossed = None;
            return self.busy;
        }
        let since = *self.crossed.get_or_insert(now);
        let wait = if self.busy {
            self.resume_after
        } else {
            BUSY_AFTER
        };
        if now.duration_since(since) >= wait {
            self.busy = over;
            self.crossed = None;
        }
        self.busy
    }

    /// Whether the machine counts as busy.
    pub fn busy(&self) -> bool {
        self.busy
    }
}

/// A daily window, in minutes after local midnight; it may wrap past midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u16,
    end: u16,
}

impl Window {
    /// Whether minute `m` of the day falls inside.
    pub fn contains(&self, m: u16) -> bool {
        if self.start <= self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

impl std::str::FromStr for Window {
    type Err = String;

    /// `HH:MM-HH:MM`, e.g. `22:00-07:00`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a window like 22:00-07:00");
        let minute = |hm: &str| -> Option<u16> {
            let (h, m) = hm.trim().split_once(':')?;
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let (start, end) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        if start == end {
            return Err(format!(
                "'{s}' is empty; leave --schedule out to work all day"
            ));
        }
        Ok(Self { start, end })
    }
}

/// Minutes after local midnight now.
pub fn local_minute() -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives on this stack frame.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return ((now.max(0) as u64 / 60) % 1440) as u16;
    }
    (tm.tm_hour * 60 + tm.tm_min).clamp(0, 1439) as u16
}

/// Whether `windows` (none: always) allow work at minute `m`.
pub fn scheduled(windows: &[Window], m: u16) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(m))
}

/// What keeps a node from working besides its owner's pause: its schedule, and with
/// `--idle-only` a busy machine.
#[derive(Debug)]
pub struct Availability {
    gate: Option<IdleGate>,
    sampler: LoadSampler,
    schedule: Vec<Window>,
    load: Option<f32>,
}

impl Availability {
    /// Idle-only with `idle` = (threshold, resume after), within `schedule` (none: always).
    pub fn new(idle: Option<(f32, Duration)>, schedule: Vec<Window>) -> Self {
        Self {
            gate: idle.map(|(t, r)| IdleGate::new(t, r)),
            sampler: LoadSampler::default(),
            schedule,
            load: None,
        }
    }

    /// Measures the machine's other load (idle-only nodes; call about once a second).
    pub fn measure(&mut self) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        if let Some(load) = self.sampler.sample() {
            self.load = Some(load);
            gate.update(load, Instant::now());
        }
    }

    /// Why the node must not work now, if it must not.
    pub fn pause_reason(&self) -> Option<String> {
        if !scheduled(&self.schedule, local_minute()) {
            let windows: Vec<String> = self.schedule.iter().map(Window::to_string).collect();
            return Some(format!("outside its schedule ({})", windows.join(", ")));
        }
        if self.gate.as_ref().is_some_and(IdleGate::busy) {
            let pct = self.load.unwrap_or(0.0) * 100.0;
            return Some(format!("its machine is busy (other load {pct:.0}%)"));
        }
        None
    }

    /// Its settings and last reading, for `potluck node status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "idle_only": self.gate.is_some(),
            "other_load": self.load,
            "schedule": self.schedule.iter().map(Window::to_string).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_wrap_midnight_and_refuse_nonsense() {
        let night: Window = "22:00-07:00".parse().unwrap();
        assert!(night.contains(23 * 60) && night.contains(60) && !night.contains(12 * 60));
        assert!(!night.contains(7 * 60) && night.contains(22 * 60));
        let lunch: Window = "12:00-13:30".parse().unwrap();
        assert!(lunch.contains(12 * 60 + 45) && !lunch.contains(13 * 60 + 30));
        assert_eq!(lunch.to_string(), "12:00-13:30");
        for bad in [
            "",
            "12-13",
            "25:00-01:00",
            "10:00-10:00",
            "10:60-11:00",
            "a:b-c:d",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
        assert!(scheduled(&[], 5));
        assert!(!scheduled(&[lunch], 5));
        assert!(local_minute() < 1440);
    }

    #[test]
    fn the_idle_gate_pauses_on_sustained_load_and_resumes_after_calm() {
        let mut g = IdleGate::new(0.3, Duration::from_secs(10));
        let t = Instant::now();
        let at = |s: u64| t + Duration::from_secs(s);
        assert!(!g.update(0.9, at(0)));
        // One spike is not enough.
        assert!(!g.update(0.1, at(1)));
        assert!(!g.update(0.9, at(2)));
        assert!(!g.update(0.9, at(3)));
        assert!(g.update(0.9, at(4)));
        // Calm must last the resume time.
        assert!(g.update(0.1, at(5)));
        assert!(g.update(0.1, at(14)));
        assert!(g.update(0.8, at(15)));
        assert!(g.update(0.1, at(16)));
        assert!(!g.update(0.1, at(26)));
    }

    #[test]
    fn the_sampler_reads_this_machine() {
        let mut s = LoadSampler::default();
        assert!(s.sample().is_none());
        std::thread::sleep(Duration::from_millis(200));
        if let Some(load) = s.sample() {
            assert!((0.0..=1.0).contains(&load));
        }
    }
}
