//! A VM in its pod, end to end through the agent (real QEMU under TCG, the real jailer), on a
//! node the test makes: the test's network namespace is the node; a second namespace stands
//! in for a pod sandbox as a CNI plugin leaves it (`eth0` with the pod IP behind a veth, `lo`
//! up, a default route); a `sleep` in it plays the pause container and another, in a mount
//! namespace of its own with a tmpfs on `/run`, the launcher container with its `/run/ignis`
//! emptyDir. The kubelet's cgroups are a directory tree in a temp dir (`pod<uid>` holding the
//! two pids), given to the agent as its cgroup root.
//!
//! The agent is asked for the demo guest with one interface of mode `pod` and TCP readiness;
//! the guest must become Ready at the pod IP, answer HTTP at the pod IP from the node and at
//! 127.0.0.1 inside the pod's namespace (where `kubectl port-forward` dials), print its
//! console into the launcher's `serial.log`, run its VMM in the pod's cgroup, and on delete
//! leave `stopped` for `ignis vm-pod`.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ignis::agent::{AcceleratorFlag, AgentConfig};
use ignis::proto;

const BOOT: Duration = Duration::from_secs(150);
const POD_UID: &str = "6f1c2a0e-93d4-4c1e-8d8a-2b7f0c9e1a55";
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?}: {status}");
}

/// The pod sandbox: its namespace and its two processes; all removed on drop, with anything
/// the test left running in the namespace.
struct Sandbox {
    netns: String,
    pause: Child,
    launcher: Child,
}

impl Sandbox {
    fn start() -> Sandbox {
        let netns = format!("ignis-pod-{}", std::process::id());
        run("ip", &["netns", "add", &netns]);
        run(
            "ip",
            &[
                "link", "add", "vnode", "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        );
        run("ip", &["addr", "add", "10.244.0.1/24", "dev", "vnode"]);
        run("ip", &["link", "set", "vnode", "up"]);
        let pod_ip = format!("{POD_IP}/24");
        run("ip", &["-n", &netns, "addr", "add", &pod_ip, "dev", "eth0"]);
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        run("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        run(
            "ip",
            &["-n", &netns, "route", "add", "default", "via", "10.244.0.1"],
        );
        let spawn = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(args)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn in the pod")
        };
        // Containers have roots of their own: the pause's /run is not the node's (`ip netns
        // exec` shares the node's /run, where the node's /run/ignis may exist).
        let pause = spawn(&[
            "unshare",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs none /run && exec sleep 900",
        ]);
        let launcher = spawn(&[
            "unshare",
            "--mount",
            "sh",
            "-c",
            "mount -t tmpfs none /run && mkdir /run/ignis && exec sleep 900",
        ]);
        let sandbox = Sandbox {
            netns,
            pause,
            launcher,
        };
        let emptydir = sandbox.console_dir();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !emptydir.is_dir() {
            assert!(
                Instant::now() < deadline,
                "the launcher never got /run/ignis"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        sandbox
    }

    fn console_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root/run/ignis", self.launcher.id()))
    }

    /// The kubelet's cgroups for the pod: `<root>/kubepods/pod<uid>/{pause,guest}`.
    fn cgroups(&self, root: &Path) -> PathBuf {
        std::fs::write(root.join("cgroup.procs"), "").expect("root");
        let pod = root.join(format!("kubepods/pod{POD_UID}"));
        for (container, pid) in [("pause", self.pause.id()), ("guest", self.launcher.id())] {
            std::fs::create_dir_all(pod.join(container)).expect("dir");
            std::fs::write(pod.join(container).join("cgroup.procs"), pid.to_string())
                .expect("procs");
        }
        pod
    }

    /// Connect to `127.0.0.1:80` from inside the pod's namespace and GET `/`.
    fn get_localhost(&self) -> Option<String> {
        let netns = std::fs::File::open(format!("/run/netns/{}", self.netns)).ok()?;
        std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            http_get_blocking(Ipv4Addr::LOCALHOST)
        })
        .join()
        .ok()?
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<u32>() {
                    common::sigkill(pid);
                }
            }
        }
        let _ = self.pause.wait();
        let _ = self.launcher.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn http_get_blocking(ip: Ipv4Addr) -> Option<String> {
    http_get_path(ip, "/")
}

fn http_get_path(ip: Ipv4Addr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(3)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

/// The guest's `/cgi-bin/state` at the pod IP once it shows `line` (its metadata channel, in
/// the pod's namespace, told it), or a panic after 30 s.
async fn eventually_state(line: &'static str) {
    let shown = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let page = http_get_path(POD_IP, "/cgi-bin/state").unwrap_or_default();
            if page.lines().any(|l| l.trim() == line) {
                return None;
            }
            if Instant::now() > deadline {
                return Some(page);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .expect("get");
    assert!(shown.is_none(), "the guest never showed {line}: {shown:?}");
}

fn eventually_page(what: &str, get: impl Fn() -> Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(body) = get()
            && body.contains("ignis demo guest")
        {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} never answered");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_guest_in_its_pod_answers_at_the_pod_ip_and_on_the_pods_localhost() {
    if !common::qemu_present() {
        return;
    }
    let name = "a_guest_in_its_pod_answers_at_the_pod_ip_and_on_the_pods_localhost";
    if !common::net::in_fresh_netns(name, Duration::from_secs(900)) {
        return;
    }
    let guest = common::demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let sandbox = Sandbox::start();
    let cgroup_root = tmp.path().join("cgroup");
    std::fs::create_dir_all(&cgroup_root).expect("cgroup root");
    let pod_cgroup = sandbox.cgroups(&cgroup_root);

    let mut config = AgentConfig::local(&tmp.path().join("state"));
    config.accelerator = AcceleratorFlag::Tcg;
    config.boot_timeout = BOOT;
    config.network = None;
    config.pod_cgroup_root = Some(cgroup_root.clone());
    common::allow_test_guests(&mut config);
    common::net::runtime().block_on(async {
        let (agent, mut client, shutdown) = common::serve_with_client(config.clone()).await;
        let spec = proto::VmSpec {
            interfaces: vec![proto::NetworkInterface {
                name: "eth0".into(),
                mode: proto::InterfaceMode::Pod as i32,
                ..Default::default()
            }],
            readiness_console_marker: String::new(),
            readiness_tcp_port: 80,
            ..common::demo_spec("pod", &guest)
        };
        let request = proto::ApplyVmRequest {
            pod: Some(proto::PodSandbox {
                uid: POD_UID.into(),
                namespace: "default".into(),
                name: "vm-pod".into(),
                ip: POD_IP.to_string(),
            }),
            metadata: Some(proto::GuestMetadata {
                hostname: "pod-guest-1".into(),
                ..Default::default()
            }),
            ..common::apply_request(spec)
        };
        client.apply_vm(request.clone()).await.expect("apply");
        let vm = common::wait_vm(&mut client, "pod", BOOT, |vm| {
            vm.ready || common::state_of(vm) == proto::VmState::Failed
        })
        .await;
        assert!(vm.ready, "{vm:?}");
        assert_eq!(vm.ip_addresses, [POD_IP.to_string()]);

        // From the node (a Service, another pod, the kubelet) at the pod IP ...
        let page = tokio::task::spawn_blocking(|| {
            eventually_page("the pod IP", || http_get_blocking(POD_IP))
        })
        .await
        .expect("get");
        assert!(page.contains("ignis demo guest"), "{page}");
        // ... and inside the pod at 127.0.0.1, where kubectl port-forward dials.
        let sandbox = std::sync::Arc::new(sandbox);
        let inside = {
            let sandbox = sandbox.clone();
            tokio::task::spawn_blocking(move || {
                eventually_page("127.0.0.1 in the pod", || sandbox.get_localhost())
            })
            .await
            .expect("get")
        };
        assert!(inside.contains("ignis demo guest"), "{inside}");
        // The guest reads its metadata from its pod's own channel.
        eventually_state("hostname=pod-guest-1").await;

        // The VMM is in the pod's cgroup, below the containers'.
        let procs =
            std::fs::read_to_string(pod_cgroup.join("ignis-vmm/cgroup.procs")).unwrap_or_default();
        assert!(
            procs.split_whitespace().any(|p| p == vm.pid.to_string()),
            "VMM {} not in the pod's cgroup: {procs:?}",
            vm.pid
        );
        // The console reached the launcher's emptyDir, for kubectl logs.
        let serial = sandbox.console_dir().join("serial.log");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&serial).is_ok_and(|t| t.contains(common::MARKER)) {
            assert!(
                Instant::now() < deadline,
                "serial.log never got the console"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // An agent restart: the VMM runs on in its pod and is re-adopted there, and the
        // console copy resumes without printing the log again.
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), agent.wait())
            .await
            .expect("the agent stops in time")
            .expect("the agent stops cleanly");
        assert!(common::pid_alive(vm.pid), "the VMM died with the agent");
        let (agent, mut client, shutdown) = common::serve_with_client(config.clone()).await;
        let again =
            common::wait_vm(&mut client, "pod", Duration::from_secs(30), |vm| vm.ready).await;
        assert_eq!((again.pid, &again.ip_addresses), (vm.pid, &vm.ip_addresses));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let copied = std::fs::read_to_string(&serial).expect("serial.log");
        assert_eq!(copied.matches(common::MARKER).count(), 1, "{copied}");
        assert!(http_get_blocking(POD_IP).is_some_and(|b| b.contains("ignis demo guest")));
        // The re-adopted VM's channel is there again: new metadata reaches the guest.
        let relabelled = proto::ApplyVmRequest {
            metadata: Some(proto::GuestMetadata {
                hostname: "pod-guest-2".into(),
                ..Default::default()
            }),
            ..request
        };
        let same = client
            .apply_vm(relabelled)
            .await
            .expect("apply")
            .into_inner();
        assert_eq!(same.pid, vm.pid, "new metadata boots nothing");
        eventually_state("hostname=pod-guest-2").await;

        client
            .delete_vm(proto::DeleteVmRequest {
                uid: "pod".into(),
                grace_period_seconds: 0,
                ..Default::default()
            })
            .await
            .expect("delete");
        common::wait_pid_gone(vm.pid, Duration::from_secs(30)).await;
        assert!(
            sandbox.console_dir().join("stopped").exists(),
            "vm-pod is not told the VM stopped"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), agent.wait())
            .await
            .expect("the agent stops in time")
            .expect("the agent stops cleanly");
    });
}
