//! Smoke run of every `ignis bench` with tiny N, so the benches do not rot: each must exit 0
//! within its deadline, write JSON that parses, and report sane figures (real QEMU boots for
//! `boot`, `footprint`, `churn`, `suspend` and `pool`; the simulated VMM for `control-plane`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Run `ignis bench <args>` with a deadline; the parsed `<results>/<bench>.json`.
fn bench(results: &Path, bench: &str, args: &[&str], deadline: Duration) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ignis"))
        .args(["bench", "--results-dir"])
        .arg(results)
        .arg(bench)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn ignis bench");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ignis bench {bench} did not finish within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "ignis bench {bench} {args:?}: {status}");
    let path = results.join(format!("{bench}.json"));
    let text = std::fs::read_to_string(&path).expect("results written");
    let json: Value = serde_json::from_str(&text).expect("results parse");
    assert_eq!(json["bench"], bench);
    assert!(json["machine"]["cores"].as_u64().unwrap_or(0) >= 1);
    assert!(json["machine"]["memory_mib"].as_u64().unwrap_or(0) > 0);
    assert!(!json["rows"].as_array().expect("rows").is_empty());
    json
}

/// The value of the first row whose metric contains `needle`.
fn row(json: &Value, needle: &str) -> f64 {
    json["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|r| r["metric"].as_str().is_some_and(|m| m.contains(needle)))
        .unwrap_or_else(|| panic!("no row {needle:?} in {json}"))["value"]
        .as_f64()
        .expect("numeric value")
}

#[test]
fn every_bench_runs_with_tiny_n() {
    let results = tempfile::tempdir().expect("tmp");
    let dir = results.path();

    let boot = bench(dir, "boot", &["--count", "2"], Duration::from_secs(120));
    assert!(row(&boot, "sequential: bare QEMU → marker p50") > 0.0);
    assert!(row(&boot, "sequential: apply → Ready p50") > 0.0);
    assert!(row(&boot, "concurrent ×2: apply → Ready max") > 0.0);
    assert!(row(&boot, "writes create → Ready, controller, max") >= 1.0);
    assert_eq!(row(&boot, "writes create → Ready, user"), 1.0);
    assert_eq!(
        boot["data"]["sequential"]["bare_ms"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );

    let cp = bench(
        dir,
        "control-plane",
        &["--counts", "50"],
        Duration::from_secs(150),
    );
    assert!(row(&cp, "50: MicroVMs/s to Scheduled") > 0.0);
    assert!(row(&cp, "50: controller RSS idle") > 1.0);
    assert!(row(&cp, "50: MicroVM writes per VM") >= 1.0);

    let fp = bench(dir, "footprint", &["--quick"], Duration::from_secs(180));
    assert!(row(&fp, "binary size, stripped") > 1.0);
    assert!(row(&fp, "agent start → /readyz") > 0.0);
    assert!(row(&fp, "controller start → /readyz") > 0.0);
    assert!(row(&fp, "agent RSS idle") > 1.0);
    assert!(row(&fp, "controller RSS idle") > 1.0);
    assert!(row(&fp, "ignis dev RSS idle") > 1.0);

    let churn = bench(dir, "churn", &["--cycles", "3"], Duration::from_secs(120));
    assert_eq!(row(&churn, "cycles"), 3.0);
    assert!(row(&churn, "time per cycle p50") > 0.0);
    assert_eq!(row(&churn, "leaked kinds"), 0.0);

    let suspend = bench(dir, "suspend", &["--count", "2"], Duration::from_secs(180));
    let (cold, resume) = (
        row(&suspend, "cold boot: apply → Ready p50"),
        row(&suspend, "resume: spec → Ready p50"),
    );
    assert!(
        cold > 0.0 && resume > 0.0,
        "cold {cold} ms, resume {resume} ms"
    );
    assert!(row(&suspend, "suspend: spec → Suspended p50") > 0.0);
    // A snapshot holds at least the guest's unpacked initramfs (several MB).
    assert!(row(&suspend, "snapshot size p50") > 1.0);

    let pool = bench(
        dir,
        "pool",
        &[
            "--cold",
            "1",
            "--pool-size",
            "2",
            "--claims",
            "2",
            "--refill",
            "2",
            "--idle-window",
            "2s",
        ],
        Duration::from_secs(240),
    );
    assert!(row(&pool, "cold boot: apply → Ready p50") > 0.0);
    assert_eq!(row(&pool, "claims that booted cold"), 0.0, "{pool}");
    let claim = row(&pool, "claim → Ready p50");
    assert!(
        claim > 0.0 && claim < row(&pool, "cold boot: apply → Ready p50"),
        "a claim ({claim} ms) is Ready before a cold boot"
    );
    assert!(row(&pool, "claim: status.claim.latencyMs p50") >= 0.0);
    assert!(row(&pool, "claims/s, sustained") > 0.0);
    // A warm VM's VMM holds at least its booted guest's kernel and initramfs.
    assert!(row(&pool, "warm VM: VMM RSS per VM") > 10.0);
    assert!(row(&pool, "warm VM: VMM PSS per VM") > 10.0);
    assert!(row(&pool, "refill: drained pool → all Ready") > 0.0);
}
