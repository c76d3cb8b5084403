//! The demo guest: the host's Debian kernel plus an initramfs built here, by the binary itself
//! (no shell script, no download), from `busybox-static` and the kernel's own virtio modules.
//!
//! Debian's cloud kernel builds virtio_mmio, virtio_blk and virtio_net as modules and has no
//! `virtio_mmio.device=` cmdline support, so the initramfs carries those modules and loads them
//! in `modules.dep` order; QEMU `microvm`'s ACPI tables then announce the virtio-mmio devices
//! to the module. The guest's `/init` configures its network the standard ways (the kernel's
//! `ip=` parameter, else DHCP) and understands a few `ignis.*` kernel parameters so tests can
//! make it succeed, fail or time out on purpose.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use thiserror::Error;

/// What the demo guest prints on its console once it is up.
pub const DEMO_MARKER: &str = "ignis: ready";

/// The kernel command line of the demo guest. Measured here under TCG (bare QEMU, time to the
/// marker, 4 runs each on a loaded 2-core host): plain 2.9-4.4 s, `quiet` 2.2-4.5 s; adding
/// `pci=off`, `i8042.noaux`, `8250.nr_uarts=1`, `reboot=t` gave no gain within the noise, so
/// only `quiet` is kept. The QEMU backend adds `tsc_early_khz=`/`tsc=reliable` under TCG.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Where the host keeps kernels and modules.
const BOOT_DIR: &str = "/boot";
const MODULES_DIR: &str = "/lib/modules";
const BUSYBOX_CANDIDATES: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

/// The modules the guest needs for disks, network and the ACPI power button (so QEMU's
/// `system_powerdown` reaches it); their dependencies come from `modules.dep`.
const WANTED_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net", "button", "evdev"];

/// Bumped whenever the archive layout or `/init` changes shape, so old builds are redone.
const FORMAT_VERSION: &str = "ignis-demo-guest-v3";
const STAMP_FILE: &str = ".ignis-guest.stamp";

/// A built demo guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoGuest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `uname -r` of the kernel.
    pub kernel_version: String,
}

/// Errors building the demo guest.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum GuestError {
    #[error("no kernel found: {dir} has no vmlinuz-* (install linux-image-cloud-amd64)")]
    NoKernel { dir: PathBuf },
    #[error("busybox not found at {tried} (install busybox-static)")]
    NoBusybox { tried: String },
    #[error("{path} is a dynamically linked busybox; the guest needs busybox-static")]
    #[strum(serialize = "NoBusybox")]
    BusyboxNotStatic { path: PathBuf },
    #[error("kernel modules of {version} not found: {path} is missing")]
    NoModules { version: String, path: PathBuf },
    #[error("module {module} is listed in modules.dep but {path} is missing")]
    #[strum(serialize = "NoModules")]
    ModuleFileMissing { module: String, path: PathBuf },
    #[error("I/O on {path}")]
    #[strum(serialize = "GuestIoError")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GuestError + '_ {
    move |source| GuestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Build (or reuse) the demo guest from the newest `/boot/vmlinuz-*` into `out_dir`.
pub fn build_demo_guest(out_dir: &Path) -> Result<DemoGuest, GuestError> {
    let version = find_newest_kernel(Path::new(BOOT_DIR))?;
    let kernel = Path::new(BOOT_DIR).join(format!("vmlinuz-{version}"));
    build_demo_guest_from(&kernel, &version, Path::new(MODULES_DIR), out_dir)
}

/// The newest kernel version in `boot_dir`, from its `vmlinuz-<version>` files.
pub fn find_newest_kernel(boot_dir: &Path) -> Result<String, GuestError> {
    let entries = std::fs::read_dir(boot_dir).map_err(|_| GuestError::NoKernel {
        dir: boot_dir.to_path_buf(),
    })?;
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    newest_kernel_version(&names).ok_or_else(|| GuestError::NoKernel {
        dir: boot_dir.to_path_buf(),
    })
}

/// Build the guest for one kernel. Skips all work when a previous build from the same inputs
/// (same files, sizes and mtimes, same `/init`) is already in `out_dir`.
pub(crate) fn build_demo_guest_from(
    kernel: &Path,
    version: &str,
    modules_root: &Path,
    out_dir: &Path,
) -> Result<DemoGuest, GuestError> {
    let busybox = find_busybox()?;
    let mod_dir = modules_root.join(version);
    let dep_path = mod_dir.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path).map_err(|_| GuestError::NoModules {
        version: version.to_string(),
        path: dep_path.clone(),
    })?;
    let deps = parse_modules_dep(&dep_text);
    let order = module_load_order(&deps, WANTED_MODULES);
    let init = init_script(version, &order);

    let guest = DemoGuest {
        kernel: out_dir.join("vmlinuz"),
        initrd: out_dir.join("initrd.cpio"),
        kernel_version: version.to_string(),
    };

    let mut inputs: Vec<PathBuf> = vec![kernel.to_path_buf(), busybox.clone()];
    inputs.extend(order.iter().map(|rel| mod_dir.join(rel)));
    let stamp = fingerprint(&inputs, &init)?;
    let stamp_path = out_dir.join(STAMP_FILE);
    if guest.kernel.exists()
        && guest.initrd.exists()
        && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
    {
        return Ok(guest);
    }

    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let busybox_bytes = std::fs::read(&busybox).map_err(io_err(&busybox))?;
    if !is_static_elf(&busybox_bytes) {
        return Err(GuestError::BusyboxNotStatic { path: busybox });
    }

    let mut cpio = NewcWriter::default();
    for dir in [
        "dev", "proc", "sys", "tmp", "etc", "www", "bin", "sbin", "usr/bin", "usr/sbin",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    cpio.char_device("dev/console", 0o600, 5, 1);
    cpio.file("bin/busybox", 0o755, &busybox_bytes);
    cpio.symlink("bin/sh", "busybox");
    for rel in &order {
        let src = mod_dir.join(rel);
        let bytes = std::fs::read(&src).map_err(|_| GuestError::ModuleFileMissing {
            module: module_name(rel),
            path: src.clone(),
        })?;
        cpio.file(&format!("lib/modules/{version}/{rel}"), 0o644, &bytes);
    }
    cpio.file("init", 0o755, init.as_bytes());
    let archive = cpio.finish();

    write_atomically(&guest.initrd, &archive)?;
    let kernel_bytes = std::fs::read(kernel).map_err(io_err(kernel))?;
    write_atomically(&guest.kernel, &kernel_bytes)?;
    write_atomically(&stamp_path, stamp.as_bytes())?;
    Ok(guest)
}

fn find_busybox() -> Result<PathBuf, GuestError> {
    BUSYBOX_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| GuestError::NoBusybox {
            tried: BUSYBOX_CANDIDATES.join(", "),
        })
}

/// A hash of every input's identity (path, size, mtime) and the `/init` text.
fn fingerprint(inputs: &[PathBuf], init: &str) -> Result<String, GuestError> {
    let mut h = Sha256::new();
    h.update(FORMAT_VERSION.as_bytes());
    for path in inputs {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(path.to_string_lossy().as_bytes());
        h.update(meta.len().to_le_bytes());
        h.update(mtime.to_le_bytes());
    }
    h.update(init.as_bytes());
    Ok(hex::encode(h.finalize()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), GuestError> {
    super::atomic_file::write_atomically(path, bytes).map_err(io_err(path))
}

/// Whether an ELF file has no `PT_INTERP` program header (i.e. needs no dynamic loader).
fn is_static_elf(bytes: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let le_u16 = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let le_u32 = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let le_u64 = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    // Only 64-bit little-endian ELF is expected here (x86_64 hosts).
    if bytes.get(0..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1][..]) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (le_u64(0x20), le_u16(0x36), le_u16(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let off = usize::try_from(phoff).unwrap_or(usize::MAX) + i * usize::from(phentsize);
        le_u32(off) != Some(PT_INTERP)
    })
}

/// The newest version among `vmlinuz-<version>` names (version-aware: `6.10` > `6.9`).
pub(crate) fn newest_kernel_version(names: &[String]) -> Option<String> {
    names
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| !v.is_empty() && !v.ends_with(".old") && !v.ends_with(".bak"))
        .max_by(|a, b| version_key(a).cmp(&version_key(b)))
        .map(str::to_string)
}

/// Splits a version into numeric and textual runs so numbers compare as numbers.
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut chars = v.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_ascii_digit() {
            let mut n = String::new();
            while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                n.push(d);
                chars.next();
            }
            out.push((n.parse().unwrap_or(u64::MAX), String::new()));
        } else {
            let mut s = String::new();
            while let Some(&d) = chars.peek().filter(|d| !d.is_ascii_digit()) {
                s.push(d);
                chars.next();
            }
            out.push((0, s));
        }
    }
    out
}

/// `modules.dep`: module path (relative to the modules dir) → its dependencies' paths.
pub(crate) fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    text.lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            let module = module.trim();
            if module.is_empty() {
                return None;
            }
            Some((
                module.to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// The module name of a path: `kernel/drivers/net/virtio_net.ko.xz` → `virtio_net`.
pub(crate) fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The module files to load, dependencies first. Wanted modules absent from `modules.dep` are
/// taken to be built into the kernel and skipped.
pub(crate) fn module_load_order(
    deps: &BTreeMap<String, Vec<String>>,
    wanted: &[&str],
) -> Vec<String> {
    let by_name: HashMap<String, &String> = deps.keys().map(|p| (module_name(p), p)).collect();
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        path: &str,
        deps: &BTreeMap<String, Vec<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(path.to_string()) {
            return;
        }
        // modules.dep lists every transitive dependency, but not necessarily in load order,
        // so recurse instead of trusting the listed order.
        for dep in deps.get(path).into_iter().flatten() {
            visit(dep, deps, seen, order);
        }
        order.push(path.to_string());
    }
    for name in wanted {
        if let Some(path) = by_name.get(&name.replace('-', "_")) {
            visit(path, deps, &mut seen, &mut order);
        }
    }
    order
}

/// The guest's `/init` (busybox sh).
pub(crate) fn init_script(version: &str, modules: &[String]) -> String {
    let module_paths: Vec<String> = modules
        .iter()
        .map(|m| format!("/lib/modules/{version}/{m}"))
        .collect();
    format!(
        r#"#!/bin/busybox sh
# ignis demo guest init. Network: the kernel's standard ip= parameter
# (ip=<client>::<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>), or DHCP when
# there is none (or ip=dhcp). Test knobs: ignis.name= ignis.exit=success|failure
# ignis.exit_after=<seconds>
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do
  insmod "$m" 2>/dev/null || echo "ignis: insmod $m failed"
done
# The last occurrence wins, as for the kernel's own parameters.
param() {{
  v=
  for w in $(cat /proc/cmdline); do
    case "$w" in "$1="*) v="${{w#*=}}";; esac
  done
  echo "$v"
}}
ip link set lo up
ipconf=$(param ip)
case "$ipconf" in
  ""|dhcp|on|any|both|off|none) ;;
  *)
    IFS=: read -r client server gw mask host dev auto dns0 dns1 <<IP
$ipconf
IP
    dev=${{dev:-eth0}}
    [ -n "$host" ] && hostname "$host"
    if [ -e "/sys/class/net/$dev" ]; then
      ifconfig "$dev" "$client" netmask "${{mask:-255.255.255.0}}" up
      [ -n "$gw" ] && route add default gw "$gw"
    fi
    : > /etc/resolv.conf
    for d in $dns0 $dns1; do echo "nameserver $d" >> /etc/resolv.conf; done ;;
esac
name=$(param ignis.name)
[ -n "$name" ] && hostname "$name"
case "$ipconf" in
  ""|dhcp|on|any|both)
    if [ -e /sys/class/net/eth0 ]; then
      cat > /etc/udhcpc.script <<'DHCP'
#!/bin/sh
case "$1" in
  deconfig) ifconfig "$interface" 0.0.0.0 up ;;
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${{subnet:-255.255.255.0}}" up
    for r in $router; do route add default gw "$r"; break; done
    : > /etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >> /etc/resolv.conf; done ;;
esac
DHCP
      chmod 755 /etc/udhcpc.script
      # In the background: readiness does not wait for a DHCP server that may not exist.
      udhcpc -i eth0 -s /etc/udhcpc.script -t 10 -T 1 -n -q >/dev/null 2>&1 &
    fi ;;
esac
# QEMU's system_powerdown arrives as an ACPI power button press.
for ev in /sys/class/input/event*; do
  if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
    (if dd if="/dev/input/${{ev##*/}}" of=/dev/null bs=24 count=1 2>/tmp/button.err; then
      echo "ignis: power button"; poweroff -f
    else
      echo "ignis: cannot watch the power button: $(cat /tmp/button.err)"
    fi) &
  fi
done
cat > /www/index.html <<PAGE
<html><body><h1>ignis demo guest</h1><p>hostname: $(hostname)</p><p>kernel: $(uname -r)</p></body></html>
PAGE
# /cgi-bin/state: the guest's uptime and a note kept in tmpfs (`?set=<word>` writes it), so
# a suspend and resume can be seen to keep the guest's memory.
mkdir -p /run /www/cgi-bin
mount -t tmpfs tmpfs /run
cat > /www/cgi-bin/state <<'CGI'
#!/bin/sh
case "$QUERY_STRING" in set=*) echo "${{QUERY_STRING#set=}}" > /run/note ;; esac
echo "Content-Type: text/plain"
echo
echo "uptime $(cut -d' ' -f1 /proc/uptime)"
echo "note $(cat /run/note 2>/dev/null)"
echo "hostname=$(hostname)"
sed 's/^/label./' /run/ignis/labels 2>/dev/null
CGI
chmod 755 /www/cgi-bin/state
httpd -p 80 -h /www
# The metadata channel (docs/networking.md): who the guest is now. A pool's warm VM learns the
# hostname, labels and userData of the MicroVM that claimed it here, with no boot. It long-polls
# the version (the agent answers within 55 s) and waits 1 s after an error or no change, so a
# guest without the channel costs one failed request a second. Busybox wget's -T crashes in
# Debian's busybox-static, so `timeout` bounds each request instead.
mkdir -p /run/ignis
md=http://169.254.169.254/ignis/v1
fetch() {{ timeout "$1" wget -q -O "$2" "$md/$3"; }}
metadata_loop() {{
  seen=0
  while true; do
    v=$(fetch 70 - "version?wait=$seen" 2>/dev/null)
    if [ -z "$v" ] || [ "$v" = "$seen" ]; then sleep 1; continue; fi
    h=$(fetch 10 - hostname 2>/dev/null) || {{ sleep 1; continue; }}
    fetch 10 /run/ignis/labels.new labels 2>/dev/null || {{ sleep 1; continue; }}
    if err=$(fetch 10 /run/ignis/user-data.new user-data 2>&1); then
      mv /run/ignis/user-data.new /run/ignis/user-data
    else
      rm -f /run/ignis/user-data.new
      case "$err" in *" 404 "*) rm -f /run/ignis/user-data ;; *) sleep 1; continue ;; esac
    fi
    [ -n "$h" ] && hostname "$h"
    mv /run/ignis/labels.new /run/ignis/labels
    seen=$v
    echo "ignis: metadata version $v"
  done
}}
[ -e /sys/class/net/eth0 ] && metadata_loop </dev/null &
echo "{marker}"
finish() {{
  case "$1" in
    failure) echo "ignis: failing on request"; echo c > /proc/sysrq-trigger; exit 1;;
    *) echo "ignis: powering off on request"; poweroff -f;;
  esac
}}
ex=$(param ignis.exit)
after=$(param ignis.exit_after)
if [ -n "$after" ]; then
  sleep "$after"
  finish "${{ex:-success}}"
elif [ -n "$ex" ]; then
  finish "$ex"
fi
while true; do sleep 3600; done
"#,
        modules = module_paths.join(" "),
        marker = DEMO_MARKER,
    )
}

/// A newc ("070701") cpio archive writer: enough for an initramfs the kernel unpacks.
#[derive(Default)]
pub struct NewcWriter {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl NewcWriter {
    /// A directory (parents are added as needed).
    pub(crate) fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_string());
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), b"");
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parent(path);
        self.entry(path, S_IFREG | perm, 1, (0, 0), data);
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    pub(crate) fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.parent(path);
        self.entry(path, S_IFCHR | perm, 1, (major, minor), b"");
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), b"");
        self.buf
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
        // Sizes beyond u32 cannot be expressed in newc; initramfs members are far smaller.
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let namesize = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_kernel_compares_versions_numerically() {
        let names = vec![
            "config-6.1.0-56-cloud-amd64".to_string(),
            "vmlinuz-6.1.0-9-cloud-amd64".to_string(),
            "vmlinuz-6.1.0-56-cloud-amd64".to_string(),
            "vmlinuz-5.10.0-30-cloud-amd64".to_string(),
        ];
        assert_eq!(
            newest_kernel_version(&names).as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(newest_kernel_version(&["System.map-1".to_string()]), None);
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let dep = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
";
        let deps = parse_modules_dep(dep);
        let order = module_load_order(&deps, &["virtio_mmio", "virtio_net", "not_there"]);
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            vec![
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn module_names_strip_compression_suffix() {
        assert_eq!(module_name("kernel/a/virtio-rng.ko.xz"), "virtio_rng");
        assert_eq!(module_name("kernel/a/evdev.ko"), "evdev");
    }

    #[test]
    fn newc_archive_has_parents_trailer_and_alignment() {
        let mut w = NewcWriter::default();
        w.file("lib/modules/x/a.ko", 0o644, b"abc");
        let out = w.finish();
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let lib = text.find("lib\0").expect("lib dir entry");
        let modules = text.find("lib/modules\0").expect("lib/modules entry");
        let file = text.find("lib/modules/x/a.ko\0").expect("file entry");
        assert!(lib < modules && modules < file);
        assert!(text.contains("TRAILER!!!\0"));
        assert!(out.starts_with(b"070701"));
        // The first header: a directory, mode 040755.
        assert_eq!(&out[14..22], b"000041ed");
    }

    #[test]
    fn init_script_loads_modules_and_prints_marker() {
        let s = init_script("6.1", &["kernel/x/virtio.ko".to_string()]);
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("/lib/modules/6.1/kernel/x/virtio.ko"));
        assert!(s.contains(&format!("echo \"{DEMO_MARKER}\"")));
        assert!(s.contains("sysrq-trigger"));
        // The standard mechanisms only: ip=, else DHCP.
        assert!(s.contains("ipconf=$(param ip)"));
        assert!(s.contains("udhcpc -i eth0"));
        assert!(!s.contains("ignis.ip") && !s.contains("ignis.gw"));
        // The metadata channel: long-polled, applied, shown by /cgi-bin/state.
        assert!(s.contains("version?wait=$seen"));
        assert!(s.contains("hostname \"$h\""));
        assert!(s.contains("echo \"hostname=$(hostname)\""));
        assert!(s.contains("s/^/label./"));
        assert!(!s.contains("wget -T"), "busybox-static's wget -T crashes");
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"not an elf"));
        if let Ok(bytes) = std::fs::read("/bin/busybox") {
            assert!(
                is_static_elf(&bytes),
                "busybox-static should have no PT_INTERP"
            );
        }
        if let Ok(bytes) = std::fs::read("/bin/ls") {
            assert!(!is_static_elf(&bytes), "/bin/ls is dynamically linked");
        }
    }
}
