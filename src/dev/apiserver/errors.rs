//! Errors of the embedded API server, shaped like the real server's `metav1.Status` so kubectl
//! and kube-rs print and classify them the way they do against a cluster.

use serde_json::{Value, json};
use thiserror::Error;

/// One refused field in a `422 Invalid` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// `metav1.CauseType`, e.g. `FieldValueInvalid`.
    pub reason: String,
    /// What is wrong, without the field, e.g. `Invalid value: 0: ...`.
    pub message: String,
    /// Dotted path of the field.
    pub field: String,
}

/// An API request that is refused; every variant maps to one HTTP code and one `Status.reason`.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{resource} \"{name}\" not found")]
    NotFound { resource: String, name: String },
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists { resource: String, name: String },
    #[error(
        "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
    )]
    Conflict { resource: String, name: String },
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {detail}")]
    PreconditionFailed {
        resource: String,
        name: String,
        detail: String,
    },
    #[error("{}{} \"{name}\" is invalid: {}", .kind, if .group.is_empty() { String::new() } else { format!(".{}", .group) }, render_causes(.causes))]
    Invalid {
        kind: String,
        group: String,
        name: String,
        causes: Vec<Cause>,
    },
    #[error("Apply failed with {} conflict{}: {}", .conflicts.len(), if .conflicts.len() == 1 { "" } else { "s" }, render_conflicts(.conflicts))]
    ApplyConflict {
        /// (manager, field) pairs, field spelled `.spec.x`.
        conflicts: Vec<(String, String)>,
    },
    #[error("too old resource version: {requested} ({oldest})")]
    Expired { requested: u64, oldest: u64 },
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{resource} \"{name}\" is forbidden: {reason}")]
    Forbidden {
        resource: String,
        name: String,
        reason: String,
    },
    #[error("{0}")]
    TooLarge(String),
    /// A patch that decodes but cannot be applied (a failed JSON patch `test`, a missing path).
    #[error("the server rejected our request due to an error in our request")]
    Rejected,
    /// An object over etcd's request limit: the real server passes etcd's error on as a 500
    /// without a reason.
    #[error("etcdserver: request is too large")]
    StorageTooLarge,
    #[error(
        "the body of the request was in an unknown format - accepted media types include: {accepted}"
    )]
    UnsupportedMediaType { accepted: String },
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("the server could not find the requested resource")]
    NoSuchPath,
    #[error("{0}")]
    BadRequest(String),
    #[error("internal error: {context}")]
    Internal {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn render_conflicts(conflicts: &[(String, String)]) -> String {
    conflicts
        .iter()
        .map(|(manager, field)| format!("conflict with \"{manager}\": {field}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn render_causes(causes: &[Cause]) -> String {
    match causes {
        [one] => format!("{}: {}", one.field, one.message),
        many => format!(
            "[{}]",
            many.iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl ApiError {
    /// The `Status.reason` word (`metav1.StatusReason`).
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } | ApiError::NoSuchPath => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. }
            | ApiError::PreconditionFailed { .. }
            | ApiError::ApplyConflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::Expired { .. } => "Expired",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden { .. } => "Forbidden",
            ApiError::TooLarge(_) => "RequestEntityTooLarge",
            ApiError::StorageTooLarge => "",
            ApiError::Rejected => "Invalid",
            ApiError::UnsupportedMediaType { .. } => "UnsupportedMediaType",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Internal { .. } => "InternalError",
        }
    }

    /// The HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            ApiError::NotFound { .. } | ApiError::NoSuchPath => 404,
            ApiError::AlreadyExists { .. }
            | ApiError::Conflict { .. }
            | ApiError::PreconditionFailed { .. }
            | ApiError::ApplyConflict { .. } => 409,
            ApiError::Invalid { .. } => 422,
            ApiError::Expired { .. } => 410,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden { .. } => 403,
            ApiError::TooLarge(_) => 413,
            ApiError::StorageTooLarge => 500,
            ApiError::Rejected => 422,
            ApiError::UnsupportedMediaType { .. } => 415,
            ApiError::MethodNotAllowed => 405,
            ApiError::BadRequest(_) => 400,
            ApiError::Internal { .. } => 500,
        }
    }

    /// Wrap an unexpected failure (storage, encoding) with what was being done.
    pub fn internal(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        ApiError::Internal {
            context: context.into(),
            source: Box::new(source),
        }
    }

    /// The `metav1.Status` body.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            ApiError::NotFound { resource, name }
            | ApiError::AlreadyExists { resource, name }
            | ApiError::Conflict { resource, name }
            | ApiError::PreconditionFailed { resource, name, .. } => {
                let (kind, group) = split_qualified(resource);
                Some(json!({ "name": name, "group": group, "kind": kind }))
            }
            ApiError::Forbidden {
                resource,
                name,
                reason,
            } => {
                let (kind, group) = split_qualified(resource);
                let mut details = json!({ "name": name, "group": group, "kind": kind });
                if let Some(ns) = reason
                    .strip_prefix("unable to create new content in namespace ")
                    .and_then(|r| r.split(' ').next())
                {
                    details["causes"] = json!([{"reason": "NamespaceTerminating",
                        "message": format!("namespace {ns} is being terminated"),
                        "field": "metadata.namespace"}]);
                }
                Some(details)
            }
            ApiError::Invalid {
                kind,
                group,
                name,
                causes,
            } => Some(json!({
                "name": name,
                "group": group,
                "kind": kind,
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason, "message": c.message, "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            ApiError::ApplyConflict { conflicts } => Some(json!({
                "causes": conflicts.iter().map(|(manager, field)| json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with \"{manager}\""),
                    "field": field,
                })).collect::<Vec<_>>(),
            })),
            ApiError::Rejected => Some(json!({})),
            _ => None,
        };
        if let (Some(details), Some(map)) = (details, status.as_object_mut()) {
            map.insert("details".into(), details);
        }
        status
    }
}

/// `microvms.ignis.dev` → (`microvms`, `ignis.dev`); `namespaces` → (`namespaces`, ``).
fn split_qualified(resource: &str) -> (&str, &str) {
    resource.split_once('.').unwrap_or((resource, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_status_has_the_real_servers_shape() {
        let err = ApiError::Invalid {
            kind: "MicroVM".into(),
            group: "ignis.dev".into(),
            name: "x".into(),
            causes: vec![
                Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "Invalid value: 0: too small".into(),
                    field: "spec.resources.vcpus".into(),
                },
                Cause {
                    reason: "FieldValueRequired".into(),
                    message: "Required value".into(),
                    field: "spec.kernel".into(),
                },
            ],
        };
        let status = err.to_status();
        assert_eq!(status["code"], 422);
        assert_eq!(status["reason"], "Invalid");
        assert_eq!(
            status["message"],
            "MicroVM.ignis.dev \"x\" is invalid: [spec.resources.vcpus: Invalid value: 0: too small, spec.kernel: Required value]"
        );
        assert_eq!(
            status["details"]["causes"][0]["field"],
            "spec.resources.vcpus"
        );
        assert_eq!(status["details"]["group"], "ignis.dev");
    }

    #[test]
    fn not_found_names_the_resource_and_group() {
        let err = ApiError::NotFound {
            resource: "microvms.ignis.dev".into(),
            name: "a".into(),
        };
        let status = err.to_status();
        assert_eq!(status["code"], 404);
        assert_eq!(status["message"], "microvms.ignis.dev \"a\" not found");
        assert_eq!(status["details"]["kind"], "microvms");
        assert_eq!(status["details"]["group"], "ignis.dev");
        assert_eq!(
            ApiError::Expired {
                requested: 1,
                oldest: 9
            }
            .code(),
            410
        );
    }
}
