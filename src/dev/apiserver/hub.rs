//! The watch hub: every committed change goes out to the open watches, and every accepted write
//! request to the observers registered at start (the boot benchmark counts writes per object
//! this way). Observers see requests, not only changes: a write that changes nothing still cost
//! its client a round trip, and that is what a write budget measures.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::store::StoredEvent;

/// One accepted write request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRecord<'a> {
    /// `group/plural` of the storage the write went to, e.g. `ignis.dev/microvms`.
    pub resource: &'a str,
    /// `""` for cluster-scoped objects.
    pub namespace: &'a str,
    pub name: &'a str,
    /// `create`, `update`, `patch`, `apply` or `delete`, with `/status` for the subresource.
    pub verb: &'a str,
}

/// Told about every accepted write request (dry runs excluded). Called on the request's task:
/// an observer must be quick and must not block.
pub trait WriteObserver: Send + Sync {
    fn observe(&self, write: &WriteRecord<'_>);
}

/// Fan-out of changes to watches and of write requests to observers.
pub struct Hub {
    changes: broadcast::Sender<Arc<StoredEvent>>,
    observers: Vec<Arc<dyn WriteObserver>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("observers", &self.observers.len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub whose slowest watch may fall `capacity` changes behind before it is ended (its
    /// client resumes from the stored history).
    pub(crate) fn new(capacity: usize, observers: Vec<Arc<dyn WriteObserver>>) -> Self {
        let (changes, _) = broadcast::channel(capacity);
        Hub { changes, observers }
    }

    /// Receive every change committed from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.changes.subscribe()
    }

    /// Send a committed change to the open watches.
    pub(crate) fn publish(&self, event: StoredEvent) {
        // Nobody listening is fine: watches subscribe before they read the store.
        let _ = self.changes.send(Arc::new(event));
    }

    /// Tell the observers about an accepted write request.
    pub(crate) fn record(&self, write: &WriteRecord<'_>) {
        for observer in &self.observers {
            observer.observe(write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl WriteObserver for Log {
        fn observe(&self, w: &WriteRecord<'_>) {
            self.0.lock().expect("log").push(format!(
                "{} {}/{}/{}",
                w.verb, w.resource, w.namespace, w.name
            ));
        }
    }

    #[test]
    fn observers_see_every_recorded_write() {
        let log = Arc::new(Log::default());
        let hub = Hub::new(4, vec![log.clone(), log.clone()]);
        hub.record(&WriteRecord {
            resource: "ignis.dev/microvms",
            namespace: "default",
            name: "a",
            verb: "apply/status",
        });
        let seen = log.0.lock().expect("log").clone();
        assert_eq!(seen, ["apply/status ignis.dev/microvms/default/a"; 2]);
    }
}
