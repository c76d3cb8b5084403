//! kstatus by its own code: `scripts/tools/kstatus` (built with `sigs.k8s.io/cli-utils`, the
//! library Flux's health checks and Helm's `--wait=watcher` use) judges every captured MicroVM,
//! and each verdict must be the one `docs/gitops.md` promises. Runs in CI; without Go it fails
//! under `IGNIS_REQUIRE_ALL=1` and is skipped with a message otherwise.

mod gitops_support;

use gitops_support::{
    check_table_matches_fixtures, kstatus_binary, kstatus_verdicts, verdict_table,
};

#[test]
fn kstatus_gives_every_captured_microvm_the_documented_verdict() {
    let table = verdict_table();
    let fixtures = check_table_matches_fixtures(&table);
    let Some(kstatus) = kstatus_binary() else {
        return;
    };
    let got = kstatus_verdicts(&kstatus, &fixtures);
    let mut wrong = Vec::new();
    for (name, row) in &table {
        let (status, message) = got.get(name).cloned().unwrap_or_default();
        if status != row.kstatus {
            wrong.push(format!(
                "{name}: kstatus says {status} ({message}), docs/gitops.md says {}",
                row.kstatus
            ));
        }
    }
    assert!(wrong.is_empty(), "verdicts differ:\n{}", wrong.join("\n"));
}

/// Flux's health checks are kstatus (its fork, github.com/fluxcd/cli-utils, has the same status
/// rules): the table's Flux column must follow from its kstatus column.
#[test]
fn the_flux_column_follows_from_kstatus() {
    for (name, row) in verdict_table() {
        let flux = match row.kstatus.as_str() {
            "Current" => "Ready",
            "InProgress" => "waits",
            "Failed" => "fails early",
            other => panic!("{name}: unknown kstatus verdict {other}"),
        };
        assert!(
            row.flux == flux || row.flux.starts_with(&format!("{flux} (")),
            "{name}: kstatus {} means Flux {flux}, the table says {}",
            row.kstatus,
            row.flux
        );
    }
}
