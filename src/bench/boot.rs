//! `ignis bench boot`: apply → Scheduled → Ready through the dev stack, beside the floor: the
//! same guest image booted by the same QEMU with the same argv (the backend's own
//! [`qemu_args`], minus `-S`), started directly and timed to the same console marker.
//! The two are interleaved (sequential: alternating, which goes first flips each round;
//! concurrent: all started together) so load affects both alike.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::future::join_all;
use serde::Serialize;

use super::machine::Machine;
use super::stack::{NAMESPACE, Stack, StackOptions, sample_microvm, scratch_dir};
use super::stats::{Summary, Target, summarize};
use super::{BenchError, Report, Row};
use crate::agent::guest::{DEMO_MARKER, DemoGuest};
use crate::agent::vmm::VmConfig;
use crate::agent::vmm::qemu::{DEFAULT_BINARY, host_tsc_khz, qemu_args};
use crate::api::Accelerator;
use crate::api::parse_quantity_bytes;

/// Flags of `ignis bench boot`.
#[derive(Debug, clap::Args)]
pub(crate) struct BootArgs {
    /// MicroVMs per mode (sequential, then concurrent), and as many bare boots.
    #[arg(long, default_value_t = 20)]
    pub(crate) count: usize,
    /// Deadline of one boot, Ignis or bare.
    #[arg(long, default_value = "300s", value_parser = crate::time::parse_duration)]
    pub(crate) timeout: Duration,
}

impl Default for BootArgs {
    fn default() -> Self {
        BootArgs {
            count: 20,
            timeout: Duration::from_secs(300),
        }
    }
}

/// One Ignis boot.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct IgnisBoot {
    pub(crate) name: String,
    pub(crate) scheduled_ms: f64,
    pub(crate) ready_ms: f64,
    /// Writes to the MicroVM and its status by the user (the one `create`).
    pub(crate) user_writes: u64,
    /// Writes by everyone else (the controller) from create to Ready.
    pub(crate) controller_writes: u64,
    pub(crate) by_verb: std::collections::BTreeMap<String, u64>,
}

/// Both sides of one mode.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ModeResult {
    pub(crate) ignis: Vec<IgnisBoot>,
    pub(crate) bare_ms: Vec<f64>,
}

/// The bare QEMU of one boot: the backend's argv without `-S`, so the guest runs at once.
pub(crate) fn bare_argv(config: &VmConfig, tsc_khz: Option<u64>) -> Vec<std::ffi::OsString> {
    qemu_args(config, tsc_khz, None)
        .into_iter()
        .filter(|a| a != "-S")
        .collect()
}

/// The VM config the agent would build for the sample MicroVM.
fn bare_config(guest: &DemoGuest, dir: &Path, id: &str) -> Result<VmConfig, BenchError> {
    let vm = sample_microvm(id, guest);
    let memory = parse_quantity_bytes(&vm.spec.resources.memory)
        .map_err(|e| BenchError::Failed(format!("sample memory: {e}")))?;
    Ok(VmConfig {
        id: id.into(),
        vcpus: vm.spec.resources.vcpus,
        memory_mib: memory.div_ceil(1 << 20),
        kernel: guest.kernel.clone(),
        cmdline: vm.spec.kernel.cmdline.clone().unwrap_or_default(),
        initrd: Some(guest.initrd.clone()),
        disks: Vec::new(),
        nets: Vec::new(),
        user_data: None,
        accelerator: Accelerator::Tcg,
        state_dir: dir.to_path_buf(),
        console_log: dir.join("console.log"),
        api_socket: dir.join("qmp.sock"),
        binary: PathBuf::from(DEFAULT_BINARY),
        confinement: None,
        restore: None,
        opened: Default::default(),
    })
}

/// Boot the guest on bare QEMU; milliseconds from spawn to the marker on the console.
pub(crate) async fn bare_boot(
    guest: &DemoGuest,
    root: &Path,
    id: &str,
    timeout: Duration,
) -> Result<f64, BenchError> {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let config = bare_config(guest, &dir, id)?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let argv = bare_argv(&config, host_tsc_khz(&cpuinfo));
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&config.binary)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BenchError::Io {
            what: format!("spawn {}", config.binary.display()),
            source,
        })?;
    let outcome = loop {
        let console = std::fs::read(&config.console_log).unwrap_or_default();
        if console
            .windows(DEMO_MARKER.len())
            .any(|w| w == DEMO_MARKER.as_bytes())
        {
            break Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(BenchError::Failed(format!(
                "bare QEMU {id} exited before the marker: {status}"
            )));
        }
        if started.elapsed() > timeout {
            break Err(BenchError::Timeout {
                what: format!("bare boot {id}"),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let _ = child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

/// One Ignis boot: create, wait for Ready, read its write count; then delete it and, when
/// `wait_gone`, wait until it is gone so it does not load the next boot.
async fn ignis_boot(
    stack: &Stack,
    name: &str,
    timeout: Duration,
    wait_gone: bool,
) -> Result<IgnisBoot, BenchError> {
    let sent = stack.create(name).await?;
    let p = stack
        .wait_for(name, "Ready", timeout, |p| p.ready.is_some())
        .await?;
    let writes = stack.write_counter.microvm(NAMESPACE, name);
    let ms = |t: Option<Instant>| t.map_or(f64::NAN, |t| (t - sent).as_secs_f64() * 1000.0);
    let user = writes.by_verb.get("create").copied().unwrap_or(0);
    let boot = IgnisBoot {
        name: name.into(),
        scheduled_ms: ms(p.scheduled),
        ready_ms: ms(p.ready),
        user_writes: user,
        controller_writes: writes.total().saturating_sub(user),
        by_verb: writes.by_verb.clone(),
    };
    stack.delete(name).await?;
    if wait_gone {
        stack
            .wait_for(name, "deleted", Duration::from_secs(60), |p| {
                p.gone.is_some()
            })
            .await?;
    }
    Ok(boot)
}

async fn sequential(
    stack: &Stack,
    args: &BootArgs,
    bare_root: &Path,
) -> Result<ModeResult, BenchError> {
    let mut out = ModeResult::default();
    for i in 0..args.count {
        let name = format!("seq-{i}");
        // Alternate who goes first so a slow drift of the machine's load hits both.
        if i % 2 == 0 {
            out.ignis
                .push(ignis_boot(stack, &name, args.timeout, true).await?);
            out.bare_ms.push(
                bare_boot(
                    &stack.guest,
                    bare_root,
                    &format!("bare-seq-{i}"),
                    args.timeout,
                )
                .await?,
            );
        } else {
            out.bare_ms.push(
                bare_boot(
                    &stack.guest,
                    bare_root,
                    &format!("bare-seq-{i}"),
                    args.timeout,
                )
                .await?,
            );
            out.ignis
                .push(ignis_boot(stack, &name, args.timeout, true).await?);
        }
        println!(
            "  sequential {}/{}: ignis {:.0} ms, bare {:.0} ms",
            i + 1,
            args.count,
            out.ignis.last().map_or(0.0, |b| b.ready_ms),
            out.bare_ms.last().copied().unwrap_or(0.0)
        );
    }
    Ok(out)
}

async fn concurrent(
    stack: &Stack,
    args: &BootArgs,
    bare_root: &Path,
) -> Result<ModeResult, BenchError> {
    let ignis = join_all((0..args.count).map(|i| {
        let name = format!("par-{i}");
        async move { ignis_boot(stack, &name, args.timeout, false).await }
    }));
    let bare = join_all((0..args.count).map(|i| {
        let id = format!("bare-par-{i}");
        async move { bare_boot(&stack.guest, bare_root, &id, args.timeout).await }
    }));
    let (ignis, bare) = tokio::join!(ignis, bare);
    let out = ModeResult {
        ignis: ignis.into_iter().collect::<Result<_, _>>()?,
        bare_ms: bare.into_iter().collect::<Result<_, _>>()?,
    };
    // Let the deletes finish before anything else is measured.
    for i in 0..args.count {
        let name = format!("par-{i}");
        stack
            .wait_for(&name, "deleted", Duration::from_secs(120), |p| {
                p.gone.is_some()
            })
            .await?;
    }
    Ok(out)
}

/// The rows of one mode.
pub(crate) fn mode_rows(mode: &str, r: &ModeResult) -> (Vec<Row>, serde_json::Value) {
    let ready: Vec<f64> = r.ignis.iter().map(|b| b.ready_ms).collect();
    let scheduled: Vec<f64> = r.ignis.iter().map(|b| b.scheduled_ms).collect();
    let ig = summarize(&ready);
    let sc = summarize(&scheduled);
    let bare = summarize(&r.bare_ms);
    let none = Target::None;
    let mut rows = vec![
        Row::new(format!("{mode}: apply → Scheduled p50"), sc.p50, "ms", none),
        Row::new(format!("{mode}: apply → Scheduled p99"), sc.p99, "ms", none),
    ];
    for (label, s) in [("apply → Ready", &ig), ("bare QEMU → marker", &bare)] {
        for (q, v) in [
            ("p50", s.p50),
            ("p90", s.p90),
            ("p99", s.p99),
            ("max", s.max),
        ] {
            rows.push(Row::new(format!("{mode}: {label} {q}"), v, "ms", none));
        }
    }
    rows.push(
        Row::new(
            format!("{mode}: overhead p50"),
            ig.p50 - bare.p50,
            "ms",
            Target::AtMost(100.0),
        )
        .note("Ignis p50 − bare p50"),
    );
    rows.push(
        Row::new(
            format!("{mode}: overhead p99"),
            ig.p99 - bare.p99,
            "ms",
            Target::AtMost(300.0),
        )
        .note("Ignis p99 − bare p99"),
    );
    let ratio = if bare.p50 > 0.0 {
        ig.p50 / bare.p50
    } else {
        0.0
    };
    rows.push(Row::new(format!("{mode}: ratio p50"), ratio, "×", none).note("Ignis / bare"));
    let data = serde_json::json!({
        "ignis_ready": summary_json(&ig),
        "ignis_scheduled": summary_json(&sc),
        "bare": summary_json(&bare),
        "ignis_ready_ms": ready,
        "ignis_scheduled_ms": scheduled,
        "bare_ms": r.bare_ms,
        "boots": r.ignis,
    });
    (rows, data)
}

fn summary_json(s: &Summary) -> serde_json::Value {
    serde_json::to_value(s).unwrap_or_default()
}

/// The write rows over every Ignis boot.
pub(crate) fn write_rows(boots: &[&IgnisBoot]) -> Vec<Row> {
    let controller: Vec<f64> = boots.iter().map(|b| b.controller_writes as f64).collect();
    let user: Vec<f64> = boots.iter().map(|b| b.user_writes as f64).collect();
    let c = summarize(&controller);
    let u = summarize(&user);
    vec![
        Row::new(
            "writes create → Ready, controller, max per VM",
            c.max,
            "writes",
            Target::AtMost(3.0),
        )
        .note("object + status; the user's create not counted"),
        Row::new(
            "writes create → Ready, controller, mean per VM",
            c.mean,
            "writes",
            Target::AtMost(3.0),
        ),
        Row::new(
            "writes create → Ready, user, per VM",
            u.max,
            "writes",
            Target::None,
        )
        .note("the one create"),
        Row::new(
            "writes create → Ready, total max per VM",
            c.max + u.max,
            "writes",
            Target::None,
        )
        .note("user + controller"),
    ]
}

pub(crate) async fn run(
    args: &BootArgs,
    machine: &Machine,
    results: &Path,
) -> Result<(), BenchError> {
    println!(
        "boot: {} MicroVMs sequential, then {} concurrent, each beside a bare QEMU boot",
        args.count, args.count
    );
    let stack = Stack::start(&StackOptions {
        simulated: false,
        boot_timeout: args.timeout,
    })
    .await?;
    let bare_root = scratch_dir("bare")?;
    let outcome = async {
        let seq = sequential(&stack, args, &bare_root).await?;
        println!(
            "  concurrent: {} Ignis + {} bare boots at once",
            args.count, args.count
        );
        let par = concurrent(&stack, args, &bare_root).await?;
        let accel = stack.progress("seq-0").accelerator.unwrap_or_default();
        Ok::<_, BenchError>((seq, par, accel))
    }
    .await;
    stack.stop(outcome.is_err()).await;
    let _ = std::fs::remove_dir_all(&bare_root);
    let (seq, par, accel) = outcome?;

    let mut report = Report::new("boot", machine.clone());
    let (seq_rows, seq_data) = mode_rows("sequential", &seq);
    let (par_rows, par_data) = mode_rows(&format!("concurrent ×{}", args.count), &par);
    report.rows.extend(seq_rows);
    report.rows.extend(par_rows);
    let boots: Vec<&IgnisBoot> = seq.ignis.iter().chain(&par.ignis).collect();
    report.rows.extend(write_rows(&boots));
    report.notes.push(format!(
        "{} MicroVMs per mode, guest: the demo kernel + busybox initramfs, marker {DEMO_MARKER:?}, \
         accelerator {accel} on both sides; bare = the agent's own QEMU argv without -S, timed \
         spawn → marker on the console file",
        args.count
    ));
    report.notes.push(
        "apply = POST create (kube-rs, as kubectl create / client-side apply of a new object); \
         Scheduled/Ready = first watch event showing the condition True; agent and controller \
         run as separate processes, the API server in the bench process"
            .into(),
    );
    report.notes.push(
        "writes: the dev API server's per-object counter (object + status, Events excluded), \
         snapshot when Ready is seen; `create` is the user's, every other verb the controller's"
            .into(),
    );
    report.data =
        serde_json::json!({ "sequential": seq_data, "concurrent": par_data, "count": args.count });
    report.publish(results)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_argv_is_the_backend_argv_without_pause() {
        let guest = DemoGuest {
            kernel: "/g/vmlinuz".into(),
            initrd: "/g/initrd.cpio".into(),
            kernel_version: "6".into(),
        };
        let config = bare_config(&guest, Path::new("/tmp/x"), "b1").expect("config");
        let full = qemu_args(&config, Some(2_000_000), None);
        let bare = bare_argv(&config, Some(2_000_000));
        assert!(full.iter().any(|a| a == "-S"));
        assert!(!bare.iter().any(|a| a == "-S"));
        assert_eq!(full.len(), bare.len() + 1);
        assert!(
            bare.iter()
                .any(|a| a.to_string_lossy().contains("tsc_early_khz=2000000"))
        );
        assert_eq!(config.memory_mib, 256);
    }

    #[test]
    fn overhead_is_the_difference_of_quantiles() {
        let boot = |ms: f64| IgnisBoot {
            name: "x".into(),
            scheduled_ms: 5.0,
            ready_ms: ms,
            user_writes: 1,
            controller_writes: 3,
            by_verb: Default::default(),
        };
        let r = ModeResult {
            ignis: vec![boot(1100.0), boot(1200.0)],
            bare_ms: vec![1000.0, 1050.0],
        };
        let (rows, _) = mode_rows("seq", &r);
        let p50 = rows
            .iter()
            .find(|r| r.metric == "seq: overhead p50")
            .expect("row");
        assert_eq!(p50.value, 100.0);
        assert_eq!(p50.verdict, super::super::stats::Verdict::Meets);
        let p99 = rows
            .iter()
            .find(|r| r.metric == "seq: overhead p99")
            .expect("row");
        assert_eq!(p99.value, 150.0);
        let w = write_rows(&r.ignis.iter().collect::<Vec<_>>());
        assert_eq!(w[0].value, 3.0);
        assert_eq!(w[3].value, 4.0);
    }
}
