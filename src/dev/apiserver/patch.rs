//! PATCH bodies: JSON patch, JSON merge patch, strategic merge patch (as merge patch, core kinds
//! only) and server-side apply as a simplified structured merge with field-manager bookkeeping.

use serde_json::{Map, Value, json};

use super::errors::ApiError;

/// The patch flavours, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

/// Accepted content types, for the 415 message.
pub const ACCEPTED: &str =
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml";
/// Accepted content types for kinds that also take strategic merge patches.
pub const ACCEPTED_WITH_SMP: &str = "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml";

impl PatchKind {
    /// Classify a `Content-Type` header value.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let mime = content_type.split(';').next().unwrap_or_default().trim();
        match mime {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Apply an RFC 6902 JSON patch.
pub fn json_patch(doc: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let patch: json_patch::Patch = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch: {e}")))?;
    let mut out = doc.clone();
    for op in &patch.0 {
        // Like the real server's JSON patch library, `test` of `null` passes for a missing
        // path (kube-rs' finalizer helper relies on it before adding the first finalizer).
        if let json_patch::PatchOperation::Test(test) = op
            && test.value.is_null()
            && out.pointer(test.path.as_str()).is_none_or(Value::is_null)
        {
            continue;
        }
        json_patch::patch(&mut out, std::slice::from_ref(op))
            .map_err(|e| ApiError::BadRequest(format!("the JSON patch cannot be applied: {e}")))?;
    }
    Ok(out)
}

/// Apply an RFC 7386 merge patch.
pub fn merge_patch(doc: &Value, body: &[u8]) -> Result<Value, ApiError> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid merge patch: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::BadRequest(
            "a merge patch must be a JSON object".into(),
        ));
    }
    let mut out = doc.clone();
    json_patch::merge(&mut out, &patch);
    Ok(out)
}

/// Parse an apply body (YAML or JSON).
pub fn parse_apply(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_yaml::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("error decoding YAML: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::BadRequest(
            "an applied configuration must be an object".into(),
        ));
    }
    Ok(v)
}

/// The keys of a `x-kubernetes-list-type: map` list, from its schema, or by convention for
/// `conditions` lists of kinds without a schema here.
fn list_map_keys(schema: Option<&Value>, field: &str) -> Option<Vec<String>> {
    if let Some(s) = schema
        && s.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map")
    {
        return s
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            });
    }
    if schema.is_none() && field == "conditions" {
        return Some(vec!["type".into()]);
    }
    None
}

fn child_schema<'a>(schema: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    let s = schema?;
    s.get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

fn key_of(item: &Value, keys: &[String]) -> Option<Vec<Value>> {
    keys.iter().map(|k| item.get(k).cloned()).collect()
}

/// Merge an applied configuration into the live object: maps field by field, `map` lists item
/// by item (by their keys), every other value replaced. Fields a manager stops applying are
/// removed separately by [`remove_unapplied`].
pub fn structured_merge(live: &mut Value, applied: &Value, schema: Option<&Value>, field: &str) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, v) in a {
                if v.is_null() {
                    l.remove(k);
                    continue;
                }
                match l.get_mut(k) {
                    Some(existing) => structured_merge(existing, v, child_schema(schema, k), k),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => {
            let item_schema = schema.and_then(|s| s.get("items"));
            match list_map_keys(schema, field) {
                Some(keys) => {
                    for item in a {
                        let found = key_of(item, &keys).and_then(|key| {
                            l.iter_mut()
                                .find(|existing| key_of(existing, &keys).as_ref() == Some(&key))
                        });
                        match found {
                            Some(existing) => structured_merge(existing, item, item_schema, ""),
                            None => l.push(item.clone()),
                        }
                    }
                }
                None => *l = a.clone(),
            }
        }
        (l, a) => *l = a.clone(),
    }
}

/// Remove what a manager applied before but no longer applies, unless another manager also
/// owns it: how server-side apply lets a manager drop a field or a condition.
/// `previous`/`current` are the manager's `fieldsV1` sets, `others` everybody else's.
pub fn remove_unapplied(object: &mut Value, previous: &Value, current: &Value, others: &[&Value]) {
    let Some(prev) = previous.as_object() else {
        return;
    };
    for (key, prev_child) in prev {
        if key == "." {
            continue;
        }
        let current_child = current.get(key);
        let others_child: Vec<&Value> = others.iter().filter_map(|o| o.get(key)).collect();
        if let Some(field) = key.strip_prefix("f:") {
            let Some(map) = object.as_object_mut() else {
                continue;
            };
            match current_child {
                None if others_child.is_empty() => {
                    map.remove(field);
                }
                None => {}
                Some(cur) => {
                    if let Some(child) = map.get_mut(field) {
                        remove_unapplied(child, prev_child, cur, &others_child);
                    }
                }
            }
        } else if let Some(item_key) = key.strip_prefix("k:") {
            let Ok(Value::Object(wanted)) = serde_json::from_str::<Value>(item_key) else {
                continue;
            };
            let Some(items) = object.as_array_mut() else {
                continue;
            };
            let matches = |item: &Value| wanted.iter().all(|(k, v)| item.get(k) == Some(v));
            match current_child {
                None if others_child.is_empty() => items.retain(|item| !matches(item)),
                None => {}
                Some(cur) => {
                    if let Some(item) = items.iter_mut().find(|item| matches(item)) {
                        remove_unapplied(item, prev_child, cur, &others_child);
                    }
                }
            }
        }
    }
}

/// Fields an apply by `manager` would change that another manager owns: (manager, `.path`).
pub fn apply_conflicts(live: &Value, applied: &Value, manager: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in live["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let owner = entry["manager"].as_str().unwrap_or_default();
        if owner == manager {
            continue;
        }
        let mut fields = Vec::new();
        conflicts_at(applied, live, &entry["fieldsV1"], "", true, &mut fields);
        out.extend(fields.into_iter().map(|f| (owner.to_string(), f)));
    }
    out
}

fn conflicts_at(
    applied: &Value,
    live: &Value,
    owned: &Value,
    path: &str,
    root: bool,
    out: &mut Vec<String>,
) {
    let Some(map) = applied.as_object() else {
        return;
    };
    for (k, v) in map {
        if root && (k == "apiVersion" || k == "kind") {
            continue;
        }
        let Some(owned_child) = owned.get(format!("f:{k}")) else {
            continue;
        };
        let live_child = live.get(k).unwrap_or(&Value::Null);
        let child_path = format!("{path}.{k}");
        let has = |prefix: &str| {
            owned_child
                .as_object()
                .is_some_and(|m| m.keys().any(|key| key.starts_with(prefix)))
        };
        match v {
            Value::Object(_) if has("f:") => {
                conflicts_at(v, live_child, owned_child, &child_path, false, out);
            }
            Value::Array(items) if has("k:") => {
                for (key, owned_item) in owned_child.as_object().into_iter().flatten() {
                    let Some(Ok(Value::Object(wanted))) =
                        key.strip_prefix("k:").map(serde_json::from_str::<Value>)
                    else {
                        continue;
                    };
                    let matches =
                        |item: &&Value| wanted.iter().all(|(f, val)| item.get(f) == Some(val));
                    if let Some(item) = items.iter().find(matches) {
                        let live_item = live_child
                            .as_array()
                            .and_then(|l| l.iter().find(matches))
                            .unwrap_or(&Value::Null);
                        let item_path = format!("{child_path}[{key}]");
                        conflicts_at(item, live_item, owned_item, &item_path, false, out);
                    }
                }
            }
            _ => {
                if live_child != v {
                    out.push(child_path);
                }
            }
        }
    }
}

/// The `fieldsV1` sets in `object`'s managedFields: the entry of `manager` for `operation` on
/// `subresource` (if any), and all the others.
pub fn managed_sets(
    object: &Value,
    manager: &str,
    operation: &str,
    subresource: Option<&str>,
) -> (Option<Value>, Vec<Value>) {
    let mut mine = None;
    let mut others = Vec::new();
    for entry in object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let same = entry["manager"] == manager
            && entry["operation"] == operation
            && entry.get("subresource").and_then(Value::as_str) == subresource;
        if same {
            mine = Some(entry["fieldsV1"].clone());
        } else {
            others.push(entry["fieldsV1"].clone());
        }
    }
    (mine, others)
}

/// The `fieldsV1` set of an applied configuration or patch body.
pub fn fields_v1(applied: &Value, schema: Option<&Value>) -> Value {
    let mut out = Map::new();
    if let Value::Object(map) = applied {
        for (k, v) in map {
            if k == "apiVersion" || k == "kind" {
                continue;
            }
            if k == "metadata" {
                let mut meta = Map::new();
                if let Value::Object(m) = v {
                    for (mk, mv) in m {
                        if [
                            "name",
                            "namespace",
                            "resourceVersion",
                            "uid",
                            "managedFields",
                            "creationTimestamp",
                            "generation",
                            "deletionTimestamp",
                            "deletionGracePeriodSeconds",
                        ]
                        .contains(&mk.as_str())
                        {
                            continue;
                        }
                        meta.insert(format!("f:{mk}"), fields_of(mv, None, mk));
                    }
                }
                if !meta.is_empty() {
                    out.insert("f:metadata".into(), Value::Object(meta));
                }
                continue;
            }
            out.insert(format!("f:{k}"), fields_of(v, child_schema(schema, k), k));
        }
    }
    Value::Object(out)
}

fn fields_of(value: &Value, schema: Option<&Value>, field: &str) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (format!("f:{k}"), fields_of(v, child_schema(schema, k), k)))
                .collect(),
        ),
        Value::Array(items) => match list_map_keys(schema, field) {
            Some(keys) => {
                let item_schema = schema.and_then(|s| s.get("items"));
                Value::Object(
                    items
                        .iter()
                        .map(|item| {
                            let key: Map<String, Value> = keys
                                .iter()
                                .map(|k| (k.clone(), item.get(k).cloned().unwrap_or(Value::Null)))
                                .collect();
                            let mut inner = match fields_of(item, item_schema, "") {
                                Value::Object(m) => m,
                                _ => Map::new(),
                            };
                            inner.insert(".".into(), json!({}));
                            (format!("k:{}", Value::Object(key)), Value::Object(inner))
                        })
                        .collect(),
                )
            }
            None => json!({}),
        },
        _ => json!({}),
    }
}

/// Record that `manager` wrote `fields` with `operation` (`Apply`/`Update`) on `subresource`,
/// replacing that manager's previous entry for the same operation and subresource.
pub fn record_managed_fields(
    object: &mut Value,
    manager: &str,
    operation: &str,
    subresource: Option<&str>,
    api_version: &str,
    fields: Value,
    now: &str,
) {
    let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let entries = meta
        .entry("managedFields")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !entries.is_array() {
        *entries = Value::Array(Vec::new());
    }
    let Value::Array(list) = entries else {
        return;
    };
    list.retain(|e| {
        !(e["manager"] == manager
            && e["operation"] == operation
            && e.get("subresource").and_then(Value::as_str) == subresource)
    });
    let mut entry = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    });
    if let (Some(sub), Some(map)) = (subresource, entry.as_object_mut()) {
        map.insert("subresource".into(), Value::String(sub.into()));
    }
    list.push(entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_schema() -> Value {
        json!({"properties": {"status": {"properties": {"conditions": {
            "type": "array", "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
            "items": {"type": "object"}}}}}})
    }

    #[test]
    fn content_types_map_to_patch_kinds() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchKind::Merge)
        );
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+yaml"),
            Some(PatchKind::Apply)
        );
        assert_eq!(PatchKind::from_content_type("text/plain"), None);
    }

    #[test]
    fn json_and_merge_patches_apply() {
        let doc = json!({"spec": {"a": 1, "b": 2}});
        let out = json_patch(&doc, br#"[{"op":"replace","path":"/spec/a","value":5}]"#)
            .expect("json patch");
        assert_eq!(out["spec"]["a"], 5);
        assert!(json_patch(&doc, br#"[{"op":"test","path":"/spec/a","value":9}]"#).is_err());
        let added = json_patch(
            &doc,
            br#"[{"op":"test","path":"/metadata/finalizers","value":null},
                 {"op":"add","path":"/metadata","value":{"finalizers":["f"]}}]"#,
        )
        .expect("test of null passes for a missing path");
        assert_eq!(added["metadata"]["finalizers"][0], "f");
        let out = merge_patch(&doc, br#"{"spec":{"b":null,"c":3}}"#).expect("merge");
        assert_eq!(out, json!({"spec": {"a": 1, "c": 3}}));
    }

    #[test]
    fn apply_merges_conditions_by_type() {
        let mut live = json!({"status": {"phase": "Pending", "conditions": [
            {"type": "Scheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}});
        let applied = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        structured_merge(&mut live, &applied, Some(&status_schema()), "");
        assert_eq!(live["status"]["phase"], "Pending");
        assert_eq!(live["status"]["conditions"][0]["status"], "True");
        assert_eq!(live["status"]["conditions"][0]["type"], "Scheduled");
        assert_eq!(live["status"]["conditions"][1]["status"], "True");
    }

    #[test]
    fn apply_drops_what_a_manager_stopped_applying() {
        let schema = status_schema();
        let first = json!({"status": {"phase": "Running", "message": "x", "conditions": [
            {"type": "Ready", "status": "True"}, {"type": "Stalled", "status": "True"}]}});
        let second = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}]}});
        let mut live = first.clone();
        live["status"]["conditions"]
            .as_array_mut()
            .expect("list")
            .push(json!({"type": "Scheduled", "status": "True"}));
        let other =
            json!({"f:status": {"f:conditions": {"k:{\"type\":\"Scheduled\"}": {".": {}}}}});
        structured_merge(&mut live, &second, Some(&schema), "");
        remove_unapplied(
            &mut live,
            &fields_v1(&first, Some(&schema)),
            &fields_v1(&second, Some(&schema)),
            &[&other],
        );
        assert!(live["status"].get("message").is_none());
        let types: Vec<&str> = live["status"]["conditions"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|c| c["type"].as_str())
            .collect();
        assert_eq!(types, ["Ready", "Scheduled"]);
    }

    #[test]
    fn apply_conflicts_only_on_changed_fields_owned_by_others() {
        let mut live = json!({"metadata": {"name": "a"}, "spec": {"a": 1, "b": 2}});
        let owned = fields_v1(&json!({"spec": {"a": 1}}), None);
        record_managed_fields(&mut live, "kubectl", "Update", None, "v", owned, "t");
        let same = json!({"apiVersion": "v", "kind": "K", "spec": {"a": 1, "b": 3}});
        assert!(apply_conflicts(&live, &same, "ctl").is_empty());
        let changed = json!({"spec": {"a": 5}});
        assert_eq!(
            apply_conflicts(&live, &changed, "ctl"),
            [("kubectl".to_string(), ".spec.a".to_string())]
        );
        assert!(apply_conflicts(&live, &changed, "kubectl").is_empty());
    }

    #[test]
    fn managed_fields_name_keys_and_replace_entries() {
        let applied = json!({"apiVersion": "v", "kind": "K", "metadata": {"name": "a",
            "labels": {"x": "y"}}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let fields = fields_v1(&applied, Some(&status_schema()));
        assert!(fields["f:metadata"]["f:labels"]["f:x"].is_object());
        assert!(
            fields["f:status"]["f:conditions"]["k:{\"type\":\"Ready\"}"]["f:status"].is_object()
        );
        let mut obj = json!({"metadata": {"name": "a"}});
        record_managed_fields(
            &mut obj,
            "m",
            "Apply",
            Some("status"),
            "v",
            fields.clone(),
            "t",
        );
        record_managed_fields(&mut obj, "m", "Apply", Some("status"), "v", fields, "t2");
        let entries = obj["metadata"]["managedFields"].as_array().expect("list");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["time"], "t2");
        assert_eq!(entries[0]["subresource"], "status");
    }
}
