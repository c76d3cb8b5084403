//! The supervisor with the Firecracker and Cloud Hypervisor backends driving their test double
//! (`crate::testing::vmm`), which behaves as the real v1.17-dev and v54 were seen to (issue
//! #13): where each VMM logs, how it ends after a vCPU error, what it does on a guest reset.

use super::*;
use crate::agent::vmm::cloud_hypervisor::CloudHypervisorBackend;
use crate::agent::vmm::firecracker::FirecrackerBackend;
use crate::testing::vmm::{FakeVmm, Fate, Flavor, Guest};

/// A supervisor on KVM (both VMMs need it) with the double's backend.
async fn on_kvm(dir: &Path, fake: &FakeVmm) -> Supervisor {
    let backend: Arc<dyn VmmBackend> = match fake.flavor() {
        Flavor::Firecracker => Arc::new(FirecrackerBackend::new(fake.binary()).expect("backend")),
        Flavor::CloudHypervisor => {
            Arc::new(CloudHypervisorBackend::new(fake.binary()).expect("backend"))
        }
    };
    let config = SupervisorConfig {
        accelerator: Accelerator::Kvm,
        ..test_config(dir, Duration::from_secs(3))
    };
    supervisor_on(
        config,
        &dir.join("state"),
        backend,
        fake.binary().to_path_buf(),
    )
    .await
}

fn marked(uid: &str, kernel: &Path, marker: &str) -> ApplyRequest {
    let mut request = request(uid, kernel, "h", 1, DesiredState::Running);
    request.spec.readiness_console_marker = Some(marker.into());
    request
}

/// Firecracker logs `Running Firecracker v…` at start, to stdout unless given `--log-path`;
/// stdout is the guest console. A guest that prints nothing must not pass a marker that only
/// the VMM's log contains (it did, in 41 ms), and the boot-timeout message must not quote that
/// log as console output.
#[tokio::test]
async fn firecracker_readiness_and_timeouts_see_guest_output_only() {
    let (tmp, kernel) = dir_with_kernel();
    let fake = FakeVmm::start(Flavor::Firecracker, tmp.path());
    let sup = on_kvm(tmp.path(), &fake).await;

    sup.apply(marked("silent", &kernel, "Running Firecracker"))
        .await;
    let failed = wait_state(&sup, "silent", RunState::Failed).await;
    assert!(!failed.ready && failed.ready_at_unix_ms == 0, "false Ready");
    let exit = failed.exit.expect("exit");
    assert_eq!(exit.reason, ExitReason::BootTimeout);
    assert!(
        exit.message
            .ends_with("The guest printed nothing on its console."),
        "{}",
        exit.message
    );
    assert!(!exit.message.contains("Firecracker v"), "{}", exit.message);
    // Its log went to the VMM log (the failed run's files are gone by now).
    let spawn = &fake.spawns()[0];
    assert!(
        spawn.log.ends_with("vms/silent/vmm.log"),
        "{}",
        spawn.log.display()
    );

    // A guest that prints the marker is ready; its console holds nothing of the VMM's.
    fake.guest(Guest {
        console: "[    0.5] Run /init as init process\nignis: ready\n".into(),
        ..Guest::default()
    });
    sup.apply(marked("talks", &kernel, "ignis: ready")).await;
    let ready = wait_state(&sup, "talks", RunState::Running).await;
    assert!(ready.ready);
    let dir = tmp.path().join("state/vms/talks");
    let console = std::fs::read_to_string(dir.join("console.log")).expect("console");
    assert_eq!(
        console,
        "[    0.5] Run /init as init process\nignis: ready\n"
    );
    let log = std::fs::read_to_string(dir.join("vmm.log")).expect("vmm.log");
    assert!(log.contains("[talks:main] Running Firecracker v"), "{log}");
    assert!(
        log.contains("[talks:fc_api] The API server received a Put request on \"/actions\""),
        "{log}"
    );
    sup.delete(&uid("talks"), Some(Duration::ZERO))
        .await
        .expect("delete");
    sup.shutdown(false).await;
}

/// Cloud Hypervisor v54 logs `VCPU generated error` and exits 0: a crash, not a clean
/// shutdown, so `RerunOnFailure` restarts it.
#[tokio::test]
async fn a_cloud_hypervisor_vcpu_error_is_a_guest_crash() {
    let (tmp, kernel) = dir_with_kernel();
    let fake = FakeVmm::start(Flavor::CloudHypervisor, tmp.path());
    fake.guest(Guest {
        console: "ignis: ready\n".into(),
        fate: Fate::VcpuError,
        after: Duration::from_millis(300),
    });
    let sup = on_kvm(tmp.path(), &fake).await;
    sup.apply(marked("crashy", &kernel, "ignis: ready")).await;
    wait_state(&sup, "crashy", RunState::Running).await;
    let exited = wait_state(&sup, "crashy", RunState::Exited).await;
    let exit = exited.exit.expect("exit");
    assert_eq!(
        (exit.success, exit.reason.clone(), exit.exit_code),
        (false, ExitReason::GuestCrashed, 0)
    );
    assert!(
        exit.message.contains("VCPU generated error"),
        "{}",
        exit.message
    );
    sup.shutdown(false).await;
}

/// Cloud Hypervisor reboots a guest in place on a reset: the process and the run go on.
#[tokio::test]
async fn a_cloud_hypervisor_guest_reset_reboots_in_place() {
    let (tmp, kernel) = dir_with_kernel();
    let fake = FakeVmm::start(Flavor::CloudHypervisor, tmp.path());
    fake.guest(Guest {
        console: "ignis: ready\n".into(),
        fate: Fate::Reboot,
        after: Duration::from_millis(100),
    });
    let sup = on_kvm(tmp.path(), &fake).await;
    sup.apply(marked("resets", &kernel, "ignis: ready")).await;
    let running = wait_state(&sup, "resets", RunState::Running).await;
    let console = tmp.path().join("state/vms/resets/console.log");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("Restarting system")
    {
        assert!(Instant::now() < deadline, "the guest never reset");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = sup.get(&uid("resets")).expect("held");
    assert_eq!((after.state, after.pid), (RunState::Running, running.pid));
    assert!(after.exit.is_none());
    assert!(crate::agent::vmm::process::is_running(running.pid));
    sup.delete(&uid("resets"), Some(Duration::ZERO))
        .await
        .expect("delete");
    sup.shutdown(false).await;
}
