//! The machine a bench ran on, recorded with every result: numbers without their machine
//! mean nothing.

use serde::Serialize;

/// What the results depend on.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu_model: String,
    pub(crate) cores: usize,
    pub(crate) memory_mib: u64,
    pub(crate) kernel: String,
    pub(crate) qemu: String,
    /// The accelerator the benches use: TCG (KVM hangs guests on the reference host).
    pub(crate) accelerator: String,
    pub(crate) kvm_device: bool,
    pub(crate) load_average: String,
    pub(crate) git_commit: Option<String>,
    pub(crate) ignis_version: String,
    pub(crate) debug_build: bool,
    pub(crate) binary: String,
    pub(crate) timestamp: String,
}

/// The first value of `key` in `/proc/cpuinfo`-style text.
pub(crate) fn cpuinfo_field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `MemTotal` in MiB from `/proc/meminfo` text.
pub(crate) fn mem_total_mib(text: &str) -> Option<u64> {
    let kib: u64 = text
        .lines()
        .find(|l| l.starts_with("MemTotal:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib / 1024)
}

async fn first_line_of(program: &str, args: &[&str]) -> Option<String> {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    out.status.success().then_some(())?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

impl Machine {
    pub(crate) async fn detect() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let source_dir = env!("CARGO_MANIFEST_DIR");
        Machine {
            cpu_model: cpuinfo_field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib: mem_total_mib(&read("/proc/meminfo")).unwrap_or(0),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            qemu: first_line_of(crate::agent::vmm::qemu::DEFAULT_BINARY, &["--version"])
                .await
                .unwrap_or_else(|| "not found".into()),
            accelerator: "tcg".into(),
            kvm_device: std::path::Path::new("/dev/kvm").exists(),
            load_average: read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            git_commit: first_line_of("git", &["-C", source_dir, "rev-parse", "--short", "HEAD"])
                .await,
            ignis_version: crate::VERSION.into(),
            debug_build: cfg!(debug_assertions),
            binary: std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            timestamp: jiff::Timestamp::now()
                .round(jiff::Unit::Second)
                .map_or_else(|_| jiff::Timestamp::now().to_string(), |t| t.to_string()),
        }
    }

    /// One paragraph for the top of the output.
    pub(crate) fn describe(&self) -> String {
        format!(
            "machine: {} × {}, {} MiB, Linux {}, {}, accelerator {} (/dev/kvm {}), load {}\n\
             ignis {} ({} build, commit {}) at {}",
            self.cores,
            self.cpu_model,
            self.memory_mib,
            self.kernel,
            self.qemu,
            self.accelerator,
            if self.kvm_device {
                "present, unused"
            } else {
                "absent"
            },
            self.load_average,
            self.ignis_version,
            if self.debug_build { "debug" } else { "release" },
            self.git_commit.as_deref().unwrap_or("unknown"),
            self.timestamp,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_text_parses() {
        let cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n";
        assert_eq!(
            cpuinfo_field(cpuinfo, "model name").as_deref(),
            Some("AMD EPYC 7B13")
        );
        assert_eq!(cpuinfo_field(cpuinfo, "missing"), None);
        assert_eq!(mem_total_mib("MemTotal:       24684000 kB\n"), Some(24105));
    }
}
