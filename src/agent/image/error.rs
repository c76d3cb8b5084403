//! Errors of image pulls and the image cache, each with a fixed reason (conditions, Events,
//! metric labels), and the one place where the OCI client's errors are sorted into them.

use std::io;
use std::path::PathBuf;

use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use thiserror::Error;

use super::tool::ToolError;

/// Errors of pulling, caching and preparing guest images. Each variant's word (`reason()`)
/// lands in conditions, Events and metric labels.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum ImageError {
    #[error("image reference {reference:?} is not valid: {detail}")]
    #[strum(serialize = "InvalidImageReference")]
    InvalidReference { reference: String, detail: String },
    #[error("image pull secret is not a valid docker config: {detail}")]
    #[strum(serialize = "InvalidPullSecret")]
    InvalidCredentials { detail: String },
    #[error("{reference}: manifest unknown to the registry: {message}")]
    #[strum(serialize = "ImageNotFound")]
    NotFound { reference: String, message: String },
    #[error("{reference}: the registry refused the credentials: {message}")]
    #[strum(serialize = "ImageUnauthorized")]
    Unauthorized { reference: String, message: String },
    #[error("{reference}: registry unreachable: {message}")]
    #[strum(serialize = "RegistryUnreachable")]
    Unreachable { reference: String, message: String },
    #[error("{reference}: the registry answered with an error: {message}")]
    #[strum(serialize = "RegistryError")]
    Registry { reference: String, message: String },
    #[error("{reference}: content does not match its digest: {message}")]
    #[strum(serialize = "ImageDigestMismatch")]
    DigestMismatch { reference: String, message: String },
    #[error("{reference}: not a {kind} image: {detail}")]
    #[strum(serialize = "ImageBadLayout")]
    BadLayout {
        reference: String,
        kind: &'static str,
        detail: String,
    },
    #[error("{reference}: the image is too large: {detail}")]
    #[strum(serialize = "ImageTooLarge")]
    TooLarge { reference: String, detail: String },
    #[error("{reference}: cannot turn the image's filesystem into an ext4 disk: {detail}")]
    #[strum(serialize = "ImageConversionFailed")]
    Conversion { reference: String, detail: String },
    /// `DiskToolMissing` or `DiskToolFailed`.
    #[error("a disk tool failed")]
    #[strum(transparent)]
    Tool(#[source] ToolError),
    #[error("holder {holder:?} must be 1-128 letters, digits, '-', '_' or '.'")]
    #[strum(serialize = "InvalidImageHolder")]
    InvalidHolder { holder: String },
    #[error("I/O on the image cache at {path}")]
    #[strum(serialize = "ImageCacheIoError")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<ToolError> for ImageError {
    fn from(e: ToolError) -> Self {
        ImageError::Tool(e)
    }
}

impl ImageError {
    /// Whether the same request can never succeed (the spec must change). Unknown tags and
    /// refused credentials are retried: a push or a fixed Secret makes them work.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            ImageError::InvalidReference { .. }
                | ImageError::InvalidCredentials { .. }
                | ImageError::BadLayout { .. }
                | ImageError::TooLarge { .. }
                | ImageError::InvalidHolder { .. }
        )
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { path, source }
    }

    /// Sort an OCI client error into our reasons, keeping the registry's own message.
    pub(crate) fn from_oci(reference: &str, e: OciDistributionError) -> ImageError {
        let reference = reference.to_string();
        match e {
            OciDistributionError::RegistryError { envelope, .. } => {
                let message = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    ImageError::NotFound { reference, message }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    ImageError::Unauthorized { reference, message }
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::DigestInvalid))
                {
                    ImageError::DigestMismatch { reference, message }
                } else {
                    ImageError::Registry { reference, message }
                }
            }
            OciDistributionError::UnauthorizedError { url } => ImageError::Unauthorized {
                reference,
                message: format!("401 Unauthorized from {url}"),
            },
            OciDistributionError::AuthenticationFailure(message) => {
                ImageError::Unauthorized { reference, message }
            }
            OciDistributionError::ServerError { code, url, message } => match code {
                401 | 403 => ImageError::Unauthorized {
                    reference,
                    message: format!("{code} from {url}: {message}"),
                },
                404 => ImageError::NotFound {
                    reference,
                    message: format!("404 from {url}: {message}"),
                },
                _ => ImageError::Registry {
                    reference,
                    message: format!("{code} from {url}: {message}"),
                },
            },
            OciDistributionError::ImageManifestNotFoundError(message) => {
                ImageError::NotFound { reference, message }
            }
            OciDistributionError::DigestError(d) => match d {
                DigestError::VerificationError { expected, actual } => ImageError::DigestMismatch {
                    reference,
                    message: format!("expected {expected}, got {actual}"),
                },
                other => ImageError::DigestMismatch {
                    reference,
                    message: other.to_string(),
                },
            },
            OciDistributionError::RequestError(e) => {
                let message = error_chain(&e);
                if e.is_connect() || e.is_timeout() || e.is_request() {
                    ImageError::Unreachable { reference, message }
                } else {
                    ImageError::Registry { reference, message }
                }
            }
            OciDistributionError::IoError(e) => {
                // A body stream cut short or a digest check inside the stream surfaces as I/O.
                let message = error_chain(&e);
                if message.contains("digest") {
                    ImageError::DigestMismatch { reference, message }
                } else {
                    ImageError::Unreachable { reference, message }
                }
            }
            OciDistributionError::PullNoLayersError => ImageError::BadLayout {
                reference,
                kind: "guest",
                detail: "the image has no layers".into(),
            },
            OciDistributionError::IncompatibleLayerMediaTypeError(t)
            | OciDistributionError::UnsupportedMediaTypeError(t) => ImageError::BadLayout {
                reference,
                kind: "guest",
                detail: format!("unsupported media type {t}"),
            },
            other => ImageError::Registry {
                reference,
                message: error_chain(&other),
            },
        }
    }
}

/// An error and its causes on one line: reqwest hides the useful part ("connection refused")
/// in its source chain.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;
    use oci_client::errors::{OciEnvelope, OciError};

    fn envelope(code: OciErrorCode, message: &str) -> OciDistributionError {
        OciDistributionError::RegistryError {
            envelope: OciEnvelope {
                errors: vec![OciError {
                    code,
                    message: message.into(),
                    detail: serde_json::Value::Null,
                }],
            },
            url: "http://127.0.0.1:5000/v2/x/manifests/y".into(),
        }
    }

    #[test]
    fn registry_codes_map_to_fixed_reasons_with_the_registry_message() {
        let e = ImageError::from_oci(
            "r/x:y",
            envelope(OciErrorCode::ManifestUnknown, "manifest unknown"),
        );
        assert_eq!(e.reason(), "ImageNotFound");
        assert!(e.to_string().contains("manifest unknown"), "{e}");
        let e = ImageError::from_oci("r/x:y", envelope(OciErrorCode::Denied, "requested access"));
        assert_eq!(e.reason(), "ImageUnauthorized");
        let e = ImageError::from_oci(
            "r/x:y",
            OciDistributionError::UnauthorizedError { url: "u".into() },
        );
        assert_eq!(e.reason(), "ImageUnauthorized");
        let e = ImageError::from_oci(
            "r/x:y",
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected: "sha256:aa".into(),
                actual: "sha256:bb".into(),
            }),
        );
        assert_eq!(e.reason(), "ImageDigestMismatch");
        let e = ImageError::from_oci(
            "r/x:y",
            OciDistributionError::ServerError {
                code: 503,
                url: "u".into(),
                message: "busy".into(),
            },
        );
        assert_eq!(e.reason(), "RegistryError");
        assert!(!e.is_permanent());
    }
}
