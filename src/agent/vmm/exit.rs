//! Why a VMM process ended: one classifier for every backend, each VMM's quirks as data
//! ([`ExitQuirks`]). It is a pure function of how the process ended, the end of the guest
//! console and the end of the VMM's own log.
//!
//! The rules, in order:
//! 1. A kernel panic on the console is a `GuestPanic`, whatever the process did after.
//! 2. A signal: `VmmKilled` when it came from outside (KILL, TERM, INT, HUP), `VmmCrashed`
//!    when it was the VMM's own fault (SEGV, ABRT, ...). A VMM without a guest takes SIGTERM
//!    as its clean stop.
//! 3. A VMM that logged that the guest crashed the VM is a `GuestCrashed`, whatever its exit
//!    code: Cloud Hypervisor logs `VCPU generated error` and exits 0 (seen with v54), so the
//!    code alone would call a crash a clean shutdown.
//! 4. A non-zero exit code is a `VmmCrashed`, quoting the VMM's last log line.
//! 5. Otherwise the last sign on the console decides: power-off or halt is a `GuestShutdown`,
//!    "reboot: Restarting system" a `GuestReboot`. Where a VMM ends the run on a guest reset
//!    (QEMU runs `-no-reboot`, Firecracker exits on a reset) the run ended, and not cleanly:
//!    the guest wanted to go on, so `RerunOnFailure` restarts it. Cloud Hypervisor reboots the
//!    guest in place: its process does not end, so a reset ends no run under it.
//! 6. No sign: a VMM that logged that it caught a termination signal was `VmmKilled`; an
//!    unknown status (a VMM that is not the agent's child) is `VmmExitedWhileAgentDown`; a
//!    clean exit is a `GuestShutdown`.

use std::os::unix::process::ExitStatusExt;

use nix::sys::signal::Signal;

use crate::vm::{ExitReason, Hypervisor};

/// How a guest's run ended, as far as the VMM process and the console tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestExit {
    /// The guest shut itself down cleanly.
    pub success: bool,
    pub reason: ExitReason,
    /// For a person.
    pub(crate) message: String,
    pub(crate) exit_code: Option<i32>,
}

impl GuestExit {
    /// The exit of a VMM found dead when the agent re-adopted it: what the guest did when the
    /// console tells, `VmmExitedWhileAgentDown` otherwise (nothing else about a process that
    /// ended unwatched is known).
    pub(crate) fn seen_dead_at_adoption(self) -> Self {
        match self.reason {
            ExitReason::GuestShutdown
            | ExitReason::GuestReboot
            | ExitReason::GuestPanic
            | ExitReason::GuestCrashed
            | ExitReason::VmmExitedWhileAgentDown => self,
            _ => GuestExit {
                success: false,
                reason: ExitReason::VmmExitedWhileAgentDown,
                message: format!(
                    "the VMM ended while the agent was not running: {}",
                    self.message
                ),
                exit_code: self.exit_code,
            },
        }
    }

    /// The exit of a re-adopted VMM that ended under this agent's watch: its status is
    /// unknowable (it is not the agent's child), but it did not end while the agent was down.
    pub(crate) fn seen_ending_unreaped(self) -> Self {
        match self.reason {
            ExitReason::VmmExitedWhileAgentDown => GuestExit {
                reason: ExitReason::VmmExited,
                message: "the re-adopted VMM ended; its exit status is unknown because it is not the agent's child".into(),
                ..self
            },
            _ => self,
        }
    }
}

/// How a VMM process ended, as far as the agent knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProcessEnd {
    Code(i32),
    Signal(i32),
    /// The VMM was not the agent's child (re-adopted after an agent restart).
    Unknown,
}

impl ProcessEnd {
    pub(crate) fn from_status(status: Option<std::process::ExitStatus>) -> Self {
        match status {
            None => ProcessEnd::Unknown,
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => ProcessEnd::Code(c),
                (None, Some(sig)) => ProcessEnd::Signal(sig),
                (None, None) => ProcessEnd::Unknown,
            },
        }
    }
}

/// What sets one VMM apart when its process ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitQuirks {
    /// The VMM, as messages name it.
    pub(crate) vmm: Hypervisor,
    /// A line the VMM writes to its own log when it caught a termination signal and then
    /// exited 0, so a clean exit code hides a kill.
    pub(crate) caught_signal_log: Option<&'static str>,
    /// Lines the VMM writes to its own log when the guest crashed the VM, whatever status it
    /// exits with.
    pub(crate) guest_crash_log: &'static [&'static str],
    /// Whether a guest runs at all. Without one nothing can shut down cleanly: SIGTERM is the
    /// VMM's clean stop, and any end it was not asked for is a crash.
    pub(crate) has_guest: bool,
}

/// QEMU catches SIGTERM, SIGINT and SIGHUP, logs it and exits 0.
pub(crate) const QEMU: ExitQuirks = ExitQuirks {
    vmm: Hypervisor::Qemu,
    caught_signal_log: Some("terminating on signal"),
    guest_crash_log: &[],
    has_guest: true,
};

pub(crate) const FIRECRACKER: ExitQuirks = ExitQuirks {
    vmm: Hypervisor::Firecracker,
    caught_signal_log: None,
    guest_crash_log: &[],
    has_guest: true,
};

/// Cloud Hypervisor logs a vCPU error (an exit KVM could not handle, a triple fault) and then
/// exits 0.
pub(crate) const CLOUD_HYPERVISOR: ExitQuirks = ExitQuirks {
    vmm: Hypervisor::CloudHypervisor,
    caught_signal_log: None,
    guest_crash_log: &["VCPU generated error"],
    has_guest: true,
};

/// The benchmarks' stand-in: a `sleep`, no guest.
pub(crate) const SIMULATED: ExitQuirks = ExitQuirks {
    vmm: Hypervisor::Simulated,
    caught_signal_log: None,
    guest_crash_log: &[],
    has_guest: false,
};

/// Signs on the guest console, and what each says about the run's end.
const CONSOLE_SIGNS: &[(&str, ExitReason, &str)] = &[
    (
        "Kernel panic",
        ExitReason::GuestPanic,
        "the guest kernel panicked",
    ),
    (
        "reboot: Power down",
        ExitReason::GuestShutdown,
        "the guest powered off",
    ),
    (
        "reboot: System halted",
        ExitReason::GuestShutdown,
        "the guest halted",
    ),
    (
        "reboot: Restarting system",
        ExitReason::GuestReboot,
        "the guest rebooted and its VMM ended the run",
    ),
];

/// The last sign on the console: a console log can hold several runs.
fn console_sign(console_tail: &str) -> Option<(&'static ExitReason, &'static str)> {
    CONSOLE_SIGNS
        .iter()
        .filter_map(|(sign, reason, message)| {
            console_tail.rfind(sign).map(|at| (at, reason, *message))
        })
        .max_by_key(|(at, ..)| *at)
        .map(|(_, reason, message)| (reason, message))
}

/// The last non-empty line of a log, for messages.
fn last_line(log: &str) -> &str {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// The VMM's last log line that says the guest crashed the VM.
fn crash_line<'a>(quirks: &ExitQuirks, vmm_log_tail: &'a str) -> Option<&'a str> {
    vmm_log_tail.lines().rev().map(str::trim).find(|line| {
        quirks
            .guest_crash_log
            .iter()
            .any(|sign| line.contains(sign))
    })
}

/// Signals somebody sends to end a process, as opposed to faults of its own.
fn sent_from_outside(signal: i32) -> bool {
    [
        Signal::SIGKILL,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ]
    .iter()
    .any(|s| *s as i32 == signal)
}

/// Why a VMM ended (see the module documentation for the rules).
pub(crate) fn classify(
    quirks: &ExitQuirks,
    end: ProcessEnd,
    console_tail: &str,
    vmm_log_tail: &str,
) -> GuestExit {
    let vmm = quirks.vmm;
    let code = match end {
        ProcessEnd::Code(c) => Some(c),
        _ => None,
    };
    let exit = |success, reason: ExitReason, message: String| GuestExit {
        success,
        reason,
        message,
        exit_code: code,
    };
    let sign = quirks
        .has_guest
        .then(|| console_sign(console_tail))
        .flatten();
    if let Some((reason @ ExitReason::GuestPanic, message)) = sign {
        return exit(false, reason.clone(), message.to_owned());
    }
    if let (ProcessEnd::Code(_) | ProcessEnd::Unknown, Some(line)) =
        (end, crash_line(quirks, vmm_log_tail))
    {
        return exit(
            false,
            ExitReason::GuestCrashed,
            format!("{vmm} reported that the guest crashed the VM: {line}"),
        );
    }
    match end {
        ProcessEnd::Signal(sig) if !quirks.has_guest && sig == Signal::SIGTERM as i32 => exit(
            true,
            ExitReason::GuestShutdown,
            format!("the {vmm} VM was asked to stop"),
        ),
        ProcessEnd::Signal(sig) if sent_from_outside(sig) => exit(
            false,
            ExitReason::VmmKilled,
            format!("{vmm} was killed by signal {sig}"),
        ),
        ProcessEnd::Signal(sig) => exit(
            false,
            ExitReason::VmmCrashed,
            format!("{vmm} died from signal {sig}"),
        ),

        ProcessEnd::Code(c) if c != 0 => {
            let said = last_line(vmm_log_tail);
            let message = if said.is_empty() {
                format!("{vmm} exited with code {c}")
            } else {
                format!("{vmm} exited with code {c}: {said}")
            };
            exit(false, ExitReason::VmmCrashed, message)
        }
        _ if !quirks.has_guest => exit(
            false,
            ExitReason::VmmCrashed,
            format!("the {vmm} VMM ended"),
        ),
        _ => match sign {
            Some((reason, message)) => exit(
                *reason == ExitReason::GuestShutdown,
                reason.clone(),
                message.to_owned(),
            ),
            None if quirks
                .caught_signal_log
                .is_some_and(|line| vmm_log_tail.contains(line)) =>
            {
                exit(
                    false,
                    ExitReason::VmmKilled,
                    format!("{vmm} was stopped: {}", last_line(vmm_log_tail)),
                )
            }
            None if end == ProcessEnd::Unknown => exit(
                false,
                ExitReason::VmmExitedWhileAgentDown,
                format!("{vmm} exited while the agent was down; its exit status is unknown"),
            ),
            None => exit(
                true,
                ExitReason::GuestShutdown,
                format!("{vmm} exited cleanly (code 0)"),
            ),
        },
    }
}

#[cfg(test)]
mod tests;
