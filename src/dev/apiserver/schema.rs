//! Structural-schema behaviour of custom resources: defaulting and pruning of unknown fields,
//! as the real API server does before validation.

use serde_json::Value;

/// Fields that exist on every object and are not described by a CRD's schema.
const ROOT_FIELDS: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// Fill in `default:` values of the schema wherever the object leaves a field out.
pub fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, prop) in props {
                    if !map.contains_key(key)
                        && let Some(default) = prop.get("default")
                    {
                        map.insert(key.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(key) {
                        apply_defaults(prop, child);
                    }
                }
            }
            if let Some(extra) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                for child in map.values_mut() {
                    apply_defaults(extra, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// Drop every field the schema does not know; returns their dotted paths (for
/// `fieldValidation=Strict`, which refuses instead).
pub fn prune(schema: &Value, value: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    prune_at(schema, value, "", true, &mut unknown);
    unknown
}

fn prune_at(schema: &Value, value: &mut Value, path: &str, root: bool, unknown: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return;
    }
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let extra = schema.get("additionalProperties").filter(|s| s.is_object());
            let mut drop = Vec::new();
            for (key, child) in map.iter_mut() {
                if root && ROOT_FIELDS.contains(&key.as_str()) {
                    continue;
                }
                if let Some(prop) = props.and_then(|p| p.get(key)) {
                    prune_at(prop, child, &join(key), false, unknown);
                } else if let Some(extra) = extra {
                    prune_at(extra, child, &join(key), false, unknown);
                } else if props.is_some() || root {
                    drop.push(key.clone());
                }
            }
            for key in drop {
                unknown.push(join(&key));
                map.remove(&key);
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_at(item_schema, item, &format!("{path}[{i}]"), false, unknown);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "mode": {"type": "string", "default": "auto"},
                "list": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "kind": {"type": "string", "default": "nat"}}}},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
            }}
        }})
    }

    #[test]
    fn defaults_fill_missing_fields_at_every_depth() {
        let mut v = json!({"spec": {"list": [{"name": "eth0"}]}});
        apply_defaults(&schema(), &mut v);
        assert_eq!(v["spec"]["mode"], "auto");
        assert_eq!(v["spec"]["list"][0]["kind"], "nat");
        let mut v = json!({"spec": {"mode": "kvm"}});
        apply_defaults(&schema(), &mut v);
        assert_eq!(v["spec"]["mode"], "kvm");
    }

    #[test]
    fn prune_reports_and_drops_unknown_fields_only() {
        let mut v = json!({"apiVersion": "x", "kind": "K", "metadata": {"name": "a"},
            "spec": {"mode": "a", "foo": 1, "list": [{"name": "e", "bar": 2}],
                     "labels": {"any": "thing"}, "free": {"what": "ever"}},
            "extra": true});
        let mut unknown = prune(&schema(), &mut v);
        unknown.sort();
        assert_eq!(unknown, ["extra", "spec.foo", "spec.list[0].bar"]);
        assert!(v["spec"].get("foo").is_none());
        assert_eq!(v["spec"]["labels"]["any"], "thing");
        assert_eq!(v["spec"]["free"]["what"], "ever");
        assert_eq!(v["metadata"]["name"], "a");
    }
}
