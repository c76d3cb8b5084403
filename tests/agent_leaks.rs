//! Nothing leaks under failure loops (issue #22): an in-process agent, in a network namespace
//! of the test's own, runs real QEMU guests through every failure path of a run: a boot
//! timeout (console marker never printed; tcpPort never answering), a VMM that ends before
//! Ready (guest panic; VMM SIGKILLed), new runs of each as the controller's crash-loop
//! back-off sends them, a delete during a boot and during back-off, and a run replaced by a
//! new spec. Once every VM is deleted, the process holds exactly the fds (by kind: pidfd,
//! socket, pipe, other anon inodes, files) it held before the first VM, and no child
//! process, tap or VM file is left.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ignis::agent::{AcceleratorFlag, AgentConfig, NetworkSetup, serve};
use ignis::proto;
use tokio_util::sync::CancellationToken;

/// Short, so the never-ready guests miss it quickly; the control guest boots in 2–3 s under
/// TCG, 10 s on a loaded machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(25);
const WAIT: Duration = Duration::from_secs(120);

/// The kind of an open fd, from its `/proc/self/fd` link.
fn fd_kind(target: &str) -> String {
    if target.starts_with("socket:") {
        "socket".into()
    } else if target.starts_with("pipe:") {
        "pipe".into()
    } else if let Some(inode) = target.strip_prefix("anon_inode:") {
        inode.trim_matches(['[', ']']).to_owned()
    } else {
        "file".into()
    }
}

/// This process's open fds: count by kind, and every link (to name a leak).
fn open_fds() -> (BTreeMap<String, usize>, Vec<String>) {
    let mut kinds = BTreeMap::new();
    let mut links = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .flatten()
    {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue; // The fd of the read_dir itself, closed by now.
        };
        let target = target.display().to_string();
        *kinds.entry(fd_kind(&target)).or_default() += 1;
        links.push(target);
    }
    links.sort();
    (kinds, links)
}

/// This process's live children (a VMM, dnsmasq).
fn children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
                    .is_some_and(|ppid| ppid == me)
            })
        })
        .filter(|&pid| common::pid_alive(pid))
        .collect()
}

fn config(state_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::local(state_dir);
    config.accelerator = AcceleratorFlag::Tcg;
    config.boot_timeout = BOOT_TIMEOUT;
    // As on `ignis dev`: the node's networking is set up by the first VM that needs it.
    config.network_setup = NetworkSetup::OnFirstUse;
    common::allow_test_guests(&mut config);
    config
}

fn request(spec: proto::VmSpec, hash: &str, run: u32) -> proto::ApplyVmRequest {
    proto::ApplyVmRequest {
        spec_hash: hash.into(),
        run,
        ..common::apply_request(spec)
    }
}

fn is_failed(vm: &proto::Vm) -> bool {
    vm.state() == proto::VmState::Failed
}

fn exit_reason(vm: &proto::Vm) -> String {
    vm.exit
        .as_ref()
        .map(|e| e.reason.clone())
        .unwrap_or_default()
}

/// Whether the prerequisites are here; when they are not, CI (`IGNIS_REQUIRE_ALL=1`) fails.
fn prerequisites() -> bool {
    let here = common::qemu_present() && nix::unistd::Uid::effective().is_root();
    assert!(
        here || std::env::var("IGNIS_REQUIRE_ALL").as_deref() != Ok("1"),
        "IGNIS_REQUIRE_ALL=1: this test needs root and qemu-system-x86_64"
    );
    here
}

#[test]
fn failure_loops_leave_no_fd_process_tap_or_file() {
    const NAME: &str = "failure_loops_leave_no_fd_process_tap_or_file";
    if !prerequisites() || !common::net::in_fresh_netns(NAME, Duration::from_secs(600)) {
        return;
    }
    let guest = common::demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path();
    common::net::runtime().block_on(async {
        let shutdown = CancellationToken::new();
        let agent = serve(config(state), shutdown.clone()).await.expect("serve");
        let socket = agent.socket_path().expect("unix").to_path_buf();
        let mut client = common::connect(&socket, Duration::from_secs(5)).await;
        let mut reaper = common::Reaper::default();
        // Let the server's first connection settle before the baseline.
        client
            .get_host(proto::GetHostRequest {})
            .await
            .expect("host");
        let (before, before_links) = open_fds();
        let taps_before = common::net::taps();

        let plain = |uid: &str| common::demo_spec(uid, &guest);
        // Console marker never printed.
        let marker = proto::VmSpec {
            readiness_console_marker: "ignis: never printed".into(),
            ..plain("marker")
        };
        // A NAT guest whose readiness port nothing listens on.
        let tcp = proto::VmSpec {
            interfaces: vec![proto::NetworkInterface {
                name: "eth0".into(),
                mode: proto::InterfaceMode::Nat as i32,
                ..Default::default()
            }],
            readiness_console_marker: String::new(),
            readiness_tcp_port: 4,
            ..plain("tcp")
        };
        // No init: the kernel panics, `panic=-1` reboots, QEMU (`-no-reboot`) exits.
        let panic = proto::VmSpec {
            kernel_cmdline: format!("{} rdinit=/ignis-no-such-init", common::CMDLINE),
            ..plain("panic")
        };
        let control = plain("control");
        let killed = plain("killed");

        for (spec, run) in [
            (&marker, 1),
            (&tcp, 1),
            (&panic, 1),
            (&control, 1),
            (&killed, 1),
        ] {
            let vm = client
                .apply_vm(request(spec.clone(), "h1", run))
                .await
                .expect("apply")
                .into_inner();
            reaper.0.push(vm.pid);
        }
        // The VMM killed before its guest is ready.
        let killed_vm = common::wait_vm(&mut client, "killed", WAIT, |vm| vm.pid != 0).await;
        common::sigkill(killed_vm.pid);

        let control_vm = common::wait_vm(&mut client, "control", WAIT, |vm| vm.ready).await;
        for uid in ["marker", "tcp", "panic", "killed"] {
            let vm = common::wait_vm(&mut client, uid, WAIT, is_failed).await;
            println!("{uid} run 1: {}", exit_reason(&vm));
        }
        // A new spec replaces the control guest's run.
        let replaced = client
            .apply_vm(request(
                proto::VmSpec {
                    vcpus: 2,
                    ..control.clone()
                },
                "h2",
                2,
            ))
            .await
            .expect("apply new spec")
            .into_inner();
        reaper.0.push(replaced.pid);
        assert_ne!(replaced.pid, control_vm.pid, "a new spec is a new VMM");

        // The controller's crash-loop back-off sends a new run of each failed VM.
        for (spec, uid) in [(&marker, "marker"), (&tcp, "tcp"), (&panic, "panic")] {
            let vm = client
                .apply_vm(request(spec.clone(), "h1", 2))
                .await
                .expect("apply run 2")
                .into_inner();
            reaper.0.push(vm.pid);
            println!("{uid} run 2: {:?} pid {}", vm.state(), vm.pid);
        }
        common::wait_vm(&mut client, "control", WAIT, |vm| vm.ready && vm.run == 2).await;
        // Deleted while booting, and while failed (in back-off).
        common::wait_vm(&mut client, "tcp", WAIT, |vm| is_failed(vm) && vm.run == 2).await;
        common::wait_vm(&mut client, "panic", WAIT, |vm| {
            is_failed(vm) && vm.run == 2
        })
        .await;
        for uid in ["marker", "tcp", "panic", "killed", "control"] {
            client
                .delete_vm(proto::DeleteVmRequest {
                    uid: uid.into(),
                    grace_period_seconds: 0,
                    ..Default::default()
                })
                .await
                .expect("delete");
        }
        let listed = client
            .list_v_ms(proto::ListVMsRequest {})
            .await
            .expect("list")
            .into_inner();
        assert!(listed.vms.is_empty(), "{listed:?}");

        // Reaping and releasing happen in the background: a bounded moment to settle.
        let deadline = Instant::now() + Duration::from_secs(20);
        let (after, after_links) = loop {
            let now = open_fds();
            if now.0 == before || Instant::now() >= deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let new_links: Vec<&String> = after_links
            .iter()
            .filter(|l| !before_links.contains(l))
            .collect();
        assert_eq!(
            after, before,
            "the agent holds fds it did not hold before the first VM: {new_links:?}"
        );
        assert_eq!(children(), Vec::<u32>::new(), "child processes left");
        assert_eq!(common::net::taps(), taps_before, "taps left");
        let left = common::files_under(&state.join("vms"));
        assert!(left.is_empty(), "VM files left: {left:?}");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), agent.wait())
            .await
            .expect("the agent stops in time")
            .expect("the agent stops cleanly");
    });
}

/// A boot deadline shorter than the VMM's own start-up cuts `create` short after QEMU is
/// spawned: that VMM must not be left running (paused, holding the VM's files) beside the
/// next run's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_cut_short_by_the_boot_deadline_leaves_no_vmm() {
    if !common::qemu_present() {
        assert!(
            std::env::var("IGNIS_REQUIRE_ALL").as_deref() != Ok("1"),
            "IGNIS_REQUIRE_ALL=1: this test needs qemu-system-x86_64"
        );
        return;
    }
    let guest = common::demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = AgentConfig::local(tmp.path());
    config.accelerator = AcceleratorFlag::Tcg;
    config.network = None;
    common::allow_test_guests(&mut config);
    // QEMU opens its QMP socket some 100 ms after it starts.
    config.boot_timeout = Duration::from_millis(20);
    let (agent, mut client, shutdown) = common::serve_with_client(config).await;
    let vm = client
        .apply_vm(common::apply_request(common::demo_spec("cut", &guest)))
        .await
        .expect("apply")
        .into_inner();
    assert_eq!(vm.state(), proto::VmState::Failed, "{vm:?}");
    let socket = tmp.path().join("vms").join("cut").join("api.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = common::live_pids_naming(&socket);
    while !left.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = common::live_pids_naming(&socket);
    }
    let _reaper = common::Reaper(left.clone());
    assert!(
        left.is_empty(),
        "a VMM of the failed create is running: {left:?}"
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("the agent stops in time")
        .expect("the agent stops cleanly");
}
