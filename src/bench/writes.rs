//! Write counting for the benchmarks: an observer on the dev API server's watch hub that counts
//! accepted write requests per object and verb (`create`, `patch`, `apply/status`, …).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

use crate::dev::apiserver::{WriteObserver, WriteRecord};

/// Writes to one object, by verb: what the boot benchmark counts between create and Ready.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ObjectWrites {
    pub by_verb: BTreeMap<String, u64>,
}

impl ObjectWrites {
    /// Writes to the object and its status (deletes excluded).
    pub fn total(&self) -> u64 {
        self.by_verb
            .iter()
            .filter(|(verb, _)| !verb.starts_with("delete"))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Counts writes per object, keyed `group/plural/namespace/name`
/// (e.g. `ignis.dev/microvms/default/demo`).
#[derive(Debug, Default)]
pub struct WriteCounter {
    writes: Mutex<BTreeMap<String, ObjectWrites>>,
}

impl WriteObserver for WriteCounter {
    fn observe(&self, w: &WriteRecord<'_>) {
        let key = format!("{}/{}/{}", w.resource, w.namespace, w.name);
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        *writes
            .entry(key)
            .or_default()
            .by_verb
            .entry(w.verb.to_string())
            .or_default() += 1;
    }
}

impl WriteCounter {
    /// Everything counted so far.
    pub fn snapshot(&self) -> BTreeMap<String, ObjectWrites> {
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Writes to one MicroVM and its status so far.
    pub fn microvm(&self, namespace: &str, name: &str) -> ObjectWrites {
        self.snapshot()
            .remove(&format!(
                "{}/microvms/{namespace}/{name}",
                crate::api::GROUP
            ))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_object_and_verb() {
        let counter = WriteCounter::default();
        for verb in ["create", "apply/status", "apply/status", "delete"] {
            counter.observe(&WriteRecord {
                resource: "ignis.dev/microvms",
                namespace: "default",
                name: "vm",
                verb,
            });
        }
        let w = counter.microvm("default", "vm");
        assert_eq!(w.by_verb.get("apply/status"), Some(&2));
        assert_eq!(w.total(), 3);
    }
}
