//! The bodies of the controller's writes to a MicroVM: the server-side-apply status patch and
//! the JSON patches of metadata (finalizer + node label in one write, finalizer removal).
//! Pure; `mod.rs` sends them.

use serde_json::{Value, json};

use crate::api::{API_VERSION, FINALIZER, KIND, MicroVM, MicroVMStatus, NODE_LABEL};

/// The apply configuration for the status subresource. Sending the whole computed status means
/// fields the controller no longer sets are dropped, which is what apply semantics give.
pub(crate) fn status_apply_body(status: &MicroVMStatus) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "status": status,
    })
}

/// One merge patch that adds the finalizer and/or the node label. Finalizers are a list, which
/// a merge patch replaces whole, so the patch carries the object's resourceVersion: the API
/// server refuses it with a conflict if anything changed since we read the list.
pub(crate) fn metadata_patch(mvm: &MicroVM, add_finalizer: bool, node: Option<&str>) -> Value {
    let mut meta = serde_json::Map::new();
    if let Some(rv) = &mvm.metadata.resource_version {
        meta.insert("resourceVersion".to_string(), json!(rv));
    }
    if add_finalizer {
        let mut list = mvm.metadata.finalizers.clone().unwrap_or_default();
        if !list.iter().any(|f| f == FINALIZER) {
            list.push(FINALIZER.to_string());
        }
        meta.insert("finalizers".to_string(), json!(list));
    }
    if let Some(node) = node {
        meta.insert("labels".to_string(), json!({ NODE_LABEL: node }));
    }
    json!({ "metadata": meta })
}

/// Merge patch removing our finalizer (same resourceVersion guard); `None` when the object
/// does not carry it.
pub(crate) fn remove_finalizer_patch(mvm: &MicroVM) -> Option<Value> {
    let list = mvm.metadata.finalizers.as_ref()?;
    if !list.iter().any(|f| f == FINALIZER) {
        return None;
    }
    let rest: Vec<&String> = list.iter().filter(|f| *f != FINALIZER).collect();
    Some(json!({
        "metadata": {
            "resourceVersion": mvm.metadata.resource_version,
            "finalizers": rest,
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use crate::controller::fixtures::{microvm, placed};
    use pretty_assertions::assert_eq;

    fn merged(mvm: &MicroVM, patch: &Value) -> Value {
        let mut doc = serde_json::to_value(mvm).expect("serializes");
        json_patch::merge(&mut doc, patch);
        doc
    }

    #[test]
    fn first_write_adds_finalizer_and_label_together() {
        let mvm = microvm("web");
        assert_eq!(
            metadata_patch(&mvm, true, Some("node-a")),
            json!({"metadata": {
                "resourceVersion": "1",
                "finalizers": ["ignis.dev/vm-cleanup"],
                "labels": {"ignis.dev/node": "node-a"},
            }})
        );
    }

    #[test]
    fn existing_finalizers_and_labels_are_kept() {
        let mut mvm = microvm("web");
        mvm.metadata.finalizers = Some(vec!["other/finalizer".to_string()]);
        mvm.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
        let doc = merged(&mvm, &metadata_patch(&mvm, true, Some("node-a")));
        assert_eq!(
            doc["metadata"]["finalizers"],
            json!(["other/finalizer", "ignis.dev/vm-cleanup"])
        );
        assert_eq!(
            doc["metadata"]["labels"],
            json!({"app": "x", "ignis.dev/node": "node-a"})
        );
    }

    #[test]
    fn finalizer_removal_keeps_the_others() {
        let mut mvm = placed("web", "node-a");
        mvm.metadata.finalizers = Some(vec!["a".to_string(), FINALIZER.to_string()]);
        let patch = remove_finalizer_patch(&mvm).expect("present");
        assert_eq!(patch["metadata"]["resourceVersion"], "1");
        assert_eq!(merged(&mvm, &patch)["metadata"]["finalizers"], json!(["a"]));
        assert_eq!(remove_finalizer_patch(&microvm("web")), None);
    }

    #[test]
    fn status_body_is_an_apply_configuration() {
        let status = MicroVMStatus {
            phase: Some(Phase::Running),
            node_name: Some("node-a".to_string()),
            ..Default::default()
        };
        assert_eq!(
            status_apply_body(&status),
            json!({
                "apiVersion": API_VERSION,
                "kind": KIND,
                "status": {"phase": "Running", "nodeName": "node-a", "restartCount": 0},
            })
        );
    }
}
