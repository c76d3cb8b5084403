use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use super::*;

fn qemu(end: ProcessEnd, console: &str, log: &str) -> GuestExit {
    classify(&QEMU, end, console, log)
}

/// As the HTTP-API VMMs are classified: from a raw wait status.
fn http(quirks: &ExitQuirks, status: Option<ExitStatus>, console: &str) -> GuestExit {
    classify(quirks, ProcessEnd::from_status(status), console, "")
}

#[test]
fn classify_guest_poweroff_is_success() {
    let e = qemu(
        ProcessEnd::Code(0),
        "ignis: ready\n[ 3.1] reboot: Power down\n",
        "",
    );
    assert!(e.success);
    assert_eq!(e.reason, ExitReason::GuestShutdown);
    assert_eq!(e.exit_code, Some(0));
}

#[test]
fn classify_panic_wins_over_clean_exit() {
    let tail = "ignis: ready\n[ 2.0] sysrq: Trigger a crash\n[ 2.0] Kernel panic - not syncing: sysrq triggered crash\n";
    let e = qemu(ProcessEnd::Code(0), tail, "");
    assert!(!e.success);
    assert_eq!(e.reason, ExitReason::GuestPanic);
    let e = qemu(ProcessEnd::Unknown, tail, "");
    assert_eq!(e.reason, ExitReason::GuestPanic);
}

#[test]
fn classify_last_sign_wins_across_runs() {
    let tail = "Kernel panic - not syncing\n...second run...\nreboot: Power down\n";
    assert_eq!(
        qemu(ProcessEnd::Code(0), tail, "").reason,
        ExitReason::GuestShutdown
    );
    let tail = "reboot: Restarting system\n";
    let e = qemu(ProcessEnd::Code(0), tail, "");
    assert_eq!((e.success, e.reason), (false, ExitReason::GuestReboot));
}

#[test]
fn classify_vmm_failures() {
    let e = qemu(ProcessEnd::Signal(9), "ignis: ready\n", "");
    assert_eq!((e.success, e.reason), (false, ExitReason::VmmKilled));
    assert!(e.message.contains("signal 9"));
    let e = qemu(
        ProcessEnd::Code(1),
        "",
        "qemu-system-x86_64: could not load kernel '/nope'\n",
    );
    assert_eq!((e.success, e.reason), (false, ExitReason::VmmCrashed));
    assert!(e.message.contains("/nope"), "{}", e.message);
    let e = qemu(
        ProcessEnd::Code(0),
        "ignis: ready\n",
        "qemu-system-x86_64: terminating on signal 15 from pid 1\n",
    );
    assert_eq!(e.reason, ExitReason::VmmKilled);
}

#[test]
fn classify_unknown_status() {
    let e = qemu(ProcessEnd::Unknown, "ignis: ready\n", "");
    assert_eq!(
        (e.success, e.reason),
        (false, ExitReason::VmmExitedWhileAgentDown)
    );
    assert_eq!(e.exit_code, None);
    let e = qemu(ProcessEnd::Unknown, "reboot: Power down\n", "");
    assert_eq!((e.success, e.reason), (true, ExitReason::GuestShutdown));
}

#[test]
fn exits_are_classified_by_status_and_console() {
    // Firecracker exits on a guest reset: the run ended (Cloud Hypervisor reboots in place
    // and does not end, so it never gets here).
    let reset = http(
        &FIRECRACKER,
        Some(ExitStatus::from_raw(0)),
        "reboot: Restarting system",
    );
    assert_eq!(
        (reset.success, reset.reason),
        (false, ExitReason::GuestReboot)
    );
    let clean = http(
        &FIRECRACKER,
        Some(ExitStatus::from_raw(0)),
        "reboot: Power down",
    );
    assert_eq!(
        (clean.success, clean.reason),
        (true, ExitReason::GuestShutdown)
    );
    let panic = http(
        &FIRECRACKER,
        Some(ExitStatus::from_raw(0)),
        "Kernel panic - not syncing: Attempted to kill init!",
    );
    assert_eq!(
        (panic.success, panic.reason),
        (false, ExitReason::GuestPanic)
    );
    // Raw wait status: exit code in the high byte.
    let crashed = http(&CLOUD_HYPERVISOR, Some(ExitStatus::from_raw(1 << 8)), "");
    assert_eq!(
        (crashed.reason.clone(), crashed.exit_code),
        (ExitReason::VmmCrashed, Some(1))
    );
    assert!(
        crashed
            .message
            .contains("cloud-hypervisor exited with code 1")
    );
    let killed = http(&FIRECRACKER, Some(ExitStatus::from_raw(9)), "");
    assert_eq!(killed.reason, ExitReason::VmmKilled);
    let segv = http(&FIRECRACKER, Some(ExitStatus::from_raw(11)), "");
    assert_eq!(segv.reason, ExitReason::VmmCrashed);
    let unknown = http(&FIRECRACKER, None, "booting...");
    assert_eq!(unknown.reason, ExitReason::VmmExitedWhileAgentDown);
    let adopted_clean = http(&FIRECRACKER, None, "reboot: Power down");
    assert_eq!(adopted_clean.reason, ExitReason::GuestShutdown);
}

#[test]
fn signals_classify_as_shutdown_or_kill() {
    let term = ExitStatus::from_raw(Signal::SIGTERM as i32);
    let killed = ExitStatus::from_raw(Signal::SIGKILL as i32);
    assert_eq!(
        http(&SIMULATED, Some(term), "").reason,
        ExitReason::GuestShutdown
    );
    assert_eq!(
        http(&SIMULATED, Some(killed), "").reason,
        ExitReason::VmmKilled
    );
    assert_eq!(http(&SIMULATED, None, "").reason, ExitReason::VmmCrashed);
    // A guest's console sign means nothing where no guest runs.
    assert_eq!(
        http(&SIMULATED, None, "reboot: Power down").reason,
        ExitReason::VmmCrashed
    );
}

#[test]
fn exits_seen_at_adoption_or_unreaped_say_what_is_known() {
    let down = qemu(ProcessEnd::Unknown, "ignis: ready\n", "");
    assert_eq!(
        down.clone().seen_ending_unreaped().reason,
        ExitReason::VmmExited
    );
    assert_eq!(
        down.clone().seen_dead_at_adoption().reason,
        ExitReason::VmmExitedWhileAgentDown
    );
    let killed = qemu(
        ProcessEnd::Unknown,
        "",
        "qemu-system-x86_64: terminating on signal 15\n",
    );
    assert_eq!(killed.reason, ExitReason::VmmKilled);
    let at_adoption = killed.seen_dead_at_adoption();
    assert_eq!(at_adoption.reason, ExitReason::VmmExitedWhileAgentDown);
    assert!(at_adoption.message.contains("terminating on signal 15"));
    let panic = qemu(ProcessEnd::Unknown, "Kernel panic\n", "");
    assert_eq!(panic.seen_dead_at_adoption().reason, ExitReason::GuestPanic);
}

/// Cloud Hypervisor v54 after a vCPU error (issue #13): `VCPU generated error` in its log,
/// then exit status 0.
#[test]
fn a_cloud_hypervisor_vcpu_error_is_a_guest_crash_not_a_clean_exit() {
    let log = "cloud-hypervisor: 3.456789s: <vcpu0> ERROR:vmm/src/cpu.rs:1187 -- VCPU generated \
               error: VcpuUnhandledKvmExit\ncloud-hypervisor: 3.5s: <vmm> INFO:vmm/src/lib.rs:1 -- \
               VMM shutting down\n";
    for end in [ProcessEnd::Code(0), ProcessEnd::Unknown] {
        let e = classify(&CLOUD_HYPERVISOR, end, "ignis: ready\n", log);
        assert_eq!(
            (e.success, e.reason.clone()),
            (false, ExitReason::GuestCrashed),
            "{end:?}"
        );
        assert!(
            e.message
                .contains("VCPU generated error: VcpuUnhandledKvmExit"),
            "{}",
            e.message
        );
        assert_eq!(e.seen_dead_at_adoption().reason, ExitReason::GuestCrashed);
    }
    // A panic on the console says more; a signal still says who ended it.
    let e = classify(
        &CLOUD_HYPERVISOR,
        ProcessEnd::Code(0),
        "Kernel panic - not syncing",
        log,
    );
    assert_eq!(e.reason, ExitReason::GuestPanic);
    let e = classify(&CLOUD_HYPERVISOR, ProcessEnd::Signal(9), "", log);
    assert_eq!(e.reason, ExitReason::VmmKilled);
    // Without the line, a clean exit is still clean; other VMMs do not log it.
    let e = classify(
        &CLOUD_HYPERVISOR,
        ProcessEnd::Code(0),
        "reboot: Power down\n",
        "",
    );
    assert_eq!((e.success, e.reason), (true, ExitReason::GuestShutdown));
    assert_eq!(
        classify(&QEMU, ProcessEnd::Code(0), "reboot: Power down\n", log).reason,
        ExitReason::GuestShutdown
    );
}
