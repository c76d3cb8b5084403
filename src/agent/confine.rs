//! What an admin lets a node's VMs use, and how their VMMs are confined: the per-VM uid/gid
//! range, the directories whose files a spec may name (`kernel.path`, `initrd.path`,
//! `rootfs.path`), and whether TCG may run at all. Host paths are resolved beneath an allowed
//! directory with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, so no symlink, `..` or
//! `/proc` magic link at any component leads out of it; anything else is never opened.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The first uid (and gid) handed to VMMs by default: far above distribution users and the
/// 65534 of `nobody`, and the start of the range container runtimes leave to user namespaces.
pub const DEFAULT_FIRST_ID: u32 = 100_000;
/// How many VMMs may run at once by default.
pub const DEFAULT_ID_COUNT: u32 = 65_536;

/// The ids VMMs run as: VM `i` of the node gets uid = gid = `first + i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdRange {
    pub first: u32,
    pub count: u32,
}

impl Default for IdRange {
    fn default() -> Self {
        IdRange {
            first: DEFAULT_FIRST_ID,
            count: DEFAULT_ID_COUNT,
        }
    }
}

impl IdRange {
    /// The lowest id of the range that `used` does not hold; `None` when all are taken (or the
    /// range would reach 0 or past `u32::MAX`).
    pub(crate) fn first_free(&self, used: &[u32]) -> Option<u32> {
        if self.first == 0 {
            return None;
        }
        (0..self.count)
            .map_while(|i| self.first.checked_add(i))
            .find(|id| !used.contains(id))
    }
}

/// The ids one VM's VMM runs as, kept in its state directory (`ids.json`) for as long as the
/// VM exists, so every run, a re-adoption and the cleanup know them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmIds {
    pub uid: u32,
    pub gid: u32,
}

/// The node's policy for VMMs (agent flags `--vmm-first-id`, `--allowed-path-dir`,
/// `--allow-tcg`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmPolicy {
    /// Unprivileged ids for VMMs; `None` runs them unconfined, as the agent's own children
    /// (only for the baseline of `ignis bench boot --confinement off` and unit tests).
    pub ids: Option<IdRange>,
    /// Directories beneath which a spec's host paths may lie. Empty: no host path at all.
    pub allowed_path_dirs: Vec<PathBuf>,
    /// Whether guests may run under TCG, which QEMU does not treat as a security boundary.
    pub allow_tcg: bool,
}

/// Why a host path is refused or cannot be opened.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
pub enum PathError {
    #[error(
        "{path} is not beneath a directory this node's admin allows for guest files ({allowed}); use an image, or ask the admin to add the directory with --allowed-path-dir"
    )]
    #[strum(serialize = "PathNotAllowed")]
    NotAllowed { path: String, allowed: String },
    #[error("{path} leaves its allowed directory {dir} (a symlink or magic link escapes it)")]
    #[strum(serialize = "PathNotAllowed")]
    Escapes { path: String, dir: PathBuf },
    #[error("{path} is not a regular file")]
    #[strum(serialize = "PathNotAllowed")]
    NotAFile { path: String },
    #[error("{path} cannot be opened: {source}")]
    #[strum(serialize = "PathUnreadable")]
    Open {
        path: String,
        missing: bool,
        source: std::io::Error,
    },
}

/// The allowed directory `path` lies beneath, and the rest of `path` below it. Purely lexical:
/// `path` must be absolute and free of `.`, `..` and empty components, so no comparison is
/// fooled by them.
pub(crate) fn beneath<'a>(path: &'a str, allowed: &'a [PathBuf]) -> Option<(&'a Path, PathBuf)> {
    // On the string: `Path::components` would quietly drop `.` and doubled slashes.
    let relative = path.strip_prefix('/')?;
    if relative
        .split('/')
        .any(|part| matches!(part, "" | "." | ".."))
    {
        return None;
    }
    let path = Path::new(path);
    allowed.iter().find_map(|dir| {
        let rest = path.strip_prefix(dir).ok()?;
        (!rest.as_os_str().is_empty()).then(|| (dir.as_path(), rest.to_path_buf()))
    })
}

/// Open the host file `path` for the VMM (read-write when `writable`), only when it lies
/// beneath one of `allowed` and its resolution never leaves that directory: symlinks stay
/// beneath it, magic links (`/proc/<pid>/root`, `/proc/self/fd/...`) are refused.
pub(crate) fn open_allowed(
    path: &str,
    allowed: &[PathBuf],
    writable: bool,
) -> Result<OwnedFd, PathError> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2};
    use nix::sys::stat::Mode;
    let (dir, rest) = beneath(path, allowed).ok_or_else(|| PathError::NotAllowed {
        path: path.to_owned(),
        allowed: describe(allowed),
    })?;
    let open_error = |errno: nix::Error| PathError::Open {
        path: path.to_owned(),
        missing: errno == nix::Error::ENOENT,
        source: errno.into(),
    };
    let dir_fd = open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(open_error)?;
    let access = if writable {
        OFlag::O_RDWR
    } else {
        OFlag::O_RDONLY
    };
    let how = OpenHow::new()
        .flags(access | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(&dir_fd, rest.as_path(), how).map_err(|errno| match errno {
        nix::Error::EXDEV | nix::Error::ELOOP => PathError::Escapes {
            path: path.to_owned(),
            dir: dir.to_path_buf(),
        },
        other => open_error(other),
    })?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|source| PathError::Open {
        path: path.to_owned(),
        missing: false,
        source,
    })?;
    if !meta.is_file() {
        return Err(PathError::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(file.into())
}

fn describe(allowed: &[PathBuf]) -> String {
    if allowed.is_empty() {
        return "none".into();
    }
    allowed
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_lowest_free_in_the_range_and_never_root() {
        let range = IdRange {
            first: 100_000,
            count: 3,
        };
        assert_eq!(range.first_free(&[]), Some(100_000));
        assert_eq!(range.first_free(&[100_000, 100_002]), Some(100_001));
        assert_eq!(range.first_free(&[100_000, 100_001, 100_002]), None);
        assert_eq!(IdRange { first: 0, count: 5 }.first_free(&[]), None);
        let top = IdRange {
            first: u32::MAX,
            count: 5,
        };
        assert_eq!(top.first_free(&[u32::MAX]), None);
    }

    #[test]
    fn a_path_is_beneath_an_allowed_dir_only_lexically_cleanly() {
        let allowed = vec![PathBuf::from("/var/lib/ignis/guest")];
        let (dir, rest) = beneath("/var/lib/ignis/guest/vmlinuz", &allowed).expect("beneath");
        assert_eq!(
            (dir, rest.as_path()),
            (allowed[0].as_path(), Path::new("vmlinuz"))
        );
        for refused in [
            "/var/lib/ignis/guest/../tls/tls.key",
            "/var/lib/ignis/guest/./vmlinuz",
            "/var/lib/ignis/guest//vmlinuz",
            "/var/lib/ignis/guest/vmlinuz/",
            "/var/lib/ignis/guestx/vmlinuz",
            "/var/lib/ignis/guest",
            "var/lib/ignis/guest/vmlinuz",
            "/proc/1/root/etc/shadow",
            "",
        ] {
            assert!(beneath(refused, &allowed).is_none(), "{refused}");
        }
        assert!(beneath("/var/lib/ignis/guest/vmlinuz", &[]).is_none());
    }

    #[test]
    fn files_open_beneath_their_dir_and_escapes_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let allowed = tmp.path().join("allowed");
        std::fs::create_dir(&allowed).expect("dir");
        std::fs::write(allowed.join("kernel"), "k").expect("file");
        std::fs::write(tmp.path().join("secret"), "s").expect("file");
        std::os::unix::fs::symlink("kernel", allowed.join("inside")).expect("link");
        std::os::unix::fs::symlink(tmp.path().join("secret"), allowed.join("absolute"))
            .expect("link");
        std::os::unix::fs::symlink("../secret", allowed.join("relative")).expect("link");
        std::os::unix::fs::symlink("/proc/self/root/etc/hostname", allowed.join("magic"))
            .expect("link");
        std::fs::create_dir(allowed.join("sub")).expect("dir");
        let dirs = vec![allowed.clone()];
        let at = |name: &str| allowed.join(name).display().to_string();
        open_allowed(&at("kernel"), &dirs, false).expect("a plain file");
        open_allowed(&at("inside"), &dirs, true).expect("a symlink that stays inside");
        for escape in ["absolute", "relative", "magic"] {
            let e = open_allowed(&at(escape), &dirs, false).expect_err(escape);
            assert_eq!(<&str>::from(&e), "PathNotAllowed", "{escape}: {e}");
        }
        let e = open_allowed(&at("sub"), &dirs, false).expect_err("a directory");
        assert!(matches!(e, PathError::NotAFile { .. }), "{e}");
        let e = open_allowed(&at("missing"), &dirs, false).expect_err("missing");
        assert!(matches!(e, PathError::Open { missing: true, .. }), "{e}");
        let outside = tmp.path().join("secret").display().to_string();
        let e = open_allowed(&outside, &dirs, false).expect_err("outside");
        assert!(matches!(e, PathError::NotAllowed { .. }), "{e}");
    }
}
