//! What a request asks for besides its path: the query (every parameter with all its values),
//! headers, and the write options checked as the real server checks them.

use std::collections::HashMap;

use axum::http::{HeaderMap, header};
use serde_json::json;

use super::errors::{ApiError, Cause};
use super::server::{FieldValidation, WriteOptions};

/// The query, every parameter with all its values.
#[derive(Clone, Debug, Default)]
pub(crate) struct Query(pub HashMap<String, Vec<String>>);

impl Query {
    pub(crate) fn parse(uri: &axum::http::Uri) -> Self {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        let pairs: Vec<(String, String)> =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
                .map(|q| q.0)
                .unwrap_or_default();
        for (k, v) in pairs {
            out.entry(k).or_default().push(v);
        }
        Query(out)
    }

    /// The first value of a parameter.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.first()).map(String::as_str)
    }

    pub(crate) fn all(&self, key: &str) -> &[String] {
        self.0.get(key).map_or(&[], Vec::as_slice)
    }

    pub(crate) fn is_true(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true" | "1"))
    }
}

pub(crate) fn header_str(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Which options object a verb's query parameters form (for the 422 naming it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OptionsKind {
    Create,
    Update,
    Patch,
    Delete,
}

impl OptionsKind {
    fn name(self) -> &'static str {
        match self {
            OptionsKind::Create => "CreateOptions",
            OptionsKind::Update => "UpdateOptions",
            OptionsKind::Patch => "PatchOptions",
            OptionsKind::Delete => "DeleteOptions",
        }
    }
}

/// The write options of a request, checked as the real server checks them: `dryRun` only
/// `All`, `fieldValidation` one of its four values, `force` only on apply patches.
pub(crate) fn write_options(
    query: &Query,
    headers: &HeaderMap,
    kind: OptionsKind,
    apply: bool,
    body_dry_run: &[String],
) -> Result<WriteOptions, ApiError> {
    let mut causes = Vec::new();
    let dry_run: Vec<String> = query
        .all("dryRun")
        .iter()
        .chain(body_dry_run)
        .cloned()
        .collect();
    if dry_run.iter().any(|v| v != "All") {
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            message: format!(
                "Unsupported value: {}: supported values: \"All\"",
                json!(dry_run)
            ),
            field: "dryRun".into(),
        });
    }
    let validation = match query.get("fieldValidation").unwrap_or_default() {
        "Ignore" => FieldValidation::Ignore,
        "Strict" => FieldValidation::Strict,
        "" | "Warn" => FieldValidation::Warn,
        other => {
            causes.push(Cause {
                reason: "FieldValueNotSupported".into(),
                message: format!(
                    "Unsupported value: {}: supported values: \"\", \"Ignore\", \"Strict\", \"Warn\"",
                    json!(other)
                ),
                field: "fieldValidation".into(),
            });
            FieldValidation::Warn
        }
    };
    let force = query.is_true("force");
    if force && !apply && kind == OptionsKind::Patch {
        causes.push(Cause {
            reason: "FieldValueForbidden".into(),
            message: "Forbidden: may not be specified for non-apply patch".into(),
            field: "force".into(),
        });
    }
    if apply && query.get("fieldManager").is_none_or(str::is_empty) {
        causes.push(Cause {
            reason: "FieldValueRequired".into(),
            message: "Required value: is required for apply patch".into(),
            field: "fieldManager".into(),
        });
    }
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            kind: kind.name().into(),
            group: "meta.k8s.io".into(),
            name: String::new(),
            causes,
        });
    }
    // Without fieldManager the real server names the manager after the client's product.
    let field_manager = query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .or_else(|| {
            let agent = header_str(headers, header::USER_AGENT);
            let product = agent.split('/').next().unwrap_or_default();
            (!product.is_empty() && !apply).then(|| product.chars().take(128).collect())
        });
    Ok(WriteOptions {
        field_manager,
        force,
        validation,
        duplicates: Vec::new(),
        warnings: Default::default(),
        dry_run: !dry_run.is_empty(),
    })
}
