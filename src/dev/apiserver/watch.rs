//! Watches: replay from a resourceVersion out of the stored history (or the current state as
//! synthetic ADDED events), then live events from the hub, with bookmarks, `timeoutSeconds`,
//! and an ERROR `410 Expired` event when the history no longer reaches back far enough.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::errors::ApiError;
use super::options::Query;
use super::resources::ResourceDef;
use super::selector::{FieldSelector, LabelSelector};
use super::server::Server;
use super::store::{EventType, StoredEvent};
use super::table::{IncludeObject, Shape};

/// The longest a watch stays open without `timeoutSeconds` (the real server's default is
/// 30 to 60 minutes).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// `resourceVersion` unset or `0`: the current state as ADDED events, then changes.
    Now,
    /// Changes after this version.
    Version(u64),
}

/// A parsed watch request.
#[derive(Clone, Debug)]
pub struct WatchRequest {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub shape: Shape,
    pub include: IncludeObject,
    pub since: Since,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: end the initial state with a bookmark annotated
    /// `k8s.io/initial-events-end`.
    pub send_initial_events: bool,
    pub timeout: Duration,
}

impl WatchRequest {
    /// Read the watch parameters of a request.
    pub(crate) fn from_query(
        query: &Query,
        namespace: Option<String>,
        labels: LabelSelector,
        fields: FieldSelector,
        shape: Shape,
    ) -> Result<Self, ApiError> {
        let rv = query.get("resourceVersion").unwrap_or_default();
        let send_initial_events = query.get("sendInitialEvents") == Some("true");
        let since =
            if rv.is_empty() || rv == "0" || send_initial_events {
                Since::Now
            } else {
                Since::Version(rv.parse().map_err(|_| {
                    ApiError::BadRequest(format!("invalid resource version: {rv:?}"))
                })?)
            };
        let timeout = match query.get("timeoutSeconds") {
            Some(t) => Duration::from_secs(
                t.parse()
                    .map_err(|_| ApiError::BadRequest(format!("invalid timeoutSeconds: {t:?}")))?,
            ),
            None => DEFAULT_TIMEOUT,
        };
        Ok(WatchRequest {
            namespace,
            labels,
            fields,
            shape,
            include: IncludeObject::parse(query.get("includeObject")),
            since,
            bookmarks: query.is_true("allowWatchBookmarks"),
            send_initial_events,
            timeout,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }
}

/// The event a selecting watch reports for a change: an object that leaves the selection is
/// DELETED for that watch, one that enters it is ADDED, as on a real server.
pub fn selection_change(
    type_: EventType,
    matched_before: Option<bool>,
    matches_now: bool,
) -> Option<&'static str> {
    match (type_, matched_before, matches_now) {
        (EventType::Modified, Some(true), false) => Some("DELETED"),
        (EventType::Modified, Some(false), true) => Some("ADDED"),
        (_, _, true) => Some(type_.as_str()),
        _ => None,
    }
}

/// One line of the watch stream.
pub fn event_line(def: &ResourceDef, req: &WatchRequest, type_: &str, object: &Value) -> Bytes {
    let object = req.shape.object(def, object.clone(), req.include);
    let mut line = json!({"type": type_, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(def: &ResourceDef, rv: u64, initial_end: bool) -> Bytes {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let mut line = json!({"type": "BOOKMARK", "object": {
        "kind": def.kind, "apiVersion": def.api_version(), "metadata": metadata}})
    .to_string();
    line.push('\n');
    Bytes::from(line)
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = tokio_stream::StreamExt::map(stream, Ok::<_, Infallible>);
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Start a watch and return its streaming response.
pub(crate) async fn serve(
    server: Arc<Server>,
    def: ResourceDef,
    req: WatchRequest,
) -> Result<Response<Body>, ApiError> {
    let key = def.storage_key();
    // Subscribe before reading the store, so nothing written in between is missed.
    let mut live = server.hub.subscribe();
    let (initial, mut last_rv) = {
        let store = server.lock();
        let current = store
            .current_rv()
            .map_err(|e| ApiError::internal("reading the version", e))?;
        match req.since {
            Since::Now => {
                let (items, rv) = store
                    .list(&key, req.namespace.as_deref())
                    .map_err(|e| ApiError::internal("listing objects", e))?;
                let lines: Vec<Bytes> = items
                    .into_iter()
                    .map(|o| def.present(o))
                    .filter(|o| req.matches(o))
                    .map(|o| event_line(&def, &req, "ADDED", &o))
                    .collect();
                (lines, rv)
            }
            Since::Version(since) => {
                match store
                    .history_since(&key, since)
                    .map_err(|e| ApiError::internal("reading the history", e))?
                {
                    Ok(events) => {
                        // Whether each object matched before its event, to report one that
                        // leaves or enters the selection as DELETED or ADDED.
                        let mut matched: HashMap<(String, String), bool> = HashMap::new();
                        let mut lines = Vec::new();
                        for e in events {
                            let k = (e.namespace.clone(), e.name.clone());
                            let was = match matched.get(&k) {
                                Some(m) => Some(*m),
                                None => store
                                    .object_at(&key, &e.namespace, &e.name, since)
                                    .map_err(|err| ApiError::internal("reading the history", err))?
                                    .map(|o| req.matches(&def.present(o))),
                            };
                            let object = def.present(e.object);
                            let matches = req.matches(&object);
                            let type_ = match e.type_ {
                                EventType::Deleted => was.unwrap_or(matches).then_some("DELETED"),
                                t => selection_change(t, was, matches),
                            };
                            matched.insert(k, e.type_ != EventType::Deleted && matches);
                            if let Some(t) = type_ {
                                lines.push(event_line(&def, &req, t, &object));
                            }
                        }
                        (lines, current.max(since))
                    }
                    Err(compacted) => {
                        let status = ApiError::Expired {
                            requested: since,
                            oldest: compacted.oldest,
                        }
                        .to_status();
                        let line = format!("{}\n", json!({"type": "ERROR", "object": status}));
                        let (tx, rx) = mpsc::channel(1);
                        let _ = tx.try_send(Bytes::from(line));
                        return Ok(streaming(rx));
                    }
                }
            }
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let shutdown = server.shutdown.clone();
    let interval = server.bookmark_interval;
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        if req.send_initial_events && tx.send(bookmark(&def, last_rv, true)).await.is_err() {
            return;
        }
        let deadline = tokio::time::sleep(req.timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            let line = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = &mut deadline => break,
                _ = tx.closed() => break,
                _ = ticker.tick(), if req.bookmarks => bookmark(&def, last_rv, false),
                event = live.recv() => match event {
                    Ok(event) => {
                        let event: Arc<StoredEvent> = event;
                        if event.rv <= last_rv {
                            continue;
                        }
                        last_rv = event.rv;
                        if event.resource != key {
                            continue;
                        }
                        let object = def.present(event.object.clone());
                        let was = event
                            .previous
                            .as_ref()
                            .map(|p| req.matches(&def.present(p.clone())));
                        let Some(type_) = selection_change(event.type_, was, req.matches(&object)) else {
                            continue;
                        };
                        event_line(&def, &req, type_, &object)
                    }
                    // A watcher that fell behind ends; its client resumes from the history.
                    Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => break,
                },
            };
            if tx.send(line).await.is_err() {
                break;
            }
        }
    });
    Ok(streaming(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(query: &[(&str, &str)]) -> Result<WatchRequest, ApiError> {
        let q = Query(
            query
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect(),
        );
        WatchRequest::from_query(
            &q,
            Some("default".into()),
            LabelSelector::parse("app=x").expect("labels"),
            FieldSelector::default(),
            Shape::Object,
        )
    }

    #[test]
    fn watch_parameters_are_read() {
        let r = req(&[
            ("resourceVersion", "42"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", "5"),
        ])
        .expect("parse");
        assert_eq!(r.since, Since::Version(42));
        assert!(r.bookmarks);
        assert_eq!(r.timeout, Duration::from_secs(5));
        assert_eq!(
            req(&[("resourceVersion", "0")]).expect("parse").since,
            Since::Now
        );
        assert_eq!(req(&[]).expect("parse").since, Since::Now);
        assert!(req(&[("resourceVersion", "abc")]).is_err());
    }

    #[test]
    fn objects_entering_and_leaving_a_selection() {
        let m = EventType::Modified;
        assert_eq!(selection_change(m, Some(true), false), Some("DELETED"));
        assert_eq!(selection_change(m, Some(false), true), Some("ADDED"));
        assert_eq!(selection_change(m, Some(true), true), Some("MODIFIED"));
        assert_eq!(selection_change(m, Some(false), false), None);
        assert_eq!(
            selection_change(EventType::Added, None, true),
            Some("ADDED")
        );
        assert_eq!(selection_change(EventType::Deleted, None, false), None);
    }

    #[test]
    fn events_are_filtered_by_namespace_and_labels() {
        let r = req(&[]).expect("parse");
        assert!(r.matches(&json!({"metadata": {"namespace": "default", "labels": {"app": "x"}}})));
        assert!(!r.matches(&json!({"metadata": {"namespace": "other", "labels": {"app": "x"}}})));
        assert!(!r.matches(&json!({"metadata": {"namespace": "default"}})));
    }
}
