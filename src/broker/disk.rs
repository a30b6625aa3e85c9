//! The disk alarm's measurement, as RabbitMQ's `disk_free_limit`: free space on the
//! file system of the data directory, checked once a second. Below the limit the store
//! could soon fail a commit, and a failed commit stops the node (see `store`); the alarm
//! stops publishers first, while consumers keep acking (which frees space).
//!
//! Acking writes too (a redb commit needs free pages), so a disk that another program
//! filled to the last byte would fail the first ack's commit and stop the node at every
//! start. The data directory therefore keeps a reserve file while space is plentiful,
//! and gives it back when free space runs critically low: the node then starts, raises
//! the alarm and serves its consumers.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::alarm::Every;

/// How often free space is looked at.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The reserve file in the data directory.
const RESERVE_FILE: &str = "warren.reserve";
/// Its size: room for many group commits of acks.
pub const RESERVE_BYTES: u64 = 16 * 1024 * 1024;
/// Free space below which the reserve is given back.
const CRITICAL_FREE_BYTES: u64 = 4 * 1024 * 1024;
/// Free space needed before a reserve is (re)made, so that making it never brings the
/// file system near the critical level.
const RESERVE_MAKE_FREE_BYTES: u64 = RESERVE_BYTES + 16 * CRITICAL_FREE_BYTES;

/// Keeps the data directory's reserve: gives it back when free space is critical, makes
/// it when space is plentiful. Called before the store opens and at every disk check.
pub fn tend_reserve(dir: &Path) {
    let path = dir.join(RESERVE_FILE);
    let Some(free) = free_bytes(dir) else { return };
    let exists = path.exists();
    if exists && free < CRITICAL_FREE_BYTES {
        match std::fs::remove_file(&path) {
            Ok(()) => tracing::warn!(
                free,
                released = RESERVE_BYTES,
                path = %dir.display(),
                "disk nearly full: released the reserve so that consumers can still be served"
            ),
            Err(e) => tracing::error!("cannot release the disk reserve {}: {e}", path.display()),
        }
    } else if !exists
        && free >= RESERVE_MAKE_FREE_BYTES
        && let Err(e) = make_reserve(&path)
    {
        tracing::debug!("no disk reserve at {}: {e}", path.display());
        let _ = std::fs::remove_file(&path);
    }
}

/// Allocates the reserve's blocks for real (a sparse file would reserve nothing).
fn make_reserve(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    // SAFETY: the descriptor is valid for the life of `file`.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, RESERVE_BYTES as libc::off_t) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    file.sync_all()
}

/// Watches the free space of the data directory's file system against its limit.
#[derive(Debug)]
pub struct DiskMonitor {
    path: PathBuf,
    limit_bytes: u64,
    measured_under: AtomicBool,
    checks: Every,
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes only into `stats`, which is a plain C struct.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stats` a valid pointer.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    (rc == 0).then(|| stats.f_bavail as u64 * stats.f_frsize as u64)
}

impl DiskMonitor {
    /// A monitor of `path` (the data directory) with `limit_bytes` (0: never alarms).
    pub fn new(path: PathBuf, limit_bytes: u64) -> DiskMonitor {
        DiskMonitor {
            path,
            limit_bytes,
            measured_under: AtomicBool::new(false),
            checks: Every::new(CHECK_INTERVAL),
        }
    }

    /// Re-reads free space (at most once a second); returns the new alarm state when it
    /// changed.
    pub fn check(&self) -> Option<bool> {
        if self.limit_bytes == 0 || !self.checks.due() {
            return None;
        }
        tend_reserve(&self.path);
        let free = free_bytes(&self.path)?;
        let under = free < self.limit_bytes;
        if under == self.measured_under.swap(under, Ordering::Relaxed) {
            return None;
        }
        if under {
            tracing::warn!(
                free,
                limit = self.limit_bytes,
                path = %self.path.display(),
                "disk alarm: publishers are blocked"
            );
        } else {
            tracing::info!(free, limit = self.limit_bytes, "disk alarm cleared");
        }
        Some(under)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_real_directory() {
        let free = free_bytes(&std::env::temp_dir()).expect("statvfs works on the temp dir");
        assert!(free > 0);
        assert!(free_bytes(Path::new("/no/such/dir/anywhere")).is_none());
    }

    #[test]
    fn the_alarm_follows_free_space_against_the_limit() {
        let dir = std::env::temp_dir();
        let under = DiskMonitor::new(dir.clone(), u64::MAX);
        assert_eq!(under.check(), Some(true));
        assert_eq!(
            under.check(),
            None,
            "at most once a second, and only changes"
        );
        let fine = DiskMonitor::new(dir.clone(), 1);
        assert_eq!(fine.check(), None);
        let off = DiskMonitor::new(dir, 0);
        assert_eq!(off.check(), None);
    }
}
