//! A MicroVM that took a warm VM from its pool: its Ready stays the claim's, while the run the
//! claim took goes on.

use super::*;
use pretty_assertions::assert_eq;

#[test]
fn a_claimed_vm_stays_ready_by_its_claim() {
    let mut mvm = placed("web", "node-a");
    mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    mvm.metadata.labels = Some([(NODE_LABEL.to_string(), "node-a".to_string())].into());
    let mut status = MicroVMStatus {
        phase: Some(Phase::Running),
        node_name: Some("node-a".into()),
        observed_generation: mvm.metadata.generation,
        ..Default::default()
    };
    set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        true,
        Reason::CLAIMED,
        "took warm VM p-abcde from pool p in 12ms",
        mvm.metadata.generation,
        Time(now()),
    );
    mvm.status = Some(status);
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty(), "nothing boots: {actions:?}");
    assert!(
        !events(&actions).contains(&"Ready"),
        "already Ready: {actions:?}"
    );
    let s = written(mvm, &actions).status.expect("status");
    assert_eq!(
        cond(&s, ConditionType::Ready),
        (
            "True",
            Reason::CLAIMED,
            "took warm VM p-abcde from pool p in 12ms"
        )
    );
}
