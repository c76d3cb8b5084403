//! The kubelet's cgroup layouts and the host's `/proc` as directory trees in a temp dir: the
//! cgroup files are plain files holding pids, and `/proc/<pid>/ns/*` are symlinks whose
//! targets name the namespaces, as the kernel's do (`net:[4026531992]`).

use std::os::unix::fs::symlink;

use super::*;
use crate::error::ErrorReason;

const UID: &str = "6f1c2a0e-93d4-4c1e-8d8a-2b7f0c9e1a55";

fn pod() -> PodRef {
    PodRef {
        uid: UID.into(),
        namespace: "default".into(),
        name: "vm-web".into(),
        ip: None,
    }
}

struct Tree {
    _tmp: tempfile::TempDir,
    cgroup: PathBuf,
    host: Host,
}

impl Tree {
    fn new() -> Tree {
        let tmp = tempfile::tempdir().expect("tmp");
        let cgroup = tmp.path().join("cgroup");
        let proc_root = tmp.path().join("proc");
        std::fs::create_dir_all(&cgroup).expect("dir");
        let tree = Tree {
            host: Host {
                cgroup_root: Some(cgroup.clone()),
                proc_root,
            },
            cgroup,
            _tmp: tmp,
        };
        // The agent itself: the node's namespaces.
        tree.process("self", "net:[1]", "mnt:[1]");
        tree
    }

    fn process(&self, pid: &str, net: &str, mnt: &str) {
        let ns = self.host.proc_root.join(pid).join("ns");
        std::fs::create_dir_all(&ns).expect("dir");
        symlink(net, ns.join("net")).expect("net");
        symlink(mnt, ns.join("mnt")).expect("mnt");
    }

    fn launcher(&self, pid: &str) {
        self.process(pid, "net:[7]", "mnt:[9]");
        let root = self.host.proc_root.join(pid).join("root");
        std::fs::create_dir_all(root.join(LAUNCHER_DIR)).expect("dir");
    }

    fn cgroup_dir(&self, path: &str, pids: &[&str]) -> PathBuf {
        let dir = self.cgroup.join(path);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("cgroup.procs"), pids.join("\n")).expect("procs");
        dir
    }
}

#[test]
fn the_cgroupfs_layout_of_cgroup_v1_gives_every_hierarchy_the_netns_and_the_launcher() {
    let tree = Tree::new();
    // The pause container (its own root, no /run/ignis) and the launcher.
    tree.process("100", "net:[7]", "mnt:[8]");
    tree.launcher("101");
    let mut pods = Vec::new();
    for hierarchy in ["cpu", "memory"] {
        tree.cgroup_dir(hierarchy, &["1"]);
        tree.cgroup_dir(&format!("{hierarchy}/kubepods/burstable/podother"), &["5"]);
        let pod = tree.cgroup_dir(&format!("{hierarchy}/kubepods/burstable/pod{UID}"), &[]);
        tree.cgroup_dir(
            &format!("{hierarchy}/kubepods/burstable/pod{UID}/pause"),
            &["100"],
        );
        tree.cgroup_dir(
            &format!("{hierarchy}/kubepods/burstable/pod{UID}/guest"),
            &["101"],
        );
        pods.push(pod);
    }
    // A co-mounted controller's alias is not searched twice.
    symlink(tree.cgroup.join("cpu"), tree.cgroup.join("cpu,cpuacct")).expect("alias");
    let found = tree.host.find(&pod()).expect("found");
    assert_eq!(found.cgroups, pods);
    let netns = std::fs::read_link(&found.netns).expect("netns");
    assert_eq!(netns, Path::new("net:[7]"));
    assert_eq!(
        found.console_dir(),
        tree.host.proc_root.join("101/root/run/ignis")
    );
}

#[test]
fn the_systemd_layout_of_cgroup_v2_is_found_by_its_slice_name() {
    let tree = Tree::new();
    tree.launcher("200");
    tree.cgroup_dir("", &["1"]);
    let slice = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        UID.replace('-', "_")
    );
    let pod_dir = tree.cgroup_dir(&slice, &[]);
    tree.cgroup_dir(&format!("{slice}/cri-containerd-abc.scope"), &["200"]);
    let found = tree.host.find(&pod()).expect("found");
    assert_eq!(found.cgroups, [pod_dir]);
    assert_eq!(found.netns, tree.host.proc_root.join("200/ns/net"));
}

#[test]
fn a_sandbox_still_starting_is_retryable_and_a_host_network_pod_is_not() {
    let tree = Tree::new();
    tree.cgroup_dir("", &["1"]);
    let not_found = tree.host.find(&pod()).expect_err("no cgroup");
    assert_eq!(not_found.reason(), "PodSandboxNotFound");
    assert!(not_found.is_retryable());
    // A uid that merely starts like ours is another pod.
    tree.cgroup_dir(&format!("kubepods/pod{UID}0"), &["300"]);
    tree.cgroup_dir(
        &format!("kubepods/xpod{}.slice", UID.replace('-', "_")),
        &["300"],
    );
    assert_eq!(
        tree.host.find(&pod()).expect_err("other").reason(),
        "PodSandboxNotFound"
    );

    let dir = tree.cgroup_dir(&format!("kubepods/pod{UID}"), &[]);
    let empty = tree.host.find(&pod()).expect_err("no process");
    assert_eq!(empty.reason(), "PodSandboxNotFound");
    assert!(matches!(empty, SandboxError::NoProcess { .. }));

    // Only the pause container so far: no launcher yet.
    tree.process("301", "net:[7]", "mnt:[8]");
    std::fs::write(dir.join("cgroup.procs"), "301").expect("procs");
    let early = tree.host.find(&pod()).expect_err("no launcher");
    assert_eq!(early.reason(), "PodLauncherNotFound");
    assert!(early.is_retryable());

    // A process that shares the agent's mount namespace does not count as the launcher,
    // though /run/ignis exists where it looks.
    tree.process("302", "net:[7]", "mnt:[1]");
    std::fs::create_dir_all(tree.host.proc_root.join("302/root/run/ignis")).expect("dir");
    std::fs::write(dir.join("cgroup.procs"), "301\n302").expect("procs");
    assert_eq!(
        tree.host.find(&pod()).expect_err("node's").reason(),
        "PodLauncherNotFound"
    );

    // hostNetwork: the node's own network namespace is never a VM pod's.
    tree.process("303", "net:[1]", "mnt:[8]");
    std::fs::write(dir.join("cgroup.procs"), "303").expect("procs");
    let host = tree.host.find(&pod()).expect_err("host network");
    assert_eq!(host.reason(), "PodHostNetwork");
    assert!(!host.is_retryable());
}

#[test]
fn uids_that_could_name_another_directory_and_a_missing_root_are_refused() {
    let tree = Tree::new();
    for uid in ["", "../../x", "a/b", "pod*"] {
        let bad = PodRef {
            uid: uid.into(),
            ..pod()
        };
        assert_eq!(tree.host.find(&bad).expect_err(uid).reason(), "InvalidSpec");
    }
    let rootless = Host::new(None);
    let error = rootless.find(&pod()).expect_err("no root");
    assert_eq!(error.reason(), "PodSandboxUnavailable");
    assert!(!error.is_retryable());
}

#[tokio::test]
async fn waiting_finds_a_sandbox_that_appears_later_and_gives_up_at_the_bound() {
    let tree = Tree::new();
    tree.cgroup_dir("", &["1"]);
    let gone = tree
        .host
        .wait_for(&pod(), Duration::from_millis(300))
        .await
        .expect_err("never");
    assert_eq!(gone.reason(), "PodSandboxNotFound");

    tree.launcher("400");
    let dir = tree.cgroup.join(format!("kubepods/pod{UID}"));
    let later = {
        let dir = dir.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("cgroup.procs"), "400").expect("procs");
        })
    };
    let found = tree
        .host
        .wait_for(&pod(), Duration::from_secs(5))
        .await
        .expect("found");
    assert_eq!(found.cgroups, [dir]);
    later.await.expect("task");
}

#[test]
fn the_vmm_gets_a_leaf_below_the_pod_with_the_pods_cpus() {
    let tree = Tree::new();
    tree.launcher("500");
    let mut pods = Vec::new();
    for hierarchy in ["cpuset", "memory"] {
        tree.cgroup_dir(hierarchy, &["1"]);
        let pod = tree.cgroup_dir(&format!("{hierarchy}/kubepods/pod{UID}"), &[]);
        tree.cgroup_dir(&format!("{hierarchy}/kubepods/pod{UID}/guest"), &["500"]);
        pods.push(pod);
    }
    std::fs::write(pods[0].join("cpuset.cpus"), "0-1\n").expect("cpus");
    std::fs::write(pods[0].join("cpuset.mems"), "0\n").expect("mems");
    // The kernel gives a new v1 cpuset cgroup empty files; a plain directory has none.
    let leaf = pods[0].join(VMM_CGROUP);
    std::fs::create_dir(&leaf).expect("leaf");
    std::fs::write(leaf.join("cpuset.cpus"), "").expect("cpus");
    std::fs::write(leaf.join("cpuset.mems"), "").expect("mems");
    let sandbox = tree.host.find(&pod()).expect("found");
    let dirs = sandbox.vmm_cgroups().expect("made");
    assert_eq!(dirs, [pods[0].join(VMM_CGROUP), pods[1].join(VMM_CGROUP)]);
    assert!(dirs[1].is_dir());
    assert_eq!(
        std::fs::read_to_string(leaf.join("cpuset.cpus")).expect("cpus"),
        "0-1"
    );
    // Again (a new run in the same pod): the same cgroups.
    assert_eq!(sandbox.vmm_cgroups().expect("again"), dirs);
}
