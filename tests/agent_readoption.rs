//! Re-adoption when the agent's state files are damaged (issue #13 defect 4), with real QEMU
//! guests (TCG) and the real `ignis agent` binary killed and restarted: whatever a state file
//! holds, a restart ends with one VMM per VM and a truthful status, and delete leaves none.

mod common;

use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::*;
use ignis::proto;

const BOOT: Duration = Duration::from_secs(90);

/// Issue #13 defect 4: with an empty `handle.json` a restarted agent started a second QEMU
/// beside the first, said "the agent stopped before the VMM was started", and the orphan
/// survived delete. Whatever `handle.json` holds, a restart ends with one VMM per VM and a
/// status that says what happened, and delete leaves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_handle_file_never_leaves_two_vmms_or_an_orphan() {
    if !qemu_present() {
        return;
    }
    let guest = demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut reaper = Reaper::default();
    let mut agent = AgentProcess::spawn(tmp.path());
    let mut client = connect(&agent.socket, Duration::from_secs(20)).await;
    let boot = |client: &mut proto::agent_client::AgentClient<tonic::transport::Channel>,
                uid: &'static str| {
        let mut client = client.clone();
        let request = apply_request(demo_spec(uid, &guest));
        async move {
            client.apply_vm(request).await.expect("apply");
            wait_vm(&mut client, uid, BOOT, |vm| vm.ready).await
        }
    };
    let emptied = boot(&mut client, "emptied").await;
    let garbled = boot(&mut client, "garbled").await;
    reaper.0.extend([emptied.pid, garbled.pid]);
    let dir = |uid: &str| tmp.path().join("vms").join(uid);
    assert_eq!(
        live_pids_naming(&dir("emptied").join("api.sock")),
        [emptied.pid]
    );

    // The agent dies; one handle file is emptied, the other garbled and, worse, a second
    // process names that VM's socket (a VMM the agent once lost track of).
    agent.kill();
    std::fs::write(dir("emptied").join("handle.json"), b"").expect("truncate");
    std::fs::write(dir("garbled").join("handle.json"), b"{\"pid\": 12").expect("garble");
    let socket = dir("garbled").join("api.sock").display().to_string();
    // In a process group of its own, as every VMM the agent starts.
    let mut decoy = std::process::Command::new("sh")
        .args(["-c", "sleep 120; exit 0", &socket])
        .process_group(0)
        .spawn()
        .expect("decoy");
    reaper.0.push(decoy.id());

    let agent = AgentProcess::spawn(tmp.path());
    let mut client = connect(&agent.socket, Duration::from_secs(20)).await;
    // The only VMM of a VM is adopted: same process, still running and ready, one of it.
    let vm = wait_vm(&mut client, "emptied", Duration::from_secs(20), |_| true).await;
    assert_eq!(
        (vm.state(), vm.ready, vm.pid),
        (proto::VmState::Running, true, emptied.pid),
        "{vm:?}"
    );
    assert_eq!(
        live_pids_naming(&dir("emptied").join("api.sock")),
        [emptied.pid]
    );
    let handle = std::fs::read_to_string(dir("emptied").join("handle.json")).expect("handle");
    assert!(
        handle.contains(&emptied.pid.to_string()),
        "rewritten: {handle}"
    );
    // Two of them: neither can be trusted, so both are killed and the status says why.
    let vm = wait_vm(&mut client, "garbled", Duration::from_secs(20), |_| true).await;
    assert_eq!(vm.state(), proto::VmState::Failed, "{vm:?}");
    let exit = vm.exit.expect("exit");
    assert_eq!(exit.reason, "VmmLost");
    assert!(
        exit.message.contains("handle.json") && exit.message.contains("2 VMMs of this VM"),
        "{}",
        exit.message
    );
    assert!(!exit.message.contains("before the VMM was started"));
    wait_pid_gone(garbled.pid, Duration::from_secs(10)).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::task::spawn_blocking(move || decoy.wait()).await
    })
    .await;
    assert!(live_pids_naming(std::path::Path::new(&socket)).is_empty());

    for uid in ["emptied", "garbled"] {
        client
            .delete_vm(proto::DeleteVmRequest {
                uid: uid.to_owned(),
                grace_period_seconds: 1,
                ..Default::default()
            })
            .await
            .expect("delete");
    }
    wait_pid_gone(emptied.pid, Duration::from_secs(10)).await;
    assert!(files_under(&tmp.path().join("vms")).is_empty());
    drop(agent);
}
