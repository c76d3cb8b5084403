//! The confined spawn: where a VMM runs, and `ignis jailer`, the exec wrapper that puts it
//! there. The crate denies `unsafe`, so nothing runs between `fork` and `exec` in the agent;
//! instead the agent starts this small program, which joins the VM's cgroups, enters its
//! network namespace, drops to the VM's own unprivileged uid and gid with no supplementary
//! groups and no capabilities, sets `no_new_privs` and only then execs the VMM. The VMM
//! therefore starts confined: its first page of memory is charged to the right cgroup, and it
//! never holds a privilege it could keep. Inherited file descriptors (the guest files the
//! agent opened for it) pass through the exec untouched.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

mod chroot;
/// Whether a name can be a file at a jail's root.
pub(crate) use chroot::check_name as check_jail_name;
pub use chroot::{Jail, JailFile};

/// Where a VMM runs (Interface 2 of the VM-pod contract): a plain value, honoured by
/// [`super::process::spawn`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// Unprivileged per-VM ids the VMM runs as (never 0).
    pub uid: u32,
    pub gid: u32,
    /// The network namespace to run in (a VM pod's); None = the agent's own.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// cgroup directories to join (one per hierarchy: a VM pod's); empty = the node-level VMM
    /// cgroup the agent uses today.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

/// Exit status of `ignis jailer` when it could not confine or exec (the VMM never ran):
/// 126 as a shell's "found but could not run".
pub const CONFINE_FAILED: u8 = 126;

/// `ignis jailer`: run a VMM confined. Used by the agent only.
#[derive(Debug, Clone, clap::Args)]
pub struct JailerArgs {
    /// Network namespace to enter (a file such as `/proc/<pid>/ns/net` or `/run/netns/<name>`).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// cgroup directory to join (repeatable, one per hierarchy).
    #[arg(long = "cgroup")]
    pub cgroups: Vec<PathBuf>,
    /// User id to run as (not 0).
    #[arg(long)]
    pub uid: u32,
    /// Group id to run as (not 0).
    #[arg(long)]
    pub gid: u32,
    /// A supplementary group to keep (repeatable, not 0): the group of `/dev/kvm`.
    #[arg(long = "group")]
    pub groups: Vec<u32>,
    /// Directory to change into before the exec.
    #[arg(long)]
    pub chdir: Option<PathBuf>,
    /// Jail the VMM (Firecracker's jailer semantics): in new mount and pid namespaces, chroot
    /// into this directory, rebuilt with only the files named below, the VMM binary and
    /// `/dev/kvm` and `/dev/net/tun`.
    #[arg(long)]
    pub chroot: Option<PathBuf>,
    /// `HOST=NAME`: bind the host file read-only at `/NAME` in the jail (repeatable).
    #[arg(long = "bind", value_parser = chroot::parse_pair, requires = "chroot")]
    pub binds: Vec<(PathBuf, String)>,
    /// `HOST=NAME`: bind the host file read-write at `/NAME`, owned by the VM's ids.
    #[arg(long = "bind-rw", value_parser = chroot::parse_pair, requires = "chroot")]
    pub binds_rw: Vec<(PathBuf, String)>,
    /// `HOST=NAME`: make the host path a symlink to `/NAME` in the jail (the API socket).
    #[arg(long = "link", value_parser = chroot::parse_pair, requires = "chroot")]
    pub links: Vec<(PathBuf, String)>,
    /// Stage two of a jail, run by stage one only: the namespaces and root are ready.
    #[arg(long, hide = true, requires = "chroot")]
    pub in_jail: bool,
    /// The VMM: an absolute path, then its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<OsString>,
}

/// The `ignis` binary that carries the `jailer` subcommand: this process's own executable,
/// unless a test (whose executable is a test harness) names the real one.
static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Use `path` as the `ignis` binary that confines VMMs (tests, whose own executable is a test
/// harness, pass `env!("CARGO_BIN_EXE_ignis")`). The first call wins.
pub fn use_binary(path: impl Into<PathBuf>) {
    let _ = BINARY.set(path.into());
}

/// The `ignis` binary to run `jailer` from: the one [`use_binary`] named, else this process's
/// own executable when it is `ignis`, else (a test harness in `target/<profile>/deps/`) the
/// `ignis` cargo builds beside the harnesses. Never the harness itself, which would take
/// `jailer` for a test filter.
pub(crate) fn binary() -> std::io::Result<PathBuf> {
    if let Some(path) = BINARY.get() {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe()?;
    if exe.file_name().is_some_and(|name| name == "ignis") {
        return Ok(exe);
    }
    exe.parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("ignis"))
        .filter(|candidate| candidate.is_file())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} is not the ignis binary, and no ignis binary is beside it to run `ignis jailer`",
                    exe.display()
                ),
            )
        })
}

/// The command line (after the `ignis` binary) that runs `vmm args...` under `confinement`.
pub(crate) fn wrapper_args(
    confinement: &Confinement,
    groups: &[u32],
    chdir: Option<&Path>,
    jail: Option<&Jail>,
    vmm: &Path,
    args: impl IntoIterator<Item = impl AsRef<OsStr>>,
) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec!["jailer".into()];
    if let Some(netns) = &confinement.netns {
        out.extend(["--netns".into(), netns.into()]);
    }
    for cgroup in &confinement.cgroups {
        out.extend(["--cgroup".into(), cgroup.into()]);
    }
    out.extend([
        "--uid".into(),
        confinement.uid.to_string().into(),
        "--gid".into(),
        confinement.gid.to_string().into(),
    ]);
    for group in groups {
        out.extend(["--group".into(), group.to_string().into()]);
    }
    if let Some(dir) = chdir {
        out.extend(["--chdir".into(), dir.into()]);
    }
    if let Some(jail) = jail {
        out.extend(jail.args());
    }
    out.push("--".into());
    out.push(vmm.into());
    out.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
    out
}

/// The supplementary groups every VMM keeps: the group of `/dev/kvm` (so a KVM guest can
/// run), unless that is root's group.
pub(crate) fn device_groups() -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/dev/kvm")
        .map(|m| m.gid())
        .into_iter()
        .filter(|&gid| gid != 0)
        .collect()
}

/// The environment the VMM starts with: none of the agent's (which may name credentials),
/// only a fixed `PATH`.
const VMM_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Run `ignis jailer`: confine this process, then exec the VMM. Returns only on failure,
/// after saying on stderr (the VMM's log) which step failed.
pub fn run(args: JailerArgs) -> ExitCode {
    let result = if args.chroot.is_some() && !args.in_jail {
        build_jail_and_wait(&args)
    } else {
        confine_and_exec(&args).map(|never| match never {})
    };
    let error = match result {
        Ok(code) => return code,
        Err(error) => error,
    };
    eprintln!("ignis jailer: {error}");
    ExitCode::from(CONFINE_FAILED)
}

/// Why `ignis jailer` could not start the VMM.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
enum JailError {
    #[error("no VMM to run")]
    #[strum(serialize = "NoCommand")]
    NoCommand,
    #[error("refusing to run a VMM as uid {uid} / gid {gid}: 0 is root")]
    #[strum(serialize = "RootIds")]
    Root { uid: u32, gid: u32 },
    #[error("the VMM must be named by an absolute path, not {0:?}")]
    #[strum(serialize = "RelativeBinary")]
    RelativeBinary(PathBuf),
    #[error("an argument holds a NUL byte")]
    #[strum(serialize = "NulInArgument")]
    Nul,
    #[error("cannot join cgroup {dir}: {source}")]
    #[strum(serialize = "CgroupJoinFailed")]
    Cgroup {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path}: {source}")]
    #[strum(serialize = "NetnsEnterFailed")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot change into {dir}: {source}")]
    #[strum(serialize = "ChdirFailed")]
    Chdir { dir: PathBuf, source: nix::Error },
    #[error("cannot {step}: {source}")]
    #[strum(serialize = "PrivilegeDropFailed")]
    Privileges {
        step: &'static str,
        source: nix::Error,
    },
    #[error("cannot {step}: {source}")]
    #[strum(serialize = "JailFailed")]
    Jail {
        step: String,
        source: std::io::Error,
    },
    #[error("cannot exec {binary}: {source}")]
    #[strum(serialize = "ExecFailed")]
    Exec { binary: PathBuf, source: nix::Error },
}

/// The checks every stage makes first, before anything changes: no root ids, an absolute VMM.
fn checked(args: &JailerArgs) -> Result<(PathBuf, &[OsString]), JailError> {
    if args.uid == 0 || args.gid == 0 || args.groups.contains(&0) {
        return Err(JailError::Root {
            uid: args.uid,
            gid: args.gid,
        });
    }
    let (binary, rest) = args.command.split_first().ok_or(JailError::NoCommand)?;
    let binary = PathBuf::from(binary);
    if !binary.is_absolute() {
        return Err(JailError::RelativeBinary(binary));
    }
    Ok((binary, rest))
}

/// Stage one of a jail: cgroups and network namespace, then new mount and pid namespaces with
/// the root built in them, then stage two as pid 1 there; ends as the VMM ends.
fn build_jail_and_wait(args: &JailerArgs) -> Result<ExitCode, JailError> {
    checked(args)?;
    let root = args.chroot.clone().ok_or(JailError::NoCommand)?;
    join_cgroups_and_netns(args)?;
    let binary = PathBuf::from(&args.command[0]);
    let files: Vec<JailFile> = args
        .binds
        .iter()
        .map(|b| (b, false))
        .chain(args.binds_rw.iter().map(|b| (b, true)))
        .map(|((host, name), writable)| JailFile {
            host: host.clone(),
            name: name.clone(),
            writable,
        })
        .collect();
    chroot::enter_namespaces_and_build(&root, &binary, &files, &args.links, args.uid, args.gid)?;
    let mut stage_two: Vec<OsString> = vec![
        "jailer".into(),
        "--in-jail".into(),
        "--chroot".into(),
        root.into(),
        "--uid".into(),
        args.uid.to_string().into(),
        "--gid".into(),
        args.gid.to_string().into(),
    ];
    for group in &args.groups {
        stage_two.extend(["--group".into(), group.to_string().into()]);
    }
    stage_two.push("--".into());
    stage_two.extend(args.command.iter().cloned());
    chroot::run_stage_two(stage_two)
}

fn join_cgroups_and_netns(args: &JailerArgs) -> Result<(), JailError> {
    // The cgroups first, while still root: from here on every page is charged there.
    let own_pid = std::process::id().to_string();
    for dir in &args.cgroups {
        std::fs::write(dir.join("cgroup.procs"), &own_pid).map_err(|source| JailError::Cgroup {
            dir: dir.clone(),
            source,
        })?;
    }
    if let Some(netns) = &args.netns {
        let netns_error = |source| JailError::Netns {
            path: netns.clone(),
            source,
        };
        let file = std::fs::File::open(netns).map_err(netns_error)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| netns_error(e.into()))?;
    }
    Ok(())
}

fn confine_and_exec(args: &JailerArgs) -> Result<std::convert::Infallible, JailError> {
    use nix::unistd::{Gid, Uid};
    let (binary, rest) = checked(args)?;
    // In a jail, the VMM is exec'd by its path there (stage one bound it at the root).
    let (binary, shown) = match (&args.chroot, args.in_jail) {
        (Some(_), true) => (chroot::binary_in_jail(&binary)?, binary),
        _ => (binary.clone(), binary),
    };
    let cstring = |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| JailError::Nul);
    let path = cstring(binary.as_os_str())?;
    let argv = std::iter::once(binary.as_os_str())
        .chain(rest.iter().map(OsString::as_os_str))
        .map(cstring)
        .collect::<Result<Vec<_>, _>>()?;
    let env = [cstring(OsStr::new(VMM_ENV))?];

    match (&args.chroot, args.in_jail) {
        // Stage one already joined them; this is its child, pid 1 of the new namespace.
        (Some(root), true) => chroot::enter(root)?,
        _ => join_cgroups_and_netns(args)?,
    }
    if let Some(dir) = &args.chdir {
        nix::unistd::chdir(dir).map_err(|source| JailError::Chdir {
            dir: dir.clone(),
            source,
        })?;
    }
    let privileges = |step| move |source| JailError::Privileges { step, source };
    // Groups before the uid: once the uid is not 0 they can no longer be changed. Changing
    // every uid away from 0 clears the permitted and effective capabilities.
    let groups: Vec<Gid> = args.groups.iter().map(|&g| Gid::from_raw(g)).collect();
    nix::unistd::setgroups(&groups).map_err(privileges("set the supplementary groups"))?;
    let gid = Gid::from_raw(args.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(privileges("set the gid"))?;
    let uid = Uid::from_raw(args.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(privileges("set the uid"))?;
    // No exec from here on can gain a privilege (setuid binaries, file capabilities).
    nix::sys::prctl::set_no_new_privs().map_err(privileges("set no_new_privs"))?;
    if args.in_jail {
        chroot::die_with_parent()?;
    }
    nix::unistd::execve(&path, &argv, &env).map_err(|source| JailError::Exec {
        binary: shown,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confinement() -> Confinement {
        Confinement {
            uid: 100_007,
            gid: 100_007,
            netns: Some("/proc/42/ns/net".into()),
            cgroups: vec!["/sys/fs/cgroup/kubepods/podx".into()],
        }
    }

    #[test]
    fn the_wrapper_command_line_names_every_field_then_the_vmm() {
        let args = wrapper_args(
            &confinement(),
            &[],
            Some(Path::new("/s")),
            None,
            Path::new("/usr/bin/qemu-system-x86_64"),
            ["-S", "-qmp"],
        );
        let args: Vec<&str> = args.iter().map(|a| a.to_str().expect("utf8")).collect();
        assert_eq!(
            args,
            [
                "jailer",
                "--netns",
                "/proc/42/ns/net",
                "--cgroup",
                "/sys/fs/cgroup/kubepods/podx",
                "--uid",
                "100007",
                "--gid",
                "100007",
                "--chdir",
                "/s",
                "--",
                "/usr/bin/qemu-system-x86_64",
                "-S",
                "-qmp"
            ]
        );
    }

    #[test]
    fn the_wrapper_command_line_parses_back_into_the_same_confinement() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            command: Sub,
        }
        #[derive(clap::Subcommand)]
        enum Sub {
            Jailer(JailerArgs),
        }
        let mut c = confinement();
        c.cgroups.push("/sys/fs/cgroup/memory/podx".into());
        let line = wrapper_args(&c, &[993], None, None, Path::new("/bin/vmm"), ["--", "-x"]);
        let Sub::Jailer(parsed) = Cli::try_parse_from(std::iter::once("ignis".into()).chain(line))
            .expect("parses")
            .command;
        assert_eq!(parsed.uid, c.uid);
        assert_eq!(parsed.gid, c.gid);
        assert_eq!(parsed.netns, c.netns);
        assert_eq!(parsed.cgroups, c.cgroups);
        assert_eq!(parsed.chdir, None);
        assert_eq!(parsed.groups, [993]);
        // The VMM's own arguments, even `--`, are passed through untouched.
        assert_eq!(parsed.command, ["/bin/vmm", "--", "-x"].map(OsString::from));
    }

    #[test]
    fn root_and_relative_binaries_are_refused_before_anything_changes() {
        let args = |uid, gid, vmm: &str| JailerArgs {
            netns: None,
            cgroups: vec!["/nonexistent/cgroup".into()],
            uid,
            gid,
            groups: Vec::new(),
            chdir: None,
            chroot: None,
            binds: Vec::new(),
            binds_rw: Vec::new(),
            links: Vec::new(),
            in_jail: false,
            command: vec![vmm.into()],
        };
        assert!(matches!(
            confine_and_exec(&args(0, 5, "/bin/true")),
            Err(JailError::Root { .. })
        ));
        assert!(matches!(
            confine_and_exec(&args(5, 0, "/bin/true")),
            Err(JailError::Root { .. })
        ));
        assert!(matches!(
            confine_and_exec(&args(5, 5, "true")),
            Err(JailError::RelativeBinary(_))
        ));
        // The cgroup is the first thing touched: a missing one stops it there, still root.
        assert!(matches!(
            confine_and_exec(&args(5, 5, "/bin/true")),
            Err(JailError::Cgroup { .. })
        ));
    }
}
