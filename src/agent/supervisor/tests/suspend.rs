//! Suspend and resume in the supervisor, with a double of a VMM that snapshots: a `sleep`
//! process (the simulated VMM) whose snapshot is a file it writes and checks on restore, as
//! QEMU writes its migration stream and refuses a stream it cannot parse.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::agent::vmm::SnapshotFiles;

const STREAM: &str = "double.state";
const CONTENT: &[u8] = b"a saved guest";

struct SnapshottingSleep(SimulatedBackend);

#[async_trait::async_trait]
impl VmmBackend for SnapshottingSleep {
    fn kind(&self) -> Hypervisor {
        Hypervisor::Simulated
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
    async fn stop(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.0.stop(handle).await
    }
    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        self.0.kill(handle).await
    }
    async fn state(&self, handle: &VmmHandle) -> Result<crate::agent::vmm::VmmState, VmmError> {
        self.0.state(handle).await
    }
    async fn snapshot(&self, _: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        std::fs::write(snapshot.dir.join(STREAM), CONTENT).map_err(|source| VmmError::Io {
            operation: "snapshot".into(),
            source,
        })
    }
    async fn restore(&self, _: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        match std::fs::read(snapshot.dir.join(STREAM)) {
            Ok(bytes) if bytes == CONTENT => Ok(()),
            _ => Err(VmmError::SnapshotUnrestorable {
                detail: "not a stream this VMM wrote".into(),
            }),
        }
    }
    fn exit_quirks(&self) -> &'static crate::agent::vmm::ExitQuirks {
        self.0.exit_quirks()
    }
}

async fn snapshotting(dir: &Path, max_snapshots: usize) -> Supervisor {
    let config = SupervisorConfig {
        simulated: true,
        max_snapshots,
        ..test_config(dir, Duration::from_secs(5))
    };
    supervisor_on(
        config,
        dir,
        Arc::new(SnapshottingSleep(SimulatedBackend::default())),
        PathBuf::from("sleep"),
    )
    .await
}

fn running(uid: &str, kernel: &Path, desired: DesiredState) -> ApplyRequest {
    request(uid, kernel, "h", 1, desired)
}

fn snapshot_dir(tmp: &Path, name: &str) -> PathBuf {
    tmp.join("snapshots").join(name)
}

#[tokio::test]
async fn suspend_saves_and_ends_the_vmm_and_resume_loads_and_drops_the_snapshot() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = snapshotting(tmp.path(), 4).await;
    sup.apply(running("s", &kernel, DesiredState::Running))
        .await;
    let pid = wait_state(&sup, "s", RunState::Running).await.pid;
    let vm = sup
        .apply(running("s", &kernel, DesiredState::Suspended))
        .await;
    assert_eq!(vm.state, RunState::Suspended, "{vm:?}");
    assert_eq!(vm.pid, 0);
    assert_eq!(vm.snapshot_bytes, CONTENT.len() as u64, "the VMM's files");
    let dir = snapshot_dir(tmp.path(), "s");
    let mode = std::fs::metadata(&dir)
        .expect("snapshot dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "the suspended VM's VMM is gone"
    );
    // The same request again changes nothing.
    let again = sup
        .apply(running("s", &kernel, DesiredState::Suspended))
        .await;
    assert_eq!(again.state, RunState::Suspended);

    sup.apply(running("s", &kernel, DesiredState::Running))
        .await;
    let vm = wait_state(&sup, "s", RunState::Running).await;
    assert!(vm.ready && vm.snapshot_issue.is_none(), "{vm:?}");
    assert!(!dir.exists(), "a restored snapshot is removed");
    sup.shutdown(false).await;
}

#[tokio::test]
async fn a_suspend_beyond_the_nodes_limit_is_refused_and_the_vm_runs_on() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = snapshotting(tmp.path(), 1).await;
    for name in ["a", "b"] {
        sup.apply(running(name, &kernel, DesiredState::Running))
            .await;
        wait_state(&sup, name, RunState::Running).await;
    }
    let a = sup
        .apply(running("a", &kernel, DesiredState::Suspended))
        .await;
    assert_eq!(a.state, RunState::Suspended);
    let b = sup
        .apply(running("b", &kernel, DesiredState::Suspended))
        .await;
    assert_eq!(b.state, RunState::Running, "{b:?}");
    let issue = b.snapshot_issue.expect("the refusal");
    assert_eq!(issue.reason, "SnapshotLimitReached");
    assert!(issue.message.contains("at most 1"), "{}", issue.message);
    assert!(!snapshot_dir(tmp.path(), "b").exists());
    sup.shutdown(false).await;
}

#[tokio::test]
async fn a_damaged_snapshot_is_dropped_and_the_vm_boots_cold() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = snapshotting(tmp.path(), 4).await;
    sup.apply(running("d", &kernel, DesiredState::Running))
        .await;
    wait_state(&sup, "d", RunState::Running).await;
    sup.apply(running("d", &kernel, DesiredState::Suspended))
        .await;
    std::fs::write(snapshot_dir(tmp.path(), "d").join(STREAM), b"damaged").expect("damage");
    sup.apply(running("d", &kernel, DesiredState::Running))
        .await;
    let vm = wait_state(&sup, "d", RunState::Running).await;
    let issue = vm.snapshot_issue.expect("why it booted cold");
    assert_eq!(issue.reason, "SnapshotUnrestorable");
    assert!(issue.message.contains("booted cold"), "{}", issue.message);
    assert!(!snapshot_dir(tmp.path(), "d").exists());

    // A snapshot saved by another VMM build is not even offered to the VMM.
    sup.apply(running("d", &kernel, DesiredState::Suspended))
        .await;
    let record = snapshot_dir(tmp.path(), "d").join("snapshot.json");
    let text = std::fs::read_to_string(&record).expect("record");
    let mut json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["origin"]["vmm_build"] = "another build".into();
    std::fs::write(&record, json.to_string()).expect("rewrite");
    sup.apply(running("d", &kernel, DesiredState::Running))
        .await;
    let vm = wait_state(&sup, "d", RunState::Running).await;
    let issue = vm.snapshot_issue.expect("why it booted cold");
    assert!(
        issue.message.contains("another VMM build"),
        "{}",
        issue.message
    );
    sup.shutdown(false).await;
}

#[tokio::test]
async fn deleting_or_stopping_a_suspended_vm_removes_its_snapshot() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = snapshotting(tmp.path(), 4).await;
    for name in ["x", "y"] {
        sup.apply(running(name, &kernel, DesiredState::Running))
            .await;
        wait_state(&sup, name, RunState::Running).await;
        let vm = sup
            .apply(running(name, &kernel, DesiredState::Suspended))
            .await;
        assert_eq!(vm.state, RunState::Suspended);
    }
    let stopped = sup
        .apply(running("x", &kernel, DesiredState::Stopped))
        .await;
    assert_eq!(stopped.state, RunState::Stopped);
    assert!(!snapshot_dir(tmp.path(), "x").exists());
    assert!(sup.delete(&uid("y"), None).await.expect("delete"));
    assert!(!snapshot_dir(tmp.path(), "y").exists());
    sup.shutdown(false).await;
}
