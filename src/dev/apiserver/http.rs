//! The HTTP edge: authentication, routing and bounded body intake. Resource verbs are in
//! `rest.rs`, watches in `watch.rs`, request options in `options.rs`, responses in
//! `respond.rs`.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, Response, header};
use serde_json::Value;

use super::body::MAX_BODY;
use super::errors::ApiError;
use super::options::{Query, header_str};
use super::respond::{error_response, json_response};
use super::route::{self, Route};
use super::server::Server;
use super::{discovery, openapi, rest};

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
