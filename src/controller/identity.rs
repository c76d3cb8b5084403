//! Which VM a MicroVM is on its node: its own (the agent knows it by the MicroVM's uid, its
//! pod is `vm-<name>`), or a pool's warm VM it claimed, which keeps the id and pod it was
//! made with (docs/fast-start.md). Every agent call and pod lookup goes through here.

use kube::ResourceExt;

use super::vmpod;
use crate::api::{ClaimOutcome, MicroVM};
use crate::vm::VmUid;

/// The VM behind a MicroVM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VmIdentity {
    /// The id the node's agent keys the VM by.
    pub(crate) vm_uid: String,
    /// The MicroVM the VM answers to when that is not `vm_uid` (a claim).
    pub(crate) owner: Option<VmUid>,
    /// The VM pod's name (pod mode).
    pub(crate) pod: String,
}

pub(crate) fn of(mvm: &MicroVM) -> VmIdentity {
    let own = VmIdentity {
        vm_uid: mvm.uid().unwrap_or_default(),
        owner: None,
        pod: vmpod::pod_name(&mvm.name_any()),
    };
    let Some(claim) = mvm.status.as_ref().and_then(|s| s.claim.as_ref()) else {
        return own;
    };
    match (&claim.outcome, &claim.vm_uid, &claim.warm_name) {
        (ClaimOutcome::Claimed, Some(vm_uid), Some(warm)) => VmIdentity {
            vm_uid: vm_uid.clone(),
            owner: VmUid::new(mvm.uid().unwrap_or_default()).ok(),
            pod: claim.pod.clone().unwrap_or_else(|| vmpod::pod_name(warm)),
        },
        _ => own,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClaimStatus, MicroVMStatus};
    use crate::testing::microvm;

    #[test]
    fn an_unclaimed_microvm_is_its_own_vm() {
        let mvm = microvm("web");
        let id = of(&mvm);
        assert_eq!(id.vm_uid, mvm.uid().expect("uid"));
        assert_eq!(id.owner, None);
        assert_eq!(id.pod, "vm-web");
    }

    #[test]
    fn a_claim_points_at_the_warm_vm_and_its_pod() {
        let mut mvm = microvm("web");
        mvm.status = Some(MicroVMStatus {
            claim: Some(ClaimStatus {
                pool: "p".into(),
                outcome: ClaimOutcome::Claimed,
                warm_name: Some("p-abcde".into()),
                vm_uid: Some("warm-uid".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let id = of(&mvm);
        assert_eq!(id.vm_uid, "warm-uid");
        assert_eq!(id.owner.expect("owner").to_string(), mvm.uid().expect("uid"));
        assert_eq!(id.pod, "vm-p-abcde");
    }

    #[test]
    fn a_cold_boot_after_a_miss_is_its_own_vm() {
        let mut mvm = microvm("web");
        mvm.status = Some(MicroVMStatus {
            claim: Some(ClaimStatus {
                pool: "p".into(),
                outcome: ClaimOutcome::PoolEmpty,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(of(&mvm).vm_uid, mvm.uid().expect("uid"));
    }
}
