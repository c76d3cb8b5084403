//! The verdicts on a `MicroVMPool` (captured from real `ignis dev` runs in
//! `tests/fixtures/pool-status/`): kstatus by its own code and Argo CD's check
//! (`config/argocd/pool-health.lua` in a real Lua 5.1) each give what `docs/gitops.md`
//! promises; the argocd-cm snippet carries the script verbatim.

mod gitops_support;

use gitops_support::{
    check_table_matches, health, kstatus_binary, kstatus_verdicts, lua_present, object,
    pool_fixtures, pool_verdict_table, root,
};

fn script() -> String {
    std::fs::read_to_string(root().join("config/argocd/pool-health.lua")).expect("pool-health.lua")
}

#[test]
fn kstatus_gives_every_captured_pool_the_documented_verdict() {
    let table = pool_verdict_table();
    let fixtures = check_table_matches(&table, pool_fixtures());
    let Some(kstatus) = kstatus_binary() else {
        return;
    };
    let got = kstatus_verdicts(&kstatus, &fixtures);
    for (name, row) in &table {
        assert_eq!(
            got.get(name).map(|(status, _)| status),
            Some(&row.kstatus),
            "{name}: kstatus' verdict is not docs/gitops.md's"
        );
    }
}

#[test]
fn argocd_gives_every_captured_pool_the_documented_verdict() {
    let table = pool_verdict_table();
    let fixtures = check_table_matches(&table, pool_fixtures());
    if !lua_present() {
        return;
    }
    let script = script();
    for (name, path) in &fixtures {
        let (status, message) = health(&script, &object(path));
        assert!(!message.is_empty(), "{name}: the health message is empty");
        assert_eq!(
            status, table[name].argocd,
            "{name}: pool-health.lua says {status} ({message})"
        );
    }
    // A spec change the controller has not seen yet is not Healthy on the old status.
    let mut newer = object(&fixtures["ready"]);
    newer["metadata"]["generation"] = serde_json::json!(7);
    assert_eq!(health(&script, &newer).0, "Progressing");
}

#[test]
fn argocd_cm_snippet_carries_pool_health_lua_verbatim() {
    let cm =
        std::fs::read_to_string(root().join("config/argocd/argocd-cm.yaml")).expect("argocd-cm");
    let doc: serde_yaml::Value = serde_yaml::from_str(&cm).expect("yaml");
    let key = "resource.customizations.health.ignis.dev_MicroVMPool";
    let embedded = doc["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("argocd-cm.yaml has no data.{key}"));
    assert_eq!(embedded, script(), "argocd-cm.yaml's pool script drifted");
}
