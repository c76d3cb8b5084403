use std::collections::BTreeMap;

use super::plan::{find_mac_holder, parse_bridge_address, parse_nat_address};
use super::*;
use crate::agent::net::ipam::IpamError;
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
        dns: gw.map(|g| g.parse().expect("dns")).into_iter().collect(),
        reachable_at: None,
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
        kernel_cmdline(&ifaces, "web-0"),
        "ip=10.88.0.5::10.88.0.1:255.255.0.0:web-0:eth0:off:10.88.0.1"
    );
    assert_eq!(ip_addresses(&ifaces), vec!["10.88.0.5", "192.168.1.4"]);
    assert_eq!(kernel_cmdline(&[iface("eth0", None, None)], "web"), "");
    assert_eq!(
        kernel_cmdline(&[iface("eth1", Some(("192.168.1.4", 24)), None)], "a.b"),
        "ip=192.168.1.4:::255.255.255.0:a.b:eth1:off"
    );
    let nc = ifaces[0].net_config();
    assert_eq!(
        (nc.id.as_str(), nc.tap.as_str()),
        ("eth0", ifaces[0].tap.as_str())
    );
}

#[test]
fn flags_parse() {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        net: NetworkArgs,
    }
    let cli = Cli::try_parse_from(["x"]).expect("defaults");
    let cfg = cli.net.config(Path::new("/var/lib/ignis"));
    assert_eq!(cfg, NetworkConfig::new("/var/lib/ignis/net"));
    let cli =
        Cli::try_parse_from(["x", "--bridge", "br-vm", "--cidr", "172.20.0.0/24"]).expect("flags");
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
