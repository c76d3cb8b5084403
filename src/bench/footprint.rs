//! `ignis bench footprint`: what Ignis costs a node when it does nothing, and per VM. Each part
//! is spawned from this binary (`ignis agent`, `ignis controller`, `ignis dev`), timed from
//! spawn to its first `/readyz` 200, and its RSS read from `/proc` once it is idle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::machine::Machine;
use super::stack::{
    NODE, Stack, StackOptions, controller_args, free_addr, rss_of, scratch_dir, self_exe,
    spawn_ignis, start_ignis, terminate, wait_readyz,
};
use super::stats::{MIB, Target, summarize};
use super::{BenchError, Report, Row};
use crate::dev::apiserver;

/// Flags of `ignis bench footprint`.
#[derive(Debug, Default, clap::Args)]
pub(crate) struct FootprintArgs {
    /// Skip the musl release build (measure this binary stripped) and use fewer runs and VMs.
    #[arg(long)]
    pub(crate) quick: bool,
}

const MUSL: &str = "x86_64-unknown-linux-musl";
const IDLE: Duration = Duration::from_secs(2);

/// The binary whose size is reported, and what it is.
async fn binary_to_measure(quick: bool) -> (PathBuf, String) {
    let me = self_exe().unwrap_or_default();
    let is_musl_release = me.to_string_lossy().contains(&format!("{MUSL}/release"));
    if quick || is_musl_release {
        let what = if is_musl_release {
            "this binary (musl release build)"
        } else {
            "this binary (--quick: no musl build)"
        };
        return (me, what.into());
    }
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    println!("  building the static binary: cargo build --release --target {MUSL}");
    let mut cmd = tokio::process::Command::new("cargo");
    cmd.args(["build", "--release", "--target", MUSL])
        .current_dir(source)
        .kill_on_drop(true);
    // ring and SQLite compile C; the musl target needs musl's compiler driver.
    if Path::new("/usr/bin/musl-gcc").exists() {
        cmd.env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    }
    match tokio::time::timeout(Duration::from_secs(3600), cmd.status()).await {
        Ok(Ok(s)) if s.success() => (
            source
                .join("target")
                .join(MUSL)
                .join("release")
                .join("ignis"),
            format!("musl release build ({MUSL})"),
        ),
        other => {
            println!("  the musl build failed ({other:?}); measuring this binary instead");
            (me, "this binary (the musl build failed)".into())
        }
    }
}

/// Size of a stripped copy of `binary`.
async fn stripped_size(binary: &Path) -> Result<u64, BenchError> {
    let dir = scratch_dir("strip")?;
    let copy = dir.join("ignis");
    let io = |what: String| move |source| BenchError::Io { what, source };
    std::fs::copy(binary, &copy).map_err(io(format!("copy {}", binary.display())))?;
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("strip").arg(&copy).status(),
    )
    .await
    .map_err(|_| BenchError::Failed("strip timed out".into()))?
    .map_err(io("run strip".into()))?;
    if !status.success() {
        return Err(BenchError::Failed(format!("strip failed: {status}")));
    }
    let size = std::fs::metadata(&copy)
        .map_err(io("stat the stripped binary".into()))?
        .len();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(size)
}

/// Start → /readyz of the agent `runs` times, then its idle RSS (from the last run).
async fn agent_start(dir: &Path, runs: usize) -> Result<(Vec<f64>, u64), BenchError> {
    let mut times = Vec::new();
    let mut rss = 0;
    for i in 0..runs {
        let state = dir.join(format!("agent-{i}"));
        let health = free_addr()?;
        let args: Vec<String> = vec![
            "agent".into(),
            "--node-name".into(),
            NODE.into(),
            "--state-dir".into(),
            state.display().to_string(),
            "--listen".into(),
            format!("unix://{}", state.join("agent.sock").display()),
            "--health-addr".into(),
            health.to_string(),
            "--accelerator".into(),
            "tcg".into(),
            // No KVM here: emulation, allowed explicitly (it is no security boundary).
            "--allow-tcg".into(),
        ];
        std::fs::create_dir_all(&state).map_err(|source| BenchError::Io {
            what: format!("create {}", state.display()),
            source,
        })?;
        let (mut child, took) = start_ignis(
            &args,
            &[],
            &dir.join(format!("agent-{i}.log")),
            health,
            "agent",
            Duration::from_secs(30),
        )
        .await?;
        if took.is_ok() && i + 1 == runs {
            tokio::time::sleep(IDLE).await;
            rss = child.id().and_then(rss_of).unwrap_or(0);
        }
        terminate(&mut child, Duration::from_secs(10)).await;
        times.push(took?.as_secs_f64() * 1000.0);
    }
    Ok((times, rss))
}

/// Start → /readyz of the controller against an in-process API server and a running agent.
async fn controller_start(dir: &Path, runs: usize) -> Result<(Vec<f64>, u64), BenchError> {
    let stop_api = tokio_util::sync::CancellationToken::new();
    let mut config = crate::dev::api_server_config(dir.join("apiserver"))
        .map_err(|e| BenchError::Failed(format!("the MicroVM resource: {e}")))?;
    config.node_name = NODE.into();
    let api = apiserver::start(config, stop_api.clone())
        .await
        .map_err(BenchError::ApiServer)?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)
        .map_err(|source| BenchError::Io {
            what: "write the kubeconfig".into(),
            source,
        })?;
    // A real agent for it to connect to.
    let agent_state = dir.join("ctl-agent");
    let agent_health = free_addr()?;
    let socket = agent_state.join("agent.sock");
    let agent_args: Vec<String> = vec![
        "agent".into(),
        "--node-name".into(),
        NODE.into(),
        "--state-dir".into(),
        agent_state.display().to_string(),
        "--listen".into(),
        format!("unix://{}", socket.display()),
        "--health-addr".into(),
        agent_health.to_string(),
        "--accelerator".into(),
        "tcg".into(),
        "--allow-tcg".into(),
    ];
    let started = Instant::now();
    let mut agent = spawn_ignis(&agent_args, &[], &dir.join("ctl-agent.log"))?;
    let outcome = async {
        wait_readyz(
            agent_health,
            &mut agent,
            started,
            "agent",
            Duration::from_secs(30),
        )
        .await?;
        let mut times = Vec::new();
        let mut rss = 0;
        for i in 0..runs {
            let health = free_addr()?;
            let (mut child, took) = start_ignis(
                &controller_args(&socket, health),
                &[("KUBECONFIG", kubeconfig.as_os_str())],
                &dir.join(format!("controller-{i}.log")),
                health,
                "controller",
                Duration::from_secs(30),
            )
            .await?;
            if took.is_ok() && i + 1 == runs {
                tokio::time::sleep(IDLE).await;
                rss = child.id().and_then(rss_of).unwrap_or(0);
            }
            terminate(&mut child, Duration::from_secs(10)).await;
            times.push(took?.as_secs_f64() * 1000.0);
        }
        Ok::<_, BenchError>((times, rss))
    }
    .await;
    terminate(&mut agent, Duration::from_secs(10)).await;
    stop_api.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), api.stopped()).await;
    outcome
}

/// Start → /readyz and idle RSS of `ignis dev` (it builds the demo guest first).
async fn dev_start(dir: &Path) -> Result<(f64, u64), BenchError> {
    let health = free_addr()?;
    let data = dir.join("dev");
    let args: Vec<String> = vec![
        "dev".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--api-port".into(),
        "0".into(),
        "--health-addr".into(),
        health.to_string(),
        "--accelerator".into(),
        "tcg".into(),
    ];
    let (mut child, took) = start_ignis(
        &args,
        &[],
        &dir.join("dev.log"),
        health,
        "ignis dev",
        Duration::from_secs(120),
    )
    .await?;
    let mut rss = 0;
    if took.is_ok() {
        tokio::time::sleep(IDLE).await;
        rss = child.id().and_then(rss_of).unwrap_or(0);
    }
    terminate(&mut child, Duration::from_secs(30)).await;
    Ok((took?.as_secs_f64() * 1000.0, rss))
}

/// Agent RSS with `steps` running VMs (cumulative), against its own idle RSS in that stack.
async fn agent_per_vm(steps: &[usize]) -> Result<(u64, Vec<(usize, u64)>), BenchError> {
    let stack = Stack::start(&StackOptions {
        simulated: false,
        boot_timeout: Duration::from_secs(300),
    })
    .await?;
    let outcome = async {
        tokio::time::sleep(IDLE).await;
        let idle = rss_of(stack.agent_pid()).unwrap_or(0);
        let mut made = 0;
        let mut out = Vec::new();
        for &k in steps {
            while made < k {
                stack.create(&format!("fp-{made}")).await?;
                made += 1;
            }
            for i in 0..k {
                stack
                    .wait_for(&format!("fp-{i}"), "Ready", Duration::from_secs(300), |p| {
                        p.ready.is_some()
                    })
                    .await?;
            }
            tokio::time::sleep(IDLE).await;
            let rss = rss_of(stack.agent_pid()).unwrap_or(0);
            println!(
                "  agent RSS with {k} running VMs: {:.2} MiB",
                rss as f64 / MIB
            );
            out.push((k, rss));
        }
        Ok::<_, BenchError>((idle, out))
    }
    .await;
    stack.stop(outcome.is_err()).await;
    outcome
}

/// Per-VM extra: (RSS with k VMs − idle) / k, in KiB.
pub(crate) fn per_vm_kib(idle: u64, with: u64, k: usize) -> f64 {
    if k == 0 {
        return 0.0;
    }
    (with as f64 - idle as f64) / 1024.0 / k as f64
}

pub(crate) async fn run(
    args: &FootprintArgs,
    machine: &Machine,
    results: &Path,
) -> Result<(), BenchError> {
    let runs = if args.quick { 2 } else { 5 };
    let steps: &[usize] = if args.quick { &[1, 2] } else { &[1, 5, 10] };
    let dir = scratch_dir("footprint")?;
    let outcome = async {
        let (binary, what) = binary_to_measure(args.quick).await;
        let size = stripped_size(&binary).await?;
        println!(
            "  stripped size of {}: {:.1} MiB",
            binary.display(),
            size as f64 / MIB
        );
        let (agent_times, agent_rss) = agent_start(&dir, runs).await?;
        let (ctl_times, ctl_rss) = controller_start(&dir, runs).await?;
        let (dev_ms, dev_rss) = dev_start(&dir).await?;
        let (vm_idle, per_vm) = agent_per_vm(steps).await?;
        Ok::<_, BenchError>((
            binary,
            what,
            size,
            agent_times,
            agent_rss,
            ctl_times,
            ctl_rss,
            dev_ms,
            dev_rss,
            vm_idle,
            per_vm,
        ))
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let (
        binary,
        what,
        size,
        agent_times,
        agent_rss,
        ctl_times,
        ctl_rss,
        dev_ms,
        dev_rss,
        vm_idle,
        per_vm,
    ) = outcome?;

    let mut report = Report::new("footprint", machine.clone());
    report.rows.push(
        Row::new(
            "binary size, stripped",
            size as f64 / MIB,
            "MiB",
            Target::AtMost(20.0),
        )
        .note(format!("{what}: {}", binary.display())),
    );
    let a = summarize(&agent_times);
    let c = summarize(&ctl_times);
    report.rows.push(
        Row::new(
            "agent start → /readyz, median",
            a.p50,
            "ms",
            Target::AtMost(50.0),
        )
        .note(format!("{runs} runs, max {:.0} ms", a.max)),
    );
    report.rows.push(
        Row::new(
            "controller start → /readyz, median",
            c.p50,
            "ms",
            Target::AtMost(50.0),
        )
        .note(format!("{runs} runs, max {:.0} ms", c.max)),
    );
    report.rows.push(
        Row::new("ignis dev start → /readyz", dev_ms, "ms", Target::None)
            .note("includes building the demo guest"),
    );
    report.rows.push(Row::new(
        "controller RSS idle",
        ctl_rss as f64 / MIB,
        "MiB",
        Target::AtMost(15.0),
    ));
    report.rows.push(Row::new(
        "agent RSS idle",
        agent_rss as f64 / MIB,
        "MiB",
        Target::AtMost(10.0),
    ));
    report.rows.push(
        Row::new(
            "ignis dev RSS idle",
            dev_rss as f64 / MIB,
            "MiB",
            Target::None,
        )
        .note("API server + controller + agent in one process"),
    );
    report.rows.push(Row::new(
        "agent RSS idle in the VM stack",
        vm_idle as f64 / MIB,
        "MiB",
        Target::None,
    ));
    for (k, rss) in &per_vm {
        report.rows.push(
            Row::new(
                format!("agent extra RSS per running VM, {k} VMs"),
                per_vm_kib(vm_idle, *rss, *k),
                "KiB",
                Target::AtMost(512.0),
            )
            .note(format!("agent {:.2} MiB; QEMU excluded", *rss as f64 / MIB)),
        );
    }
    report.notes.push(
        "agent runs with --accelerator tcg (no KVM probe); the controller runs with leader \
         election off against an in-process dev API server and a running agent; RSS is VmRSS \
         read 2 s after /readyz"
            .into(),
    );
    report.data = serde_json::json!({
        "binary": binary.display().to_string(),
        "binary_stripped_bytes": size,
        "agent_start_ms": agent_times,
        "controller_start_ms": ctl_times,
        "dev_start_ms": dev_ms,
        "agent_rss_idle": agent_rss,
        "controller_rss_idle": ctl_rss,
        "dev_rss_idle": dev_rss,
        "agent_rss_vm_stack_idle": vm_idle,
        "agent_rss_with_vms": per_vm,
    });
    report.publish(results)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_vm_is_the_increase_over_count() {
        assert_eq!(per_vm_kib(10 << 20, (10 << 20) + 5 * 256 * 1024, 5), 256.0);
        assert_eq!(per_vm_kib(10 << 20, 9 << 20, 1), -1024.0);
        assert_eq!(per_vm_kib(1, 2, 0), 0.0);
    }
}
