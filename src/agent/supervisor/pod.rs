//! A run inside its VM pod (a request with `pod`): the pod's sandbox is found on the node
//! (waiting while it starts, within the boot deadline), an interface of mode `pod` is wired in
//! the pod's network namespace, the VMM is confined to the pod's cgroups (and its network
//! namespace when the guest is on the pod's network), and the console is copied into the
//! launcher's emptyDir for `kubectl logs`.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::*;
use crate::agent::net::pod::{self as pod_net, PodNet};
use crate::agent::net::{AttachedInterface, InterfaceMode, mac::Mac};
use crate::agent::pod::console::Pump;
use crate::agent::pod::{PodSandbox, SandboxError};
use crate::agent::vmm::process::Confinement;
use crate::vm::PodRef;

impl Inner {
    /// The VM's pod on this node, looked for until `deadline` while its sandbox is starting.
    pub(super) async fn find_pod(
        &self,
        slot: &VmSlot,
        pod: &PodRef,
        deadline: Instant,
    ) -> Result<PodSandbox, BootError> {
        let within = deadline.saturating_duration_since(Instant::now());
        let sandbox = self
            .config
            .pods
            .wait_for(pod, within)
            .await
            .map_err(BootError::PodSandbox)?;
        {
            let mut rt = slot.lock();
            rt.pod_console = Some(sandbox.console_dir());
            // Set again once the run's interface is wired on the pod's network.
            rt.pod_netns = None;
        }
        Ok(sandbox)
    }

    /// A run in its pod: the guest on the pod's network if asked (after the node's
    /// interfaces, none of which a VM on the pod's network has), the VMM confined to the pod,
    /// the pod's console started over.
    pub(super) async fn enter_pod(
        &self,
        slot: &VmSlot,
        spec: &crate::vm::VmSpec,
        pod: &PodRef,
        sandbox: &PodSandbox,
        mut interfaces: Vec<AttachedInterface>,
        confinement: Option<Confinement>,
    ) -> Result<(Vec<AttachedInterface>, Option<Confinement>), BootError> {
        let wired = self
            .attach_pod_network(slot, spec, pod, sandbox, confinement.as_ref())
            .await?;
        let confinement = Self::pod_confinement(confinement, sandbox, wired.is_some())?;
        interfaces.extend(wired);
        self.begin_pod_run(slot);
        Ok((interfaces, Some(confinement)))
    }

    /// The guest's interface on the pod's network, if the spec asks for one: wired in the pod's
    /// network namespace, its tap owned by the VMM's uid.
    async fn attach_pod_network(
        &self,
        slot: &VmSlot,
        spec: &crate::vm::VmSpec,
        pod: &PodRef,
        sandbox: &PodSandbox,
        confinement: Option<&Confinement>,
    ) -> Result<Option<AttachedInterface>, BootError> {
        let Some(request) = spec
            .interfaces
            .iter()
            .find(|i| i.mode == InterfaceMode::Pod)
        else {
            return Ok(None);
        };
        let mac = match &request.mac {
            Some(text) => Mac::parse_unicast(text).map_err(|problem| {
                BootError::Network(crate::agent::net::NetError::InvalidMac {
                    interface: request.name.clone(),
                    mac: text.clone(),
                    problem,
                })
            })?,
            None => Mac::derive(spec.uid.as_str(), &request.name),
        };
        let pod_ip = match pod.ip {
            Some(std::net::IpAddr::V4(ip)) => Some(ip),
            _ => None,
        };
        let wired = pod_net::wire(&PodNet {
            netns: sandbox.netns.clone(),
            pod_ip,
            interface: request.name.clone(),
            mac,
            tap_owner: confinement.map(|c| (c.uid, c.gid)),
            dns: pod_net::name_servers(&sandbox.resolv_conf()),
        })
        .await
        .map_err(BootError::Network)?;
        slot.lock().pod_netns = Some(sandbox.netns.clone());
        Ok(Some(wired))
    }

    /// Where the VMM runs for a VM in a pod: in the pod's cgroups, and in its network
    /// namespace when the guest is on the pod's network. A VM in a pod is always confined.
    fn pod_confinement(
        confinement: Option<Confinement>,
        sandbox: &PodSandbox,
        on_pod_network: bool,
    ) -> Result<Confinement, BootError> {
        let mut confinement = confinement.ok_or(BootError::PodSandbox(SandboxError::Unconfined))?;
        confinement.cgroups = sandbox.vmm_cgroups().map_err(BootError::PodSandbox)?;
        confinement.netns = on_pod_network.then(|| sandbox.netns.clone());
        Ok(confinement)
    }

    /// Copy the run's console into the pod until the run ends or the agent stops.
    pub(super) fn spawn_pod_console(self: &Arc<Self>, slot: &VmSlot, run: &RunHandle) {
        let Some(console_dir) = slot.lock().pod_console.clone() else {
            return;
        };
        let pump = Pump {
            console_log: run.handle.console_log.clone(),
            console_dir,
            offset_file: self
                .store
                .vm_dir(&slot.uid)
                .join(crate::agent::pod::console::OFFSET_FILE),
            max_bytes: self.config.console_max_bytes.max(1 << 20),
        };
        tokio::spawn(pump.run(run.cancel.clone(), self.shutdown.clone()));
    }

    /// A new run in the pod: its console starts over and it is not stopped.
    pub(super) fn begin_pod_run(&self, slot: &VmSlot) {
        let Some(console_dir) = slot.lock().pod_console.clone() else {
            return;
        };
        Pump {
            console_log: self.store.console_log(&slot.uid),
            console_dir,
            offset_file: self
                .store
                .vm_dir(&slot.uid)
                .join(crate::agent::pod::console::OFFSET_FILE),
            max_bytes: 0,
        }
        .begin_run();
    }

    /// After an agent restart: find the pod of a re-adopted VM again (now, no waiting), so its
    /// console copy resumes and its end is told there.
    pub(super) fn readopt_pod(&self, slot: &VmSlot, pod: &PodRef, on_pod_network: bool) {
        match self.config.pods.find(pod) {
            Ok(sandbox) => {
                let mut rt = slot.lock();
                rt.pod_console = Some(sandbox.console_dir());
                rt.pod_netns = on_pod_network.then(|| sandbox.netns.clone());
            }
            Err(error) => {
                tracing::warn!(uid = %slot.uid, pod = %pod.name, reason = error.reason(), error = %crate::error::chain(&error), "re-adopted VM: its pod is not found; no console copy for kubectl logs");
            }
        }
    }

    /// The run's metadata channel in its pod's network namespace, for a guest on the pod's
    /// network: it answers the guest's address only, and ends with the run (or the agent; a
    /// re-adopting agent starts it again), so the socket never keeps a deleted pod's
    /// namespace alive.
    pub(super) fn spawn_pod_metadata(self: &Arc<Self>, slot: &VmSlot, run: &RunHandle) {
        let Some(netns) = slot.lock().pod_netns.clone() else {
            return;
        };
        let (inner, uid, run_ended) = (self.clone(), slot.uid.clone(), run.cancel.clone());
        tokio::spawn(async move {
            let listener = match pod_net::bind_metadata(&netns).await {
                Ok(listener) => tokio::net::TcpListener::from_std(listener),
                Err(error) => Err(std::io::Error::other(crate::error::chain(&error))),
            };
            let listener = match listener {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(%uid, %error, "no metadata channel for the guest in its pod");
                    return;
                }
            };
            let hub = inner.metadata.clone();
            let identify: crate::agent::metadata::serve::Identify = Arc::new(move |ip| {
                (ip == std::net::IpAddr::V4(pod_net::GUEST))
                    .then(|| hub.watch(&uid))
                    .flatten()
            });
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            let agent_stops = inner.shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = run_ended.cancelled() => {}
                    _ = agent_stops.cancelled() => {}
                }
                stop.cancel();
            });
            crate::agent::metadata::serve::serve(listener, identify, cancel).await;
        });
    }
}
