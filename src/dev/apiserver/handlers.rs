//! The API semantics: create, get, list, update, patch, delete (with finalizers) and the status
//! subresource over the generic store, plus the HTTP dispatch that turns requests into them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, Response, StatusCode, header};
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::errors::{ApiError, Cause};
use super::patch::{self, PatchKind};
use super::resources::{Registry, ResourceDef};
use super::route::{self, ResourcePath, Route};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{EventType, Store, StoredEvent};
use super::table::{self, IncludeObject};
use super::{discovery, openapi, schema, watch};
use crate::api::validation::MicroVmValidator;

/// Largest request body accepted (the real server's limit is 3 MiB too).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Writes to one object, by verb (`create`, `patch`, `apply/status`, …): what the benchmark
/// counts between create and Ready.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ObjectWrites {
    pub by_verb: BTreeMap<String, u64>,
}

impl ObjectWrites {
    /// Writes to the object and its status (deletes excluded).
    pub fn total(&self) -> u64 {
        self.by_verb
            .iter()
            .filter(|(verb, _)| !verb.starts_with("delete"))
            .map(|(_, n)| n)
            .sum()
    }
}

/// Options of one write request.
#[derive(Clone, Debug, Default)]
pub struct WriteOptions {
    pub field_manager: Option<String>,
    /// Server-side apply takes fields other managers own instead of answering 409.
    pub force: bool,
    /// `fieldValidation=Ignore`: unknown fields are dropped without a warning.
    pub ignore_unknown: bool,
    /// Warnings for the response's `Warning` headers (unknown fields dropped under `Warn`,
    /// the default).
    pub warnings: Arc<Mutex<Vec<String>>>,
    /// `fieldValidation=Strict`: unknown fields are refused instead of dropped.
    pub strict: bool,
    pub dry_run: bool,
}

/// Everything the handlers share.
pub struct Server {
    pub registry: Registry,
    pub store: Mutex<Store>,
    pub hub: broadcast::Sender<Arc<StoredEvent>>,
    pub token: String,
    pub validator: MicroVmValidator,
    pub writes: Mutex<BTreeMap<String, ObjectWrites>>,
    pub shutdown: CancellationToken,
    pub bookmark_interval: Duration,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

/// Now, at the second precision the API uses.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| jiff::Timestamp::now().to_string())
}

fn meta(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    match obj.get_mut("metadata") {
        Some(Value::Object(m)) => m,
        _ => unreachable!("metadata was made an object just above"),
    }
}

fn str_of<'a>(obj: &'a Value, field: &str) -> &'a str {
    obj["metadata"][field].as_str().unwrap_or_default()
}

/// The object without metadata and status: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

/// The object as compared for no-op detection (versions and manager timestamps aside).
fn comparable(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

/// A valid object name: a lowercase RFC 1123 subdomain.
pub fn is_dns_subdomain(name: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(ok_char)
        && alnum(name.chars().next())
        && alnum(name.chars().last())
}

/// Names `generateName` appends, as the real server spells them.
fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Server {
    pub(super) fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_write(&self, def: &ResourceDef, ns: &str, name: &str, verb: &str) {
        let key = format!("{}/{ns}/{name}", def.storage_key());
        let mut writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        *writes
            .entry(key)
            .or_default()
            .by_verb
            .entry(verb.to_string())
            .or_default() += 1;
    }

    /// Writes recorded for one object, keyed by `group/plural/namespace/name`.
    pub fn writes_snapshot(&self) -> BTreeMap<String, ObjectWrites> {
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn commit(
        &self,
        store: &mut Store,
        def: &ResourceDef,
        type_: EventType,
        object: Value,
        previous: Option<&Value>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if opts.dry_run {
            return Ok(object);
        }
        let ns = str_of(&object, "namespace").to_string();
        let name = str_of(&object, "name").to_string();
        let mut event = store
            .write(&def.storage_key(), &ns, &name, type_, object)
            .map_err(|e| ApiError::internal("storing the object", e))?;
        event.previous = previous.cloned();
        let object = event.object.clone();
        // Nobody listening is fine: watches subscribe before they read.
        let _ = self.hub.send(Arc::new(event));
        Ok(object)
    }

    fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: def.qualified(),
            name: name.into(),
        }
    }

    fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
        ApiError::Invalid {
            kind: def.kind.clone(),
            group: def.group.clone(),
            name: name.into(),
            causes,
        }
    }

    /// Schema defaulting and pruning (custom resources), then the CRD's validation rules.
    fn admit(
        &self,
        def: &ResourceDef,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &WriteOptions,
    ) -> Result<(), ApiError> {
        if let Some(schema) = &def.schema {
            let unknown = schema::prune(schema, obj);
            if opts.strict && !unknown.is_empty() {
                let list: Vec<String> = unknown
                    .iter()
                    .map(|f| format!("unknown field \"{f}\""))
                    .collect();
                return Err(ApiError::BadRequest(format!(
                    "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                    list.join(", "),
                    kind = def.kind,
                    version = def.version
                )));
            }
            if !opts.ignore_unknown && !unknown.is_empty() {
                let mut warnings = opts.warnings.lock().unwrap_or_else(|p| p.into_inner());
                warnings.extend(unknown.iter().map(|f| format!("unknown field \"{f}\"")));
            }
            schema::apply_defaults(schema, obj);
        }
        if def.group == crate::api::GROUP && def.kind == "MicroVM" {
            let errors = self.validator.validate(obj, old);
            if !errors.is_empty() {
                let causes = errors
                    .iter()
                    .map(|e| {
                        let line = e.to_string();
                        let prefix = format!("{}: ", e.field);
                        Cause {
                            reason: e.kind.cause_type().into(),
                            message: line.strip_prefix(&prefix).unwrap_or(&line).to_string(),
                            field: e.field.clone(),
                        }
                    })
                    .collect();
                return Err(Self::invalid(def, str_of(obj, "name"), causes));
            }
        }
        Ok(())
    }

    fn check_kind(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::BadRequest(
                "the body must be a JSON object".into(),
            ));
        }
        let kind = obj["kind"].as_str().unwrap_or_default();
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        if (!kind.is_empty() && kind != def.kind)
            || (!api_version.is_empty() && api_version != def.api_version())
        {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({})",
                def.api_version()
            )));
        }
        Ok(())
    }

    /// GET one object.
    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .get(&def.storage_key(), ns, name)
            .map_err(|e| ApiError::internal("reading the object", e))?
            .map(|o| def.present(o))
            .ok_or_else(|| Self::not_found(def, name))
    }

    /// LIST, filtered; returns the items and the version the list is consistent at.
    pub fn list(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> Result<(Vec<Value>, u64), ApiError> {
        let (items, rv) = self
            .lock()
            .list(&def.storage_key(), ns)
            .map_err(|e| ApiError::internal("listing objects", e))?;
        Ok((
            items
                .into_iter()
                .map(|o| def.present(o))
                .filter(|o| labels.matches(o) && fields.matches(o))
                .collect(),
            rv,
        ))
    }

    /// POST: create an object.
    pub fn create(
        &self,
        def: &ResourceDef,
        ns: &str,
        mut obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        Self::check_kind(def, &obj)?;
        obj["kind"] = Value::String(def.kind.clone());
        obj["apiVersion"] = Value::String(def.api_version());
        let now = now();
        {
            let m = meta(&mut obj);
            if def.namespaced {
                let body_ns = m
                    .get("namespace")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if !body_ns.is_empty() && body_ns != ns {
                    return Err(ApiError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                m.insert("namespace".into(), Value::String(ns.into()));
            } else {
                m.remove("namespace");
            }
            for field in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                m.remove(field);
            }
            m.insert(
                "uid".into(),
                Value::String(uuid::Uuid::new_v4().to_string()),
            );
            m.insert("creationTimestamp".into(), Value::String(now.clone()));
            if def.generation {
                m.insert("generation".into(), json!(1));
            }
        }
        if def.status_subresource
            && def.custom
            && let Some(m) = obj.as_object_mut()
        {
            m.remove("status");
        }
        if def.kind == "Namespace" && def.group.is_empty() {
            obj["status"] = json!({"phase": "Active"});
        }
        if def.kind == "Secret" && obj["type"].as_str().is_none_or(str::is_empty) {
            obj["type"] = json!("Opaque");
        }
        let generate = obj["metadata"]["generateName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if str_of(&obj, "name").is_empty() {
            if generate.is_empty() {
                return Err(Self::invalid(
                    def,
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value: name or generateName is required".into(),
                        field: "metadata.name".into(),
                    }],
                ));
            }
            meta(&mut obj).insert(
                "name".into(),
                Value::String(format!("{generate}{}", random_suffix())),
            );
        }
        let name = str_of(&obj, "name").to_string();
        if !is_dns_subdomain(&name) {
            return Err(Self::invalid(
                def,
                &name,
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                    ),
                    field: "metadata.name".into(),
                }],
            ));
        }
        // A manager owns what it sent, not what defaulting adds.
        let sent_fields = patch::fields_v1(&obj, def.schema.as_ref());
        self.admit(def, &mut obj, None, opts)?;
        if let Some(manager) = &opts.field_manager {
            let fields = sent_fields;
            patch::record_managed_fields(
                &mut obj,
                manager,
                "Update",
                None,
                &def.api_version(),
                fields,
                &now,
            );
        }
        let name = str_of(&obj, "name").to_string();
        let mut store = self.lock();
        if def.namespaced {
            let namespaces = self
                .registry
                .find("", "v1", "namespaces")
                .map(ResourceDef::storage_key)
                .unwrap_or_default();
            let exists = store
                .get(&namespaces, "", ns)
                .map_err(|e| ApiError::internal("reading the namespace", e))?;
            if exists.is_none() {
                return Err(ApiError::NotFound {
                    resource: "namespaces".into(),
                    name: ns.into(),
                });
            }
        }
        let existing = store
            .get(&def.storage_key(), ns, &name)
            .map_err(|e| ApiError::internal("reading the object", e))?;
        if existing.is_some() {
            return Err(ApiError::AlreadyExists {
                resource: def.qualified(),
                name,
            });
        }
        self.commit(&mut store, def, EventType::Added, obj, None, opts)
    }

    /// The shared tail of PUT and PATCH: preconditions, status/main separation, generation,
    /// admission, no-op detection, and finalizer-driven removal.
    fn finish_update(
        &self,
        store: &mut Store,
        def: &ResourceDef,
        old: &Value,
        mut new: Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let name = str_of(old, "name").to_string();
        if !new.is_object() {
            return Err(ApiError::BadRequest(
                "the patched or updated object is not a JSON object".into(),
            ));
        }
        let wanted_rv = str_of(&new, "resourceVersion");
        if !wanted_rv.is_empty() && wanted_rv != str_of(old, "resourceVersion") {
            return Err(ApiError::Conflict {
                resource: def.qualified(),
                name,
            });
        }
        let mut result = if subresource == Some("status") {
            let mut r = old.clone();
            match new.get("status") {
                Some(status) => r["status"] = status.clone(),
                None => {
                    if let Some(m) = r.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
            if let Some(mf) = new["metadata"].get("managedFields") {
                meta(&mut r).insert("managedFields".into(), mf.clone());
            }
            r
        } else {
            new["kind"] = Value::String(def.kind.clone());
            new["apiVersion"] = Value::String(def.api_version());
            let m = meta(&mut new);
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "namespace",
                "name",
            ] {
                match old["metadata"].get(field) {
                    Some(v) => m.insert(field.into(), v.clone()),
                    None => m.remove(field),
                };
            }
            if def.status_subresource {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            new
        };
        meta(&mut result).insert(
            "resourceVersion".into(),
            old["metadata"]["resourceVersion"].clone(),
        );
        self.admit(def, &mut result, Some(old), opts)?;
        if def.generation && spec_part(&result) != spec_part(old) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            meta(&mut result).insert("generation".into(), json!(generation));
        }
        let deleting = result["metadata"].get("deletionTimestamp").is_some();
        let finalizers_empty = result["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if deleting && finalizers_empty {
            return self.commit(store, def, EventType::Deleted, result, None, opts);
        }
        if comparable(&result) == comparable(old) {
            return Ok(old.clone());
        }
        self.commit(store, def, EventType::Modified, result, Some(old), opts)
    }

    /// PUT an object or its status.
    pub fn update(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        obj: Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        Self::check_kind(def, &obj)?;
        let body_name = str_of(&obj, "name");
        if body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let mut store = self.lock();
        let old = store
            .get(&def.storage_key(), ns, name)
            .map_err(|e| ApiError::internal("reading the object", e))?
            .ok_or_else(|| Self::not_found(def, name))?;
        self.finish_update(&mut store, def, &old, obj, subresource, opts)
    }

    /// PATCH an object or its status (server-side apply may create the object).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &[u8],
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if kind == PatchKind::Strategic && def.custom {
            return Err(ApiError::UnsupportedMediaType {
                accepted: patch::ACCEPTED.into(),
            });
        }
        let applied = match kind {
            PatchKind::Apply => {
                let applied = patch::parse_apply(body)?;
                Self::check_kind(def, &applied)?;
                if opts.field_manager.as_deref().unwrap_or_default().is_empty() {
                    return Err(ApiError::BadRequest(
                        "PATCH /apply requires fieldManager to be set".into(),
                    ));
                }
                Some(applied)
            }
            _ => None,
        };
        let now = now();
        let manager = opts.field_manager.clone().unwrap_or_default();
        let mut store = self.lock();
        let old = store
            .get(&def.storage_key(), ns, name)
            .map_err(|e| ApiError::internal("reading the object", e))?;
        let Some(old) = old else {
            return match (applied, subresource) {
                (Some(mut applied), None) => {
                    drop(store);
                    let fields = patch::fields_v1(&applied, def.schema.as_ref());
                    let m = meta(&mut applied);
                    m.insert("name".into(), Value::String(name.into()));
                    patch::record_managed_fields(
                        &mut applied,
                        &manager,
                        "Apply",
                        None,
                        &def.api_version(),
                        fields,
                        &now,
                    );
                    let opts = WriteOptions {
                        field_manager: None,
                        ..opts.clone()
                    };
                    self.create(def, ns, applied, &opts)
                }
                _ => Err(Self::not_found(def, name)),
            };
        };
        let (mut new, operation, fields) = match (kind, applied) {
            (PatchKind::Apply, Some(applied)) => {
                let mut new = old.clone();
                let mut to_merge = applied.clone();
                if let Some(m) = to_merge.get_mut("metadata").and_then(Value::as_object_mut) {
                    for f in [
                        "name",
                        "namespace",
                        "uid",
                        "managedFields",
                        "creationTimestamp",
                    ] {
                        m.remove(f);
                    }
                }
                patch::structured_merge(&mut new, &to_merge, def.schema.as_ref(), "");
                let fields = patch::fields_v1(&applied, def.schema.as_ref());
                if !opts.force {
                    // Only the part this request may change can conflict.
                    let mut scope = applied.clone();
                    if let Some(m) = scope.as_object_mut() {
                        if subresource == Some("status") {
                            m.retain(|k, _| k == "status");
                        } else {
                            m.remove("status");
                        }
                    }
                    let conflicts = patch::apply_conflicts(&old, &scope, &manager);
                    if !conflicts.is_empty() {
                        return Err(ApiError::ApplyConflict { conflicts });
                    }
                }
                let (previous, others) = patch::managed_sets(&old, &manager, "Apply", subresource);
                if let Some(previous) = previous {
                    let others: Vec<&Value> = others.iter().collect();
                    patch::remove_unapplied(&mut new, &previous, &fields, &others);
                }
                (new, "Apply", fields)
            }
            (PatchKind::Json, _) => (patch::json_patch(&old, body)?, "Update", json!({})),
            _ => {
                let new = patch::merge_patch(&old, body)?;
                let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                (new, "Update", patch::fields_v1(&body, def.schema.as_ref()))
            }
        };
        if !manager.is_empty() {
            patch::record_managed_fields(
                &mut new,
                &manager,
                operation,
                subresource,
                &def.api_version(),
                fields,
                &now,
            );
        }
        self.finish_update(&mut store, def, &old, new, subresource, opts)
    }

    /// DELETE: with finalizers the object only gets a deletionTimestamp and stays until they
    /// are gone.
    pub fn delete(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        options: &Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        if def.undeletable {
            return Err(ApiError::MethodNotAllowed);
        }
        if def.group.is_empty()
            && def.kind == "Namespace"
            && super::PROTECTED_NAMESPACES.contains(&name)
        {
            return Err(ApiError::Forbidden(format!(
                "namespaces \"{name}\" is forbidden: this namespace may not be deleted"
            )));
        }
        let mut store = self.lock();
        let old = store
            .get(&def.storage_key(), ns, name)
            .map_err(|e| ApiError::internal("reading the object", e))?
            .ok_or_else(|| Self::not_found(def, name))?;
        let pre = &options["preconditions"];
        for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
            if let Some(want) = pre[field].as_str()
                && want != str_of(&old, field)
            {
                return Err(ApiError::PreconditionFailed {
                    resource: def.qualified(),
                    name: name.into(),
                    detail: format!(
                        "Precondition failed: {label} in precondition: {want}, {label} in object meta: {}",
                        str_of(&old, field)
                    ),
                });
            }
        }
        let has_finalizers = old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if old["metadata"].get("deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut new = old.clone();
            let m = meta(&mut new);
            m.insert("deletionTimestamp".into(), Value::String(now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if def.generation {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                m.insert("generation".into(), json!(generation));
            }
            return self.commit(&mut store, def, EventType::Modified, new, Some(&old), opts);
        }
        let deleted = self.commit(&mut store, def, EventType::Deleted, old, None, opts)?;
        if def.group.is_empty() && def.kind == "Namespace" && !opts.dry_run {
            drop(store);
            self.delete_namespace_contents(name);
        }
        Ok(deleted)
    }

    /// A deleted namespace takes its objects with it (those with finalizers start deleting).
    fn delete_namespace_contents(&self, ns: &str) {
        let opts = WriteOptions::default();
        for def in self.registry.resources.iter().filter(|d| d.namespaced) {
            let Ok((items, _)) = self.list(
                def,
                Some(ns),
                &LabelSelector::default(),
                &FieldSelector::default(),
            ) else {
                continue;
            };
            for item in items {
                let name = str_of(&item, "name").to_string();
                if let Err(error) = self.delete(def, ns, &name, &Value::Null, &opts) {
                    tracing::warn!(reason = error.reason(), %ns, %name, "cannot delete an object of a deleted namespace");
                }
            }
        }
    }
}

/// How a response body is shaped, from the `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Object,
    Table,
    Metadata,
}

/// Read the `Accept` header: Table and PartialObjectMetadata are served, everything else is JSON.
pub fn shape_of(headers: &HeaderMap) -> Shape {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let first = accept.split(',').next().unwrap_or_default();
    if first.contains("as=Table") {
        Shape::Table
    } else if first.contains("as=PartialObjectMetadata") {
        Shape::Metadata
    } else {
        Shape::Object
    }
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Add `Warning: 299 - "…"` headers, as the real server does for dropped fields.
fn with_warnings(mut resp: Response<Body>, opts: &WriteOptions) -> Response<Body> {
    let warnings = opts.warnings.lock().unwrap_or_else(|p| p.into_inner());
    for warning in warnings.iter() {
        let escaped = warning.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(value) = header::HeaderValue::from_str(&format!("299 - \"{escaped}\"")) {
            resp.headers_mut().append(header::WARNING, value);
        }
    }
    resp
}

/// An error as a `Status` response.
pub fn error_response(error: &ApiError) -> Response<Body> {
    if let ApiError::Internal { .. } = error {
        tracing::error!(error = %error, source = ?std::error::Error::source(error), "internal error in the dev API server");
    }
    json_response(error.code(), &error.to_status())
}

fn authorized(server: &Server, headers: &HeaderMap) -> bool {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .trim();
    // Compare in constant time so the token does not leak through timing.
    let (a, b) = (given.as_bytes(), server.token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serve one request.
pub async fn handle(server: Arc<Server>, request: Request<Body>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let route = route::parse(parts.uri.path());
    if route != Route::Health && !authorized(&server, &parts.headers) {
        return error_response(&ApiError::Unauthorized);
    }
    let query: HashMap<String, String> = axum::extract::Query::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return error_response(&ApiError::BadRequest(
                "the request body is too large or unreadable".into(),
            ));
        }
    };
    match dispatch(&server, &parts.method, &parts.headers, route, &query, body).await {
        Ok(resp) => resp,
        Err(error) => error_response(&error),
    }
}

async fn dispatch(
    server: &Arc<Server>,
    method: &Method,
    headers: &HeaderMap,
    route: Route,
    query: &HashMap<String, String>,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let reg = &server.registry;
    let ok = |v: Value| Ok(json_response(200, &v));
    if *method != Method::GET && !matches!(route, Route::Resource(_)) {
        return Err(ApiError::MethodNotAllowed);
    }
    match route {
        Route::Health => Ok(Response::new(Body::from("ok"))),
        Route::Version => ok(discovery::version()),
        Route::CoreVersions => ok(discovery::core_versions()),
        Route::Groups => ok(discovery::groups(reg)),
        Route::Group { group } => discovery::group(reg, &group)
            .map(|v| json_response(200, &v))
            .ok_or(ApiError::NoSuchPath),
        Route::GroupVersion { group, version } => discovery::resource_list(reg, &group, &version)
            .map(|v| json_response(200, &v))
            .ok_or(ApiError::NoSuchPath),
        Route::OpenApiV3Index => ok(openapi::index(reg)),
        Route::OpenApiV3 { group, version } => openapi::group_version_doc(reg, &group, &version)
            .map(|v| json_response(200, &v))
            .ok_or(ApiError::NoSuchPath),
        Route::OpenApiV2 | Route::Unknown => Err(ApiError::NoSuchPath),
        Route::DebugRequests => ok(serde_json::to_value(server.writes_snapshot())
            .map_err(|e| ApiError::internal("encoding the request log", e))?),
        Route::Resource(path) => resource_request(server, method, headers, path, query, body).await,
    }
}

fn write_options(query: &HashMap<String, String>) -> WriteOptions {
    WriteOptions {
        field_manager: query.get("fieldManager").filter(|m| !m.is_empty()).cloned(),
        force: query.get("force").is_some_and(|f| f == "true"),
        ignore_unknown: query.get("fieldValidation").is_some_and(|v| v == "Ignore"),
        warnings: Arc::default(),
        strict: query.get("fieldValidation").is_some_and(|v| v == "Strict"),
        dry_run: query.get("dryRun").is_some_and(|v| v == "All"),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    // kubectl and kube-rs send JSON; YAML is accepted too since it costs nothing.
    serde_json::from_slice(body)
        .or_else(|_| serde_yaml::from_slice(body))
        .map_err(|e| ApiError::BadRequest(format!("the request body is not a valid object: {e}")))
}

fn shaped(
    def: &ResourceDef,
    shape: Shape,
    object: Value,
    query: &HashMap<String, String>,
) -> Value {
    match shape {
        Shape::Object => object,
        Shape::Metadata => table::partial_metadata(&object),
        Shape::Table => {
            let rv = str_of(&object, "resourceVersion").to_string();
            table::table(
                def,
                &[object],
                IncludeObject::parse(query.get("includeObject").map(String::as_str)),
                &rv,
                jiff::Timestamp::now(),
            )
        }
    }
}

async fn resource_request(
    server: &Arc<Server>,
    method: &Method,
    headers: &HeaderMap,
    path: ResourcePath,
    query: &HashMap<String, String>,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let def = server
        .registry
        .find(&path.group, &path.version, &path.plural)
        .ok_or(ApiError::NoSuchPath)?
        .clone();
    if !def.namespaced && path.namespace.is_some() {
        return Err(ApiError::NoSuchPath);
    }
    // Writes to a converted resource go to its stored form; answers are converted back.
    let stored_def = match def.stored_as() {
        Some((g, v, p)) => server
            .registry
            .find(g, v, p)
            .ok_or(ApiError::NoSuchPath)?
            .clone(),
        None => def.clone(),
    };
    let sub = path.subresource.as_deref();
    if let Some(s) = sub
        && !(s == "status" && def.status_subresource)
    {
        return Err(ApiError::NoSuchPath);
    }
    let ns = path.namespace.clone().unwrap_or_default();
    let shape = shape_of(headers);
    let opts = write_options(query);
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::BadRequest)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(ApiError::BadRequest)?;
    let is_watch = query.get("watch").is_some_and(|w| w == "1" || w == "true");
    let verb_suffix = sub.map(|s| format!("/{s}")).unwrap_or_default();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // kubectl's typed clients send protobuf for core kinds; the simple ones are decoded, the
    // rest refused (answers are JSON either way, which those clients accept too).
    let body = if content_type.contains("protobuf") {
        let decoded = super::protobuf::decode(&body).map_err(|e| {
            tracing::debug!(reason = e.reason(), "protobuf body refused");
            ApiError::UnsupportedMediaType {
                accepted: format!("application/json, application/yaml ({e})"),
            }
        })?;
        Bytes::from(decoded.to_string())
    } else if content_type.contains("cbor") {
        return Err(ApiError::UnsupportedMediaType {
            accepted: "application/json, application/yaml".into(),
        });
    } else {
        body
    };

    match (method.clone(), path.name.clone()) {
        (Method::GET, None) | (Method::GET, Some(_)) if is_watch => {
            let mut fields = fields;
            if let Some(name) = &path.name {
                fields.0.push(("metadata.name".into(), true, name.clone()));
            }
            let request = watch::WatchRequest::from_query(
                query,
                path.namespace.clone(),
                labels,
                fields,
                shape,
            )?;
            watch::serve(server.clone(), def, request).await
        }
        (Method::GET, None) => {
            if sub.is_some() {
                return Err(ApiError::NoSuchPath);
            }
            let (items, rv) = server.list(&def, path.namespace.as_deref(), &labels, &fields)?;
            let rv = rv.to_string();
            let body = match shape {
                Shape::Table => table::table(
                    &def,
                    &items,
                    IncludeObject::parse(query.get("includeObject").map(String::as_str)),
                    &rv,
                    jiff::Timestamp::now(),
                ),
                Shape::Metadata => json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": {"resourceVersion": rv},
                    "items": items.iter().map(table::partial_metadata).collect::<Vec<_>>(),
                }),
                Shape::Object => json!({
                    "kind": format!("{}List", def.kind),
                    "apiVersion": def.api_version(),
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }),
            };
            Ok(json_response(200, &body))
        }
        (Method::GET, Some(name)) => {
            let obj = server.get(&def, &ns, &name)?;
            Ok(json_response(200, &shaped(&def, shape, obj, query)))
        }
        (Method::POST, None) => {
            if def.namespaced && path.namespace.is_none() {
                return Err(ApiError::MethodNotAllowed);
            }
            let obj = server.create(&stored_def, &ns, def.to_stored(parse_body(&body)?), &opts)?;
            let obj = def.present(obj);
            server.record_write(&def, &ns, str_of(&obj, "name"), "create");
            Ok(with_warnings(
                json_response(201, &shaped(&def, shape, obj, query)),
                &opts,
            ))
        }
        (Method::PUT, Some(name)) => {
            let obj = server.update(
                &stored_def,
                &ns,
                &name,
                def.to_stored(parse_body(&body)?),
                sub,
                &opts,
            )?;
            let obj = def.present(obj);
            server.record_write(&def, &ns, &name, &format!("update{verb_suffix}"));
            Ok(with_warnings(
                json_response(200, &shaped(&def, shape, obj, query)),
                &opts,
            ))
        }
        (Method::PATCH, Some(name)) => {
            let kind = PatchKind::from_content_type(content_type).ok_or_else(|| {
                ApiError::UnsupportedMediaType {
                    accepted: if def.custom {
                        patch::ACCEPTED.into()
                    } else {
                        patch::ACCEPTED_WITH_SMP.into()
                    },
                }
            })?;
            let obj = if def.stored_as().is_some() {
                // Patch the served form, then store it as a conditional update.
                let old = server.get(&def, &ns, &name)?;
                let new = match kind {
                    PatchKind::Json => patch::json_patch(&old, &body)?,
                    PatchKind::Apply => {
                        let mut new = old.clone();
                        patch::structured_merge(&mut new, &patch::parse_apply(&body)?, None, "");
                        new
                    }
                    PatchKind::Merge | PatchKind::Strategic => patch::merge_patch(&old, &body)?,
                };
                def.present(server.update(
                    &stored_def,
                    &ns,
                    &name,
                    def.to_stored(new),
                    sub,
                    &opts,
                )?)
            } else {
                server.patch(&def, &ns, &name, kind, &body, sub, &opts)?
            };
            let verb = if kind == PatchKind::Apply {
                "apply"
            } else {
                "patch"
            };
            server.record_write(&def, &ns, &name, &format!("{verb}{verb_suffix}"));
            Ok(with_warnings(
                json_response(200, &shaped(&def, shape, obj, query)),
                &opts,
            ))
        }
        (Method::DELETE, Some(name)) if sub.is_none() => {
            let options = if body.is_empty() {
                Value::Null
            } else {
                parse_body(&body)?
            };
            let obj = def.present(server.delete(&stored_def, &ns, &name, &options, &opts)?);
            server.record_write(&def, &ns, &name, "delete");
            Ok(json_response(200, &obj))
        }
        (Method::DELETE, None) => {
            let (items, _) = server.list(&def, path.namespace.as_deref(), &labels, &fields)?;
            let mut deleted = Vec::new();
            for item in items {
                let item_ns = str_of(&item, "namespace").to_string();
                let name = str_of(&item, "name").to_string();
                deleted.push(def.present(server.delete(
                    &stored_def,
                    &item_ns,
                    &name,
                    &Value::Null,
                    &opts,
                )?));
                server.record_write(&def, &item_ns, &name, "delete");
            }
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", def.kind),
                    "apiVersion": def.api_version(),
                    "metadata": {},
                    "items": deleted,
                }),
            ))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_dns_subdomains() {
        assert!(is_dns_subdomain("web-1"));
        assert!(is_dns_subdomain("ev.17a2b"));
        assert!(!is_dns_subdomain("Web"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain("a/b"));
        assert!(!is_dns_subdomain(""));
    }

    #[test]
    fn accept_headers_pick_the_shape() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT,
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
                .parse()
                .expect("header"),
        );
        assert_eq!(shape_of(&h), Shape::Table);
        h.insert(
            header::ACCEPT,
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
                .parse()
                .expect("header"),
        );
        assert_eq!(shape_of(&h), Shape::Metadata);
        assert_eq!(shape_of(&HeaderMap::new()), Shape::Object);
    }

    #[test]
    fn generation_ignores_metadata_and_status() {
        let a = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"x": 1}, "status": {"p": 1}});
        let b = json!({"metadata": {}, "spec": {"x": 1}, "status": {"p": 2}});
        assert_eq!(spec_part(&a), spec_part(&b));
        let c = json!({"spec": {"x": 2}});
        assert_ne!(spec_part(&a), spec_part(&c));
    }
}
