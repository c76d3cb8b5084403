//! Node labels from the agents (pod mode): what each node offers VMs, as labels the VM pods'
//! required node affinity selects on. The agents report it (HostInfo); the controller writes
//! it, so it stays the only component that talks to the Kubernetes API.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::vmpod::{AGENT_LABEL, HYPERVISOR_LABEL_PREFIX, KVM_LABEL};
use crate::vm::{Accelerator, HostInfo, Hypervisor};

/// The Ignis labels a node with this agent carries.
pub(crate) fn desired(host: &HostInfo) -> BTreeMap<String, String> {
    let mut out = BTreeMap::from([
        (AGENT_LABEL.to_string(), "true".to_string()),
        (
            KVM_LABEL.to_string(),
            (host.accelerator == Accelerator::Kvm).to_string(),
        ),
    ]);
    for h in &host.hypervisors {
        // The benchmark's stand-in runs no guest: no VM pod may ask for it.
        if *h != Hypervisor::Simulated {
            out.insert(format!("{HYPERVISOR_LABEL_PREFIX}{h}"), "true".to_string());
        }
    }
    out
}

fn ours(key: &str) -> bool {
    key == AGENT_LABEL || key == KVM_LABEL || key.starts_with(HYPERVISOR_LABEL_PREFIX)
}

/// What the agent of a node says now.
pub(crate) enum AgentState<'a> {
    /// Connected: its host as reported.
    Connected(&'a HostInfo),
    /// Unreachable, or gone for less than the grace: the labels stay as they are.
    Unsure,
    /// Gone for good: the labels go.
    Gone,
}

/// The merge patch of a node's labels (`null` removes one), or `None` when they are right.
pub(crate) fn patch(current: &BTreeMap<String, String>, agent: AgentState<'_>) -> Option<Value> {
    let want = match agent {
        AgentState::Connected(host) => desired(host),
        AgentState::Unsure => return None,
        AgentState::Gone => BTreeMap::new(),
    };
    let mut labels = Map::new();
    let have: BTreeSet<&String> = current.keys().filter(|k| ours(k)).collect();
    for key in have {
        if !want.contains_key(key) {
            labels.insert(key.clone(), Value::Null);
        }
    }
    for (key, value) in want {
        if current.get(&key) != Some(&value) {
            labels.insert(key, Value::String(value));
        }
    }
    (!labels.is_empty()).then(|| json!({"metadata": {"labels": labels}}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fake_agent::fake_host;
    use pretty_assertions::assert_eq;

    fn host(hypervisors: &[Hypervisor], accelerator: Accelerator) -> HostInfo {
        HostInfo {
            hypervisors: hypervisors.to_vec(),
            accelerator,
            ..fake_host()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_new_agent_labels_its_node_with_what_it_offers() {
        let h = host(
            &[
                Hypervisor::Qemu,
                Hypervisor::Firecracker,
                Hypervisor::Simulated,
            ],
            Accelerator::Kvm,
        );
        let current = labels(&[("kubernetes.io/hostname", "node-a")]);
        assert_eq!(
            patch(&current, AgentState::Connected(&h)),
            Some(json!({"metadata": {"labels": {
                "ignis.dev/agent": "true",
                "ignis.dev/kvm": "true",
                "hypervisor.ignis.dev/qemu": "true",
                "hypervisor.ignis.dev/firecracker": "true",
            }}}))
        );
    }

    #[test]
    fn labels_follow_the_host_and_only_changes_are_written() {
        let h = host(&[Hypervisor::Qemu], Accelerator::Tcg);
        let current = labels(&[
            ("ignis.dev/agent", "true"),
            ("ignis.dev/kvm", "true"),
            ("hypervisor.ignis.dev/qemu", "true"),
            ("hypervisor.ignis.dev/cloud-hypervisor", "true"),
            ("zone", "a"),
        ]);
        assert_eq!(
            patch(&current, AgentState::Connected(&h)),
            Some(json!({"metadata": {"labels": {
                "ignis.dev/kvm": "false",
                "hypervisor.ignis.dev/cloud-hypervisor": null,
            }}}))
        );
        let settled = labels(&[
            ("ignis.dev/agent", "true"),
            ("ignis.dev/kvm", "false"),
            ("hypervisor.ignis.dev/qemu", "true"),
        ]);
        assert_eq!(patch(&settled, AgentState::Connected(&h)), None);
        // An agent briefly away changes nothing; one gone for good takes its labels along,
        // and only its own.
        assert_eq!(patch(&current, AgentState::Unsure), None);
        assert_eq!(
            patch(&current, AgentState::Gone),
            Some(json!({"metadata": {"labels": {
                "ignis.dev/agent": null,
                "ignis.dev/kvm": null,
                "hypervisor.ignis.dev/qemu": null,
                "hypervisor.ignis.dev/cloud-hypervisor": null,
            }}}))
        );
        assert_eq!(patch(&labels(&[("zone", "a")]), AgentState::Gone), None);
    }
}
