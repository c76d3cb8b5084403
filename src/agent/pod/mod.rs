//! A VM pod's sandbox as the node sees it: from the pod's uid, the pod-level cgroup in every
//! hierarchy (where the VMM goes, so the kubelet accounts for it, limits it and kills it with
//! the pod), the pod's network namespace (where the VMM and the guest's tap live), and the
//! launcher container (`ignis vm-pod`, whose `/run/ignis` emptyDir receives the guest's
//! serial output for `kubectl logs`).
//!
//! The kubelet names the pod-level cgroup `pod<uid>` (cgroupfs driver) or
//! `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver), some levels below its root in
//! every hierarchy. The agent sees the host's cgroup filesystem at `--vmm-cgroup-root` and the
//! host's processes in `/proc` (host PID namespace), so any process in the pod's cgroup names
//! the pod's network namespace (`/proc/<pid>/ns/net`) and the launcher's files
//! (`/proc/<pid>/root/run/ignis`).

pub(crate) mod console;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::vm::PodRef;

/// How deep below a hierarchy's root the pod's cgroup may be: `kubepods/burstable/pod<uid>` is
/// 3 levels; a node inside a container (kind, the test cluster) adds its own prefix.
const MAX_DEPTH: usize = 7;
/// How many cgroup directories one search reads at most, so a host with a huge cgroup tree
/// costs a bounded time.
const MAX_DIRS: usize = 50_000;
/// The launcher's emptyDir as the launcher container sees it (Interface 3).
pub(crate) const LAUNCHER_DIR: &str = "run/ignis";
/// The VMM's own cgroup below the pod's in every hierarchy. A leaf, because cgroup v2 lets no
/// process into a cgroup whose children have controllers (the pod's containers); below the
/// pod's, so the pod's limits and accounting cover the VMM and the kubelet, which kills every
/// process of the pod's subtree when it removes the pod, kills the VMM with the pod.
pub(crate) const VMM_CGROUP: &str = "ignis-vmm";
/// How often a sandbox still starting is looked for again.
const POLL: Duration = Duration::from_millis(200);

/// Why a VM pod's sandbox cannot be used.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum SandboxError {
    #[error(
        "the agent cannot find VM pods: it has no cgroup root (start it with --vmm-cgroup-root, as the Helm chart does)"
    )]
    #[strum(serialize = "PodSandboxUnavailable")]
    NoCgroupRoot,
    #[error(
        "no cgroup of pod {namespace}/{name} (uid {uid}) under {root}: its sandbox is not running (yet)"
    )]
    #[strum(serialize = "PodSandboxNotFound")]
    NotFound {
        uid: String,
        namespace: String,
        name: String,
        root: PathBuf,
    },
    #[error("pod {namespace}/{name} (uid {uid}) has a cgroup but no process yet")]
    #[strum(serialize = "PodSandboxNotFound")]
    NoProcess {
        uid: String,
        namespace: String,
        name: String,
    },
    #[error(
        "the launcher container of pod {namespace}/{name} (the one with /run/ignis) is not running (yet)"
    )]
    #[strum(serialize = "PodLauncherNotFound")]
    NoLauncher { namespace: String, name: String },
    #[error(
        "pod {namespace}/{name} shares the node's network namespace (hostNetwork): a VM pod needs its own"
    )]
    #[strum(serialize = "PodHostNetwork")]
    HostNetwork { namespace: String, name: String },
    #[error(
        "this agent runs VMMs unconfined (as its own children), so it cannot put one into a pod"
    )]
    #[strum(serialize = "PodSandboxUnavailable")]
    Unconfined,
    #[error("pod uid {uid:?} is not a Kubernetes uid")]
    #[strum(serialize = "InvalidSpec")]
    InvalidUid { uid: String },
    #[error("cannot create the VMM's cgroup {path}")]
    #[strum(serialize = "PodSandboxUnavailable")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    #[strum(serialize = "PodSandboxUnavailable")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    /// Whether looking again later can succeed: a sandbox still starting will be found.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(
            self,
            SandboxError::NotFound { .. }
                | SandboxError::NoProcess { .. }
                | SandboxError::NoLauncher { .. }
        )
    }
}

/// A VM pod's sandbox on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodSandbox {
    /// The pod-level cgroup in every hierarchy, in hierarchy order.
    pub(crate) cgroups: Vec<PathBuf>,
    /// The pod's network namespace (`/proc/<pid>/ns/net` of a process in the pod).
    pub(crate) netns: PathBuf,
    /// The launcher container's root, as seen from the agent (`/proc/<pid>/root`).
    pub(crate) launcher_root: PathBuf,
}

impl PodSandbox {
    /// The VMM's cgroup in each of the pod's hierarchies ([`VMM_CGROUP`]), created when
    /// missing (a new v1 cpuset one gets the pod's CPUs and memory nodes).
    pub(crate) fn vmm_cgroups(&self) -> Result<Vec<PathBuf>, SandboxError> {
        self.cgroups
            .iter()
            .map(|pod| {
                let dir = pod.join(VMM_CGROUP);
                let failed = |source| SandboxError::Cgroup {
                    path: dir.clone(),
                    source,
                };
                match std::fs::create_dir(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(failed(e));
                    }
                    _ => {}
                }
                crate::agent::cgroup::inherit_cpuset(pod, &dir).map_err(failed)?;
                Ok(dir)
            })
            .collect()
    }

    /// The launcher's `/run/ignis` emptyDir, as seen from the agent.
    pub(crate) fn console_dir(&self) -> PathBuf {
        self.launcher_root.join(LAUNCHER_DIR)
    }

    /// The pod's own resolvers (its `/etc/resolv.conf`), for the guest.
    pub(crate) fn resolv_conf(&self) -> String {
        std::fs::read_to_string(self.launcher_root.join("etc/resolv.conf")).unwrap_or_default()
    }
}

/// Where the node's cgroups and processes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Host {
    /// The host's cgroup filesystem (`--vmm-cgroup-root`); `None`: VM pods cannot be found.
    pub(crate) cgroup_root: Option<PathBuf>,
    /// The host's `/proc` (the agent runs in the host PID namespace).
    pub(crate) proc_root: PathBuf,
}

impl Host {
    /// The agent's own view: `/proc`, and the cgroup root it was started with.
    pub(crate) fn new(cgroup_root: Option<PathBuf>) -> Host {
        Host {
            cgroup_root,
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// Find the sandbox of `pod` now.
    pub(crate) fn find(&self, pod: &PodRef) -> Result<PodSandbox, SandboxError> {
        let root = self
            .cgroup_root
            .as_ref()
            .ok_or(SandboxError::NoCgroupRoot)?;
        let names = cgroup_names(&pod.uid).ok_or_else(|| SandboxError::InvalidUid {
            uid: pod.uid.clone(),
        })?;
        let hierarchies =
            crate::agent::cgroup::hierarchies(root).map_err(|source| SandboxError::Read {
                path: root.clone(),
                source,
            })?;
        let cgroups: Vec<PathBuf> = hierarchies
            .iter()
            .filter_map(|h| find_pod_cgroup(h, &names))
            .collect();
        if cgroups.is_empty() {
            return Err(SandboxError::NotFound {
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                root: root.clone(),
            });
        }
        let pids = pids_below(&cgroups);
        let own_netns = ns_id(&self.proc_root.join("self/ns/net"));
        let own_mntns = ns_id(&self.proc_root.join("self/ns/mnt"));
        let netns = pids
            .iter()
            .map(|pid| self.proc_root.join(pid.to_string()).join("ns/net"))
            .find(|path| ns_id(path).is_some())
            .ok_or_else(|| SandboxError::NoProcess {
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })?;
        if own_netns.is_some() && ns_id(&netns) == own_netns {
            return Err(SandboxError::HostNetwork {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            });
        }
        // A process that shares the agent's mount namespace sees the node's own /run/ignis:
        // never the launcher's emptyDir.
        let launcher_root = pids
            .iter()
            .filter(|pid| {
                let mnt = ns_id(&self.proc_root.join(pid.to_string()).join("ns/mnt"));
                mnt.is_some() && mnt != own_mntns
            })
            .map(|pid| self.proc_root.join(pid.to_string()).join("root"))
            .find(|root| root.join(LAUNCHER_DIR).is_dir())
            .ok_or_else(|| SandboxError::NoLauncher {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
            })?;
        Ok(PodSandbox {
            cgroups,
            netns,
            launcher_root,
        })
    }

    /// Find the sandbox of `pod`, looking again while it is still starting, until `within`.
    pub(crate) async fn wait_for(
        &self,
        pod: &PodRef,
        within: Duration,
    ) -> Result<PodSandbox, SandboxError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.find(pod) {
                Err(error)
                    if error.is_retryable() && tokio::time::Instant::now() + POLL < deadline =>
                {
                    tokio::time::sleep(POLL).await;
                }
                done => return done,
            }
        }
    }
}

/// The names a pod's cgroup directory has, from its uid: `pod<uid>` (cgroupfs driver) and the
/// systemd driver's suffix `pod<uid with _>.slice`. `None` for a uid that could climb out of a
/// directory name.
fn cgroup_names(uid: &str) -> Option<(String, String)> {
    let valid = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || matches!(b, b'-' | b'_'));
    valid.then(|| {
        (
            format!("pod{uid}"),
            format!("pod{}.slice", uid.replace('-', "_")),
        )
    })
}

/// Whether directory name `name` is the pod's cgroup.
fn is_pod_cgroup(name: &str, (cgroupfs, systemd): &(String, String)) -> bool {
    name == cgroupfs
        || name
            .strip_suffix(systemd.as_str())
            .is_some_and(|prefix| prefix.is_empty() || prefix.ends_with('-'))
}

/// The pod's cgroup in one hierarchy, breadth first and bounded (depth and directories).
fn find_pod_cgroup(hierarchy: &Path, names: &(String, String)) -> Option<PathBuf> {
    let mut queue = VecDeque::from([(hierarchy.to_path_buf(), 0usize)]);
    let mut read = 0;
    while let Some((dir, depth)) = queue.pop_front() {
        read += 1;
        if read > MAX_DIRS {
            tracing::warn!(hierarchy = %hierarchy.display(), "cgroup search stopped: too many cgroups");
            return None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            // Symlinks are not cgroups (co-mounted controllers' aliases); nor are files.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if is_pod_cgroup(name, names) {
                return Some(entry.path());
            }
            if depth + 1 < MAX_DEPTH {
                queue.push_back((entry.path(), depth + 1));
            }
        }
    }
    None
}

/// Every pid in the cgroups (and their children: the containers), first hierarchy first.
fn pids_below(cgroups: &[PathBuf]) -> Vec<u32> {
    let mut pids = Vec::new();
    for cgroup in cgroups {
        let mut stack = vec![(cgroup.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    procs
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
            if depth >= 3 {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| (e.path(), depth + 1)),
                );
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    pids.retain(|pid| *pid != 0 && seen.insert(*pid));
    pids
}

/// A namespace's identity (`net:[4026531992]`), `None` when the process is gone.
fn ns_id(path: &Path) -> Option<PathBuf> {
    std::fs::read_link(path).ok()
}

#[cfg(test)]
mod tests;
