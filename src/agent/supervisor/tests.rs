//! The supervisor's I/O shell with the simulated VMM (a real `sleep` process) and a silent
//! QEMU double.

use std::path::Path;
use std::time::Instant;

use super::*;
use crate::agent::host;
use crate::agent::simulated::SimulatedBackend;
use crate::agent::state::StateStore;
use crate::agent::vmm::{VmConfig, VmmBackend, VmmError, VmmHandle};
use crate::telemetry::MetricsRegistry;
use crate::vm::{DesiredState, ExitReason, Interface, InterfaceMode, VmSpec};

/// A temporary directory with a stand-in kernel file (the simulated backend and the VMM
/// doubles only check that it is there).
pub(crate) fn dir_with_kernel() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tmp");
    let kernel = tmp.path().join("vmlinuz");
    std::fs::write(&kernel, b"k").expect("kernel");
    (tmp, kernel)
}

#[tokio::test]
async fn networking_turned_off_fails_nat_but_not_none() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    let mut nat = request("n", &kernel, "h", 1, DesiredState::Running);
    nat.spec.interfaces = vec![Interface {
        name: "eth0".into(),
        mode: InterfaceMode::Nat,
        ..Default::default()
    }];
    let vm = sup.apply(nat).await;
    let exit = vm.exit.expect("failed");
    assert_eq!(
        exit.reason,
        ExitReason::boot_failed("NetworkingUnavailable")
    );
    assert!(exit.permanent);
    assert!(exit.message.contains("turned off"), "{}", exit.message);
    let mut none = request("o", &kernel, "h", 1, DesiredState::Running);
    none.spec.interfaces = vec![Interface {
        name: "eth0".into(),
        mode: InterfaceMode::None,
        ..Default::default()
    }];
    sup.apply(none).await;
    assert!(
        wait_state(&sup, "o", RunState::Running)
            .await
            .ip_addresses
            .is_empty()
    );
    sup.shutdown(false).await;
}

/// `ignis dev` sends no pod: an interface on the pod's network can never be had there.
#[tokio::test]
async fn mode_pod_without_a_pod_fails_the_vm_for_good() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    let mut request = request("p", &kernel, "h", 1, DesiredState::Running);
    request.spec.interfaces = vec![Interface {
        name: "eth0".into(),
        mode: InterfaceMode::Pod,
        ..Default::default()
    }];
    let vm = sup.apply(request).await;
    assert_eq!(vm.state, RunState::Failed);
    let exit = vm.exit.expect("failed");
    assert_eq!(exit.reason, ExitReason::boot_failed("NoVmPod"));
    assert!(exit.permanent);
    assert!(exit.message.contains("eth0"), "{}", exit.message);
    sup.shutdown(false).await;
}

/// A unit-test double: a `sleep` process that claims to be QEMU and never prints a
/// console marker, to drive the boot deadline.
struct SilentQemu(SimulatedBackend);

#[async_trait::async_trait]
impl VmmBackend for SilentQemu {
    fn kind(&self) -> Hypervisor {
        Hypervisor::Qemu
    }
    fn supports(&self, _: Accelerator) -> bool {
        true
    }
    async fn create(&self, config: &VmConfig) -> Result<crate::agent::vmm::Spawned, VmmError> {
        self.0.create(config).await
    }
    async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.0.start(handle).await
    }
    async fn stop(&self, _: &VmmHandle) -> Result<(), VmmError> {
        // A guest that ignores the power button: only kill ends it.
        Ok(())
    }
    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.0.kill(handle).await
    }
    async fn state(&self, handle: &VmmHandle) -> Result<crate::agent::vmm::VmmState, VmmError> {
        self.0.state(handle).await
    }
    fn exit_quirks(&self) -> &'static crate::agent::vmm::ExitQuirks {
        self.0.exit_quirks()
    }
}

async fn supervisor(dir: &Path, backend: Arc<dyn VmmBackend>, simulated: bool) -> Supervisor {
    supervisor_with(dir, backend, simulated, Duration::from_millis(400)).await
}

async fn supervisor_with(
    dir: &Path,
    backend: Arc<dyn VmmBackend>,
    simulated: bool,
    boot_timeout: Duration,
) -> Supervisor {
    let config = SupervisorConfig {
        simulated,
        ..test_config(dir, boot_timeout)
    };
    supervisor_on(config, dir, backend, PathBuf::from("sleep")).await
}

/// The host every supervisor test runs on: 4 vCPUs, 8 GiB, TCG, no network, the image cache
/// in `dir`.
fn test_config(dir: &Path, boot_timeout: Duration) -> SupervisorConfig {
    SupervisorConfig {
        boot_timeout,
        console_max_bytes: 1 << 20,
        pods: crate::agent::pod::Host::new(None),
        host: HostCapacity {
            vcpus: 4,
            memory_bytes: 8 << 30,
        },
        accelerator: Accelerator::Tcg,
        accelerator_detail: "test".into(),
        simulated: false,
        unavailable: Vec::new(),
        network: None,
        images: Some(crate::agent::image::ImageStoreConfig::new(
            dir.join("images"),
        )),
        // Unconfined: a unit test's executable is its harness, not `ignis jailer`; the
        // confined spawn is tested with the real binary (tests/vmm_confinement.rs).
        policy: crate::agent::confine::VmmPolicy {
            ids: None,
            allowed_path_dirs: vec![dir.to_path_buf()],
            allow_tcg: true,
        },
        max_snapshots: 4,
    }
}

/// A supervisor with one backend, its state under `state_dir`.
async fn supervisor_on(
    config: SupervisorConfig,
    state_dir: &Path,
    backend: Arc<dyn VmmBackend>,
    binary: PathBuf,
) -> Supervisor {
    Supervisor::new(
        config,
        StateStore::open(state_dir).expect("store"),
        vec![BackendEntry { backend, binary }],
        AgentMetrics::register(&MetricsRegistry::with_prefix("test")).await,
    )
}

/// A supervisor whose QEMU double never prints the readiness marker.
async fn silent_qemu(dir: &Path) -> Supervisor {
    supervisor(
        dir,
        Arc::new(SilentQemu(SimulatedBackend::default())),
        false,
    )
    .await
}

fn request(uid: &str, kernel: &Path, hash: &str, run: u32, desired: DesiredState) -> ApplyRequest {
    ApplyRequest {
        spec: VmSpec {
            memory_bytes: 64 << 20,
            kernel: crate::vm::GuestFile::Path(kernel.display().to_string()),
            readiness_console_marker: Some("ignis: ready".into()),
            ..crate::testing::vm_spec(uid)
        },
        spec_hash: hash.into(),
        run,
        desired,
        pull_secrets: Default::default(),
        pod: None,
        metadata: Default::default(),
        owner: None,
    }
}

fn uid(uid: &str) -> VmUid {
    VmUid::new(uid).expect("uid")
}

async fn wait_state(sup: &Supervisor, name: &str, state: RunState) -> VmStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    let uid = uid(name);
    loop {
        if let Some(vm) = sup.get(&uid)
            && vm.state == state
        {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "{uid} never reached {state:?}: {:?}",
            sup.get(&uid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn simulated_vms_converge_replace_stop_and_delete() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    let (mut events, _) = sup.subscribe();
    let vm = sup
        .apply(request("a", &kernel, "h1", 1, DesiredState::Running))
        .await;
    assert_eq!(vm.hypervisor, Some(Hypervisor::Simulated));
    let first = wait_state(&sup, "a", RunState::Running).await;
    assert!(first.ready && first.pid > 0);
    assert!(events.try_recv().is_ok(), "changes are published");

    let same = sup
        .apply(request("a", &kernel, "h1", 1, DesiredState::Running))
        .await;
    assert_eq!(same.pid, first.pid, "same request, same VM");

    sup.apply(request("a", &kernel, "h2", 1, DesiredState::Running))
        .await;
    let second = wait_state(&sup, "a", RunState::Running).await;
    assert_ne!(second.pid, first.pid, "a new hash replaces the VMM");
    assert!(
        !host::is_same_live_process(first.pid, 0)
            || host::proc_stat(first.pid).is_none_or(|s| s.state == 'Z')
    );

    let stopped = sup
        .apply(request("a", &kernel, "h2", 1, DesiredState::Stopped))
        .await;
    assert_eq!(stopped.state, RunState::Stopped);
    assert_eq!(
        sup.usage(),
        (1, 64 << 20),
        "a stopped VM still holds its reservation"
    );

    assert!(
        sup.delete(&uid("a"), Some(Duration::ZERO))
            .await
            .expect("delete")
    );
    assert!(!sup.delete(&uid("a"), None).await.expect("delete twice"));
    assert!(!tmp.path().join("vms/a").exists());
    assert_eq!(sup.usage(), (0, 0));
    sup.shutdown(false).await;
}

#[tokio::test]
async fn a_guest_that_never_gets_ready_fails_with_boot_timeout_and_is_killed() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = silent_qemu(tmp.path()).await;
    let vm = sup
        .apply(request("slow", &kernel, "h", 1, DesiredState::Running))
        .await;
    assert_eq!(vm.state, RunState::Starting);
    let pid = vm.pid;
    let failed = wait_state(&sup, "slow", RunState::Failed).await;
    let exit = failed.exit.expect("exit");
    assert_eq!(exit.reason, ExitReason::BootTimeout);
    assert!(!exit.permanent);
    let deadline = Instant::now() + Duration::from_secs(5);
    while host::proc_stat(pid).is_some_and(|s| s.state != 'Z') {
        assert!(Instant::now() < deadline, "the VMM was not killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("vms/slow"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("status.json")]);

    // Run 2 boots again (the controller's restart), and a re-adopting supervisor on the
    // same directory finds the failure recorded.
    let again = sup
        .apply(request("slow", &kernel, "h", 2, DesiredState::Running))
        .await;
    assert_eq!(again.state, RunState::Starting);
    assert_ne!(again.pid, pid);
    wait_state(&sup, "slow", RunState::Failed).await;
    sup.shutdown(false).await;
    let next = silent_qemu(tmp.path()).await;
    assert_eq!(next.adopt().await.expect("adopt"), 1);
    assert_eq!(
        next.get(&uid("slow")).expect("held").state,
        RunState::Failed
    );
    next.shutdown(false).await;
}

#[tokio::test]
async fn boot_deadline_misses_in_a_row_become_permanent() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = silent_qemu(tmp.path()).await;
    for run in 1..=readiness::BOOT_TIMEOUTS_BEFORE_PERMANENT {
        sup.apply(request("stuck", &kernel, "h", run, DesiredState::Running))
            .await;
        let failed = wait_state(&sup, "stuck", RunState::Failed).await;
        assert_eq!(failed.run, run);
        let exit = failed.exit.expect("exit");
        assert_eq!(exit.reason, ExitReason::BootTimeout);
        let last = run == readiness::BOOT_TIMEOUTS_BEFORE_PERMANENT;
        assert_eq!(exit.permanent, last, "run {run}: {}", exit.message);
        assert!(
            exit.message
                .contains("Last guest console output: simulated VM"),
            "{}",
            exit.message
        );
    }
    // The count survives an agent restart (it is in status.json).
    sup.shutdown(false).await;
    let next = silent_qemu(tmp.path()).await;
    next.adopt().await.expect("adopt");
    assert_eq!(
        next.get(&uid("stuck")).expect("held").boot_timeouts,
        readiness::BOOT_TIMEOUTS_BEFORE_PERMANENT
    );
    next.shutdown(false).await;
}

#[tokio::test]
async fn deleting_a_guest_that_never_got_ready_does_not_wait_its_grace_period() {
    let (tmp, kernel) = dir_with_kernel();
    // A guest that ignores the power button, with a boot deadline far away.
    let sup = supervisor_with(
        tmp.path(),
        Arc::new(SilentQemu(SimulatedBackend::default())),
        false,
        Duration::from_secs(120),
    )
    .await;
    let grace = Duration::from_secs(30);
    let mut booting = request("booting", &kernel, "h", 1, DesiredState::Running);
    booting.spec.termination_grace_period_seconds = grace.as_secs() as i64;
    let vm = sup.apply(booting).await;
    assert_eq!(vm.state, RunState::Starting);
    let began = Instant::now();
    assert!(sup.delete(&uid("booting"), None).await.expect("delete"));
    let took = began.elapsed();
    assert!(took < grace / 3, "delete of a booting VM took {took:?}");
    assert!(
        !host::is_same_live_process(vm.pid, 0)
            || host::proc_stat(vm.pid).is_none_or(|s| s.state == 'Z')
    );
    assert!(!tmp.path().join("vms/booting").exists());

    // A ready guest still gets its graceful stop and its grace period (this one ignores it).
    let mut ready = request("ready", &kernel, "h", 1, DesiredState::Running);
    ready.spec.readiness_console_marker = None;
    ready.spec.termination_grace_period_seconds = 1;
    sup.apply(ready).await;
    wait_state(&sup, "ready", RunState::Running).await;
    let began = Instant::now();
    assert!(sup.delete(&uid("ready"), None).await.expect("delete"));
    assert!(
        began.elapsed() >= Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    sup.shutdown(false).await;
}

mod claims;
mod damaged_state;
mod http_vmms;
mod suspend;

/// A unit-test double: the simulated VMM, created only after `delay`, the way a VM pod's boot
/// waits for its sandbox (seconds on a busy node).
struct SlowCreate {
    inner: SimulatedBackend,
    delay: Duration,
}

#[async_trait::async_trait]
impl VmmBackend for SlowCreate {
    fn kind(&self) -> Hypervisor {
        self.inner.kind()
    }
    fn supports(&self, accelerator: Accelerator) -> bool {
        self.inner.supports(accelerator)
    }
    async fn create(&self, config: &VmConfig) -> Result<crate::agent::vmm::Spawned, VmmError> {
        tokio::time::sleep(self.delay).await;
        self.inner.create(config).await
    }
    async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.inner.start(handle).await
    }
    async fn stop(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.inner.stop(handle).await
    }
    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.inner.kill(handle).await
    }
    async fn state(&self, handle: &VmmHandle) -> Result<crate::agent::vmm::VmmState, VmmError> {
        self.inner.state(handle).await
    }
    fn exit_quirks(&self) -> &'static crate::agent::vmm::ExitQuirks {
        self.inner.exit_quirks()
    }
}

/// The controller gives up on an `ApplyVM` after its call deadline, which drops the agent's
/// handler: the boot it began goes on to a running VMM all the same (it once stopped between
/// two steps, and the VM stayed creating for good: the next apply saw the run as begun).
#[tokio::test]
async fn a_boot_whose_caller_gives_up_still_finishes() {
    let (tmp, kernel) = dir_with_kernel();
    let backend = SlowCreate {
        inner: SimulatedBackend::default(),
        delay: Duration::from_millis(300),
    };
    let sup = supervisor_with(tmp.path(), Arc::new(backend), true, Duration::from_secs(5)).await;
    let apply = sup.apply(request("g", &kernel, "h", 1, DesiredState::Running));
    let gave_up = tokio::time::timeout(Duration::from_millis(50), apply).await;
    assert!(
        gave_up.is_err(),
        "the create was meant to outlast the caller"
    );
    let vm = wait_state(&sup, "g", RunState::Running).await;
    assert_ne!(vm.pid, 0, "{vm:?}");
    // Asked again, the agent reports the run it finished rather than begins another.
    let again = sup
        .apply(request("g", &kernel, "h", 1, DesiredState::Running))
        .await;
    assert_eq!((again.run, again.pid), (vm.run, vm.pid));
    assert!(sup.delete(&uid("g"), None).await.expect("delete"));
    sup.shutdown(false).await;
}
