//! The node's guest networking as the supervisor holds it: set up once (at start or on first
//! use), attached before a VMM exists, released when a run fails or the VM goes.

use std::sync::Arc;

use super::*;
use crate::agent::metadata::{self, MetadataHub};
use crate::agent::net::{AttachedInterface, NetworkConfig, NetworkManager};
use crate::vm::Interface;

/// The node's guest networking as the supervisor holds it. The manager is made at start
/// (`NetworkSetup::AtStart`) or by the first VM that needs it; made on first use, it is
/// dropped again when the last VM holding an attachment goes, so an agent whose networked
/// VMs are all gone holds what it held before the first one: no dnsmasq child (its pidfd and
/// stderr pipe) and no netlink socket (issue #22). The bridge and NAT stay: they are the
/// node's, and setting them up again is idempotent. When setting up fails, why is kept and
/// reported by every VM that needs it.
pub(super) struct Networking {
    pub(super) config: Option<NetworkConfig>,
    manager: std::sync::Mutex<Option<Result<Arc<NetworkManager>, String>>>,
    /// Serializes making, using and dropping the manager, so a VM never attaches through a
    /// manager that another VM's release is tearing down.
    setup: tokio::sync::Mutex<()>,
    /// Set up at start: kept while the agent runs, VMs or not.
    keep_when_idle: std::sync::atomic::AtomicBool,
    /// What the metadata channel serves, and the node listener's end (it lives as long as
    /// the manager: `nat` guests only exist while it does).
    metadata: Arc<MetadataHub>,
    node_listener: std::sync::Mutex<Option<CancellationToken>>,
}

impl Networking {
    pub(super) fn new(config: Option<NetworkConfig>, metadata: Arc<MetadataHub>) -> Self {
        Self {
            config,
            manager: std::sync::Mutex::new(None),
            setup: tokio::sync::Mutex::new(()),
            keep_when_idle: std::sync::atomic::AtomicBool::new(false),
            metadata,
            node_listener: std::sync::Mutex::new(None),
        }
    }

    /// Start the metadata channel's node listener for `nat` guests: on the bridge's gateway
    /// address, where the ruleset DNATs their `169.254.169.254:80`. A node where it cannot
    /// listen still runs its guests, without the channel (the log says why).
    async fn start_node_listener(&self, manager: &Arc<NetworkManager>) {
        let at = (manager.config().gateway(), metadata::NODE_PORT);
        let listener = match tokio::net::TcpListener::bind(at).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(address = %at.0, port = at.1, %error, "metadata channel unavailable to nat guests: cannot listen");
                return;
            }
        };
        let cancel = CancellationToken::new();
        let previous = self
            .node_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(cancel.clone());
        if let Some(previous) = previous {
            previous.cancel();
        }
        let weak = Arc::downgrade(manager);
        let hub = self.metadata.clone();
        let identify: metadata::serve::Identify = Arc::new(move |ip| {
            let std::net::IpAddr::V4(ip) = ip else {
                return None;
            };
            hub.watch(&weak.upgrade()?.nat_owner(ip)?)
        });
        tokio::spawn(metadata::serve::serve(listener, identify, cancel));
    }

    fn stop_node_listener(&self) {
        let taken = self
            .node_listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(cancel) = taken {
            cancel.cancel();
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Result<Arc<NetworkManager>, String>>> {
        self.manager.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The manager, setting the node up on the first call. `keep` marks it as set up at
    /// start (never dropped when idle).
    pub(super) async fn manager(&self, keep: bool) -> Result<Arc<NetworkManager>, String> {
        let _setup = self.setup.lock().await;
        self.manager_locked(keep).await
    }

    async fn manager_locked(&self, keep: bool) -> Result<Arc<NetworkManager>, String> {
        let Some(config) = &self.config else {
            return Err("guest networking is turned off on this agent".into());
        };
        if keep {
            self.keep_when_idle
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        if let Some(made) = self.slot().clone() {
            return made;
        }
        let made = match NetworkManager::new(config.clone()).await {
            Ok(manager) => {
                tracing::info!(bridge = %config.bridge, cidr = %config.cidr, "guest networking ready");
                let manager = Arc::new(manager);
                self.start_node_listener(&manager).await;
                Ok(manager)
            }
            Err(error) => {
                let why = format!(
                    "setting up bridge {} for {} failed: {}",
                    config.bridge,
                    config.cidr,
                    BootError::Network(error).full_message()
                );
                tracing::warn!(reason = "NetworkingUnavailable", error = %why, "guest networking unavailable; VMs asking for nat or bridge will fail");
                Err(why)
            }
        };
        *self.slot() = Some(made.clone());
        made
    }

    /// The manager if it was set up; never sets the node up.
    pub(super) fn existing(&self) -> Option<Arc<NetworkManager>> {
        self.slot().as_ref().and_then(|m| m.as_ref().ok().cloned())
    }

    /// Drop a manager made on first use once no VM holds an attachment (call under `setup`):
    /// dnsmasq stops and the netlink socket closes; the next VM that needs a tap sets the
    /// node up again.
    async fn release_if_idle(&self, manager: &NetworkManager) {
        if self
            .keep_when_idle
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        match manager.is_idle() {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                tracing::warn!(reason = error.reason(), error = %BootError::Network(error).full_message(), "cannot tell whether guest networking is idle; keeping it");
                return;
            }
        }
        let taken = self.slot().take();
        self.stop_node_listener();
        if let Some(Ok(manager)) = taken {
            manager.shutdown().await;
            tracing::info!(
                "no VM holds a network attachment: guest networking released until the next one"
            );
        }
    }

    /// Stop what the node's networking runs (dnsmasq) when the agent stops; the bridge, taps
    /// and NAT stay for the VMs that outlive it.
    pub(super) async fn shutdown(&self) {
        let _setup = self.setup.lock().await;
        self.stop_node_listener();
        if let Some(manager) = self.existing() {
            manager.shutdown().await;
        }
    }

    /// Whether the state directory holds VM attachments (from an earlier agent).
    pub(super) fn has_records(&self) -> bool {
        self.config.as_ref().is_some_and(|c| {
            std::fs::read_dir(c.state_dir.join("vms")).is_ok_and(|mut entries| {
                entries.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json")))
            })
        })
    }
}

impl Inner {
    /// Attach the VM's interfaces; no taps wanted means no node setup, and whatever an earlier
    /// run of the same uid had is released.
    pub(super) async fn attach_network(
        &self,
        uid: &VmUid,
        requests: &[Interface],
        owner: Option<crate::agent::net::tap::TapOwner>,
    ) -> Result<Vec<AttachedInterface>, BootError> {
        // Interfaces of mode pod are wired in the pod's namespace (`pod.rs`), not here.
        let requests: Vec<Interface> = requests
            .iter()
            .filter(|r| r.mode != crate::vm::InterfaceMode::Pod)
            .cloned()
            .collect();
        let requests = requests.as_slice();
        let Some(first) = requests.iter().find(|r| needs_tap(r)) else {
            self.release_network(uid).await;
            return Ok(Vec::new());
        };
        let _setup = self.network.setup.lock().await;
        let manager = self.network.manager_locked(false).await.map_err(|detail| {
            BootError::NetworkingUnavailable {
                interface: first.name.clone(),
                mode: first.mode,
                detail,
            }
        })?;
        let attached = manager.attach(uid, requests, owner).await;
        if attached.is_err() {
            self.network.release_if_idle(&manager).await;
        }
        attached.map_err(BootError::Network)
    }

    /// Remove the VM's taps and free its addresses, if networking was ever set up. Failures
    /// are logged: the next agent start collects what a VM no longer held left behind.
    pub(super) async fn release_network(&self, uid: &VmUid) {
        let _setup = self.network.setup.lock().await;
        let Some(manager) = self.network.existing() else {
            return;
        };
        if let Err(error) = manager.detach(uid).await {
            tracing::warn!(%uid, reason = error.reason(), error = %BootError::Network(error).full_message(), "cannot release the VM's network");
        }
        self.network.release_if_idle(&manager).await;
    }

    /// After start-up's garbage collection: a manager made only to collect what an earlier
    /// agent left goes again when no VM is left holding an attachment.
    pub(super) async fn release_network_if_idle(&self) {
        let _setup = self.network.setup.lock().await;
        if let Some(manager) = self.network.existing() {
            self.network.release_if_idle(&manager).await;
        }
    }

    /// After a failure found by a watcher (not under the operation lock): release the VM's
    /// network under the lock, unless a new run has started meanwhile.
    pub(super) fn spawn_release_if_failed(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        if self.network.existing().is_none() {
            return;
        }
        let inner = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let _op = slot.op.clone().lock_owned().await;
            let still_failed = {
                let rt = slot.lock();
                !rt.deleted && rt.run.is_none() && rt.status.state == RunState::Failed
            };
            if still_failed {
                inner.release_network(&slot.uid).await;
            }
        });
    }
}
