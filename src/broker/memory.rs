//! The memory alarm's measurement, as RabbitMQ's: the broker's resident memory is
//! compared with a fraction of the machine's RAM on every tick (see `alarm` for what
//! the alarm does). Without it a publisher faster than its consumers could grow the
//! broker until the kernel kills it.
//!
//! Allocators keep freed memory for reuse: resident memory would stay at a drained
//! backlog's peak, and an alarm raised at the peak would never clear. glibc's malloc
//! keeps the free space of its arenas (the broker's binary has it serve only the largest
//! blocks, each in its own mapping, see `crate::alloc`; a library build uses it for
//! everything); mimalloc keeps pages freed by other threads in their owners' heaps until
//! it is asked to collect. So the monitor also hands the allocators' unused memory back
//! to the system: when much of the resident memory is not in use, and every interval
//! while memory runs short (mimalloc's committed figure counts what it holds free, so
//! the first test alone misses what it could give back).

use std::time::{Duration, Instant};

use super::alarm::Every;

/// How often the monitor may ask the allocator to give memory back.
const RELEASE_INTERVAL: Duration = Duration::from_secs(1);
/// Resident memory the allocator holds unused beyond which it is given back.
const RELEASE_UNUSED_BYTES: u64 = 64 << 20;
/// Memory runs short (queues page transient messages to disk too) above this fraction
/// of the alarm's threshold: RabbitMQ's `vm_memory_high_watermark_paging_ratio`.
const PAGING_RATIO: f64 = 0.5;

/// The allocators' view of the heap (mimalloc, and glibc for large blocks; elsewhere
/// the system allocator returns memory itself, or we cannot ask).
mod allocator {
    /// Bytes of heap in use by the program.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn in_use_bytes() -> u64 {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        (info.uordblks + info.hblkhd) as u64 + crate::alloc::mimalloc_committed_bytes()
    }

    /// Gives free heap pages back to the system.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn release() {
        // SAFETY: malloc_trim only returns free memory; it takes the allocator's locks.
        unsafe { libc::malloc_trim(0) };
        crate::alloc::mimalloc_release();
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn in_use_bytes() -> u64 {
        crate::alloc::mimalloc_committed_bytes()
    }

    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    pub fn release() {
        crate::alloc::mimalloc_release();
    }
}

/// Watches the process's memory against its limit.
#[derive(Debug)]
pub struct MemoryMonitor {
    limit_bytes: u64,
    /// The last measured state: the alarm follows changes of it (a manual setting
    /// stands until the measurement changes).
    measured_over: std::sync::atomic::AtomicBool,
    /// When the allocator may be asked about its unused memory.
    releases: Every,
    /// The last measured "memory runs short", and what queues read (it follows changes
    /// of the measurement; a manual setting stands until the measurement changes).
    measured_short: std::sync::atomic::AtomicBool,
    short: std::sync::Arc<std::sync::atomic::AtomicBool>,
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
    /// A monitor for `fraction` of the memory the node may use: the machine's RAM, or
    /// its control group's limit when that is smaller (0 or no /proc: never alarms).
    pub fn new(fraction: f64) -> MemoryMonitor {
        let available = match (meminfo_total(), super::cgroup::memory_limit()) {
            (Some(ram), Some(group)) if group < ram => {
                tracing::info!(
                    limit = group,
                    ram,
                    "memory: the control group's limit applies"
                );
                Some(group)
            }
            (ram, group) => ram.or(group),
        };
        let limit_bytes = match available {
            Some(total) if fraction > 0.0 => (total as f64 * fraction) as u64,
            _ => u64::MAX,
        };
        MemoryMonitor {
            limit_bytes,
            measured_over: Default::default(),
            releases: Every::new(RELEASE_INTERVAL),
            measured_short: Default::default(),
            short: Default::default(),
        }
    }

    /// The resident memory above which the alarm goes on (u64::MAX: never).
    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// True while memory runs short (resident memory above half the alarm's threshold):
    /// queues then keep the bodies of transient messages past their window on disk.
    /// Shared with every queue, which reads it on enqueue and on its timer.
    pub fn short_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.short.clone()
    }

    /// Sets "memory runs short" by hand (tests); it stands until the measurement changes.
    pub fn set_short(&self, on: bool) {
        self.short.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `used` bytes of resident memory count as memory running short.
    fn runs_short(&self, used: u64) -> bool {
        used as f64 > self.limit_bytes as f64 * PAGING_RATIO
    }

    /// Re-reads memory use; returns the new alarm state when it changed.
    pub fn check(&self) -> Option<bool> {
        let mut used = resident_bytes()?;
        if self.releases.due()
            && (self.runs_short(used)
                || used.saturating_sub(allocator::in_use_bytes()) > RELEASE_UNUSED_BYTES)
        {
            let started = Instant::now();
            allocator::release();
            let before = used;
            used = resident_bytes().unwrap_or(used);
            tracing::debug!(
                released = before.saturating_sub(used),
                took_us = started.elapsed().as_micros() as u64,
                "gave unused memory back to the system"
            );
        }
        let short = self.runs_short(used);
        let was_short = self
            .measured_short
            .swap(short, std::sync::atomic::Ordering::Relaxed);
        if short != was_short {
            self.set_short(short);
            tracing::info!(
                used,
                limit = self.limit_bytes,
                short,
                "memory: transient messages past their queue's window {} disk",
                if short { "go to" } else { "no longer go to" }
            );
        }
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
            return Some(over);
        }
        None
    }
}
