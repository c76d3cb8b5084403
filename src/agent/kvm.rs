//! The bounded KVM probe: does hardware virtualization actually work on this node?
//!
//! `/dev/kvm` existing is not enough (nested hosts can expose it and still hang every guest),
//! so the probe boots a real kernel under `-accel kvm` for a few seconds and looks for any
//! console output. The answer is cached in the agent's state directory keyed by the host's
//! boot id, so an agent restart does not pay for the probe again; a reboot re-probes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::AsyncReadExt;

use crate::api::{Accelerator, AcceleratorChoice};

/// Default bound on the probe boot.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
const DEV_KVM: &str = "/dev/kvm";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// The cache file in the agent's state directory.
pub const CACHE_FILE: &str = "kvm-probe.json";

/// The probe's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmProbe {
    pub accelerator: Accelerator,
    /// For a person: why this accelerator.
    pub detail: String,
}

/// Inputs of a probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub(crate) qemu_binary: PathBuf,
    /// The kernel to boot; any bootable x86_64 kernel works.
    pub(crate) kernel: PathBuf,
    pub timeout: Duration,
    /// The `-cpu` model; `host`, as the QEMU backend uses under KVM.
    pub cpu: String,
    /// Where to cache the answer (the agent's state root); `None` disables the cache.
    pub(crate) cache_dir: Option<PathBuf>,
}

impl ProbeOptions {
    /// The defaults: `-cpu host`, [`PROBE_TIMEOUT`].
    pub fn new(qemu_binary: PathBuf, kernel: PathBuf, cache_dir: Option<PathBuf>) -> Self {
        ProbeOptions {
            qemu_binary,
            kernel,
            timeout: PROBE_TIMEOUT,
            cpu: "host".into(),
            cache_dir,
        }
    }
}

/// Errors of the probe. Only a forced `kvm` can fail; `auto` always falls back to TCG.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum KvmError {
    #[error("--accelerator kvm was requested but KVM is unusable: {detail}")]
    #[strum(serialize = "KvmUnavailable")]
    KvmRequired { detail: String },
}

/// Whether `/dev/kvm` can be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DevKvm {
    Usable,
    Missing,
    NotOpenable(String),
}

/// What the probe boot saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ProbeBoot {
    /// The guest printed to its console after this long.
    Progress(Duration),
    /// Nothing on the console before the deadline.
    NoProgress(Duration),
    /// QEMU could not run under KVM at all.
    VmmFailed(String),
}

/// The cached answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CachedProbe {
    pub(crate) boot_id: String,
    pub(crate) probe: KvmProbe,
}

/// The answer for a forced choice, or `None` when the device must be checked / booted.
pub(crate) fn decide_forced(
    choice: AcceleratorChoice,
    dev: &DevKvm,
) -> Option<Result<KvmProbe, KvmError>> {
    match choice {
        AcceleratorChoice::Tcg => Some(Ok(KvmProbe {
            accelerator: Accelerator::Tcg,
            detail: "TCG forced by --accelerator tcg".into(),
        })),
        AcceleratorChoice::Kvm => Some(match dev {
            DevKvm::Usable => Ok(KvmProbe {
                accelerator: Accelerator::Kvm,
                detail: "KVM forced by --accelerator kvm (not probed)".into(),
            }),
            other => Err(KvmError::KvmRequired {
                detail: device_detail(other),
            }),
        }),
        AcceleratorChoice::Auto => match dev {
            DevKvm::Usable => None,
            other => Some(Ok(KvmProbe {
                accelerator: Accelerator::Tcg,
                detail: device_detail(other),
            })),
        },
    }
}

fn device_detail(dev: &DevKvm) -> String {
    match dev {
        DevKvm::Usable => "/dev/kvm is usable".into(),
        DevKvm::Missing => "/dev/kvm does not exist".into(),
        DevKvm::NotOpenable(e) => format!("/dev/kvm cannot be opened read-write: {e}"),
    }
}

/// The answer from a probe boot.
pub(crate) fn decide_boot(boot: &ProbeBoot) -> KvmProbe {
    match boot {
        ProbeBoot::Progress(after) => KvmProbe {
            accelerator: Accelerator::Kvm,
            detail: format!("a guest booted under KVM (console output after {after:.1?})"),
        },
        ProbeBoot::NoProgress(waited) => KvmProbe {
            accelerator: Accelerator::Tcg,
            detail: format!(
                "KVM present but a guest made no progress in {}s under it",
                waited.as_secs_f32().round()
            ),
        },
        ProbeBoot::VmmFailed(why) => KvmProbe {
            accelerator: Accelerator::Tcg,
            detail: format!("KVM present but QEMU failed under it: {why}"),
        },
    }
}

/// A cached answer is valid only for the boot it was taken in.
pub(crate) fn cached_answer(cache: Option<&CachedProbe>, boot_id: &str) -> Option<KvmProbe> {
    cache
        .filter(|c| !boot_id.is_empty() && c.boot_id == boot_id)
        .map(|c| c.probe.clone())
}

fn check_dev_kvm() -> DevKvm {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_KVM)
    {
        Ok(_) => DevKvm::Usable,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DevKvm::Missing,
        Err(e) => DevKvm::NotOpenable(e.to_string()),
    }
}

/// Decide the accelerator for this node: the override, the cache, or a bounded probe boot.
/// Never takes much longer than `opts.timeout`.
pub async fn probe(choice: AcceleratorChoice, opts: &ProbeOptions) -> Result<KvmProbe, KvmError> {
    let dev = check_dev_kvm();
    if let Some(answer) = decide_forced(choice, &dev) {
        return answer;
    }
    let boot_id = std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cache_path = opts.cache_dir.as_ref().map(|d| d.join(CACHE_FILE));
    if let Some(path) = &cache_path {
        let cached: Option<CachedProbe> = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(answer) = cached_answer(cached.as_ref(), &boot_id) {
            return Ok(answer);
        }
    }
    let answer = decide_boot(&probe_boot(opts).await);
    if let (Some(path), false) = (&cache_path, boot_id.is_empty()) {
        let entry = CachedProbe {
            boot_id,
            probe: answer.clone(),
        };
        // A cache that cannot be written only costs the next start another probe.
        if let Ok(bytes) = serde_json::to_vec_pretty(&entry) {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let tmp = path.with_extension("json.tmp");
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
    Ok(answer)
}

/// Whether console output shows the kernel itself running. The real-mode setup stub prints
/// (e.g. "Probing EDD") before the kernel proper; seen here under KVM with `-cpu qemu64`
/// followed by a hang, so stub output alone does not count.
pub(crate) fn kernel_progress(console: &str) -> bool {
    console.contains("Linux version")
        || console
            .lines()
            .any(|l| l.trim_start().starts_with("[    0."))
}

/// Boot `opts.kernel` under KVM with the console on stdout; kernel output is progress.
/// The probe VM is always killed and reaped.
async fn probe_boot(opts: &ProbeOptions) -> ProbeBoot {
    let started = tokio::time::Instant::now();
    let mut child = match tokio::process::Command::new(&opts.qemu_binary)
        .args([
            "-M",
            "microvm",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .args([
            "-no-reboot",
            "-accel",
            "kvm",
            "-cpu",
            &opts.cpu,
            "-m",
            "128M",
        ])
        .arg("-kernel")
        .arg(&opts.kernel)
        .args(["-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1"])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return ProbeBoot::VmmFailed(format!("cannot run {}: {e}", opts.qemu_binary.display()));
        }
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut seen = Vec::new();
    let kernel_output = async {
        let Some(out) = stdout.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    seen.extend_from_slice(&buf[..n]);
                    if kernel_progress(&String::from_utf8_lossy(&seen)) {
                        return true;
                    }
                }
                _ => return false,
            }
        }
    };
    let outcome = match tokio::time::timeout(opts.timeout, kernel_output).await {
        Ok(true) => ProbeBoot::Progress(started.elapsed()),
        Ok(false) => {
            // stdout closed before the kernel spoke: QEMU ended; say why.
            let mut err = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), e.read_to_string(&mut err))
                        .await;
            }
            // One line: the detail ends up in a status message.
            let err: Vec<&str> = err
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            ProbeBoot::VmmFailed(err.join("; "))
        }
        Err(_) => ProbeBoot::NoProgress(opts.timeout),
    };
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;

    #[test]
    fn forced_choices() {
        let tcg = decide_forced(AcceleratorChoice::Tcg, &DevKvm::Usable)
            .expect("decided")
            .expect("ok");
        assert_eq!(tcg.accelerator, Accelerator::Tcg);
        let kvm = decide_forced(AcceleratorChoice::Kvm, &DevKvm::Usable)
            .expect("decided")
            .expect("ok");
        assert_eq!(kvm.accelerator, Accelerator::Kvm);
        let err = decide_forced(AcceleratorChoice::Kvm, &DevKvm::Missing)
            .expect("decided")
            .expect_err("refused");
        assert_eq!(err.reason(), "KvmUnavailable");
        assert!(err.to_string().contains("/dev/kvm does not exist"));
    }

    #[test]
    fn auto_without_usable_device_is_tcg_without_booting() {
        let p = decide_forced(
            AcceleratorChoice::Auto,
            &DevKvm::NotOpenable("Permission denied".into()),
        )
        .expect("decided")
        .expect("ok");
        assert_eq!(p.accelerator, Accelerator::Tcg);
        assert!(p.detail.contains("Permission denied"));
        assert!(decide_forced(AcceleratorChoice::Auto, &DevKvm::Usable).is_none());
    }

    #[test]
    fn boot_outcomes() {
        assert_eq!(
            decide_boot(&ProbeBoot::Progress(Duration::from_millis(300))).accelerator,
            Accelerator::Kvm
        );
        let hang = decide_boot(&ProbeBoot::NoProgress(Duration::from_secs(3)));
        assert_eq!(hang.accelerator, Accelerator::Tcg);
        assert_eq!(
            hang.detail,
            "KVM present but a guest made no progress in 3s under it"
        );
        let failed = decide_boot(&ProbeBoot::VmmFailed("failed to initialize kvm".into()));
        assert_eq!(failed.accelerator, Accelerator::Tcg);
        assert!(failed.detail.contains("failed to initialize kvm"));
    }

    #[test]
    fn setup_stub_output_is_not_progress() {
        assert!(!kernel_progress("Probing EDD (edd=off to disable)... ok\n"));
        assert!(kernel_progress(
            "[    0.000000] Linux version 6.1.0-56-cloud-amd64\n"
        ));
        assert!(kernel_progress(
            "Linux version 6.1.0 (debian-kernel@lists.debian.org)"
        ));
        assert!(!kernel_progress(""));
    }

    #[test]
    fn cache_is_keyed_by_boot_id() {
        let entry = CachedProbe {
            boot_id: "b1".into(),
            probe: KvmProbe {
                accelerator: Accelerator::Tcg,
                detail: "x".into(),
            },
        };
        assert_eq!(
            cached_answer(Some(&entry), "b1").map(|p| p.accelerator),
            Some(Accelerator::Tcg)
        );
        assert_eq!(cached_answer(Some(&entry), "b2"), None);
        assert_eq!(cached_answer(Some(&entry), ""), None);
        assert_eq!(cached_answer(None, "b1"), None);
    }
}
