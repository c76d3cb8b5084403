//! Guest networking against the real kernel (rtnetlink, tun, nftables), each test in a network
//! namespace it creates: bridge setup, attach/detach, leaks over 20 cycles, restarts, and bad
//! input that must leave nothing behind.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::net::*;
use ignis::ErrorReason;
use ignis::agent::net::tap::tap_name;
use ignis::agent::net::{
    Interface, InterfaceMode, NetError, NetworkConfig, NetworkManager, kernel_cmdline,
};
use ignis::vm::VmUid;

const TIMEOUT: Duration = Duration::from_secs(120);

fn vm(uid: &str) -> VmUid {
    VmUid::new(uid).expect("uid")
}

fn nat(name: &str) -> Interface {
    Interface {
        name: name.into(),
        mode: InterfaceMode::Nat,
        ..Default::default()
    }
}

/// Masquerade rules of our `ip ignis` table (its filter chains and the `bridge ignis` guard
/// hold others).
fn ignis_rules() -> usize {
    nft_rules()
        .iter()
        .filter(|r| r["family"] == "ip" && r["table"] == "ignis" && r["chain"] == "postrouting")
        .count()
}

#[test]
fn bridge_setup_is_idempotent() {
    if !in_fresh_netns("bridge_setup_is_idempotent", TIMEOUT) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        for round in 0..3 {
            let mgr = NetworkManager::new(NetworkConfig::new(state.path()))
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            let br = link("ignis0").expect("bridge exists");
            assert_eq!(br["linkinfo"]["info_kind"], "bridge");
            assert!(
                br["flags"]
                    .as_array()
                    .expect("flags")
                    .iter()
                    .any(|f| f == "UP"),
                "bridge is up: {br}"
            );
            assert_eq!(ipv4_addrs("ignis0"), vec!["10.88.0.1/16"]);
            assert_eq!(ignis_rules(), 1, "exactly one masquerade rule");
            assert_eq!(
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                    .expect("ip_forward")
                    .trim(),
                "1"
            );
            drop(mgr);
        }
        let mac_before = link("ignis0").expect("bridge")["address"].clone();
        // A custom bridge and range next to the default one.
        let mut cfg = NetworkConfig::new(state.path().join("other"));
        cfg.bridge = "igtest1".into();
        cfg.cidr = "172.30.4.0/24".parse().expect("cidr");
        let mgr = NetworkManager::new(cfg).await.expect("second bridge");
        assert_eq!(ipv4_addrs("igtest1"), vec!["172.30.4.1/24"]);
        // The table is one of ours: a new range replaces the rule, never duplicates it.
        assert_eq!(ignis_rules(), 1);
        let rule = nft_rules()
            .into_iter()
            .find(|r| r["table"] == "ignis" && r["chain"] == "postrouting")
            .expect("rule");
        assert!(rule.to_string().contains("172.30.4.0"), "{rule}");
        mgr.teardown().await.expect("teardown");
        assert!(link("igtest1").is_none());
        assert!(!nft_tables().contains(&"ignis".to_string()));
        assert_eq!(link("ignis0").expect("bridge")["address"], mac_before);

        // A non-bridge under the bridge's name is refused, not reused.
        let mut cfg = NetworkConfig::new(state.path().join("third"));
        cfg.bridge = "lo".into();
        let err = NetworkManager::new(cfg)
            .await
            .err()
            .expect("lo is no bridge");
        assert_eq!(err.reason(), "NotABridge");
    });
}

#[test]
fn attach_detach_creates_and_removes_tap_and_address() {
    if !in_fresh_netns("attach_detach_creates_and_removes_tap_and_address", TIMEOUT) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let mgr = NetworkManager::new(NetworkConfig::new(state.path()))
            .await
            .expect("manager");
        let uid = "0b6c9c52-6d0a-4c1e-9f51-3f0c8a1e2d01";
        let t0 = Instant::now();
        let ifaces = mgr
            .attach(
                &vm(uid),
                &[
                    nat("eth0"),
                    Interface {
                        name: "eth1".into(),
                        mode: InterfaceMode::None,
                        ..Default::default()
                    },
                ],
                None,
            )
            .await
            .expect("attach");
        println!("attach took {:?}", t0.elapsed());
        assert_eq!(ifaces.len(), 1, "mode none gets no tap");
        let eth0 = &ifaces[0];
        assert_eq!(eth0.tap, tap_name(uid, "eth0"));
        assert!(eth0.mac.starts_with("02:"));
        let (ip, prefix) = eth0.address.expect("an address");
        assert_eq!(prefix, 16);
        assert!(ip.to_string().starts_with("10.88."));
        assert_eq!(
            eth0.gateway.map(|g| g.to_string()).as_deref(),
            Some("10.88.0.1")
        );
        // The kernel's standard ip= (DNS on the gateway when dnsmasq serves the bridge).
        let ip_param = kernel_cmdline(&ifaces, "web");
        assert!(
            ip_param.starts_with(&format!("ip={ip}::10.88.0.1:255.255.0.0:web:eth0:off")),
            "{ip_param}"
        );

        let tap = link(&eth0.tap).expect("tap exists");
        assert_eq!(tap["linkinfo"]["info_kind"], "tun");
        assert_eq!(tap["linkinfo"]["info_data"]["type"], "tap");
        assert_eq!(tap["master"], "ignis0");
        assert_eq!(tap["ifalias"], format!("ignis:{uid}/eth0"));
        assert!(
            tap["flags"]
                .as_array()
                .expect("flags")
                .iter()
                .any(|f| f == "UP"),
            "{tap}"
        );
        let persisted = relative_files(state.path());
        assert!(
            persisted.contains(&format!("ipam/10.88.0.0_16/{ip}")),
            "{persisted:?}"
        );
        assert!(persisted.contains(&format!("vms/{uid}.json")));

        // Idempotent: the same answer, no second tap or address.
        let again = mgr
            .attach(&vm(uid), &[nat("eth0")], None)
            .await
            .expect("attach again");
        assert_eq!(again, ifaces);
        assert_eq!(taps(), vec![eth0.tap.clone()]);
        assert_eq!(
            mgr.attached(&vm(uid)).await.expect("record"),
            Some(ifaces.clone())
        );

        let t0 = Instant::now();
        mgr.detach(&vm(uid)).await.expect("detach");
        println!("detach took {:?}", t0.elapsed());
        assert!(link(&eth0.tap).is_none(), "tap removed");
        assert!(taps().is_empty());
        assert_eq!(
            relative_files(state.path()),
            vec!["ipam/10.88.0.0_16/last_reserved".to_string()],
            "address and record released"
        );
        mgr.detach(&vm(uid)).await.expect("detach is idempotent");
    });
}

/// A confined VMM's taps are its own: the kernel lets any process attach to a persistent tap
/// with no owner, so another tenant's VMM out of its sandbox could take a stopped VM's tap
/// (and its MAC and address). Each run makes its tap anew for the VMM's ids.
#[test]
fn a_confined_vmms_tap_is_owned_by_its_ids() {
    if !in_fresh_netns("a_confined_vmms_tap_is_owned_by_its_ids", TIMEOUT) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let mgr = NetworkManager::new(NetworkConfig::new(state.path()))
            .await
            .expect("manager");
        let uid = "0b6c9c52-6d0a-4c1e-9f51-3f0c8a1e2d02";
        let owner_of = |tap: &str| {
            let info = link(tap).expect("tap exists")["linkinfo"]["info_data"].clone();
            (info["user"].as_u64(), info["group"].as_u64())
        };
        let first = mgr
            .attach(&vm(uid), &[nat("eth0")], Some((4321, 4322)))
            .await
            .expect("attach");
        let tap = first[0].tap.clone();
        assert_eq!(owner_of(&tap), (Some(4321), Some(4322)));
        assert_eq!(link(&tap).expect("tap")["master"], "ignis0");
        // A run with other ids (or an unowned tap an older agent left) gets a tap of its own,
        // with the same name, MAC and address.
        let second = mgr
            .attach(&vm(uid), &[nat("eth0")], Some((5321, 5322)))
            .await
            .expect("attach again");
        assert_eq!(second, first);
        assert_eq!(owner_of(&tap), (Some(5321), Some(5322)));
        assert_eq!(link(&tap).expect("tap")["master"], "ignis0");
        assert_eq!(taps(), vec![tap.clone()]);
        mgr.detach(&vm(uid)).await.expect("detach");
        assert!(taps().is_empty());
        // A VMM that runs as root: no owner, as before.
        let root = mgr
            .attach(&vm(uid), &[nat("eth0")], None)
            .await
            .expect("attach unowned");
        assert_eq!(owner_of(&root[0].tap), (None, None));
        mgr.detach(&vm(uid)).await.expect("detach");
    });
}

#[test]
fn twenty_cycles_leak_nothing() {
    if !in_fresh_netns("twenty_cycles_leak_nothing", TIMEOUT) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let mgr = NetworkManager::new(NetworkConfig::new(state.path()))
            .await
            .expect("manager");
        let before = (links().len(), nft_rules().len(), relative_files(state.path()));
        let (mut attach, mut detach) = (Vec::new(), Vec::new());
        let mut seen = BTreeSet::new();
        for i in 0..20 {
            let uid = format!("cycle-{i}");
            let t0 = Instant::now();
            let ifaces = mgr
                .attach(&vm(&uid), &[nat("eth0"), nat("eth1")], None)
                .await
                .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
            attach.push(t0.elapsed());
            assert_eq!(taps().len(), 2);
            for iface in &ifaces {
                // Round-robin allocation: no address handed out twice in a row.
                assert!(seen.insert(iface.address.expect("address").0), "{iface:?}");
            }
            let t0 = Instant::now();
            mgr.detach(&vm(&uid)).await.expect("detach");
            detach.push(t0.elapsed());
        }
        let after_files: Vec<String> = relative_files(state.path());
        assert_eq!(links().len(), before.0, "no link leaked");
        assert_eq!(nft_rules().len(), before.1, "no nftables rule leaked");
        assert!(taps().is_empty());
        assert!(
            after_files
                .iter()
                .all(|f| f.ends_with("last_reserved")),
            "no allocation or record leaked: {after_files:?}"
        );
        let stats = |v: &mut Vec<Duration>| {
            v.sort();
            (v[v.len() / 2], v[v.len() - 1])
        };
        let (a50, amax) = stats(&mut attach);
        let (d50, dmax) = stats(&mut detach);
        println!(
            "20 cycles, 2 nat interfaces each: attach p50 {a50:?} max {amax:?}; detach p50 {d50:?} max {dmax:?}"
        );
    });
}

#[test]
fn restart_keeps_allocations_and_gc_cleans_the_dead() {
    if !in_fresh_netns("restart_keeps_allocations_and_gc_cleans_the_dead", TIMEOUT) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let first = NetworkManager::new(NetworkConfig::new(state.path()))
            .await
            .expect("manager");
        let a = first
            .attach(&vm("vm-a"), &[nat("eth0")], None)
            .await
            .expect("a");
        let b = first
            .attach(&vm("vm-b"), &[nat("eth0")], None)
            .await
            .expect("b");
        // The agent stopping: its dnsmasq gone before the next one binds the bridge's DHCP
        // and DNS ports (dropped instead, the old one may still hold them for a moment, and
        // the next manager runs without DHCP and tells its guests no DNS server).
        first.shutdown().await;
        drop(first);

        let second = NetworkManager::new(NetworkConfig::new(state.path()))
            .await
            .expect("manager after restart");
        assert_eq!(
            second.attached(&vm("vm-a")).await.expect("a"),
            Some(a.clone())
        );
        // Re-attaching a known VM yields the same address, tap and MAC.
        assert_eq!(
            second
                .attach(&vm("vm-a"), &[nat("eth0")], None)
                .await
                .expect("a"),
            a
        );
        let c = second
            .attach(&vm("vm-c"), &[nat("eth0")], None)
            .await
            .expect("c");
        let addr = |v: &Vec<ignis::agent::net::AttachedInterface>| v[0].address.expect("ip").0;
        assert_ne!(addr(&c), addr(&a));
        assert_ne!(addr(&c), addr(&b));
        // A spec asking for a held address is refused.
        let err = second
            .attach(
                &vm("vm-d"),
                &[Interface {
                    address: Some(addr(&a).to_string()),
                    ..nat("eth0")
                }],
                None,
            )
            .await
            .expect_err("address in use");
        assert_eq!(err.reason(), "AddressInUse");
        assert!(err.to_string().contains("vm-a"), "{err}");

        // A tap left by a crash between tap creation and configuration (no record, no alias).
        let stray = tap_name("vm-crashed", "eth0");
        let out = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", &stray, "mode", "tap"])
            .status()
            .expect("ip tuntap");
        assert!(out.success());

        let live: BTreeSet<String> = ["vm-a".to_string()].into();
        let report = second.garbage_collect(&live).await.expect("gc");
        let mut expected_taps = vec![b[0].tap.clone(), c[0].tap.clone(), stray.clone()];
        expected_taps.sort();
        assert_eq!(report.taps, expected_taps);
        assert_eq!(report.addresses.len(), 2);
        assert_eq!(taps(), vec![a[0].tap.clone()]);
        assert_eq!(second.attached(&vm("vm-b")).await.expect("b"), None);
        // The freed address of vm-b can be asked for again.
        let d = second
            .attach(
                &vm("vm-d"),
                &[Interface {
                    address: Some(format!("{}/16", addr(&b))),
                    ..nat("eth0")
                }],
                None,
            )
            .await
            .expect("freed address is free");
        assert_eq!(addr(&d), addr(&b));
    });
}

/// After a refused attach: only `keep`'s tap, allocation and record exist.
fn assert_only(state: &std::path::Path, keep_tap: &str, keep_uid: &str, ctx: &str) {
    assert_eq!(taps(), vec![keep_tap.to_string()], "{ctx}: taps");
    let files = relative_files(state);
    let allocations: Vec<&String> = files
        .iter()
        .filter(|f| f.starts_with("ipam/") && !f.ends_with("last_reserved"))
        .collect();
    assert_eq!(allocations.len(), 1, "{ctx}: allocations {files:?}");
    let records: Vec<&String> = files.iter().filter(|f| f.starts_with("vms/")).collect();
    assert_eq!(
        records,
        vec![&format!("vms/{keep_uid}.json")],
        "{ctx}: records"
    );
}

#[test]
fn bad_input_is_refused_and_leaves_nothing_behind() {
    if !in_fresh_netns("bad_input_is_refused_and_leaves_nothing_behind", TIMEOUT) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let mut config = NetworkConfig::new(state.path());
        config.allowed_bridges = vec!["br-missing".into()];
        let mgr = NetworkManager::new(config).await.expect("manager");
        let keep = mgr
            .attach(
                &vm("vm-keep"),
                &[Interface {
                    mac: Some("02:00:00:aa:bb:cc".into()),
                    ..nat("eth0")
                }],
                None,
            )
            .await
            .expect("keep");
        let keep_tap = keep[0].tap.clone();
        let check = |err: NetError, reason: &str, words: &[&str], ctx: &str| {
            assert_eq!(err.reason(), reason, "{ctx}: {err}");
            let msg = err.to_string();
            for w in words {
                assert!(msg.contains(w), "{ctx}: {msg:?} should name {w:?}");
            }
            assert_only(state.path(), &keep_tap, "vm-keep", ctx);
        };

        let err = mgr
            .attach(
                &vm("vm-bad"),
                &[
                    nat("eth0"),
                    Interface {
                        name: "eth1".into(),
                        mode: InterfaceMode::Bridge,
                        bridge: Some("br-missing".into()),
                        ..Default::default()
                    },
                ],
                None,
            )
            .await
            .expect_err("missing bridge");
        check(
            err,
            "BridgeNotFound",
            &["br-missing", "eth1"],
            "missing bridge",
        );
        // A bridge an admin did not list: refused before the node's links are even looked at.
        for bridge in ["ignis0", "cni0", "br-other"] {
            let err = mgr
                .attach(
                    &vm("vm-bad"),
                    &[Interface {
                        name: "eth1".into(),
                        mode: InterfaceMode::Bridge,
                        bridge: Some(bridge.into()),
                        address: Some("10.244.0.9/24".into()),
                        ..Default::default()
                    }],
                    None,
                )
                .await
                .expect_err(bridge);
            assert!(err.is_permanent());
            check(
                err,
                "BridgeNotAllowed",
                &[bridge, "--allowed-bridge"],
                bridge,
            );
        }

        for (address, what) in [
            ("10.99.0.5", "outside"),
            ("10.88.0.1", "gateway"),
            ("10.88.255.255", "broadcast"),
        ] {
            let err = mgr
                .attach(
                    &vm("vm-bad"),
                    &[Interface {
                        address: Some(address.into()),
                        ..nat("eth0")
                    }],
                    None,
                )
                .await
                .expect_err("out of range");
            check(err, "AddressOutOfRange", &[address, what], address);
        }

        let err = mgr
            .attach(
                &vm("vm-bad"),
                &[Interface {
                    mac: Some("02:00:00:AA:BB:CC".into()),
                    ..nat("eth0")
                }],
                None,
            )
            .await
            .expect_err("duplicate MAC of another VM");
        check(
            err,
            "DuplicateMac",
            &["02:00:00:aa:bb:cc", "vm-keep"],
            "dup VM MAC",
        );

        let bridge_mac = link("ignis0").expect("bridge")["address"]
            .as_str()
            .expect("mac")
            .to_string();
        let err = mgr
            .attach(
                &vm("vm-bad"),
                &[Interface {
                    mac: Some(bridge_mac.clone()),
                    ..nat("eth0")
                }],
                None,
            )
            .await
            .expect_err("duplicate MAC of a link");
        check(
            err,
            "DuplicateMac",
            &[&bridge_mac, "ignis0"],
            "dup link MAC",
        );

        // Failure after side effects: eth0 gets an address and a tap, then eth1's tap name
        // is taken by a link that is not a tap. Both must be undone; the foreign link stays.
        let squatter = tap_name("vm-bad", "eth1");
        let ok = std::process::Command::new("ip")
            .args(["link", "add", &squatter, "type", "bridge"])
            .status()
            .expect("ip link add");
        assert!(ok.success());
        let err = mgr
            .attach(&vm("vm-bad"), &[nat("eth0"), nat("eth1")], None)
            .await
            .expect_err("tap name taken");
        assert_eq!(err.reason(), "TapCreateFailed", "{err}");
        assert!(link(&squatter).is_some(), "a link that is not ours stays");
        assert!(
            link(&tap_name("vm-bad", "eth0")).is_none(),
            "eth0 tap undone"
        );
        assert_only(
            state.path(),
            &keep_tap,
            "vm-keep",
            "rollback after side effects",
        );
    });
}

#[test]
fn bridge_mode_and_address_changes() {
    if !in_fresh_netns("bridge_mode_and_address_changes", TIMEOUT) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    runtime().block_on(async {
        let mut config = NetworkConfig::new(state.path());
        config.allowed_bridges = vec!["br-user".into()];
        let mgr = NetworkManager::new(config).await.expect("manager");
        let ok = std::process::Command::new("ip")
            .args(["link", "add", "br-user", "type", "bridge"])
            .status()
            .expect("ip link add");
        assert!(ok.success());
        let bridged = Interface {
            name: "eth1".into(),
            mode: InterfaceMode::Bridge,
            bridge: Some("br-user".into()),
            address: Some("192.168.50.7/24".into()),
            ..Default::default()
        };
        let ifaces = mgr
            .attach(&vm("vm-br"), std::slice::from_ref(&bridged), None)
            .await
            .expect("bridge mode");
        assert_eq!(ifaces[0].bridge, "br-user");
        assert_eq!(
            ifaces[0].address,
            Some(("192.168.50.7".parse().expect("ip"), 24))
        );
        assert_eq!(ifaces[0].gateway, None);
        assert!(
            kernel_cmdline(&ifaces, "web").starts_with("ip=192.168.50.7:::255.255.255.0:web:"),
            "{}",
            kernel_cmdline(&ifaces, "web")
        );
        assert_eq!(link(&ifaces[0].tap).expect("tap")["master"], "br-user");
        let allocations = |s: &std::path::Path| {
            relative_files(s)
                .into_iter()
                .filter(|f| f.starts_with("ipam/") && !f.ends_with("last_reserved"))
                .collect::<Vec<_>>()
        };
        assert!(
            allocations(state.path()).is_empty(),
            "no IPAM for bridge mode"
        );
        // Without an address, the guest gets none (DHCP on that network is the user's).
        let plain = mgr
            .attach(
                &vm("vm-br2"),
                &[Interface {
                    address: None,
                    ..bridged.clone()
                }],
                None,
            )
            .await
            .expect("bridge mode without address");
        assert_eq!(plain[0].address, None);
        assert_eq!(kernel_cmdline(&plain, "web"), "");

        // A nat interface whose spec address changes: the new one is held, the old freed...
        let with = |a: &str| Interface {
            address: Some(a.into()),
            ..nat("eth0")
        };
        mgr.attach(&vm("vm-n"), &[with("10.88.3.3")], None)
            .await
            .expect("first");
        mgr.attach(&vm("vm-n"), &[with("10.88.3.4/16")], None)
            .await
            .expect("changed");
        assert_eq!(
            allocations(state.path()),
            vec!["ipam/10.88.0.0_16/10.88.3.4".to_string()]
        );
        // ...but a change that fails keeps the old one held.
        mgr.attach(&vm("vm-other"), &[with("10.88.3.5")], None)
            .await
            .expect("other");
        let err = mgr
            .attach(&vm("vm-n"), &[with("10.88.3.5")], None)
            .await
            .expect_err("taken");
        assert_eq!(err.reason(), "AddressInUse");
        let held = allocations(state.path());
        assert!(
            held.contains(&"ipam/10.88.0.0_16/10.88.3.4".to_string()),
            "{held:?}"
        );
        // Dropping an interface from the request removes its tap.
        mgr.attach(&vm("vm-br"), &[], None)
            .await
            .expect("no interfaces");
        assert!(link(&ifaces[0].tap).is_none());
        for uid in ["vm-br", "vm-br2", "vm-n", "vm-other"] {
            mgr.detach(&vm(uid)).await.expect("detach");
        }
        assert!(taps().is_empty());
        assert!(allocations(state.path()).is_empty());
    });
}
