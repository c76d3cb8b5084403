//! The confined VMM, for real: `ignis jailer` (the one spawn path of every VMM) joins a cgroup,
//! enters a network namespace and drops every privilege before it execs; a QEMU started
//! through it boots the demo guest as an unprivileged uid with no capabilities, under its
//! seccomp filter and no_new_privs, its files handed over as descriptors from a 0700
//! directory; and an agent refuses host paths outside its allowed directories, or escaping
//! them, without ever starting a VMM. Needs root, QEMU and a /boot kernel: without them each
//! test says why and passes, unless `IGNIS_REQUIRE_ALL=1`, where it fails.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ignis::agent::guest::{DEMO_MARKER, build_demo_guest};
use ignis::agent::vmm::process::{self, Confinement};
use ignis::agent::vmm::qemu::{self, QemuBackend};
use ignis::agent::vmm::{VmConfig, VmmBackend};
use ignis::agent::{AcceleratorFlag, AgentConfig};
use ignis::api::Accelerator;
use ignis::proto;

const BOOT: Duration = Duration::from_secs(90);

/// VM tests take turns: two cores are shared.
static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether the test can run here; a missing prerequisite fails under `IGNIS_REQUIRE_ALL=1`.
fn can_run(test: &str, needs_qemu: bool) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::Uid::effective().is_root() {
        missing.push("root".to_owned());
    }
    if needs_qemu {
        if process::resolve_binary(Path::new(qemu::DEFAULT_BINARY)).is_err() {
            missing.push(qemu::DEFAULT_BINARY.to_owned());
        }
        if ignis::agent::guest::find_newest_kernel(Path::new("/boot")).is_err() {
            missing.push("a /boot/vmlinuz-* kernel".to_owned());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test} needs {}", missing.join(", "));
    assert!(
        std::env::var("IGNIS_REQUIRE_ALL").as_deref() != Ok("1"),
        "IGNIS_REQUIRE_ALL=1: {why}"
    );
    eprintln!("SKIP: {why}");
    false
}

/// The fields of a `/proc/<pid>/status` line, e.g. `Uid` → `["100000", ...]`.
fn status_field(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status_line(&status, key)
}

fn status_line(status: &str, key: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status:\n{status}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A cgroup of the test's own in the pids hierarchy (v1) or the unified one (v2).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> Self {
        let root = Path::new("/sys/fs/cgroup");
        let hierarchy = if root.join("cgroup.procs").exists() {
            root.to_path_buf()
        } else {
            root.join("pids")
        };
        let dir = hierarchy.join(name);
        std::fs::create_dir_all(&dir).expect("create a cgroup");
        TestCgroup(dir)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A network namespace of the test's own (`ip netns add`), deleted at the end.
struct TestNetns(String);

impl TestNetns {
    fn new(name: &str) -> Self {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip netns add {name}");
        TestNetns(name.to_owned())
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn the_jailer_joins_the_cgroup_and_netns_and_drops_every_privilege_before_the_exec() {
    if !can_run("jailer", false) {
        return;
    }
    let pid = std::process::id();
    let cgroup = TestCgroup::new(&format!("ignis-jailer-test-{pid}"));
    let netns = TestNetns::new(&format!("ignis-jt-{pid}"));
    let out = Command::new(env!("CARGO_BIN_EXE_ignis"))
        .arg("jailer")
        .arg("--cgroup")
        .arg(&cgroup.0)
        .arg("--netns")
        .arg(netns.path())
        .args(["--uid", "150123", "--gid", "150124", "--chdir", "/"])
        .args(["--", "/bin/sh", "-c"])
        // `$$` is the shell the jailer became: its status is what the jailer left.
        .arg("cat /proc/$$/status; echo CGROUP; cat /proc/$$/cgroup; echo NETNS; readlink /proc/$$/ns/net; echo ENV; env")
        .env("IGNIS_SECRET_IN_AGENT_ENV", "x")
        .output()
        .expect("run ignis jailer");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, rest) = text.split_once("CGROUP").expect("cgroup part");
    let (cgroups, rest) = rest.split_once("NETNS").expect("netns part");
    let (ns, env) = rest.split_once("ENV").expect("env part");
    assert_eq!(status_line(status, "Uid"), ["150123"; 4]);
    assert_eq!(status_line(status, "Gid"), ["150124"; 4]);
    assert!(status_line(status, "Groups").is_empty(), "{status}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_line(status, caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(status_line(status, "NoNewPrivs"), ["1"]);
    let name = cgroup.0.file_name().expect("name").to_string_lossy();
    assert!(
        cgroups.lines().any(|l| l.ends_with(&format!("/{name}"))),
        "{cgroups}"
    );
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(netns.path()).expect("netns").ino();
    assert_eq!(ns.trim(), format!("net:[{inode}]"));
    // None of the agent's environment reaches the VMM.
    assert!(!env.contains("IGNIS_SECRET_IN_AGENT_ENV"), "{env}");

    // Root is refused before anything changes; the VMM never runs.
    let root = Command::new(env!("CARGO_BIN_EXE_ignis"))
        .args(["jailer", "--uid", "0", "--gid", "0", "--", "/bin/true"])
        .output()
        .expect("run ignis jailer");
    assert_eq!(root.status.code(), Some(126));
    assert!(String::from_utf8_lossy(&root.stderr).contains("0 is root"));
}

fn confined_config(qemu: &Path, dir: &Path, uid: u32) -> VmConfig {
    // The guest lives in a root-only directory: the VMM gets descriptors, never paths.
    let files = dir.join("private");
    let g = build_demo_guest(&files).expect("build the demo guest");
    std::fs::set_permissions(&files, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let state = dir.join("vm");
    std::fs::create_dir_all(&state).expect("state");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    VmConfig {
        id: format!("confined-{uid}"),
        vcpus: 1,
        memory_mib: 128,
        kernel: g.kernel.clone(),
        cmdline: ignis::agent::guest::DEFAULT_CMDLINE.to_owned(),
        initrd: Some(g.initrd.clone()),
        disks: Vec::new(),
        nets: Vec::new(),
        user_data: None,
        accelerator: Accelerator::Tcg,
        state_dir: state.clone(),
        console_log: state.join("console.log"),
        api_socket: state.join("api.sock"),
        binary: qemu.to_path_buf(),
        confinement: Some(Confinement {
            uid,
            gid: uid,
            netns: None,
            cgroups: Vec::new(),
        }),
        restore: None,
        opened: Default::default(),
    }
}

async fn wait_for_marker(log: &Path) -> Instant {
    let until = Instant::now() + BOOT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(DEMO_MARKER) {
            return Instant::now();
        }
        assert!(Instant::now() < until, "no marker; console:\n{text}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_confined_qemu_boots_the_demo_guest_as_nobody_in_particular() {
    if !can_run("confined QEMU", true) {
        return;
    }
    let _turn = VM_LOCK.lock().await;
    let qemu_bin = process::resolve_binary(Path::new(qemu::DEFAULT_BINARY)).expect("qemu");
    let dir = tempfile::tempdir().expect("tmp");
    let config = confined_config(&qemu_bin, dir.path(), 150_200);
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let mut spawned = backend.create(&config).await.expect("create");
    let pid = spawned.handle.pid;
    let _reaper = Reaper(pid);
    assert_eq!(status_field(pid, "Uid"), ["150200"; 4]);
    assert_eq!(status_field(pid, "Gid"), ["150200"; 4]);
    assert_eq!(status_field(pid, "CapEff"), ["0000000000000000"]);
    assert_eq!(status_field(pid, "CapPrm"), ["0000000000000000"]);
    assert_eq!(status_field(pid, "NoNewPrivs"), ["1"]);
    assert_eq!(status_field(pid, "Seccomp"), ["2"]);
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains(
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ),
        "{cmdline}"
    );
    assert!(
        !cmdline.contains(&dir.path().join("private").display().to_string()),
        "QEMU is named no guest path: {cmdline}"
    );
    // Found again by its API socket, as after a lost handle.
    assert_eq!(live_pids_naming(&config.api_socket), [pid]);
    backend.start(&spawned.handle).await.expect("start");
    wait_for_marker(&config.console_log).await;
    backend.kill(&spawned.handle).await.expect("kill");
    let _ = tokio::time::timeout(Duration::from_secs(10), spawned.child.wait()).await;
}

/// Kills the VMM when a test ends, even by a failed assertion.
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn agent_config(state: &Path, allowed: &Path) -> AgentConfig {
    let mut config = AgentConfig::local(state);
    config.accelerator = AcceleratorFlag::Tcg;
    config.boot_timeout = BOOT;
    config.network = None;
    config.vmm_policy.allowed_path_dirs = vec![allowed.to_path_buf()];
    config
}

#[tokio::test]
async fn paths_outside_the_allowed_dirs_fail_for_good_and_start_no_vmm_and_allowed_ones_boot_confined()
 {
    if !can_run("allowed paths", true) {
        return;
    }
    let _turn = VM_LOCK.lock().await;
    let tmp = tempfile::tempdir().expect("tmp");
    let allowed = tmp.path().join("guests");
    let guest = build_demo_guest(&allowed).expect("guest");
    // What an attacker names: the agent's TLS key, the host's root through a magic link, and
    // a symlink in the allowed directory that leads out of it.
    let tls = tmp.path().join("tls");
    std::fs::create_dir_all(&tls).expect("tls");
    let key = tls.join("tls.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\n").expect("key");
    std::os::unix::fs::symlink(&key, allowed.join("escape")).expect("symlink");
    std::os::unix::fs::symlink("../tls/tls.key", allowed.join("relative-escape")).expect("link");
    let (agent, mut client, shutdown) =
        serve_with_client(agent_config(&tmp.path().join("state"), &allowed)).await;

    let attacks = [
        ("tls-key", key.display().to_string()),
        ("proc-root", "/proc/1/root/etc/shadow".to_owned()),
        ("symlink", allowed.join("escape").display().to_string()),
        (
            "relative-symlink",
            allowed.join("relative-escape").display().to_string(),
        ),
        ("dotdot", format!("{}/../tls/tls.key", allowed.display())),
    ];
    for (uid, path) in &attacks {
        let mut spec = demo_spec(uid, &guest);
        spec.initrd_path = path.clone();
        let vm = client
            .apply_vm(apply_request(spec))
            .await
            .expect("apply answers")
            .into_inner();
        assert_eq!(vm.state(), proto::VmState::Failed, "{uid}: {vm:?}");
        let exit = vm.exit.clone().expect("exit");
        assert_eq!(exit.reason, "PathNotAllowed", "{uid}: {exit:?}");
        assert!(exit.permanent, "{uid}");
        assert!(
            exit.message.contains("initrd.path"),
            "{uid}: {}",
            exit.message
        );
        assert_eq!(vm.pid, 0, "{uid}: a VMM was started");
        println!("MEASURE refused {uid}: {}", exit.message);
    }

    let vm = client
        .apply_vm(apply_request(demo_spec("fine", &guest)))
        .await
        .expect("apply")
        .into_inner();
    assert_ne!(vm.state(), proto::VmState::Failed, "{vm:?}");
    let ready = wait_vm(&mut client, "fine", BOOT, |vm| vm.ready).await;
    let pid = ready.pid;
    let uid: u32 = status_field(pid, "Uid")[0].parse().expect("uid");
    assert!(uid >= ignis::agent::confine::DEFAULT_FIRST_ID, "{uid}");
    assert_eq!(status_field(pid, "CapEff"), ["0000000000000000"]);
    assert_eq!(status_field(pid, "Seccomp"), ["2"]);
    assert_eq!(status_field(pid, "NoNewPrivs"), ["1"]);
    let vm_dir = tmp.path().join("state/vms/fine");
    let mode = std::fs::metadata(&vm_dir)
        .expect("vm dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let ids = std::fs::read_to_string(vm_dir.join("ids.json")).expect("ids.json");
    assert!(ids.contains(&uid.to_string()), "{ids}");
    client
        .delete_vm(proto::DeleteVmRequest {
            uid: "fine".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    agent.wait().await.expect("agent stops");
}

/// Poll `check` every 20 ms for up to 10 s; its last answer.
fn poll<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Firecracker's jailer semantics, for real with a stand-in VMM (Firecracker cannot run here:
/// no usable KVM): busybox, static like Firecracker's release binary, runs in the jail a
/// confined Firecracker gets, and the test reads what the kernel says of it.
#[test]
fn a_jailed_vmm_is_pid_1_of_its_own_namespaces_chrooted_with_only_its_files() {
    if !can_run("jailed VMM", false) {
        return;
    }
    let Ok(busybox) = process::resolve_binary(Path::new("busybox")) else {
        ignis::testing::prerequisite::missing("jailed VMM", "a static busybox as the stand-in VMM");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("images");
    let state = dir.path().join("vm");
    std::fs::create_dir_all(&images).expect("images");
    std::fs::create_dir_all(&state).expect("state");
    let kernel = images.join("vmlinux");
    std::fs::write(&kernel, "kernel bytes").expect("kernel");
    let disk = state.join("rootfs.img");
    std::fs::write(&disk, "").expect("disk");
    let jail = state.join("jail");
    // Stale leftovers of an earlier run: the jail is rebuilt, the socket link replaced.
    std::fs::create_dir_all(jail.join("old")).expect("stale");
    std::fs::write(state.join("api.sock"), "").expect("stale socket");
    use std::os::unix::fs::MetadataExt;
    let kvm_group = std::fs::metadata("/dev/kvm").map(|m| m.gid()).unwrap_or(0);

    // The stand-in writes its disk, tries its read-only kernel, then stays.
    let script = "echo written-in-jail > /disk-rootfs; \
                  if (echo x > /kernel) 2>&-; then echo kernel-writable >> /disk-rootfs; fi; \
                  exec /busybox sleep 30";
    let mut command = Command::new(env!("CARGO_BIN_EXE_ignis"));
    command.args(["jailer", "--uid", "150125", "--gid", "150126"]);
    if kvm_group != 0 {
        command.arg("--group").arg(kvm_group.to_string());
    }
    let mut stage_one = command
        .arg("--chroot")
        .arg(&jail)
        .arg("--bind")
        .arg(format!("{}=kernel", kernel.display()))
        .arg("--bind-rw")
        .arg(format!("{}=disk-rootfs", disk.display()))
        .arg("--link")
        .arg(format!("{}=api.sock", state.join("api.sock").display()))
        .arg("--")
        .arg(&busybox)
        .args(["sh", "-c", script])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("run ignis jailer");
    let outer = stage_one.id();

    let children = format!("/proc/{outer}/task/{outer}/children");
    let vmm: u32 = poll(|| {
        std::fs::read_to_string(&children)
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
    .expect("the jail's stage one starts the VMM");
    poll(|| {
        // The stand-in itself, not stage two, whose command line names the script too.
        let cmdline = std::fs::read(format!("/proc/{vmm}/cmdline")).ok()?;
        cmdline.starts_with(b"/busybox\0sleep\0").then_some(())
    })
    .expect("the stand-in reaches its sleep");

    // Pid 1 of a pid namespace of its own, in a mount namespace of its own.
    assert_eq!(
        status_field(vmm, "NSpid"),
        [vmm.to_string(), "1".to_owned()]
    );
    for ns in ["pid", "mnt"] {
        let own = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("own ns");
        let its = std::fs::read_link(format!("/proc/{vmm}/ns/{ns}")).expect("its ns");
        assert_ne!(own, its, "{ns} namespace");
    }
    // The VM's ids, no capabilities, no_new_privs.
    assert_eq!(status_field(vmm, "Uid"), ["150125"; 4]);
    assert_eq!(status_field(vmm, "Gid"), ["150126"; 4]);
    assert_eq!(status_field(vmm, "CapEff"), ["0000000000000000"]);
    assert_eq!(status_field(vmm, "NoNewPrivs"), ["1"]);
    // Chrooted into the jail, which holds only its files and devices.
    assert_eq!(
        std::fs::read_link(format!("/proc/{vmm}/root")).expect("root"),
        jail
    );
    let list = |path: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let seen_root = PathBuf::from(format!("/proc/{vmm}/root"));
    assert_eq!(
        list(&seen_root),
        ["busybox", "dev", "disk-rootfs", "kernel"]
    );
    let mut devices = Vec::new();
    for device in ["kvm", "net/tun"] {
        if Path::new("/dev").join(device).exists() {
            devices.push(device);
            use std::os::unix::fs::FileTypeExt;
            let kind = std::fs::metadata(seen_root.join("dev").join(device))
                .expect("device in jail")
                .file_type();
            assert!(kind.is_char_device(), "{device}");
        }
    }
    assert!(
        !devices.is_empty(),
        "no /dev/kvm or /dev/net/tun on this host"
    );
    // Its disk is writable (and now its own), its kernel is not.
    assert_eq!(
        std::fs::read_to_string(&disk).expect("disk"),
        "written-in-jail\n"
    );
    assert_eq!(std::fs::metadata(&disk).expect("disk").uid(), 150125);
    assert_eq!(
        std::fs::read_to_string(&kernel).expect("kernel"),
        "kernel bytes"
    );
    // The agent's socket path leads into the jail.
    assert_eq!(
        std::fs::read_link(state.join("api.sock")).expect("link"),
        jail.join("api.sock")
    );
    // The jail's mounts are not the host's.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&jail.display().to_string()), "{mounts}");

    // Killing the process the agent knows (stage one) takes the VMM with it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(outer as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill stage one");
    stage_one.wait().expect("reap stage one");
    poll(|| (!Path::new(&format!("/proc/{vmm}")).exists()).then_some(()))
        .expect("the VMM dies with its stage one");
}
