//! `metadata` of stored objects: accessors, the server's clock, and the checks the real server's
//! `ValidateObjectMeta` makes (names, labels, annotations, finalizers, owner references), with
//! its field paths and wording so clients show the same causes.

use rand::Rng;
use serde_json::{Map, Value, json};

use super::errors::Cause;

/// Largest total size of an object's annotations (keys plus values), as on a real server.
pub(crate) const MAX_ANNOTATIONS_BYTES: usize = 256 * 1024;

/// Now, truncated to the second: the API's timestamps have second precision, and a rounded
/// one could lie in the future of the response that carries it.
pub(crate) fn now() -> String {
    let now = jiff::Timestamp::now();
    jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// The object's `metadata` as a map, made an object first if it is not one.
pub(crate) fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was made an object just above"),
    }
}

/// A string field of `metadata` (`""` when absent).
pub(crate) fn str_of<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

/// The object without metadata and status: what `generation` tracks.
pub(crate) fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

/// The object as compared for no-op detection: the version and the managers' timestamps
/// aside (a manager's entry that changes only its `time` is no change).
pub(crate) fn comparable(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        if let Some(Value::Array(entries)) = m.get_mut("managedFields") {
            for entry in entries {
                if let Some(e) = entry.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    v
}

/// Names `generateName` appends, as the real server spells them.
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Which rule an object's name follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameRule {
    /// A lowercase RFC 1123 subdomain (most kinds).
    Subdomain,
    /// A lowercase RFC 1123 label (Namespaces).
    Label,
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const QUALIFIED_PART_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const QUALIFIED_MSG: &str = "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

/// A lowercase RFC 1123 subdomain of at most 253 characters.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_label)
}

/// Why `name` breaks `rule` (empty when it does not).
pub(crate) fn name_problems(name: &str, rule: NameRule) -> Vec<String> {
    let mut out = Vec::new();
    match rule {
        NameRule::Subdomain => {
            if name.len() > 253 {
                out.push("must be no more than 253 characters".into());
            }
            if !name.split('.').all(is_label) {
                out.push(SUBDOMAIN_MSG.into());
            }
        }
        NameRule::Label => {
            if name.len() > 63 {
                out.push("must be no more than 63 characters".into());
            }
            if !is_label(name) {
                out.push(LABEL_MSG.into());
            }
        }
    }
    out
}

/// The shape of a qualified name's name part: `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
fn is_qualified_part(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    !b.is_empty()
        && b.iter()
            .all(|c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
}

/// Why `key` is not a qualified name (`[prefix/]name`), as `IsQualifiedName` words it.
pub(crate) fn qualified_name_problems(key: &str) -> Vec<String> {
    let parts: Vec<&str> = key.split('/').collect();
    let (prefix, name) = match parts.as_slice() {
        [name] => (None, *name),
        [prefix, name] => (Some(*prefix), *name),
        _ => return vec![QUALIFIED_MSG.into()],
    };
    let mut out = Vec::new();
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            out.push("prefix part must be non-empty".into());
        } else if !is_dns_subdomain(prefix) {
            out.push(format!("prefix part {SUBDOMAIN_MSG}"));
        }
    }
    if name.is_empty() {
        out.push("name part must be non-empty".into());
    } else {
        if name.len() > 63 {
            out.push("name part must be no more than 63 characters".into());
        }
        if !is_qualified_part(name) {
            out.push(QUALIFIED_PART_MSG.into());
        }
    }
    out
}

fn label_value_problems(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    if value.len() > 63 {
        out.push("must be no more than 63 characters".into());
    }
    let b = value.as_bytes();
    let alnum = |c: &u8| c.is_ascii_alphanumeric();
    let shaped = b.is_empty()
        || (b
            .iter()
            .all(|c| alnum(c) || matches!(c, b'-' | b'_' | b'.'))
            && b.first().is_some_and(alnum)
            && b.last().is_some_and(alnum));
    if !shaped {
        out.push(LABEL_VALUE_MSG.into());
    }
    out
}

fn invalid(field: &str, value: &Value, detail: &str) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message: format!("Invalid value: {value}: {detail}"),
        field: field.into(),
    }
}

fn string_map<'a>(meta: &'a Value, field: &str) -> impl Iterator<Item = (&'a String, &'a Value)> {
    meta[field].as_object().into_iter().flatten()
}

/// Everything wrong with an object's labels, annotations, finalizers, owner references and
/// generateName (its name is checked where it is known).
pub(crate) fn metadata_causes(obj: &Value) -> Vec<Cause> {
    let meta = &obj["metadata"];
    let mut out = Vec::new();
    for (key, value) in string_map(meta, "labels") {
        for problem in qualified_name_problems(key) {
            out.push(invalid("metadata.labels", &json!(key), &problem));
        }
        let text = value.as_str().unwrap_or_default();
        for problem in label_value_problems(text) {
            out.push(invalid("metadata.labels", value, &problem));
        }
    }
    let mut annotation_bytes = 0;
    for (key, value) in string_map(meta, "annotations") {
        for problem in qualified_name_problems(&key.to_ascii_lowercase()) {
            out.push(invalid("metadata.annotations", &json!(key), &problem));
        }
        annotation_bytes += key.len() + value.as_str().map_or(0, str::len);
    }
    if annotation_bytes > MAX_ANNOTATIONS_BYTES {
        out.push(Cause {
            reason: "FieldValueTooLong".into(),
            message: format!("Too long: may not be more than {MAX_ANNOTATIONS_BYTES} bytes"),
            field: "metadata.annotations".into(),
        });
    }
    for finalizer in meta["finalizers"].as_array().into_iter().flatten() {
        let name = finalizer.as_str().unwrap_or_default();
        for problem in qualified_name_problems(name) {
            out.push(invalid("metadata.finalizers", finalizer, &problem));
        }
    }
    for owner in meta["ownerReferences"].as_array().into_iter().flatten() {
        for (field, what) in [
            ("apiVersion", "version must not be empty"),
            ("kind", "kind must not be empty"),
            ("name", "name must not be empty"),
            ("uid", "uid must not be empty"),
        ] {
            if owner[field].as_str().is_none_or(str::is_empty) {
                out.push(invalid(
                    &format!("metadata.ownerReferences.{field}"),
                    &json!(""),
                    what,
                ));
            }
        }
    }
    if let Some(prefix) = meta["generateName"].as_str().filter(|p| !p.is_empty()) {
        // The prefix is checked as a name with its trailing dashes allowed.
        let masked = format!("{}a", prefix.trim_end_matches('-'));
        for problem in name_problems(&masked, NameRule::Subdomain) {
            out.push(invalid("metadata.generateName", &json!(prefix), &problem));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_their_rule() {
        assert!(name_problems("web-1", NameRule::Subdomain).is_empty());
        assert!(name_problems("ev.17a2b", NameRule::Subdomain).is_empty());
        assert!(!name_problems("Web", NameRule::Subdomain).is_empty());
        assert!(!name_problems("-a", NameRule::Subdomain).is_empty());
        assert!(!name_problems("a/b", NameRule::Subdomain).is_empty());
        assert!(!name_problems("a..b", NameRule::Subdomain).is_empty());
        assert!(!name_problems("a.b", NameRule::Label).is_empty());
        assert_eq!(name_problems(&"a".repeat(64), NameRule::Label).len(), 1);
        assert!(name_problems(&"a".repeat(63), NameRule::Label).is_empty());
    }

    #[test]
    fn qualified_names_have_an_optional_dns_prefix() {
        for good in ["app", "ignis.dev/vm-cleanup", "A_b.c", "kubernetes.io/arch"] {
            assert!(qualified_name_problems(good).is_empty(), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a/b/c",
            "/a",
            "Bad_Prefix/x",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!qualified_name_problems(bad).is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_checks_name_their_fields() {
        let obj = json!({"metadata": {
            "labels": {"ok": "fine", "bad key": "v", "k": "x".repeat(64)},
            "annotations": {"a": "b".repeat(MAX_ANNOTATIONS_BYTES)},
            "finalizers": ["ignis.dev/vm-cleanup", "not ok"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "c"}],
            "generateName": "Web-",
        }});
        let fields: Vec<String> = metadata_causes(&obj).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "metadata.labels",
                "metadata.labels",
                "metadata.annotations",
                "metadata.finalizers",
                "metadata.ownerReferences.uid",
                "metadata.generateName",
            ]
        );
        assert!(metadata_causes(&json!({"metadata": {"generateName": "web-"}})).is_empty());
    }

    #[test]
    fn timestamps_are_truncated_to_the_second() {
        let before = jiff::Timestamp::now().as_second();
        let t: jiff::Timestamp = now().parse().expect("timestamp");
        assert_eq!(t.subsec_nanosecond(), 0);
        assert!(t.as_second() >= before && t.as_second() <= before + 1);
    }

    #[test]
    fn no_op_comparison_ignores_versions_and_manager_times() {
        let a = json!({"metadata": {"resourceVersion": "1",
            "managedFields": [{"manager": "m", "time": "t1"}]}});
        let b = json!({"metadata": {"resourceVersion": "2",
            "managedFields": [{"manager": "m", "time": "t2"}]}});
        assert_eq!(comparable(&a), comparable(&b));
        let c = json!({"metadata": {"managedFields": [{"manager": "n", "time": "t2"}]}});
        assert_ne!(comparable(&a), comparable(&c));
    }
}
