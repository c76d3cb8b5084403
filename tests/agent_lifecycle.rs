//! The agent end to end: real QEMU guests (TCG) booted through the gRPC API over the unix
//! socket, the way the controller drives it; the real `ignis agent` binary killed and
//! restarted; bad input; mutual TLS on TCP.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ignis::agent::{AcceleratorFlag, AgentConfig, ListenAddr, ServerTls, TlsFiles, serve};
use ignis::proto;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

const BOOT: Duration = Duration::from_secs(90);

fn local_config(state_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::local(state_dir);
    config.accelerator = AcceleratorFlag::Tcg;
    config.boot_timeout = BOOT;
    allow_test_guests(&mut config);
    // These tests run in the host's own network namespace, which they must not reconfigure;
    // networking is tested in namespaces of its own (tests/agent_network.rs).
    config.network = None;
    config
}

/// Boot-to-marker of the same guest with bare QEMU, no agent: the baseline of apply→ready.
async fn bare_qemu_boot_ms(guest: &ignis::agent::guest::DemoGuest, dir: &Path) -> u128 {
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = dir.join(format!("bare-console-{n}.log"));
    let _ = std::fs::remove_file(&log);
    // The same command line the QEMU backend gives a TCG guest (host TSC rate).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cmdline = match ignis::agent::vmm::qemu::host_tsc_khz(&cpuinfo) {
        Some(khz) => format!("{CMDLINE} tsc_early_khz={khz} tsc=reliable"),
        None => CMDLINE.to_owned(),
    };
    let started = Instant::now();
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,pit=on,pic=on,rtc=on",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "128M"])
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .arg("-append")
        .arg(&cmdline)
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn bare qemu");
    let deadline = started + BOOT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(MARKER) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bare QEMU never printed the marker: {text}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed().as_millis();
    let _ = child.kill().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_the_demo_guest_then_delete_leaves_nothing() {
    if !qemu_present() {
        return;
    }
    let guest = demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let shutdown = CancellationToken::new();
    let agent = serve(local_config(tmp.path()), shutdown.clone())
        .await
        .expect("serve");
    let socket = agent.socket_path().expect("unix").to_path_buf();
    let mut client = connect(&socket, Duration::from_secs(5)).await;
    let mut reaper = Reaper::default();

    let host = client
        .get_host(proto::GetHostRequest {})
        .await
        .expect("host")
        .into_inner();
    assert!(
        host.hypervisors().any(|h| h == proto::Hypervisor::Qemu),
        "{host:?}"
    );
    assert_eq!(host.accelerator(), proto::Accelerator::Tcg);
    assert!(host.memory_total_bytes > 0 && host.vcpus_total > 0);

    let bare_ms = bare_qemu_boot_ms(&guest, tmp.path()).await;

    let uid = "boot-1";
    let applied = client
        .apply_vm(apply_request(demo_spec(uid, &guest)))
        .await
        .expect("apply")
        .into_inner();
    assert!(applied.pid > 0, "{applied:?}");
    reaper.0.push(applied.pid);
    assert_eq!(applied.hypervisor(), proto::Hypervisor::Qemu);
    assert_eq!(applied.accelerator(), proto::Accelerator::Tcg);

    // Idempotent: the same apply changes nothing.
    let again = client
        .apply_vm(apply_request(demo_spec(uid, &guest)))
        .await
        .expect("apply again")
        .into_inner();
    assert_eq!(again.pid, applied.pid);

    let vm = wait_vm(&mut client, uid, BOOT, |vm| vm.ready).await;
    assert_eq!(state_of(&vm), proto::VmState::Running);
    assert!(vm.apply_to_ready_ms > 0);
    println!(
        "MEASURE bare qemu boot-to-marker {bare_ms} ms; ApplyVM->Ready through the agent {} ms (difference {} ms)",
        vm.apply_to_ready_ms,
        vm.apply_to_ready_ms as i128 - bare_ms as i128
    );

    let host = client
        .get_host(proto::GetHostRequest {})
        .await
        .expect("host")
        .into_inner();
    assert_eq!(host.memory_used_bytes, 128 << 20);
    assert_eq!(host.vcpus_used, 1);

    let mut console = client
        .console(proto::ConsoleRequest {
            uid: uid.into(),
            tail_bytes: 64 * 1024,
            follow: false,
        })
        .await
        .expect("console")
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), console.next())
        .await
        .expect("console in time")
    {
        text.extend(chunk.expect("chunk").data);
    }
    assert!(String::from_utf8_lossy(&text).contains(MARKER));

    let vm_dir = tmp.path().join("vms").join(uid);
    assert!(vm_dir.join("spec.json").exists() && vm_dir.join("handle.json").exists());
    let deleted = client
        .delete_vm(proto::DeleteVmRequest {
            uid: uid.into(),
            grace_period_seconds: 1,
            ..Default::default()
        })
        .await
        .expect("delete")
        .into_inner();
    assert!(deleted.existed);
    wait_pid_gone(vm.pid, Duration::from_secs(10)).await;
    assert!(!vm_dir.exists(), "left behind: {:?}", files_under(&vm_dir));
    let leftovers: Vec<_> = files_under(tmp.path())
        .into_iter()
        .filter(|p| {
            // The node's image cache (its GC lock) is node state that outlives every VM.
            !p.starts_with("agent.sock")
                && !p.starts_with("images")
                && !p.to_string_lossy().starts_with("bare-console")
                && !p.ends_with("kvm-probe.json")
        })
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let status = client
        .get_vm(proto::GetVmRequest { uid: uid.into() })
        .await
        .expect_err("gone");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let again = client
        .delete_vm(proto::DeleteVmRequest {
            uid: uid.into(),
            grace_period_seconds: 1,
            ..Default::default()
        })
        .await
        .expect("delete twice")
        .into_inner();
    assert!(!again.existed);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("agent stops in time")
        .expect("agent stops cleanly");
    assert!(!socket.exists(), "the socket is removed on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_vmm_shows_up_as_an_exited_event_with_a_reason() {
    if !qemu_present() {
        return;
    }
    let guest = demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let shutdown = CancellationToken::new();
    let agent = serve(local_config(tmp.path()), shutdown.clone())
        .await
        .expect("serve");
    let mut client = connect(agent.socket_path().expect("unix"), Duration::from_secs(5)).await;
    let mut reaper = Reaper::default();
    let uid = "kill-vmm";
    let vm = client
        .apply_vm(apply_request(demo_spec(uid, &guest)))
        .await
        .expect("apply")
        .into_inner();
    reaper.0.push(vm.pid);
    let vm = wait_vm(&mut client, uid, BOOT, |vm| vm.ready).await;

    let mut events = client
        .watch_v_ms(proto::WatchVMsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let mut synced = false;
    let mut killed = false;
    let exit = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = events.next().await {
            match event.expect("event").event {
                Some(proto::vm_event::Event::Synced(true)) => {
                    synced = true;
                    sigkill(vm.pid);
                    killed = true;
                }
                Some(proto::vm_event::Event::Vm(v))
                    if killed && v.uid == uid && v.state() == proto::VmState::Exited =>
                {
                    return v.exit.expect("exit info");
                }
                _ => {}
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("EXITED event in time");
    assert!(synced);
    assert_eq!(exit.reason, "VmmKilled", "{exit:?}");
    assert!(!exit.success);
    println!(
        "MEASURE killed VMM reported as {} ({})",
        exit.reason, exit.message
    );

    client
        .delete_vm(proto::DeleteVmRequest {
            uid: uid.into(),
            grace_period_seconds: 0,
            ..Default::default()
        })
        .await
        .expect("delete");
    assert!(!tmp.path().join("vms").join(uid).exists());
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_the_cause_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let files = tempfile::tempdir().expect("files");
    let shutdown = CancellationToken::new();
    let mut config = local_config(tmp.path());
    config
        .vmm_policy
        .allowed_path_dirs
        .push(files.path().to_path_buf());
    let agent = serve(config, shutdown.clone()).await.expect("serve");
    let mut client = connect(agent.socket_path().expect("unix"), Duration::from_secs(5)).await;
    let kernel = files.path().join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").expect("kernel");
    // A directory: unreadable as a file even for root (permission bits do not stop root).
    let initrd_dir = files.path().join("initrd.img");
    std::fs::create_dir(&initrd_dir).expect("initrd dir");

    let base = proto::VmSpec {
        uid: String::new(),
        hypervisor: proto::Hypervisor::Qemu as i32,
        accelerator: proto::Accelerator::Tcg as i32,
        vcpus: 1,
        memory_bytes: 64 << 20,
        kernel_path: kernel.display().to_string(),
        readiness_console_marker: MARKER.into(),
        ..Default::default()
    };
    let cases: Vec<(&str, proto::VmSpec, &str, &str)> = vec![
        (
            "no-kernel",
            proto::VmSpec {
                kernel_path: files
                    .path()
                    .join("nonexistent-vmlinuz")
                    .display()
                    .to_string(),
                ..base.clone()
            },
            "KernelNotFound",
            "nonexistent-vmlinuz",
        ),
        (
            "not-allowed",
            proto::VmSpec {
                kernel_path: "/proc/1/root/etc/shadow".into(),
                ..base.clone()
            },
            "PathNotAllowed",
            "kernel.path",
        ),
        (
            "bad-initrd",
            proto::VmSpec {
                initrd_path: initrd_dir.display().to_string(),
                ..base.clone()
            },
            "InitrdUnreadable",
            "initrd.img",
        ),
        (
            "too-big",
            proto::VmSpec {
                memory_bytes: 1 << 50,
                ..base.clone()
            },
            "InsufficientMemory",
            "memory",
        ),
        (
            "unknown-hv",
            proto::VmSpec {
                // A hypervisor this agent does not know (a newer controller's).
                hypervisor: 99,
                ..base.clone()
            },
            "UnknownHypervisor",
            "99",
        ),
        (
            "no-firecracker",
            proto::VmSpec {
                hypervisor: proto::Hypervisor::Firecracker as i32,
                accelerator: proto::Accelerator::Unspecified as i32,
                ..base.clone()
            },
            "HypervisorUnavailable",
            "firecracker",
        ),
        (
            "nat-net",
            proto::VmSpec {
                interfaces: vec![proto::NetworkInterface {
                    name: "eth0".into(),
                    mode: proto::InterfaceMode::Nat as i32,
                    ..Default::default()
                }],
                ..base.clone()
            },
            "NetworkingUnavailable",
            "guest networking is not available on this agent",
        ),
        (
            "needs-kvm",
            proto::VmSpec {
                accelerator: proto::Accelerator::Kvm as i32,
                ..base.clone()
            },
            "KvmUnavailable",
            "KVM",
        ),
    ];
    for (uid, mut spec, reason, names) in cases {
        spec.uid = uid.into();
        let vm = client
            .apply_vm(apply_request(spec))
            .await
            .expect("apply answers")
            .into_inner();
        assert_eq!(vm.state(), proto::VmState::Failed, "{uid}: {vm:?}");
        let exit = vm.exit.clone().expect("exit info");
        assert_eq!(exit.reason, reason, "{uid}: {exit:?}");
        assert!(
            exit.message.contains(names),
            "{uid}: {:?} should name {names:?}",
            exit.message
        );
        assert!(exit.permanent, "{uid}");
        assert_eq!(vm.pid, 0, "{uid}: no process");
        let dir = tmp.path().join("vms").join(uid);
        assert_eq!(
            files_under(&dir),
            vec![Path::new("status.json").to_path_buf()],
            "{uid}"
        );
        println!("MEASURE {uid}: {reason}: {}", exit.message);
        let deleted = client
            .delete_vm(proto::DeleteVmRequest {
                uid: uid.into(),
                grace_period_seconds: 0,
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        assert!(deleted.existed);
        assert!(!dir.exists(), "{uid}");
    }
    let bad = client
        .apply_vm(apply_request(proto::VmSpec {
            uid: "../escape".into(),
            ..base.clone()
        }))
        .await
        .expect_err("bad uid");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_readopts_vms_and_five_boot_at_once() {
    if !qemu_present() {
        return;
    }
    let guest = demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut reaper = Reaper::default();
    let mut agent = AgentProcess::spawn(tmp.path());
    let mut client = connect(&agent.socket, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_kib = rss_kib(agent.pid());

    let uids: Vec<String> = (1..=5).map(|i| format!("five-{i}")).collect();
    let applies = uids.iter().map(|uid| {
        let mut client = client.clone();
        let request = apply_request(demo_spec(uid, &guest));
        async move { client.apply_vm(request).await.expect("apply").into_inner() }
    });
    let applied = futures::future::join_all(applies).await;
    reaper.0.extend(applied.iter().map(|vm| vm.pid));
    let mut ready = Vec::new();
    for uid in &uids {
        ready.push(wait_vm(&mut client, uid, BOOT, |vm| vm.ready).await);
    }
    let with_five_kib = rss_kib(agent.pid());
    let times: Vec<u64> = ready.iter().map(|vm| vm.apply_to_ready_ms).collect();
    println!(
        "MEASURE agent RSS idle {idle_kib} KiB, with 5 VMs {with_five_kib} KiB; 5 concurrent ApplyVM->Ready ms {times:?}"
    );

    // Crash the agent; the VMMs must survive and be re-adopted by the next one.
    let pids: Vec<u32> = ready.iter().map(|vm| vm.pid).collect();
    agent.kill();
    for pid in &pids {
        assert!(pid_alive(*pid), "VMM {pid} died with the agent");
    }
    let agent2 = AgentProcess::spawn(tmp.path());
    let mut client = connect(&agent2.socket, Duration::from_secs(20)).await;
    for (uid, pid) in uids.iter().zip(&pids) {
        let vm = client
            .get_vm(proto::GetVmRequest { uid: uid.clone() })
            .await
            .expect("re-adopted")
            .into_inner();
        assert_eq!(vm.pid, *pid, "{uid}");
        assert_eq!(vm.state(), proto::VmState::Running, "{uid}");
        assert!(vm.ready, "{uid}");
    }

    // A re-adopted VMM (not the agent's child) that dies is noticed through /proc.
    let mut events = client
        .watch_v_ms(proto::WatchVMsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let victim = uids[0].clone();
    sigkill(pids[0]);
    let exit = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(event) = events.next().await {
            if let Some(proto::vm_event::Event::Vm(v)) = event.expect("event").event
                && v.uid == victim
                && v.state() == proto::VmState::Exited
            {
                return v.exit.expect("exit info");
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("EXITED event in time");
    assert!(!exit.reason.is_empty());
    println!(
        "MEASURE re-adopted VMM killed: {} ({})",
        exit.reason, exit.message
    );

    // Kill the agent again, kill a VMM while it is down: reported as exited on restart.
    drop(agent2);
    sigkill(pids[1]);
    wait_pid_gone(pids[1], Duration::from_secs(10)).await;
    let agent3 = AgentProcess::spawn(tmp.path());
    let mut client = connect(&agent3.socket, Duration::from_secs(20)).await;
    let vm = client
        .get_vm(proto::GetVmRequest {
            uid: uids[1].clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(vm.state(), proto::VmState::Exited, "{vm:?}");
    let exit = vm.exit.expect("exit");
    println!(
        "MEASURE VMM killed while the agent was down: {} ({})",
        exit.reason, exit.message
    );
    assert!(!exit.reason.is_empty());

    for uid in &uids {
        client
            .delete_vm(proto::DeleteVmRequest {
                uid: uid.clone(),
                grace_period_seconds: 1,
                ..Default::default()
            })
            .await
            .expect("delete");
    }
    for pid in &pids {
        wait_pid_gone(*pid, Duration::from_secs(10)).await;
    }
    assert!(files_under(&tmp.path().join("vms")).is_empty());
    drop(agent3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_needs_a_client_certificate_from_the_ca() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let ca = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate().expect("key");
    let server_cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("server cert");
    let client_key = KeyPair::generate().expect("key");
    // The one client identity agents admit (src/agent/tls.rs).
    let client_cert = CertificateParams::new(vec!["ignis-controller".to_owned()])
        .expect("params")
        .signed_by(&client_key, &ca)
        .expect("client cert");
    let stranger_key = KeyPair::generate().expect("key");
    let stranger_cert = CertificateParams::new(vec!["ignis-controller".to_owned()])
        .expect("params")
        .self_signed(&stranger_key)
        .expect("stranger cert");

    let tmp = tempfile::tempdir().expect("tmp");
    let write = |name: &str, text: String| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    let mut config = local_config(tmp.path());
    config.listen = ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr"));
    config.tls = Some(ServerTls::Files(TlsFiles {
        cert: write("server.pem", server_cert.pem()),
        key: write("server.key", server_key.serialize_pem()),
        client_ca: write("ca.pem", ca_cert.pem()),
    }));
    let shutdown = CancellationToken::new();
    let agent = serve(config, shutdown.clone()).await.expect("serve");
    let ListenAddr::Tcp(addr) = agent.listen.clone() else {
        panic!("tcp")
    };
    let url = format!("https://{addr}");
    let ca_pem = Certificate::from_pem(ca_cert.pem());

    let call = |tls: ClientTlsConfig| {
        let url = url.clone();
        async move {
            let channel = Endpoint::from_shared(url)
                .expect("url")
                .tls_config(tls)
                .expect("tls")
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(5))
                .connect()
                .await;
            match channel {
                Ok(channel) => proto::agent_client::AgentClient::new(channel)
                    .get_host(proto::GetHostRequest {})
                    .await
                    .map(|r| r.into_inner().node_name)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let base = || {
        ClientTlsConfig::new()
            .ca_certificate(ca_pem.clone())
            .domain_name("localhost")
    };
    let ok = call(base().identity(Identity::from_pem(
        client_cert.pem(),
        client_key.serialize_pem(),
    )))
    .await;
    assert!(
        ok.is_ok(),
        "a client with a CA-signed cert is served: {ok:?}"
    );
    let anonymous = call(base()).await;
    assert!(anonymous.is_err(), "a client without a cert is refused");
    let stranger = call(base().identity(Identity::from_pem(
        stranger_cert.pem(),
        stranger_key.serialize_pem(),
    )))
    .await;
    assert!(
        stranger.is_err(),
        "a client with a cert from another CA is refused"
    );
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_to_ready_against_bare_qemu_console_follow_heartbeat_and_stop_on_exit() {
    if !qemu_present() {
        return;
    }
    let guest = demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = local_config(tmp.path());
    config.stop_vms_on_exit = true;
    let (agent, mut client, shutdown) = serve_with_client(config).await;
    let mut reaper = Reaper::default();

    // Heartbeats carry this start's instance id.
    let host = client
        .get_host(proto::GetHostRequest {})
        .await
        .expect("host")
        .into_inner();
    let mut events = client
        .watch_v_ms(proto::WatchVMsRequest {})
        .await
        .expect("watch")
        .into_inner();
    let heartbeat = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(event) = events.next().await {
            if let Some(proto::vm_event::Event::Heartbeat(hb)) = event.expect("event").event {
                return hb;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("a heartbeat within 5 s");
    assert_eq!(heartbeat.instance_id, host.instance_id);

    // Alternate bare QEMU and the agent so both see the same host load.
    let mut bare = Vec::new();
    let mut agent_ms = Vec::new();
    let mut last_pid = 0;
    for i in 0..3 {
        bare.push(bare_qemu_boot_ms(&guest, tmp.path()).await as u64);
        let uid = format!("measure-{i}");
        let vm = client
            .apply_vm(apply_request(demo_spec(&uid, &guest)))
            .await
            .expect("apply")
            .into_inner();
        reaper.0.push(vm.pid);
        // Follow the console from the start: the marker arrives through the stream.
        let mut console = client
            .console(proto::ConsoleRequest {
                uid: uid.clone(),
                tail_bytes: 1 << 20,
                follow: true,
            })
            .await
            .expect("console")
            .into_inner();
        let mut seen = Vec::new();
        tokio::time::timeout(BOOT, async {
            while let Some(chunk) = console.next().await {
                seen.extend(chunk.expect("chunk").data);
                if String::from_utf8_lossy(&seen).contains(MARKER) {
                    return;
                }
            }
            panic!("the console ended without the marker");
        })
        .await
        .expect("marker on the followed console");
        let vm = wait_vm(&mut client, &uid, BOOT, |vm| vm.ready).await;
        agent_ms.push(vm.apply_to_ready_ms);
        last_pid = vm.pid;
        if i < 2 {
            client
                .delete_vm(proto::DeleteVmRequest {
                    uid,
                    grace_period_seconds: 0,
                    ..Default::default()
                })
                .await
                .expect("delete");
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    println!(
        "MEASURE bare qemu boot-to-marker ms {bare:?} (median {}); ApplyVM->Ready ms {agent_ms:?} (median {})",
        median(&mut bare.clone()),
        median(&mut agent_ms.clone())
    );

    // `--stop-vms-on-exit`: the last VM is stopped when the agent stops.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("agent stops in time")
        .expect("agent stops cleanly");
    wait_pid_gone(last_pid, Duration::from_secs(10)).await;
    let status: serde_json::Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("vms/measure-2/status.json")).expect("status"),
    )
    .expect("json");
    assert_eq!(status["phase"], "Stopped");
}
