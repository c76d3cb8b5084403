//! The HTTP edge: authentication, routing, request options, bounded body intake and the
//! response shapes. Resource verbs are in `rest.rs`, watches in `watch.rs`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use super::body::MAX_BODY;
use super::errors::{ApiError, Cause};
use super::route::{self, Route};
use super::server::{FieldValidation, Server, WriteOptions};
use super::{discovery, openapi, rest};

/// A JSON response.
pub(crate) fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Add `Warning: 299 - "…"` headers, as the real server does for dropped fields.
pub(crate) fn with_warnings(mut resp: Response<Body>, opts: &WriteOptions) -> Response<Body> {
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
pub(crate) fn error_response(error: &ApiError) -> Response<Body> {
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

/// Serve one request.
pub(crate) async fn handle(server: Arc<Server>, request: Request<Body>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let route = route::parse(parts.uri.path());
    if route != Route::Health && !authorized(&server, &parts.headers) {
        return error_response(&ApiError::Unauthorized);
    }
    let query = Query::parse(&parts.uri);
    // The limit applies while reading: a larger body is never buffered whole.
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            return error_response(&ApiError::TooLarge(format!(
                "Request entity too large: limit is {MAX_BODY}"
            )));
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
    query: &Query,
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
        Route::OpenApiV2 => {
            let accept = header_str(headers, header::ACCEPT);
            if accept.contains("protobuf") {
                let mut resp = Response::new(Body::from(openapi::v2_protobuf()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                    ),
                );
                Ok(resp)
            } else {
                ok(openapi::v2_json(reg))
            }
        }
        Route::Unknown => Err(ApiError::NoSuchPath),
        Route::Resource(path) => {
            rest::resource_request(server, method, headers, path, query, body).await
        }
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
