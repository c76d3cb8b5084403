//! The metadata channel (docs/networking.md, "The metadata channel"): what a guest reads about
//! itself after it booted, since a NoCloud drive cannot change then. A pool's warm VM learns
//! the hostname, labels and userData of the MicroVM that claimed it here, with no boot.
//!
//! An MMDS-like HTTP endpoint at `169.254.169.254:80` on the guest's own link, served by the
//! agent, so it is the same for every VMM: `nat` guests reach one listener of the node's
//! (their traffic to it is DNATed to the bridge's gateway address, and the caller is told by
//! its source address, which the anti-spoofing rules pin to its tap); `pod` guests reach a
//! listener of their own inside their VM pod's network namespace. `bridge` and `none` guests
//! have no channel. Plain text a busybox `wget` reads ([`http`]):
//! `GET /ignis/v1/{hostname,labels,user-data,version}`, `version?wait=<n>` long-polling.
//!
//! [`MetadataHub`] holds what each VM serves; [`http`] is the pure request and response side;
//! [`serve`] is the I/O.

pub(crate) mod http;
pub(crate) mod serve;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::vm::{GuestMetadata, VmUid};

/// Where guests find the channel: the link-local address clouds use for instance metadata.
pub(crate) const ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The port guests connect to.
pub(crate) const PORT: u16 = 80;
/// The node's listener for `nat` guests, on the bridge's gateway address: the node's own
/// 169.254.169.254 (a cloud's instance metadata) stays the cloud's, and port 80 of the node
/// stays free. The port nova's metadata service uses, for the same job.
pub(crate) const NODE_PORT: u16 = 8775;

/// What one guest reads, and its version: a number that changes whenever any of it does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Served {
    pub(crate) metadata: GuestMetadata,
    pub(crate) version: u64,
}

impl Served {
    /// The version is taken from the content, so it is the same after an agent restart and
    /// a guest's long-poll carries on; never 0, which a guest that read nothing yet sends.
    pub(crate) fn of(metadata: GuestMetadata) -> Self {
        let mut h = Sha256::new();
        h.update(metadata.hostname.as_bytes());
        h.update([0]);
        for (k, v) in &metadata.labels {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        match &metadata.user_data {
            Some(data) => {
                h.update([1]);
                h.update(data.as_bytes());
            }
            None => h.update([2]),
        }
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first[2..].copy_from_slice(&digest[..6]);
        // 48 bits: a plain decimal a shell compares, and no collision worth a thought.
        let version = u64::from_be_bytes(first).max(1);
        Served { metadata, version }
    }
}

/// What every VM the agent holds serves, by uid; listeners watch it for long-polls.
#[derive(Default)]
pub(crate) struct MetadataHub {
    vms: Mutex<HashMap<VmUid, watch::Sender<Served>>>,
}

impl MetadataHub {
    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<VmUid, watch::Sender<Served>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serve `metadata` for `uid` from now on; waiting long-polls answer if it changed.
    pub(crate) fn publish(&self, uid: &VmUid, metadata: &GuestMetadata) {
        let mut vms = self.vms();
        match vms.get(uid) {
            Some(sender) => {
                sender.send_if_modified(|served| {
                    if served.metadata == *metadata {
                        return false;
                    }
                    *served = Served::of(metadata.clone());
                    true
                });
            }
            None => {
                vms.insert(uid.clone(), watch::channel(Served::of(metadata.clone())).0);
            }
        }
    }

    /// The VM is gone: nothing more is served for it.
    pub(crate) fn forget(&self, uid: &VmUid) {
        self.vms().remove(uid);
    }

    /// What `uid` serves, to read and to wait on.
    pub(crate) fn watch(&self, uid: &VmUid) -> Option<watch::Receiver<Served>> {
        self.vms().get(uid).map(watch::Sender::subscribe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(hostname: &str, label: &str, user_data: Option<&str>) -> GuestMetadata {
        GuestMetadata {
            hostname: hostname.into(),
            labels: [("app".to_string(), label.to_string())].into(),
            user_data: user_data.map(str::to_string),
        }
    }

    #[test]
    fn the_version_follows_the_content_and_is_never_zero() {
        let a = Served::of(metadata("a", "x", None));
        assert_eq!(a.version, Served::of(metadata("a", "x", None)).version);
        assert_ne!(a.version, 0);
        for other in [
            metadata("b", "x", None),
            metadata("a", "y", None),
            metadata("a", "x", Some("")),
            metadata("ax", "", None),
        ] {
            assert_ne!(a.version, Served::of(other).version);
        }
        assert!(a.version < 1 << 48);
    }

    #[tokio::test]
    async fn publishing_a_change_wakes_a_watcher_and_the_same_content_does_not() {
        let hub = MetadataHub::default();
        let uid = VmUid::new("w").expect("uid");
        assert!(hub.watch(&uid).is_none());
        hub.publish(&uid, &metadata("a", "x", None));
        let mut rx = hub.watch(&uid).expect("held");
        hub.publish(&uid, &metadata("a", "x", None));
        assert!(!rx.has_changed().expect("open"));
        hub.publish(&uid, &metadata("b", "x", None));
        assert!(rx.has_changed().expect("open"));
        assert_eq!(rx.borrow_and_update().metadata.hostname, "b");
        hub.forget(&uid);
        assert!(hub.watch(&uid).is_none());
        assert!(rx.changed().await.is_err(), "a forgotten VM ends its waits");
    }
}
