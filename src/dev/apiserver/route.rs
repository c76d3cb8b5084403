//! Request paths parsed into what they address, before any handler runs (pure, unit-tested).

/// A resource path: `/api/v1/...` or `/apis/<group>/<version>/...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourcePath {
    pub group: String,
    pub version: String,
    pub plural: String,
    /// `None`: cluster-scoped, or a list/watch across all namespaces.
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// What a request path addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Version,
    /// `/api`
    CoreVersions,
    /// `/apis`
    Groups,
    /// `/api/v1`, `/apis/<group>/<version>`
    GroupVersion {
        group: String,
        version: String,
    },
    /// `/apis/<group>`
    Group {
        group: String,
    },
    OpenApiV2,
    OpenApiV3Index,
    /// `/openapi/v3/api/v1`, `/openapi/v3/apis/<group>/<version>`
    OpenApiV3 {
        group: String,
        version: String,
    },
    Health,
    Resource(ResourcePath),
    Unknown,
}

/// Subresources of namespaces that sit where a namespaced resource's plural would.
const NAMESPACE_SUBRESOURCES: [&str; 2] = ["status", "finalize"];

fn resource(group: &str, version: &str, rest: &[&str]) -> Route {
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, more @ ..] if !NAMESPACE_SUBRESOURCES.contains(plural) => {
            (Some(ns.to_string()), {
                let mut v = vec![*plural];
                v.extend_from_slice(more);
                v
            })
        }
        other => (None, other.to_vec()),
    };
    let mut path = ResourcePath {
        group: group.into(),
        version: version.into(),
        plural: String::new(),
        namespace,
        name: None,
        subresource: None,
    };
    match rest.as_slice() {
        [plural] => path.plural = plural.to_string(),
        [plural, name] => {
            path.plural = plural.to_string();
            path.name = Some(name.to_string());
        }
        [plural, name, sub] => {
            path.plural = plural.to_string();
            path.name = Some(name.to_string());
            path.subresource = Some(sub.to_string());
        }
        _ => return Route::Unknown,
    }
    Route::Resource(path)
}

/// Parse a request path (without the query).
pub fn parse(path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["version"] => Route::Version,
        ["healthz" | "readyz" | "livez", ..] => Route::Health,
        ["openapi", "v2"] => Route::OpenApiV2,
        ["openapi", "v3"] => Route::OpenApiV3Index,
        ["openapi", "v3", "api", version] => Route::OpenApiV3 {
            group: String::new(),
            version: version.to_string(),
        },
        ["openapi", "v3", "apis", group, version] => Route::OpenApiV3 {
            group: group.to_string(),
            version: version.to_string(),
        },
        ["api"] => Route::CoreVersions,
        ["apis"] => Route::Groups,
        ["api", version] => Route::GroupVersion {
            group: String::new(),
            version: version.to_string(),
        },
        ["apis", group] => Route::Group {
            group: group.to_string(),
        },
        ["apis", group, version] => Route::GroupVersion {
            group: group.to_string(),
            version: version.to_string(),
        },
        ["api", version, rest @ ..] => resource("", version, rest),
        ["apis", group, version, rest @ ..] => resource(group, version, rest),
        _ => Route::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(path: &str) -> ResourcePath {
        match parse(path) {
            Route::Resource(r) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn namespaced_and_cluster_paths_are_told_apart() {
        let r = res("/apis/ignis.dev/v1alpha1/namespaces/default/microvms/a/status");
        assert_eq!(r.group, "ignis.dev");
        assert_eq!(r.namespace.as_deref(), Some("default"));
        assert_eq!(r.plural, "microvms");
        assert_eq!(r.name.as_deref(), Some("a"));
        assert_eq!(r.subresource.as_deref(), Some("status"));

        let r = res("/api/v1/namespaces/default");
        assert_eq!(
            (r.plural.as_str(), r.name.as_deref()),
            ("namespaces", Some("default"))
        );
        let r = res("/api/v1/namespaces/kube-system/status");
        assert_eq!(r.subresource.as_deref(), Some("status"));
        assert_eq!(r.namespace, None);
        let r = res("/api/v1/namespaces/default/events");
        assert_eq!(
            (r.plural.as_str(), r.namespace.as_deref()),
            ("events", Some("default"))
        );
        let r = res("/apis/ignis.dev/v1alpha1/microvms");
        assert_eq!((r.namespace, r.name), (None, None));
    }

    #[test]
    fn discovery_and_openapi_paths() {
        assert_eq!(parse("/version"), Route::Version);
        assert_eq!(parse("/api"), Route::CoreVersions);
        assert_eq!(
            parse("/apis/coordination.k8s.io/v1"),
            Route::GroupVersion {
                group: "coordination.k8s.io".into(),
                version: "v1".into()
            }
        );
        assert_eq!(
            parse("/openapi/v3/apis/ignis.dev/v1alpha1"),
            Route::OpenApiV3 {
                group: "ignis.dev".into(),
                version: "v1alpha1".into()
            }
        );
        assert_eq!(parse("/nope"), Route::Unknown);
        assert_eq!(parse("/api/v1/a/b/c/d"), Route::Unknown);
    }
}
