use super::*;

fn schema() -> Value {
    json!({"properties": {
        "spec": {"properties": {"list": {"type": "array", "x-kubernetes-list-type": "set",
            "items": {"type": "string"}}}},
        "status": {"properties": {"conditions": {
            "type": "array", "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"], "items": {"type": "object"}}}}}})
}

#[test]
fn fields_v1_round_trips_with_dot_members() {
    let tree = json!({"f:data": {".": {}, "f:a": {}},
        "f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}}}}});
    let set = FieldSet::from_fields_v1(&tree);
    assert!(set.contains(&vec!["f:data".to_string()]));
    assert!(set.contains(&vec!["f:data".to_string(), "f:a".to_string()]));
    assert_eq!(set.to_fields_v1(), tree);
}

#[test]
fn objects_set_leaves_and_keyed_items() {
    let obj = json!({"apiVersion": "v", "kind": "K",
        "metadata": {"name": "a", "labels": {"x": "y"}, "finalizers": ["f/g"]},
        "spec": {"a": 1, "list": ["p", "q"], "atomic": [1, 2]},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
    let v = FieldSet::of_object(&obj, Some(&schema())).to_fields_v1();
    assert_eq!(
        v,
        json!({
            "f:metadata": {"f:labels": {"f:x": {}}, "f:finalizers": {"v:\"f/g\"": {}}},
            "f:spec": {"f:a": {}, "f:atomic": {}, "f:list": {"v:\"p\"": {}, "v:\"q\"": {}}},
            "f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}":
                {".": {}, "f:status": {}, "f:type": {}}}},
        })
    );
    let nodes = FieldSet::nodes_of(&obj, Some(&schema())).to_fields_v1();
    assert!(nodes["f:spec"].get(".").is_some());
}

#[test]
fn changes_are_leaves_and_new_maps() {
    let old = json!({"data": {"a": "1", "b": "2"}});
    let new = json!({"data": {"a": "5", "b": "2", "c": "3"}, "extra": {"x": 1}});
    let changed = FieldSet::changed(&old, &new, None).to_fields_v1();
    assert_eq!(
        changed,
        json!({"f:data": {"f:a": {}, "f:c": {}}, "f:extra": {".": {}, "f:x": {}}})
    );
}

#[test]
fn values_are_found_and_removed_by_path() {
    let mut obj = json!({"status": {"conditions": [
        {"type": "A", "status": "True"}, {"type": "B", "status": "False"}]}});
    let path: Path = vec![
        "f:status".into(),
        "f:conditions".into(),
        "k:{\"type\":\"B\"}".into(),
    ];
    assert_eq!(
        value_at(&obj, &path).and_then(|v| v.get("status")),
        Some(&json!("False"))
    );
    assert_eq!(display(&path), ".status.conditions[type=\"B\"]");
    remove_at(&mut obj, &path);
    assert_eq!(
        obj["status"]["conditions"].as_array().map(Vec::len),
        Some(1)
    );
}

#[test]
fn merge_keeps_keyed_items_and_replaces_atomic_lists() {
    let mut live = json!({"spec": {"atomic": [1, 2]}, "status": {"phase": "P", "conditions": [
        {"type": "Scheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}});
    merge(
        &mut live,
        &json!({"spec": {"atomic": [3]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
        Some(&schema()),
    );
    assert_eq!(live["spec"]["atomic"], json!([3]));
    assert_eq!(live["status"]["phase"], "P");
    assert_eq!(live["status"]["conditions"][0]["type"], "Scheduled");
    assert_eq!(live["status"]["conditions"][1]["status"], "True");
}
