//! Damaged state files (issue #13 defect 4) with stand-in VMMs: `sh` processes whose command
//! line names a VM's API socket, in a process group of their own, as every backend's VMM is.
//! The real QEMU case is `tests/agent_lifecycle.rs`.

use super::*;
use crate::agent::vmm::process::{self, Output};

/// A stand-in VMM of the VM whose state directory is `dir`.
fn stand_in(dir: &Path) -> tokio::process::Child {
    let sh = process::resolve_binary(Path::new("sh")).expect("sh");
    let socket = dir.join("api.sock").display().to_string();
    // Two commands, so `sh` stays (it would exec a lone one) with the socket as `$0`.
    let child = process::spawn(
        &sh,
        ["-c", "sleep 60; exit 0", &socket],
        Output::Null,
        Output::Null,
        None,
        Vec::new(),
    )
    .expect("spawn");
    // A process names its new arguments a moment after its exec is reported (the kernel
    // closes the exec-error pipe before it sets up the new command line): a VMM running is
    // one whose command line names the socket already.
    let pid = child.id().expect("pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
        cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == socket.as_bytes())
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "the stand-in never named {socket}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child
}

async fn gone(child: &mut tokio::process::Child) {
    tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the stand-in was never killed")
        .expect("reap");
}

/// An empty `status.json` (a full disk at the wrong time): nothing of the VM can be trusted,
/// so its VMM is killed and its directory removed, not left running unheld.
#[tokio::test]
async fn an_unreadable_status_leaves_no_vmm_running() {
    let tmp = tempfile::tempdir().expect("tmp");
    let store = StateStore::open(tmp.path()).expect("store");
    let dir = store.create_vm_dir(&uid("emptied")).expect("dir");
    std::fs::write(dir.join("status.json"), b"").expect("status");
    let mut vmm = stand_in(&dir);
    let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    assert_eq!(sup.adopt().await.expect("adopt"), 0);
    gone(&mut vmm).await;
    assert!(!dir.exists());
    sup.shutdown(false).await;
}

/// Delete kills every VMM naming the VM's socket, held or not: an orphan never outlives it.
#[tokio::test]
async fn delete_leaves_no_vmm_of_the_vm_running() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    sup.apply(request("held", &kernel, "h", 1, DesiredState::Running))
        .await;
    wait_state(&sup, "held", RunState::Running).await;
    let mut orphan = stand_in(&tmp.path().join("vms/held"));
    // A directory the agent does not hold (a crash mid-create) with a VMM in it.
    let unheld = tmp.path().join("vms/unheld");
    std::fs::create_dir_all(&unheld).expect("dir");
    let mut unheld_vmm = stand_in(&unheld);

    assert!(
        sup.delete(&uid("held"), Some(Duration::ZERO))
            .await
            .expect("delete")
    );
    gone(&mut orphan).await;
    assert!(sup.delete(&uid("unheld"), None).await.expect("delete"));
    gone(&mut unheld_vmm).await;
    assert!(!unheld.exists());
    sup.shutdown(false).await;
}

/// A missing or damaged `handle.json` and no VMM: the status says the VMM ended while the
/// agent was down, not that it was never started (the false claim).
#[tokio::test]
async fn a_lost_handle_of_a_started_vm_is_reported_truthfully() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    let mut pids = Vec::new();
    for name in ["missing", "empty"] {
        sup.apply(request(name, &kernel, "h", 1, DesiredState::Running))
            .await;
        pids.push(wait_state(&sup, name, RunState::Running).await.pid);
    }
    sup.shutdown(false).await;
    for pid in pids {
        let handle = VmmHandle {
            pid,
            start_time_ticks: process::start_time(pid).unwrap_or(0),
            api_socket: tmp.path().join("none"),
            console_log: tmp.path().join("none"),
        };
        process::kill(&handle).await.expect("kill");
    }
    std::fs::remove_file(tmp.path().join("vms/missing/handle.json")).expect("rm");
    std::fs::write(tmp.path().join("vms/empty/handle.json"), b"").expect("truncate");

    let next = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    assert_eq!(next.adopt().await.expect("adopt"), 2);
    for (name, says) in [
        ("missing", "handle.json is missing"),
        ("empty", "handle.json is not valid"),
    ] {
        let vm = next.get(&uid(name)).expect("held");
        let exit = vm.exit.expect("exit");
        assert_eq!(
            (vm.state, exit.reason),
            (RunState::Failed, ExitReason::VmmLost)
        );
        assert!(
            exit.message.contains(says) && exit.message.contains("ended while the agent was down"),
            "{}",
            exit.message
        );
    }
    next.shutdown(false).await;
}
