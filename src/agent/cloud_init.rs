//! The cloud-init NoCloud drive: how `userData` reaches stock cloud images. An ISO9660 image
//! (Rock Ridge and Joliet, made by Debian's `genisoimage`) with the volume label `cidata`
//! holding `user-data`, `meta-data` (`instance-id`, `local-hostname`) and, when the VM has a
//! static address, `network-config` (version 2). cloud-init's NoCloud datasource finds it by
//! its label; the VMM attaches it read-only.

use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::agent::image::tool::{self, ToolError};

/// The volume label cloud-init's NoCloud datasource looks for.
pub const VOLUME_LABEL: &str = "cidata";
/// The drive's file name in the VM directory.
pub const DRIVE_FILE: &str = "cidata.iso";
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors building a NoCloud drive; each variant's word (`reason()`) lands in conditions,
/// Events and metric labels.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum CloudInitError {
    #[error(
        "hostname {hostname:?} is not a valid host name (RFC 1123 labels, at most 63 characters each)"
    )]
    InvalidHostname { hostname: String },
    #[error("instance id must not be empty")]
    #[strum(serialize = "InvalidInstanceId")]
    EmptyInstanceId,
    #[error("cannot build the NoCloud drive: genisoimage is missing (install genisoimage)")]
    #[strum(serialize = "CloudInitToolMissing")]
    ToolMissing(#[source] ToolError),
    #[error("cannot build the NoCloud drive")]
    #[strum(serialize = "CloudInitDriveFailed")]
    Tool(#[source] ToolError),
    #[error("I/O on {path}")]
    #[strum(serialize = "CloudInitIoError")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl CloudInitError {
    fn tool(error: ToolError) -> CloudInitError {
        match error {
            ToolError::Missing { .. } => CloudInitError::ToolMissing(error),
            other => CloudInitError::Tool(other),
        }
    }
}

/// One guest interface as cloud-init should configure it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestInterface {
    /// The name the guest gives it (`eth0`).
    pub name: String,
    /// Matched by MAC, so the name holds whatever the guest's naming policy.
    pub mac: String,
    /// A static address and prefix length; `None` = DHCP.
    pub address: Option<(Ipv4Addr, u8)>,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

/// What goes on the drive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoCloudConfig {
    /// cloud-init runs per-instance modules again when this changes: the VM uid.
    pub instance_id: String,
    pub hostname: String,
    /// `userData` as given (a `#cloud-config`, a script, a MIME multipart…); empty if none.
    pub user_data: String,
    pub interfaces: Vec<GuestInterface>,
}

/// `meta-data`.
pub fn meta_data(instance_id: &str, hostname: &str) -> String {
    #[derive(Serialize)]
    struct Meta<'a> {
        #[serde(rename = "instance-id")]
        instance_id: &'a str,
        #[serde(rename = "local-hostname")]
        local_hostname: &'a str,
    }
    serde_yaml::to_string(&Meta {
        instance_id,
        local_hostname: hostname,
    })
    .unwrap_or_default()
}

/// `network-config` (version 2) when some interface has a static address; interfaces without
/// one use DHCP. `None` lets the guest's default (DHCP on the first NIC) stand.
pub fn network_config(interfaces: &[GuestInterface]) -> Option<String> {
    if interfaces.iter().all(|i| i.address.is_none()) {
        return None;
    }
    #[derive(Serialize)]
    struct Config {
        version: u8,
        ethernets: std::collections::BTreeMap<String, Ethernet>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "kebab-case")]
    struct Ethernet {
        #[serde(rename = "match")]
        matches: Match,
        set_name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        dhcp4: Option<bool>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        addresses: Vec<String>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        routes: Vec<Route>,
        #[serde(skip_serializing_if = "Option::is_none")]
        nameservers: Option<Nameservers>,
    }
    #[derive(Serialize)]
    struct Match {
        macaddress: String,
    }
    #[derive(Serialize)]
    struct Route {
        to: String,
        via: String,
    }
    #[derive(Serialize)]
    struct Nameservers {
        addresses: Vec<String>,
    }
    let ethernets = interfaces
        .iter()
        .map(|i| {
            let eth = match i.address {
                Some((ip, prefix)) => Ethernet {
                    matches: Match {
                        macaddress: i.mac.to_ascii_lowercase(),
                    },
                    set_name: i.name.clone(),
                    dhcp4: None,
                    addresses: vec![format!("{ip}/{prefix}")],
                    routes: i
                        .gateway
                        .map(|gw| Route {
                            to: "0.0.0.0/0".into(),
                            via: gw.to_string(),
                        })
                        .into_iter()
                        .collect(),
                    nameservers: (!i.dns.is_empty()).then(|| Nameservers {
                        addresses: i.dns.iter().map(|d| d.to_string()).collect(),
                    }),
                },
                None => Ethernet {
                    matches: Match {
                        macaddress: i.mac.to_ascii_lowercase(),
                    },
                    set_name: i.name.clone(),
                    dhcp4: Some(true),
                    addresses: vec![],
                    routes: vec![],
                    nameservers: None,
                },
            };
            (i.name.clone(), eth)
        })
        .collect();
    serde_yaml::to_string(&Config {
        version: 2,
        ethernets,
    })
    .ok()
}

/// RFC 1123 host name: labels of letters, digits and inner hyphens, 1-63 each, 253 in all.
pub fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A built drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoCloudDrive {
    pub path: PathBuf,
}

impl NoCloudDrive {
    /// Write the drive to `path` (whole or not at all). Attach it read-only.
    pub async fn build(
        config: &NoCloudConfig,
        path: &Path,
    ) -> Result<NoCloudDrive, CloudInitError> {
        if config.instance_id.is_empty() {
            return Err(CloudInitError::EmptyInstanceId);
        }
        if !is_valid_hostname(&config.hostname) {
            return Err(CloudInitError::InvalidHostname {
                hostname: config.hostname.clone(),
            });
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| DRIVE_FILE.to_string());
        let staging = dir.join(format!(".{name}.d"));
        let tmp = dir.join(format!(".{name}.tmp"));
        let result = Self::write(config, &staging, &tmp, path).await;
        let _ = std::fs::remove_dir_all(&staging);
        let _ = std::fs::remove_file(&tmp);
        result.map(|()| NoCloudDrive {
            path: path.to_path_buf(),
        })
    }

    async fn write(
        config: &NoCloudConfig,
        staging: &Path,
        tmp: &Path,
        path: &Path,
    ) -> Result<(), CloudInitError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CloudInitError::Io { path: p, source }
        };
        let _ = std::fs::remove_dir_all(staging);
        std::fs::create_dir(staging).map_err(io(staging))?;
        let mut files = vec![
            ("user-data", config.user_data.clone()),
            (
                "meta-data",
                meta_data(&config.instance_id, &config.hostname),
            ),
        ];
        if let Some(net) = network_config(&config.interfaces) {
            files.push(("network-config", net));
        }
        let mut args: Vec<std::ffi::OsString> = [
            "-quiet",
            "-input-charset",
            "utf-8",
            "-volid",
            VOLUME_LABEL,
            "-joliet",
            "-rock",
            "-output",
        ]
        .iter()
        .map(Into::into)
        .collect();
        args.push(tmp.into());
        for (name, content) in &files {
            let p = staging.join(name);
            std::fs::write(&p, content).map_err(io(&p))?;
            args.push(p.into());
        }
        tool::run("genisoimage", args, TOOL_TIMEOUT)
            .await
            .map_err(CloudInitError::tool)?;
        std::fs::rename(tmp, path).map_err(io(path))
    }

    /// Remove the drive. Idempotent.
    pub fn remove(path: &Path) -> Result<(), CloudInitError> {
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CloudInitError::Io {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(address: Option<(Ipv4Addr, u8)>) -> GuestInterface {
        GuestInterface {
            name: "eth0".into(),
            mac: "52:54:00:AB:CD:EF".into(),
            address,
            gateway: address.map(|_| Ipv4Addr::new(192, 168, 1, 1)),
            dns: vec![Ipv4Addr::new(192, 168, 1, 1)],
        }
    }

    #[test]
    fn meta_data_names_the_instance_and_host() {
        let m: serde_yaml::Value =
            serde_yaml::from_str(&meta_data("uid-1", "web-0")).expect("yaml");
        assert_eq!(m["instance-id"], "uid-1");
        assert_eq!(m["local-hostname"], "web-0");
    }

    #[test]
    fn network_config_only_for_static_addresses() {
        assert_eq!(network_config(&[iface(None)]), None);
        let text =
            network_config(&[iface(Some((Ipv4Addr::new(192, 168, 1, 20), 24)))]).expect("static");
        let v: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        let eth = &v["ethernets"]["eth0"];
        assert_eq!(v["version"], 2);
        assert_eq!(eth["match"]["macaddress"], "52:54:00:ab:cd:ef");
        assert_eq!(eth["set-name"], "eth0");
        assert_eq!(eth["addresses"][0], "192.168.1.20/24");
        assert_eq!(eth["routes"][0]["to"], "0.0.0.0/0");
        assert_eq!(eth["routes"][0]["via"], "192.168.1.1");
        assert_eq!(eth["nameservers"]["addresses"][0], "192.168.1.1");
    }

    #[test]
    fn host_names_follow_rfc_1123() {
        for ok in ["a", "web-0", "vm.example.com", &"a".repeat(63)] {
            assert!(is_valid_hostname(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a_b", "a..b", &"a".repeat(64), "ä"] {
            assert!(!is_valid_hostname(bad), "{bad}");
        }
    }
}
