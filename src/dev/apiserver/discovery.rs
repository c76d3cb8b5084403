//! Discovery documents: `/version`, `/api`, `/apis`, `/apis/<group>` and the per-version
//! resource lists that kubectl and kube-rs use to map kinds and short names to paths.
//! Aggregated discovery is not served: clients fall back to these legacy documents when the
//! answer is plain `application/json`.

use serde_json::{Value, json};

use super::resources::Registry;

/// `/version`
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": format!("v1.33.0+ignis-dev-{}", crate::VERSION),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "2026-11-22T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, arch()),
    })
}

/// The node architecture in Kubernetes spelling.
pub fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// `/api`
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [],
    })
}

fn group_entry(group: &str, versions: &[String]) -> Value {
    let entries: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": entries,
        "preferredVersion": entries.first().cloned().unwrap_or(Value::Null),
    })
}

fn versions_of(reg: &Registry, group: &str) -> Vec<String> {
    reg.group_versions()
        .into_iter()
        .filter(|(g, _)| g == group)
        .map(|(_, v)| v)
        .collect()
}

/// `/apis`
pub fn groups(reg: &Registry) -> Value {
    let mut names: Vec<String> = Vec::new();
    for (g, _) in reg.group_versions() {
        if !g.is_empty() && !names.contains(&g) {
            names.push(g);
        }
    }
    json!({
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": names.iter().map(|g| group_entry(g, &versions_of(reg, g))).collect::<Vec<_>>(),
    })
}

/// `/apis/<group>`
pub fn group(reg: &Registry, group: &str) -> Option<Value> {
    let versions = versions_of(reg, group);
    if group.is_empty() || versions.is_empty() {
        return None;
    }
    let mut doc = group_entry(group, &versions);
    if let Some(map) = doc.as_object_mut() {
        map.insert("kind".into(), "APIGroup".into());
        map.insert("apiVersion".into(), "v1".into());
    }
    Some(doc)
}

/// `/api/v1`, `/apis/<group>/<version>`
pub fn resource_list(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in reg.in_group_version(group, version) {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind,
            "verbs": r.verbs(),
        });
        if let Some(map) = entry.as_object_mut() {
            if !r.short_names.is_empty() {
                map.insert("shortNames".into(), json!(r.short_names));
            }
            if !r.categories.is_empty() {
                map.insert("categories".into(), json!(r.categories));
            }
        }
        resources.push(entry);
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microvm_is_discoverable_by_short_name_with_status() {
        let reg = crate::dev::apiserver::resources::test_registry();
        let list = resource_list(&reg, "example.com", "v1").expect("list");
        assert_eq!(list["groupVersion"], "example.com/v1");
        let mvm = &list["resources"][0];
        assert_eq!(mvm["name"], "widgets");
        assert_eq!(mvm["shortNames"][0], "wd");
        assert!(
            mvm["verbs"]
                .as_array()
                .expect("verbs")
                .contains(&json!("watch"))
        );
        assert_eq!(list["resources"][1]["name"], "widgets/status");
        assert!(resource_list(&reg, "example.com", "v9").is_none());
    }

    #[test]
    fn group_list_names_every_group_once() {
        let reg = crate::dev::apiserver::resources::test_registry();
        let doc = groups(&reg);
        let names: Vec<&str> = doc["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .filter_map(|g| g["name"].as_str())
            .collect();
        assert!(names.contains(&"example.com") && names.contains(&"coordination.k8s.io"));
        assert!(!names.contains(&""));
        assert_eq!(
            doc["groups"][0]["preferredVersion"]["groupVersion"],
            "example.com/v1"
        );
        assert!(group(&reg, "example.com").is_some());
    }
}
