//! Address management for the node's NAT range, persisted so it survives agent restarts.
//!
//! One file per allocated address under `<state_dir>/ipam/<network>_<prefix>/<address>`, its
//! content the owner (`<uid> <interface>`), the way the CNI `host-local` plugin keeps its
//! allocations. A file appears atomically with its content (written under a temporary name,
//! then hard-linked to the final name, which fails if the name exists), so two allocators —
//! even in two processes — never hand out one address twice, and a crash never leaves an
//! ownerless half-written allocation. `last_reserved` makes allocation round-robin, so a
//! just-freed address is not reused at once while neighbours may still cache its old MAC.

use std::collections::BTreeSet;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnet::Ipv4Net;
use thiserror::Error;

const LAST_RESERVED: &str = "last_reserved";

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) uid: String,
    pub(crate) ifname: String,
}

impl Owner {
    fn encode(&self) -> String {
        format!("{} {}\n", self.uid, self.ifname)
    }

    fn decode(text: &str) -> Option<Owner> {
        let (uid, ifname) = text.trim().split_once(' ')?;
        Some(Owner {
            uid: uid.to_string(),
            ifname: ifname.to_string(),
        })
    }
}

/// Why an address cannot be used in the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeProblem {
    Outside,
    NetworkAddress,
    Broadcast,
    Gateway,
}

impl std::fmt::Display for RangeProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RangeProblem::Outside => "it is outside the node's range",
            RangeProblem::NetworkAddress => "it is the range's network address",
            RangeProblem::Broadcast => "it is the range's broadcast address",
            RangeProblem::Gateway => "it is the gateway (the bridge's own address)",
        })
    }
}

/// Errors of the allocator.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub(crate) enum IpamError {
    #[error("address {ip} cannot be used in {range}: {problem}")]
    #[strum(serialize = "AddressOutOfRange")]
    OutOfRange {
        ip: Ipv4Addr,
        range: Ipv4Net,
        problem: RangeProblem,
    },
    #[error("address {ip} is already held by VM {} interface {}", owner.uid, owner.ifname)]
    #[strum(serialize = "AddressInUse")]
    InUse { ip: Ipv4Addr, owner: Owner },
    #[error("no free address left in {range}")]
    #[strum(serialize = "RangeExhausted")]
    Exhausted { range: Ipv4Net },
    #[error("I/O on the address store {path}")]
    #[strum(serialize = "StateIoError")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The gateway of a range: its first host address, which the bridge carries.
pub(crate) fn gateway_of(range: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(range.network()).saturating_add(1))
}

/// Whether `ip` may be given to a guest in `range`.
pub(crate) fn check_assignable(range: Ipv4Net, ip: Ipv4Addr) -> Result<(), RangeProblem> {
    if !range.contains(&ip) {
        return Err(RangeProblem::Outside);
    }
    if ip == range.network() {
        return Err(RangeProblem::NetworkAddress);
    }
    if ip == range.broadcast() {
        return Err(RangeProblem::Broadcast);
    }
    if ip == gateway_of(range) {
        return Err(RangeProblem::Gateway);
    }
    Ok(())
}

/// The next free address after `last` (round-robin, wrapping), skipping the network,
/// broadcast and gateway addresses and everything in `used`.
pub(crate) fn next_free(
    range: Ipv4Net,
    used: &BTreeSet<Ipv4Addr>,
    last: Option<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    let first = u32::from(range.network());
    let last_addr = u32::from(range.broadcast());
    let size = u64::from(last_addr - first) + 1;
    let start = match last.filter(|l| range.contains(l)) {
        Some(l) => u32::from(l) - first + 1,
        None => 0,
    };
    (0..size).find_map(|step| {
        let offset = (u64::from(start) + step) % size;
        // `offset < size <= 2^32`, so it fits.
        let ip = Ipv4Addr::from(first + u32::try_from(offset).ok()?);
        (check_assignable(range, ip).is_ok() && !used.contains(&ip)).then_some(ip)
    })
}

/// An address this call reserved, and whether it is new (so a rollback frees only new ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reserved {
    pub(crate) ip: Ipv4Addr,
    pub(crate) new: bool,
}

/// The persistent allocator of one range.
#[derive(Clone, Debug)]
pub(crate) struct Ipam {
    dir: PathBuf,
    range: Ipv4Net,
}

impl Ipam {
    /// Open (creating if needed) the store of `range` under `state_dir`.
    pub(crate) fn open(state_dir: &Path, range: Ipv4Net) -> Result<Ipam, IpamError> {
        let dir =
            state_dir
                .join("ipam")
                .join(format!("{}_{}", range.network(), range.prefix_len()));
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        Ok(Ipam { dir, range })
    }

    /// Every allocation in the store.
    pub(crate) fn allocations(&self) -> Result<Vec<(Ipv4Addr, Owner)>, IpamError> {
        let entries = std::fs::read_dir(&self.dir).map_err(io_at(&self.dir))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_at(&self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    if let Some(owner) = Owner::decode(&text) {
                        out.push((ip, owner));
                    }
                }
                // Released by someone else between the listing and the read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at(&path)(e)),
            }
        }
        out.sort_by_key(|(ip, _)| *ip);
        Ok(out)
    }

    /// The address `owner` holds, if any.
    pub(crate) fn find(&self, owner: &Owner) -> Result<Option<Ipv4Addr>, IpamError> {
        Ok(self
            .allocations()?
            .into_iter()
            .find(|(_, o)| o == owner)
            .map(|(ip, _)| ip))
    }

    /// Reserve `ip` for `owner`; already holding it is fine.
    pub(crate) fn reserve(&self, ip: Ipv4Addr, owner: &Owner) -> Result<Reserved, IpamError> {
        check_assignable(self.range, ip).map_err(|problem| IpamError::OutOfRange {
            ip,
            range: self.range,
            problem,
        })?;
        if self.try_claim(ip, owner)? {
            return Ok(Reserved { ip, new: true });
        }
        let path = self.dir.join(ip.to_string());
        let current = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| Owner::decode(&t));
        match current {
            Some(o) if &o == owner => Ok(Reserved { ip, new: false }),
            Some(o) => Err(IpamError::InUse { ip, owner: o }),
            // Released in between: claim again once.
            None if self.try_claim(ip, owner)? => Ok(Reserved { ip, new: true }),
            None => Err(IpamError::InUse {
                ip,
                owner: Owner {
                    uid: "?".into(),
                    ifname: "?".into(),
                },
            }),
        }
    }

    /// Reserve the next free address for `owner`, or return the one it already holds.
    pub(crate) fn reserve_next(&self, owner: &Owner) -> Result<Reserved, IpamError> {
        let allocations = self.allocations()?;
        if let Some((ip, _)) = allocations.iter().find(|(_, o)| o == owner) {
            return Ok(Reserved {
                ip: *ip,
                new: false,
            });
        }
        let mut used: BTreeSet<Ipv4Addr> = allocations.into_iter().map(|(ip, _)| ip).collect();
        let mut last = self.last_reserved();
        loop {
            let ip = next_free(self.range, &used, last)
                .ok_or(IpamError::Exhausted { range: self.range })?;
            if self.try_claim(ip, owner)? {
                self.write_last_reserved(ip)?;
                return Ok(Reserved { ip, new: true });
            }
            // Another allocator won this address: skip it.
            used.insert(ip);
            last = Some(ip);
        }
    }

    /// Free `ip` if `owner` holds it. Returns whether something was freed.
    pub(crate) fn release(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        match std::fs::read_to_string(&path) {
            Ok(text) if Owner::decode(&text).as_ref() == Some(owner) => {
                remove_if_present(&path)?;
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Free every address of VM `uid`; returns them.
    pub(crate) fn release_uid(&self, uid: &str) -> Result<Vec<Ipv4Addr>, IpamError> {
        let mut freed = Vec::new();
        for (ip, owner) in self.allocations()? {
            if owner.uid == uid && self.release(ip, &owner)? {
                freed.push(ip);
            }
        }
        Ok(freed)
    }

    /// Atomically create the allocation file; `false` if it exists already.
    fn try_claim(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool, IpamError> {
        let path = self.dir.join(ip.to_string());
        let tmp = unique_tmp(&self.dir);
        write_synced(&tmp, owner.encode().as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        remove_if_present(&tmp)?;
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    fn last_reserved(&self) -> Option<Ipv4Addr> {
        std::fs::read_to_string(self.dir.join(LAST_RESERVED))
            .ok()
            .and_then(|t| t.trim().parse().ok())
    }

    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let path = self.dir.join(LAST_RESERVED);
        crate::agent::atomic_file::write_atomically(&path, ip.to_string().as_bytes())
            .map_err(io_at(&path))
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A temporary name that no allocation file can have (it does not parse as an address).
fn unique_tmp(dir: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    dir.join(format!(".tmp.{}.{n}", std::process::id()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), IpamError> {
    let result = (|| {
        let mut f = std::fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(io_at(path))
}

fn remove_if_present(path: &Path) -> Result<(), IpamError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test cidr")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test ip")
    }

    fn owner(uid: &str) -> Owner {
        Owner {
            uid: uid.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn assignable_excludes_network_broadcast_gateway_and_outside() {
        let r = net("10.88.0.0/16");
        assert_eq!(gateway_of(r), ip("10.88.0.1"));
        assert_eq!(check_assignable(r, ip("10.88.0.2")), Ok(()));
        assert_eq!(check_assignable(r, ip("10.88.255.254")), Ok(()));
        assert_eq!(
            check_assignable(r, ip("10.88.0.0")),
            Err(RangeProblem::NetworkAddress)
        );
        assert_eq!(
            check_assignable(r, ip("10.88.0.1")),
            Err(RangeProblem::Gateway)
        );
        assert_eq!(
            check_assignable(r, ip("10.88.255.255")),
            Err(RangeProblem::Broadcast)
        );
        assert_eq!(
            check_assignable(r, ip("10.89.0.2")),
            Err(RangeProblem::Outside)
        );
    }

    #[test]
    fn next_free_is_round_robin_and_wraps() {
        let r = net("192.168.7.0/29"); // hosts .2 ... .6 (.1 is the gateway)
        let mut used = BTreeSet::new();
        assert_eq!(next_free(r, &used, None), Some(ip("192.168.7.2")));
        assert_eq!(
            next_free(r, &used, Some(ip("192.168.7.2"))),
            Some(ip("192.168.7.3"))
        );
        assert_eq!(
            next_free(r, &used, Some(ip("192.168.7.6"))),
            Some(ip("192.168.7.2"))
        );
        used.extend([ip("192.168.7.2"), ip("192.168.7.3")]);
        assert_eq!(
            next_free(r, &used, Some(ip("192.168.7.6"))),
            Some(ip("192.168.7.4"))
        );
        used.extend([ip("192.168.7.4"), ip("192.168.7.5"), ip("192.168.7.6")]);
        assert_eq!(next_free(r, &used, None), None);
        // A `last` from another range is ignored.
        assert_eq!(
            next_free(r, &BTreeSet::new(), Some(ip("10.0.0.9"))),
            Some(ip("192.168.7.2"))
        );
    }

    #[test]
    fn store_never_hands_out_twice_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = net("10.1.0.0/29");
        let ipam = Ipam::open(dir.path(), r).expect("open");
        let a = ipam.reserve_next(&owner("a")).expect("a");
        assert_eq!(
            a,
            Reserved {
                ip: ip("10.1.0.2"),
                new: true
            }
        );
        // Idempotent for the same owner.
        assert_eq!(
            ipam.reserve_next(&owner("a")).expect("a again"),
            Reserved {
                ip: a.ip,
                new: false
            }
        );
        let b = ipam.reserve_next(&owner("b")).expect("b");
        assert_eq!(b.ip, ip("10.1.0.3"));
        assert!(matches!(
            ipam.reserve(a.ip, &owner("c")),
            Err(IpamError::InUse { owner, .. }) if owner.uid == "a"
        ));
        assert!(matches!(
            ipam.reserve(ip("10.1.0.1"), &owner("c")),
            Err(IpamError::OutOfRange {
                problem: RangeProblem::Gateway,
                ..
            })
        ));

        let reopened = Ipam::open(dir.path(), r).expect("reopen");
        assert_eq!(reopened.find(&owner("a")).expect("find"), Some(a.ip));
        // Round-robin continues after the restart: .4, not the lowest free.
        assert!(reopened.release(a.ip, &owner("a")).expect("release"));
        assert!(!reopened.release(a.ip, &owner("a")).expect("release twice"));
        assert_eq!(
            reopened.reserve_next(&owner("c")).expect("c").ip,
            ip("10.1.0.4")
        );
        assert!(!reopened.release(b.ip, &owner("x")).expect("not the owner"));
    }

    #[test]
    fn exhaustion_and_release_uid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = net("10.2.0.0/30"); // one host address: .2
        let ipam = Ipam::open(dir.path(), r).expect("open");
        let got = ipam.reserve_next(&owner("a")).expect("a");
        assert_eq!(got.ip, ip("10.2.0.2"));
        let err = ipam.reserve_next(&owner("b")).expect_err("exhausted");
        assert_eq!(err.reason(), "RangeExhausted");
        assert_eq!(ipam.release_uid("a").expect("release"), vec![got.ip]);
        assert!(ipam.allocations().expect("list").is_empty());
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("ipam/10.2.0.0_30"))
            .expect("dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(names, vec![LAST_RESERVED.to_string()]);
    }
}
