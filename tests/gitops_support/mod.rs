//! The verdict table of `docs/gitops.md` and the MicroVM objects it judges
//! (`tests/fixtures/status/*.yaml`, captured from real `ignis dev` runs by
//! `scripts/capture-status-fixtures.sh`), shared by the kstatus and Argo CD checks.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One row of the table: the expected verdicts for one fixture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub phase: String,
    pub kstatus: String,
    pub argocd: String,
    /// What Flux's Kustomization (`wait: true`) does: "Ready", "waits" or "fails early",
    /// with "(e2e ...)" where e2e/tests/gitops.rs saw it on the cluster.
    pub flux: String,
}

/// The rows between `<!-- verdicts:begin -->` and `<!-- verdicts:end -->` in docs/gitops.md,
/// by fixture name (the first column, in backticks). Columns are found by their header.
pub fn verdict_table() -> BTreeMap<String, Row> {
    let doc = std::fs::read_to_string(root().join("docs/gitops.md")).expect("docs/gitops.md");
    let start = doc
        .find("<!-- verdicts:begin -->")
        .expect("docs/gitops.md has <!-- verdicts:begin -->");
    let end = doc
        .find("<!-- verdicts:end -->")
        .expect("docs/gitops.md has <!-- verdicts:end -->");
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`').to_string())
            .collect()
    };
    let mut lines = doc[start..end]
        .lines()
        .filter(|l| l.trim_start().starts_with('|'));
    let header = cells(lines.next().expect("table header"));
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("the verdict table has no '{name}' column: {header:?}"))
    };
    let (fixture, phase, kstatus, argocd) =
        (col("fixture"), col("phase"), col("kstatus"), col("Argo CD"));
    let flux = header
        .iter()
        .position(|h| h.starts_with("Flux"))
        .expect("the verdict table has a Flux column");
    let mut rows = BTreeMap::new();
    for line in lines.skip(1) {
        let c = cells(line);
        let row = Row {
            phase: c[phase].clone(),
            kstatus: c[kstatus].clone(),
            argocd: c[argocd].clone(),
            flux: c[flux].clone(),
        };
        assert!(
            rows.insert(c[fixture].clone(), row).is_none(),
            "fixture {} is twice in the table",
            c[fixture]
        );
    }
    assert!(!rows.is_empty(), "the verdict table is empty");
    rows
}

/// The captured objects, by fixture name (the file stem).
pub fn fixtures() -> BTreeMap<String, PathBuf> {
    let dir = root().join("tests/fixtures/status");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("tests/fixtures/status") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let stem = path
                .file_stem()
                .expect("stem")
                .to_string_lossy()
                .to_string();
            out.insert(stem, path);
        }
    }
    out
}

/// A fixture as JSON.
pub fn object(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("fixture");
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every fixture has a row and every row a fixture, and the row's phase is the object's.
pub fn check_table_matches_fixtures(table: &BTreeMap<String, Row>) -> BTreeMap<String, PathBuf> {
    let fixtures = fixtures();
    let missing_rows: Vec<_> = fixtures
        .keys()
        .filter(|k| !table.contains_key(*k))
        .collect();
    let missing_files: Vec<_> = table
        .keys()
        .filter(|k| !fixtures.contains_key(*k))
        .collect();
    assert!(
        missing_rows.is_empty() && missing_files.is_empty(),
        "fixtures without a row in docs/gitops.md: {missing_rows:?}; rows without a fixture: {missing_files:?}"
    );
    for (name, path) in &fixtures {
        let obj = object(path);
        // No phase yet (a MicroVM the controller has not written) is "—" in the table.
        let phase = obj["status"]["phase"].as_str().unwrap_or("—").to_string();
        assert_eq!(
            phase, table[name].phase,
            "{name}: the table's phase is not the captured object's"
        );
    }
    fixtures
}

/// Whether CI demands every prerequisite.
pub fn require_all() -> bool {
    std::env::var("IGNIS_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Run to completion within `limit`, or panic.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// Whether `program` is on PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
