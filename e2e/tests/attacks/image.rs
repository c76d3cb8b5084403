//! Hostile OCI images, written byte by byte here and pushed to the cluster's registry with
//! plain HTTP (`curl`): a registry client would refuse to push what they are (entries with
//! `..`, a manifest that lies about its layer's size).

use std::io::Write;
use std::process::Command;

use sha2::{Digest, Sha256};

/// One tar entry, its header written raw so that names a tar library refuses (`..`) can be
/// written too.
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, u32, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    /// A character (`true`) or block device node with its major and minor.
    Device(&'a str, bool, u32, u32),
}

fn header(name: &str, mode: u32, size: u64, kind: tar::EntryType, link: &str) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().expect("a GNU header");
        assert!(name.len() < gnu.name.len() && link.len() < gnu.linkname.len());
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_mode(mode);
    h.set_size(size);
    h.set_entry_type(kind);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

/// The uncompressed tar of `entries`.
pub fn tar(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (h, data): (tar::Header, &[u8]) = match e {
            Entry::Dir(n) => (header(n, 0o755, 0, tar::EntryType::Directory, ""), &[]),
            Entry::File(n, mode, data) => (
                header(n, *mode, data.len() as u64, tar::EntryType::Regular, ""),
                data,
            ),
            Entry::Symlink(n, to) => (header(n, 0o777, 0, tar::EntryType::Symlink, to), &[]),
            Entry::HardLink(n, to) => (header(n, 0o644, 0, tar::EntryType::Link, to), &[]),
            Entry::Device(n, char_dev, major, minor) => {
                let kind = if *char_dev {
                    tar::EntryType::Char
                } else {
                    tar::EntryType::Block
                };
                let mut h = header(n, 0o666, 0, kind, "");
                h.set_device_major(*major).expect("major");
                h.set_device_minor(*minor).expect("minor");
                h.set_cksum();
                (h, &[])
            }
        };
        b.append(&h, data).expect("tar entry");
    }
    b.into_inner().expect("tar")
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The registry at `addr` (plain HTTP) with its `user:password`.
pub struct Registry {
    pub addr: String,
    pub creds: String,
}

impl Registry {
    fn curl(&self, args: &[&str], body: Option<&[u8]>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "60",
            "-u",
            &self.creds,
            "-o",
            "/dev/stderr",
        ])
        .args(["-w", "%{http_code}"])
        .args(args);
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(body) = body {
            let file = dir.path().join("body");
            std::fs::File::create(&file)
                .and_then(|mut f| f.write_all(body))
                .expect("write the body");
            cmd.arg("--data-binary").arg(format!("@{}", file.display()));
        }
        let out = cmd.output().expect("curl runs");
        let code = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        (code, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        // The two-step upload every registry implements: POST for a location, PUT the bytes.
        let start = format!("http://{}/v2/{repo}/blobs/uploads/", self.addr);
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "60", "-u", &self.creds, "-X", "POST"])
            .args(["-D", "-", "-o", "/dev/null", &start])
            .output()
            .expect("curl runs");
        let headers = String::from_utf8_lossy(&out.stdout);
        let location = headers
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("location")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no upload location from {start}: {headers}"));
        let location = if location.starts_with('/') {
            format!("http://{}{location}", self.addr)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{sep}digest={digest}");
        let (code, out) = self.curl(
            &[
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                &url,
            ],
            Some(bytes),
        );
        assert_eq!(code, 201, "upload of blob {digest} to {repo}: {out}");
        digest
    }

    /// Push an image of one gzip layer holding `layer_tar`, tagged `v1`; its manifest says the
    /// layer has `declared_size` bytes when given (a lie), else its true size. Returns the
    /// image reference.
    pub fn push(&self, repo: &str, layer_tar: &[u8], declared_size: Option<u64>) -> String {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(layer_tar).expect("gzip");
        let layer = gz.finish().expect("gzip");
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [sha256(layer_tar)] },
        })
        .to_string();
        let config_digest = self.blob(repo, config.as_bytes());
        let layer_digest = self.blob(repo, &layer);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": declared_size.unwrap_or(layer.len() as u64),
            }],
        })
        .to_string();
        let url = format!("http://{}/v2/{repo}/manifests/v1", self.addr);
        let (code, out) = self.curl(
            &[
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/vnd.oci.image.manifest.v1+json",
                &url,
            ],
            Some(manifest.as_bytes()),
        );
        assert_eq!(code, 201, "push of the manifest of {repo}: {out}");
        format!("{}/{repo}:v1", self.addr)
    }
}
