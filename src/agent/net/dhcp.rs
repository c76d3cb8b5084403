//! DHCP for guests on the NAT bridge, so any guest gets its network the standard way: Debian's
//! `dnsmasq`, run and supervised by the agent, hands each guest the address IPAM gave it (by
//! MAC), the gateway and DNS. It only answers MACs it was told about (`static` range), so it
//! never hands out an address IPAM did not allocate.
//!
//! Host entries live in one file dnsmasq re-reads on SIGHUP; the file is rewritten whole and
//! also serves as the record across agent restarts. dnsmasq runs in the foreground as the
//! agent's child and is restarted with back-off if it dies; a dnsmasq left by a killed agent is
//! found by its recorded pid and start time and stopped before a new one starts, so there is
//! never more than one per bridge and none after [`DhcpServer::shutdown`].
//!
//! Also here: [`kernel_ip_param`], the kernel's standard `ip=` parameter for guests that
//! configure themselves from the command line.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::mac::Mac;
use crate::agent::atomic_file::write_atomically;
use crate::agent::host;

const HOSTS_FILE: &str = "hosts";
const OWNER_FILE: &str = "dnsmasq.owner";
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run that lasted this long resets the back-off.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Where guests get DNS from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// dnsmasq answers DNS on the gateway address, forwarding to the node's resolvers
    /// (`/etc/resolv.conf`), as libvirt's NAT networks do.
    Forward,
    /// Guests are told these servers; dnsmasq serves no DNS.
    Servers(Vec<Ipv4Addr>),
}

/// Settings of one bridge's DHCP server.
#[derive(Clone, Debug)]
pub struct DhcpConfig {
    pub bridge: String,
    /// The guests' range (network and prefix).
    pub cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub dns: DnsMode,
    /// Hosts file and owner record (`<state>/net/dhcp-<bridge>`). dnsmasq drops root, so the
    /// directory and its parents must be readable by others (it re-reads the hosts file).
    pub state_dir: PathBuf,
    /// `dnsmasq`, or a path.
    pub binary: PathBuf,
    pub lease_time: Duration,
}

impl DhcpConfig {
    pub fn new(bridge: &str, cidr: Ipv4Net, gateway: Ipv4Addr, state_dir: PathBuf) -> DhcpConfig {
        DhcpConfig {
            bridge: bridge.to_string(),
            cidr: cidr.trunc(),
            gateway,
            dns: DnsMode::Forward,
            state_dir,
            binary: PathBuf::from("dnsmasq"),
            lease_time: Duration::from_secs(3600),
        }
    }

    fn dns_servers(&self) -> Vec<Ipv4Addr> {
        match &self.dns {
            DnsMode::Forward => vec![self.gateway],
            DnsMode::Servers(s) => s.clone(),
        }
    }
}

/// One guest: its MAC gets this address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    /// Sent as the host name when valid (RFC 1123).
    pub hostname: Option<String>,
}

/// Errors of the DHCP server; each variant's word (`reason()`) is fixed.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum DhcpError {
    #[error("{ip} is not in the DHCP range {cidr}")]
    #[strum(serialize = "DhcpAddressOutOfRange")]
    OutOfRange { ip: Ipv4Addr, cidr: Ipv4Net },
    #[error("cannot run {binary} (install dnsmasq-base)")]
    #[strum(serialize = "DhcpServerMissing")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("dnsmasq did not start: {message}")]
    #[strum(serialize = "DhcpServerFailed")]
    StartFailed { message: String },
    #[error("I/O on DHCP state {path}")]
    #[strum(serialize = "DhcpStateIoError")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The kernel's standard `ip=` parameter (Documentation/admin-guide/nfs/nfsroot.rst):
/// `ip=<client>::<gateway>:<netmask>:<hostname>:<device>:off:<dns0>:<dns1>`.
pub fn kernel_ip_param(
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
    hostname: &str,
    device: &str,
    dns: &[Ipv4Addr],
) -> String {
    let netmask = Ipv4Net::new(address, prefix.min(32))
        .map(|n| n.netmask())
        .unwrap_or(Ipv4Addr::BROADCAST);
    // The fields are colon-separated: a name that is not a plain host name is left out.
    let hostname = if crate::agent::cloud_init::is_valid_hostname(hostname) && hostname.len() <= 64
    {
        hostname
    } else {
        ""
    };
    let gw = gateway.map(|g| g.to_string()).unwrap_or_default();
    let dns0 = dns.first().map(|d| d.to_string()).unwrap_or_default();
    let dns1 = dns.get(1).map(|d| d.to_string()).unwrap_or_default();
    let mut out = format!("ip={address}::{gw}:{netmask}:{hostname}:{device}:off:{dns0}:{dns1}");
    while out.ends_with(':') {
        out.pop();
    }
    out
}

/// The hosts file: one `mac,ip[,hostname]` per line, sorted by MAC.
pub fn hosts_file(hosts: &BTreeMap<Mac, DhcpHost>) -> String {
    let mut out = String::from("# written by the ignis agent; dnsmasq --dhcp-hostsfile\n");
    for h in hosts.values() {
        out.push_str(&format!("{},{}", h.mac, h.ip));
        if let Some(name) = h
            .hostname
            .as_deref()
            .filter(|n| crate::agent::cloud_init::is_valid_hostname(n))
        {
            out.push(',');
            out.push_str(name);
        }
        out.push('\n');
    }
    out
}

/// Read back a hosts file we wrote (lines we cannot read are dropped).
pub fn parse_hosts_file(text: &str) -> BTreeMap<Mac, DhcpHost> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split(',');
            let mac: Mac = f.next()?.trim().parse().ok()?;
            let ip: Ipv4Addr = f.next()?.trim().parse().ok()?;
            let hostname = f.next().map(|s| s.trim().to_string());
            Some((mac, DhcpHost { mac, ip, hostname }))
        })
        .collect()
}

/// dnsmasq's command line.
pub fn dnsmasq_args(config: &DhcpConfig) -> Vec<String> {
    let net = config.cidr.trunc();
    let mut args = vec![
        "--keep-in-foreground".to_string(),
        "--conf-file=/dev/null".into(),
        "--log-facility=-".into(),
        format!(
            "--pid-file={}",
            config.state_dir.join("dnsmasq.pid").display()
        ),
        format!("--interface={}", config.bridge),
        "--except-interface=lo".into(),
        "--bind-dynamic".into(),
        "--no-hosts".into(),
        "--leasefile-ro".into(),
        "--dhcp-authoritative".into(),
        format!(
            "--dhcp-range={},static,{},{}s",
            net.network(),
            net.netmask(),
            config.lease_time.as_secs().max(120)
        ),
        format!(
            "--dhcp-hostsfile={}",
            config.state_dir.join(HOSTS_FILE).display()
        ),
        format!("--dhcp-option=option:router,{}", config.gateway),
    ];
    let dns = config.dns_servers();
    if !dns.is_empty() {
        let list: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
        args.push(format!(
            "--dhcp-option=option:dns-server,{}",
            list.join(",")
        ));
    }
    match &config.dns {
        DnsMode::Forward => args.extend(["--domain-needed".into(), "--bogus-priv".into()]),
        DnsMode::Servers(_) => args.push("--port=0".into()),
    }
    args
}

/// What the supervisor task and the handle share.
struct Shared {
    hosts: BTreeMap<Mac, DhcpHost>,
    /// The running dnsmasq, once it said it started.
    pid: Option<u32>,
    restarts: u64,
}

/// One bridge's supervised dnsmasq.
pub struct DhcpServer {
    config: DhcpConfig,
    shared: Arc<Mutex<Shared>>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl DhcpServer {
    /// Stop a dnsmasq a previous agent left, keep its host entries, start dnsmasq and wait
    /// until it serves. A dnsmasq that cannot start fails here with its own message.
    pub async fn start(config: DhcpConfig) -> Result<DhcpServer, DhcpError> {
        let state = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DhcpError::State { path, source }
        };
        std::fs::create_dir_all(&config.state_dir).map_err(state(&config.state_dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config.state_dir, std::fs::Permissions::from_mode(0o755))
                .map_err(state(&config.state_dir))?;
        }
        stop_leftover(&config.state_dir).await;
        let hosts_path = config.state_dir.join(HOSTS_FILE);
        let hosts = std::fs::read_to_string(&hosts_path)
            .map(|t| parse_hosts_file(&t))
            .unwrap_or_default();
        write_atomically(&hosts_path, hosts_file(&hosts).as_bytes()).map_err(state(&hosts_path))?;

        let shared = Arc::new(Mutex::new(Shared {
            hosts,
            pid: None,
            restarts: 0,
        }));
        let cancel = CancellationToken::new();
        let (child, pid) = spawn_ready(&config).await?;
        set_pid(&shared, Some(pid));
        let task = tokio::spawn(supervise(
            config.clone(),
            shared.clone(),
            cancel.clone(),
            child,
        ));
        Ok(DhcpServer {
            config,
            shared,
            cancel,
            task: Some(task),
        })
    }

    /// Add or replace the entry of `host.mac`; dnsmasq re-reads its hosts at once.
    pub fn set_host(&self, host: DhcpHost) -> Result<(), DhcpError> {
        if !self.config.cidr.contains(&host.ip) {
            return Err(DhcpError::OutOfRange {
                ip: host.ip,
                cidr: self.config.cidr,
            });
        }
        self.update(|hosts| {
            hosts.insert(host.mac, host);
        })
    }

    /// Serve exactly `hosts` (those outside the range are left out, with a warning).
    pub fn set_hosts(&self, hosts: Vec<DhcpHost>) -> Result<(), DhcpError> {
        let cidr = self.config.cidr;
        self.update(|current| {
            current.clear();
            for host in hosts {
                if cidr.contains(&host.ip) {
                    current.insert(host.mac, host);
                } else {
                    tracing::warn!(mac = %host.mac, ip = %host.ip, %cidr, "DHCP host outside the range left out");
                }
            }
        })
    }

    /// Forget a MAC. Idempotent.
    pub fn remove_host(&self, mac: Mac) -> Result<(), DhcpError> {
        self.update(|hosts| {
            hosts.remove(&mac);
        })
    }

    fn update(&self, change: impl FnOnce(&mut BTreeMap<Mac, DhcpHost>)) -> Result<(), DhcpError> {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        let mut hosts = s.hosts.clone();
        change(&mut hosts);
        let path = self.config.state_dir.join(HOSTS_FILE);
        write_atomically(&path, hosts_file(&hosts).as_bytes())
            .map_err(|source| DhcpError::State { path, source })?;
        s.hosts = hosts;
        if let Some(pid) = s.pid {
            // A dnsmasq between runs reads the file when it starts.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGHUP);
        }
        Ok(())
    }

    pub fn hosts(&self) -> Vec<DhcpHost> {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.hosts.values().cloned().collect()
    }

    /// The serving dnsmasq's pid (`None` while it restarts).
    pub fn pid(&self) -> Option<u32> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).pid
    }

    /// How often dnsmasq died and was started again.
    pub fn restarts(&self) -> u64 {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restarts
    }

    /// Stop dnsmasq (SIGTERM, then SIGKILL after a few seconds), wait for it, and remove its
    /// state directory (the hosts are rebuilt from the VMs' records at the next start).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for DhcpServer {
    /// Dropped without `shutdown`: the task's child is killed as the runtime drops it
    /// (`kill_on_drop`), so nothing outlives the agent's own shutdown. The state directory
    /// goes either way; only a killed agent leaves it, with the owner record that lets the
    /// next one stop the dnsmasq it left.
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = std::fs::remove_dir_all(&self.config.state_dir);
    }
}

fn set_pid(shared: &Mutex<Shared>, pid: Option<u32>) {
    shared.lock().unwrap_or_else(|p| p.into_inner()).pid = pid;
}

/// Start dnsmasq and wait for its "started" line; on failure, its last words.
async fn spawn_ready(config: &DhcpConfig) -> Result<(Child, u32), DhcpError> {
    let mut child = Command::new(&config.binary)
        .args(dnsmasq_args(config))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DhcpError::Spawn {
            binary: config.binary.clone(),
            source,
        })?;
    let pid = child.id().unwrap_or(0);
    let stderr = child.stderr.take();
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
    let bridge = config.bridge.clone();
    tokio::spawn(async move {
        let Some(stderr) = stderr else { return };
        let mut lines = BufReader::new(stderr).lines();
        let mut ready_tx = Some(ready_tx);
        let mut last = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("started, version") {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(Ok(()));
                }
            } else if line.contains("failed") || line.contains("unknown") || line.contains("bad") {
                last = line.clone();
            }
            tracing::debug!(bridge = %bridge, "dnsmasq: {line}");
        }
        if let Some(tx) = ready_tx.take() {
            let _ = tx.send(Err(last));
        }
    });
    let outcome = tokio::time::timeout(READY_TIMEOUT, ready_rx).await;
    match outcome {
        Ok(Ok(Ok(()))) => {
            record_owner(&config.state_dir, pid);
            Ok((child, pid))
        }
        other => {
            let message = match other {
                Ok(Ok(Err(m))) if !m.is_empty() => m,
                Err(_) => format!("no start message within {READY_TIMEOUT:?}"),
                _ => "dnsmasq exited".to_string(),
            };
            let _ = child.start_kill();
            let status = tokio::time::timeout(STOP_TIMEOUT, child.wait()).await;
            let status = match status {
                Ok(Ok(s)) => format!(" ({s})"),
                _ => String::new(),
            };
            Err(DhcpError::StartFailed {
                message: format!("{message}{status}"),
            })
        }
    }
}

/// Run dnsmasq until cancelled, starting it again with back-off whenever it dies.
async fn supervise(
    config: DhcpConfig,
    shared: Arc<Mutex<Shared>>,
    cancel: CancellationToken,
    mut child: Child,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let started = tokio::time::Instant::now();
        tokio::select! {
            status = child.wait() => {
                set_pid(&shared, None);
                shared.lock().unwrap_or_else(|p| p.into_inner()).restarts += 1;
                tracing::warn!(bridge = %config.bridge, status = ?status.ok(), "dnsmasq exited; restarting");
                if started.elapsed() >= HEALTHY_RUN {
                    backoff = BACKOFF_FIRST;
                }
            }
            _ = cancel.cancelled() => {
                stop_child(&mut child).await;
                set_pid(&shared, None);
                let _ = std::fs::remove_file(config.state_dir.join(OWNER_FILE));
                return;
            }
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => {
                    let _ = std::fs::remove_file(config.state_dir.join(OWNER_FILE));
                    return;
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
            match spawn_ready(&config).await {
                Ok((c, pid)) => {
                    child = c;
                    set_pid(&shared, Some(pid));
                    break;
                }
                Err(e) => {
                    tracing::warn!(bridge = %config.bridge, error = %e, "dnsmasq restart failed");
                }
            }
        }
    }
}

async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        if tokio::time::timeout(STOP_TIMEOUT, child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

/// `<pid> <start ticks>`: enough to tell our dnsmasq from a process that reused its pid.
fn record_owner(dir: &Path, pid: u32) {
    if let Some(stat) = host::proc_stat(pid) {
        let _ = write_atomically(
            &dir.join(OWNER_FILE),
            format!("{pid} {}\n", stat.start_time_ticks).as_bytes(),
        );
    }
}

/// Stop the dnsmasq a killed agent left serving this bridge, if it still runs.
async fn stop_leftover(dir: &Path) {
    let path = dir.join(OWNER_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let mut f = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(ticks))) = (
        f.next().map(str::parse::<u32>),
        f.next().map(str::parse::<u64>),
    ) else {
        let _ = std::fs::remove_file(&path);
        return;
    };
    if host::is_same_live_process(pid, ticks) {
        tracing::info!(pid, "stopping the dnsmasq a previous agent left");
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + STOP_TIMEOUT;
        while host::is_same_live_process(pid, ticks) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if host::is_same_live_process(pid, ticks) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    let _ = std::fs::remove_file(&path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DhcpConfig {
        DhcpConfig::new(
            "ignis0",
            "10.88.0.0/16".parse().expect("cidr"),
            Ipv4Addr::new(10, 88, 0, 1),
            PathBuf::from("/var/lib/ignis/net/dhcp-ignis0"),
        )
    }

    #[test]
    fn kernel_ip_param_is_the_standard_form() {
        let gw = Ipv4Addr::new(10, 88, 0, 1);
        assert_eq!(
            kernel_ip_param(
                Ipv4Addr::new(10, 88, 0, 5),
                16,
                Some(gw),
                "web-0",
                "eth0",
                &[gw]
            ),
            "ip=10.88.0.5::10.88.0.1:255.255.0.0:web-0:eth0:off:10.88.0.1"
        );
        assert_eq!(
            kernel_ip_param(
                Ipv4Addr::new(192, 168, 1, 4),
                24,
                None,
                "bad:name",
                "eth1",
                &[]
            ),
            "ip=192.168.1.4:::255.255.255.0::eth1:off"
        );
    }

    #[test]
    fn hosts_file_round_trips() {
        let mac: Mac = "52:54:00:12:34:56".parse().expect("mac");
        let mut hosts = BTreeMap::new();
        hosts.insert(
            mac,
            DhcpHost {
                mac,
                ip: Ipv4Addr::new(10, 88, 0, 5),
                hostname: Some("web-0".into()),
            },
        );
        let text = hosts_file(&hosts);
        assert!(
            text.contains("52:54:00:12:34:56,10.88.0.5,web-0\n"),
            "{text}"
        );
        assert_eq!(parse_hosts_file(&text), hosts);
    }

    #[test]
    fn dnsmasq_serves_only_known_macs_on_the_bridge() {
        let args = dnsmasq_args(&cfg());
        for want in [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--interface=ignis0",
            "--bind-dynamic",
            "--dhcp-range=10.88.0.0,static,255.255.0.0,3600s",
            "--dhcp-option=option:router,10.88.0.1",
            "--dhcp-option=option:dns-server,10.88.0.1",
            "--dhcp-hostsfile=/var/lib/ignis/net/dhcp-ignis0/hosts",
        ] {
            assert!(args.iter().any(|a| a == want), "{want} missing in {args:?}");
        }
        let mut c = cfg();
        c.dns = DnsMode::Servers(vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]);
        let args = dnsmasq_args(&c);
        assert!(args.iter().any(|a| a == "--port=0"));
        assert!(
            args.iter()
                .any(|a| a == "--dhcp-option=option:dns-server,1.1.1.1,9.9.9.9")
        );
    }
}
