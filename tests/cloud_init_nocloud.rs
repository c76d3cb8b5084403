//! The cloud-init NoCloud drive read back by real tools: `isoinfo` (the volume label and each
//! file, Rock Ridge names) and the kernel's own iso9660 driver through a read-only loop mount —
//! the way a guest sees it.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use ignis::ErrorReason;
use ignis::agent::cloud_init::{GuestInterface, NoCloudConfig, NoCloudDrive};

fn require(tool: &str, package: &str) {
    let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists());
    assert!(
        found,
        "`{tool}` is missing: run scripts/setup-images.sh (package {package})"
    );
}

fn isoinfo(args: &[&str], iso: &Path) -> String {
    let out = Command::new("isoinfo")
        .args(args)
        .arg("-i")
        .arg(iso)
        .output()
        .expect("isoinfo");
    assert!(out.status.success(), "isoinfo {args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn config(address: Option<(Ipv4Addr, u8)>) -> NoCloudConfig {
    NoCloudConfig {
        instance_id: "0b6e1c1e-uid".into(),
        hostname: "web-0".into(),
        user_data: "#cloud-config\nruncmd:\n  - echo hi > /run/hi\n".into(),
        interfaces: vec![GuestInterface {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            address,
            gateway: address.map(|_| Ipv4Addr::new(192, 168, 7, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 7, 1)],
        }],
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn drive_has_the_cidata_label_and_the_three_files() {
    require("genisoimage", "genisoimage");
    require("isoinfo", "genisoimage");
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = dir.path().join("cidata.iso");
    let cfg = config(Some((Ipv4Addr::new(192, 168, 7, 20), 24)));
    let drive = runtime()
        .block_on(NoCloudDrive::build(&cfg, &iso))
        .expect("build");
    assert_eq!(drive.path, iso);

    let pvd = isoinfo(&["-d"], &iso);
    assert!(pvd.contains("Volume id: cidata"), "{pvd}");
    let listing = isoinfo(&["-R", "-f"], &iso);
    for f in ["/user-data", "/meta-data", "/network-config"] {
        assert!(listing.lines().any(|l| l == f), "{f} missing in {listing}");
    }
    assert_eq!(isoinfo(&["-R", "-x", "/user-data"], &iso), cfg.user_data);
    let meta = isoinfo(&["-R", "-x", "/meta-data"], &iso);
    assert!(meta.contains("instance-id: 0b6e1c1e-uid"), "{meta}");
    assert!(meta.contains("local-hostname: web-0"), "{meta}");
    let net = isoinfo(&["-R", "-x", "/network-config"], &iso);
    assert!(net.contains("192.168.7.20/24"), "{net}");
    assert!(net.contains("52:54:00:12:34:56"), "{net}");
    // Only the drive is left: the staging files are gone.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["cidata.iso"]);
}

#[test]
fn a_dhcp_guest_gets_no_network_config_and_blkid_finds_the_label() {
    require("genisoimage", "genisoimage");
    let dir = tempfile::tempdir().expect("tempdir");
    let iso = dir.path().join("cidata.iso");
    let cfg = config(None);
    runtime()
        .block_on(NoCloudDrive::build(&cfg, &iso))
        .expect("build");
    // blkid (util-linux's libblkid, what udev uses for /dev/disk/by-label) sees what a guest
    // would: an iso9660 volume labelled cidata. The guest kernel's own iso9660 driver reads it
    // in tests/image_guest_boot.rs (this host's kernel may lack the module).
    let probe = |tag: &str| {
        let out = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", tag])
            .arg(&iso)
            .output()
            .expect("blkid");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(probe("TYPE"), "iso9660");
    assert_eq!(probe("LABEL"), "cidata");
    let listing = isoinfo(&["-R", "-f"], &iso);
    assert!(
        !listing.contains("network-config"),
        "network-config only for static addresses"
    );
    assert_eq!(isoinfo(&["-R", "-x", "/user-data"], &iso), cfg.user_data);
    assert!(isoinfo(&["-R", "-x", "/meta-data"], &iso).contains("local-hostname: web-0"));
    // Joliet names too (some readers use them).
    let joliet = isoinfo(&["-J", "-f"], &iso);
    assert!(joliet.contains("/user-data"), "{joliet}");

    // Bad input names the field and writes nothing.
    let mut bad = cfg.clone();
    bad.hostname = "web_0".into();
    let e = runtime()
        .block_on(NoCloudDrive::build(&bad, &dir.path().join("bad.iso")))
        .expect_err("bad hostname");
    assert_eq!(e.reason(), "InvalidHostname");
    assert!(!dir.path().join("bad.iso").exists());
    NoCloudDrive::remove(&iso).expect("remove");
    NoCloudDrive::remove(&iso).expect("remove is idempotent");
    assert!(!iso.exists());
}
