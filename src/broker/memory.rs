//! Memory flow control, as RabbitMQ's memory alarm: the broker's resident memory is
//! compared with a fraction of the machine's RAM on every tick; above it, the alarm is
//! raised and publishing connections stop being read (consumers keep draining) until it
//! falls below again. Without it a publisher faster than its consumers could grow the
//! broker until the kernel kills it.

use tokio::sync::watch;

/// Watches the process's memory and publishes the alarm state.
#[derive(Debug)]
pub struct MemoryMonitor {
    limit_bytes: u64,
    alarm: watch::Sender<bool>,
    /// The last measured state: the alarm follows changes of it (a manual setting
    /// stands until the measurement changes).
    measured_over: std::sync::atomic::AtomicBool,
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// Resident memory of this process, in bytes.
pub fn resident_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

impl MemoryMonitor {
    /// A monitor for `fraction` of the machine's RAM (0 or no /proc: never alarms).
    pub fn new(fraction: f64) -> MemoryMonitor {
        let limit_bytes = match meminfo_total() {
            Some(total) if fraction > 0.0 => (total as f64 * fraction) as u64,
            _ => u64::MAX,
        };
        let (alarm, _) = watch::channel(false);
        MemoryMonitor {
            limit_bytes,
            alarm,
            measured_over: Default::default(),
        }
    }

    /// The limit in bytes.
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Re-reads memory use and raises or clears the alarm.
    pub fn check(&self) {
        let Some(used) = resident_bytes() else { return };
        let over = used > self.limit_bytes;
        let was = self
            .measured_over
            .swap(over, std::sync::atomic::Ordering::Relaxed);
        if over != was {
            if over {
                tracing::warn!(
                    used,
                    limit = self.limit_bytes,
                    "memory alarm: publishers are blocked"
                );
            } else {
                tracing::info!(used, limit = self.limit_bytes, "memory alarm cleared");
            }
            self.alarm.send_replace(over);
        }
    }

    /// Raises or clears the alarm by hand (tests, and a future `warren ctl`).
    pub fn set_alarm(&self, on: bool) {
        self.alarm.send_replace(on);
    }

    /// A receiver that sees the alarm change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.alarm.subscribe()
    }
}
