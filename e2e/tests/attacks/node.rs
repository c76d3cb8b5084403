//! What the node says (read from this host: the cluster's nodes share its PID namespace and
//! file system): the cluster's VMM processes, their ids, capabilities, seccomp mode and open
//! files, and files found on disk.

use std::path::{Path, PathBuf};

use ignis_e2e::upstream::Upstream;

/// One VMM process of this cluster.
#[derive(Debug)]
pub struct Vmm {
    pub pid: u32,
    pub cmdline: String,
}

/// Every QEMU of this cluster: found by its binary (QEMU names its process `ignis-<uid>`), in
/// the cgroup of one of this cluster's nodes (so another cluster's VMMs on this machine, or
/// an `ignis dev`'s, are not counted).
pub fn vmms(up: &Upstream) -> Vec<Vmm> {
    let cgroups: Vec<String> = up.nodes.iter().filter_map(|n| n.cgroup.clone()).collect();
    assert!(
        !cgroups.is_empty(),
        "cluster.env names no node cgroup (NODE_<i>_CGROUP): cannot tell this cluster's VMMs"
    );
    let Ok(entries) = std::fs::read_dir("/proc") else {
        panic!("/proc is not readable");
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.to_string_lossy().contains("qemu"))
        })
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
                text.lines()
                    .filter_map(|l| l.splitn(3, ':').nth(2))
                    .any(|path| {
                        let path = path.trim_start_matches('/');
                        cgroups
                            .iter()
                            .any(|c| path.starts_with(&format!("{}/", c.trim_start_matches('/'))))
                    })
            })
        })
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some(Vmm {
                pid,
                cmdline: String::from_utf8_lossy(&raw).replace('\0', " "),
            })
        })
        .collect()
}

/// The VMMs started for the MicroVM whose uid is `uid`.
pub fn vmms_of<'a>(all: &'a [Vmm], uid: &str) -> Vec<&'a Vmm> {
    all.iter().filter(|v| v.cmdline.contains(uid)).collect()
}

/// A field of `/proc/<pid>/status`, split at whitespace.
pub fn status_field(pid: u32, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The VMM `pid` runs confined: no uid or gid 0 (real, effective, saved, filesystem), no
/// capability, `no_new_privs`, and a seccomp filter.
pub fn assert_confined(pid: u32, what: &str) {
    for ids in ["Uid", "Gid"] {
        let v = status_field(pid, ids);
        assert!(
            v.len() == 4 && v.iter().all(|id| id != "0"),
            "{what}: VMM {pid} runs with {ids} {v:?} (must not be 0)"
        );
    }
    for caps in ["CapEff", "CapPrm", "CapAmb"] {
        let v = status_field(pid, caps);
        assert!(
            v.len() == 1 && v[0].chars().all(|c| c == '0'),
            "{what}: VMM {pid} holds capabilities {caps} {v:?}"
        );
    }
    assert_eq!(
        status_field(pid, "Seccomp"),
        ["2"],
        "{what}: VMM {pid} runs under a seccomp filter"
    );
    assert_eq!(
        status_field(pid, "NoNewPrivs"),
        ["1"],
        "{what}: VMM {pid} has no_new_privs"
    );
}

/// An open file of a process: where its link points and whether it was opened for writing.
#[derive(Debug)]
pub struct OpenFile {
    pub target: String,
    pub writable: bool,
}

/// Every file `pid` has open (paths as its own mount namespace names them).
pub fn open_files(pid: u32) -> Vec<OpenFile> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_str()?))
                    .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .unwrap_or(0);
            // O_ACCMODE: O_WRONLY (1) or O_RDWR (2).
            Some(OpenFile {
                target: target.to_string_lossy().into_owned(),
                writable: flags & 0o3 != 0,
            })
        })
        .collect()
}

/// Files below `root` (not following symlinks) for which `bad` says why they must not exist.
pub fn find_bad(
    root: &Path,
    bad: &dyn Fn(&Path, &std::fs::Metadata) -> Option<String>,
) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if let Some(why) = bad(&path, &meta) {
                found.push(format!("{}: {why}", path.display()));
            }
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}
