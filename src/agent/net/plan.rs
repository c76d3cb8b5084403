//! Deciding an attach before anything is touched: every interface's tap, MAC, bridge and
//! address, and every input checked against the node (its links, the other VMs' records, the
//! address range). Pure but for reading the records.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::link::Link;
use super::mac::Mac;
use super::*;

/// Parse a `nat` address: plain or in CIDR form. The guest always gets the node range's
/// prefix length; a prefix in the spec (the CRD asks for CIDR form) is accepted and ignored.
pub(crate) fn parse_nat_address(text: &str) -> Result<Ipv4Addr, String> {
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
pub(crate) fn parse_bridge_address(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let net: Ipv4Net = text.parse().map_err(|_| {
        "expected an IPv4 address with prefix length like 192.168.1.20/24".to_string()
    })?;
    Ok((net.addr(), net.prefix_len()))
}

/// Who on the node already uses a MAC: links and other VMs' recorded interfaces.
pub(crate) fn find_mac_holder(
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
pub(super) struct Planned {
    pub(super) request: Interface,
    pub(super) tap: String,
    pub(super) mac: Mac,
    pub(super) bridge: String,
    /// `nat`: the requested address (else allocate); `bridge`: the address to hand over.
    pub(super) address: Option<(Ipv4Addr, u8)>,
}

impl NetworkManager {
    /// Decide every interface and check every input before touching anything.
    pub(super) fn plan(
        &self,
        uid: &str,
        requests: &[Interface],
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
            if req.mode == InterfaceMode::Pod {
                return Err(NetError::InvalidRequest {
                    detail: format!(
                        "interface {}: mode pod is wired in the VM pod's network namespace, not on the node",
                        req.name
                    ),
                });
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
                    // Before looking: a tenant learns nothing of the node's bridges.
                    if !self.config.allowed_bridges.contains(&bridge) {
                        return Err(NetError::BridgeNotAllowed {
                            interface: req.name.clone(),
                            bridge,
                        });
                    }
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
                InterfaceMode::None | InterfaceMode::Pod => continue,
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
}
