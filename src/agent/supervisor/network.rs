//! The node's guest networking as the supervisor holds it: set up once (at start or on first
//! use), attached before a VMM exists, released when a run fails or the VM goes.

use std::sync::Arc;

use super::*;
use crate::agent::net::{AttachedInterface, NetworkConfig, NetworkManager};
use crate::vm::Interface;

/// The node's guest networking as the supervisor holds it: the manager is made once (at start
/// or on first use); when that fails, why is kept and reported by every VM that needs it.
pub(super) struct Networking {
    pub(super) config: Option<NetworkConfig>,
    pub(super) manager: tokio::sync::OnceCell<Result<Arc<NetworkManager>, String>>,
}

impl Networking {
    pub(super) fn new(config: Option<NetworkConfig>) -> Self {
        Self {
            config,
            manager: tokio::sync::OnceCell::new(),
        }
    }

    /// The manager, setting the node up on the first call.
    pub(super) async fn manager(&self) -> Result<Arc<NetworkManager>, String> {
        let Some(config) = &self.config else {
            return Err("guest networking is turned off on this agent".into());
        };
        self.manager
            .get_or_init(|| async {
                match NetworkManager::new(config.clone()).await {
                    Ok(manager) => {
                        tracing::info!(bridge = %config.bridge, cidr = %config.cidr, "guest networking ready");
                        Ok(Arc::new(manager))
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
                }
            })
            .await
            .clone()
    }

    /// The manager if it was set up; never sets the node up.
    pub(super) fn existing(&self) -> Option<Arc<NetworkManager>> {
        self.manager.get().and_then(|m| m.as_ref().ok().cloned())
    }

    /// Stop what the node's networking runs (dnsmasq) when the agent stops; the bridge, taps
    /// and NAT stay for the VMs that outlive it.
    pub(super) async fn shutdown(&self) {
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
        let manager =
            self.network
                .manager()
                .await
                .map_err(|detail| BootError::NetworkingUnavailable {
                    interface: first.name.clone(),
                    mode: first.mode,
                    detail,
                })?;
        manager
            .attach(uid, requests)
            .await
            .map_err(BootError::Network)
    }

    /// Remove the VM's taps and free its addresses, if networking was ever set up. Failures
    /// are logged: the next agent start collects what a VM no longer held left behind.
    pub(super) async fn release_network(&self, uid: &VmUid) {
        let Some(manager) = self.network.existing() else {
            return;
        };
        if let Err(error) = manager.detach(uid).await {
            tracing::warn!(%uid, reason = error.reason(), error = %BootError::Network(error).full_message(), "cannot release the VM's network");
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
