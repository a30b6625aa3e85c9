//! Resource alarms, as RabbitMQ's: memory (`memory`) and free disk space (`disk`).
//! While one is on, connections that publish are not read (those that announced the
//! capability are told with connection.blocked) and consumers keep draining, until
//! every alarm has cleared.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::disk::DiskMonitor;
use super::memory::MemoryMonitor;

/// At most once per period: for the monitors' slower looks (statvfs, malloc statistics)
/// on a tick that comes every 50 ms.
#[derive(Debug)]
pub(super) struct Every {
    period: Duration,
    last: Mutex<Option<Instant>>,
}

impl Every {
    /// Due at once, then once per `period`.
    pub(super) fn new(period: Duration) -> Every {
        Every {
            period,
            last: Mutex::new(None),
        }
    }

    /// True when the period has passed since the last true (which starts a new one).
    pub(super) fn due(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < self.period) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }
}

/// Which alarms are on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Alarms {
    /// The broker uses more memory than `memory_high_watermark` allows.
    pub memory: bool,
    /// The data directory's file system has less free space than `disk_free_limit`.
    pub disk: bool,
}

impl Alarms {
    /// Whether publishers must wait.
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The reason given in connection.blocked, worded as RabbitMQ words it.
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & disk",
            (false, true) => "low on disk",
            _ => "low on memory",
        }
    }
}

/// The node's alarms: measured on every tick, published to every connection.
#[derive(Debug)]
pub struct ResourceAlarms {
    memory: MemoryMonitor,
    disk: Option<DiskMonitor>,
    state: watch::Sender<Alarms>,
}

impl ResourceAlarms {
    /// Alarms for `memory_fraction` of RAM and, when the node has a data directory,
    /// `disk_free_limit` bytes free on it.
    pub fn new(memory_fraction: f64, data_dir: Option<PathBuf>, disk_free_limit: u64) -> Self {
        ResourceAlarms {
            memory: MemoryMonitor::new(memory_fraction),
            disk: data_dir.map(|dir| DiskMonitor::new(dir, disk_free_limit)),
            state: watch::channel(Alarms::default()).0,
        }
    }

    /// Measures again; raises or clears alarms whose measurement changed.
    pub fn check(&self) {
        if let Some(on) = self.memory.check() {
            self.state.send_modify(|a| a.memory = on);
        }
        if let Some(on) = self.disk.as_ref().and_then(|d| d.check()) {
            self.state.send_modify(|a| a.disk = on);
        }
    }

    /// Raises or clears the memory alarm by hand (tests, a future `warren ctl`); it
    /// stands until the measurement changes.
    pub fn set_memory(&self, on: bool) {
        self.state.send_modify(|a| a.memory = on);
    }

    /// The flag that is true while memory runs short (see `MemoryMonitor::short_flag`).
    pub fn memory_short(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.memory.short_flag()
    }

    /// Sets "memory runs short" by hand (tests); it stands until the measurement changes.
    pub fn set_memory_short(&self, on: bool) {
        self.memory.set_short(on);
    }

    /// The memory alarm's threshold in bytes (u64::MAX: none).
    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory.limit_bytes()
    }

    /// The alarms in effect now.
    pub fn current(&self) -> Alarms {
        *self.state.borrow()
    }

    /// A receiver that sees the alarms change.
    pub fn subscribe(&self) -> watch::Receiver<Alarms> {
        self.state.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_worded_as_rabbitmq_words_them() {
        let memory = Alarms {
            memory: true,
            disk: false,
        };
        let disk = Alarms {
            memory: false,
            disk: true,
        };
        let both = Alarms {
            memory: true,
            disk: true,
        };
        assert_eq!(memory.reason(), "low on memory");
        assert_eq!(disk.reason(), "low on disk");
        assert_eq!(both.reason(), "low on memory & disk");
        assert!(!Alarms::default().any());
        assert!(memory.any() && disk.any() && both.any());
    }
}
