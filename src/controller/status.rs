//! The bodies of the controller's writes to a MicroVM: the server-side-apply status patch and
//! the JSON patches of metadata (finalizer + node label in one write, finalizer removal).
//! Pure; `mod.rs` sends them.

use serde_json::{Value, json};

use crate::api::{API_VERSION, FINALIZER, MicroVM, MicroVMStatus, NODE_LABEL};

/// The apply configuration for the status subresource. Sending the whole computed status means
/// fields the controller no longer sets are dropped, which is what apply semantics give.
pub fn status_apply_body(status: &MicroVMStatus) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "MicroVM",
        "status": status,
    })
}

/// One JSON patch that adds the finalizer and/or the node label. The `test` on
/// resourceVersion makes a concurrent change fail with a conflict instead of being
/// overwritten (finalizers are a list: a blind replace could drop someone else's).
pub fn metadata_patch(mvm: &MicroVM, add_finalizer: bool, node: Option<&str>) -> Value {
    let mut ops = Vec::new();
    if let Some(rv) = &mvm.metadata.resource_version {
        ops.push(json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}));
    }
    if add_finalizer {
        match &mvm.metadata.finalizers {
            Some(list) if !list.is_empty() => ops.push(json!({
                "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER
            })),
            _ => ops.push(json!({
                "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]
            })),
        }
    }
    if let Some(node) = node {
        match &mvm.metadata.labels {
            Some(labels) if !labels.is_empty() => ops.push(json!({
                "op": "add",
                "path": format!("/metadata/labels/{}", escape_pointer(NODE_LABEL)),
                "value": node,
            })),
            _ => ops.push(json!({
                "op": "add", "path": "/metadata/labels", "value": {NODE_LABEL: node}
            })),
        }
    }
    Value::Array(ops)
}

/// JSON patch removing our finalizer, guarded by a `test` of its position; `None` when the
/// object does not carry it.
pub fn remove_finalizer_patch(mvm: &MicroVM) -> Option<Value> {
    let index = mvm
        .metadata
        .finalizers
        .as_ref()?
        .iter()
        .position(|f| f == FINALIZER)?;
    let path = format!("/metadata/finalizers/{index}");
    Some(json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
}

/// RFC 6901: `~` → `~0`, `/` → `~1`.
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Phase;
    use crate::controller::fixtures::{microvm, placed};
    use pretty_assertions::assert_eq;

    #[test]
    fn first_write_adds_finalizer_and_label_together() {
        let mvm = microvm("web");
        assert_eq!(
            metadata_patch(&mvm, true, Some("node-a")),
            json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                {"op": "add", "path": "/metadata/finalizers", "value": ["ignis.dev/vm-cleanup"]},
                {"op": "add", "path": "/metadata/labels", "value": {"ignis.dev/node": "node-a"}},
            ])
        );
    }

    #[test]
    fn existing_lists_and_maps_are_appended_to() {
        let mut mvm = microvm("web");
        mvm.metadata.finalizers = Some(vec!["other/finalizer".to_string()]);
        mvm.metadata.labels = Some([("app".to_string(), "x".to_string())].into());
        let patch = metadata_patch(&mvm, true, Some("node-a"));
        assert_eq!(
            patch[1],
            json!({"op": "add", "path": "/metadata/finalizers/-", "value": "ignis.dev/vm-cleanup"})
        );
        assert_eq!(
            patch[2],
            json!({"op": "add", "path": "/metadata/labels/ignis.dev~1node", "value": "node-a"})
        );
        // And the patch really does that to the object.
        let mut doc = serde_json::to_value(&mvm).expect("serializes");
        let ops: json_patch::Patch = serde_json::from_value(patch).expect("valid patch");
        json_patch::patch(&mut doc, &ops).expect("applies");
        assert_eq!(
            doc["metadata"]["finalizers"],
            json!(["other/finalizer", "ignis.dev/vm-cleanup"])
        );
        assert_eq!(doc["metadata"]["labels"]["ignis.dev/node"], "node-a");
    }

    #[test]
    fn finalizer_removal_targets_its_index() {
        let mut mvm = placed("web", "node-a");
        mvm.metadata.finalizers = Some(vec!["a".to_string(), FINALIZER.to_string()]);
        let patch = remove_finalizer_patch(&mvm).expect("present");
        let mut doc = serde_json::to_value(&mvm).expect("serializes");
        let ops: json_patch::Patch = serde_json::from_value(patch).expect("valid");
        json_patch::patch(&mut doc, &ops).expect("applies");
        assert_eq!(doc["metadata"]["finalizers"], json!(["a"]));
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
                "apiVersion": "ignis.dev/v1alpha1",
                "kind": "MicroVM",
                "status": {"phase": "Running", "nodeName": "node-a", "restartCount": 0},
            })
        );
    }
}
