//! Conversion between the two Event APIs, which share one storage like on a real server:
//! kube-rs' recorder writes `events.k8s.io/v1`, while `kubectl describe` and `kubectl get
//! events` read core `v1`.

use serde_json::{Map, Value};

/// `events.k8s.io/v1` field ⇄ core `v1` field.
const RENAMES: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];
/// Fields spelled the same in both.
const SAME: [&str; 8] = [
    "metadata",
    "reason",
    "type",
    "eventTime",
    "series",
    "action",
    "related",
    "reportingInstance",
];

fn rename(
    obj: &Value,
    api_version: &str,
    pairs: impl Iterator<Item = (&'static str, &'static str)>,
) -> Value {
    let mut out = Map::new();
    out.insert("apiVersion".into(), Value::String(api_version.into()));
    out.insert("kind".into(), Value::String("Event".into()));
    for field in SAME {
        if let Some(v) = obj.get(field) {
            out.insert(field.into(), v.clone());
        }
    }
    for (from, to) in pairs {
        if let Some(v) = obj.get(from) {
            out.insert(to.into(), v.clone());
        }
    }
    Value::Object(out)
}

/// A stored `events.k8s.io/v1` Event as a core `v1` Event.
pub fn event_to_core(event: &Value) -> Value {
    let mut core = rename(event, "v1", RENAMES.into_iter());
    // Core readers (kubectl describe) show source and count; derive them when only the
    // newer fields are set.
    if core.get("source").is_none()
        && let Some(controller) = event.get("reportingController")
    {
        let mut source = Map::new();
        source.insert("component".into(), controller.clone());
        if let Some(instance) = event.get("reportingInstance") {
            source.insert("host".into(), instance.clone());
        }
        core["source"] = Value::Object(source);
    }
    if core.get("count").is_none() {
        core["count"] = event["series"]["count"]
            .as_i64()
            .map_or(Value::from(1), Value::from);
    }
    core
}

/// A core `v1` Event in its stored `events.k8s.io/v1` form.
pub fn core_to_event(core: &Value) -> Value {
    rename(
        core,
        "events.k8s.io/v1",
        RENAMES.into_iter().map(|(a, b)| (b, a)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_round_trip_between_the_two_apis() {
        let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "default"},
            "regarding": {"kind": "MicroVM", "name": "vm"}, "note": "booted",
            "reason": "Started", "type": "Normal", "reportingController": "ignis.dev/controller",
            "reportingInstance": "node-a", "eventTime": "2026-11-22T10:00:00.000000Z",
            "series": {"count": 3, "lastObservedTime": "2026-11-22T10:01:00.000000Z"}});
        let core = event_to_core(&event);
        assert_eq!(core["apiVersion"], "v1");
        assert_eq!(core["involvedObject"]["name"], "vm");
        assert_eq!(core["message"], "booted");
        assert_eq!(core["source"]["component"], "ignis.dev/controller");
        assert_eq!(core["count"], 3);
        let back = core_to_event(&core);
        assert_eq!(back["regarding"], event["regarding"]);
        assert_eq!(back["note"], "booted");
        assert_eq!(back["reportingController"], "ignis.dev/controller");
        assert_eq!(back["apiVersion"], "events.k8s.io/v1");
    }
}
