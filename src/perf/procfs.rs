//! CPU time and memory of a process, from Linux's /proc.

/// Clock ticks per second of /proc/PID/stat times (USER_HZ, 100 on every Linux port
/// that matters).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system) of a process, all its threads, dead ones included, in
/// seconds; `None` when it cannot be read.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// Memory figures of a process, in KiB.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory {
    /// Resident set size now (VmRSS).
    pub rss_kb: u64,
    /// Peak resident set size since the process started (VmHWM).
    pub hwm_kb: u64,
}

/// Reads VmRSS and VmHWM of a process; `None` when it cannot be read.
pub fn memory(pid: &str) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some(Memory {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        assert!(super::cpu_seconds("self").is_some());
        assert!(super::memory("self").is_some_and(|m| m.rss_kb > 0 && m.hwm_kb >= m.rss_kb));
    }
}
