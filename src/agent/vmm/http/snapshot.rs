//! Where Firecracker and Cloud Hypervisor read and write a snapshot's files, as the agent sees
//! them and as the VMM does. Neither VMM takes a descriptor for its snapshot (unlike QEMU's
//! `getfd`): each opens the paths it is given, from inside its jail when it runs in one.
//!
//! - **Saving** goes into a fresh staging directory, then each finished file is renamed into
//!   the VM's snapshot directory (mode 0600, owned by the VMM's ids). A snapshot is therefore
//!   never written over a file a running VMM still maps: Firecracker maps the memory file of
//!   the snapshot it was restored from (`MAP_PRIVATE`), and truncating that file under it would
//!   fault the guest. A rename leaves the old inode to the mapping. The old snapshot stays
//!   whole until the new one is complete.
//!   - Jailed, the staging directory is `snapshot/` under the jail's root (the chroot is a plain
//!     directory of the node, so the agent sees what the VMM writes there); the VMM is told
//!     `/snapshot`.
//!   - Unjailed, it is `.staging/` in the snapshot directory itself.
//! - **Loading**, jailed: every file of the snapshot directory is bound read-only at the jail's
//!   root under its own name when the VMM is spawned ([`jail_files`]), and the VMM is told `/`;
//!   unjailed, it is told the snapshot directory.
//!
//! Whether a VMM is jailed is read from its handle: a jailed VMM's API socket is the agent's
//! link into the jail (`Jail::links`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::agent::vmm::jailer::JailFile;
use crate::agent::vmm::{SnapshotFiles, VmmError, VmmHandle};

/// The staging directory's name: under the jail's root, or in the snapshot directory.
const JAILED_STAGING: &str = "snapshot";
const UNJAILED_STAGING: &str = ".staging";

/// The jail's root on the node when `handle`'s VMM runs in one: where its API socket link
/// points.
pub(crate) fn jail_root(handle: &VmmHandle) -> Option<PathBuf> {
    let meta = std::fs::symlink_metadata(&handle.api_socket).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    let target = std::fs::read_link(&handle.api_socket).ok()?;
    target.parent().map(Path::to_path_buf)
}

/// Where a snapshot is written: on the node, and as the VMM names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Staging {
    pub(crate) host: PathBuf,
    pub(crate) seen: PathBuf,
    /// Who must be able to write it: the snapshot's owner, else a jailed VMM's own ids (those
    /// of its jail's root), else nobody but the agent (an unconfined VMM runs as the agent).
    pub(crate) writer: Option<(u32, u32)>,
}

impl Staging {
    /// The staging directory for `handle`'s VMM (see the module docs).
    pub(crate) fn of(handle: &VmmHandle, snapshot: &SnapshotFiles) -> Staging {
        use std::os::unix::fs::MetadataExt;
        match jail_root(handle) {
            Some(root) => Staging {
                host: root.join(JAILED_STAGING),
                seen: Path::new("/").join(JAILED_STAGING),
                writer: snapshot
                    .owner
                    .or_else(|| std::fs::metadata(&root).ok().map(|m| (m.uid(), m.gid()))),
            },
            None => {
                let dir = snapshot.dir.join(UNJAILED_STAGING);
                Staging {
                    host: dir.clone(),
                    seen: dir,
                    writer: snapshot.owner,
                }
            }
        }
    }

    /// Make the staging directory afresh, writable only by the VMM's ids.
    pub(crate) fn prepare(&self) -> Result<(), VmmError> {
        let io = io_error("prepare", &self.host);
        match std::fs::remove_dir_all(&self.host) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        std::fs::create_dir(&self.host).map_err(&io)?;
        std::fs::set_permissions(&self.host, std::fs::Permissions::from_mode(0o700))
            .map_err(&io)?;
        if let Some((uid, gid)) = self.writer {
            std::os::unix::fs::chown(&self.host, Some(uid), Some(gid)).map_err(&io)?;
        }
        Ok(())
    }

    /// Move every file the VMM wrote into the snapshot directory (0600, the VMM's ids), then
    /// remove the staging directory. Returns the files' names, sorted.
    pub(crate) fn collect(&self, snapshot: &SnapshotFiles) -> Result<Vec<String>, VmmError> {
        let mut names = Vec::new();
        let entries = std::fs::read_dir(&self.host).map_err(io_error("read", &self.host))?;
        for entry in entries {
            let entry = entry.map_err(io_error("read", &self.host))?;
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let name = entry.file_name();
            let target = snapshot.dir.join(&name);
            move_file(&entry.path(), &target)?;
            let io = io_error("protect", &target);
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                .map_err(&io)?;
            if let Some((uid, gid)) = snapshot.owner {
                std::os::unix::fs::chown(&target, Some(uid), Some(gid)).map_err(&io)?;
            }
            names.push(name.to_string_lossy().into_owned());
        }
        self.discard();
        names.sort();
        Ok(names)
    }

    /// Remove the staging directory and whatever a failed save left in it.
    pub(crate) fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.host);
    }
}

/// The directory holding the snapshot's files as the VMM names it (see the module docs).
pub(crate) fn load_dir(handle: &VmmHandle, snapshot: &SnapshotFiles) -> PathBuf {
    match jail_root(handle) {
        Some(_) => PathBuf::from("/"),
        None => snapshot.dir.clone(),
    }
}

/// The snapshot's files to bind read-only at the root of a jail that loads it: every regular
/// file of its directory, under its own name. A name that is not one plain file name, or that
/// the jail already uses (`taken`), makes the snapshot unrestorable.
pub(crate) fn jail_files(
    snapshot: &SnapshotFiles,
    taken: &[String],
) -> Result<Vec<JailFile>, VmmError> {
    let unrestorable = |detail: String| VmmError::SnapshotUnrestorable { detail };
    let entries = std::fs::read_dir(&snapshot.dir)
        .map_err(|e| unrestorable(format!("cannot read {}: {e}", snapshot.dir.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry
            .map_err(|e| unrestorable(format!("cannot read {}: {e}", snapshot.dir.display())))?;
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let plain = crate::agent::vmm::jailer::check_jail_name(&name).is_ok();
        if !plain || taken.contains(&name) {
            return Err(unrestorable(format!(
                "{} holds {name:?}, which cannot be placed in the VMM's jail",
                snapshot.dir.display()
            )));
        }
        files.push(JailFile {
            host: entry.path(),
            name,
            writable: false,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Rename, or copy and remove when the staging directory is on another filesystem.
fn move_file(from: &Path, to: &Path) -> Result<(), VmmError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            // Beside the target first, then renamed over it: never a half-written snapshot
            // file under the final name.
            let mut partial = to.as_os_str().to_os_string();
            partial.push(".partial");
            let partial = PathBuf::from(partial);
            std::fs::copy(from, &partial).map_err(io_error("copy", from))?;
            std::fs::rename(&partial, to).map_err(io_error("rename", &partial))?;
            std::fs::remove_file(from).map_err(io_error("remove", from))
        }
        Err(e) => Err(io_error("move", from)(e)),
    }
}

fn io_error(verb: &'static str, path: &Path) -> impl Fn(std::io::Error) -> VmmError {
    let operation = format!("snapshot: {verb} {}", path.display());
    move |source| VmmError::Io {
        operation: operation.clone(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(socket: PathBuf) -> VmmHandle {
        VmmHandle {
            pid: 1,
            start_time_ticks: 0,
            console_log: socket.with_file_name("console.log"),
            api_socket: socket,
        }
    }

    #[test]
    fn a_jailed_vmm_writes_under_its_jail_and_reads_from_its_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("jail");
        std::fs::create_dir(&root).expect("jail root");
        let link = tmp.path().join("api.sock");
        std::os::unix::fs::symlink(root.join("api.sock"), &link).expect("link");
        let snapshot = SnapshotFiles {
            dir: tmp.path().join("snap"),
            owner: None,
        };
        let h = handle(link);
        assert_eq!(jail_root(&h), Some(root.clone()));
        use std::os::unix::fs::MetadataExt;
        let root_meta = std::fs::metadata(&root).expect("root");
        assert_eq!(
            Staging::of(&h, &snapshot),
            Staging {
                host: root.join("snapshot"),
                seen: "/snapshot".into(),
                // No owner given: the jailed VMM's own ids, those of its root.
                writer: Some((root_meta.uid(), root_meta.gid())),
            }
        );
        let owned = SnapshotFiles {
            owner: Some((7, 8)),
            ..snapshot.clone()
        };
        assert_eq!(Staging::of(&h, &owned).writer, Some((7, 8)));
        assert_eq!(load_dir(&h, &snapshot), Path::new("/"));
    }

    #[test]
    fn an_unjailed_vmm_stages_beside_the_snapshot_and_reads_it_in_place() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let snapshot = SnapshotFiles {
            dir: tmp.path().join("snap"),
            owner: None,
        };
        let h = handle(tmp.path().join("api.sock"));
        assert_eq!(jail_root(&h), None);
        let staging = Staging::of(&h, &snapshot);
        assert_eq!(staging.host, snapshot.dir.join(".staging"));
        assert_eq!(staging.seen, staging.host);
        assert_eq!(load_dir(&h, &snapshot), snapshot.dir);
    }

    #[test]
    fn collected_files_replace_the_old_ones_by_rename_and_are_private() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let snapshot = SnapshotFiles {
            dir: tmp.path().join("snap"),
            owner: None,
        };
        std::fs::create_dir(&snapshot.dir).expect("dir");
        // An old memory file, as a restored VMM would still map it.
        std::fs::write(snapshot.dir.join("memory"), "old").expect("old");
        let old = std::fs::File::open(snapshot.dir.join("memory")).expect("open old");
        let old_inode = old.metadata().expect("meta").ino();

        let staging = Staging::of(&handle(tmp.path().join("api.sock")), &snapshot);
        staging.prepare().expect("prepare");
        std::fs::write(staging.host.join("memory"), "new").expect("write");
        std::fs::write(staging.host.join("vmstate"), "state").expect("write");
        assert_eq!(
            staging.collect(&snapshot).expect("collect"),
            ["memory", "vmstate"]
        );
        assert!(!staging.host.exists());
        let new = std::fs::metadata(snapshot.dir.join("memory")).expect("meta");
        assert_ne!(new.ino(), old_inode, "written over the mapped file");
        assert_eq!(new.mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(snapshot.dir.join("memory")).expect("read"),
            "new"
        );
    }

    #[test]
    fn jail_files_bind_every_snapshot_file_read_only_and_refuse_clashes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let snapshot = SnapshotFiles {
            dir: tmp.path().to_path_buf(),
            owner: None,
        };
        std::fs::write(tmp.path().join("state.json"), "{}").expect("write");
        std::fs::write(tmp.path().join("config.json"), "{}").expect("write");
        std::fs::create_dir(tmp.path().join(".staging")).expect("leftover staging");
        let files = jail_files(&snapshot, &["kernel".to_owned()]).expect("files");
        let names: Vec<(&str, bool)> = files
            .iter()
            .map(|f| (f.name.as_str(), f.writable))
            .collect();
        assert_eq!(names, [("config.json", false), ("state.json", false)]);

        std::fs::write(tmp.path().join("kernel"), "").expect("write");
        let err = jail_files(&snapshot, &["kernel".to_owned()]).expect_err("clash");
        assert!(
            matches!(err, VmmError::SnapshotUnrestorable { .. }),
            "{err}"
        );
        let missing = SnapshotFiles {
            dir: tmp.path().join("gone"),
            owner: None,
        };
        assert!(matches!(
            jail_files(&missing, &[]),
            Err(VmmError::SnapshotUnrestorable { .. })
        ));
    }
}
