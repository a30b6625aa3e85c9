//! The memory limit of the control group the node runs in (a container started with
//! `--memory`, a systemd unit with `MemoryMax=`). The memory alarm's watermark is a
//! fraction of the smaller of that and the machine's RAM, as RabbitMQ does, so that the
//! alarm blocks publishers before the kernel's OOM killer stops the node.
//!
//! Both hierarchies are read: cgroup v2 (`memory.max`) and v1 (`memory.limit_in_bytes`).
//! The effective limit is the smallest one set on the process's group or any ancestor.

use std::path::{Path, PathBuf};

/// The limit that applies to this process, if any group on its path sets one.
pub fn memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    limit_from(&cgroups, &mountinfo, |p| std::fs::read_to_string(p).ok())
}

/// A memory hierarchy this process belongs to: where it is mounted, the file that holds
/// a group's limit, and the process's group directory in it.
struct Hierarchy {
    mount_point: PathBuf,
    limit_file: &'static str,
    group_dir: PathBuf,
}

/// The limit found through `/proc/self/cgroup` and `/proc/self/mountinfo` contents, with
/// `read` giving file contents (so tests can supply their own tree).
fn limit_from(
    cgroups: &str,
    mountinfo: &str,
    read: impl Fn(&Path) -> Option<String>,
) -> Option<u64> {
    hierarchies(cgroups, mountinfo)
        .into_iter()
        .filter_map(|h| smallest_limit(&h, &read))
        .min()
}

fn hierarchies(cgroups: &str, mountinfo: &str) -> Vec<Hierarchy> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split_whitespace().collect();
        let right: Vec<&str> = right.split_whitespace().collect();
        let (Some(root), Some(mount_point), Some(fstype)) =
            (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        let options = right.get(2).copied().unwrap_or("");
        let (limit_file, group) = match *fstype {
            "cgroup2" => ("memory.max", group_of(cgroups, |c| c.is_empty())),
            "cgroup" if options.split(',').any(|o| o == "memory") => (
                "memory.limit_in_bytes",
                group_of(cgroups, |c| c.split(',').any(|x| x == "memory")),
            ),
            _ => continue,
        };
        let Some(group) = group else { continue };
        // The group path is relative to the hierarchy's root; a mount of a sub-tree (as
        // in a container) shows the part below its root.
        let below = group.strip_prefix(root).unwrap_or(group);
        let mount_point = PathBuf::from(mount_point);
        let group_dir = mount_point.join(below.trim_start_matches('/'));
        found.push(Hierarchy {
            mount_point,
            limit_file,
            group_dir,
        });
    }
    found
}

/// The group path of the `/proc/self/cgroup` line whose controller list matches.
fn group_of(cgroups: &str, controllers: impl Fn(&str) -> bool) -> Option<&str> {
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers(list).then_some(path)
    })
}

/// The smallest numeric limit from the group's directory up to the mount point.
fn smallest_limit(h: &Hierarchy, read: &impl Fn(&Path) -> Option<String>) -> Option<u64> {
    let mut dir = h.group_dir.as_path();
    let mut smallest: Option<u64> = None;
    loop {
        if let Some(value) =
            read(&dir.join(h.limit_file)).and_then(|text| text.trim().parse::<u64>().ok())
        {
            smallest = Some(smallest.map_or(value, |s| s.min(value)));
        }
        if dir == h.mount_point {
            return smallest;
        }
        match dir.parent() {
            Some(parent) if parent.starts_with(&h.mount_point) => dir = parent,
            _ => return smallest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn reader(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let files: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, v)| (PathBuf::from(p), v.to_string()))
            .collect();
        move |p| files.get(p).cloned()
    }

    #[test]
    fn v2_limit_of_the_group_or_an_ancestor() {
        let cgroups = "0::/system.slice/warren.service\n";
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        let files = reader(&[
            (
                "/sys/fs/cgroup/system.slice/warren.service/memory.max",
                "max\n",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "536870912\n"),
            ("/sys/fs/cgroup/memory.max", "max\n"),
        ]);
        assert_eq!(limit_from(cgroups, mountinfo, files), Some(536870912));
    }

    #[test]
    fn v2_in_a_container_sees_its_own_root() {
        // docker --memory=256m with a cgroup namespace: the group is "/".
        let cgroups = "0::/\n";
        let mountinfo = "701 690 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw\n";
        let files = reader(&[("/sys/fs/cgroup/memory.max", "268435456\n")]);
        assert_eq!(limit_from(cgroups, mountinfo, files), Some(268435456));
    }

    #[test]
    fn v1_memory_controller_limit() {
        let cgroups = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n";
        let mountinfo = "\
27 24 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
31 24 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let files = reader(&[
            (
                "/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes",
                "1073741824\n",
            ),
            (
                "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
        ]);
        assert_eq!(limit_from(cgroups, mountinfo, files), Some(1073741824));
    }

    #[test]
    fn no_memory_hierarchy_means_no_limit() {
        let cgroups = "1:cpu:/\n";
        let mountinfo = "27 24 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(limit_from(cgroups, mountinfo, reader(&[])), None);
    }

    #[test]
    fn this_machine_can_be_read() {
        // Whatever the host, reading must not fail or panic.
        let _ = memory_limit();
    }
}
