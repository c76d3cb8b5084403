//! Events about MicroVMs, written as `events.k8s.io/v1` Events.
//!
//! A repeat of the same event — same object, type, reason and message — within
//! [`SERIES_WINDOW`] is counted on the first Event (its `series`), as `kubectl describe` shows
//! with "x3". An event with another message is an Event of its own: kube-runtime's `Recorder`
//! (like client-go's events/v1 broadcaster) keys a series on the reason alone and keeps the
//! first message, so "Restarted x2: run 0 ended …" hid that the second restart was run 1 → 2
//! (issue #13, defect 8). The planner's messages carry what makes each occurrence distinct
//! (run numbers), so only true repeats merge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use super::decide::EventKind;

/// How long an Event takes repeats into its series; later, a repeat is a new Event (the API
/// server's default Event TTL is one hour, so the first one is still there to count on).
pub(crate) const SERIES_WINDOW: SignedDuration = SignedDuration::from_mins(6);

/// How many distinct recent events are remembered for counting; the oldest are forgotten
/// first, which only costs a repeat its count (it becomes an Event of its own).
const MAX_REMEMBERED: usize = 4096;

/// The `action` of every Event: what the controller was doing.
const ACTION: &str = "Reconcile";

/// Who writes the Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Reporter {
    /// `reportingController` (the field manager name).
    pub(crate) controller: String,
    /// `reportingInstance` (the pod); the controller's name when unknown.
    pub(crate) instance: Option<String>,
}

/// What makes two events the same occurrence.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct EventKey {
    /// The regarded object by uid (a re-created object of the same name is another object),
    /// or by namespace/name when it has no uid.
    regarding: (String, String, String),
    warning: bool,
    reason: String,
    note: String,
}

/// The Event an occurrence was first written as, and how often it was seen since.
#[derive(Clone, Debug)]
struct Series {
    name: String,
    count: i32,
    first: Timestamp,
    last: Timestamp,
}

/// Writes Events; cheap to share (one per controller).
pub(crate) struct EventRecorder {
    client: Client,
    reporter: Reporter,
    recent: Mutex<HashMap<EventKey, Series>>,
    /// One gate per occurrence being written, held across its write: two repeats racing each
    /// other count twice, not create twice. Per occurrence, not one for the recorder: a single
    /// lock held across every API write made all Events of all MicroVMs wait in one line, and
    /// every reconcile that published one with them (docs/benchmarks.md § control-plane).
    writing: Mutex<HashMap<EventKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// Drops an occurrence's gate from the map once no one else waits on it.
struct Gate<'a> {
    writing: &'a Mutex<HashMap<EventKey, Arc<tokio::sync::Mutex<()>>>>,
    key: &'a EventKey,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut writing = lock(self.writing);
        // Clones are only made under this lock: two left are the map's and ours.
        if Arc::strong_count(&self.gate) <= 2 {
            writing.remove(self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EventRecorder {
    pub(crate) fn new(client: Client, reporter: Reporter) -> Self {
        EventRecorder {
            client,
            reporter,
            recent: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashMap::new()),
        }
    }

    /// Record one event about `regarding`: a new Event, or one more in the series of the same
    /// event written within [`SERIES_WINDOW`].
    pub(crate) async fn publish(
        &self,
        regarding: &ObjectReference,
        kind: EventKind,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let key = EventKey {
            regarding: (
                namespace.clone(),
                regarding.name.clone().unwrap_or_default(),
                regarding.uid.clone().unwrap_or_default(),
            ),
            warning: kind == EventKind::Warning,
            reason: reason.to_owned(),
            note: note.to_owned(),
        };
        let gate = Gate {
            gate: lock(&self.writing).entry(key.clone()).or_default().clone(),
            writing: &self.writing,
            key: &key,
        };
        let _held = gate.gate.lock().await;
        let series = {
            let mut recent = lock(&self.recent);
            forget_old(&mut recent, now);
            recent.get(&key).map(|s| (s.name.clone(), s.count))
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        if let Some((name, count)) = series {
            let count = count + 1;
            let patch = json!({
                "series": { "count": count, "lastObservedTime": MicroTime(now) },
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    if let Some(series) = lock(&self.recent).get_mut(&key) {
                        series.count = count;
                        series.last = now;
                    }
                    return Ok(());
                }
                // Removed meanwhile (its TTL, a person): the occurrence starts a new Event.
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    lock(&self.recent).remove(&key);
                }
                Err(error) => return Err(error),
            }
        }
        let event = self.event(regarding, &namespace, kind, reason, note, now);
        let name = event.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &event).await?;
        lock(&self.recent).insert(
            key.clone(),
            Series {
                name,
                count: 1,
                first: now,
                last: now,
            },
        );
        Ok(())
    }

    fn event(
        &self,
        regarding: &ObjectReference,
        namespace: &str,
        kind: EventKind,
        reason: &str,
        note: &str,
        now: Timestamp,
    ) -> Event {
        let object = regarding
            .name
            .as_deref()
            .unwrap_or(&self.reporter.controller);
        Event {
            metadata: ObjectMeta {
                name: Some(format!("{object}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.to_owned()),
                ..Default::default()
            },
            action: Some(ACTION.to_owned()),
            reason: Some(reason.to_owned()),
            note: Some(note.to_owned()),
            type_: Some(
                match kind {
                    EventKind::Normal => "Normal",
                    EventKind::Warning => "Warning",
                }
                .to_owned(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..Default::default()
        }
    }

    /// How many distinct events are remembered (for tests).
    #[cfg(test)]
    async fn remembered(&self) -> usize {
        lock(&self.recent).len()
    }
}

/// Forget series whose window is over, and the oldest beyond [`MAX_REMEMBERED`].
fn forget_old(recent: &mut HashMap<EventKey, Series>, now: Timestamp) {
    recent.retain(|_, s| now.duration_since(s.first) < SERIES_WINDOW);
    if recent.len() >= MAX_REMEMBERED {
        let mut by_age: Vec<(Timestamp, EventKey)> =
            recent.iter().map(|(k, s)| (s.last, k.clone())).collect();
        by_age.sort_by_key(|(last, _)| *last);
        for (_, key) in by_age.iter().take(recent.len() + 1 - MAX_REMEMBERED) {
            recent.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Method, Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::Value;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn object() -> ObjectReference {
        ObjectReference {
            api_version: Some("ignis.dev/v1alpha1".into()),
            kind: Some("MicroVM".into()),
            name: Some("web".into()),
            namespace: Some("default".into()),
            uid: Some("uid-web".into()),
            ..Default::default()
        }
    }

    /// The next request: method, path, JSON body; answered with `status` and the body back.
    async fn next(handle: &mut Handle, status: StatusCode) -> (Method, String, Value) {
        let (request, respond) =
            tokio::time::timeout(std::time::Duration::from_secs(10), handle.next_request())
                .await
                .expect("a request in time")
                .expect("service called");
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("JSON");
        let answer = if status.is_success() {
            let mut event = body.clone();
            event["apiVersion"] = json!("events.k8s.io/v1");
            event["kind"] = json!("Event");
            event["metadata"]["name"] = json!("x");
            serde_json::to_vec(&event).expect("json")
        } else {
            serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1",
                "status": "Failure", "reason": "NotFound", "code": status.as_u16(),
                "message": "gone"}))
            .expect("json")
        };
        respond.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(answer))
                .expect("response"),
        );
        (method, path, body)
    }

    fn recorder() -> (EventRecorder, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let recorder = EventRecorder::new(
            Client::new(service, "default"),
            Reporter {
                controller: "ignis-controller".into(),
                instance: Some("pod-1".into()),
            },
        );
        (recorder, handle)
    }

    const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

    #[tokio::test]
    async fn only_identical_reason_and_message_share_a_series() {
        let (recorder, mut handle) = recorder();
        let verifier = tokio::spawn(async move {
            // Restarted for run 0 → 1: a new Event with its message.
            let (method, path, first) = next(&mut handle, StatusCode::CREATED).await;
            assert_eq!((method, path.as_str()), (Method::POST, EVENTS));
            assert_eq!(
                first["note"],
                "run 0 ended (GuestPanic); restarts it as run 1"
            );
            assert_eq!(first["reason"], "Restarted");
            assert_eq!(first["type"], "Normal");
            assert_eq!(first["action"], "Reconcile");
            assert_eq!(first["reportingController"], "ignis-controller");
            assert_eq!(first["reportingInstance"], "pod-1");
            assert_eq!(first["regarding"]["uid"], "uid-web");
            assert!(first.get("series").is_none());
            // Restarted for run 1 → 2: same reason, another message, so another Event.
            let (method, _, second) = next(&mut handle, StatusCode::CREATED).await;
            assert_eq!(method, Method::POST);
            assert_eq!(
                second["note"],
                "run 1 ended (GuestPanic); restarts it as run 2"
            );
            assert_ne!(second["metadata"]["name"], first["metadata"]["name"]);
            // The very same event again: counted on the second Event, message untouched.
            let (method, path, patch) = next(&mut handle, StatusCode::OK).await;
            assert_eq!(method, Method::PATCH);
            assert_eq!(
                path,
                format!(
                    "{EVENTS}/{}",
                    second["metadata"]["name"].as_str().expect("name")
                )
            );
            assert_eq!(patch["series"]["count"], 2);
            assert!(patch.get("note").is_none(), "{patch}");
            // A Warning with the same reason and message is not a Normal one.
            let (method, _, warning) = next(&mut handle, StatusCode::CREATED).await;
            assert_eq!(
                (method, warning["type"].clone()),
                (Method::POST, json!("Warning"))
            );
            // Third time: count 3.
            let (_, _, patch) = next(&mut handle, StatusCode::OK).await;
            assert_eq!(patch["series"]["count"], 3);
        });
        let o = object();
        for (kind, note) in [
            (
                EventKind::Normal,
                "run 0 ended (GuestPanic); restarts it as run 1",
            ),
            (
                EventKind::Normal,
                "run 1 ended (GuestPanic); restarts it as run 2",
            ),
            (
                EventKind::Normal,
                "run 1 ended (GuestPanic); restarts it as run 2",
            ),
            (
                EventKind::Warning,
                "run 1 ended (GuestPanic); restarts it as run 2",
            ),
            (
                EventKind::Normal,
                "run 1 ended (GuestPanic); restarts it as run 2",
            ),
        ] {
            recorder
                .publish(&o, kind, "Restarted", note)
                .await
                .expect("published");
        }
        verifier.await.expect("requests as expected");
        assert_eq!(recorder.remembered().await, 3);
    }

    #[tokio::test]
    async fn a_series_whose_event_is_gone_starts_a_new_event() {
        let (recorder, mut handle) = recorder();
        let verifier = tokio::spawn(async move {
            assert_eq!(next(&mut handle, StatusCode::CREATED).await.0, Method::POST);
            assert_eq!(
                next(&mut handle, StatusCode::NOT_FOUND).await.0,
                Method::PATCH
            );
            let (method, _, again) = next(&mut handle, StatusCode::CREATED).await;
            assert_eq!(method, Method::POST);
            assert!(again.get("series").is_none());
        });
        for _ in 0..2 {
            recorder
                .publish(&object(), EventKind::Warning, "BootTimeout", "missed")
                .await
                .expect("published");
        }
        verifier.await.expect("requests as expected");
    }

    #[tokio::test]
    async fn events_of_other_objects_do_not_wait_for_each_other_and_repeats_still_count() {
        let (recorder, mut handle) = recorder();
        let recorder = std::sync::Arc::new(recorder);
        let other = ObjectReference {
            name: Some("db".into()),
            uid: Some("uid-db".into()),
            ..object()
        };
        let publish = |o: ObjectReference| {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                recorder
                    .publish(&o, EventKind::Normal, "Scheduled", "placed on node-a")
                    .await
                    .expect("published")
            })
        };
        let web = publish(object());
        let (first, first_answer) =
            tokio::time::timeout(std::time::Duration::from_secs(10), handle.next_request())
                .await
                .expect("a request in time")
                .expect("service called");
        let web_again = publish(object());
        let db = publish(other);
        // The first write is still unanswered: the other object's Event is written meanwhile,
        // the repeat of the first one waits for it.
        let (method, _, body) = next(&mut handle, StatusCode::CREATED).await;
        assert_eq!(
            (method, body["regarding"]["name"].clone()),
            (Method::POST, json!("db"))
        );
        db.await.expect("db published");
        assert_eq!(first.uri().path(), EVENTS);
        let bytes = first.into_body().collect_bytes().await.expect("body");
        let mut event: Value = serde_json::from_slice(&bytes).expect("JSON");
        event["apiVersion"] = json!("events.k8s.io/v1");
        event["kind"] = json!("Event");
        first_answer.send_response(
            Response::builder()
                .status(StatusCode::CREATED)
                .body(Body::from(serde_json::to_vec(&event).expect("json")))
                .expect("response"),
        );
        web.await.expect("web published");
        let (method, path, patch) = next(&mut handle, StatusCode::OK).await;
        assert_eq!(method, Method::PATCH);
        assert!(path.starts_with(&format!("{EVENTS}/web.")), "{path}");
        assert_eq!(patch["series"]["count"], 2);
        web_again.await.expect("repeat published");
        assert_eq!(recorder.remembered().await, 2);
        assert!(lock(&recorder.writing).is_empty(), "gates are dropped");
    }

    #[test]
    fn old_and_surplus_series_are_forgotten() {
        let now = Timestamp::from_second(10_000).expect("ts");
        let series = |age_secs: i64| Series {
            name: "e".into(),
            count: 1,
            first: now - SignedDuration::from_secs(age_secs),
            last: now - SignedDuration::from_secs(age_secs),
        };
        let key = |i: usize| EventKey {
            regarding: ("default".into(), format!("vm-{i}"), String::new()),
            warning: false,
            reason: "Ready".into(),
            note: String::new(),
        };
        let mut recent: HashMap<EventKey, Series> = HashMap::new();
        recent.insert(key(0), series(SERIES_WINDOW.as_secs() + 1));
        recent.insert(key(1), series(1));
        forget_old(&mut recent, now);
        assert_eq!(recent.keys().cloned().collect::<Vec<_>>(), vec![key(1)]);
        for i in 0..MAX_REMEMBERED + 10 {
            recent.insert(key(i), series((i % 300) as i64));
        }
        forget_old(&mut recent, now);
        assert_eq!(recent.len(), MAX_REMEMBERED - 1);
    }
}
