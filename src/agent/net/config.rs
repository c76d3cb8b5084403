//! The node's network settings: the agent's flags and the configuration made from them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;

use super::{DEFAULT_BRIDGE, DEFAULT_CIDR, GuestAccess, ipam};

/// Per-node network settings (agent flags `--bridge`, `--cidr`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// The node bridge for `nat` interfaces; created if missing.
    pub bridge: String,
    /// The guests' range; the bridge carries its first address as the guests' gateway.
    pub cidr: Ipv4Net,
    /// Where allocations and per-VM records are kept (survives agent restarts).
    pub(crate) state_dir: PathBuf,
    /// Run dnsmasq on the bridge for the `nat` guests (`--no-dhcp` turns it off, for a node
    /// whose bridge already has a DHCP server).
    pub dhcp: bool,
    /// The only node bridges `mode: bridge` interfaces may join (`--allowed-bridge`); none by
    /// default, since joining one puts a tenant's guest on that network with an address of its
    /// choosing.
    pub allowed_bridges: Vec<String>,
    /// What guests on the node bridge may reach on the node and beyond.
    pub guest_access: GuestAccess,
}

impl NetworkConfig {
    /// The defaults (`ignis0`, `10.88.0.0/16`) with state under `state_dir`.
    pub fn new(state_dir: impl Into<PathBuf>) -> NetworkConfig {
        NetworkConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            cidr: Ipv4Net::new(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap_or_default(),
            state_dir: state_dir.into(),
            dhcp: true,
            allowed_bridges: Vec::new(),
            guest_access: GuestAccess::default(),
        }
    }

    /// The guests' gateway: the first address of the range, carried by the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        ipam::gateway_of(self.cidr.trunc())
    }
}

/// The agent's network flags; flatten into `AgentArgs` with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct NetworkArgs {
    /// Node bridge that `nat` interfaces' taps attach to (created if missing).
    #[arg(long = "bridge", env = "IGNIS_BRIDGE", default_value = DEFAULT_BRIDGE)]
    pub(crate) bridge: String,
    /// Range guests' `nat` addresses come from; the bridge gets its first address.
    #[arg(long = "cidr", env = "IGNIS_CIDR", default_value = DEFAULT_CIDR)]
    pub(crate) cidr: Ipv4Net,
    /// Do not run dnsmasq on the bridge (guests still get the kernel's `ip=` parameter).
    #[arg(long = "no-dhcp", env = "IGNIS_NO_DHCP")]
    pub(crate) no_dhcp: bool,
    /// A node bridge that `mode: bridge` interfaces may join; repeat for more. None by default:
    /// such interfaces then fail with the permanent reason BridgeNotAllowed.
    #[arg(
        long = "allowed-bridge",
        env = "IGNIS_ALLOWED_BRIDGES",
        value_delimiter = ','
    )]
    pub(crate) allowed_bridges: Vec<String>,
    /// Let guests on the node bridge reach any port of the node itself (by default only DHCP
    /// and DNS).
    #[arg(
        long = "allow-guest-node-access",
        env = "IGNIS_ALLOW_GUEST_NODE_ACCESS"
    )]
    pub(crate) allow_guest_node_access: bool,
    /// Let guests on the node bridge reach 169.254.0.0/16 (cloud instance metadata).
    #[arg(long = "allow-guest-link-local", env = "IGNIS_ALLOW_GUEST_LINK_LOCAL")]
    pub(crate) allow_guest_link_local: bool,
    /// A range guests on the node bridge may never reach (the cluster's service range, the
    /// API server's address); repeat for more.
    #[arg(
        long = "guest-blocked-cidr",
        env = "IGNIS_GUEST_BLOCKED_CIDRS",
        value_delimiter = ','
    )]
    pub(crate) guest_blocked_cidrs: Vec<Ipv4Net>,
}

impl NetworkArgs {
    /// The configuration, with state under `<agent state dir>/net`.
    pub(crate) fn config(&self, agent_state_dir: &Path) -> NetworkConfig {
        NetworkConfig {
            bridge: self.bridge.clone(),
            cidr: self.cidr,
            state_dir: agent_state_dir.join("net"),
            dhcp: !self.no_dhcp,
            allowed_bridges: self.allowed_bridges.clone(),
            guest_access: GuestAccess {
                node: self.allow_guest_node_access,
                link_local: self.allow_guest_link_local,
                blocked: self.guest_blocked_cidrs.clone(),
            },
        }
    }
}
