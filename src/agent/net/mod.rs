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

pub mod ipam;
pub mod link;
pub mod mac;
pub mod nat;
pub mod tap;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Mutex;

use crate::agent::vmm::NetConfig;
use ipam::{Ipam, IpamError, Owner, RangeProblem};
use link::{Link, LinkError, Netlink};
use mac::{Mac, MacProblem};
use nat::NatError;

/// The node bridge's default name.
pub const DEFAULT_BRIDGE: &str = "ignis0";
/// The node's default guest range.
pub const DEFAULT_CIDR: &str = "10.88.0.0/16";
/// Taps carry `ignis:<uid>/<interface>` as their alias, so leftovers can be found after a
/// crash even without a record.
const ALIAS_PREFIX: &str = "ignis:";
const IFNAMSIZ_MAX: usize = 15;
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Per-node network settings (agent flags `--bridge`, `--cidr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The node bridge for `nat` interfaces; created if missing.
    pub bridge: String,
    /// The guests' range; the bridge carries its first address as the guests' gateway.
    pub cidr: Ipv4Net,
    /// Where allocations and per-VM records are kept (survives agent restarts).
    pub state_dir: PathBuf,
}

impl NetworkConfig {
    /// The defaults (`ignis0`, `10.88.0.0/16`) with state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> NetworkConfig {
        NetworkConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            cidr: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap_or_default(),
            state_dir: state_dir.into(),
        }
    }

    /// The guests' gateway: the first address of the range, carried by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        ipam::gateway_of(self.cidr.trunc())
    }
}

/// The agent's network flags; flatten into `AgentArgs` with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct NetworkArgs {
    /// Node bridge that `nat` interfaces' taps attach to (created if missing).
    #[arg(long = "bridge", env = "IGNIS_BRIDGE", default_value = DEFAULT_BRIDGE)]
    pub bridge: String,
    /// Range guests' `nat` addresses come from; the bridge gets its first address.
    #[arg(long = "cidr", env = "IGNIS_CIDR", default_value = DEFAULT_CIDR)]
    pub cidr: Ipv4Net,
}

impl NetworkArgs {
    /// The configuration, with state under `<agent state dir>/net`.
    pub fn config(&self, agent_state_dir: &Path) -> NetworkConfig {
        NetworkConfig {
            bridge: self.bridge.clone(),
            cidr: self.cidr,
            state_dir: agent_state_dir.join("net"),
        }
    }
}

/// The interface modes of the MicroVM spec (`nat`, `bridge`, `none`).
pub use crate::api::InterfaceMode;

impl std::str::FromStr for InterfaceMode {
    type Err = NetError;

    /// The proto's and CRD's words; empty means the default, `nat`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "nat" => Ok(InterfaceMode::Nat),
            "bridge" => Ok(InterfaceMode::Bridge),
            "none" => Ok(InterfaceMode::None),
            other => Err(NetError::InvalidRequest {
                detail: format!("unknown interface mode {other:?} (nat, bridge or none)"),
            }),
        }
    }
}

/// One interface of a MicroVM spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceRequest {
    /// Guest-side name (`eth0`).
    pub name: String,
    pub mode: InterfaceMode,
    /// `bridge` mode only: the existing bridge to attach to.
    pub bridge: Option<String>,
    /// `nat`: an address in the node's range (`10.88.0.9` or `10.88.0.9/16`), else one is
    /// allocated. `bridge`: `a.b.c.d/prefix` handed to the guest as is.
    pub address: Option<String>,
    /// A unicast MAC; else one derived from the VM uid and interface name.
    pub mac: Option<String>,
}

/// An interface as attached: what the VMM and the guest need, and what status shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedInterface {
    pub name: String,
    pub mode: InterfaceMode,
    /// The host tap the VMM opens.
    pub tap: String,
    pub mac: String,
    /// The bridge the tap is a port of.
    pub bridge: String,
    /// The guest's address and prefix length.
    pub address: Option<(Ipv4Addr, u8)>,
    /// The guest's default gateway.
    pub gateway: Option<Ipv4Addr>,
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

/// The guest kernel command line fragment that configures the first addressed interface
/// (`ignis.ip=10.88.0.5/16 ignis.gw=10.88.0.1`); empty if no interface has an address.
pub fn kernel_cmdline(interfaces: &[AttachedInterface]) -> String {
    let Some(iface) = interfaces.iter().find(|i| i.address.is_some()) else {
        return String::new();
    };
    let mut out = String::new();
    if let Some((ip, prefix)) = iface.address {
        out.push_str(&format!("ignis.ip={ip}/{prefix}"));
    }
    if let Some(gw) = iface.gateway {
        out.push_str(&format!(" ignis.gw={gw}"));
    }
    out
}

/// The guest addresses for `status.ipAddresses`.
pub fn ip_addresses(interfaces: &[AttachedInterface]) -> Vec<String> {
    interfaces
        .iter()
        .filter_map(|i| i.address.map(|(ip, _)| ip.to_string()))
        .collect()
}

/// What `garbage_collect` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub taps: Vec<String>,
    pub addresses: Vec<Ipv4Addr>,
    pub records: Vec<String>,
}

/// Errors of guest networking. `reason()` is the word shown on the VM's status.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum NetError {
    #[error("invalid network configuration: {detail}")]
    #[strum(serialize = "InvalidNetworkConfig")]
    InvalidConfig { detail: String },
    #[error("invalid interface request: {detail}")]
    #[strum(serialize = "InvalidInterface")]
    InvalidRequest { detail: String },
    #[error("interface {interface}: bridge {bridge} does not exist on this node")]
    BridgeNotFound { interface: String, bridge: String },
    #[error("interface {interface}: {name} exists but is not a bridge")]
    NotABridge { interface: String, name: String },
    #[error("interface {interface}: address {address:?} is not valid: {detail}")]
    InvalidAddress {
        interface: String,
        address: String,
        detail: String,
    },
    #[error("interface {interface}: address {address} cannot be used in {range}: {problem}")]
    AddressOutOfRange {
        interface: String,
        address: Ipv4Addr,
        range: Ipv4Net,
        problem: RangeProblem,
    },
    #[error("interface {interface}: address {address} is already used by VM {holder}")]
    AddressInUse {
        interface: String,
        address: Ipv4Addr,
        holder: String,
    },
    #[error("interface {interface}: MAC {mac:?} is not valid: {problem}")]
    InvalidMac {
        interface: String,
        mac: String,
        problem: MacProblem,
    },
    #[error("interface {interface}: MAC {mac} is already used by {holder} on this node")]
    DuplicateMac {
        interface: String,
        mac: Mac,
        holder: String,
    },
    #[error("no free address left in {range}")]
    RangeExhausted { range: Ipv4Net },
    #[error("cannot create tap {tap}")]
    #[strum(serialize = "TapCreateFailed")]
    Tap {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("kernel network configuration failed")]
    Netlink(#[source] LinkError),
    #[error("outbound NAT setup failed")]
    #[strum(serialize = "NatSetupFailed")]
    Nat(#[source] NatError),
    #[error("cannot set {path}")]
    #[strum(serialize = "SysctlFailed")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O on network state {path}")]
    #[strum(serialize = "NetworkStateIoError")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl NetError {
    /// Whether the same request can never succeed (the spec must change).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            NetError::InvalidConfig { .. }
                | NetError::InvalidRequest { .. }
                | NetError::InvalidAddress { .. }
                | NetError::AddressOutOfRange { .. }
                | NetError::InvalidMac { .. }
                | NetError::NotABridge { .. }
        )
    }

    fn from_ipam(interface: &str, e: IpamError) -> NetError {
        match e {
            IpamError::OutOfRange { ip, range, problem } => NetError::AddressOutOfRange {
                interface: interface.to_string(),
                address: ip,
                range,
                problem,
            },
            IpamError::InUse { ip, owner } => NetError::AddressInUse {
                interface: interface.to_string(),
                address: ip,
                holder: format!("{} (interface {})", owner.uid, owner.ifname),
            },
            IpamError::Exhausted { range } => NetError::RangeExhausted { range },
            IpamError::Io { path, source } => NetError::State { path, source },
        }
    }
}

impl From<LinkError> for NetError {
    fn from(e: LinkError) -> Self {
        NetError::Netlink(e)
    }
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

/// Parse a `nat` address: plain or in CIDR form. The guest always gets the node range's
/// prefix length; a prefix in the spec (the CRD asks for CIDR form) is accepted and ignored.
pub fn parse_nat_address(text: &str) -> Result<Ipv4Addr, String> {
    let ip = match text.split_once('/') {
        None => text,
        Some((ip, prefix)) => {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| "the prefix length must be a number from 0 to 32".to_string())?;
            ip
        }
    };
    ip.parse()
        .map_err(|_| "expected an IPv4 address like 10.88.0.9".to_string())
}

/// Parse a `bridge` address: `a.b.c.d/prefix`.
pub fn parse_bridge_address(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let net: Ipv4Net = text.parse().map_err(|_| {
        "expected an IPv4 address with prefix length like 192.168.1.20/24".to_string()
    })?;
    Ok((net.addr(), net.prefix_len()))
}

/// Who on the node already uses a MAC: links and other VMs' recorded interfaces.
pub fn find_mac_holder(
    mac: Mac,
    links: &[Link],
    other_vms: &BTreeMap<String, Vec<AttachedInterface>>,
) -> Option<String> {
    if let Some(link) = links.iter().find(|l| l.mac == Some(mac)) {
        return Some(format!("link {}", link.name));
    }
    other_vms.iter().find_map(|(uid, ifaces)| {
        ifaces
            .iter()
            .find(|i| i.mac.parse::<Mac>().ok() == Some(mac))
            .map(|i| format!("VM {uid} (interface {})", i.name))
    })
}

/// One interface decided, before anything is created.
#[derive(Clone, Debug)]
struct Planned {
    request: InterfaceRequest,
    tap: String,
    mac: Mac,
    bridge: String,
    /// `nat`: the requested address (else allocate); `bridge`: the address to hand over.
    address: Option<(Ipv4Addr, u8)>,
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
        nat::ensure(config.cidr).await.map_err(NetError::Nat)?;
        Ok(NetworkManager {
            config,
            netlink,
            ipam,
            lock: Mutex::new(()),
        })
    }

    pub fn config(&self) -> &NetworkConfig {
        &self.config
    }

    /// Create the taps of VM `uid` and give its `nat` interfaces addresses. Idempotent: a
    /// second call with the same request returns the same interfaces. On failure nothing this
    /// call created is left behind.
    pub async fn attach(
        &self,
        uid: &str,
        requests: &[InterfaceRequest],
    ) -> Result<Vec<AttachedInterface>, NetError> {
        let _guard = self.lock.lock().await;
        check_uid(uid)?;
        let previous = self.read_record(uid)?;
        let links = self.netlink.links().await?;
        let plan = self.plan(uid, requests, &links)?;

        let mut undo = Undo::default();
        let result = self.apply_plan(uid, &plan, &mut undo).await;
        match result {
            Ok(attached) => {
                for (ip, who) in &undo.superseded {
                    self.ipam
                        .release(*ip, who)
                        .map_err(|e| NetError::from_ipam(&who.ifname, e))?;
                }
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

    /// Decide every interface and check every input before touching anything.
    fn plan(
        &self,
        uid: &str,
        requests: &[InterfaceRequest],
        links: &[Link],
    ) -> Result<Vec<Planned>, NetError> {
        let mut names = BTreeSet::new();
        let others: BTreeMap<String, Vec<AttachedInterface>> = self
            .records()?
            .into_iter()
            .filter(|r| r.uid != uid)
            .map(|r| (r.uid, r.interfaces))
            .collect();
        let mut plan: Vec<Planned> = Vec::new();
        for req in requests {
            if !is_safe_token(&req.name, IFNAMSIZ_MAX) {
                return Err(NetError::InvalidRequest {
                    detail: format!(
                        "interface name {:?} must be 1-15 letters, digits, '-', '_' or '.'",
                        req.name
                    ),
                });
            }
            if !names.insert(req.name.clone()) {
                return Err(NetError::InvalidRequest {
                    detail: format!("interface {} is listed twice", req.name),
                });
            }
            if req.mode == InterfaceMode::None {
                continue;
            }
            let mac = match &req.mac {
                Some(text) => Mac::parse_unicast(text).map_err(|problem| NetError::InvalidMac {
                    interface: req.name.clone(),
                    mac: text.clone(),
                    problem,
                })?,
                None => Mac::derive(uid, &req.name),
            };
            if plan.iter().any(|p| p.mac == mac) {
                return Err(NetError::DuplicateMac {
                    interface: req.name.clone(),
                    mac,
                    holder: "another interface of the same VM".into(),
                });
            }
            if let Some(holder) = find_mac_holder(mac, links, &others) {
                return Err(NetError::DuplicateMac {
                    interface: req.name.clone(),
                    mac,
                    holder,
                });
            }
            let (bridge, address) = match req.mode {
                InterfaceMode::Nat => {
                    if req
                        .bridge
                        .as_ref()
                        .is_some_and(|b| b != &self.config.bridge)
                    {
                        return Err(NetError::InvalidRequest {
                            detail: format!(
                                "interface {}: a bridge can only be chosen in mode bridge",
                                req.name
                            ),
                        });
                    }
                    let address = match &req.address {
                        Some(text) => {
                            let ip = parse_nat_address(text).map_err(|detail| {
                                NetError::InvalidAddress {
                                    interface: req.name.clone(),
                                    address: text.clone(),
                                    detail,
                                }
                            })?;
                            ipam::check_assignable(self.config.cidr, ip).map_err(|problem| {
                                NetError::AddressOutOfRange {
                                    interface: req.name.clone(),
                                    address: ip,
                                    range: self.config.cidr,
                                    problem,
                                }
                            })?;
                            Some((ip, self.config.cidr.prefix_len()))
                        }
                        None => None,
                    };
                    (self.config.bridge.clone(), address)
                }
                InterfaceMode::Bridge => {
                    let Some(bridge) = req.bridge.clone() else {
                        return Err(NetError::InvalidRequest {
                            detail: format!(
                                "interface {}: mode bridge needs a bridge name",
                                req.name
                            ),
                        });
                    };
                    match links.iter().find(|l| l.name == bridge) {
                        None => {
                            return Err(NetError::BridgeNotFound {
                                interface: req.name.clone(),
                                bridge,
                            });
                        }
                        Some(l) if !l.is_bridge() => {
                            return Err(NetError::NotABridge {
                                interface: req.name.clone(),
                                name: bridge,
                            });
                        }
                        Some(_) => {}
                    }
                    let address = match &req.address {
                        Some(text) => Some(parse_bridge_address(text).map_err(|detail| {
                            NetError::InvalidAddress {
                                interface: req.name.clone(),
                                address: text.clone(),
                                detail,
                            }
                        })?),
                        None => None,
                    };
                    (bridge, address)
                }
                InterfaceMode::None => continue,
            };
            plan.push(Planned {
                request: req.clone(),
                tap: tap::tap_name(uid, &req.name),
                mac,
                bridge,
                address,
            });
        }
        Ok(plan)
    }

    async fn apply_plan(
        &self,
        uid: &str,
        plan: &[Planned],
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
            attached.push(AttachedInterface {
                name: name.clone(),
                mode: p.request.mode,
                tap: p.tap.clone(),
                mac: p.mac.to_string(),
                bridge: p.bridge.clone(),
                address,
                gateway,
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
            let existing = self.netlink.link(&iface.tap).await?;
            if existing.is_none() {
                tap::create_persistent_tap(&iface.tap).map_err(|source| NetError::Tap {
                    tap: iface.tap.clone(),
                    source,
                })?;
                undo.taps.push(iface.tap.clone());
            }
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
    pub async fn attached(&self, uid: &str) -> Result<Option<Vec<AttachedInterface>>, NetError> {
        check_uid(uid)?;
        Ok(self.read_record(uid)?.map(|r| r.interfaces))
    }

    /// Remove VM `uid`'s taps and free its addresses. Idempotent; finds leftovers of a crashed
    /// attach through the record and the taps' aliases.
    pub async fn detach(&self, uid: &str) -> Result<(), NetError> {
        let _guard = self.lock.lock().await;
        check_uid(uid)?;
        self.detach_locked(uid, &self.netlink.links().await?).await
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
        self.remove_record(uid)
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
        Ok(report)
    }

    /// Remove the node-wide setup: the NAT table and the node bridge. For uninstall and tests;
    /// VMs' taps should be detached first.
    pub async fn teardown(self) -> Result<(), NetError> {
        nat::teardown().await.map_err(NetError::Nat)?;
        self.netlink.delete_by_name(&self.config.bridge).await?;
        Ok(())
    }

    fn record_path(&self, uid: &str) -> PathBuf {
        self.config
            .state_dir
            .join("vms")
            .join(format!("{uid}.json"))
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

fn owner(uid: &str, ifname: &str) -> Owner {
    Owner {
        uid: uid.to_string(),
        ifname: ifname.to_string(),
    }
}

fn check_uid(uid: &str) -> Result<(), NetError> {
    if is_safe_token(uid, 128) {
        Ok(())
    } else {
        Err(NetError::InvalidRequest {
            detail: format!("VM uid {uid:?} must be 1-128 letters, digits, '-', '_' or '.'"),
        })
    }
}

/// The alias a tap carries: `ignis:<uid>/<interface>`.
pub fn tap_alias(uid: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}{uid}/{ifname}")
}

/// The VM uid in a tap's alias, if the alias is ours.
pub fn alias_uid(alias: Option<&str>) -> Option<&str> {
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
mod tests {
    use super::*;
    use crate::error::ErrorReason;

    fn iface(name: &str, address: Option<(&str, u8)>, gw: Option<&str>) -> AttachedInterface {
        AttachedInterface {
            name: name.into(),
            mode: InterfaceMode::Nat,
            tap: tap::tap_name("u", name),
            mac: Mac::derive("u", name).to_string(),
            bridge: DEFAULT_BRIDGE.into(),
            address: address.map(|(ip, p)| (ip.parse().expect("ip"), p)),
            gateway: gw.map(|g| g.parse().expect("gw")),
        }
    }

    #[test]
    fn defaults() {
        let c = NetworkConfig::new("/tmp/x");
        assert_eq!(c.bridge, "ignis0");
        assert_eq!(c.cidr.to_string(), DEFAULT_CIDR);
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 88, 0, 1));
    }

    #[test]
    fn cmdline_uses_the_first_addressed_interface() {
        let ifaces = vec![
            iface("eth0", Some(("10.88.0.5", 16)), Some("10.88.0.1")),
            iface("eth1", Some(("192.168.1.4", 24)), None),
        ];
        assert_eq!(
            kernel_cmdline(&ifaces),
            "ignis.ip=10.88.0.5/16 ignis.gw=10.88.0.1"
        );
        assert_eq!(ip_addresses(&ifaces), vec!["10.88.0.5", "192.168.1.4"]);
        assert_eq!(kernel_cmdline(&[iface("eth0", None, None)]), "");
        assert_eq!(
            kernel_cmdline(&[iface("eth0", Some(("192.168.1.4", 24)), None)]),
            "ignis.ip=192.168.1.4/24"
        );
        let nc = ifaces[0].net_config();
        assert_eq!(
            (nc.id.as_str(), nc.tap.as_str()),
            ("eth0", ifaces[0].tap.as_str())
        );
    }

    #[test]
    fn modes_and_flags_parse() {
        assert_eq!("".parse::<InterfaceMode>().ok(), Some(InterfaceMode::Nat));
        assert_eq!(
            "bridge".parse::<InterfaceMode>().ok(),
            Some(InterfaceMode::Bridge)
        );
        assert_eq!(
            "none".parse::<InterfaceMode>().ok(),
            Some(InterfaceMode::None)
        );
        assert_eq!(
            "macvtap".parse::<InterfaceMode>().err().map(|e| e.reason()),
            Some("InvalidInterface")
        );
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            net: NetworkArgs,
        }
        let cli = Cli::try_parse_from(["x"]).expect("defaults");
        let cfg = cli.net.config(Path::new("/var/lib/ignis"));
        assert_eq!(cfg, NetworkConfig::new("/var/lib/ignis/net"));
        let cli = Cli::try_parse_from(["x", "--bridge", "br-vm", "--cidr", "172.20.0.0/24"])
            .expect("flags");
        assert_eq!(cli.net.bridge, "br-vm");
        assert_eq!(cli.net.cidr.to_string(), "172.20.0.0/24");
        assert!(Cli::try_parse_from(["x", "--cidr", "nope"]).is_err());
    }

    #[test]
    fn address_parsing() {
        for text in ["10.88.0.9", "10.88.0.9/16", "10.88.0.9/24"] {
            assert_eq!(parse_nat_address(text), Ok(Ipv4Addr::new(10, 88, 0, 9)));
        }
        assert!(parse_nat_address("10.88.0.9/33").is_err());
        assert!(parse_nat_address("banana").is_err());
        assert_eq!(
            parse_bridge_address("192.168.1.20/24"),
            Ok((Ipv4Addr::new(192, 168, 1, 20), 24))
        );
        assert!(parse_bridge_address("192.168.1.20").is_err());
    }

    #[test]
    fn mac_holders_are_links_and_other_vms() {
        let mac = Mac::derive("u", "eth0");
        let links = vec![Link {
            index: 3,
            name: "eth9".into(),
            kind: None,
            mac: Some(mac),
            master: None,
            up: true,
            alias: None,
        }];
        assert_eq!(
            find_mac_holder(mac, &links, &BTreeMap::new()).as_deref(),
            Some("link eth9")
        );
        let mut others = BTreeMap::new();
        others.insert("other".to_string(), vec![iface("eth0", None, None)]);
        assert_eq!(
            find_mac_holder(mac, &[], &others).as_deref(),
            Some("VM other (interface eth0)")
        );
        assert_eq!(
            find_mac_holder(Mac::derive("v", "eth0"), &links, &others),
            None
        );
    }

    #[test]
    fn aliases_and_tokens() {
        let a = tap_alias("abc-1", "eth0");
        assert_eq!(alias_uid(Some(&a)), Some("abc-1"));
        assert_eq!(alias_uid(Some("something else")), None);
        assert_eq!(alias_uid(None), None);
        assert!(is_safe_token("6f1c2f7e-0000-4000-8000-000000000001", 128));
        assert!(!is_safe_token("a b", 128));
        assert!(!is_safe_token("../x", 128));
        assert!(!is_safe_token("..", 128));
        assert!(!is_safe_token("", 128));
        assert!(!is_safe_token("sixteen-chars-xx", IFNAMSIZ_MAX));
    }

    #[test]
    fn error_reasons_are_fixed_words() {
        let e = NetError::BridgeNotFound {
            interface: "eth0".into(),
            bridge: "br-x".into(),
        };
        assert_eq!(e.reason(), "BridgeNotFound");
        assert_eq!(
            e.to_string(),
            "interface eth0: bridge br-x does not exist on this node"
        );
        let e = NetError::from_ipam(
            "eth0",
            IpamError::Exhausted {
                range: "10.0.0.0/30".parse().expect("cidr"),
            },
        );
        assert_eq!(e.reason(), "RangeExhausted");
    }
}
