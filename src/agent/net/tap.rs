//! Tap devices: deterministic names, and persistent creation through `/dev/net/tun`.
//!
//! The kernel does not create tun/tap devices over rtnetlink (its `validate` hook refuses), so
//! creation goes through the `TUNSETIFF` + `TUNSETPERSIST` ioctls, done by the maintained
//! `tun-rs` crate. A persistent tap outlives our file descriptor, so QEMU, Firecracker or
//! Cloud Hypervisor can open it by name later; everything else about the tap (bridge port,
//! up, alias, deletion) is plain netlink (`link.rs`).

use std::io;

use sha2::{Digest, Sha256};

/// Every tap Ignis creates starts with this.
pub(crate) const TAP_PREFIX: &str = "ig";
/// Hex characters of the hash after the prefix: `ig` + 11 = 13, under IFNAMSIZ-1 (15).
const TAP_HASH_CHARS: usize = 11;

/// The tap of interface `ifname` of VM `uid`. Deterministic, so a restarted agent finds it.
pub fn tap_name(uid: &str, ifname: &str) -> String {
    let digest = hex::encode(Sha256::digest(
        format!("ignis-tap/{uid}/{ifname}").as_bytes(),
    ));
    format!("{TAP_PREFIX}{}", &digest[..TAP_HASH_CHARS])
}

/// Whether a link name has the shape of an Ignis tap.
pub(crate) fn looks_like_tap_name(name: &str) -> bool {
    name.len() == TAP_PREFIX.len() + TAP_HASH_CHARS
        && name.starts_with(TAP_PREFIX)
        && name[TAP_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Create the tap `name` (or attach to it if it exists) and make it persistent. The device is
/// left down; the caller brings it up once it is a bridge port.
pub(crate) fn create_persistent_tap(name: &str) -> io::Result<()> {
    let device = tun_rs::DeviceBuilder::new()
        .name(name)
        .layer(tun_rs::Layer::L2)
        .enable(false)
        .build_sync()?;
    device.persist()
    // Dropping `device` closes our descriptor; the persistent tap stays.
}

/// Give the existing tap `name` to `uid`/`gid` (`TUNSETOWNER`, `TUNSETGROUP`), so an
/// unprivileged VMM running as them may attach to it, and nobody else but root may.
pub(crate) fn set_owner(name: &str, uid: u32, gid: u32) -> io::Result<()> {
    let to_int = |id: u32| {
        i32::try_from(id).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "id too large"))
    };
    let device = tun_rs::DeviceBuilder::new()
        .name(name)
        .layer(tun_rs::Layer::L2)
        // Up or down, as the network made it: this only changes the owner.
        .inherit_enable_state()
        .build_sync()?;
    device.user(to_int(uid)?)?;
    device.group(to_int(gid)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz_and_are_stable() {
        let a = tap_name("6f1c2f7e-0000-4000-8000-000000000001", "eth0");
        assert_eq!(a.len(), 13);
        assert!(a.len() <= 15);
        assert!(looks_like_tap_name(&a));
        assert_eq!(a, tap_name("6f1c2f7e-0000-4000-8000-000000000001", "eth0"));
        assert_ne!(a, tap_name("6f1c2f7e-0000-4000-8000-000000000001", "eth1"));
    }

    #[test]
    fn tap_name_shape() {
        assert!(!looks_like_tap_name("ignis0"));
        assert!(!looks_like_tap_name("ig0123456789"));
        assert!(!looks_like_tap_name("ig0123456789ag"));
        assert!(!looks_like_tap_name("eth0123456789a"));
        assert!(looks_like_tap_name("ig0123456789a"));
    }
}
