//! Guest networking: a tap per guest interface, on the node's bridge with an address from the
//! node's range and outbound NAT (`nat`), on a bridge the user names (`bridge`), or nothing
//! (`none`). See docs/networking.md.
//!
//! The kernel does the work: the bridge, taps and addresses through rtnetlink (`link.rs`),
//! taps created persistent through `/dev/net/tun` (`tap.rs`), NAT in an nftables table of our
//! own (`nat.rs`). Addresses are allocated from files under the state directory (`ipam.rs`),
//! and every VM's interfaces are recorded in `<state_dir>/vms/<uid>.json` *before* anything
//! is created, so a crash part-way leaves a record that `detach`/`garbage_collect` finish.
//! [`NetworkManager::attach`] undoes what it created when it fails part-way.
//!
//! Guests configure themselves the standard ways: DHCP from a dnsmasq the manager runs on the
//! node bridge ([`dhcp`]), which answers each `nat` interface's MAC with the address IPAM gave
//! it, the gateway and DNS; or the kernel's `ip=` parameter ([`kernel_cmdline`]).

mod config;
pub mod dhcp;
mod error;
pub(crate) mod guard;
pub(crate) mod ipam;
pub(crate) mod link;
pub mod mac;
pub(crate) mod nat;
mod plan;
pub(crate) mod pod;
pub mod tap;

pub(crate) use config::NetworkArgs;
pub use config::NetworkConfig;
pub use error::NetError;
pub use guard::GuestAccess;
use plan::Planned;

use std::collections::BTreeSet;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::agent::vmm::NetConfig;
use crate::error::ErrorReason;
use crate::vm::VmUid;
use ipam::{Ipam, Owner};
use link::{Link, Netlink};
use mac::Mac;

/// The node bridge's default name.
pub(crate) const DEFAULT_BRIDGE: &str = "ignis0";
/// The node's default guest range.
pub(crate) const DEFAULT_CIDR: &str = "10.88.0.0/16";
/// Taps carry `ignis:<uid>/<interface>` as their alias, so leftovers can be found after a
/// crash even without a record.
const ALIAS_PREFIX: &str = "ignis:";
const IFNAMSIZ_MAX: usize = 15;
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Where dnsmasq's hosts files live.
const DHCP_RUN_DIR: &str = "/run/ignis";

/// The interface modes of the MicroVM spec (`nat`, `bridge`, `none`).
pub use crate::api::InterfaceMode;
/// One interface of a VM as asked for.
pub use crate::vm::Interface;

/// An interface as attached: what the VMM and the guest need, and what status shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedInterface {
    pub(crate) name: String,
    pub(crate) mode: InterfaceMode,
    /// The host tap the VMM opens.
    pub tap: String,
    pub mac: String,
    /// The bridge the tap is a port of.
    pub bridge: String,
    /// The guest's address and prefix length.
    pub address: Option<(Ipv4Addr, u8)>,
    /// The guest's default gateway.
    pub gateway: Option<Ipv4Addr>,
    /// DNS servers for the guest (the gateway, where the node's dnsmasq answers).
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Where the guest is reached from outside when that is not its own address (mode `pod`:
    /// the pod IP, which the pod's namespace forwards to the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reachable_at: Option<Ipv4Addr>,
}

impl AttachedInterface {
    /// The backend-neutral VMM view of this interface.
    pub fn net_config(&self) -> NetConfig {
        NetConfig {
            id: self.name.clone(),
            tap: self.tap.clone(),
            mac: self.mac.clone(),
        }
    }
}

/// The kernel's standard `ip=` parameter for the first addressed interface
/// (`ip=10.88.0.5::10.88.0.1:255.255.0.0:web:eth0:off:10.88.0.1`), for guests that configure
/// themselves from the command line; empty if no interface has an address.
pub fn kernel_cmdline(interfaces: &[AttachedInterface], hostname: &str) -> String {
    interfaces
        .iter()
        .find_map(|i| {
            let (ip, prefix) = i.address?;
            Some(dhcp::kernel_ip_param(
                ip, prefix, i.gateway, hostname, &i.name, &i.dns,
            ))
        })
        .unwrap_or_default()
}

/// The guest addresses for `status.ipAddresses`.
pub(crate) fn ip_addresses(interfaces: &[AttachedInterface]) -> Vec<String> {
    interfaces
        .iter()
        .filter_map(|i| i.reachable_at.or(i.address.map(|(ip, _)| ip)))
        .map(|ip| ip.to_string())
        .collect()
}

/// What `garbage_collect` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub taps: Vec<String>,
    pub addresses: Vec<Ipv4Addr>,
    pub(crate) records: Vec<String>,
}

/// Names we put into file names, netlink aliases and the address store.
fn is_safe_token(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s != "."
        && s != ".."
}

/// The per-VM record: what `detach` and `garbage_collect` remove.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct VmRecord {
    uid: String,
    interfaces: Vec<AttachedInterface>,
}

/// What an `attach` created, so a failure can undo exactly that.
#[derive(Default)]
struct Undo {
    addresses: Vec<(Ipv4Addr, Owner)>,
    taps: Vec<String>,
    /// Allocations replaced by this attach, released only when it succeeds.
    superseded: Vec<(Ipv4Addr, Owner)>,
}

/// The node's guest networking. One per agent.
pub struct NetworkManager {
    config: NetworkConfig,
    netlink: Netlink,
    ipam: Ipam,
    /// dnsmasq on the bridge; `None` when turned off or when it cannot run here (guests then
    /// have `ip=` only, and the agent's log says why).
    dhcp: std::sync::Mutex<Option<dhcp::DhcpServer>>,
    /// Serializes attach/detach/gc: each one reads, decides and writes node-wide state.
    lock: Mutex<()>,
}

impl NetworkManager {
    /// Make sure the node is ready for guests: the bridge exists, carries the gateway address
    /// and is up; IPv4 forwarding is on; outbound NAT for the range is installed. Idempotent.
    pub async fn new(config: NetworkConfig) -> Result<NetworkManager, NetError> {
        let config = NetworkConfig {
            cidr: config.cidr.trunc(),
            ..config
        };
        if !is_safe_token(&config.bridge, IFNAMSIZ_MAX) {
            return Err(NetError::InvalidConfig {
                detail: format!(
                    "bridge name {:?} must be 1-15 letters, digits, '-', '_' or '.'",
                    config.bridge
                ),
            });
        }
        if config.cidr.prefix_len() > 30 {
            return Err(NetError::InvalidConfig {
                detail: format!("range {} leaves no address for guests", config.cidr),
            });
        }
        let vms = config.state_dir.join("vms");
        std::fs::create_dir_all(&vms).map_err(|source| NetError::State {
            path: vms.clone(),
            source,
        })?;
        let ipam =
            Ipam::open(&config.state_dir, config.cidr).map_err(|e| NetError::from_ipam("-", e))?;
        let netlink = Netlink::connect()?;

        let bridge = match netlink.link(&config.bridge).await? {
            Some(link) => link,
            None => {
                netlink
                    .create_bridge(&config.bridge, Mac::derive_host(&config.bridge))
                    .await?;
                netlink
                    .link(&config.bridge)
                    .await?
                    .ok_or_else(|| NetError::BridgeNotFound {
                        interface: "-".into(),
                        bridge: config.bridge.clone(),
                    })?
            }
        };
        if !bridge.is_bridge() {
            return Err(NetError::NotABridge {
                interface: "-".into(),
                name: config.bridge.clone(),
            });
        }
        let gateway = config.gateway();
        let prefix = config.cidr.prefix_len();
        if !netlink
            .ipv4_addresses(bridge.index)
            .await?
            .contains(&(gateway, prefix))
        {
            netlink.add_address(bridge.index, gateway, prefix).await?;
        }
        if !bridge.up {
            netlink.set_up(bridge.index).await?;
        }
        enable_ip_forward()?;
        nat::ensure(config.cidr, &config.bridge, &config.guest_access)
            .await
            .map_err(NetError::Nat)?;
        let dhcp = if config.dhcp {
            let run_dir = Path::new(DHCP_RUN_DIR);
            if let Err(error) = std::fs::create_dir_all(run_dir).and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o755))
            }) {
                tracing::warn!(dir = %run_dir.display(), %error, "cannot prepare the DHCP directory");
            }
            match dhcp::DhcpServer::start(dhcp_config(&config)).await {
                Ok(server) => Some(server),
                Err(error) => {
                    tracing::warn!(bridge = %config.bridge, reason = error.reason(), error = %crate::error::chain(&error), "no DHCP on the bridge: guests get their address from ip= only");
                    None
                }
            }
        } else {
            None
        };
        let manager = NetworkManager {
            config,
            netlink,
            ipam,
            dhcp: std::sync::Mutex::new(dhcp),
            lock: Mutex::new(()),
        };
        // dnsmasq's hosts follow the records: what an earlier agent attached is served again.
        manager.sync_records().await?;
        Ok(manager)
    }

    fn dhcp(&self) -> std::sync::MutexGuard<'_, Option<dhcp::DhcpServer>> {
        self.dhcp.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether dnsmasq serves the bridge.
    pub fn dhcp_running(&self) -> bool {
        self.dhcp().is_some()
    }

    /// DHCP hosts and anti-spoofing rules follow the records.
    async fn sync_records(&self) -> Result<(), NetError> {
        let records = self.records()?;
        self.sync_dhcp(&records)?;
        let taps = guard::identities(records.iter().flat_map(|r| r.interfaces.iter()));
        nat::apply("guard", &guard::guard_batch(&taps))
            .await
            .map_err(NetError::Nat)
    }

    /// Serve exactly the `nat` interfaces of `records` by DHCP.
    fn sync_dhcp(&self, records: &[VmRecord]) -> Result<(), NetError> {
        let dhcp = self.dhcp();
        let Some(server) = dhcp.as_ref() else {
            return Ok(());
        };
        let hosts = records
            .iter()
            .flat_map(|r| r.interfaces.iter())
            .filter(|i| i.mode == InterfaceMode::Nat)
            .filter_map(|i| {
                Some(dhcp::DhcpHost {
                    mac: i.mac.parse().ok()?,
                    ip: i.address?.0,
                    hostname: None,
                })
            })
            .collect();
        server.set_hosts(hosts).map_err(NetError::Dhcp)
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// Create the taps of VM `uid` and give its `nat` interfaces addresses. Idempotent: a
    /// second call with the same request returns the same interfaces. On failure nothing this
    /// call created is left behind.
    /// `tap_owner`: the VMM's uid and gid when it runs confined, which then own its taps (see
    /// [`tap`]'s module doc); `None` for a VMM that runs as root.
    pub async fn attach(
        &self,
        uid: &VmUid,
        requests: &[Interface],
        tap_owner: Option<tap::TapOwner>,
    ) -> Result<Vec<AttachedInterface>, NetError> {
        let _guard = self.lock.lock().await;
        let uid = uid.as_str();
        let previous = self.read_record(uid)?;
        let links = self.netlink.links().await?;
        let plan = self.plan(uid, requests, &links)?;

        let mut undo = Undo::default();
        let result = self.apply_plan(uid, &plan, tap_owner, &mut undo).await;
        match result {
            Ok(attached) => {
                for (ip, who) in &undo.superseded {
                    self.ipam
                        .release(*ip, who)
                        .map_err(|e| NetError::from_ipam(&who.ifname, e))?;
                }
                self.sync_records().await?;
                // Interfaces the VM had before but no longer asks for.
                if let Some(prev) = previous {
                    for old in prev
                        .interfaces
                        .iter()
                        .filter(|o| !attached.iter().any(|a| a.name == o.name))
                    {
                        self.netlink.delete_by_name(&old.tap).await?;
                        if let Some((ip, _)) =
                            old.address.filter(|_| old.mode == InterfaceMode::Nat)
                        {
                            self.ipam
                                .release(ip, &owner(uid, &old.name))
                                .map_err(|e| NetError::from_ipam(&old.name, e))?;
                        }
                    }
                }
                Ok(attached)
            }
            Err(e) => {
                self.rollback(undo).await;
                let restored = match &previous {
                    Some(prev) => self.write_record(prev),
                    None => self.remove_record(uid),
                };
                if let Err(re) = restored {
                    tracing::warn!(uid, error = %re, "restoring the VM's network record failed");
                }
                Err(e)
            }
        }
    }

    async fn apply_plan(
        &self,
        uid: &str,
        plan: &[Planned],
        tap_owner: Option<tap::TapOwner>,
        undo: &mut Undo,
    ) -> Result<Vec<AttachedInterface>, NetError> {
        let mut attached = Vec::with_capacity(plan.len());
        for p in plan {
            let name = &p.request.name;
            let (address, gateway) = match p.request.mode {
                InterfaceMode::Nat => {
                    let who = owner(uid, name);
                    let reserved = match p.address {
                        Some((ip, _)) => self.ipam.reserve(ip, &who),
                        None => match self.ipam.find(&who) {
                            Ok(Some(ip)) => self.ipam.reserve(ip, &who),
                            Ok(None) => self.ipam.reserve_next(&who),
                            Err(e) => Err(e),
                        },
                    }
                    .map_err(|e| NetError::from_ipam(name, e))?;
                    if reserved.new {
                        undo.addresses.push((reserved.ip, who.clone()));
                    }
                    // A changed spec address: the old allocation goes, but only once the
                    // whole attach has succeeded (a rollback must find it still held).
                    undo.superseded.extend(
                        self.ipam
                            .allocations()
                            .map_err(|e| NetError::from_ipam(name, e))?
                            .into_iter()
                            .filter(|(ip, o)| o == &who && *ip != reserved.ip),
                    );
                    (
                        Some((reserved.ip, self.config.cidr.prefix_len())),
                        Some(self.config.gateway()),
                    )
                }
                _ => (p.address, None),
            };
            // dnsmasq answers DNS on the gateway; without it the guest is told no server.
            let dns = if p.request.mode == InterfaceMode::Nat && self.dhcp_running() {
                vec![self.config.gateway()]
            } else {
                Vec::new()
            };
            attached.push(AttachedInterface {
                name: name.clone(),
                mode: p.request.mode,
                tap: p.tap.clone(),
                mac: p.mac.to_string(),
                bridge: p.bridge.clone(),
                address,
                gateway,
                dns,
                reachable_at: None,
            });
        }
        // Recorded before any tap exists: a crash from here on leaves a record to clean up.
        self.write_record(&VmRecord {
            uid: uid.to_string(),
            interfaces: attached.clone(),
        })?;
        for iface in &attached {
            let bridge = match self.netlink.link(&iface.bridge).await? {
                Some(b) if b.is_bridge() => b,
                Some(_) => {
                    return Err(NetError::NotABridge {
                        interface: iface.name.clone(),
                        name: iface.bridge.clone(),
                    });
                }
                None => {
                    return Err(NetError::BridgeNotFound {
                        interface: iface.name.clone(),
                        bridge: iface.bridge.clone(),
                    });
                }
            };
            self.make_tap(&iface.tap, tap_owner, undo).await?;
            let tap_link = self
                .netlink
                .link(&iface.tap)
                .await?
                .filter(Link::is_tun)
                .ok_or_else(|| NetError::Tap {
                    tap: iface.tap.clone(),
                    source: io::Error::other("the name is taken by a link that is not a tap"),
                })?;
            self.netlink
                .enslave_up(tap_link.index, bridge.index, &tap_alias(uid, &iface.name))
                .await?;
        }
        Ok(attached)
    }

    /// The VM's tap, made when missing. An owned one is made anew each run: the one an earlier
    /// run (or an older agent) left may have another owner or none, and the kernel cannot
    /// change the owner of an existing tap; its VMM is gone by now.
    async fn make_tap(
        &self,
        name: &str,
        owner: Option<tap::TapOwner>,
        undo: &mut Undo,
    ) -> Result<(), NetError> {
        let tap_error = |source| NetError::Tap {
            tap: name.to_string(),
            source,
        };
        let existing = self.netlink.link(name).await?;
        match owner {
            None if existing.is_some() => return Ok(()),
            None => tap::create_persistent_tap(name).map_err(tap_error)?,
            Some(owner) => {
                if existing.is_some() {
                    self.netlink.delete_by_name(name).await?;
                }
                tap::create_owned_tap(name, owner)
                    .map_err(|detail| tap_error(io::Error::other(detail)))?;
            }
        }
        undo.taps.push(name.to_string());
        Ok(())
    }

    async fn rollback(&self, undo: Undo) {
        for tap in undo.taps.iter().rev() {
            if let Err(e) = self.netlink.delete_by_name(tap).await {
                tracing::warn!(tap, error = %e, "rollback: deleting a tap failed");
            }
        }
        for (ip, who) in undo.addresses.iter().rev() {
            if let Err(e) = self.ipam.release(*ip, who) {
                tracing::warn!(%ip, error = %e, "rollback: releasing an address failed");
            }
        }
    }

    /// The interfaces recorded for VM `uid` (after an agent restart, for re-adopted VMs).
    pub async fn attached(&self, uid: &VmUid) -> Result<Option<Vec<AttachedInterface>>, NetError> {
        Ok(self.read_record(uid.as_str())?.map(|r| r.interfaces))
    }

    /// Remove VM `uid`'s taps and free its addresses. Idempotent; finds leftovers of a crashed
    /// attach through the record and the taps' aliases.
    pub async fn detach(&self, uid: &VmUid) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        self.detach_locked(uid.as_str(), &self.netlink.links().await?)
            .await
    }

    async fn detach_locked(&self, uid: &str, links: &[Link]) -> Result<(), NetError> {
        let mut taps: BTreeSet<String> = BTreeSet::new();
        if let Some(record) = self.read_record(uid)? {
            taps.extend(record.interfaces.into_iter().map(|i| i.tap));
        }
        taps.extend(
            links
                .iter()
                .filter(|l| l.is_tun() && alias_uid(l.alias.as_deref()) == Some(uid))
                .map(|l| l.name.clone()),
        );
        for tap in &taps {
            self.netlink.delete_by_name(tap).await?;
        }
        self.ipam
            .release_uid(uid)
            .map_err(|e| NetError::from_ipam("-", e))?;
        self.remove_record(uid)?;
        self.sync_records().await
    }

    /// Remove the taps, addresses and records of every VM not in `live` (call at agent start,
    /// after re-adoption). Taps with an Ignis name but no alias (a crash between creation and
    /// configuration) are removed too unless a live VM's record names them.
    pub async fn garbage_collect(&self, live: &BTreeSet<String>) -> Result<GcReport, NetError> {
        let _guard = self.lock.lock().await;
        let mut report = GcReport::default();
        let records = self.records()?;
        let live_taps: BTreeSet<String> = records
            .iter()
            .filter(|r| live.contains(&r.uid))
            .flat_map(|r| r.interfaces.iter().map(|i| i.tap.clone()))
            .collect();
        for record in records.iter().filter(|r| !live.contains(&r.uid)) {
            for iface in &record.interfaces {
                if self.netlink.delete_by_name(&iface.tap).await? {
                    report.taps.push(iface.tap.clone());
                }
            }
            self.remove_record(&record.uid)?;
            report.records.push(record.uid.clone());
        }
        for link in self.netlink.links().await? {
            if !link.is_tun() || live_taps.contains(&link.name) {
                continue;
            }
            let orphan = match alias_uid(link.alias.as_deref()) {
                Some(uid) => !live.contains(uid),
                None => tap::looks_like_tap_name(&link.name) && link.alias.is_none(),
            };
            if orphan {
                self.netlink.delete(link.index).await?;
                report.taps.push(link.name.clone());
            }
        }
        for (ip, who) in self
            .ipam
            .allocations()
            .map_err(|e| NetError::from_ipam("-", e))?
        {
            if !live.contains(&who.uid)
                && self
                    .ipam
                    .release(ip, &who)
                    .map_err(|e| NetError::from_ipam("-", e))?
            {
                report.addresses.push(ip);
            }
        }
        report.taps.sort();
        report.taps.dedup();
        self.sync_records().await?;
        Ok(report)
    }

    /// Remove the node-wide setup: the NAT table and the node bridge. For uninstall and tests;
    /// VMs' taps should be detached first.
    pub async fn teardown(self) -> Result<(), NetError> {
        self.shutdown().await;
        nat::teardown().await.map_err(NetError::Nat)?;
        self.netlink.delete_by_name(&self.config.bridge).await?;
        Ok(())
    }

    /// Stop dnsmasq (agent shutdown); guests keep their leases, and the next agent serves them
    /// again. Idempotent.
    pub async fn shutdown(&self) {
        let server = self.dhcp().take();
        if let Some(server) = server {
            server.shutdown().await;
        }
    }

    /// Whether no VM holds an attachment (no record left).
    pub fn is_idle(&self) -> Result<bool, NetError> {
        Ok(self.records()?.is_empty())
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.config
            .state_dir
            .join("vms")
            .join(format!("{uid}.json"))
    }

    /// The VM whose `nat` interface has address `ip`: who calls the metadata channel from
    /// it (the anti-spoofing rules let only that VM's tap send from it).
    pub(crate) fn nat_owner(&self, ip: Ipv4Addr) -> Option<VmUid> {
        let records = self.records().ok()?;
        let record = records.into_iter().find(|r| {
            r.interfaces
                .iter()
                .any(|i| i.mode == InterfaceMode::Nat && i.address.map(|(a, _)| a) == Some(ip))
        })?;
        VmUid::new(record.uid).ok()
    }

    fn read_record(&self, uid: &str) -> Result<Option<VmRecord>, NetError> {
        read_record_file(&self.record_path(uid))
    }

    fn records(&self) -> Result<Vec<VmRecord>, NetError> {
        let dir = self.config.state_dir.join("vms");
        let entries = std::fs::read_dir(&dir).map_err(|source| NetError::State {
            path: dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some("json")
                && let Some(record) = read_record_file(&path)?
            {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn write_record(&self, record: &VmRecord) -> Result<(), NetError> {
        let path = self.record_path(&record.uid);
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| NetError::State {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        crate::agent::atomic_file::write_atomically(&path, &bytes)
            .map_err(|source| NetError::State { path, source })
    }

    fn remove_record(&self, uid: &str) -> Result<(), NetError> {
        let path = self.record_path(uid);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetError::State { path, source }),
        }
    }
}

/// dnsmasq's settings for the bridge. Its hosts file lives under `/run/ignis` (world-readable
/// parents: dnsmasq drops root and re-reads it as nobody), one directory per bridge and state
/// directory; it is rebuilt from the records at every start.
fn dhcp_config(config: &NetworkConfig) -> dhcp::DhcpConfig {
    use sha2::Digest;
    let key =
        hex::encode(&sha2::Sha256::digest(config.state_dir.as_os_str().as_encoded_bytes())[..4]);
    dhcp::DhcpConfig::new(
        &config.bridge,
        config.cidr,
        config.gateway(),
        Path::new(DHCP_RUN_DIR).join(format!("dhcp-{}-{key}", config.bridge)),
    )
}

fn owner(uid: &str, ifname: &str) -> Owner {
    Owner {
        uid: uid.to_string(),
        ifname: ifname.to_string(),
    }
}

/// The alias a tap carries: `ignis:<uid>/<interface>`.
pub(crate) fn tap_alias(uid: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}{uid}/{ifname}")
}

/// The VM uid in a tap's alias, if the alias is ours.
pub(crate) fn alias_uid(alias: Option<&str>) -> Option<&str> {
    alias?
        .strip_prefix(ALIAS_PREFIX)?
        .split_once('/')
        .map(|(uid, _)| uid)
}

fn read_record_file(path: &Path) -> Result<Option<VmRecord>, NetError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| NetError::State {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NetError::State {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn enable_ip_forward() -> Result<(), NetError> {
    let path = Path::new(IP_FORWARD);
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(path, b"1").map_err(|source| NetError::Sysctl {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests;
