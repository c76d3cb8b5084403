//! A run's images, pulled before it boots: in the background (a cold pull takes seconds to
//! minutes, far longer than an `ApplyVM` may), visible in the status while it happens
//! (`pulling`), retried with back-off while it fails for a reason that can go away (the status
//! says which, with the registry's message), and failing the run on a permanent one.
//!
//! Every run of a spec boots the digests its first pull resolved (kept in the status, carried
//! over to the next run), so a tag that moves changes no VM, and a VM restarts from the node's
//! cache even when its registry is down. The VM (its uid) holds a lease on each cache entry,
//! dropped when it is deleted or its spec changes.
//!
//! The pull holds no lock the controller's calls need: `DeleteVM` cancels it at once (the
//! image store leaves nothing half-written), and an `ApplyVM` that changes nothing hands it
//! the pull secrets as they are now (so a fixed Secret takes effect on the next attempt).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::slots::VmRuntime;
use super::*;
use crate::agent::image::{
    ImageError, ImageKind, ImageStore, PullRequest, RegistryCredentials, ResolvedImage,
    pinned_reference,
};
use crate::vm::{PullFailure, PullSecrets, PulledImage, Pulling, VmSpec};

/// Back-off between attempts of a failing pull: doubling from the first, capped (kubelet's
/// image back-off has the same ceiling).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// The node's image cache as the supervisor holds it: opened once (at start or first use).
pub(super) struct Images {
    config: Option<ImageStoreConfig>,
    store: tokio::sync::OnceCell<Result<ImageStore, String>>,
}

impl Images {
    pub(super) fn new(config: Option<ImageStoreConfig>) -> Self {
        Self {
            config,
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// The store, opened on the first call; why not, when it cannot be.
    pub(super) async fn store(&self) -> Result<ImageStore, String> {
        let Some(config) = &self.config else {
            return Err("this agent has no image cache".into());
        };
        self.store
            .get_or_init(|| async {
                ImageStore::open(config.clone()).await.map_err(|e| {
                    format!(
                        "cannot open the image cache {}: {}",
                        config.root.display(),
                        crate::error::chain(&e)
                    )
                })
            })
            .await
            .clone()
    }

    fn existing(&self) -> Option<ImageStore> {
        self.store.get().and_then(|s| s.as_ref().ok().cloned())
    }
}

/// A run's pull in progress.
pub(super) struct PullHandle {
    id: u64,
    cancel: CancellationToken,
    /// The latest apply's pull secrets.
    secrets: Arc<Mutex<PullSecrets>>,
    /// Cuts a back-off short when new secrets arrive.
    wake: Arc<Notify>,
}

/// What one pull task works with.
struct PullTask {
    id: u64,
    secrets: Arc<Mutex<PullSecrets>>,
    wake: Arc<Notify>,
}

impl Inner {
    /// Pull the run's images in the background, then boot it (under the VM's operation lock).
    /// The run is held in state `Creating` with `pulling` set meanwhile.
    pub(super) fn start_pull(self: &Arc<Self>, slot: &Arc<VmSlot>, request: ApplyRequest) {
        let cancel = self.shutdown.child_token();
        let task = PullTask {
            id: self
                .generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            secrets: Arc::new(Mutex::new(request.pull_secrets.clone())),
            wake: Arc::new(Notify::new()),
        };
        let references = request
            .spec
            .images()
            .into_iter()
            .map(|(_, reference)| reference.to_owned())
            .collect();
        self.update(slot, None, |rt| {
            rt.pull = Some(PullHandle {
                id: task.id,
                cancel: cancel.clone(),
                secrets: task.secrets.clone(),
                wake: task.wake.clone(),
            });
            rt.status.pulling = Some(Pulling {
                references,
                failure: None,
            });
        });
        let inner = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let pulled = tokio::select! {
                pulled = inner.pull_all(&slot, &request.spec, &task) => pulled,
                _ = cancel.cancelled() => {
                    inner.release_images_if_gone(&slot).await;
                    return;
                }
            };
            let _op = slot.op.clone().lock_owned().await;
            let current = inner.update_if(
                &slot,
                |rt| rt.pull.as_ref().is_some_and(|p| p.id == task.id),
                |rt| {
                    rt.pull = None;
                    rt.status.pulling = None;
                },
            );
            if !current {
                inner.release_images_if_gone(&slot).await;
                return;
            }
            match pulled {
                Ok(images) => inner.boot_pulled(&slot, request, images).await,
                Err(error) => inner.fail_boot(&slot, None, &error).await,
            }
        });
    }

    /// Pull every image of `spec` in turn, by its pinned digest when an earlier run of the
    /// spec resolved it; retry one that fails for a reason that can go away.
    async fn pull_all(
        &self,
        slot: &VmSlot,
        spec: &VmSpec,
        task: &PullTask,
    ) -> Result<Vec<ResolvedImage>, BootError> {
        let store = self
            .images
            .store()
            .await
            .map_err(|detail| BootError::ImagesUnavailable { detail })?;
        let pins = slot.lock().status.images.clone();
        let mine = |rt: &VmRuntime| rt.pull.as_ref().is_some_and(|p| p.id == task.id);
        let mut resolved = Vec::new();
        for (kind, reference) in spec.images() {
            let pinned = pins
                .iter()
                .find(|p| p.kind == kind && p.reference == reference)
                .map(|p| pinned_reference(reference, &p.digest));
            let mut attempts = 0u32;
            let mut backoff = RETRY_FIRST;
            let image = loop {
                attempts += 1;
                let pulled = self
                    .pull_one(
                        &store,
                        &slot.uid,
                        kind,
                        pinned.as_deref().unwrap_or(reference),
                        task,
                    )
                    .await;
                match pulled {
                    Ok(image) => break image,
                    Err(error) if error.is_permanent() => return Err(BootError::Image(error)),
                    Err(error) => {
                        let retry_at = crate::time::now_unix_ms()
                            + i64::try_from(backoff.as_millis()).unwrap_or(i64::MAX);
                        let failure = PullFailure {
                            reason: error.reason().to_owned(),
                            message: crate::error::chain(&error),
                            attempts,
                            retry_at_unix_ms: retry_at,
                        };
                        tracing::info!(uid = %slot.uid, reference, reason = error.reason(), error = %failure.message, attempts, retry_in_ms = backoff.as_millis() as u64, "image pull failed; retrying");
                        self.update_if(slot, mine, |rt| {
                            if let Some(pulling) = rt.status.pulling.as_mut() {
                                pulling.failure = Some(failure);
                            }
                        });
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = task.wake.notified() => {}
                        }
                        backoff = (backoff * 2).min(RETRY_MAX);
                    }
                }
            };
            let pulled = PulledImage {
                kind,
                reference: reference.to_owned(),
                digest: image.digest.clone(),
            };
            self.update_if(slot, mine, |rt| {
                rt.status.images.retain(|i| i.kind != kind);
                rt.status.images.push(pulled);
                if let Some(pulling) = rt.status.pulling.as_mut() {
                    pulling.references.retain(|r| r != reference);
                    pulling.failure = None;
                }
            });
            resolved.push(image);
        }
        Ok(resolved)
    }

    /// One attempt, with the credentials of the latest apply.
    async fn pull_one(
        &self,
        store: &ImageStore,
        uid: &VmUid,
        kind: ImageKind,
        reference: &str,
        task: &PullTask,
    ) -> Result<ResolvedImage, ImageError> {
        let secrets = task
            .secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut credentials = RegistryCredentials::anonymous();
        for payload in &secrets.0 {
            credentials.add_docker_config(payload)?;
        }
        store
            .pull(PullRequest {
                holder: uid.as_str(),
                kind,
                reference,
                credentials: &credentials,
            })
            .await
    }

    /// An apply that changes nothing brings the pull secrets as they are now: a pull being
    /// retried uses them from its next attempt, at once when they changed.
    pub(super) fn refresh_pull_secrets(&self, slot: &VmSlot, secrets: &PullSecrets) {
        let rt = slot.lock();
        let Some(pull) = rt.pull.as_ref() else {
            return;
        };
        let mut held = pull.secrets.lock().unwrap_or_else(|p| p.into_inner());
        if &*held != secrets {
            *held = secrets.clone();
            pull.wake.notify_one();
        }
    }

    /// Stop the slot's pull, if one runs; whether one did.
    pub(super) fn cancel_pull(&self, slot: &VmSlot) -> bool {
        let pull = slot.lock().pull.take();
        pull.map(|p| p.cancel.cancel()).is_some()
    }

    /// Drop the VM's leases on cached images. Failures are logged: the entries then stay in
    /// the cache until a later release.
    pub(super) async fn release_images(&self, uid: &VmUid) {
        let Some(store) = self.images.existing() else {
            return;
        };
        if let Err(error) = store.release(uid.as_str()).await {
            tracing::warn!(%uid, reason = error.reason(), error = %crate::error::chain(&error), "cannot release the VM's images");
        }
    }

    /// A pull that ended after its VM was deleted may have leased an entry after the delete
    /// released the VM's leases: release again, unless the uid is held again.
    async fn release_images_if_gone(&self, slot: &VmSlot) {
        let gone = slot.lock().deleted && !self.slots().iter().any(|s| s.uid == slot.uid);
        if gone {
            self.release_images(&slot.uid).await;
        }
    }

    /// A VM re-adopted while it was pulling: pull again (the pull secrets were in memory
    /// only; a pull that needs them fails `ImageUnauthorized`, and the controller's next
    /// apply brings them).
    pub(super) fn resume_pull(self: &Arc<Self>, slot: &Arc<VmSlot>, request: ApplyRequest) {
        tracing::info!(uid = %slot.uid, "resuming the image pull of a VM that was pulling when the agent stopped");
        self.start_pull(slot, request);
    }
}
