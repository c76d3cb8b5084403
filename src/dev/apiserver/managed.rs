//! `managedFields` bookkeeping, as the real server's field manager keeps it: an update takes
//! the fields it changes from every other manager; an apply owns exactly what it applied,
//! shares fields whose value it leaves as they are (co-ownership), conflicts on fields of
//! others whose value it would change unless forced (then they become its own), and removes
//! what it applied before but no longer applies when nobody else owns it.

use serde_json::{Value, json};

use super::fields::{self, FieldSet, Path};
use super::meta::meta;

/// Who wrote a set of fields, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub subresource: Option<String>,
    pub api_version: String,
    pub time: String,
    pub fields: FieldSet,
}

impl Entry {
    fn same_slot(&self, manager: &str, operation: &str, subresource: Option<&str>) -> bool {
        self.manager == manager
            && self.operation == operation
            && self.subresource.as_deref() == subresource
    }

    fn to_value(&self) -> Value {
        let mut v = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_fields_v1(),
        });
        if let (Some(sub), Some(map)) = (&self.subresource, v.as_object_mut()) {
            map.insert("subresource".into(), Value::String(sub.clone()));
        }
        v
    }
}

/// The entries of an object's `managedFields`.
pub(crate) fn entries(object: &Value) -> Vec<Entry> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["manager"].is_string() || e["fieldsV1"].is_object())
        .map(|e| Entry {
            manager: text(&e["manager"]),
            operation: text(&e["operation"]),
            subresource: e["subresource"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            api_version: text(&e["apiVersion"]),
            time: text(&e["time"]),
            fields: FieldSet::from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

/// Write `entries` back, dropping those that own nothing.
pub(crate) fn set_entries(object: &mut Value, entries: Vec<Entry>) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_value)
        .collect();
    if list.is_empty() {
        if let Some(m) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("managedFields");
        }
    } else {
        meta(object).insert("managedFields".into(), Value::Array(list));
    }
}

/// Who is writing, for the bookkeeping.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Writer<'a> {
    pub manager: &'a str,
    pub subresource: Option<&'a str>,
    pub api_version: &'a str,
    pub now: &'a str,
}

/// Record an update (create, PUT, non-apply PATCH) from `old` (None for a create) to `new`:
/// the changed fields move to the writer's `Update` entry.
pub(crate) fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    writer: Writer<'_>,
    schema: Option<&Value>,
) {
    let empty = json!({});
    let old_obj = old.unwrap_or(&empty);
    let mut list = entries(new);
    let changed = FieldSet::changed(old_obj, new, schema);
    if changed.is_empty() || writer.manager.is_empty() {
        set_entries(new, list);
        return;
    }
    let present = FieldSet::nodes_of(new, schema);
    for entry in &mut list {
        if !entry.same_slot(writer.manager, "Update", writer.subresource) {
            entry.fields = entry.fields.difference(&changed);
        }
    }
    let gained = changed.intersection(&present);
    match list
        .iter_mut()
        .find(|e| e.same_slot(writer.manager, "Update", writer.subresource))
    {
        Some(mine) => {
            mine.fields = mine.fields.difference(&changed).union(&gained);
            mine.time = writer.now.into();
            mine.api_version = writer.api_version.into();
        }
        None => list.push(Entry {
            manager: writer.manager.into(),
            operation: "Update".into(),
            subresource: writer.subresource.map(str::to_string),
            api_version: writer.api_version.into(),
            time: writer.now.into(),
            fields: gained,
        }),
    }
    set_entries(new, list);
}

/// A field another manager owns that an apply would change: (manager, `.path`).
pub(crate) type Conflict = (String, String);

/// Apply `applied` over `live`; the new object, or the conflicts when not forced.
pub(crate) fn apply(
    live: &Value,
    applied: &Value,
    writer: Writer<'_>,
    force: bool,
    schema: Option<&Value>,
) -> Result<Value, Vec<Conflict>> {
    let mine_applied = FieldSet::of_object(applied, schema);
    let mut merged = live.clone();
    fields::merge(&mut merged, applied, schema);
    let mut list = entries(live);

    let mut conflicts = Vec::new();
    let mut taken: Vec<(usize, Path)> = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        if entry.same_slot(writer.manager, "Apply", writer.subresource) {
            continue;
        }
        for path in entry.fields.intersection(&mine_applied).iter() {
            if !fields::is_leaf(path, &mine_applied) {
                continue;
            }
            if fields::value_at(live, path) != fields::value_at(&merged, path) {
                conflicts.push((entry.manager.clone(), fields::display(path)));
                taken.push((i, path.clone()));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for (i, path) in taken {
        let lost = FieldSet::from_paths([path]);
        list[i].fields = list[i].fields.difference(&lost);
    }

    let previous = list
        .iter()
        .find(|e| e.same_slot(writer.manager, "Apply", writer.subresource))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: Vec<&FieldSet> = list
        .iter()
        .filter(|e| !e.same_slot(writer.manager, "Apply", writer.subresource))
        .map(|e| &e.fields)
        .collect();
    // Shallowest first: a list item or map that goes takes its fields with it.
    let stale = previous.difference(&mine_applied);
    let mut removed: Vec<&Path> = Vec::new();
    for path in stale.iter() {
        if removed.iter().any(|r| path.starts_with(r)) {
            continue;
        }
        let owned_elsewhere = others
            .iter()
            .any(|set| set.iter().any(|p| p.starts_with(path)));
        let below_still_applied = mine_applied.iter().any(|p| p.starts_with(path));
        if !owned_elsewhere && !below_still_applied {
            fields::remove_at(&mut merged, path);
            removed.push(path);
        }
    }

    match list
        .iter_mut()
        .find(|e| e.same_slot(writer.manager, "Apply", writer.subresource))
    {
        Some(mine) => {
            if mine.fields != mine_applied {
                mine.time = writer.now.into();
            }
            mine.fields = mine_applied;
            mine.api_version = writer.api_version.into();
        }
        None => list.push(Entry {
            manager: writer.manager.into(),
            operation: "Apply".into(),
            subresource: writer.subresource.map(str::to_string),
            api_version: writer.api_version.into(),
            time: writer.now.into(),
            fields: mine_applied,
        }),
    }
    set_entries(&mut merged, list);
    Ok(merged)
}

#[cfg(test)]
mod tests;
