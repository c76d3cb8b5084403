//! Booting a run: check it, pull its images (in the background: `images.rs`), then make its
//! disks (`disks.rs`), attach its network, create the VMM, start the guest, and hand it to the
//! exit watcher and the readiness watcher. Every failure on the way becomes the VM's state
//! (FAILED with a reason), never an API error, and leaves nothing behind but the VM's status
//! (and its disk, which lives as long as its spec).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::disks::{GuestFiles, hostname};
use super::*;
use crate::agent::image::ResolvedImage;
use crate::agent::net::{self, AttachedInterface};
use crate::agent::vmm::{API_TIMEOUT, OpenedFiles, SNAPSHOT_TIMEOUT, VmConfig, VmmError};

/// How long a create cut short by the boot deadline is watched for a VMM it spawned late.
const STRAY_SWEEP: Duration = Duration::from_secs(2);

impl Inner {
    pub(super) async fn boot(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        request: ApplyRequest,
        applied_at: i64,
        refused: Option<SpecError>,
    ) {
        let status = Self::fresh_status(slot, &request, applied_at);
        Self::begin_run(slot, request.clone(), status);
        if let Some(error) = refused {
            return self.fail_boot(slot, None, &BootError::Spec(error)).await;
        }
        let (plan, entry, opened) = match self.plan_run(&request) {
            Ok(planned) => planned,
            Err(error) => return self.fail_boot(slot, None, &error).await,
        };
        if let Err(error) = self
            .store
            .create_vm_dir(&request.spec.uid)
            .and_then(|_| self.store.write_spec(&request))
        {
            return self.fail_boot(slot, None, &BootError::State(error)).await;
        }
        if request.spec.images().is_empty() {
            let files = GuestFiles::new(&request.spec, &[]);
            self.launch(slot, &request, plan, entry, files, opened)
                .await;
        } else {
            self.start_pull(slot, request);
        }
    }

    /// The boot of a run whose images are in the cache now (under the VM's operation lock).
    pub(super) async fn boot_pulled(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        request: ApplyRequest,
        images: Vec<ResolvedImage>,
    ) {
        // Planned again: the node may have changed during a long pull.
        let (plan, entry, opened) = match self.plan_run(&request) {
            Ok(planned) => planned,
            Err(error) => return self.fail_boot(slot, None, &error).await,
        };
        let files = GuestFiles::new(&request.spec, &images);
        self.launch(slot, &request, plan, entry, files, opened)
            .await;
    }

    /// Which VMM and accelerator, checked against the node (and the VM's pod); the node's
    /// files the spec names, opened beneath the admin's allowed directories.
    fn plan_run(
        &self,
        request: &ApplyRequest,
    ) -> Result<(BootPlan, BackendEntry, OpenedFiles), BootError> {
        let spec = &request.spec;
        let plan = plan_boot(spec, &self.plan_env())?;
        check_pod_interfaces(spec, request.pod.as_ref())?;
        let opened = check_files(spec, &self.config.policy.allowed_path_dirs)?;
        let entry = self.backend(plan.hypervisor).cloned().ok_or_else(|| {
            BootError::HypervisorUnavailable {
                hypervisor: plan.hypervisor.to_string(),
                detail: "no backend for it in this agent".into(),
            }
        })?;
        Ok((plan, entry, opened))
    }

    /// Disks, network, VMM, guest: the run from its files to a started guest. The boot
    /// deadline starts here, not at the apply: pulling is not booting.
    async fn launch(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        request: &ApplyRequest,
        plan: BootPlan,
        entry: BackendEntry,
        files: GuestFiles,
        opened: OpenedFiles,
    ) {
        let deadline = Instant::now() + self.config.boot_timeout;
        let spec = &request.spec;
        let dir = self.store.vm_dir(&spec.uid);
        let sandbox = match &request.pod {
            Some(pod) => match self.find_pod(slot, pod, deadline).await {
                Ok(sandbox) => Some((pod, sandbox)),
                Err(error) => return self.fail_boot(slot, None, &error).await,
            },
            None => None,
        };
        let confinement = match self.confinement(&spec.uid) {
            Ok(confinement) => confinement,
            Err(error) => return self.fail_boot(slot, None, &error).await,
        };
        // Before the VMM exists: it opens the taps by name, so they are its ids'. Idempotent
        // for the same uid, so a new run of the VM keeps its MACs and addresses.
        let tap_owner = confinement.as_ref().map(|c| (c.uid, c.gid));
        let interfaces = match self
            .attach_network(&spec.uid, &spec.interfaces, tap_owner)
            .await
        {
            Ok(interfaces) => interfaces,
            Err(error) => return self.fail_boot(slot, None, &error).await,
        };
        // In a pod: the pod's tap0 is made in the pod's namespace, with its owner.
        let (interfaces, confinement) = match &sandbox {
            None => (interfaces, confinement),
            Some((pod, sandbox)) => {
                match self
                    .enter_pod(slot, spec, pod, sandbox, interfaces, confinement)
                    .await
                {
                    Ok(in_pod) => in_pod,
                    Err(error) => return self.fail_boot(slot, None, &error).await,
                }
            }
        };
        let ip_addresses = net::ip_addresses(&interfaces);
        if let Some(port) = spec.readiness_tcp_port
            && ip_addresses.is_empty()
        {
            let error = BootError::ReadinessUnreachable { port };
            return self.fail_boot(slot, None, &error).await;
        }
        self.update(slot, None, |rt| {
            rt.status.hypervisor = Some(plan.hypervisor);
            rt.status.accelerator = Some(plan.accelerator);
            rt.status.ip_addresses = ip_addresses.clone();
        });
        let disks = match self
            .guest_disks(spec, plan.hypervisor, &files, &dir, &interfaces)
            .await
        {
            Ok(disks) => disks,
            Err(error) => return self.fail_boot(slot, None, &error).await,
        };
        let config = VmConfig {
            id: spec.uid.to_string(),
            vcpus: spec.vcpus,
            memory_mib: plan.memory_mib,
            kernel: files.kernel,
            cmdline: guest_cmdline(&spec.kernel_cmdline, &interfaces, &hostname(spec)),
            initrd: files.initrd,
            disks,
            nets: interfaces
                .iter()
                .map(AttachedInterface::net_config)
                .collect(),
            user_data: spec.user_data.clone(),
            accelerator: plan.accelerator,
            state_dir: dir.clone(),
            console_log: self.store.console_log(&spec.uid),
            api_socket: self.store.api_socket(&spec.uid),
            binary: entry
                .resolved_binary()
                .unwrap_or_else(|| entry.binary.clone()),
            confinement,
            restore: None,
            opened,
        };
        let readiness = Readiness::of(spec, plan.hypervisor, &ip_addresses);
        let vmm = VmmLaunch {
            entry,
            hypervisor: plan.hypervisor,
            readiness,
            deadline,
        };
        let resume = slot.lock().resume.take();
        if let Some(snapshot) = resume {
            let resumed = VmConfig {
                restore: Some(snapshot),
                ..config.clone()
            };
            match self.run_vmm(slot, spec, &vmm, &resumed).await {
                Err(VmmStep::Unrestorable(why)) => {
                    // The guest boots cold from its disk, as after a power loss; in its pod,
                    // as a new run.
                    self.snapshot_unrestorable(slot, &why);
                    self.begin_pod_run(slot);
                }
                Ok(()) | Err(VmmStep::Failed) => return,
            }
        }
        let _ = self.run_vmm(slot, spec, &vmm, &config).await;
    }

    /// Create the VMM, load the snapshot when the config names one, start (or continue) the
    /// guest, and hand the run to its watchers. Every failure is recorded as the VM's, except
    /// a snapshot that cannot be restored: the caller boots cold instead.
    async fn run_vmm(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        spec: &crate::vm::VmSpec,
        vmm: &VmmLaunch,
        config: &VmConfig,
    ) -> Result<(), VmmStep> {
        let backend = vmm.entry.backend.clone();
        let created =
            match tokio::time::timeout(self.config.boot_timeout, backend.create(config)).await {
                Ok(Ok(spawned)) => spawned,
                Ok(Err(source)) => {
                    let error = BootError::Vmm(VmmCall {
                        operation: "create",
                        source,
                    });
                    self.fail_boot(slot, None, &error).await;
                    return Err(VmmStep::Failed);
                }
                Err(_) => {
                    // The create cut short may have spawned its VMM already: kill it, or a
                    // next run would make two VMMs for one VM. A child forked a moment ago
                    // names the VM only once it has exec'd, so look again for a while.
                    stop::sweep_strays(&self.store, &spec.uid, STRAY_SWEEP).await;
                    let source = VmmError::ApiTimeout {
                        operation: "create".into(),
                        timeout: self.config.boot_timeout,
                    };
                    let error = BootError::Vmm(VmmCall {
                        operation: "create",
                        source,
                    });
                    self.fail_boot(slot, None, &error).await;
                    return Err(VmmStep::Failed);
                }
            };
        self.metrics.boots.inc();
        let handle = created.handle.clone();
        if let Err(error) = self.store.write_handle(&spec.uid, &handle) {
            tracing::warn!(uid = %spec.uid, error = %error, "cannot persist the VMM handle");
        }
        let (run, exited_tx) = self.new_run(&backend, &handle);
        let generation = run.generation;
        let pid = handle.pid;
        // A VMM that is loading a snapshot is not the VM's run yet: QEMU exits when it
        // refuses a stream, and that exit must not be recorded as the VM's (its files would
        // be cleared under the cold boot that follows).
        if config.restore.is_none() {
            self.hold_run(slot, &run);
        }
        Self::spawn_child_watcher(self, slot, generation, created.child, exited_tx);
        self.spawn_pod_console(slot, &run);
        self.spawn_pod_metadata(slot, &run);
        if let Some(snapshot) = &config.restore {
            let restored = restore(&backend, &handle, snapshot).await;
            if let Err(why) = restored.map_err(|e| e.to_string()).and_then(|()| {
                self.hold_run(slot, &run)
                    .then_some(())
                    .ok_or_else(|| "the VMM ended right after loading it".to_string())
            }) {
                run.cancel.cancel();
                if !run.stopping.swap(true, Ordering::SeqCst) {
                    Self::kill_and_wait(&run).await;
                }
                return Err(VmmStep::Unrestorable(why));
            }
        }
        if let Err(error) = start(&backend, &handle).await {
            if !run.stopping.swap(true, Ordering::SeqCst) {
                Self::kill_and_wait(&run).await;
            }
            self.fail_boot(slot, Some(generation), &error).await;
            return Err(VmmStep::Failed);
        }
        let started_at = crate::time::now_unix_ms();
        self.update(slot, Some(generation), |rt| {
            if rt.status.state == RunState::Creating {
                rt.status.state = RunState::Starting;
            }
            rt.status.started_at_unix_ms = started_at;
        });
        let resumed = config.restore.is_some();
        tracing::info!(uid = %spec.uid, name = %spec.name, pid, hypervisor = %vmm.hypervisor, resumed, "VMM started");
        let readiness = match &vmm.readiness {
            // A restored guest has long printed its marker: it was ready when it was saved.
            Readiness::Marker(_) if resumed => Readiness::Immediate,
            other => other.clone(),
        };
        if resumed {
            self.snapshot_restored(slot);
        }
        Self::spawn_readiness(
            self,
            slot,
            &run,
            readiness,
            config.console_log.clone(),
            vmm.deadline,
        );
        Ok(())
    }

    /// Make `run` the VM's, unless its VMM has already ended; whether it did. Under the slot's
    /// lock, as the exit watcher looks: an exit signalled before this is seen here, one after
    /// finds the run held and is recorded.
    fn hold_run(&self, slot: &VmSlot, run: &RunHandle) -> bool {
        let mut exited = run.exited.clone();
        let mut held = false;
        self.update(slot, None, |rt| {
            if !*exited.borrow_and_update() {
                rt.run = Some(run.clone());
                rt.status.pid = run.handle.pid;
                held = true;
            }
        });
        held
    }
}

/// What starting a VMM needs beyond its config.
struct VmmLaunch {
    entry: BackendEntry,
    hypervisor: Hypervisor,
    readiness: Readiness,
    deadline: Instant,
}

/// Why [`Inner::run_vmm`] did not hand over a started guest.
enum VmmStep {
    /// Recorded as the VM's failure.
    Failed,
    /// The snapshot could not be loaded (nothing recorded yet): boot cold.
    Unrestorable(String),
}

/// Load the snapshot, within its deadline.
async fn restore(
    backend: &Arc<dyn crate::agent::vmm::VmmBackend>,
    handle: &crate::agent::vmm::VmmHandle,
    snapshot: &crate::agent::vmm::SnapshotFiles,
) -> Result<(), VmmError> {
    match tokio::time::timeout(
        SNAPSHOT_TIMEOUT + Duration::from_secs(1),
        backend.restore(handle, snapshot),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(VmmError::ApiTimeout {
            operation: "restore".into(),
            timeout: SNAPSHOT_TIMEOUT,
        }),
    }
}

/// Start the guest (or continue a restored one), within the API deadline.
async fn start(
    backend: &Arc<dyn crate::agent::vmm::VmmBackend>,
    handle: &crate::agent::vmm::VmmHandle,
) -> Result<(), BootError> {
    match tokio::time::timeout(API_TIMEOUT + Duration::from_secs(1), backend.start(handle)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(BootError::Vmm(VmmCall {
            operation: "start",
            source,
        })),
        Err(_) => Err(BootError::Vmm(VmmCall {
            operation: "start",
            source: VmmError::ApiTimeout {
                operation: "start".into(),
                timeout: API_TIMEOUT,
            },
        })),
    }
}
