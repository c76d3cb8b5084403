//! The `ignis` command line: one binary, one subcommand per part.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ignis::telemetry::{self, LogFormat};

/// Ignis runs microVM workloads on Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "ignis", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "IGNIS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    /// Default log level (RUST_LOG overrides it).
    #[arg(long, global = true, env = "IGNIS_LOG_LEVEL", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

/// Which CRD `ignis crd` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CrdKind {
    Microvm,
    Pool,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
enum Command {
    /// Reconcile MicroVM objects onto node agents (runs in the cluster, leader-elected).
    Controller(ignis::controller::ControllerArgs),
    /// Boot and supervise microVMs on this node (one per node).
    Agent(ignis::agent::AgentArgs),
    /// Run everything on this machine: an embedded API server, the controller and an agent.
    Dev(ignis::dev::DevArgs),
    /// Before an uninstall (the Helm chart's pre-delete hook): delete every MicroVM and wait.
    Uninstall(ignis::controller::uninstall::UninstallArgs),
    /// Print a CustomResourceDefinition as YAML: the MicroVM's, or `pool` for MicroVMPool's.
    Crd {
        #[arg(value_enum, default_value_t = CrdKind::Microvm)]
        kind: CrdKind,
    },
    /// Measure Ignis: boot latency, control-plane throughput, footprint, churn.
    Bench(ignis::bench::BenchArgs),
    /// Print the version.
    Version,
    /// A VM pod's container: print the guest's serial console (for `kubectl logs`).
    VmPod(ignis::vm_pod::VmPodArgs),
    /// Run a VMM confined (cgroups, network namespace, unprivileged uid/gid, no_new_privs);
    /// started by the agent, not by hand.
    #[command(hide = true)]
    Jailer(ignis::agent::vmm::jailer::JailerArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Jailer(args) => return ignis::agent::vmm::jailer::run(args),
        Command::Version => {
            println!("ignis {}", ignis::VERSION);
            return ExitCode::SUCCESS;
        }
        Command::Crd { kind } => {
            let yaml = match kind {
                CrdKind::Microvm => ignis::api::crd_yaml(),
                CrdKind::Pool => ignis::api::pool_crd_yaml(),
            };
            return match yaml {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    telemetry::init_tracing(cli.log_format, &cli.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "exiting");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    let shutdown = telemetry::shutdown_signal()?;
    match command {
        Command::Controller(args) => ignis::controller::run(args, shutdown).await?,
        Command::Agent(args) => ignis::agent::run(args, shutdown).await?,
        Command::Dev(args) => ignis::dev::run(args, shutdown).await?,
        Command::Bench(args) => ignis::bench::run(args, shutdown).await?,
        Command::Uninstall(args) => ignis::controller::uninstall::run(args, shutdown).await?,
        Command::VmPod(args) => ignis::vm_pod::run(args, shutdown).await?,
        Command::Crd { .. } | Command::Version | Command::Jailer(_) => {}
    }
    Ok(())
}
