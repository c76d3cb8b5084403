//! The unprivileged ids of a VM's VMM: chosen once per VM from the admin's range (the lowest
//! that no other VM of the node holds), kept in the VM's state directory (`ids.json`) so every
//! run, a re-adoption and the cleanup know them, and freed with the directory.

use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::agent::confine::{IdRange, VmmIds};
use crate::agent::vmm::process::Confinement;

impl Inner {
    /// Where the VM's VMM runs: its own uid and gid (the agent's netns and node-level VMM
    /// cgroup; a VM pod's come from the pod). `None` only when the node runs VMMs unconfined.
    pub(super) fn confinement(&self, uid: &VmUid) -> Result<Option<Confinement>, BootError> {
        let Some(range) = self.config.policy.ids else {
            return Ok(None);
        };
        let ids = self.vmm_ids(uid, range)?;
        // Root's alone: the VMM gets its files as descriptors and needs no path in here, and
        // no other VMM may read what is.
        let dir = self.store.vm_dir(uid);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| {
                BootError::State(crate::agent::state::StateError::Io {
                    path: dir.clone(),
                    source,
                })
            },
        )?;
        Ok(Some(Confinement {
            uid: ids.uid,
            gid: ids.gid,
            netns: None,
            cgroups: Vec::new(),
        }))
    }

    fn vmm_ids(&self, uid: &VmUid, range: IdRange) -> Result<VmmIds, BootError> {
        let _held = self
            .ids_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(ids) = self.store.read_ids(uid).map_err(BootError::State)? {
            return Ok(ids);
        }
        let others = self.store.list().map_err(BootError::State)?;
        // A corrupt or unreadable record holds no id: its VM gets a new one at its next run.
        let used: Vec<u32> = others
            .iter()
            .filter(|other| *other != uid)
            .filter_map(|other| self.store.read_ids(other).ok().flatten())
            .map(|ids| ids.uid)
            .collect();
        let id = range.first_free(&used).ok_or(BootError::VmmIdsExhausted {
            first: range.first,
            count: range.count,
        })?;
        let ids = VmmIds { uid: id, gid: id };
        self.store.write_ids(uid, &ids).map_err(BootError::State)?;
        Ok(ids)
    }
}
