//! What goes wrong with guest networking: one error per cause, each with a fixed reason (the
//! word on the VM's status) and whether the request itself is at fault.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use thiserror::Error;

use super::ipam::{IpamError, RangeProblem};
use super::link::LinkError;
use super::mac::{Mac, MacProblem};
use super::nat::NatError;

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
    #[error(
        "interface {interface}: bridge {bridge} is not one this node lets guests join (an admin lists them with the agent's --allowed-bridge)"
    )]
    BridgeNotAllowed { interface: String, bridge: String },
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
    /// dnsmasq's host entries could not be updated (`DhcpStateIoError`, ...).
    #[error("DHCP on the bridge")]
    #[strum(transparent)]
    Dhcp(#[source] super::dhcp::DhcpError),
    #[error("cannot enter the VM pod's network namespace {path}")]
    #[strum(serialize = "PodNetworkFailed")]
    PodNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VM pod has no IPv4 address on eth0 and the controller sent none")]
    PodIpUnknown,
    #[error("the guest's rules in the VM pod's network namespace could not be set: {detail}")]
    #[strum(serialize = "PodNetworkFailed")]
    PodFirewall { detail: String },
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
                | NetError::BridgeNotAllowed { .. }
        )
    }

    pub(super) fn from_ipam(interface: &str, e: IpamError) -> NetError {
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
