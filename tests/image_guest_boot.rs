//! The building blocks of issue #12 together, with real parts, in a network namespace the test
//! creates: the debootstrap test guest (`scripts/build-test-guest.sh`) pushed with skopeo to
//! Debian's docker-registry on loopback; its kernel, initrd and rootfs pulled into the node
//! cache; a qcow2 overlay per VM; a NoCloud drive with a user-data script; dnsmasq on the NAT
//! bridge; QEMU `microvm` under TCG started by hand (the supervisor is wired in later).
//!
//! Boot 1 takes its address by DHCP, boot 2 from the kernel's standard `ip=` parameter (no
//! DHCP entry). Each must answer HTTP from the node and show that its user data ran. Prints
//! pull times (cold and cached) and boot times. Two boots only: TCG is slow.

mod common;
mod image_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ignis::ErrorReason;
use ignis::agent::cloud_init::{GuestInterface, NoCloudConfig, NoCloudDrive};
use ignis::agent::image::{
    DiskBackend, ImageKind, ImageStore, ImageStoreConfig, PullRequest, RegistryCredentials,
    ResolvedImage, VmDisk,
};
use ignis::agent::net::dhcp::{DhcpConfig, DhcpHost, DhcpServer, kernel_ip_param};
use ignis::agent::net::{Interface, InterfaceMode, NetworkConfig, NetworkManager};
use ignis::vm::VmUid;
use image_support::Registry;

const TIMEOUT: Duration = Duration::from_secs(900);
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
const UID: &str = "guest-boot-uid";

/// Build (or find in the cache) the test guest's OCI layout.
fn guest_layout() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-test-guest.sh");
    let out = Command::new(&script)
        .arg("build")
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-test-guest.sh");
    assert!(
        out.status.success(),
        "scripts/build-test-guest.sh build failed (run scripts/setup-images.sh first)"
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("layout path")
            .trim(),
    )
}

/// A QEMU process killed on drop.
struct Vm(Child);

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Boot<'a> {
    kernel: &'a Path,
    initrd: &'a Path,
    disk: &'a VmDisk,
    cidata: &'a Path,
    tap: &'a str,
    mac: &'a str,
    extra_cmdline: String,
    console: PathBuf,
}

fn boot(b: &Boot<'_>) -> Vm {
    let _ = std::fs::remove_file(&b.console);
    // Under TCG the kernel must be told the TSC rate (what the QEMU backend adds too): its
    // calibration against the emulated PIT hangs early boot on a loaded host.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let tsc = ignis::agent::vmm::qemu::host_tsc_khz(&cpuinfo)
        .map(|khz| format!(" tsc_early_khz={khz} tsc=reliable"))
        .unwrap_or_default();
    let cmdline = format!(
        "console=ttyS0 root=/dev/vda panic=-1 quiet{tsc} {}",
        b.extra_cmdline
    );
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,pit=on,pic=on,rtc=on",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-m", "256M", "-smp", "1"])
        .arg("-kernel")
        .arg(b.kernel)
        .arg("-initrd")
        .arg(b.initrd)
        .args(["-append", &cmdline])
        .args([
            "-chardev",
            &format!("file,id=console,path={}", b.console.display()),
            "-serial",
            "chardev:console",
        ])
        .args([
            "-drive",
            &format!(
                "id=root,file={},format={},if=none,readonly={}",
                b.disk.path.display(),
                b.disk.format.as_str(),
                if b.disk.read_only { "on" } else { "off" }
            ),
            "-device",
            "virtio-blk-device,drive=root",
            "-drive",
            &format!(
                "id=cidata,file={},format=raw,if=none,readonly=on",
                b.cidata.display()
            ),
            "-device",
            "virtio-blk-device,drive=cidata",
            "-netdev",
            &format!("tap,id=n0,ifname={},script=no,downscript=no", b.tap),
            "-device",
            &format!("virtio-net-device,netdev=n0,mac={}", b.mac),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(b.console.with_extension("qemu.log")).expect("qemu log"))
        .spawn()
        .expect("qemu-system-x86_64");
    Vm(child)
}

fn wait_ready(vm: &mut Vm, console: &Path, started: Instant) -> Duration {
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains("ignis: ready") {
            return started.elapsed();
        }
        let qemu_log =
            std::fs::read_to_string(console.with_extension("qemu.log")).unwrap_or_default();
        if let Ok(Some(status)) = vm.0.try_wait() {
            panic!("QEMU exited ({status}): {qemu_log}\nconsole:\n{text}");
        }
        assert!(
            started.elapsed() < BOOT_DEADLINE,
            "guest not ready within {BOOT_DEADLINE:?}; QEMU: {qemu_log}\nconsole:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP GET from the node (bounded).
fn http_get(ip: Ipv4Addr, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(text) if text.starts_with("HTTP/1.") => {
                return text
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default();
            }
            other => assert!(
                Instant::now() < deadline,
                "no HTTP answer from {ip}{path}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn debootstrap_guest_from_a_registry_boots_by_dhcp_and_by_ip_param() {
    const NAME: &str = "debootstrap_guest_from_a_registry_boots_by_dhcp_and_by_ip_param";
    // debootstrap needs the Debian mirror: build outside the namespace (cached by content).
    if std::env::var_os("IGNIS_NET_TEST_CHILD").is_none() && nix::unistd::Uid::effective().is_root()
    {
        guest_layout();
    }
    if !common::net::in_fresh_netns(NAME, TIMEOUT) {
        return;
    }
    image_support::require(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dnsmasq", "dnsmasq-base"),
        ("genisoimage", "genisoimage"),
        ("qemu-img", "qemu-utils"),
    ]);
    let layout = guest_layout();
    assert!(
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip")
            .success()
    );
    let reg = Registry::start(false);
    for tag in ["kernel", "initrd", "rootfs"] {
        reg.push(&layout, tag, &format!("ignis-test/{tag}:latest"));
    }
    let scratch = tempfile::tempdir().expect("tempdir");
    assert!(
        Command::new("chmod")
            .arg("755")
            .arg(scratch.path())
            .status()
            .expect("chmod")
            .success()
    );
    let state = scratch.path();
    let vm_dir = state.join("vms").join(UID);
    std::fs::create_dir_all(&vm_dir).expect("vm dir");

    common::net::runtime().block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(state.join("images")))
            .await
            .expect("image store");
        let creds = RegistryCredentials::anonymous();
        let pull = |kind: ImageKind, tag: &'static str| {
            let store = store.clone();
            let creds = creds.clone();
            let reference = format!("{}/ignis-test/{tag}:latest", reg.addr);
            async move {
                store
                    .pull(PullRequest {
                        holder: UID,
                        kind,
                        reference: &reference,
                        credentials: &creds,
                    })
                    .await
                    .unwrap_or_else(|e| panic!("pull {tag}: {e} ({})", e.reason()))
            }
        };
        let t = Instant::now();
        let kernel: ResolvedImage = pull(ImageKind::Kernel, "kernel").await;
        let initrd = pull(ImageKind::Initrd, "initrd").await;
        let t_rootfs = Instant::now();
        let rootfs = pull(ImageKind::Rootfs, "rootfs").await;
        let cold_rootfs = t_rootfs.elapsed();
        let cold = t.elapsed();
        let t = Instant::now();
        let rootfs_again = pull(ImageKind::Rootfs, "rootfs").await;
        let cached = t.elapsed();
        assert_eq!(rootfs_again.path, rootfs.path);
        println!(
            "pull: cold {:.1} s (rootfs {:.1} s, ext4 {} MiB allocated), cached rootfs {} ms",
            cold.as_secs_f64(),
            cold_rootfs.as_secs_f64(),
            std::fs::metadata(&rootfs.path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2048)
                .unwrap_or(0),
            cached.as_millis()
        );

        let net = NetworkManager::new(NetworkConfig::new(state.join("net")))
            .await
            .expect("network");
        let ifaces = net
            .attach(
                &VmUid::new(UID).expect("uid"),
                &[Interface {
                    name: "eth0".into(),
                    mode: InterfaceMode::Nat,
                    ..Default::default()
                }],
            )
            .await
            .expect("attach");
        let iface = &ifaces[0];
        let (ip, prefix) = iface.address.expect("nat address");
        let gw = iface.gateway.expect("gateway");
        let cfg = net.config().clone();
        let dhcp = DhcpServer::start(DhcpConfig::new(
            &cfg.bridge,
            cfg.cidr,
            gw,
            state.join("net/dhcp"),
        ))
        .await
        .expect("dnsmasq");
        let mac = iface.mac.parse().expect("mac");
        dhcp.set_host(DhcpHost {
            mac,
            ip,
            hostname: Some("web-0".into()),
        })
        .expect("dhcp host");

        let disk = VmDisk::prepare(&rootfs, &vm_dir, DiskBackend::Qemu, false)
            .await
            .expect("overlay");
        let cidata = vm_dir.join("cidata.iso");
        NoCloudDrive::build(
            &NoCloudConfig {
                instance_id: UID.into(),
                hostname: "web-0".into(),
                user_data:
                    "#!/bin/sh\necho \"user-data ran on $(hostname)\" > /srv/www/user-data.txt\n"
                        .into(),
                interfaces: vec![GuestInterface {
                    name: "eth0".into(),
                    mac: iface.mac.clone(),
                    address: None,
                    gateway: None,
                    dns: vec![],
                }],
            },
            &cidata,
        )
        .await
        .expect("nocloud");

        // Boot 1: DHCP.
        let console = vm_dir.join("console.log");
        let started = Instant::now();
        let dhcp_boot = Boot {
            kernel: &kernel.path,
            initrd: &initrd.path,
            disk: &disk,
            cidata: &cidata,
            tap: &iface.tap,
            mac: &iface.mac,
            extra_cmdline: String::new(),
            console: console.clone(),
        };
        let mut vm = boot(&dhcp_boot);
        let ready = wait_ready(&mut vm, &console, started);
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(
            log.contains(&format!("network: dhcp {ip}/{prefix}")),
            "the guest took its address by DHCP:\n{log}"
        );
        assert_eq!(http_get(ip, "/"), "hello from web-0\n");
        assert_eq!(http_get(ip, "/user-data.txt"), "user-data ran on web-0\n");
        let answered = started.elapsed();
        drop(vm);
        println!(
            "boot (DHCP): ready {:.1} s, HTTP answered {:.1} s after QEMU start",
            ready.as_secs_f64(),
            answered.as_secs_f64()
        );

        // Boot 2: no DHCP entry; the kernel's standard ip= parameter only.
        dhcp.remove_host(mac).expect("remove dhcp host");
        let started = Instant::now();
        let mut vm = boot(&Boot {
            extra_cmdline: kernel_ip_param(ip, prefix, Some(gw), "web-0", "eth0", &[gw]),
            ..dhcp_boot
        });
        let ready = wait_ready(&mut vm, &console, started);
        let log = std::fs::read_to_string(&console).unwrap_or_default();
        assert!(log.contains(&format!("network: ip= {ip}/")), "{log}");
        assert_eq!(http_get(ip, "/"), "hello from web-0\n");
        drop(vm);
        println!("boot (ip=): ready {:.1} s", ready.as_secs_f64());

        let kib = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2)
                .unwrap_or(0)
        };
        println!(
            "disk use: cached ext4 {} KiB allocated ({} MiB apparent); this VM's overlay {} KiB after two boots",
            kib(&rootfs.path),
            std::fs::metadata(&rootfs.path).map(|m| m.len() >> 20).unwrap_or(0),
            kib(&disk.path)
        );

        // Everything goes with the VM.
        dhcp.shutdown().await;
        net.detach(&VmUid::new(UID).expect("uid")).await.expect("detach");
        VmDisk::remove(&vm_dir).expect("remove disk");
        NoCloudDrive::remove(&cidata).expect("remove drive");
        store.release(UID).await.expect("release");
        assert!(
            store
                .entries()
                .expect("entries")
                .iter()
                .all(|e| e.holders.is_empty())
        );
    });
}
