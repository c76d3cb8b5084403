//! Response shapes shared by the request handlers: JSON bodies, `Warning` headers, and errors
//! as `Status` objects.

use axum::body::Body;
use axum::http::{Response, StatusCode, header};
use serde_json::Value;

use super::errors::ApiError;
use super::server::WriteOptions;

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
