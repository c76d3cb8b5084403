//! PATCH bodies: JSON patch, JSON merge patch, strategic merge patch (as merge patch, core kinds
//! only) and the applied configurations of server-side apply (merged by `fields.rs`, owned by
//! `managed.rs`). Every body is depth-checked before it is parsed.

use serde_json::Value;

use super::body;
use super::errors::ApiError;

/// The patch flavours, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

/// Accepted content types, for the 415 message.
pub const ACCEPTED: &str =
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml";
/// Accepted content types for kinds that also take strategic merge patches.
pub const ACCEPTED_WITH_SMP: &str = "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml";

impl PatchKind {
    /// Classify a `Content-Type` header value.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let mime = content_type.split(';').next().unwrap_or_default().trim();
        match mime {
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Apply an RFC 6902 JSON patch.
pub fn json_patch(doc: &Value, body: &[u8]) -> Result<Value, ApiError> {
    body::check_depth(body)?;
    let patch: json_patch::Patch = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?;
    let mut out = doc.clone();
    for op in &patch.0 {
        // Like the real server's JSON patch library, `test` of `null` passes for a missing
        // path (kube-rs' finalizer helper relies on it before adding the first finalizer).
        if let json_patch::PatchOperation::Test(test) = op
            && test.value.is_null()
            && out.pointer(test.path.as_str()).is_none_or(Value::is_null)
        {
            continue;
        }
        json_patch::patch(&mut out, std::slice::from_ref(op)).map_err(|e| {
            tracing::debug!(error = %e, "a JSON patch does not apply");
            ApiError::Rejected
        })?;
    }
    Ok(out)
}

/// Apply an RFC 7386 merge patch.
pub fn merge_patch(doc: &Value, body: &[u8]) -> Result<Value, ApiError> {
    body::check_depth(body)?;
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::BadRequest(
            "a merge patch must be a JSON object".into(),
        ));
    }
    let mut out = doc.clone();
    json_patch::merge(&mut out, &patch);
    Ok(out)
}

/// Parse an apply body (YAML or JSON).
pub fn parse_apply(body: &[u8]) -> Result<Value, ApiError> {
    let v = body::decode_yaml(body)?;
    if !v.is_object() {
        return Err(ApiError::BadRequest(
            "an applied configuration must be an object".into(),
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types_map_to_patch_kinds() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchKind::Merge)
        );
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+yaml"),
            Some(PatchKind::Apply)
        );
        assert_eq!(PatchKind::from_content_type("text/plain"), None);
    }

    #[test]
    fn json_and_merge_patches_apply() {
        let doc = json!({"spec": {"a": 1, "b": 2}});
        let out = json_patch(&doc, br#"[{"op":"replace","path":"/spec/a","value":5}]"#)
            .expect("json patch");
        assert_eq!(out["spec"]["a"], 5);
        assert!(json_patch(&doc, br#"[{"op":"test","path":"/spec/a","value":9}]"#).is_err());
        let added = json_patch(
            &doc,
            br#"[{"op":"test","path":"/metadata/finalizers","value":null},
                 {"op":"add","path":"/metadata","value":{"finalizers":["f"]}}]"#,
        )
        .expect("test of null passes for a missing path");
        assert_eq!(added["metadata"]["finalizers"][0], "f");
        let out = merge_patch(&doc, br#"{"spec":{"b":null,"c":3}}"#).expect("merge");
        assert_eq!(out, json!({"spec": {"a": 1, "c": 3}}));
    }
}
