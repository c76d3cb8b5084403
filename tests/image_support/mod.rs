//! Helpers for the image tests: Debian's `docker-registry` started on a loopback port (with or
//! without htpasswd basic auth), OCI image layouts written here from tar layers, and `skopeo`
//! pushing them — a real registry and a real pusher, independent of the client under test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const USER: &str = "ignis";
pub const PASSWORD: &str = "s3cret-pass";

fn find(tool: &str) -> Option<PathBuf> {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

/// Fail (never skip) when a prerequisite is missing: CI installs them.
pub fn require(tools: &[(&str, &str)]) {
    for (tool, package) in tools {
        assert!(
            find(tool).is_some(),
            "`{tool}` is missing: run scripts/setup-images.sh (Debian package {package})"
        );
    }
}

pub fn require_registry_tools() {
    require(&[
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("htpasswd", "apache2-utils"),
    ]);
}

/// A free loopback port (the registry binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A `docker-registry` on 127.0.0.1, storage in a temporary directory; killed on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    pub storage: PathBuf,
    pub auth: bool,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start(auth: bool) -> Registry {
        require_registry_tools();
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).expect("storage");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            storage.display()
        );
        if auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("htpasswd");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: ignis-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = Command::new(find("docker-registry").expect("docker-registry"))
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            child,
            addr,
            storage,
            auth,
            _dir: dir,
        };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut buf = [0u8; 12];
                if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {}",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `skopeo copy oci:<layout>:<tag> docker://<addr>/<repo>`.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--insecure-policy",
            "--dest-tls-verify=false",
        ]);
        if self.auth {
            cmd.args(["--dest-creds", &format!("{USER}:{PASSWORD}")]);
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}", self.addr))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo push of {repo} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The registry's stored copy of a blob.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A file or directory in a tar layer.
pub enum Item<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
}

/// A containerDisk image (`tag` in `layout`): one layer holding `files` under `/disk/`.
pub fn disk_image(layout: &Path, tag: &str, files: &[(&str, &[u8])]) -> String {
    let paths: Vec<String> = files
        .iter()
        .map(|(name, _)| format!("disk/{name}"))
        .collect();
    let mut items = vec![Item::Dir("disk")];
    items.extend(
        paths
            .iter()
            .zip(files)
            .map(|(path, (_, bytes))| Item::File(path, bytes)),
    );
    oci_image(layout, tag, &[tar_layer(&items)])
}

/// The bytes of a qcow2 file of `size` made by `qemu-img create` in `dir`, over `backing` (a
/// raw file) when given.
pub fn qcow2_bytes(dir: &Path, size: &str, backing: Option<&Path>) -> Vec<u8> {
    let path = dir.join("made.qcow2");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some(backing) = backing {
        cmd.args(["-F", "raw", "-b"]).arg(backing);
    }
    let st = cmd.arg(&path).arg(size).status().expect("qemu-img");
    assert!(st.success(), "qemu-img create failed");
    let bytes = std::fs::read(&path).expect("qcow2");
    std::fs::remove_file(&path).expect("remove the made qcow2");
    bytes
}

/// An uncompressed tar layer.
pub fn tar_layer(items: &[Item<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for item in items {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match item {
            Item::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).expect("dir");
            }
            Item::File(p, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).expect("file");
            }
            Item::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, p, target).expect("symlink");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = sha256_hex(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).expect("blob");
    (format!("sha256:{hex}"), bytes.len())
}

/// Write (or extend) an OCI image layout at `layout` with an image of `layers` (gzipped) under
/// `tag`. Returns the manifest digest.
pub fn oci_image(layout: &Path, tag: &str, layers: &[Vec<u8>]) -> String {
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("layout");
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in layers {
        diff_ids.push(format!("sha256:{}", sha256_hex(tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(tar).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let (digest, size) = put_blob(layout, &gz);
        descriptors.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids } });
    let (cdigest, csize) = put_blob(layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": cdigest, "size": csize },
        "layers": descriptors });
    let (mdigest, msize) = put_blob(layout, manifest.to_string().as_bytes());
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    let manifests = index["manifests"].as_array_mut().expect("manifests");
    manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    manifests.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": mdigest, "size": msize,
        "annotations": { "org.opencontainers.image.ref.name": tag } }));
    std::fs::write(&index_path, index.to_string()).expect("index");
    mdigest
}

/// A kernel image (`/boot/vmlinuz` = `kernel`) under `tag`; its manifest digest.
pub fn kernel_image(layout: &Path, tag: &str, kernel: &[u8]) -> String {
    oci_image(
        layout,
        tag,
        &[tar_layer(&[
            Item::Dir("boot"),
            Item::File("boot/vmlinuz", kernel),
        ])],
    )
}

/// A fake but well-formed x86 bzImage header (`HdrS` at 0x202), padded to `len`.
pub fn fake_bzimage(len: usize) -> Vec<u8> {
    let mut k = vec![0u8; len.max(0x300)];
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k
}

/// Files and directories under `dir` (relative), to prove nothing was left behind.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).expect("prefix").display().to_string());
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// `debugfs -R 'cat <path>'` on an ext4 image: an independent reader of the disk we made.
pub fn ext4_cat(image: &Path, path: &str) -> String {
    let out = Command::new(find("debugfs").expect("debugfs (e2fsprogs)"))
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
