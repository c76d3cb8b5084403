//! Resource requests: list (with `limit`/`continue` paging) and watch, get, create, update,
//! patch, delete and deletecollection, and the access reviews, turned into calls on the
//! `Server`. Bodies are decoded here, bounded (`body.rs`), before any lock is taken.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Response, header};
use serde_json::{Value, json};

use super::body::{self, Format};
use super::errors::ApiError;
use super::hub::WriteRecord;
use super::meta::str_of;
use super::options::{self, OptionsKind, Query};
use super::patch::{self, PatchKind};
use super::resources::ResourceDef;
use super::respond::{json_response, with_warnings};
use super::route::ResourcePath;
use super::selector::{FieldSelector, LabelSelector};
use super::server::{Server, WriteOptions};
use super::table::{self, IncludeObject, Shape};
use super::watch;

/// A `continue` token: the list's version and the last key served.
fn continue_token(rv: u64, last: &Value) -> String {
    let key = format!("{}/{}", str_of(last, "namespace"), str_of(last, "name"));
    hex::encode(json!({"v": "meta.k8s.io/v1", "rv": rv, "start": key}).to_string())
}

fn parse_continue(token: &str) -> Result<(u64, String), ApiError> {
    let bad = |why: &str| ApiError::BadRequest(format!("continue key is not valid: {why}"));
    let raw = hex::decode(token).map_err(|_| bad("not an encoded continue token"))?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad("not a continue token"))?;
    let rv = v["rv"].as_u64().ok_or_else(|| bad("no resource version"))?;
    Ok((rv, v["start"].as_str().unwrap_or_default().to_string()))
}

/// One page of a list: the items, the list's version, the next token, what remains.
struct Page {
    items: Vec<Value>,
    rv: u64,
    next: Option<String>,
    remaining: Option<usize>,
}

fn paginate(items: Vec<Value>, rv: u64, query: &Query, selective: bool) -> Result<Page, ApiError> {
    let (rv, items) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let (rv, start) = parse_continue(token)?;
            let rest: Vec<Value> = items
                .into_iter()
                .filter(|o| format!("{}/{}", str_of(o, "namespace"), str_of(o, "name")) > start)
                .collect();
            (rv, rest)
        }
        None => (rv, items),
    };
    let limit = match query.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::BadRequest(format!("invalid limit: {l:?}")))?,
        None => 0,
    };
    if limit == 0 || items.len() <= limit {
        return Ok(Page {
            items,
            rv,
            next: None,
            remaining: None,
        });
    }
    let mut items = items;
    let rest = items.split_off(limit);
    let next = items.last().map(|last| continue_token(rv, last));
    Ok(Page {
        items,
        rv,
        next,
        remaining: (!selective).then_some(rest.len()),
    })
}

/// Field selectors only on the fields the resource indexes, as a real server.
fn check_field_selector(def: &ResourceDef, fields: &FieldSelector) -> Result<(), ApiError> {
    for (field, _, _) in &fields.0 {
        if def.selectable(field) {
            continue;
        }
        if def.custom || def.group.is_empty() && def.kind == "Namespace" {
            return Err(ApiError::BadRequest(format!(
                "field label not supported: {field}"
            )));
        }
        let mut allowed = vec!["\"metadata.name\"".to_string()];
        if def.namespaced {
            allowed.push("\"metadata.namespace\"".into());
        }
        allowed.extend(def.field_labels.iter().map(|l| format!("\"{l}\"")));
        return Err(ApiError::BadRequest(format!(
            "\"{field}\" is not a known field selector: only {}",
            allowed.join(", ")
        )));
    }
    Ok(())
}

/// An object body of a create or update, by its `Content-Type`.
fn object_body(
    headers: &HeaderMap,
    body: &[u8],
    opts: &mut WriteOptions,
) -> Result<Value, ApiError> {
    let content_type = options::header_str(headers, header::CONTENT_TYPE);
    let format = Format::of(content_type).ok_or_else(|| ApiError::UnsupportedMediaType {
        accepted: body::ACCEPTED.into(),
    })?;
    let decoded = body::decode(body, format)?;
    opts.duplicates = decoded.duplicates;
    Ok(decoded.value)
}

fn record(
    server: &Server,
    def: &ResourceDef,
    ns: &str,
    name: &str,
    verb: &str,
    opts: &WriteOptions,
) {
    if !opts.dry_run {
        server.hub.record(&WriteRecord {
            resource: &def.storage_key(),
            namespace: ns,
            name,
            verb,
        });
    }
}

/// The answer of an access review: this server has one user, allowed everything.
fn review(def: &ResourceDef, mut body: Value) -> Value {
    body["apiVersion"] = json!(def.api_version());
    body["kind"] = json!(def.kind);
    if !body["metadata"].is_object() {
        body["metadata"] = json!({});
    }
    body["metadata"]["creationTimestamp"] = Value::Null;
    body["status"] = match def.kind.as_str() {
        "SelfSubjectAccessReview" => json!({"allowed": true}),
        "SelfSubjectRulesReview" => json!({
            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            "incomplete": false,
        }),
        _ => json!({"userInfo": {"username": "ignis-dev",
            "groups": ["system:masters", "system:authenticated"]}}),
    };
    body
}

pub(crate) async fn resource_request(
    server: &Arc<Server>,
    method: &Method,
    headers: &HeaderMap,
    path: ResourcePath,
    query: &Query,
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
    if def.review {
        if *method != Method::POST || path.name.is_some() {
            return Err(ApiError::MethodNotAllowed);
        }
        let mut opts = options::write_options(query, headers, OptionsKind::Create, false, &[])?;
        // kubectl sends reviews as protobuf; the answer does not depend on the question.
        let content_type = options::header_str(headers, header::CONTENT_TYPE);
        let obj = if Format::of(content_type) == Some(Format::Protobuf) {
            json!({})
        } else {
            object_body(headers, &body, &mut opts)?
        };
        return Ok(json_response(201, &review(&def, obj)));
    }
    let ns = path.namespace.clone().unwrap_or_default();
    let shape = Shape::of_accept(options::header_str(headers, header::ACCEPT));
    let include = IncludeObject::parse(query.get("includeObject"));
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or_default())
        .map_err(ApiError::BadRequest)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or_default())
        .map_err(ApiError::BadRequest)?;
    let verb_suffix = sub.map(|s| format!("/{s}")).unwrap_or_default();

    match (method.clone(), path.name.clone()) {
        (Method::GET, _) if query.is_true("watch") => {
            check_field_selector(&def, &fields)?;
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
            check_field_selector(&def, &fields)?;
            let selective = !labels.0.is_empty() || !fields.0.is_empty();
            let (items, rv) = server.list(&def, path.namespace.as_deref(), &labels, &fields)?;
            let page = paginate(items, rv, query, selective)?;
            let mut list_meta = json!({"resourceVersion": page.rv.to_string()});
            if let Some(next) = &page.next {
                list_meta["continue"] = json!(next);
            }
            if let Some(remaining) = page.remaining {
                list_meta["remainingItemCount"] = json!(remaining);
            }
            let rv = page.rv.to_string();
            let body = match shape {
                Shape::Table => {
                    let mut t =
                        table::table(&def, &page.items, include, &rv, jiff::Timestamp::now());
                    t["metadata"] = list_meta;
                    t
                }
                Shape::Metadata => json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": list_meta,
                    "items": page.items.iter().map(table::partial_metadata).collect::<Vec<_>>(),
                }),
                Shape::Object => json!({
                    "kind": format!("{}List", def.kind),
                    "apiVersion": def.api_version(),
                    "metadata": list_meta,
                    "items": page.items,
                }),
            };
            Ok(json_response(200, &body))
        }
        (Method::GET, Some(name)) => {
            let obj = server.get(&def, &ns, &name)?;
            Ok(json_response(200, &shape.object(&def, obj, include)))
        }
        (Method::POST, None) => {
            if def.namespaced && path.namespace.is_none() {
                return Err(ApiError::MethodNotAllowed);
            }
            let mut opts = options::write_options(query, headers, OptionsKind::Create, false, &[])?;
            let obj = object_body(headers, &body, &mut opts)?;
            let obj = server.create(&stored_def, &ns, def.to_stored(obj), &opts)?;
            let obj = def.present(obj);
            record(
                server,
                &stored_def,
                &ns,
                str_of(&obj, "name"),
                "create",
                &opts,
            );
            Ok(with_warnings(
                json_response(201, &shape.object(&def, obj, include)),
                &opts,
            ))
        }
        (Method::PUT, Some(name)) => {
            let mut opts = options::write_options(query, headers, OptionsKind::Update, false, &[])?;
            let obj = object_body(headers, &body, &mut opts)?;
            let obj = server.update(&stored_def, &ns, &name, def.to_stored(obj), sub, &opts)?;
            let obj = def.present(obj);
            record(
                server,
                &stored_def,
                &ns,
                &name,
                &format!("update{verb_suffix}"),
                &opts,
            );
            Ok(with_warnings(
                json_response(200, &shape.object(&def, obj, include)),
                &opts,
            ))
        }
        (Method::PATCH, Some(name)) => {
            let content_type = options::header_str(headers, header::CONTENT_TYPE);
            let kind = PatchKind::from_content_type(content_type).ok_or_else(|| {
                ApiError::UnsupportedMediaType {
                    accepted: if def.custom {
                        patch::ACCEPTED.into()
                    } else {
                        patch::ACCEPTED_WITH_SMP.into()
                    },
                }
            })?;
            let apply = kind == PatchKind::Apply;
            let opts = options::write_options(query, headers, OptionsKind::Patch, apply, &[])?;
            body::check_depth(&body)?;
            let (obj, created) = if def.stored_as().is_some() {
                // Patch the served form, then store it as an update.
                let old = server.get(&def, &ns, &name)?;
                let new = match kind {
                    PatchKind::Json => patch::json_patch(&old, &body)?,
                    PatchKind::Apply => {
                        let mut new = old.clone();
                        super::fields::merge(&mut new, &patch::parse_apply(&body)?, None);
                        new
                    }
                    PatchKind::Merge | PatchKind::Strategic => patch::merge_patch(&old, &body)?,
                };
                let updated =
                    server.update(&stored_def, &ns, &name, def.to_stored(new), sub, &opts)?;
                (def.present(updated), false)
            } else {
                server.patch(&def, &ns, &name, kind, &body, sub, &opts)?
            };
            let verb = if apply { "apply" } else { "patch" };
            record(
                server,
                &stored_def,
                &ns,
                &name,
                &format!("{verb}{verb_suffix}"),
                &opts,
            );
            Ok(with_warnings(
                json_response(
                    if created { 201 } else { 200 },
                    &shape.object(&def, obj, include),
                ),
                &opts,
            ))
        }
        (Method::DELETE, Some(name)) if sub.is_none() => {
            let options = if body.is_empty() {
                Value::Null
            } else {
                let format = Format::of(options::header_str(headers, header::CONTENT_TYPE))
                    .ok_or_else(|| ApiError::UnsupportedMediaType {
                        accepted: body::ACCEPTED.into(),
                    })?;
                body::decode(&body, format)?.value
            };
            let body_dry_run: Vec<String> = options["dryRun"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            let opts =
                options::write_options(query, headers, OptionsKind::Delete, false, &body_dry_run)?;
            let obj = def.present(server.delete(&stored_def, &ns, &name, &options, &opts)?);
            record(server, &stored_def, &ns, &name, "delete", &opts);
            // An object that is gone at once is answered with a Status, one that waits for
            // finalizers with itself.
            if obj["metadata"].get("deletionTimestamp").is_none() {
                let mut details = json!({"name": name, "kind": def.plural,
                    "uid": obj["metadata"]["uid"]});
                if !def.group.is_empty() {
                    details["group"] = json!(def.group);
                }
                return Ok(json_response(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Success", "details": details}),
                ));
            }
            Ok(json_response(200, &obj))
        }
        (Method::DELETE, None) => {
            check_field_selector(&def, &fields)?;
            let opts = options::write_options(query, headers, OptionsKind::Delete, false, &[])?;
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
                record(server, &stored_def, &item_ns, &name, "delete", &opts);
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

    fn named(ns: &str, name: &str) -> Value {
        json!({"metadata": {"namespace": ns, "name": name}})
    }

    #[test]
    fn lists_page_with_continue_tokens() {
        let items: Vec<Value> = (0..5).map(|i| named("default", &format!("o{i}"))).collect();
        let q = |pairs: &[(&str, &str)]| {
            Query(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                    .collect(),
            )
        };
        let first = paginate(items.clone(), 9, &q(&[("limit", "2")]), false).expect("page");
        assert_eq!(first.items.len(), 2);
        assert_eq!(first.remaining, Some(3));
        let token = first.next.expect("more");
        let second = paginate(
            items.clone(),
            12,
            &q(&[("limit", "2"), ("continue", &token)]),
            false,
        )
        .expect("page");
        assert_eq!(second.rv, 9, "later pages keep the first page's version");
        assert_eq!(str_of(&second.items[0], "name"), "o2");
        let last = paginate(
            items,
            12,
            &q(&[("limit", "5"), ("continue", &second.next.expect("more"))]),
            false,
        )
        .expect("page");
        assert_eq!(last.items.len(), 1);
        assert!(last.next.is_none());
        assert!(paginate(vec![], 1, &q(&[("continue", "zz")]), false).is_err());
    }

    #[test]
    fn field_selectors_are_limited_to_indexed_fields() {
        let reg = super::super::resources::test_registry();
        let widgets = reg.find("example.com", "v1", "widgets").expect("widgets");
        let sel = |s: &str| FieldSelector::parse(s).expect("parse");
        assert!(check_field_selector(widgets, &sel("metadata.name=a")).is_ok());
        let err = check_field_selector(widgets, &sel("spec.size=1")).expect_err("custom");
        assert_eq!(err.to_string(), "field label not supported: spec.size");
        let secrets = reg.find("", "v1", "secrets").expect("secrets");
        assert!(check_field_selector(secrets, &sel("type=Opaque")).is_ok());
        let cms = reg.find("", "v1", "configmaps").expect("cms");
        assert!(
            check_field_selector(cms, &sel("data.x=1"))
                .expect_err("core")
                .to_string()
                .contains("is not a known field selector")
        );
    }
}
