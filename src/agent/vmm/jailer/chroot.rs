//! Jailer semantics for a VMM that opens its own files (Firecracker): a chroot of the VM's
//! own holding only what the VMM needs, in new mount and pid namespaces.
//!
//! Stage one (`ignis jailer --chroot`, still root) unshares the mount and pid namespaces,
//! makes every mount private (nothing it mounts is seen by the host, and all of it is gone
//! with the namespace), builds the root afresh — an empty file per guest file with the host
//! file bind-mounted onto it (read-only unless writable), the VMM binary likewise, a small
//! tmpfs `/dev` with only `/dev/kvm` and `/dev/net/tun` bound in — and links the host path the
//! agent talks to (the API socket) to its place inside. Its child, started after the
//! `unshare`, is pid 1 of the new pid namespace: stage two (`--in-jail`), which chroots,
//! drops to the VM's ids and execs the VMM, so the VMM is that pid 1. Stage one stays as its
//! parent (the process the agent knows), passes its exit on, and takes the VMM down with it:
//! the VMM's parent-death signal is SIGKILL, and a pid namespace ends with its pid 1.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{MsFlags, mount};

use super::JailError;

/// The devices a jailed VMM sees, by their path on the host and in the jail.
const DEVICES: [&str; 2] = ["/dev/kvm", "/dev/net/tun"];

/// A host file to put in the jail under `name` (one path component at its root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailFile {
    pub host: PathBuf,
    pub name: String,
    /// Bound read-write, and handed to the VM's uid and gid (its own disk, its own log).
    pub writable: bool,
}

/// What a jailed VMM's root holds: a plain value, planned by the backend and honoured by
/// `ignis jailer --chroot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    /// The chroot directory on the host (under the VM's state directory); rebuilt at every
    /// spawn.
    pub root: PathBuf,
    pub files: Vec<JailFile>,
    /// Host paths made symlinks to `root/<name>` (the API socket the VMM binds in the jail,
    /// which the agent connects to by its usual path).
    pub links: Vec<(PathBuf, String)>,
}

impl Jail {
    /// The `ignis jailer` options that build this jail.
    pub(crate) fn args(&self) -> Vec<OsString> {
        let pair = |host: &Path, name: &str| {
            let mut value = host.as_os_str().to_os_string();
            value.push("=");
            value.push(name);
            value
        };
        let mut out: Vec<OsString> = vec!["--chroot".into(), self.root.clone().into()];
        for file in &self.files {
            let flag = if file.writable { "--bind-rw" } else { "--bind" };
            out.extend([flag.into(), pair(&file.host, &file.name)]);
        }
        for (host, name) in &self.links {
            out.extend(["--link".into(), pair(host, name)]);
        }
        out
    }
}

/// `HOST=NAME` as given on the command line (split at the last `=`: names hold none).
pub(crate) fn parse_pair(value: &str) -> Result<(PathBuf, String), String> {
    let (host, name) = value
        .rsplit_once('=')
        .ok_or_else(|| format!("{value:?} is not HOST=NAME"))?;
    check_name(name)?;
    if !Path::new(host).is_absolute() {
        return Err(format!("{host:?} is not an absolute path"));
    }
    Ok((host.into(), name.to_owned()))
}

/// A name in the jail is one plain component at its root, and never `dev` (the jail's own).
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    let mut components = Path::new(name).components();
    let plain = matches!(components.next(), Some(Component::Normal(_)))
        && components.next().is_none()
        && !name.contains('/');
    if plain && name != "dev" {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a single file name in the jail (nor `dev`)"
        ))
    }
}

/// Where the VMM binary is in the jail: at its root, under its own file name.
pub(crate) fn binary_in_jail(binary: &Path) -> Result<PathBuf, JailError> {
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| check_name(n).is_ok())
        .ok_or_else(|| JailError::RelativeBinary(binary.to_path_buf()))?;
    Ok(Path::new("/").join(name))
}

fn jail_error(step: String) -> impl FnOnce(std::io::Error) -> JailError {
    move |source| JailError::Jail { step, source }
}

fn nix_error(step: String) -> impl FnOnce(nix::Error) -> JailError {
    move |errno| JailError::Jail {
        step,
        source: errno.into(),
    }
}

/// Stage one, after the cgroups and network namespace: new mount and pid namespaces, the
/// root built in them. The caller then starts stage two as its child.
pub(crate) fn enter_namespaces_and_build(
    root: &Path,
    binary: &Path,
    files: &[JailFile],
    links: &[(PathBuf, String)],
    uid: u32,
    gid: u32,
) -> Result<(), JailError> {
    use nix::sched::{CloneFlags, unshare};
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID)
        .map_err(nix_error("unshare the mount and pid namespaces".into()))?;
    // Private before anything is mounted: no bind below reaches the host's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(nix_error("make the mounts private".into()))?;

    // Afresh: whatever an earlier run left (placeholders, a socket) goes.
    match std::fs::remove_dir_all(root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(jail_error(format!("clear {}", root.display()))(e)),
    }
    std::fs::create_dir_all(root).map_err(jail_error(format!("create {}", root.display())))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .map_err(jail_error(format!("chmod {}", root.display())))?;
    // The VMM owns its root: it binds its API socket there.
    nix::unistd::chown(
        root,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(nix_error(format!("chown {}", root.display())))?;

    let in_jail = binary_in_jail(binary)?;
    bind_file(
        binary,
        &root.join(in_jail.strip_prefix("/").unwrap_or(&in_jail)),
        false,
    )?;
    for file in files {
        if file.writable {
            // Its own file (a console the VMM writes itself) may not exist yet.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file.host)
                .map_err(jail_error(format!("create {}", file.host.display())))?;
            nix::unistd::chown(
                &file.host,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(nix_error(format!("chown {}", file.host.display())))?;
        }
        bind_file(&file.host, &root.join(&file.name), file.writable)?;
    }

    let dev = root.join("dev");
    std::fs::create_dir(&dev).map_err(jail_error(format!("create {}", dev.display())))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=755"),
    )
    .map_err(nix_error(format!("mount a tmpfs on {}", dev.display())))?;
    for device in DEVICES {
        let host = Path::new(device);
        if !host.exists() {
            continue;
        }
        let target = root.join(device.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(jail_error(format!("create {}", parent.display())))?;
        }
        bind_file(host, &target, true)?;
    }

    for (host, name) in links {
        match std::fs::remove_file(host) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(jail_error(format!("remove {}", host.display()))(e)),
        }
        std::os::unix::fs::symlink(root.join(name), host)
            .map_err(jail_error(format!("link {}", host.display())))?;
    }
    Ok(())
}

/// Bind `host` onto a new empty file `target`, read-only unless `writable`.
fn bind_file(host: &Path, target: &Path, writable: bool) -> Result<(), JailError> {
    std::fs::File::create(target).map_err(jail_error(format!("create {}", target.display())))?;
    let step = || format!("bind {} to {}", host.display(), target.display());
    mount(
        Some(host),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(nix_error(step()))?;
    if !writable {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID,
            None::<&str>,
        )
        .map_err(nix_error(format!("{} read-only", step())))?;
    }
    Ok(())
}

/// Stage one after the build: start stage two (pid 1 of the new namespace) with the same
/// descriptors, stdio and confinement, and end as it ends. SIGTERM, SIGINT and SIGHUP are
/// blocked here (stage two unblocks them), so only a SIGKILL or the VMM's own end stops this
/// parent; its death kills the VMM (parent-death signal), never leaving one behind.
pub(crate) fn run_stage_two(args: Vec<OsString>) -> Result<std::process::ExitCode, JailError> {
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().map_err(jail_error("find the ignis binary".into()))?;
    stop_signals()
        .thread_block()
        .map_err(nix_error("block stop signals".into()))?;
    let status = std::process::Command::new(exe)
        .args(args)
        .env_clear()
        .status()
        .map_err(jail_error("start the VMM in its namespaces".into()))?;
    if let Some(code) = status.code() {
        return Ok(std::process::ExitCode::from(
            u8::try_from(code).unwrap_or(u8::MAX),
        ));
    }
    let signal = status.signal().unwrap_or(nix::libc::SIGKILL);
    // Die as the VMM did, so the agent reads the same end; a blocked one is unblocked first.
    if let Ok(signal) = nix::sys::signal::Signal::try_from(signal) {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(signal);
        let _ = set.thread_unblock();
        let _ = nix::sys::signal::raise(signal);
    }
    Ok(std::process::ExitCode::from(
        u8::try_from(128 + signal).unwrap_or(u8::MAX),
    ))
}

/// The signals stage one ignores by blocking them.
pub(crate) fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(signal);
    }
    set
}

/// Stage two, pid 1 of the new namespace and still root: into the jail.
pub(crate) fn enter(root: &Path) -> Result<(), JailError> {
    nix::unistd::chroot(root).map_err(nix_error(format!("chroot to {}", root.display())))?;
    nix::unistd::chdir("/").map_err(nix_error("chdir to the jail's root".into()))?;
    stop_signals()
        .thread_unblock()
        .map_err(nix_error("unblock stop signals".into()))
}

/// Stage two, after the privileges are dropped (a credential change clears it): the VMM dies
/// with stage one.
pub(crate) fn die_with_parent() -> Result<(), JailError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(nix_error("set the parent-death signal".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jail_options_name_every_file_and_link() {
        let jail = Jail {
            root: "/s/jail".into(),
            files: vec![
                JailFile {
                    host: "/img/k=1/vmlinux".into(),
                    name: "kernel".into(),
                    writable: false,
                },
                JailFile {
                    host: "/s/disk.img".into(),
                    name: "disk-rootfs".into(),
                    writable: true,
                },
            ],
            links: vec![("/s/api.sock".into(), "api.sock".into())],
        };
        let args: Vec<String> = jail
            .args()
            .into_iter()
            .map(|a| a.into_string().expect("utf8"))
            .collect();
        assert_eq!(
            args,
            [
                "--chroot",
                "/s/jail",
                "--bind",
                "/img/k=1/vmlinux=kernel",
                "--bind-rw",
                "/s/disk.img=disk-rootfs",
                "--link",
                "/s/api.sock=api.sock"
            ]
        );
        // A host path may hold `=`; the name never does.
        assert_eq!(
            parse_pair("/img/k=1/vmlinux=kernel"),
            Ok(("/img/k=1/vmlinux".into(), "kernel".to_owned()))
        );
    }

    #[test]
    fn names_are_single_components_and_hosts_absolute() {
        for bad in ["", ".", "..", "a/b", "/a", "dev"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(parse_pair("relative=kernel").is_err());
        assert!(parse_pair("/no-name").is_err());
        assert_eq!(
            binary_in_jail(Path::new("/usr/bin/firecracker")).expect("name"),
            Path::new("/firecracker")
        );
    }
}
