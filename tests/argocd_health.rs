//! Argo CD's view of a MicroVM: `config/argocd/health.lua` run by a real Lua 5.1 interpreter
//! (Debian's `lua5.1`; Argo CD runs gopher-lua, a Lua 5.1) over the captured objects, each
//! verdict checked against `docs/gitops.md`; and the `argocd-cm` snippet carries exactly that
//! script. Without `lua5.1` it fails under `IGNIS_REQUIRE_ALL=1` and is skipped otherwise.

mod gitops_support;

use gitops_support::{
    check_table_matches_fixtures, health, lua_present, object, root, verdict_table,
};

fn script() -> String {
    std::fs::read_to_string(root().join("config/argocd/health.lua")).expect("health.lua")
}

#[test]
fn argocd_health_gives_every_captured_microvm_the_documented_verdict() {
    let table = verdict_table();
    let fixtures = check_table_matches_fixtures(&table);
    if !lua_present() {
        return;
    }
    let script = script();
    let mut wrong = Vec::new();
    for (name, path) in &fixtures {
        let (status, message) = health(&script, &object(path));
        assert!(!message.is_empty(), "{name}: the health message is empty");
        if status != table[name].argocd {
            wrong.push(format!(
                "{name}: health.lua says {status} ({message}), docs/gitops.md says {}",
                table[name].argocd
            ));
        }
    }
    assert!(wrong.is_empty(), "verdicts differ:\n{}", wrong.join("\n"));
}

#[test]
fn argocd_health_waits_for_a_new_generation_and_for_a_first_status() {
    if !lua_present() {
        return;
    }
    let script = script();
    let ready = object(&root().join("tests/fixtures/status/ready.yaml"));
    // A spec change the controller has not seen yet: not Healthy on the old Ready.
    let mut newer = ready.clone();
    newer["metadata"]["generation"] = serde_json::json!(7);
    assert_eq!(health(&script, &newer).0, "Progressing");
    // Just created: no status at all.
    let mut fresh = ready;
    fresh.as_object_mut().expect("object").remove("status");
    assert_eq!(health(&script, &fresh).0, "Progressing");
}

#[test]
fn argocd_cm_snippet_carries_health_lua_verbatim() {
    let cm =
        std::fs::read_to_string(root().join("config/argocd/argocd-cm.yaml")).expect("argocd-cm");
    let doc: serde_yaml::Value = serde_yaml::from_str(&cm).expect("yaml");
    let key = "resource.customizations.health.ignis.dev_MicroVM";
    let embedded = doc["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("argocd-cm.yaml has no data.{key}"));
    assert_eq!(
        embedded,
        script(),
        "argocd-cm.yaml's script drifted from health.lua"
    );
}

#[test]
fn argocd_health_of_a_deleting_microvm_and_of_a_lost_agent() {
    if !lua_present() {
        return;
    }
    let script = script();
    let ready = object(&root().join("tests/fixtures/status/ready.yaml"));
    // Being deleted: Progressing, as Argo CD itself reports any object pending deletion.
    let mut deleting = ready.clone();
    deleting["metadata"]["deletionTimestamp"] = serde_json::json!("2026-12-06T06:00:00Z");
    assert_eq!(health(&script, &deleting).0, "Progressing");
    // The agent of its node is unreachable (Ready=Unknown, as the controller writes it): the
    // VM's fate is not known, which is no verdict on the VM.
    let mut lost = ready;
    for c in lost["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
    {
        if c["type"] == "Ready" {
            c["status"] = serde_json::json!("Unknown");
            c["reason"] = serde_json::json!("AgentUnreachable");
            c["message"] = serde_json::json!("the ignis agent on node vm is unreachable");
        }
    }
    lost["status"]["phase"] = serde_json::json!("Unknown");
    assert_eq!(health(&script, &lost).0, "Unknown");
}
