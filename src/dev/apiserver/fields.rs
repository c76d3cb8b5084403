//! Field paths and sets as server-side apply sees them: the `fieldsV1` encoding of
//! `managedFields`, the fields an object sets, the fields that differ between two objects, and
//! the schema-aware merge of an applied configuration. Lists follow their schema:
//! `x-kubernetes-list-type: map` items are addressed by their keys (`k:{"type":"Ready"}`),
//! `set` items by value (`v:"x"`), any other list is one atomic value. Kinds without a schema
//! here get the conventions of their real types: `conditions` are keyed by `type`,
//! `metadata.finalizers` is a set and `metadata.ownerReferences` is keyed by `uid`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// Metadata fields the server owns: never part of a manager's set.
const SERVER_META: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
];

/// One step of a field path: `f:name`, `k:{"type":"Ready"}` or `v:"value"`.
type Element = String;
/// A path from the object's root.
pub(crate) type Path = Vec<Element>;

/// How a list's items are told apart.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ListKind {
    Map(Vec<String>),
    Set,
    Atomic,
}

/// The schema of `metadata` the real types declare, for what server-side apply needs. Built
/// once: every field set of every write walks it.
static METADATA_SCHEMA: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
    json!({"type": "object", "properties": {
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "x-kubernetes-list-type": "set",
            "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["uid"], "items": {"type": "object"}},
    }})
});

/// The schema of `key` under `schema` (at the root, `metadata` is always the real one).
fn child_schema<'a>(schema: Option<&'a Value>, key: &str, root: bool) -> Option<&'a Value> {
    if root && key == "metadata" {
        return Some(&METADATA_SCHEMA);
    }
    let s = schema?;
    s.get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| s.get("additionalProperties").filter(|a| a.is_object()))
}

fn list_kind(schema: Option<&Value>, field: &str) -> ListKind {
    match schema.and_then(|s| s.get("x-kubernetes-list-type")?.as_str()) {
        Some("map") => ListKind::Map(
            schema
                .and_then(|s| s.get("x-kubernetes-list-map-keys")?.as_array())
                .map(|keys| {
                    keys.iter()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Some("set") => ListKind::Set,
        Some(_) => ListKind::Atomic,
        None if schema.is_none_or(|s| s.get("items").is_none()) && field == "conditions" => {
            ListKind::Map(vec!["type".into()])
        }
        None => ListKind::Atomic,
    }
}

/// The element naming a list item, or None when the item lacks a key field.
fn item_element(kind: &ListKind, item: &Value) -> Option<Element> {
    match kind {
        ListKind::Map(keys) => {
            let mut key = Map::new();
            for k in keys {
                key.insert(k.clone(), item.get(k)?.clone());
            }
            Some(format!("k:{}", Value::Object(key)))
        }
        ListKind::Set => Some(format!("v:{item}")),
        ListKind::Atomic => None,
    }
}

/// A set of field paths.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FieldSet(BTreeSet<Path>);

#[derive(Default)]
struct Node {
    member: bool,
    children: BTreeMap<Element, Node>,
}

impl Node {
    fn to_value(&self) -> Value {
        let mut map: Map<String, Value> = self
            .children
            .iter()
            .map(|(k, child)| (k.clone(), child.to_value()))
            .collect();
        if self.member && !self.children.is_empty() {
            map.insert(".".into(), json!({}));
        }
        Value::Object(map)
    }
}

impl FieldSet {
    /// Read a `fieldsV1` tree: a leaf (`{}`) or a node holding `.` is a member.
    pub(crate) fn from_fields_v1(tree: &Value) -> Self {
        fn walk(node: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
            let Some(map) = node.as_object() else {
                return;
            };
            if !path.is_empty() && (map.is_empty() || map.contains_key(".")) {
                out.insert(path.clone());
            }
            for (key, child) in map {
                if key != "." {
                    path.push(key.clone());
                    walk(child, path, out);
                    path.pop();
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(tree, &mut Vec::new(), &mut out);
        FieldSet(out)
    }

    /// The `fieldsV1` tree of the set.
    pub(crate) fn to_fields_v1(&self) -> Value {
        let mut root = Node::default();
        for path in &self.0 {
            let mut node = &mut root;
            for element in path {
                node = node.children.entry(element.clone()).or_default();
            }
            node.member = true;
        }
        root.to_value()
    }

    /// The fields `object` sets: every leaf, every keyed or set list item (what an apply owns).
    pub(crate) fn of_object(object: &Value, schema: Option<&Value>) -> Self {
        Self::paths_of(object, schema, false)
    }

    /// Like [`of_object`](Self::of_object), plus every non-empty map on the way to a leaf
    /// (what an update that creates the map owns).
    pub(crate) fn nodes_of(object: &Value, schema: Option<&Value>) -> Self {
        Self::paths_of(object, schema, true)
    }

    fn paths_of(object: &Value, schema: Option<&Value>, nodes: bool) -> Self {
        let mut out = BTreeSet::new();
        if let Some(map) = object.as_object() {
            for (key, child) in map {
                if key == "apiVersion" || key == "kind" {
                    continue;
                }
                let child_schema = child_schema(schema, key, true);
                let mut path = vec![format!("f:{key}")];
                if key == "metadata" {
                    for (mk, mv) in child.as_object().into_iter().flatten() {
                        if SERVER_META.contains(&mk.as_str()) {
                            continue;
                        }
                        path.push(format!("f:{mk}"));
                        let s = child_schema.and_then(|s| s["properties"].get(mk));
                        collect(mv, s, mk, nodes, &mut path, &mut out);
                        path.pop();
                    }
                    continue;
                }
                collect(child, child_schema, key, nodes, &mut path, &mut out);
            }
        }
        FieldSet(out)
    }

    /// The fields whose values differ between `old` and `new`: changed, added or removed.
    pub(crate) fn changed(old: &Value, new: &Value, schema: Option<&Value>) -> Self {
        let a = Self::nodes_of(old, schema);
        let b = Self::nodes_of(new, schema);
        let mut out = BTreeSet::new();
        for path in a.0.symmetric_difference(&b.0) {
            out.insert(path.clone());
        }
        for path in a.0.intersection(&b.0) {
            if is_leaf(path, &a) && value_at(old, path) != value_at(new, path) {
                out.insert(path.clone());
            }
        }
        FieldSet(out)
    }

    /// A set of the given paths.
    pub(crate) fn from_paths(paths: impl IntoIterator<Item = Path>) -> Self {
        FieldSet(paths.into_iter().collect())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, path: &Path) -> bool {
        self.0.contains(path)
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &Path> {
        self.0.iter()
    }

    pub(crate) fn union(&self, other: &FieldSet) -> FieldSet {
        FieldSet(self.0.union(&other.0).cloned().collect())
    }

    pub(crate) fn difference(&self, other: &FieldSet) -> FieldSet {
        FieldSet(self.0.difference(&other.0).cloned().collect())
    }

    pub(crate) fn intersection(&self, other: &FieldSet) -> FieldSet {
        FieldSet(self.0.intersection(&other.0).cloned().collect())
    }
}

/// True when no other member of the set lies below `path`.
pub(crate) fn is_leaf(path: &Path, set: &FieldSet) -> bool {
    set.0
        .range(path.clone()..)
        .nth(1)
        .is_none_or(|next| !next.starts_with(path))
}

fn collect(
    value: &Value,
    schema: Option<&Value>,
    field: &str,
    nodes: bool,
    path: &mut Path,
    out: &mut BTreeSet<Path>,
) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            if nodes {
                out.insert(path.clone());
            }
            for (key, child) in map {
                path.push(format!("f:{key}"));
                let s = child_schema(schema, key, false);
                collect(child, s, key, nodes, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            let kind = list_kind(schema, field);
            if kind == ListKind::Atomic {
                out.insert(path.clone());
                return;
            }
            let item_schema = schema.and_then(|s| s.get("items"));
            for item in items {
                let Some(element) = item_element(&kind, item) else {
                    continue;
                };
                path.push(element);
                out.insert(path.clone());
                if matches!(kind, ListKind::Map(_)) {
                    collect(item, item_schema, "", nodes, path, out);
                }
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path` in `object` (None when absent).
pub(crate) fn value_at<'a>(object: &'a Value, path: &Path) -> Option<&'a Value> {
    let mut v = object;
    for element in path {
        v = step(v, element)?;
    }
    Some(v)
}

fn step<'a>(v: &'a Value, element: &str) -> Option<&'a Value> {
    if let Some(field) = element.strip_prefix("f:") {
        return v.get(field);
    }
    let items = v.as_array()?;
    if let Some(key) = element.strip_prefix("k:") {
        let Ok(Value::Object(wanted)) = serde_json::from_str::<Value>(key) else {
            return None;
        };
        return items
            .iter()
            .find(|item| wanted.iter().all(|(k, val)| item.get(k) == Some(val)));
    }
    let wanted: Value = serde_json::from_str(element.strip_prefix("v:")?).ok()?;
    items.iter().find(|item| **item == wanted)
}

/// Remove the field at `path` from `object` (a list item, for `k:`/`v:` elements).
pub(crate) fn remove_at(object: &mut Value, path: &Path) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut v = object;
    for element in parents {
        let next = if let Some(field) = element.strip_prefix("f:") {
            v.get_mut(field)
        } else {
            let Some(i) = index_of(v, element) else {
                return;
            };
            v.get_mut(i)
        };
        match next {
            Some(n) => v = n,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(map) = v.as_object_mut() {
            map.remove(field);
        }
    } else if let Some(i) = index_of(v, last)
        && let Some(items) = v.as_array_mut()
    {
        items.remove(i);
    }
}

fn index_of(list: &Value, element: &str) -> Option<usize> {
    let target = step(list, element)?;
    list.as_array()?
        .iter()
        .position(|item| std::ptr::eq(item, target))
}

/// `.spec.resources.vcpus`, `.status.conditions[type="Ready"].status`: a path as conflict
/// messages spell it.
pub(crate) fn display(path: &Path) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(field) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = element.strip_prefix("k:") {
            let parts: Vec<String> = serde_json::from_str::<Map<String, Value>>(key)
                .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            out.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(value) = element.strip_prefix("v:") {
            out.push_str(&format!("[={value}]"));
        }
    }
    out
}

/// Merge an applied configuration into the live object: maps field by field, keyed and set
/// lists item by item, everything else replaced. What a manager stops applying is removed
/// separately (see `managed::apply`).
pub(crate) fn merge(live: &mut Value, applied: &Value, schema: Option<&Value>) {
    merge_at(live, applied, schema, "", true);
}

fn merge_at(live: &mut Value, applied: &Value, schema: Option<&Value>, field: &str, root: bool) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, v) in a {
                if v.is_null() {
                    l.remove(k);
                    continue;
                }
                let s = child_schema(schema, k, root);
                match l.get_mut(k) {
                    Some(existing) => merge_at(existing, v, s, k, false),
                    None => {
                        l.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => {
            let kind = list_kind(schema, field);
            let item_schema = schema.and_then(|s| s.get("items"));
            if kind == ListKind::Atomic {
                *l = a.clone();
                return;
            }
            for item in a {
                let element = item_element(&kind, item);
                let found = element.as_deref().and_then(|e| {
                    let target = step(&Value::Array(l.clone()), e).cloned()?;
                    l.iter_mut().find(|x| **x == target)
                });
                match found {
                    Some(existing) => merge_at(existing, item, item_schema, "", false),
                    None => l.push(item.clone()),
                }
            }
        }
        (l, a) => *l = a.clone(),
    }
}

#[cfg(test)]
mod tests;
