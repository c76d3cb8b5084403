//! `ignis bench confinement`: what the confined spawn costs. The demo guest is booted through
//! the QEMU backend, create → console marker, alternately confined (through `ignis jailer`:
//! unprivileged uid, no_new_privs, files as descriptors, `-sandbox on`) and unconfined (the
//! agent's own child, as root, files by path, no seccomp), so load affects both alike.

use std::path::Path;
use std::time::{Duration, Instant};

use super::machine::Machine;
use super::stack::scratch_dir;
use super::stats::{Target, summarize};
use super::{BenchError, Report, Row};
use crate::agent::confine::DEFAULT_FIRST_ID;
use crate::agent::guest::{DEFAULT_CMDLINE, DEMO_MARKER, DemoGuest, build_demo_guest};
use crate::agent::vmm::process::Confinement;
use crate::agent::vmm::qemu::{DEFAULT_BINARY, QemuBackend};
use crate::agent::vmm::{VmConfig, VmmBackend};
use crate::api::Accelerator;

/// Flags of `ignis bench confinement`.
#[derive(Debug, clap::Args)]
pub(crate) struct ConfinementArgs {
    /// Boots per side (confined and unconfined, alternating).
    #[arg(long, default_value_t = 10)]
    pub(crate) count: usize,
    /// Deadline of one boot.
    #[arg(long, default_value = "120s", value_parser = crate::time::parse_duration)]
    pub(crate) timeout: Duration,
}

fn config(guest: &DemoGuest, dir: &Path, id: &str, confined: bool) -> VmConfig {
    let state = dir.join(id);
    VmConfig {
        id: id.into(),
        vcpus: 1,
        memory_mib: 128,
        kernel: guest.kernel.clone(),
        cmdline: DEFAULT_CMDLINE.into(),
        initrd: Some(guest.initrd.clone()),
        disks: Vec::new(),
        nets: Vec::new(),
        user_data: None,
        accelerator: Accelerator::Tcg,
        console_log: state.join("console.log"),
        api_socket: state.join("api.sock"),
        state_dir: state,
        binary: Default::default(),
        // Far above the agent's own range start, so a running agent's VMs are not disturbed.
        confinement: confined.then_some(Confinement {
            uid: DEFAULT_FIRST_ID + 60_000,
            gid: DEFAULT_FIRST_ID + 60_000,
            netns: None,
            cgroups: Vec::new(),
        }),
        restore: None,
        opened: Default::default(),
    }
}

/// Milliseconds from create to the marker on the console.
async fn boot(
    backend: &QemuBackend,
    config: &VmConfig,
    timeout: Duration,
) -> Result<f64, BenchError> {
    let io = |what: String| move |source| BenchError::Io { what, source };
    std::fs::create_dir_all(&config.state_dir)
        .map_err(io(format!("create {}", config.state_dir.display())))?;
    let started = Instant::now();
    let mut spawned = backend.create(config).await.map_err(|e| {
        BenchError::Failed(format!("create {}: {}", config.id, crate::error::chain(&e)))
    })?;
    let outcome = async {
        backend
            .start(&spawned.handle)
            .await
            .map_err(|e| BenchError::Failed(format!("start {}: {e}", config.id)))?;
        loop {
            let console = std::fs::read(&config.console_log).unwrap_or_default();
            if console
                .windows(DEMO_MARKER.len())
                .any(|w| w == DEMO_MARKER.as_bytes())
            {
                return Ok(started.elapsed().as_secs_f64() * 1000.0);
            }
            if started.elapsed() > timeout {
                return Err(BenchError::Timeout {
                    what: format!("boot {}", config.id),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    .await;
    let _ = backend.kill(&spawned.handle).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), spawned.child.wait()).await;
    let _ = std::fs::remove_dir_all(&config.state_dir);
    outcome
}

pub(crate) async fn run(
    args: &ConfinementArgs,
    machine: &Machine,
    results: &Path,
) -> Result<(), BenchError> {
    println!(
        "confinement: {} boots confined and {} unconfined, alternating",
        args.count, args.count
    );
    let dir = scratch_dir("conf")?;
    let guest = build_demo_guest(&dir.join("guest"))
        .map_err(|e| BenchError::Failed(format!("demo guest: {e}")))?;
    let backend =
        QemuBackend::new(DEFAULT_BINARY).map_err(|e| BenchError::Failed(format!("QEMU: {e}")))?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..args.count {
        // Who goes first flips each round.
        for confined in [i % 2 == 0, i % 2 != 0] {
            let id = format!("{}-{i}", if confined { "on" } else { "off" });
            let ms = boot(&backend, &config(&guest, &dir, &id, confined), args.timeout).await?;
            if confined { on.push(ms) } else { off.push(ms) }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (on, off) = (summarize(&on), summarize(&off));
    let mut report = Report::new("confinement", machine.clone());
    report.rows.push(Row::new(
        "confined create→marker p50",
        on.p50,
        "ms",
        Target::None,
    ));
    report.rows.push(Row::new(
        "unconfined create→marker p50",
        off.p50,
        "ms",
        Target::None,
    ));
    report.rows.push(
        Row::new("confinement cost p50", on.p50 - off.p50, "ms", Target::None).note(format!(
            "n={} each; mean {:.1} vs {:.1} ms",
            on.n, on.mean, off.mean
        )),
    );
    report.publish(results)?;
    Ok(())
}
