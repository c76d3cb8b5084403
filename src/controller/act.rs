//! Act, the last stage of a reconcile: carry out what [`decide`](super::decide) chose, one
//! named step per action, in its order. The metadata patch (finalizer, placement) goes first,
//! so no VM is applied for an object that could still be deleted without us.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action as Requeue;
use kube::{Api, Resource, ResourceExt};

use super::decide::{Action, EventKind, PodView};
use super::observe::PodParts;
use super::reconcile::{Context, RESYNC, ReconcileError};
use super::vmspec::BuiltSpec;
use super::{pull_secrets, status, vmpod};
use crate::api::{FIELD_MANAGER, MicroVM, MicroVMStatus};
use crate::vm::{ApplyRequest, DesiredState, PodRef, VmUid};

/// The API handles and names every step uses.
struct Target<'a> {
    mvm: &'a MicroVM,
    ctx: &'a Context,
    namespace: String,
    microvms: Api<MicroVM>,
    pods: Api<Pod>,
}

pub(super) async fn act(
    mvm: &MicroVM,
    actions: Vec<Action>,
    built: Option<BuiltSpec>,
    pod: Option<PodParts>,
    ctx: &Context,
) -> Result<Requeue, ReconcileError> {
    let (new_pod, seen_pod) = pod.unwrap_or_default();
    let namespace = mvm.namespace().ok_or(ReconcileError::NoNamespace)?;
    let t = Target {
        mvm,
        ctx,
        microvms: Api::namespaced(ctx.client.clone(), &namespace),
        pods: Api::namespaced(ctx.client.clone(), &namespace),
        namespace,
    };
    patch_metadata(&t, &actions).await?;
    let mut requeue = None;
    for action in actions {
        let step = step_of(&action);
        let started = Instant::now();
        match action {
            Action::AddFinalizer | Action::Place { .. } => {}
            Action::ApplyVm { node, run, desired } => {
                if let Some(built) = built.as_ref() {
                    apply_vm(&t, &node, built, run, desired, seen_pod.as_ref()).await?;
                }
            }
            Action::DeleteVm { node } => delete_vm(&t, &node).await?,
            Action::CreatePod => {
                if let Some(pod) = new_pod.as_ref() {
                    create_pod(&t, pod).await?;
                }
            }
            Action::DeletePod => delete_pod(&t, seen_pod.as_ref()).await?,
            Action::SetPodReady(ready) => set_pod_ready(&t, ready).await?,
            Action::RemoveFinalizer => remove_finalizer(&t).await?,
            Action::UpdateStatus(new) => write_status(&t.microvms, mvm, &new).await?,
            Action::Event {
                kind,
                reason,
                message,
            } => publish(ctx, mvm, kind, reason, message).await,
            Action::RequeueAfter(d) => requeue = Some(d),
        }
        if let Some(step) = step {
            ctx.metrics.step(step, started.elapsed());
        }
    }
    Ok(Requeue::requeue(requeue.unwrap_or(RESYNC)))
}

/// The step an action's time is counted under (`ignis_controller_reconcile_step_seconds`).
fn step_of(action: &Action) -> Option<&'static str> {
    match action {
        Action::ApplyVm { .. } | Action::DeleteVm { .. } => Some("agent"),
        Action::CreatePod | Action::DeletePod | Action::SetPodReady(_) => Some("pod"),
        Action::RemoveFinalizer => Some("metadata"),
        Action::UpdateStatus(_) => Some("status"),
        Action::Event { .. } => Some("event"),
        Action::AddFinalizer | Action::Place { .. } | Action::RequeueAfter(_) => None,
    }
}

/// The finalizer and the placement, in one merge patch before anything else happens.
async fn patch_metadata(t: &Target<'_>, actions: &[Action]) -> Result<(), ReconcileError> {
    let add_finalizer = actions.contains(&Action::AddFinalizer);
    let place = actions.iter().find_map(|a| match a {
        Action::Place { node } => Some(node.clone()),
        _ => None,
    });
    if !add_finalizer && place.is_none() {
        return Ok(());
    }
    let patch = status::metadata_patch(t.mvm, add_finalizer, place.as_deref());
    let started = Instant::now();
    t.microvms
        .patch(
            &t.mvm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(ReconcileError::kube)?;
    t.ctx.metrics.step("metadata", started.elapsed());
    Ok(())
}

/// Send the VM's spec to its node's agent, with the pull secrets its images need and, in pod
/// mode, the pod whose sandbox it runs in (only the one observed, so only a running sandbox).
async fn apply_vm(
    t: &Target<'_>,
    node: &str,
    built: &BuiltSpec,
    run: u32,
    desired: DesiredState,
    seen_pod: Option<&PodView>,
) -> Result<(), ReconcileError> {
    let mut pull_secrets = Default::default();
    if !built.spec.images().is_empty() && !t.mvm.spec.image_pull_secrets.is_empty() {
        let read =
            pull_secrets::read(&t.ctx.client, &t.namespace, &t.mvm.spec.image_pull_secrets).await;
        for problem in read.problems {
            let reason = "FailedToRetrieveImagePullSecret";
            publish(t.ctx, t.mvm, EventKind::Warning, reason, problem).await;
        }
        pull_secrets = read.secrets;
    }
    let request = ApplyRequest {
        spec: built.spec.clone(),
        spec_hash: built.hash.clone(),
        run,
        desired,
        pull_secrets,
        pod: seen_pod.map(|p| PodRef {
            uid: p.uid.clone(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            ip: p.ip,
        }),
        metadata: built.metadata.clone(),
        owner: built.owner.clone(),
    };
    t.ctx
        .pool
        .apply_vm(node, &request)
        .await
        .map_err(ReconcileError::Agent)?;
    Ok(())
}

async fn delete_vm(t: &Target<'_>, node: &str) -> Result<(), ReconcileError> {
    let grace = Duration::from_secs(t.mvm.spec.termination_grace_period_seconds.max(0) as u64);
    // A uid that names no VM was never applied: there is nothing to delete.
    let identity = super::identity::of(t.mvm);
    let Ok(uid) = VmUid::new(identity.vm_uid) else {
        return Ok(());
    };
    t.ctx
        .pool
        .delete_vm(node, &uid, identity.owner.as_ref(), grace)
        .await
        .map_err(ReconcileError::Agent)?;
    Ok(())
}

async fn create_pod(t: &Target<'_>, pod: &Pod) -> Result<(), ReconcileError> {
    match t.pods.create(&PostParams::default(), pod).await {
        Ok(_) => Ok(()),
        // Made by an earlier reconcile the cache has not shown yet.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(error) => Err(ReconcileError::kube(error)),
    }
}

async fn delete_pod(t: &Target<'_>, seen: Option<&PodView>) -> Result<(), ReconcileError> {
    // Only the pod observed: never a newer one of the same name.
    let params = DeleteParams {
        preconditions: seen.map(|p| Preconditions {
            uid: Some(p.uid.clone()),
            resource_version: None,
        }),
        ..Default::default()
    };
    match t
        .pods
        .delete(&vmpod::pod_name(&t.mvm.name_any()), &params)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(error) => Err(ReconcileError::kube(error)),
    }
}

/// The VM pod's readiness gate follows the guest's readiness, so a Service routes only to
/// Ready VMs.
async fn set_pod_ready(t: &Target<'_>, ready: bool) -> Result<(), ReconcileError> {
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": vmpod::GUEST_READY_GATE,
        "status": if ready { "True" } else { "False" },
        "lastTransitionTime": jiff::Timestamp::now().to_string(),
    }]}});
    let name = vmpod::pod_name(&t.mvm.name_any());
    match t
        .pods
        .patch_status(&name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
    {
        Ok(_) => Ok(()),
        // Gone meanwhile: its successor gets the gate when it is there.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(error) => Err(ReconcileError::kube(error)),
    }
}

async fn remove_finalizer(t: &Target<'_>) -> Result<(), ReconcileError> {
    let Some(patch) = status::remove_finalizer_patch(t.mvm) else {
        return Ok(());
    };
    match t
        .microvms
        .patch(
            &t.mvm.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Already gone: the release is done.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(error) => Err(ReconcileError::kube(error)),
    }
}

/// Write `mvm`'s status by server-side apply, the controller's one way of writing it.
pub(super) async fn write_status(
    microvms: &Api<MicroVM>,
    mvm: &MicroVM,
    new: &MicroVMStatus,
) -> Result<(), ReconcileError> {
    microvms
        .patch_status(
            &mvm.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(status::status_apply_body(new)),
        )
        .await
        .map_err(ReconcileError::kube)?;
    Ok(())
}

/// Publish an Event about `mvm`. An Event is a courtesy: failing to write one must not fail
/// the reconcile.
pub(super) async fn publish(
    ctx: &Context,
    mvm: &MicroVM,
    kind: EventKind,
    reason: &str,
    message: String,
) {
    let regarding = mvm.object_ref(&());
    if let Err(error) = ctx
        .recorder
        .publish(&regarding, kind, reason, &message)
        .await
    {
        tracing::debug!(%error, "cannot publish event");
    }
}
