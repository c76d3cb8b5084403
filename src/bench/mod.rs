//! `ignis bench`: measure Ignis against the targets of docs/design.md section 6, side by side with
//! the floor (the bare VMM boot) in the same run. Each bench prints a table, every figure
//! beside its target, and writes `<results-dir>/<bench>.json` with the machine it ran on. The
//! binary measures itself: a debug build says so and its numbers are not representative.

pub(crate) mod boot;
pub(crate) mod churn;
pub(crate) mod cluster;
pub(crate) mod confinement;
pub(crate) mod control_plane;
pub(crate) mod footprint;
pub(crate) mod machine;
pub(crate) mod pool;
pub(crate) mod pool_figures;
pub(crate) mod soak;
pub(crate) mod soak_sample;
pub(crate) mod stack;
pub(crate) mod stats;
pub(crate) mod suspend;
pub(crate) mod writes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use self::machine::Machine;
use self::stats::{Target, Verdict, trim};

/// Flags of `ignis bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Where the JSON results go (one file per bench, overwritten).
    #[arg(long, global = true, default_value = "results")]
    pub(crate) results_dir: PathBuf,
    #[command(subcommand)]
    pub(crate) command: BenchCommand,
}

/// The benches.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum BenchCommand {
    /// apply → Scheduled → Ready through the dev stack, beside the bare VMM boot.
    Boot(boot::BootArgs),
    /// MicroVMs/s to Scheduled and RSS with the simulated VMM.
    ControlPlane(control_plane::ControlPlaneArgs),
    /// Binary size, start → /readyz, idle RSS, agent RSS per VM.
    Footprint(footprint::FootprintArgs),
    /// Create/delete cycles and a leak check that fails the bench.
    Churn(churn::ChurnArgs),
    /// A mixed failure workload (crash loops, boot timeouts, VMM kills, spec changes, agent
    /// restarts), bounded by time and cycles; fails when a resource does not come back.
    Soak(soak::SoakArgs),
    /// The confined VMM's boot beside an unconfined one (QEMU, create → console marker).
    Confinement(confinement::ConfinementArgs),
    /// apply → Ready on a cluster with VM pods, step by step, beside the bare VMM boot.
    Cluster(cluster::ClusterArgs),
    /// Cold boot, suspend and resume of the same MicroVM, and its snapshot's size.
    Suspend(suspend::SuspendArgs),
    /// Warm pools: claim → Ready, claims/s, a warm VM's cost and a refill, beside a cold boot
    /// (`--cluster`: on a cluster with VM pods).
    Pool(pool::PoolArgs),
    /// Every bench with its defaults (not `cluster`, which needs a cluster).
    All,
}

/// Errors of `ignis bench`.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum BenchError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the embedded API server did not start")]
    ApiServer(#[source] crate::dev::apiserver::ApiServerError),
    #[error("API request failed")]
    #[strum(serialize = "Api")]
    Kube(#[source] kube::Error),
    #[error("cannot prepare the demo guest")]
    Guest(#[source] crate::agent::guest::GuestError),
    #[error("{what} did not happen within {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{0}")]
    Failed(String),
    #[error("leak check failed: {0}")]
    Leak(String),
    #[error("cannot encode the results")]
    Json(#[source] serde_json::Error),
    #[error("interrupted")]
    Interrupted,
}

/// One line of a result table.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    pub(crate) metric: String,
    pub(crate) value: f64,
    pub(crate) unit: String,
    pub(crate) target: Target,
    pub(crate) verdict: Verdict,
    /// What exactly was measured, when the metric name alone does not say.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) note: String,
}

impl Row {
    pub(crate) fn new(metric: impl Into<String>, value: f64, unit: &str, target: Target) -> Row {
        Row {
            metric: metric.into(),
            value,
            unit: unit.into(),
            target,
            verdict: target.judge(value),
            note: String::new(),
        }
    }

    pub(crate) fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }
}

/// A bench's results: the table, the machine, and raw data for plots.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) bench: String,
    pub(crate) machine: Machine,
    pub(crate) rows: Vec<Row>,
    pub(crate) notes: Vec<String>,
    pub(crate) data: serde_json::Value,
}

impl Report {
    pub(crate) fn new(bench: &str, machine: Machine) -> Report {
        Report {
            bench: bench.into(),
            machine,
            rows: Vec::new(),
            notes: Vec::new(),
            data: serde_json::Value::Null,
        }
    }

    /// The table as Markdown (pasted as is into docs/benchmarks.md).
    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "### {}\n\n| metric | value | target | |\n| --- | ---: | --- | --- |\n",
            self.bench
        );
        for r in &self.rows {
            let note = if r.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.note)
            };
            out.push_str(&format!(
                "| {}{note} | {} {} | {} | {} |\n",
                r.metric,
                trim(r.value),
                r.unit,
                r.target.describe(&r.unit),
                r.verdict.word()
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("\n- {n}"));
        }
        out.push('\n');
        out
    }

    /// Print the table and write `<dir>/<bench>.json`.
    pub(crate) fn publish(&self, dir: &Path) -> Result<PathBuf, BenchError> {
        println!("\n{}", self.table());
        std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        let path = dir.join(format!("{}.json", self.bench));
        let json = serde_json::to_vec_pretty(self).map_err(BenchError::Json)?;
        std::fs::write(&path, json).map_err(|source| BenchError::Io {
            what: format!("write {}", path.display()),
            source,
        })?;
        println!("results: {}", path.display());
        Ok(path)
    }
}

/// Run the chosen bench; Ctrl-C ends it (children are killed on drop).
pub async fn run(args: BenchArgs, shutdown: CancellationToken) -> Result<(), BenchError> {
    let machine = machine::Machine::detect().await;
    println!("{}", machine.describe());
    if machine.debug_build {
        println!(
            "WARNING: this is a debug build; its numbers are not representative \
             (build with `cargo build --release`)."
        );
    }
    let dir = args.results_dir.clone();
    let work = async {
        match args.command {
            BenchCommand::Boot(a) => boot::run(&a, &machine, &dir).await,
            BenchCommand::Suspend(a) => suspend::run(&a, &machine, &dir).await,
            BenchCommand::Pool(a) => pool::run(&a, &machine, &dir).await,
            BenchCommand::ControlPlane(a) => control_plane::run(&a, &machine, &dir).await,
            BenchCommand::Footprint(a) => footprint::run(&a, &machine, &dir).await,
            BenchCommand::Churn(a) => churn::run(&a, &machine, &dir).await,
            BenchCommand::Soak(a) => soak::run(&a, &machine, &dir).await,
            BenchCommand::Confinement(a) => confinement::run(&a, &machine, &dir).await,
            BenchCommand::Cluster(a) => cluster::run(&a, &machine, &dir).await,
            BenchCommand::All => {
                // Footprint first: its idle figures want a quiet machine. Every bench runs
                // even when one fails; the first failure is the exit status.
                let outcomes = [
                    footprint::run(&footprint::FootprintArgs::default(), &machine, &dir).await,
                    boot::run(&boot::BootArgs::default(), &machine, &dir).await,
                    control_plane::run(&control_plane::ControlPlaneArgs::default(), &machine, &dir)
                        .await,
                    churn::run(&churn::ChurnArgs::default(), &machine, &dir).await,
                    suspend::run(&suspend::SuspendArgs::default(), &machine, &dir).await,
                    pool::run(&pool::PoolArgs::default(), &machine, &dir).await,
                ];
                let mut first = Ok(());
                for outcome in outcomes {
                    if let Err(error) = outcome {
                        eprintln!("bench failed: {error}");
                        if first.is_ok() {
                            first = Err(error);
                        }
                    }
                }
                first
            }
        }
    };
    tokio::select! {
        result = work => result,
        () = shutdown.cancelled() => Err(BenchError::Interrupted),
    }
}
