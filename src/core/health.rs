//! Process health from sysinfo, and the rule that turns readings into a status.
//!
//! `status` is `stopped` when the bus is not running, `degraded` when any threshold below is
//! passed, else `healthy`. The thresholds are the documented defaults of `Thresholds`.
//!
//! CPU use is a share over a fixed window (`CpuWindow`), not "since the previous report": a
//! report asked for right after another one (a second scraper, a health probe) would
//! otherwise measure a few milliseconds, 0% or several hundred, and change what the next
//! caller sees. Nothing polls: the samples are the reports themselves.

use std::collections::VecDeque;
use std::time::Instant;

use sysinfo::{MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};

/// A cheap monotonic timestamp in nanoseconds, precise to a few milliseconds: enough for the
/// age of queued events, and read on every publish, so it must cost next to nothing.
pub fn coarse_now_ns() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
        #[allow(clippy::cast_sign_loss)]
        return ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    }
    #[cfg(not(target_os = "linux"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        #[allow(clippy::cast_possible_truncation)]
        return START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64;
    }
}

/// What sysinfo read about this process and machine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    /// Resident set size of this process, MiB.
    pub rss_mb: f64,
    /// CPU use of this process over the last `CPU_WINDOW_S` seconds at least (see
    /// `CpuWindow`), percent of one core.
    pub cpu_percent: f64,
    /// The span `cpu_percent` was measured over, seconds (0 at the first sample).
    pub cpu_window_s: f64,
    /// Total system memory, MiB.
    pub system_total_mb: f64,
    /// Memory available to new work, MiB.
    pub system_available_mb: f64,
}

/// The shortest span, seconds, that a CPU share is measured over once the bus is that old.
pub const CPU_WINDOW_S: f64 = 10.0;

/// CPU share over a fixed window, from samples of (wall time, CPU time) taken when asked.
///
/// A reading covers the span from the newest earlier sample at least `window` old (the
/// oldest one while none is) to now: never less than `window` once there is that much
/// history, and as long as the gap to an earlier reading when readings are further apart. So
/// two readings in a row report the same share over nearly the same span, and one reader
/// does not shorten another's window. At most about nine samples per window are kept.
#[derive(Debug, Clone)]
pub struct CpuWindow {
    window: f64,
    /// (wall seconds, CPU seconds), oldest first; the first one is the reference.
    samples: VecDeque<(f64, f64)>,
}

impl CpuWindow {
    /// An empty history for readings over at least `window` seconds.
    pub fn new(window: f64) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records the sample (`now`, `cpu`), both in seconds on their own monotonic clocks, and
    /// returns the CPU share (percent of one core) and the span (seconds) it covers.
    pub fn observe(&mut self, now: f64, cpu: f64) -> (f64, f64) {
        // The reference only moves forward: samples older than the newest one at least a
        // window old are never needed again.
        while self.samples.len() >= 2 && now - self.samples[1].0 >= self.window {
            self.samples.pop_front();
        }
        let (t0, c0) = self.samples.front().copied().unwrap_or((now, cpu));
        if self
            .samples
            .back()
            .map_or(true, |&(t, _)| now - t >= self.window / 8.0)
        {
            self.samples.push_back((now, cpu));
        }
        let span = now - t0;
        if span <= 0.0 {
            return (0.0, 0.0);
        }
        (100.0 * (cpu - c0).max(0.0) / span, span)
    }
}

/// This process's CPU time so far, seconds (`None` where it cannot be read this way).
fn process_cpu_seconds() -> Option<f64> {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_PROCESS_CPUTIME_ID exists on Linux.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &raw mut ts) };
        #[allow(clippy::cast_precision_loss)]
        return (rc == 0).then(|| ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9);
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Reads process memory and CPU. Keep one per bus: CPU use is measured over the window its
/// samples span (`CpuWindow`).
pub struct Probe {
    system: Option<System>,
    pid: Option<Pid>,
    started: Instant,
    cpu: CpuWindow,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probe")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

const MB: f64 = 1024.0 * 1024.0;

impl Probe {
    /// A probe primed with a first sample, so the next reading has a CPU interval.
    pub fn new() -> Self {
        let system = System::new_with_specifics(RefreshKind::nothing()).ok();
        let pid = sysinfo::get_current_pid().ok();
        let mut probe = Self {
            system,
            pid,
            started: Instant::now(),
            cpu: CpuWindow::new(CPU_WINDOW_S),
        };
        probe.sample();
        probe
    }

    /// Reads memory and CPU now. Fields sysinfo cannot read stay 0.
    pub fn sample(&mut self) -> ProcessSample {
        let mut out = ProcessSample::default();
        let now = self.started.elapsed().as_secs_f64();
        let precise = process_cpu_seconds();
        if let Some(cpu) = precise {
            (out.cpu_percent, out.cpu_window_s) = self.cpu.observe(now, cpu);
        }
        let (Some(sys), Some(pid)) = (self.system.as_mut(), self.pid) else {
            return out;
        };
        sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            false,
            ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        if let Some(p) = sys.process(pid) {
            out.rss_mb = p.memory() as f64 / MB;
            if precise.is_none() {
                // Elsewhere: sysinfo's CPU time, in milliseconds.
                let cpu = p.accumulated_cpu_time() as f64 / 1e3;
                (out.cpu_percent, out.cpu_window_s) = self.cpu.observe(now, cpu);
            }
        }
        out.system_total_mb = sys.total_memory() as f64 / MB;
        out.system_available_mb = sys.available_memory() as f64 / MB;
        out
    }
}

impl Default for Probe {
    fn default() -> Self {
        Self::new()
    }
}

/// Limits past which a running bus reports `degraded`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Queue fill ratio (queued / `max_queue_size`) at or above which the bus is degraded.
    pub queue_fill: f64,
    /// Age in seconds of the oldest queued event at or above which the bus is degraded.
    pub oldest_age_s: f64,
    /// Share of handler calls that raised, over the bus's life, at or above which it is
    /// degraded (looked at once at least `min_calls` calls were made).
    pub error_rate: f64,
    /// Calls before the error rate counts.
    pub min_calls: u64,
    /// Dead letters at or above which the bus is degraded.
    pub dead_letters: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            queue_fill: 0.8,
            oldest_age_s: 5.0,
            error_rate: 0.1,
            min_calls: 20,
            dead_letters: 100,
        }
    }
}

/// The readings a status is computed from.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Readings {
    /// Whether the bus is started.
    pub running: bool,
    /// Events queued.
    pub queued: usize,
    /// `max_queue_size` (0 = unbounded).
    pub capacity: usize,
    /// Age of the oldest queued event, seconds.
    pub oldest_age_s: f64,
    /// Handler calls so far.
    pub calls: u64,
    /// Of which raised.
    pub failed_calls: u64,
    /// Dead letters held.
    pub dead_letters: u64,
}

/// `healthy`, `degraded` (with the reasons) or `stopped`.
pub fn status(r: &Readings, t: &Thresholds) -> (&'static str, Vec<String>) {
    if !r.running {
        return ("stopped", Vec::new());
    }
    let mut reasons = Vec::new();
    if r.capacity > 0 && r.queued as f64 >= t.queue_fill * r.capacity as f64 {
        reasons.push(format!(
            "queue {}/{} is at or above {:.0}% full",
            r.queued,
            r.capacity,
            t.queue_fill * 100.0
        ));
    }
    if r.oldest_age_s >= t.oldest_age_s {
        reasons.push(format!(
            "oldest queued event waited {:.1}s (limit {:.1}s)",
            r.oldest_age_s, t.oldest_age_s
        ));
    }
    if r.calls >= t.min_calls && r.failed_calls as f64 >= t.error_rate * r.calls as f64 {
        reasons.push(format!(
            "{} of {} handler calls failed (limit {:.0}%)",
            r.failed_calls,
            r.calls,
            t.error_rate * 100.0
        ));
    }
    if r.dead_letters >= t.dead_letters {
        reasons.push(format!(
            "{} dead letters (limit {})",
            r.dead_letters, t.dead_letters
        ));
    }
    (
        if reasons.is_empty() {
            "healthy"
        } else {
            "degraded"
        },
        reasons,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_running_bus_is_healthy_and_a_stopped_one_stopped() {
        let t = Thresholds::default();
        let r = Readings {
            running: true,
            ..Readings::default()
        };
        assert_eq!(status(&r, &t).0, "healthy");
        assert_eq!(status(&Readings::default(), &t).0, "stopped");
    }

    #[test]
    fn each_threshold_degrades_with_a_reason() {
        let t = Thresholds::default();
        let base = Readings {
            running: true,
            ..Readings::default()
        };
        let full = Readings {
            queued: 80,
            capacity: 100,
            ..base
        };
        let old = Readings {
            oldest_age_s: 6.0,
            ..base
        };
        let failing = Readings {
            calls: 100,
            failed_calls: 10,
            ..base
        };
        let dlq = Readings {
            dead_letters: 100,
            ..base
        };
        for r in [full, old, failing, dlq] {
            let (s, why) = status(&r, &t);
            assert_eq!(s, "degraded");
            assert_eq!(why.len(), 1, "{why:?}");
        }
    }

    #[test]
    fn cpu_share_is_over_the_window_whoever_asked_last() {
        let mut w = CpuWindow::new(10.0);
        assert_eq!(w.observe(0.0, 0.0), (0.0, 0.0));
        // Younger than a window: since the first sample.
        assert_eq!(w.observe(4.0, 2.0), (50.0, 4.0));
        assert_eq!(w.observe(12.0, 4.0), (100.0 / 3.0, 12.0));
        // A reading right after another: the same reference, not a span of 0.001 s.
        let (pct, span) = w.observe(12.001, 4.0);
        assert!((span - 12.001).abs() < 1e-9 && (pct - 100.0 / 3.0).abs() < 0.01);
        // Readings every second at a steady 25%: once a window of them is in, every reading
        // covers one window plus at most the spacing of kept samples (1.25 s or more, so 2 s).
        let mut cpu = 4.0;
        for i in 1..=60 {
            cpu += 0.25;
            let (pct, span) = w.observe(12.0 + f64::from(i), cpu);
            if i >= 12 {
                assert!((10.0..=12.0 + 1e-9).contains(&span), "{i}: {span}");
                assert!((pct - 25.0).abs() < 1e-6, "{i}: {pct}");
            }
        }
        assert!(w.samples.len() <= 10, "{}", w.samples.len());
    }

    #[test]
    fn cpu_readings_far_apart_cover_the_whole_gap() {
        let mut w = CpuWindow::new(10.0);
        w.observe(0.0, 0.0);
        w.observe(100.0, 10.0);
        assert_eq!(w.observe(160.0, 40.0), (50.0, 60.0));
        assert_eq!(w.samples.len(), 2);
    }

    #[test]
    fn readings_closer_than_an_eighth_of_the_window_are_not_kept() {
        let mut w = CpuWindow::new(8.0);
        for i in 0..1000 {
            w.observe(f64::from(i) * 0.01, 0.0);
        }
        assert!(w.samples.len() <= 10, "{}", w.samples.len());
    }

    #[test]
    fn the_probe_reads_this_process() {
        let s = Probe::new().sample();
        assert!(s.rss_mb > 0.0, "{s:?}");
        assert!(s.system_total_mb >= s.rss_mb);
    }
}
