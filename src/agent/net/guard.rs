//! What guests on the node may send and reach (issue #19): the node's network is shared by
//! every namespace's VMs, so a guest must not pass for another one, nor reach the node's own
//! services or the link-local metadata address unless an admin allows it.
//!
//! - Anti-spoofing, in a `bridge`-family table of our own (`bridge ignis`, chain `guard`, at
//!   bridge prerouting, so it sees frames before the bridge forwards them to another port or to
//!   the node): a tap may only send frames from its own MAC; a `nat` tap only IPv4 from its own
//!   address (and DHCP from 0.0.0.0) and ARP claiming its own MAC and address; every other
//!   frame (IPv6, other ethertypes, forged ARP) is dropped. The table is rebuilt whole from the
//!   agent's records in one transaction whenever a VM's interfaces change.
//! - The node's services: in the `ip ignis` table ([`super::nat`]), an `input` chain lets guests
//!   on the node bridge reach only DHCP and DNS on the node (dnsmasq), ping, and replies to what
//!   the node opened, unless `--allow-guest-node-access`; a `forward` chain drops their packets to
//!   169.254.0.0/16 (cloud metadata) unless `--allow-guest-link-local`, and to every range an
//!   admin lists with `--guest-blocked-cidr` (say the cluster's service range or the API
//!   server).

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{Value, json};

use super::{AttachedInterface, InterfaceMode};
use crate::agent::metadata;

/// The table (family `bridge`) holding the per-tap rules.
pub(crate) const TABLE: &str = "ignis";
const CHAIN: &str = "guard";
/// DHCP and DNS: what guests may ask of the node itself.
const DHCP_PORT: u16 = 67;
const DNS_PORT: u16 = 53;

/// What guests on the node bridge may reach besides the outside world (agent flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestAccess {
    /// Any port of the node itself (`--allow-guest-node-access`).
    pub node: bool,
    /// 169.254.0.0/16, where clouds serve instance metadata (`--allow-guest-link-local`).
    pub link_local: bool,
    /// Ranges guests may never reach (`--guest-blocked-cidr`).
    pub blocked: Vec<Ipv4Net>,
}

/// One tap's identity: what it may claim to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TapIdentity {
    pub(crate) tap: String,
    pub(crate) mac: String,
    /// `nat` taps: the address IPAM gave; `bridge` taps: none known (their network's own
    /// DHCP decides), so only the MAC is enforced.
    pub(crate) ip: Option<Ipv4Addr>,
}

/// The identities of every attached tap.
pub(crate) fn identities<'a>(
    interfaces: impl IntoIterator<Item = &'a AttachedInterface>,
) -> Vec<TapIdentity> {
    interfaces
        .into_iter()
        .filter(|i| matches!(i.mode, InterfaceMode::Nat | InterfaceMode::Bridge))
        .map(|i| TapIdentity {
            tap: i.tap.clone(),
            mac: i.mac.clone(),
            ip: if i.mode == InterfaceMode::Nat {
                i.address.map(|(ip, _)| ip)
            } else {
                None
            },
        })
        .collect()
}

fn iif(name: &str) -> Value {
    json!({"match": {"left": {"meta": {"key": "iifname"}}, "right": name, "op": "=="}})
}

fn field(protocol: &str, name: &str, right: Value, op: &str) -> Value {
    json!({"match": {"left": {"payload": {"protocol": protocol, "field": name}}, "right": right, "op": op}})
}

fn rule(family: &str, table: &str, chain: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": family, "table": table, "chain": chain, "expr": expr}}})
}

fn accept() -> Value {
    json!({"accept": null})
}

fn drop() -> Value {
    json!({"drop": null})
}

/// The transaction that rebuilds the guard table from `taps` (idempotent: add, delete, add).
pub(crate) fn guard_batch(taps: &[TapIdentity]) -> Value {
    let table = json!({"table": {"family": "bridge", "name": TABLE}});
    let mut cmds = vec![
        json!({"add": table}),
        json!({"delete": table}),
        json!({"add": table}),
        json!({"add": {"chain": {"family": "bridge", "table": TABLE, "name": CHAIN,
            "type": "filter", "hook": "prerouting", "prio": -200, "policy": "accept"}}}),
    ];
    let r = |expr: Vec<Value>| rule("bridge", TABLE, CHAIN, expr);
    for t in taps {
        cmds.push(r(vec![
            iif(&t.tap),
            field("ether", "saddr", json!(t.mac), "!="),
            drop(),
        ]));
        let Some(ip) = t.ip else { continue };
        cmds.push(r(vec![
            iif(&t.tap),
            field("arp", "saddr ether", json!(t.mac), "=="),
            field(
                "arp",
                "saddr ip",
                json!({"set": [ip.to_string(), "0.0.0.0"]}),
                "==",
            ),
            accept(),
        ]));
        cmds.push(r(vec![
            iif(&t.tap),
            field("ip", "saddr", json!(ip.to_string()), "=="),
            accept(),
        ]));
        cmds.push(r(vec![
            iif(&t.tap),
            field("ip", "saddr", json!("0.0.0.0"), "=="),
            field("udp", "dport", json!(DHCP_PORT), "=="),
            accept(),
        ]));
        cmds.push(r(vec![iif(&t.tap), drop()]));
    }
    json!({ "nftables": cmds })
}

/// The `input` and `forward` chains of the `ip ignis` table for guests on `bridge`, whose
/// gateway (the bridge's address) is `gateway`; and the metadata channel's DNAT: a guest's
/// `169.254.169.254:80` is the node's listener on `gateway`:[`metadata::NODE_PORT`].
pub(crate) fn filter_commands(
    table: &str,
    bridge: &str,
    gateway: Ipv4Addr,
    access: &GuestAccess,
) -> Vec<Value> {
    let mut cmds = Vec::new();
    let chain = |name: &str, hook: &str| {
        json!({"add": {"chain": {"family": "ip", "table": table, "name": name,
            "type": "filter", "hook": hook, "prio": 0, "policy": "accept"}}})
    };
    cmds.push(
        json!({"add": {"chain": {"family": "ip", "table": table, "name": "prerouting",
        "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}}),
    );
    cmds.push(rule(
        "ip",
        table,
        "prerouting",
        vec![
            iif(bridge),
            field("ip", "daddr", json!(metadata::ADDRESS.to_string()), "=="),
            field("tcp", "dport", json!(metadata::PORT), "=="),
            json!({"dnat": {"addr": gateway.to_string(), "port": metadata::NODE_PORT}}),
        ],
    ));
    if !access.node {
        cmds.push(chain("input", "input"));
        let r = |expr: Vec<Value>| rule("ip", table, "input", expr);
        cmds.push(r(vec![
            iif(bridge),
            json!({"match": {"left": {"ct": {"key": "state"}}, "right": ["established", "related"], "op": "in"}}),
            accept(),
        ]));
        cmds.push(r(vec![
            iif(bridge),
            field("udp", "dport", json!({"set": [DHCP_PORT, DNS_PORT]}), "=="),
            accept(),
        ]));
        cmds.push(r(vec![
            iif(bridge),
            field("tcp", "dport", json!(DNS_PORT), "=="),
            accept(),
        ]));
        // The metadata channel, reached through the DNAT above.
        cmds.push(r(vec![
            iif(bridge),
            field("ip", "daddr", json!(gateway.to_string()), "=="),
            field("tcp", "dport", json!(metadata::NODE_PORT), "=="),
            accept(),
        ]));
        // Pinging the gateway is how guests check their link; it reaches no service.
        cmds.push(r(vec![
            iif(bridge),
            field("icmp", "type", json!("echo-request"), "=="),
            accept(),
        ]));
        cmds.push(r(vec![iif(bridge), drop()]));
    }
    let mut blocked: Vec<Ipv4Net> = access.blocked.clone();
    if !access.link_local {
        blocked.push(Ipv4Net::new(Ipv4Addr::new(169, 254, 0, 0), 16).unwrap_or_default());
    }
    if !blocked.is_empty() {
        cmds.push(chain("forward", "forward"));
        for net in blocked {
            cmds.push(rule(
                "ip",
                table,
                "forward",
                vec![
                    iif(bridge),
                    field(
                        "ip",
                        "daddr",
                        json!({"prefix": {"addr": net.network().to_string(), "len": net.prefix_len()}}),
                        "==",
                    ),
                    drop(),
                ],
            ));
        }
    }
    cmds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &Value) -> String {
        v.to_string()
    }

    #[test]
    fn each_tap_may_only_send_as_itself() {
        let taps = [
            TapIdentity {
                tap: "ig-a".into(),
                mac: "52:54:00:00:00:0a".into(),
                ip: Some(Ipv4Addr::new(10, 88, 0, 2)),
            },
            TapIdentity {
                tap: "ig-b".into(),
                mac: "52:54:00:00:00:0b".into(),
                ip: None,
            },
        ];
        let batch = guard_batch(&taps);
        let cmds = batch["nftables"].as_array().expect("cmds");
        // add, delete, add table; the chain; 5 rules for the nat tap, 1 for the bridge tap.
        assert_eq!(cmds.len(), 4 + 5 + 1);
        let all = text(&batch);
        assert!(all.contains(r#""hook":"prerouting""#), "{all}");
        let a: Vec<String> = cmds
            .iter()
            .filter(|c| text(c).contains(r#""right":"ig-a""#))
            .map(text)
            .collect();
        assert!(a[0].contains(r#""op":"!=""#) && a[0].contains("52:54:00:00:00:0a"));
        assert!(a[1].contains("saddr ip") && a[1].contains("10.88.0.2"));
        assert!(a[2].contains(r#""right":"10.88.0.2""#) && a[2].contains("accept"));
        assert!(a[3].contains("0.0.0.0") && a[3].contains("67"));
        assert!(a[4].contains("drop") && !a[4].contains("payload"));
        let b: Vec<&Value> = cmds
            .iter()
            .filter(|c| text(c).contains(r#""right":"ig-b""#))
            .collect();
        assert_eq!(b.len(), 1, "a bridge tap: its MAC only");
    }

    #[test]
    fn guests_reach_the_node_and_metadata_only_when_an_admin_allows() {
        let gateway = Ipv4Addr::new(10, 88, 0, 1);
        let closed = text(&json!(filter_commands(
            "ignis",
            "ignis0",
            gateway,
            &GuestAccess::default()
        )));
        assert!(closed.contains(r#""hook":"input""#), "{closed}");
        assert!(closed.contains("169.254.0.0"), "{closed}");
        assert!(closed.contains("echo-request"), "{closed}");
        let open = filter_commands(
            "ignis",
            "ignis0",
            gateway,
            &GuestAccess {
                node: true,
                link_local: true,
                blocked: vec![],
            },
        );
        assert_eq!(open.len(), 2, "the metadata channel's DNAT only: {open:?}");
        let listed = text(&json!(filter_commands(
            "ignis",
            "ignis0",
            gateway,
            &GuestAccess {
                node: true,
                link_local: true,
                blocked: vec!["10.96.0.0/12".parse().expect("cidr")],
            },
        )));
        assert!(
            listed.contains(r#""addr":"10.96.0.0","len":12"#),
            "{listed}"
        );
        assert!(!listed.contains("169.254.0.0"), "{listed}");
    }

    #[test]
    fn guests_reach_the_metadata_channel_and_no_other_port_of_the_node() {
        let gateway = Ipv4Addr::new(10, 88, 0, 1);
        let cmds = filter_commands("ignis", "ignis0", gateway, &GuestAccess::default());
        let dnat: Vec<String> = cmds
            .iter()
            .map(text)
            .filter(|c| c.contains("dnat"))
            .collect();
        assert_eq!(dnat.len(), 1, "{cmds:?}");
        for part in [
            r#""right":"ignis0""#,
            r#""right":"169.254.169.254""#,
            r#""right":80"#,
            r#""addr":"10.88.0.1","port":8775"#,
        ] {
            assert!(dnat[0].contains(part), "{part} in {}", dnat[0]);
        }
        let input: Vec<String> = cmds
            .iter()
            .map(text)
            .filter(|c| c.contains(r#""chain":"input""#) && c.contains("accept"))
            .collect();
        let metadata: Vec<&String> = input.iter().filter(|c| c.contains("8775")).collect();
        assert_eq!(metadata.len(), 1, "{input:?}");
        assert!(
            metadata[0].contains(r#""right":"10.88.0.1""#),
            "{}",
            metadata[0]
        );
        // DHCP, DNS (udp and tcp), ping, replies, the channel: nothing else is accepted.
        assert_eq!(input.len(), 5, "{input:?}");
    }
}
