//! OpenAPI documents: `/openapi/v3` and one document per group/version, carrying the custom
//! resources' schemas (for `kubectl explain`) and PATCH operations that declare
//! `fieldValidation`, so kubectl leaves field validation to the server; and `/openapi/v2`, whose
//! definitions kubectl looks a kind up in before it reports an unknown kind (kubectl asks for
//! the protobuf form, other clients for JSON).

use serde_json::{Map, Value, json};

use super::resources::{Registry, ResourceDef};

/// `dev.ignis.v1alpha1.MicroVM`, `io.k8s.api.core.v1.Namespace`: the schema name of a kind.
pub fn schema_name(def: &ResourceDef) -> String {
    if def.group.is_empty() {
        return format!("io.k8s.api.core.v1.{}", def.kind);
    }
    if let Some(prefix) = def.group.strip_suffix(".k8s.io") {
        return format!("io.k8s.api.{prefix}.{}.{}", def.version, def.kind);
    }
    let reversed: Vec<&str> = def.group.split('.').rev().collect();
    format!("{}.{}.{}", reversed.join("."), def.version, def.kind)
}

fn gvk(def: &ResourceDef) -> Value {
    json!([{ "group": def.group, "version": def.version, "kind": def.kind }])
}

fn object_schema(def: &ResourceDef) -> Value {
    let mut schema =
        def.schema.as_deref().cloned().unwrap_or_else(
            || json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
    if let Some(map) = schema.as_object_mut() {
        let props = map
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(props) = props.as_object_mut() {
            props.insert("apiVersion".into(), json!({"type": "string",
                "description": "APIVersion defines the versioned schema of this representation of an object."}));
            props.insert("kind".into(), json!({"type": "string",
                "description": "Kind is a string value representing the REST resource this object represents."}));
            props.insert(
                "metadata".into(),
                json!({"type": "object",
                "description": "Standard object's metadata.",
                "x-kubernetes-preserve-unknown-fields": true}),
            );
        }
        map.insert("type".into(), "object".into());
        map.insert("x-kubernetes-group-version-kind".into(), gvk(def));
    }
    schema
}

fn param(name: &str, location: &str) -> Value {
    json!({"name": name, "in": location, "schema": {"type": "string", "uniqueItems": true}})
}

fn paths_of(def: &ResourceDef, name: &str) -> Vec<(String, Value)> {
    let base = if def.group.is_empty() {
        format!("/api/{}", def.version)
    } else {
        format!("/apis/{}/{}", def.group, def.version)
    };
    let scope = if def.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", def.plural)
    } else {
        format!("{base}/{}", def.plural)
    };
    let reference = json!({"$ref": format!("#/components/schemas/{name}")});
    let response = json!({"200": {"description": "OK", "content": {
        "application/json": {"schema": reference}}}});
    let op = |verb: &str, extra: &[&str]| {
        let mut params = vec![param("dryRun", "query"), param("fieldManager", "query")];
        params.extend(extra.iter().map(|p| param(p, "query")));
        json!({
            "operationId": format!("{verb}{}", def.kind),
            "x-kubernetes-action": verb,
            "x-kubernetes-group-version-kind": gvk(def)[0],
            "parameters": params,
            "responses": response,
        })
    };
    let mut item_params = vec![json!({"name": "name", "in": "path", "required": true,
        "schema": {"type": "string"}})];
    if def.namespaced {
        item_params.push(json!({"name": "namespace", "in": "path", "required": true,
            "schema": {"type": "string"}}));
    }
    let item = json!({
        "get": op("get", &[]),
        "put": op("put", &["fieldValidation"]),
        "patch": op("patch", &["fieldValidation", "force"]),
        "delete": op("delete", &[]),
        "parameters": item_params,
    });
    let collection = json!({
        "get": op("list", &[]),
        "post": op("post", &["fieldValidation"]),
    });
    let mut out = vec![
        (format!("{scope}/{{name}}"), item.clone()),
        (scope, collection),
    ];
    if def.status_subresource {
        out.push((format!("{}/status", out[0].0), item));
    }
    out
}

/// The document of one group/version.
pub fn group_version_doc(reg: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut schemas = Map::new();
    let mut paths = Map::new();
    for def in reg.in_group_version(group, version) {
        let name = schema_name(def);
        schemas.insert(name.clone(), object_schema(def));
        schemas.insert(
            format!("{name}List"),
            json!({"type": "object", "properties": {
                "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "items": {"type": "array", "items": {"$ref": format!("#/components/schemas/{name}")}}},
                "x-kubernetes-group-version-kind": [{"group": def.group, "version": def.version,
                    "kind": format!("{}List", def.kind)}]}),
        );
        for (path, item) in paths_of(def, &name) {
            paths.insert(path, item);
        }
    }
    if schemas.is_empty() {
        return None;
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// The path of a group/version's document under `/openapi/v3`.
fn doc_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: the index of per-group/version documents.
pub fn index(reg: &Registry) -> Value {
    let mut paths = Map::new();
    for (g, v) in reg.group_versions() {
        let path = doc_path(&g, &v);
        // The hash only has to change when the document does: it depends on the binary only.
        let hash = {
            use sha2::Digest;
            let doc = group_version_doc(reg, &g, &v).unwrap_or(Value::Null);
            hex::encode(&sha2::Sha256::digest(doc.to_string().as_bytes())[..16])
        };
        paths.insert(
            path.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
        );
    }
    json!({ "paths": paths })
}

/// `/openapi/v2` as JSON: the definitions of every served kind.
pub fn v2_json(reg: &Registry) -> Value {
    let definitions: Map<String, Value> = reg
        .resources
        .iter()
        .filter(|d| !d.review)
        .map(|d| (schema_name(d), object_schema(d)))
        .collect();
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.34.0"},
        "paths": {},
        "definitions": definitions,
    })
}

/// `/openapi/v2` in gnostic's protobuf form (`openapi.v2.Document`): the version and info, no
/// definitions. Enough for kubectl, which only looks kinds up in it and falls back to the
/// discovery documents and OpenAPI v3 for everything it needs.
pub fn v2_protobuf() -> Vec<u8> {
    fn field(number: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(number << 3) | 2];
        let mut len = bytes.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(bytes);
        out
    }
    let info = [field(1, b"Kubernetes"), field(2, b"v1.34.0")].concat();
    [field(1, b"2.0"), field(2, &info), field(8, &[])].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_documents_name_every_kind() {
        let reg = crate::dev::apiserver::resources::test_registry();
        let doc = v2_json(&reg);
        assert!(doc["definitions"]["com.example.v1.Widget"].is_object());
        assert!(doc["definitions"]["io.k8s.api.core.v1.ConfigMap"].is_object());
        let pb = v2_protobuf();
        assert_eq!(&pb[..5], b"\x0a\x032.0");
    }

    #[test]
    fn schema_names_follow_the_real_servers_convention() {
        let reg = crate::dev::apiserver::resources::test_registry();
        let mvm = reg.find("example.com", "v1", "widgets").expect("wd");
        assert_eq!(schema_name(mvm), "com.example.v1.Widget");
        let lease = reg
            .find("coordination.k8s.io", "v1", "leases")
            .expect("lease");
        assert_eq!(schema_name(lease), "io.k8s.api.coordination.v1.Lease");
    }

    #[test]
    fn microvm_document_has_schema_and_field_validation() {
        let reg = crate::dev::apiserver::resources::test_registry();
        let doc = group_version_doc(&reg, "example.com", "v1").expect("doc");
        let schema = &doc["components"]["schemas"]["com.example.v1.Widget"];
        assert_eq!(
            schema["x-kubernetes-group-version-kind"][0]["kind"],
            "Widget"
        );
        assert!(schema["properties"]["spec"]["properties"]["resources"].is_object());
        let patch =
            &doc["paths"]["/apis/example.com/v1/namespaces/{namespace}/widgets/{name}"]["patch"];
        assert!(
            patch["parameters"]
                .as_array()
                .expect("params")
                .iter()
                .any(|p| p["name"] == "fieldValidation")
        );
        let idx = index(&reg);
        assert!(
            idx["paths"]["apis/example.com/v1"]["serverRelativeURL"]
                .as_str()
                .expect("url")
                .starts_with("/openapi/v3/apis/example.com/v1?hash=")
        );
    }
}
