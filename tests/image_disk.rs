//! Per-VM disks over a cached one, with the real tools: a qcow2 overlay (`qemu-img`) whose
//! writes never reach the shared disk, a sparse/reflink copy and a qcow2→raw conversion for
//! Firecracker and Cloud Hypervisor, read-only sharing, reuse across VM restarts, removal with
//! the VM, and a failure that leaves nothing. Prints the disk use per VM against a full copy.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ignis::ErrorReason;
use ignis::agent::image::{DiskBackend, DiskFormat, ImageKind, ResolvedImage, VmDisk};
use sha2::{Digest, Sha256};

fn require(tool: &str) {
    let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists());
    assert!(found, "`{tool}` is missing: run scripts/setup-images.sh");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).expect("read")))
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A 256 MiB ext4 disk with some content, read-only like a cache entry.
fn cached_disk(dir: &Path, format: DiskFormat) -> ResolvedImage {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("tree");
    std::fs::write(tree.join("etc/hello"), "hello\n").expect("file");
    std::fs::write(tree.join("big"), vec![7u8; 8 << 20]).expect("big");
    let raw = dir.join("cached.raw");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&raw)
        .arg("256M"));
    let path = match format {
        DiskFormat::Raw => raw,
        DiskFormat::Qcow2 => {
            let q = dir.join("cached.qcow2");
            run(Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&q));
            q
        }
    };
    run(Command::new("chmod").arg("0444").arg(&path));
    ResolvedImage {
        kind: ImageKind::Rootfs,
        reference: "test/rootfs:v1".into(),
        digest: format!("sha256:{}", "c".repeat(64)),
        path,
        disk_format: Some(format),
        from_filesystem: true,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn vm_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("vm dir");
    d
}

#[test]
fn qemu_vms_write_to_their_own_overlay_never_to_the_cached_disk() {
    for t in ["qemu-img", "qemu-io", "mkfs.ext4"] {
        require(t);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cached = cached_disk(dir.path(), DiskFormat::Raw);
    let before = sha(&cached.path);
    let rt = runtime();
    let vm = vm_dir(dir.path(), "vm-1");
    let disk = rt
        .block_on(VmDisk::prepare(&cached, &vm, DiskBackend::Qemu, false))
        .expect("overlay");
    assert_eq!(disk.path, vm.join("rootfs.qcow2"));
    assert_eq!(disk.format, DiskFormat::Qcow2);
    assert!(disk.owned && !disk.read_only);
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(&disk.path)))
    .expect("info");
    assert_eq!(info["backing-filename"], cached.path.display().to_string());
    assert_eq!(info["backing-filename-format"], "raw");
    let overlay_bytes = allocated(&disk.path);

    // The guest writes 4 MiB: the overlay grows, the shared disk stays as it was.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0xab 0 4M"])
        .arg(&disk.path));
    assert_eq!(sha(&cached.path), before, "the cached disk changed");
    assert!(allocated(&disk.path) >= 4 << 20);

    // A restart of the VM finds its disk and keeps what the guest wrote.
    let ino = std::fs::metadata(&disk.path).expect("stat").ino();
    let again = rt
        .block_on(VmDisk::prepare(&cached, &vm, DiskBackend::Qemu, false))
        .expect("again");
    assert_eq!(again, disk);
    assert_eq!(std::fs::metadata(&again.path).expect("stat").ino(), ino);

    // Read-only shares the cached disk itself.
    let ro = rt
        .block_on(VmDisk::prepare(
            &cached,
            &vm_dir(dir.path(), "vm-ro"),
            DiskBackend::Qemu,
            true,
        ))
        .expect("read-only");
    assert_eq!(ro.path, cached.path);
    assert!(ro.read_only && !ro.owned);

    // Full copy for comparison (what a VM would cost without copy-on-write).
    let full = dir.path().join("full-copy.raw");
    run(Command::new("cp").arg(&cached.path).arg(&full));
    println!(
        "disk use per VM: qcow2 overlay {} KiB fresh; full copy {} KiB ({} KiB apparent)",
        overlay_bytes / 1024,
        allocated(&full) / 1024,
        std::fs::metadata(&full).expect("stat").len() / 1024
    );

    VmDisk::remove(&vm).expect("remove");
    VmDisk::remove(&vm).expect("remove is idempotent");
    assert!(!disk.path.exists());
    assert_eq!(sha(&cached.path), before);
}

#[test]
fn firecracker_and_cloud_hypervisor_get_raw_copies() {
    for t in ["qemu-img", "mkfs.ext4", "cp"] {
        require(t);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = cached_disk(&dir.path().join("r"), DiskFormat::Raw);
    let qcow = cached_disk(&dir.path().join("q"), DiskFormat::Qcow2);
    let rt = runtime();

    let vm = vm_dir(dir.path(), "fc");
    let disk = rt
        .block_on(VmDisk::prepare(&raw, &vm, DiskBackend::Firecracker, false))
        .expect("copy");
    assert_eq!(disk.path, vm.join("rootfs.raw"));
    assert_eq!(disk.format, DiskFormat::Raw);
    assert_eq!(sha(&disk.path), sha(&raw.path));
    assert!(
        allocated(&disk.path) <= allocated(&raw.path) + (1 << 20),
        "the copy stays sparse"
    );
    let mode = std::fs::metadata(&disk.path).expect("stat").mode() & 0o777;
    assert_eq!(mode, 0o600, "the VM's copy is writable");
    println!(
        "firecracker copy: {} KiB allocated of {} KiB",
        allocated(&disk.path) / 1024,
        std::fs::metadata(&disk.path).expect("stat").len() / 1024
    );

    // Firecracker reads raw only: a qcow2 is converted, even read-only.
    let vm = vm_dir(dir.path(), "fc-q");
    let disk = rt
        .block_on(VmDisk::prepare(&qcow, &vm, DiskBackend::Firecracker, true))
        .expect("convert");
    assert_eq!(disk.format, DiskFormat::Raw);
    assert!(disk.read_only && disk.owned);
    let info: serde_json::Value = serde_json::from_str(&run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk.path)))
    .expect("info");
    assert_eq!(info["format"], "raw");

    let vm = vm_dir(dir.path(), "ch");
    let disk = rt
        .block_on(VmDisk::prepare(
            &qcow,
            &vm,
            DiskBackend::CloudHypervisor,
            true,
        ))
        .expect("share");
    assert_eq!(disk.path, qcow.path);

    // A failure leaves no file in the VM directory.
    let mut missing = raw.clone();
    missing.path = dir.path().join("no-such.raw");
    let vm = vm_dir(dir.path(), "broken");
    let e = rt
        .block_on(VmDisk::prepare(
            &missing,
            &vm,
            DiskBackend::Firecracker,
            false,
        ))
        .expect_err("missing source");
    assert_eq!(e.reason(), "DiskToolFailed", "{e}");
    assert_eq!(std::fs::read_dir(&vm).expect("ls").count(), 0);
}
