//! Tap devices: deterministic names, and persistent creation through `/dev/net/tun`.
//!
//! The kernel does not create tun/tap devices over rtnetlink (its `validate` hook refuses), so
//! creation goes through the `TUNSETIFF` + `TUNSETPERSIST` ioctls, done by the maintained
//! `tun-rs` crate. A persistent tap outlives our file descriptor, so QEMU, Firecracker or
//! Cloud Hypervisor can open it by name later; everything else about the tap (bridge port,
//! up, alias, deletion) is plain netlink (`link.rs`).
//!
//! A tap a confined VMM may see is owned by that VMM's uid and gid ([`create_owned_tap`]): the
//! kernel lets any process that opens `/dev/net/tun` attach to a persistent tap that has no
//! owner and no group, so an unowned tap of a stopped VM (or of one not started yet) could be
//! taken by another tenant's VMM that got out of its sandbox, and with it that VM's MAC and
//! address. Owned, only its own VMM (or root) can attach to it.

use std::io;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Who owns a tap: the uid and gid of the VMM that may attach to it by name.
pub type TapOwner = (u32, u32);

/// Deadline for one `ip` or `nft` run.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Create the persistent tap `name` owned by `owner`, in the caller's network namespace,
/// through `ip tuntap`: `TUNSETOWNER` takes the id by value, which tun-rs passes as a pointer
/// (the owner would be an address), and the crate denies the `unsafe` a direct ioctl needs.
/// Fails on an existing tap (the kernel answers `EBUSY`): delete it first.
pub(crate) fn create_owned_tap(name: &str, (uid, gid): TapOwner) -> Result<(), String> {
    let (uid, gid) = (uid.to_string(), gid.to_string());
    run_ip(&[
        "tuntap", "add", "dev", name, "mode", "tap", "user", &uid, "group", &gid,
    ])
}

/// Run `ip` (in the caller's network namespace), within [`COMMAND_TIMEOUT`].
pub(crate) fn run_ip(args: &[&str]) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    wait_bounded(&mut child, &format!("ip {}", args.join(" ")))
}

/// Wait for `child` within [`COMMAND_TIMEOUT`]; its stderr in the error.
pub(crate) fn wait_bounded(child: &mut std::process::Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                }
                return Err(format!("{what}: {status}: {}", stderr.trim()));
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {COMMAND_TIMEOUT:?}"));
            }
            Err(e) => return Err(format!("waiting for {what}: {e}")),
        }
    }
}

/// A descriptor attached to the existing tap `name` (in the agent's network namespace), to
/// hand to a VMM that runs unprivileged: it could not attach by name itself. (tun-rs passes
/// `TUNSETOWNER` a pointer where the kernel takes the uid as the value, so owning the tap to
/// the VMM's uid is not an option through it.)
pub(crate) fn open_queue(name: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    let device = tun_rs::DeviceBuilder::new()
        .name(name)
        .layer(tun_rs::Layer::L2)
        // Up or down, as the network made it: this only opens it.
        .inherit_enable_state()
        .build_sync()?;
    device.as_fd().try_clone_to_owned()
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
