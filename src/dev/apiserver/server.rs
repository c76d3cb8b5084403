//! The API semantics over the generic store: get, list, create and delete (with finalizers and
//! namespace termination) here; update and patch in `write.rs`. Everything a real server checks
//! before storing is checked here too: names, metadata, the resource's schema and admission
//! hook, the object's size, and the namespace it goes into.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::errors::{ApiError, Cause};
use super::hub::Hub;
use super::managed::{self, Writer};
use super::meta::{self, NameRule, meta, str_of};
use super::resources::{Registry, ResourceDef};
use super::schema;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{EventType, Store};
use super::tls::base64;

/// Largest stored object (etcd's default request limit, which the real server runs into).
pub(crate) const MAX_OBJECT_BYTES: usize = 3 * 512 * 1024;

/// Finalizers core kinds may carry without a `/`.
const STANDARD_FINALIZERS: [&str; 3] = ["kubernetes", "orphan", "foregroundDeletion"];

/// Fields of `ObjectMeta`; anything else in `metadata` is unknown.
const OBJECT_META_FIELDS: [&str; 15] = [
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// `fieldValidation`: what happens to unknown and duplicate fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum FieldValidation {
    Ignore,
    #[default]
    Warn,
    Strict,
}

/// Options of one write request.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteOptions {
    /// `fieldManager`, or the User-Agent's product as the real server takes it.
    pub field_manager: Option<String>,
    /// Server-side apply takes fields other managers own instead of answering 409.
    pub force: bool,
    pub validation: FieldValidation,
    /// Keys the body repeated (dotted paths).
    pub duplicates: Vec<String>,
    /// Warnings for the response's `Warning` headers.
    pub warnings: Arc<Mutex<Vec<String>>>,
    pub dry_run: bool,
}

impl WriteOptions {
    pub(crate) fn warn(&self, warning: String) {
        self.warnings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(warning);
    }

    pub(crate) fn manager(&self) -> &str {
        self.field_manager.as_deref().unwrap_or_default()
    }
}

/// Everything the request handlers share.
pub(crate) struct Server {
    pub registry: Registry,
    pub store: Mutex<Store>,
    pub hub: Hub,
    pub token: String,
    pub shutdown: CancellationToken,
    pub bookmark_interval: Duration,
    pub protected_namespaces: Vec<String>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Store a change and tell the watches; a dry run stores nothing.
    pub(crate) fn commit(
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
        self.hub.publish(event);
        Ok(object)
    }

    pub(crate) fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: def.qualified(),
            name: name.into(),
        }
    }

    pub(crate) fn invalid(def: &ResourceDef, name: &str, causes: Vec<Cause>) -> ApiError {
        ApiError::Invalid {
            kind: def.kind.clone(),
            group: def.group.clone(),
            name: name.into(),
            causes,
        }
    }

    /// Refuse a body of another kind or version, in the real server's words.
    pub(crate) fn check_kind(def: &ResourceDef, obj: &Value) -> Result<(), ApiError> {
        if !obj.is_object() {
            return Err(ApiError::BadRequest(format!(
                "the object provided is unrecognized (must be of type {})",
                def.kind
            )));
        }
        let kind = obj["kind"].as_str().unwrap_or_default();
        let api_version = obj["apiVersion"].as_str().unwrap_or_default();
        if !api_version.is_empty() && api_version != def.api_version() {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({})",
                def.api_version()
            )));
        }
        if !kind.is_empty() && kind != def.kind {
            if def.custom {
                return Err(ApiError::Invalid {
                    kind: kind.into(),
                    group: def.group.clone(),
                    name: str_of(obj, "name").into(),
                    causes: vec![Cause {
                        reason: "FieldValueInvalid".into(),
                        message: format!("Invalid value: \"{kind}\": must be {}", def.kind),
                        field: "kind".into(),
                    }],
                });
            }
            return Err(ApiError::BadRequest(format!(
                "{kind} in version \"{}\" cannot be handled as a {}: converting to {} failed",
                def.version, def.kind, def.kind
            )));
        }
        Ok(())
    }

    /// Unknown and repeated fields: refused under `Strict`, warned about under `Warn`, and
    /// dropped unless `Ignore`; then the schema's defaults.
    fn decode_fields(
        &self,
        def: &ResourceDef,
        obj: &mut Value,
        opts: &WriteOptions,
    ) -> Result<(), ApiError> {
        let mut problems: Vec<String> = Vec::new();
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            let unknown: Vec<String> = m
                .keys()
                .filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str()))
                .cloned()
                .collect();
            for key in unknown {
                m.remove(&key);
                problems.push(format!("unknown field \"metadata.{key}\""));
            }
        }
        problems.extend(
            opts.duplicates
                .iter()
                .map(|d| format!("duplicate field \"{d}\"")),
        );
        if let Some(schema) = &def.schema {
            problems.extend(
                schema::prune(schema, obj)
                    .iter()
                    .map(|f| format!("unknown field \"{f}\"")),
            );
        } else if let Some(known) = def.known_fields() {
            let unknown: Vec<String> = obj
                .as_object()
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|k| !known.contains(&k.as_str()))
                .cloned()
                .collect();
            for key in unknown {
                if let Some(m) = obj.as_object_mut() {
                    m.remove(&key);
                }
                problems.push(format!("unknown field \"{key}\""));
            }
        }
        match opts.validation {
            FieldValidation::Strict if !problems.is_empty() => {
                return Err(ApiError::BadRequest(format!(
                    "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                    problems.join(", "),
                    kind = def.kind,
                    version = def.version
                )));
            }
            FieldValidation::Warn => problems.into_iter().for_each(|p| opts.warn(p)),
            _ => {}
        }
        if let Some(schema) = &def.schema {
            schema::apply_defaults(schema, obj);
        }
        Ok(())
    }

    /// Every check of an object about to be stored: name, metadata, the admission hook. One
    /// 422 with all causes, as the real server answers.
    pub(crate) fn validate(
        &self,
        def: &ResourceDef,
        obj: &Value,
        old: Option<&Value>,
    ) -> Result<(), ApiError> {
        let name = str_of(obj, "name");
        let mut causes: Vec<Cause> = Vec::new();
        if old.is_none() && name.is_empty() {
            causes.push(Cause {
                reason: "FieldValueRequired".into(),
                message: "Required value: name or generateName is required".into(),
                field: "metadata.name".into(),
            });
        } else if old.is_none() {
            let problems = match def.name_rule {
                NameRule::Label if name.contains('.') => vec!["must not contain dots".into()],
                rule => meta::name_problems(name, rule),
            };
            causes.extend(problems.into_iter().map(|p| Cause {
                reason: "FieldValueInvalid".into(),
                message: format!("Invalid value: {}: {p}", json!(name)),
                field: "metadata.name".into(),
            }));
        }
        causes.extend(meta::metadata_causes(obj));
        if !def.custom {
            for (i, f) in obj["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let f = f.as_str().unwrap_or_default();
                if !f.contains('/') && !STANDARD_FINALIZERS.contains(&f) {
                    causes.push(Cause {
                        reason: "FieldValueInvalid".into(),
                        message: format!(
                            "Invalid value: {}: name is neither a standard finalizer name nor is it fully qualified",
                            json!(f)
                        ),
                        field: format!("metadata.finalizers[{i}]"),
                    });
                }
            }
        }
        if let Some(cause) = data_too_long(def, obj) {
            causes.push(cause);
        }
        if let Some(hook) = &def.admission {
            if name.is_empty() {
                // Like a CRD's CEL rules, the hook only runs on an object with a name.
                causes.push(Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "Invalid value: null: some validation rules were not checked because the object was invalid; correct the existing errors to complete validation".into(),
                    field: "<nil>".into(),
                });
            } else {
                causes.extend(hook.0.validate(obj, old));
            }
        }
        if !causes.is_empty() {
            return Err(Self::invalid(def, name, causes));
        }
        let size = obj.to_string().len();
        if size > MAX_OBJECT_BYTES {
            return Err(ApiError::StorageTooLarge);
        }
        Ok(())
    }

    /// Decode unknown/duplicate fields, default, and validate.
    pub(crate) fn admit(
        &self,
        def: &ResourceDef,
        obj: &mut Value,
        old: Option<&Value>,
        opts: &WriteOptions,
    ) -> Result<(), ApiError> {
        self.decode_fields(def, obj, opts)?;
        if def.kind == "Secret" && def.group.is_empty() {
            fold_string_data(obj);
        }
        if def.kind == "Namespace" && def.group.is_empty() {
            // Every namespace carries its name as a label, so selectors can pick namespaces.
            let name = str_of(obj, "name").to_string();
            let m = meta(obj);
            if !m.get("labels").is_some_and(Value::is_object) {
                m.insert("labels".into(), json!({}));
            }
            if let Some(labels) = m.get_mut("labels").and_then(Value::as_object_mut) {
                labels.insert("kubernetes.io/metadata.name".into(), Value::String(name));
            }
        }
        if def.custom {
            for f in obj["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let f = f.as_str().unwrap_or_default();
                if !f.contains('/') {
                    opts.warn(format!(
                        "metadata.finalizers: {}: prefer a domain-qualified finalizer name including a path (/) to avoid accidental conflicts with other finalizer writers",
                        json!(f)
                    ));
                }
            }
        }
        self.validate(def, obj, old)
    }

    /// GET one object.
    pub(crate) fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.lock()
            .get(&def.storage_key(), ns, name)
            .map_err(|e| ApiError::internal("reading the object", e))?
            .map(|o| def.present(o))
            .ok_or_else(|| Self::not_found(def, name))
    }

    /// LIST, filtered, ordered by namespace and name; with the version it is consistent at.
    pub(crate) fn list(
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
    pub(crate) fn create(
        &self,
        def: &ResourceDef,
        ns: &str,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        self.create_owned(def, ns, obj, opts, None)
    }

    /// Create, with the managed fields of a server-side apply when it is one.
    pub(crate) fn create_owned(
        &self,
        def: &ResourceDef,
        ns: &str,
        mut obj: Value,
        opts: &WriteOptions,
        applied: Option<Vec<managed::Entry>>,
    ) -> Result<Value, ApiError> {
        Self::check_kind(def, &obj)?;
        obj["kind"] = Value::String(def.kind.clone());
        obj["apiVersion"] = Value::String(def.api_version());
        let now = meta::now();
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
                "managedFields",
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
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
        }
        if def.kind == "Secret" && obj["type"].as_str().is_none_or(str::is_empty) {
            obj["type"] = json!("Opaque");
        }
        if str_of(&obj, "name").is_empty() {
            let generate = str_of(&obj, "generateName").to_string();
            if !generate.is_empty() {
                let name = format!("{generate}{}", meta::random_suffix());
                meta(&mut obj).insert("name".into(), Value::String(name));
            }
        }
        self.admit(def, &mut obj, None, opts)?;
        match applied {
            Some(entries) => managed::set_entries(&mut obj, entries),
            None => {
                // A custom resource's status is reset on a create (above); what it holds now
                // is the schema's default, which kube-apiserver never counts as the creator's.
                let defaulted = (def.status_subresource && def.custom)
                    .then(|| obj.as_object_mut().and_then(|m| m.remove("status")))
                    .flatten();
                managed::record_update(
                    None,
                    &mut obj,
                    Writer {
                        manager: opts.manager(),
                        subresource: None,
                        api_version: &def.api_version(),
                        now: &now,
                    },
                    def.schema.as_deref(),
                );
                if let Some(status) = defaulted {
                    obj["status"] = status;
                }
            }
        }
        self.insert(def, ns, obj, opts)
    }

    /// Store a new object: its namespace must exist and not be terminating, its name be free.
    pub(crate) fn insert(
        &self,
        def: &ResourceDef,
        ns: &str,
        obj: Value,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let name = str_of(&obj, "name").to_string();
        let mut store = self.lock();
        if def.namespaced {
            let namespace = store
                .get(&namespaces_key(), "", ns)
                .map_err(|e| ApiError::internal("reading the namespace", e))?
                .ok_or_else(|| ApiError::NotFound {
                    resource: "namespaces".into(),
                    name: ns.into(),
                })?;
            if namespace["metadata"].get("deletionTimestamp").is_some() {
                return Err(ApiError::Forbidden {
                    resource: def.qualified(),
                    name,
                    reason: format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    ),
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

    /// DELETE: with finalizers the object only gets a deletionTimestamp and stays until they
    /// are gone; a namespace turns Terminating, empties, and goes when it is empty.
    pub(crate) fn delete(
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
        let is_namespace = def.group.is_empty() && def.kind == "Namespace";
        if is_namespace && self.protected_namespaces.iter().any(|p| p == name) {
            return Err(ApiError::Forbidden {
                resource: "namespaces".into(),
                name: name.into(),
                reason: "this namespace may not be deleted".into(),
            });
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
        if has_finalizers || is_namespace {
            if old["metadata"].get("deletionTimestamp").is_some() {
                return Ok(def.present(old));
            }
            let mut new = old.clone();
            let m = meta(&mut new);
            m.insert("deletionTimestamp".into(), Value::String(meta::now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if def.generation {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
                m.insert("generation".into(), json!(generation));
            }
            if is_namespace {
                new["status"]["phase"] = json!("Terminating");
            }
            let marked =
                self.commit(&mut store, def, EventType::Modified, new, Some(&old), opts)?;
            drop(store);
            if is_namespace && !opts.dry_run {
                self.delete_namespace_contents(name);
                self.finish_namespace(name);
            }
            return Ok(marked);
        }
        let deleted = self.commit(&mut store, def, EventType::Deleted, old, None, opts)?;
        drop(store);
        if def.namespaced && !opts.dry_run {
            self.finish_namespace(ns);
        }
        Ok(deleted)
    }

    /// A terminating namespace takes its objects with it (those with finalizers start
    /// deleting and hold the namespace until they are gone).
    fn delete_namespace_contents(&self, ns: &str) {
        let opts = WriteOptions::default();
        for def in self
            .registry
            .resources
            .iter()
            .filter(|d| d.namespaced && d.stored_as().is_none())
        {
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
                    tracing::warn!(reason = error.reason(), %ns, %name, "cannot delete an object of a terminating namespace");
                }
            }
        }
    }

    /// Remove a terminating namespace once nothing is left in it.
    pub(crate) fn finish_namespace(&self, ns: &str) {
        let mut store = self.lock();
        let Ok(Some(namespace)) = store.get(&namespaces_key(), "", ns) else {
            return;
        };
        if namespace["metadata"].get("deletionTimestamp").is_none() {
            return;
        }
        for def in self
            .registry
            .resources
            .iter()
            .filter(|d| d.namespaced && d.stored_as().is_none())
        {
            match store.list(&def.storage_key(), Some(ns)) {
                Ok((items, _)) if items.is_empty() => {}
                _ => return,
            }
        }
        let Some(def) = self.registry.find("", "v1", "namespaces") else {
            return;
        };
        if let Err(error) = self.commit(
            &mut store,
            def,
            EventType::Deleted,
            namespace,
            None,
            &WriteOptions::default(),
        ) {
            tracing::warn!(reason = error.reason(), %ns, "cannot remove an emptied namespace");
        }
    }
}

/// ConfigMaps and Secrets hold at most 1 MiB of data, as on a real server (which names the
/// whole ConfigMap, `[]`, and a Secret's `data`).
fn data_too_long(def: &ResourceDef, obj: &Value) -> Option<Cause> {
    const MAX: usize = 1024 * 1024;
    if !def.group.is_empty() {
        return None;
    }
    let sum = |field: &str, decoded: bool| -> usize {
        obj[field]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                let len = v.as_str().map_or(0, str::len);
                k.len() + if decoded { len / 4 * 3 } else { len }
            })
            .sum()
    };
    let (size, field) = match def.kind.as_str() {
        "ConfigMap" => (sum("data", false) + sum("binaryData", true), "[]"),
        "Secret" => (sum("data", true), "data"),
        _ => return None,
    };
    (size > MAX).then(|| Cause {
        reason: "FieldValueTooLong".into(),
        message: format!("Too long: may not be more than {MAX} bytes"),
        field: field.into(),
    })
}

fn namespaces_key() -> String {
    "/namespaces".into()
}

/// A Secret's `stringData` goes into `data`, base64-encoded, and is not stored.
fn fold_string_data(obj: &mut Value) {
    let Some(string_data) = obj.as_object_mut().and_then(|m| m.remove("stringData")) else {
        return;
    };
    for (k, v) in string_data.as_object().into_iter().flatten() {
        if !obj["data"].is_object() {
            obj["data"] = json!({});
        }
        obj["data"][k] = Value::String(base64(v.as_str().unwrap_or_default().as_bytes()));
    }
}

#[cfg(test)]
mod tests;
