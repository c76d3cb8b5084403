//! The verdict table of `docs/gitops.md` and the MicroVM objects it judges
//! (`tests/fixtures/status/*.yaml`, captured from real `ignis dev` runs by
//! `scripts/capture-status-fixtures.sh`), shared by the kstatus and Argo CD checks.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
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

/// The MicroVM verdicts: the rows between `<!-- verdicts:begin -->` and `<!-- verdicts:end -->`
/// in docs/gitops.md.
pub fn verdict_table() -> BTreeMap<String, Row> {
    table_between("verdicts")
}

/// The MicroVMPool verdicts (`<!-- pool-verdicts:begin -->` … `end`).
pub fn pool_verdict_table() -> BTreeMap<String, Row> {
    table_between("pool-verdicts")
}

/// The rows between `<!-- {marker}:begin -->` and `<!-- {marker}:end -->` in docs/gitops.md,
/// by fixture name (the first column, in backticks). Columns are found by their header.
fn table_between(marker: &str) -> BTreeMap<String, Row> {
    let doc = std::fs::read_to_string(root().join("docs/gitops.md")).expect("docs/gitops.md");
    let begin = format!("<!-- {marker}:begin -->");
    let start = doc
        .find(&begin)
        .unwrap_or_else(|| panic!("docs/gitops.md has {begin}"));
    let end = start
        + doc[start..]
            .find(&format!("<!-- {marker}:end -->"))
            .unwrap_or_else(|| panic!("docs/gitops.md has <!-- {marker}:end -->"));
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

/// The captured MicroVMs, by fixture name (the file stem).
pub fn fixtures() -> BTreeMap<String, PathBuf> {
    fixtures_in("tests/fixtures/status")
}

/// The captured MicroVMPools.
pub fn pool_fixtures() -> BTreeMap<String, PathBuf> {
    fixtures_in("tests/fixtures/pool-status")
}

fn fixtures_in(dir: &str) -> BTreeMap<String, PathBuf> {
    let dir = root().join(dir);
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
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
    check_table_matches(table, fixtures())
}

/// [`check_table_matches_fixtures`] for the given fixtures.
pub fn check_table_matches(
    table: &BTreeMap<String, Row>,
    fixtures: BTreeMap<String, PathBuf>,
) -> BTreeMap<String, PathBuf> {
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

/// The kstatus program, built by scripts/tools.sh when it is not cached yet; `None` when Go is
/// missing and the build is not demanded.
pub fn kstatus_binary() -> Option<PathBuf> {
    let tools = root().join("scripts/tools.sh");
    let dir = run(
        Command::new(&tools).args(["bindir", "kstatus"]),
        Duration::from_secs(30),
    );
    let bin = PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim()).join("kstatus");
    if !bin.is_file() && !on_path("go") {
        assert!(
            !require_all(),
            "IGNIS_REQUIRE_ALL=1 but Go is missing: install Go >= 1.26 to build the kstatus checker"
        );
        eprintln!("skipped: Go is missing, so kstatus (sigs.k8s.io/cli-utils) cannot be built");
        return None;
    }
    let out = run(
        Command::new(&tools).args(["build", "kstatus"]),
        Duration::from_secs(900),
    );
    assert!(
        out.status.success(),
        "scripts/tools.sh build kstatus failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bin.is_file(), "no kstatus binary at {}", bin.display());
    Some(bin)
}

/// A JSON value as a Lua table constructor, the shape Argo CD hands the script as `obj`
/// (JSON null is nil, as in Argo CD).
pub fn lua_literal(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::Null => out.push_str("nil"),
        serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        serde_json::Value::Number(n) => out.push_str(&n.to_string()),
        serde_json::Value::String(s) => lua_string(s, out),
        serde_json::Value::Array(items) => {
            out.push('{');
            for item in items {
                lua_literal(item, out);
                out.push(',');
            }
            out.push('}');
        }
        serde_json::Value::Object(map) => {
            out.push('{');
            for (k, item) in map {
                out.push('[');
                lua_string(k, out);
                out.push_str("]=");
                lua_literal(item, out);
                out.push(',');
            }
            out.push('}');
        }
    }
}

pub fn lua_string(s: &str, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\{}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Run the health script on one object as Argo CD does: `obj` global, the chunk returns the
/// health table. Prints "status\tmessage".
pub fn health(script: &str, obj: &serde_json::Value) -> (String, String) {
    let mut program = String::from("obj = ");
    lua_literal(obj, &mut program);
    program.push_str("\nlocal check = assert(loadstring(");
    lua_string(script, &mut program);
    program.push_str(", \"health.lua\"))\nlocal hs = check()\nio.write(hs.status, \"\\t\", hs.message or \"\")\n");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("run.lua");
    std::fs::write(&file, program).expect("write");
    let out = run(Command::new("lua5.1").arg(&file), Duration::from_secs(30));
    assert!(
        out.status.success(),
        "lua5.1 failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (status, message) = text.split_once('\t').expect("status\\tmessage");
    (status.to_string(), message.to_string())
}

pub fn lua_present() -> bool {
    if on_path("lua5.1") {
        return true;
    }
    assert!(
        !require_all(),
        "IGNIS_REQUIRE_ALL=1 but lua5.1 is missing: apt-get install lua5.1 (scripts/setup.sh)"
    );
    eprintln!("skipped: lua5.1 is missing (apt-get install lua5.1)");
    false
}

/// kstatus' verdict on each fixture, by fixture name: (status, message).
pub fn kstatus_verdicts(
    kstatus: &Path,
    fixtures: &BTreeMap<String, PathBuf>,
) -> BTreeMap<String, (String, String)> {
    let out = run(
        Command::new(kstatus).args(fixtures.values()),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "kstatus failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let file = PathBuf::from(v["file"].as_str().expect("file"));
        let name = file
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .to_string();
        let status = v["status"].as_str().expect("status").to_string();
        let message = v["message"].as_str().unwrap_or("").to_string();
        got.insert(name, (status, message));
    }
    got
}
