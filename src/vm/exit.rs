//! How a run of a VM ended: the reason as a program matches it, and the record the agent
//! keeps and reports.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Why a run ended. The spelling ([`ExitReason::as_str`]) is the condition reason the
/// controller writes, so it is a stable CamelCase word.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum ExitReason {
    /// The guest powered off or halted.
    GuestShutdown,
    /// The guest asked to reboot and its VMM ended the run (QEMU runs `-no-reboot`,
    /// Firecracker exits on a reset; Cloud Hypervisor reboots in place and never ends so).
    GuestReboot,
    /// The guest kernel panicked.
    GuestPanic,
    /// The VMM reported that the guest crashed the VM (Cloud Hypervisor: `VCPU generated
    /// error`), though it exited with status 0.
    GuestCrashed,
    /// The VMM failed on its own (non-zero exit, a fatal signal).
    VmmCrashed,
    /// The VMM was killed by a signal from outside.
    VmmKilled,
    /// A re-adopted VMM ended; it is not the agent's child, so how is unknown.
    VmmExited,
    /// The VMM ended while no agent watched it, with no trace of why.
    VmmExitedWhileAgentDown,
    /// The agent lost track of the run (it stopped mid-create, or the VMM is not available
    /// any more).
    VmmLost,
    /// The guest did not pass its readiness check in time; the VMM was killed.
    BootTimeout,
    /// The run could not be created or booted: the word of the error that stopped it
    /// (`KernelNotFound`, `HypervisorUnavailable`, ...).
    BootFailed(Cow<'static, str>),
}

impl ExitReason {
    /// Every reason but [`ExitReason::BootFailed`], whose words belong to the errors.
    const NAMED: [ExitReason; 10] = [
        ExitReason::GuestShutdown,
        ExitReason::GuestReboot,
        ExitReason::GuestPanic,
        ExitReason::GuestCrashed,
        ExitReason::VmmCrashed,
        ExitReason::VmmKilled,
        ExitReason::VmmExited,
        ExitReason::VmmExitedWhileAgentDown,
        ExitReason::VmmLost,
        ExitReason::BootTimeout,
    ];

    /// The reason's word.
    pub(crate) fn as_str(&self) -> &str {
        match self {
            ExitReason::GuestShutdown => "GuestShutdown",
            ExitReason::GuestReboot => "GuestReboot",
            ExitReason::GuestPanic => "GuestPanic",
            ExitReason::GuestCrashed => "GuestCrashed",
            ExitReason::VmmCrashed => "VmmCrashed",
            ExitReason::VmmKilled => "VmmKilled",
            ExitReason::VmmExited => "VmmExited",
            ExitReason::VmmExitedWhileAgentDown => "VmmExitedWhileAgentDown",
            ExitReason::VmmLost => "VmmLost",
            ExitReason::BootTimeout => "BootTimeout",
            ExitReason::BootFailed(word) => word,
        }
    }

    /// The reason a word names; a word that is none of the named reasons is a boot failure's.
    pub(crate) fn from_word(word: &str) -> Self {
        Self::NAMED
            .into_iter()
            .find(|r| r.as_str() == word)
            .unwrap_or_else(|| ExitReason::BootFailed(Cow::Owned(word.to_owned())))
    }

    /// A failed create or boot, by the reason of the error that stopped it.
    pub(crate) fn boot_failed(reason: &'static str) -> Self {
        match Self::from_word(reason) {
            ExitReason::BootFailed(_) => ExitReason::BootFailed(Cow::Borrowed(reason)),
            named => named,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ExitReason> for String {
    fn from(reason: ExitReason) -> Self {
        reason.as_str().to_owned()
    }
}

impl From<String> for ExitReason {
    fn from(word: String) -> Self {
        ExitReason::from_word(&word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_and_unknown_words_are_boot_failures() {
        for reason in ExitReason::NAMED {
            assert_eq!(ExitReason::from_word(reason.as_str()), reason);
        }
        assert_eq!(
            ExitReason::from_word("KernelNotFound"),
            ExitReason::boot_failed("KernelNotFound")
        );
        assert_eq!(
            ExitReason::boot_failed("VmmCrashed"),
            ExitReason::VmmCrashed
        );
        let json = serde_json::to_string(&ExitReason::GuestPanic).expect("json");
        assert_eq!(json, "\"GuestPanic\"");
        let back: ExitReason = serde_json::from_str("\"InsufficientMemory\"").expect("json");
        assert_eq!(back.as_str(), "InsufficientMemory");
    }
}
