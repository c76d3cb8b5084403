//! `meta.k8s.io/v1` Table responses: what `kubectl get` prints, with a CRD's printer columns
//! evaluated by a small JSONPath subset (`.a.b`, `[0]`, `[*]`, `[?(@.k=="v")]`).

use serde_json::{Value, json};

use super::resources::ResourceDef;

/// One step of a JSONPath.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    All,
    /// `[?(@.path=="value")]`
    Filter(Vec<String>, Value),
}

fn parse_path(path: &str) -> Option<Vec<Step>> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let chars: Vec<char> = path.chars().collect();
    let mut steps = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '.' => {
                let start = i + 1;
                i = start;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                if i > start {
                    steps.push(Step::Field(chars[start..i].iter().collect()));
                }
            }
            '[' => {
                let end = (i..chars.len()).find(|&j| chars[j] == ']')?;
                // A filter may contain `]` only inside quotes, which our columns never do.
                let inner: String = chars[i + 1..end].iter().collect();
                i = end + 1;
                let inner = inner.trim();
                if inner == "*" {
                    steps.push(Step::All);
                } else if let Some(filter) =
                    inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')'))
                {
                    let (lhs, rhs) = filter.split_once("==")?;
                    let lhs = lhs.trim().strip_prefix("@.")?;
                    let rhs = rhs.trim();
                    let value = if (rhs.starts_with('"') && rhs.ends_with('"'))
                        || (rhs.starts_with('\'') && rhs.ends_with('\''))
                    {
                        Value::String(rhs[1..rhs.len().saturating_sub(1)].to_string())
                    } else {
                        serde_json::from_str(rhs).ok()?
                    };
                    steps.push(Step::Filter(
                        lhs.split('.').map(str::to_string).collect(),
                        value,
                    ));
                } else {
                    steps.push(Step::Index(inner.parse().ok()?));
                }
            }
            _ => {
                let start = i;
                while i < chars.len() && chars[i] != '.' && chars[i] != '[' {
                    i += 1;
                }
                steps.push(Step::Field(chars[start..i].iter().collect()));
            }
        }
    }
    Some(steps)
}

/// Every value a JSONPath selects (empty when the path selects nothing or does not parse).
pub fn eval_json_path(path: &str, object: &Value) -> Vec<Value> {
    let Some(steps) = parse_path(path) else {
        return Vec::new();
    };
    let mut current = vec![object];
    for step in &steps {
        let mut next = Vec::new();
        for v in current {
            match step {
                Step::Field(name) => next.extend(v.get(name)),
                Step::Index(i) => next.extend(v.get(*i)),
                Step::All => next.extend(v.as_array().into_iter().flatten()),
                Step::Filter(path, want) => {
                    for item in v.as_array().into_iter().flatten() {
                        let mut got = item;
                        for seg in path {
                            got = &got[seg.as_str()];
                        }
                        if got == want {
                            next.push(item);
                        }
                    }
                }
            }
        }
        current = next;
    }
    current.into_iter().cloned().collect()
}

/// Ages as kubectl prints them (`apimachinery/pkg/util/duration.HumanDuration`).
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    let y = d / 365;
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        if d % 365 == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{}d", d % 365)
        }
    } else {
        format!("{y}y")
    }
}

fn cell(type_: &str, values: &[Value], now: jiff::Timestamp) -> Value {
    let Some(first) = values.first() else {
        return Value::Null;
    };
    if type_ == "date"
        && let Some(ts) = first
            .as_str()
            .and_then(|s| s.parse::<jiff::Timestamp>().ok())
    {
        return Value::String(human_duration(now.as_second() - ts.as_second()));
    }
    match first {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => first.clone(),
        other => Value::String(other.to_string()),
    }
}

/// How a response body is shaped, from the `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Object,
    Table,
    Metadata,
}

impl Shape {
    /// Read an `Accept` header: Table and PartialObjectMetadata are served, everything else is
    /// JSON.
    pub fn of_accept(accept: &str) -> Self {
        let first = accept.split(',').next().unwrap_or_default();
        if first.contains("as=Table") {
            Shape::Table
        } else if first.contains("as=PartialObjectMetadata") {
            Shape::Metadata
        } else {
            Shape::Object
        }
    }

    /// One object in this shape.
    pub fn object(self, def: &ResourceDef, object: Value, include: IncludeObject) -> Value {
        match self {
            Shape::Object => object,
            Shape::Metadata => partial_metadata(&object),
            Shape::Table => {
                let rv = object["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                table(def, &[object], include, &rv, jiff::Timestamp::now())
            }
        }
    }
}

/// What each row carries besides its cells (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    /// From the `includeObject` query parameter (default `Metadata`, like the real server).
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

/// A `PartialObjectMetadata` of an object.
pub fn partial_metadata(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
}

/// The Table of `objects`, with `Name` first and then the resource's printer columns.
pub fn table(
    def: &ResourceDef,
    objects: &[Value],
    include: IncludeObject,
    resource_version: &str,
    now: jiff::Timestamp,
) -> Value {
    let mut columns = vec![json!({
        "name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace.",
    })];
    columns.extend(def.printer_columns.iter().map(|c| {
        json!({
            "name": c.name, "type": c.type_, "format": "", "priority": c.priority,
            "description": c.description,
        })
    }));
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            let mut cells = vec![o["metadata"]["name"].clone()];
            cells.extend(
                def.printer_columns
                    .iter()
                    .map(|c| cell(&c.type_, &eval_json_path(&c.json_path, o), now)),
            );
            let mut row = json!({ "cells": cells });
            let object = match include {
                IncludeObject::None => None,
                IncludeObject::Metadata => Some(partial_metadata(o)),
                IncludeObject::Object => Some(o.clone()),
            };
            if let (Some(object), Some(map)) = (object, row.as_object_mut()) {
                map.insert("object".into(), object);
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": { "resourceVersion": resource_version },
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> Value {
        json!({"metadata": {"name": "a", "creationTimestamp": "2026-11-22T10:00:00Z"},
            "status": {"phase": "Running", "nodeName": "n", "ipAddresses": ["10.0.0.2", "10.0.0.3"],
                "conditions": [{"type": "Scheduled", "status": "True"},
                               {"type": "Ready", "status": "False"}]}})
    }

    #[test]
    fn json_paths_of_the_crd_columns_evaluate() {
        let o = vm();
        assert_eq!(eval_json_path(".status.phase", &o), [json!("Running")]);
        assert_eq!(
            eval_json_path(".status.ipAddresses[0]", &o),
            [json!("10.0.0.2")]
        );
        assert_eq!(
            eval_json_path(".status.conditions[?(@.type==\"Ready\")].status", &o),
            [json!("False")]
        );
        assert_eq!(eval_json_path(".status.conditions[*].type", &o).len(), 2);
        assert!(eval_json_path(".status.missing[0]", &o).is_empty());
    }

    #[test]
    fn accept_headers_pick_the_shape() {
        assert_eq!(
            Shape::of_accept("application/json;as=Table;v=v1;g=meta.k8s.io,application/json"),
            Shape::Table
        );
        assert_eq!(
            Shape::of_accept("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"),
            Shape::Metadata
        );
        assert_eq!(Shape::of_accept(""), Shape::Object);
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(3600 * 5 + 60 * 3), "5h3m");
        assert_eq!(human_duration(86_400 * 3), "3d");
        assert_eq!(human_duration(86_400 * 400), "400d");
    }

    #[test]
    fn microvm_table_has_name_and_printer_columns() {
        let reg = crate::dev::apiserver::resources::test_registry();
        let def = reg.find("example.com", "v1", "widgets").expect("wd");
        let now: jiff::Timestamp = "2026-11-22T10:01:00Z".parse().expect("ts");
        let t = table(def, &[vm()], IncludeObject::Metadata, "7", now);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .expect("cols")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["Name", "Phase", "Node", "IP", "Ready", "Age"]);
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["a", "Running", "n", "10.0.0.2", "False", "60s"])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }
}
