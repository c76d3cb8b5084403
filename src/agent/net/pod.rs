//! A guest on its VM pod's network (interface mode `pod`): masquerade inside the pod's network
//! namespace, as KubeVirt's default binding does. The pod keeps its IP on `eth0`; the guest sits
//! behind a tap `tap0` (`10.0.2.1/30` on the pod's side, `10.0.2.2/30` the guest's, told by
//! the kernel's `ip=`), and nftables in the pod's namespace:
//! - DNAT traffic to the pod IP arriving on `eth0` to the guest, so Services, other pods and
//!   the kubelet reach the guest at the pod IP;
//! - DNAT locally generated traffic to `127.0.0.1` to the guest and SNAT it to `10.0.2.1`
//!   (`route_localnet` on `tap0`), so `kubectl port-forward`, which dials localhost inside the
//!   pod's namespace, reaches it;
//! - masquerade the guest's outbound traffic behind the pod IP;
//! - drop what the guest sends from another address or another MAC.
//!
//! Everything lives in the pod's namespace (IPv4 forwarding too), so it all goes away with the
//! pod. The work runs on a thread of its own that enters the namespace and ends with the work,
//! so nothing else of the agent ever runs there; `nft` started from that thread runs there too.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::link::Netlink;
use super::mac::Mac;
use super::tap::{TapOwner, create_owned_tap, run_ip, wait_bounded};
use super::{AttachedInterface, InterfaceMode, NetError};
use crate::agent::metadata;

/// The guest's tap in the pod's namespace.
pub(crate) const TAP: &str = "tap0";
/// The pod's side of the tap: the guest's gateway.
pub(crate) const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The guest's address.
pub(crate) const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub(crate) const PREFIX: u8 = 30;
/// The pod's interface, as CNI plugins name it.
pub(crate) const POD_INTERFACE: &str = "eth0";
/// The nftables table of the wiring, in the pod's namespace.
const TABLE: &str = "ignis_pod";

/// What the pod's side of a guest interface needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodNet {
    /// The pod's network namespace (`/proc/<pid>/ns/net`).
    pub(crate) netns: PathBuf,
    /// The pod IP; `None`: read from the pod's `eth0`.
    pub(crate) pod_ip: Option<Ipv4Addr>,
    /// The guest interface's name (`eth0`) and MAC.
    pub(crate) interface: String,
    pub(crate) mac: Mac,
    /// The uid and gid the VMM runs as, which must own the tap to open it; `None`: root.
    pub(crate) tap_owner: Option<TapOwner>,
    /// DNS servers for the guest (the pod's own resolvers).
    pub(crate) dns: Vec<Ipv4Addr>,
}

/// The rules of the wiring, as one `nft -f` transaction: the table is added, deleted and made
/// again, so a second wiring (a new run in the same pod) replaces the first atomically.
pub(crate) fn ruleset(pod_ip: Ipv4Addr, guest_mac: Mac) -> String {
    format!(
        r#"add table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
    chain antispoof {{
        type filter hook prerouting priority raw; policy accept;
        iifname "{TAP}" ip saddr != {GUEST} drop
        iifname "{TAP}" ether saddr != {guest_mac} drop
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {metadata} iifname != "{TAP}" drop
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{POD_INTERFACE}" ip daddr {pod_ip} dnat to {GUEST}
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
        ip daddr 127.0.0.1 dnat to {GUEST}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{TAP}" ip saddr 127.0.0.0/8 snat to {GATEWAY}
        ip saddr {GUEST} oifname "{POD_INTERFACE}" masquerade
    }}
}}
"#,
        metadata = metadata::ADDRESS,
    )
}

/// Wire the guest into the pod's network: the tap, its address, forwarding, the rules.
/// Idempotent. Returns the interface as attached (its address for status is the pod IP).
pub(crate) async fn wire(pod: &PodNet) -> Result<AttachedInterface, NetError> {
    let runtime = tokio::runtime::Handle::current();
    let owner = pod.tap_owner;
    let netlink = in_netns(&pod.netns, move || {
        let _runtime = runtime.enter();
        create_tap(owner)?;
        Netlink::connect().map_err(NetError::Netlink)
    })
    .await?;
    let tap = netlink.link(TAP).await?.ok_or_else(|| NetError::Tap {
        tap: TAP.into(),
        source: std::io::Error::other("the tap vanished after its creation"),
    })?;
    netlink.add_address(tap.index, GATEWAY, PREFIX).await?;
    // The metadata channel's address, on the guest's side of the pod only.
    netlink
        .add_address(tap.index, metadata::ADDRESS, 32)
        .await?;
    if !tap.up {
        netlink.set_up(tap.index).await?;
    }
    let pod_ip = match pod.pod_ip {
        Some(ip) => ip,
        None => {
            let eth0 = netlink
                .link(POD_INTERFACE)
                .await?
                .ok_or(NetError::PodIpUnknown)?;
            netlink
                .ipv4_addresses(eth0.index)
                .await?
                .first()
                .map(|(ip, _)| *ip)
                .ok_or(NetError::PodIpUnknown)?
        }
    };
    drop(netlink);
    let rules = ruleset(pod_ip, pod.mac);
    in_netns(&pod.netns, move || {
        sysctl("/proc/sys/net/ipv4/ip_forward")?;
        sysctl(&format!("/proc/sys/net/ipv4/conf/{TAP}/route_localnet"))?;
        nft(&rules)
    })
    .await?;
    Ok(AttachedInterface {
        name: pod.interface.clone(),
        mode: InterfaceMode::Pod,
        tap: TAP.into(),
        mac: pod.mac.to_string(),
        bridge: String::new(),
        address: Some((GUEST, PREFIX)),
        gateway: Some(GATEWAY),
        dns: pod.dns.clone(),
        reachable_at: Some(pod_ip),
    })
}

/// The metadata channel's listening socket in the pod's network namespace, at
/// `169.254.169.254:80` on the pod's side of the tap (put there by [`wire`]). Bound on a
/// thread that entered the namespace; the socket stays in it whatever thread uses it.
pub(crate) async fn bind_metadata(netns: &Path) -> Result<std::net::TcpListener, NetError> {
    let path = netns.to_path_buf();
    in_netns(netns, move || {
        let bound = std::net::TcpListener::bind((metadata::ADDRESS, metadata::PORT))
            .and_then(|listener| listener.set_nonblocking(true).map(|()| listener));
        bound.map_err(|source| NetError::PodNetns { path, source })
    })
    .await
}

/// Run `work` on a new thread inside the network namespace `netns`; the thread ends with it.
async fn in_netns<T: Send + 'static>(
    netns: &Path,
    work: impl FnOnce() -> Result<T, NetError> + Send + 'static,
) -> Result<T, NetError> {
    let path = netns.to_path_buf();
    let enter_error = |source: std::io::Error| NetError::PodNetns {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(enter_error)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ignis-pod-netns".into())
        .spawn(move || {
            let result = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|errno| NetError::PodNetns {
                    path: PathBuf::new(),
                    source: errno.into(),
                })
                .and_then(|()| work());
            let _ = tx.send(result);
        })
        .map_err(enter_error)?;
    match rx.await {
        Ok(Err(NetError::PodNetns { source, .. })) => Err(enter_error(source)),
        Ok(result) => result,
        Err(_) => Err(enter_error(std::io::Error::other(
            "the thread in the namespace ended without an answer",
        ))),
    }
}

/// Create `tap0` persistent, owned by the VMM's uid and gid. Made anew for every run (the one
/// an earlier run left may have another owner, and its VMM is gone).
fn create_tap(owner: Option<TapOwner>) -> Result<(), NetError> {
    let tap_error = |detail: String| NetError::Tap {
        tap: TAP.into(),
        source: std::io::Error::other(detail),
    };
    let _ = run_ip(&["link", "del", TAP]);
    match owner {
        Some(owner) => create_owned_tap(TAP, owner),
        None => run_ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]),
    }
    .map_err(tap_error)
}

fn sysctl(path: &str) -> Result<(), NetError> {
    std::fs::write(path, b"1").map_err(|source| NetError::Sysctl {
        path: PathBuf::from(path),
        source,
    })
}

/// Apply a ruleset with `nft -f -`, within [`COMMAND_TIMEOUT`](super::tap::COMMAND_TIMEOUT).
fn nft(rules: &str) -> Result<(), NetError> {
    let failed = |detail: String| NetError::PodFirewall { detail };
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .map_err(|e| failed(format!("cannot write to nft: {e}")))?;
    }
    wait_bounded(&mut child, "nft").map_err(failed)
}

/// The IPv4 name servers of a `resolv.conf` (the pod's, for the guest).
pub(crate) fn name_servers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_steer_the_pod_ip_and_localhost_to_the_guest_and_pin_its_addresses() {
        let mac: Mac = "02:aa:bb:cc:dd:ee".parse().expect("mac");
        let rules = ruleset(Ipv4Addr::new(10, 244, 1, 7), mac);
        for line in [
            "iifname \"eth0\" ip daddr 10.244.1.7 dnat to 10.0.2.2",
            "ip daddr 127.0.0.1 dnat to 10.0.2.2",
            "oifname \"tap0\" ip saddr 127.0.0.0/8 snat to 10.0.2.1",
            "ip saddr 10.0.2.2 oifname \"eth0\" masquerade",
            "iifname \"tap0\" ip saddr != 10.0.2.2 drop",
            "iifname \"tap0\" ether saddr != 02:aa:bb:cc:dd:ee drop",
            "ip daddr 169.254.169.254 iifname != \"tap0\" drop",
        ] {
            assert!(rules.contains(line), "{line} missing from\n{rules}");
        }
        assert!(
            !rules.contains("dnat to 169.254"),
            "nothing outside the pod is steered to the metadata channel"
        );
        // Replaced as a whole on every wiring, never appended to.
        assert!(rules.starts_with("add table ip ignis_pod\ndelete table ip ignis_pod\n"));
    }

    #[test]
    fn name_servers_are_the_ipv4_ones_of_resolv_conf() {
        let conf = "search default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::a\n# nameserver 1.1.1.1\noptions ndots:5\n";
        assert_eq!(name_servers(conf), [Ipv4Addr::new(10, 96, 0, 10)]);
    }
}
