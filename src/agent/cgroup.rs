//! Keeping VMMs alive when the agent's container goes away.
//!
//! In a cluster the agent runs in a container with the host's PID namespace. When such a
//! container ends, its runtime (runc) kills every process left in the container's cgroup, and
//! a VMM spawned by the agent starts out there: deleting or upgrading the agent pod would take
//! every VM on the node down with it. So, when `--vmm-cgroup-root` names the host's cgroup
//! filesystem (mounted into the agent's pod), each VMM is moved at spawn into the node-level
//! cgroup `<root>/<hierarchy>/<name>` of every hierarchy (cgroup v1, hybrid or v2), beside the
//! kubelet's `kubepods`, where it outlives the agent and is re-adopted by the next one.
//! `ignis dev` and tests leave their VMMs where they are.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where VMMs go: set once at agent start (`ignis agent --vmm-cgroup-root`).
static TARGET: OnceLock<(PathBuf, String)> = OnceLock::new();

/// Move every VMM spawned from now on into `<root>/<hierarchy>/<name>` (`name` may be a
/// path, e.g. `ignis-cluster/ignis-vms`).
pub fn configure(root: &Path, name: &str) {
    let _ = TARGET.set((root.to_path_buf(), name.to_string()));
}

/// The cgroup hierarchies mounted at `root`: `root` itself on a pure cgroup v2 host, else
/// each directory below it that is a hierarchy's root (v1 controllers, named ones, and the
/// hybrid layout's `unified`).
pub fn hierarchies(root: &Path) -> io::Result<Vec<PathBuf>> {
    if root.join("cgroup.procs").exists() {
        return Ok(vec![root.to_path_buf()]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        // Co-mounted controllers appear once as a directory and again as symlinks to it.
        .filter(|path| !path.is_symlink() && path.join("cgroup.procs").exists())
        .collect();
    found.sort();
    Ok(found)
}

/// Move process `pid` (all its threads) into the VMM cgroup, when one is configured.
pub fn place(pid: u32) -> io::Result<()> {
    match TARGET.get() {
        Some((root, name)) => place_under(root, name, pid),
        None => Ok(()),
    }
}

/// [`place`] with an explicit root and name.
pub fn place_under(root: &Path, name: &str, pid: u32) -> io::Result<()> {
    for dir in prepare_under(root, name)? {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
    }
    Ok(())
}

/// The VMM cgroup of every hierarchy, created when missing, for a VMM to join by itself at
/// spawn (`ignis jailer --cgroup`); empty when none is configured.
pub fn vmm_dirs() -> io::Result<Vec<PathBuf>> {
    match TARGET.get() {
        Some((root, name)) => prepare_under(root, name),
        None => Ok(Vec::new()),
    }
}

/// Create `<root>/<hierarchy>/<name>` in every hierarchy and return them.
pub fn prepare_under(root: &Path, name: &str) -> io::Result<Vec<PathBuf>> {
    let all = hierarchies(root)?;
    if all.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no cgroup hierarchy under {}", root.display()),
        ));
    }
    let mut dirs = Vec::with_capacity(all.len());
    for hierarchy in all {
        // Level by level: a new v1 cpuset cgroup starts with no CPUs and no memory nodes and
        // refuses processes (and children with any) until it is given its parent's.
        let mut dir = hierarchy.clone();
        for part in Path::new(name).components() {
            let parent = dir.clone();
            dir.push(part);
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            inherit_cpuset(&parent, &dir)?;
        }
        dirs.push(dir);
    }
    Ok(dirs)
}

/// Give the cgroup `dir` its `parent`'s CPUs and memory nodes when it has none (v1 cpuset).
pub(crate) fn inherit_cpuset(parent: &Path, dir: &Path) -> io::Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = dir.join(file);
        if own.exists() && std::fs::read_to_string(&own)?.trim().is_empty() {
            std::fs::write(&own, std::fs::read_to_string(parent.join(file))?.trim())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hierarchies_of_v1_hybrid_and_v2_layouts() {
        let tmp = tempfile::tempdir().expect("tmp");
        let v2 = tmp.path().join("v2");
        std::fs::create_dir_all(&v2).expect("dir");
        std::fs::write(v2.join("cgroup.procs"), "").expect("file");
        assert_eq!(hierarchies(&v2).expect("v2"), [v2]);

        let v1 = tmp.path().join("v1");
        for h in ["cpu", "memory", "unified"] {
            std::fs::create_dir_all(v1.join(h)).expect("dir");
            std::fs::write(v1.join(h).join("cgroup.procs"), "").expect("file");
        }
        std::fs::create_dir_all(v1.join("not-a-hierarchy")).expect("dir");
        std::os::unix::fs::symlink(v1.join("cpu"), v1.join("cpu,cpuacct")).expect("link");
        assert_eq!(
            hierarchies(&v1).expect("v1"),
            [v1.join("cpu"), v1.join("memory"), v1.join("unified")]
        );
    }

    #[test]
    fn a_new_cpuset_gets_its_parents_cpus_before_the_process() {
        // A plain directory stands in for the cgroup filesystem: the kernel creates a new
        // cgroup's files itself, here the test does (an empty cpuset.cpus, as the kernel).
        let tmp = tempfile::tempdir().expect("tmp");
        let cpuset = tmp.path().join("cpuset");
        std::fs::create_dir_all(cpuset.join("vms")).expect("dir");
        std::fs::write(cpuset.join("cgroup.procs"), "").expect("file");
        std::fs::write(cpuset.join("cpuset.cpus"), "0-1\n").expect("file");
        std::fs::write(cpuset.join("cpuset.mems"), "0\n").expect("file");
        std::fs::write(cpuset.join("vms/cpuset.cpus"), "").expect("file");
        std::fs::write(cpuset.join("vms/cpuset.mems"), "").expect("file");
        std::fs::create_dir_all(cpuset.join("vms/inner")).expect("dir");
        std::fs::write(cpuset.join("vms/inner/cpuset.cpus"), "").expect("file");
        std::fs::write(cpuset.join("vms/inner/cpuset.mems"), "").expect("file");
        place_under(tmp.path(), "vms/inner", 4242).expect("placed");
        for dir in ["vms", "vms/inner"] {
            let read = |f: &str| std::fs::read_to_string(cpuset.join(dir).join(f)).expect("read");
            assert_eq!(read("cpuset.cpus"), "0-1", "{dir}");
            assert_eq!(read("cpuset.mems"), "0", "{dir}");
        }
        let procs = std::fs::read_to_string(cpuset.join("vms/inner/cgroup.procs")).expect("read");
        assert_eq!(procs, "4242");
    }

    #[test]
    fn nothing_to_place_into_is_an_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(place_under(tmp.path(), "vms", 1).is_err());
    }
}
