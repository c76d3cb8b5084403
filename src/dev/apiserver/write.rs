//! Updates (PUT) and patches (JSON, merge, strategic-as-merge, server-side apply) of objects
//! and their status: preconditions, identity checks, status/main separation, generation,
//! admission, managed fields, no-op detection, and removal once the last finalizer is gone.

use serde_json::{Value, json};

use super::errors::{ApiError, Cause};
use super::managed::{self, Writer};
use super::meta::{self, comparable, meta, spec_part, str_of};
use super::patch::{self, PatchKind};
use super::resources::ResourceDef;
use super::server::{Server, WriteOptions};
use super::store::{EventType, Store};

/// Identity fields a write may not change.
const IMMUTABLE_META: [&str; 4] = [
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

impl Server {
    /// The shared tail of PUT and PATCH.
    #[allow(clippy::too_many_arguments)]
    fn finish_update(
        &self,
        store: &mut Store,
        def: &ResourceDef,
        old: &Value,
        mut new: Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
        apply: bool,
    ) -> Result<Value, ApiError> {
        let name = str_of(old, "name").to_string();
        if !new.is_object() {
            return Err(ApiError::BadRequest(
                "the patched or updated object is not a JSON object".into(),
            ));
        }
        let body_name = str_of(&new, "name");
        if body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = str_of(&new, "namespace");
        if def.namespaced && !body_ns.is_empty() && body_ns != str_of(old, "namespace") {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        let uid = str_of(&new, "uid");
        if !uid.is_empty() && uid != str_of(old, "uid") {
            return Err(Self::invalid(
                def,
                &name,
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!("Invalid value: {}: field is immutable", json!(uid)),
                    field: "metadata.uid".into(),
                }],
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
            for field in IMMUTABLE_META.iter().chain(&["generation", "namespace"]) {
                match old["metadata"].get(*field) {
                    Some(v) => m.insert(field.to_string(), v.clone()),
                    None => m.remove(*field),
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
        if !apply {
            managed::record_update(
                Some(old),
                &mut result,
                Writer {
                    manager: opts.manager(),
                    subresource,
                    api_version: &def.api_version(),
                    now: &meta::now(),
                },
                def.schema.as_deref(),
            );
        }
        let deleting = result["metadata"].get("deletionTimestamp").is_some();
        let finalizers_empty = result["metadata"]["finalizers"]
            .as_array()
            .is_none_or(Vec::is_empty);
        if deleting && finalizers_empty && !(def.group.is_empty() && def.kind == "Namespace") {
            let deleted = self.commit(store, def, EventType::Deleted, result, None, opts)?;
            return Ok(deleted);
        }
        if comparable(&result) == comparable(old) {
            return Ok(old.clone());
        }
        self.commit(store, def, EventType::Modified, result, Some(old), opts)
    }

    /// PUT an object or its status.
    pub(crate) fn update(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        obj: Value,
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        Self::check_kind(def, &obj)?;
        if !def.unconditional_update && str_of(&obj, "resourceVersion").is_empty() {
            return Err(ApiError::Invalid {
                kind: def.qualified(),
                group: String::new(),
                name: name.into(),
                causes: vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "Invalid value: 0: must be specified for an update".into(),
                    field: "metadata.resourceVersion".into(),
                }],
            });
        }
        let deleted = {
            let mut store = self.lock();
            let old = store
                .get(&def.storage_key(), ns, name)
                .map_err(|e| ApiError::internal("reading the object", e))?
                .ok_or_else(|| Self::not_found(def, name))?;
            self.finish_update(&mut store, def, &old, obj, subresource, opts, false)?
        };
        if def.namespaced && !opts.dry_run {
            self.finish_namespace(ns);
        }
        Ok(deleted)
    }

    /// PATCH an object or its status; server-side apply may create the object (then the
    /// answer's flag is true).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: &[u8],
        subresource: Option<&str>,
        opts: &WriteOptions,
    ) -> Result<(Value, bool), ApiError> {
        if kind == PatchKind::Strategic && def.custom {
            return Err(ApiError::UnsupportedMediaType {
                accepted: patch::ACCEPTED.into(),
            });
        }
        let applied = match kind {
            PatchKind::Apply => {
                let applied = patch::parse_apply(body)?;
                Self::check_kind(def, &applied)?;
                let applied_name = str_of(&applied, "name");
                if !applied_name.is_empty() && applied_name != name {
                    return Err(ApiError::BadRequest(format!(
                        "the name of the object ({applied_name}) does not match the name on the URL ({name})"
                    )));
                }
                Some(applied)
            }
            _ => None,
        };
        let now = meta::now();
        let writer = Writer {
            manager: opts.manager(),
            subresource,
            api_version: &def.api_version(),
            now: &now,
        };
        let mut store = self.lock();
        let old = store
            .get(&def.storage_key(), ns, name)
            .map_err(|e| ApiError::internal("reading the object", e))?;
        let Some(old) = old else {
            drop(store);
            return match (applied, subresource) {
                (Some(applied), None) => self
                    .apply_create(def, ns, name, applied, writer, opts)
                    .map(|o| (o, true)),
                _ => Err(Self::not_found(def, name)),
            };
        };
        let new = match applied {
            Some(applied) => {
                let scoped = scope_to(def, applied, subresource);
                managed::apply(&old, &scoped, writer, opts.force, def.schema.as_deref())
                    .map_err(|conflicts| ApiError::ApplyConflict { conflicts })?
            }
            None if kind == PatchKind::Json => patch::json_patch(&old, body)?,
            None => patch::merge_patch(&old, body)?,
        };
        let result = self.finish_update(
            &mut store,
            def,
            &old,
            new,
            subresource,
            opts,
            applied_kind(kind),
        )?;
        drop(store);
        if def.namespaced && !opts.dry_run {
            self.finish_namespace(ns);
        }
        Ok((result, false))
    }

    /// Server-side apply of an object that does not exist yet: a create owned by the applier.
    fn apply_create(
        &self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        applied: Value,
        writer: Writer<'_>,
        opts: &WriteOptions,
    ) -> Result<Value, ApiError> {
        let mut obj = applied;
        meta(&mut obj).insert("name".into(), Value::String(name.into()));
        let scoped = scope_to(def, obj.clone(), None);
        let owned = managed::apply(&json!({}), &scoped, writer, true, def.schema.as_deref())
            .map_err(|conflicts| ApiError::ApplyConflict { conflicts })?;
        self.create_owned(def, ns, obj, opts, Some(managed::entries(&owned)))
    }
}

fn applied_kind(kind: PatchKind) -> bool {
    kind == PatchKind::Apply
}

/// The part of an applied configuration a request may change: only status on `/status`, all
/// but status on the main resource of a kind with a status subresource.
fn scope_to(def: &ResourceDef, mut applied: Value, subresource: Option<&str>) -> Value {
    if let Some(m) = applied.as_object_mut() {
        if subresource == Some("status") {
            m.retain(|k, _| k == "status" || k == "apiVersion" || k == "kind");
        } else if def.status_subresource {
            m.remove("status");
        }
    }
    if let Some(m) = applied.get_mut("metadata").and_then(Value::as_object_mut) {
        for f in [
            "name",
            "namespace",
            "uid",
            "managedFields",
            "creationTimestamp",
            "resourceVersion",
        ] {
            m.remove(f);
        }
    }
    applied
}
