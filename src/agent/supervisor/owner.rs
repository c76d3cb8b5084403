//! Who a VM answers to (issue #20's warm pools). A pool's warm VM W stays under W's uid on the
//! node (its state directory, taps, ids and pod are keyed by it), but once a MicroVM C claims
//! it, the VM carries C's name and metadata, reports C as its owner, and ignores applies and
//! deletes from anyone but C. The rule is [`decide_owner`](super::decide::decide_owner); this
//! is where a held VM takes the identity an apply gives it.

use super::*;

impl Inner {
    /// Take the request's identity (name, namespace, owner) and guest metadata for a VM whose
    /// spec hash stays the same: nothing boots, the held request and the status change and are
    /// persisted (so a re-adoption keeps them), and the status goes out if it changed.
    pub(super) fn take_identity(&self, slot: &VmSlot, request: &ApplyRequest) {
        let spec = &request.spec;
        let mut written = None;
        {
            let mut rt = slot.lock();
            if let Some(held) = rt.request.as_mut() {
                let changed = held.spec.name != spec.name
                    || held.spec.namespace != spec.namespace
                    || held.owner != request.owner
                    || held.metadata != request.metadata;
                if changed {
                    held.spec.name = spec.name.clone();
                    held.spec.namespace = spec.namespace.clone();
                    held.owner = request.owner.clone();
                    held.metadata = request.metadata.clone();
                    written = Some(held.clone());
                }
            }
        }
        if let Some(held) = written
            && let Err(error) = self.store.write_spec(&held)
        {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot record the VM's new owner or metadata");
        }
        let renamed = {
            let rt = slot.lock();
            rt.status.name != spec.name
                || rt.status.namespace != spec.namespace
                || rt.status.owner != request.owner
        };
        if renamed {
            self.update(slot, None, |rt| {
                rt.status.name = spec.name.clone();
                rt.status.namespace = spec.namespace.clone();
                rt.status.owner = request.owner.clone();
            });
        }
    }

    /// Serve the held request's guest metadata over the VM's metadata channel.
    pub(super) fn publish_metadata(&self, slot: &VmSlot) {
        let rt = slot.lock();
        if let (false, Some(request)) = (rt.deleted, rt.request.as_ref()) {
            self.metadata.publish(&slot.uid, &request.metadata);
        }
    }
}
