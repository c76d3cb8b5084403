//! Server-side validation of `MicroVM` objects, exactly as the CRD declares it: the structural
//! OpenAPI schema (types, ranges, patterns, enums, required fields) and the CEL
//! `x-kubernetes-validations` rules, including transition rules against the old object.
//!
//! The embedded dev API server uses this to enforce the CRD, and the unit tests use it to prove
//! every sample is accepted or refused for the right field. A real API server enforces the same
//! CRD by itself.

use kube::CustomResourceExt;
use serde_json::Value;
use thiserror::Error;

use super::MicroVM;

/// The CRD could not be turned into a validator (a bug in the Rust types, never user input).
#[derive(Debug, Error)]
pub enum SchemaError {
    #[error("CRD has no openAPIV3Schema for its served version")]
    MissingSchema,
    #[error("CRD schema is not a valid JSON schema: {0}")]
    InvalidSchema(String),
    #[error("CRD has CEL rules that do not compile: {0}")]
    InvalidRules(String),
}

/// Why a field was refused, named like the API server's `metav1.CauseType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FieldErrorKind {
    /// `FieldValueInvalid`
    Invalid,
    /// `FieldValueRequired`
    Required,
    /// `FieldValueNotSupported`
    NotSupported,
    /// `FieldValueTypeInvalid`
    TypeInvalid,
    /// `FieldValueForbidden` (CEL rule failed)
    Forbidden,
}

impl FieldErrorKind {
    /// The cause type in a Kubernetes `Status`.
    pub(crate) fn cause_type(self) -> &'static str {
        match self {
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
            FieldErrorKind::TypeInvalid => "FieldValueTypeInvalid",
            FieldErrorKind::Forbidden => "FieldValueForbidden",
        }
    }

    fn label(self) -> &'static str {
        match self {
            FieldErrorKind::Invalid | FieldErrorKind::Forbidden => "Invalid value",
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::NotSupported => "Unsupported value",
            FieldErrorKind::TypeInvalid => "Invalid value",
        }
    }
}

/// One refused field, in the API server's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FieldError {
    /// Dotted path, e.g. `spec.resources.vcpus` or `spec.network.interfaces[1].name`.
    pub(crate) field: String,
    pub(crate) kind: FieldErrorKind,
    /// What is wrong, naming the field.
    pub(crate) detail: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.field, self.kind.label(), self.detail)
    }
}

/// Validates `MicroVM` objects against the CRD generated from the Rust types.
pub(crate) struct MicroVmValidator {
    structural: jsonschema::Validator,
    rules: kube_cel::CompiledSchema,
    /// The top-level fields whose schema holds CEL rules; `None` when the root itself has some.
    rule_roots: Option<Vec<String>>,
}

impl std::fmt::Debug for MicroVmValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVmValidator").finish_non_exhaustive()
    }
}

impl MicroVmValidator {
    /// Build the validator from `MicroVM::crd()`.
    pub(crate) fn new() -> Result<Self, SchemaError> {
        let crd = MicroVM::crd();
        let schema = crd
            .spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .ok_or(SchemaError::MissingSchema)?;
        let schema =
            serde_json::to_value(schema).map_err(|e| SchemaError::InvalidSchema(e.to_string()))?;
        Self::from_schema(&schema)
    }

    /// Build a validator from an `openAPIV3Schema` value.
    pub(crate) fn from_schema(schema: &Value) -> Result<Self, SchemaError> {
        let structural = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .should_validate_formats(false)
            .build(&openapi_to_json_schema(schema))
            .map_err(|e| SchemaError::InvalidSchema(e.to_string()))?;
        let rules = kube_cel::compile_schema(schema);
        if rules.has_errors() {
            let errors: Vec<String> = rules
                .compilation_errors()
                .iter()
                .map(|e| e.to_string())
                .collect();
            return Err(SchemaError::InvalidRules(errors.join("; ")));
        }
        Ok(Self {
            structural,
            rules,
            rule_roots: rule_roots(schema),
        })
    }

    /// Whether an update leaves every field that has CEL rules as it was. Kubernetes ratchets
    /// CRD validation (GA in 1.33): an error in an unchanged value is not reported, and a
    /// transition rule holds for a value equal to its old self, so such a write (a status, a
    /// finalizer, a label) cannot fail a rule and they are not run. They are most of the
    /// writes, and the rules are the costliest part of admission.
    fn rules_untouched(&self, object: &Value, old: Option<&Value>) -> bool {
        match (old, &self.rule_roots) {
            (Some(old), Some(roots)) => roots.iter().all(|r| object.get(r) == old.get(r)),
            _ => false,
        }
    }

    /// Validate a whole object (`apiVersion`, `kind`, `metadata`, `spec`, `status`). `old` is the
    /// stored object on updates, so transition rules (immutability) are checked.
    pub(crate) fn validate(&self, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = self
            .structural
            .iter_errors(object)
            .map(|e| structural_error(&e))
            .collect();
        // CEL rules assume a structurally valid object, as in the API server.
        if errors.is_empty()
            && !self.rules_untouched(object, old)
            && let Err(failures) = kube_cel::validate_compiled(&self.rules, object, old)
        {
            errors.extend(failures.iter().map(|f| FieldError {
                field: if f.field_path.is_empty() {
                    "<root>".to_string()
                } else {
                    f.field_path.clone()
                },
                kind: FieldErrorKind::Forbidden,
                detail: f.message.clone(),
            }));
        }
        errors
    }
}

/// The top-level properties of `schema` whose subtree holds `x-kubernetes-validations`, or
/// `None` when the root has rules of its own.
fn rule_roots(schema: &Value) -> Option<Vec<String>> {
    fn has_rules(v: &Value) -> bool {
        match v {
            Value::Object(m) => {
                m.contains_key("x-kubernetes-validations") || m.values().any(has_rules)
            }
            Value::Array(items) => items.iter().any(has_rules),
            _ => false,
        }
    }
    if schema.get("x-kubernetes-validations").is_some() {
        return None;
    }
    Some(
        schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, sub)| has_rules(sub))
            .map(|(name, _)| name.clone())
            .collect(),
    )
}

/// OpenAPI v3 schemas mark optional values `nullable`; JSON Schema draft 4 needs them spelled
/// as a type union, or a `null` a client sends for an optional field is refused.
fn openapi_to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                out.insert(k.clone(), openapi_to_json_schema(v));
            }
            if out.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = out.get("type").cloned()
            {
                out.insert(
                    "type".into(),
                    Value::Array(vec![Value::String(t), "null".into()]),
                );
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(openapi_to_json_schema).collect()),
        other => other.clone(),
    }
}

/// `/spec/network/interfaces/0/name` → `spec.network.interfaces[0].name`
pub(crate) fn pointer_to_field_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').filter(|s| !s.is_empty()) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    if out.is_empty() {
        "<root>".to_string()
    } else {
        out
    }
}

fn structural_error(error: &jsonschema::ValidationError<'_>) -> FieldError {
    use jsonschema::error::ValidationErrorKind as K;
    let path = pointer_to_field_path(error.instance_path().as_str());
    let value = error.instance().to_string();
    match error.kind() {
        K::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            let field = if path == "<root>" {
                name.to_string()
            } else {
                format!("{path}.{name}")
            };
            FieldError {
                detail: format!("{field} is required"),
                field,
                kind: FieldErrorKind::Required,
            }
        }
        K::Enum { options } => FieldError {
            detail: format!("{value}: supported values: {}", enum_options(options)),
            field: path,
            kind: FieldErrorKind::NotSupported,
        },
        K::Type { .. } => FieldError {
            detail: format!("{path} in body has the wrong type: {error}"),
            field: path,
            kind: FieldErrorKind::TypeInvalid,
        },
        other => {
            // Worded like the API server's structural-schema errors.
            let rule = match other {
                K::Minimum { limit } => {
                    format!("should be greater than or equal to {}", number(limit))
                }
                K::Maximum { limit } => {
                    format!("should be less than or equal to {}", number(limit))
                }
                K::Pattern { pattern } => format!("should match '{pattern}'"),
                K::MinLength { limit } => format!("should be at least {limit} chars long"),
                K::MaxLength { limit } => format!("may not be more than {limit} bytes"),
                K::MaxItems { limit } => format!("must have at most {limit} items"),
                K::MinItems { limit } => format!("should have at least {limit} items"),
                _ => error.to_string(),
            };
            FieldError {
                detail: format!("{value}: {path} in body {rule}"),
                field: path,
                kind: FieldErrorKind::Invalid,
            }
        }
    }
}

/// `1.0` → `1`: limits come from integer fields but arrive as JSON floats.
fn number(limit: &Value) -> String {
    match limit.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => limit.to_string(),
    }
}

fn enum_options(options: &Value) -> String {
    match options {
        Value::Array(items) => items
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::path::{Path, PathBuf};

    fn samples_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples")
    }

    fn yaml_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("samples dir")
            .map(|e| e.expect("dir entry").path())
            .filter(|p| {
                p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
            })
            .collect();
        files.sort();
        files
    }

    fn load(path: &Path) -> Value {
        let text = std::fs::read_to_string(path).expect("read sample");
        serde_yaml::from_str(&text).expect("sample is YAML")
    }

    fn validator() -> MicroVmValidator {
        MicroVmValidator::new().expect("CRD schema compiles")
    }

    #[test]
    fn every_valid_sample_is_accepted() {
        let v = validator();
        let files = yaml_files(&samples_dir());
        assert!(files.len() >= 2, "expected the minimal and full samples");
        for file in files {
            // A sample may hold several documents (a pool and its claim): each MicroVM counts.
            let text = std::fs::read_to_string(&file).expect("read sample");
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let object = Value::deserialize(doc).expect("sample is YAML");
                if object["kind"] != "MicroVM" {
                    continue;
                }
                let errors = v.validate(&object, None);
                assert!(errors.is_empty(), "{} refused: {errors:?}", file.display());
                // And they deserialize into the Rust types.
                let _: MicroVM = serde_json::from_value(object).expect("sample matches the types");
            }
        }
    }

    #[test]
    fn every_invalid_sample_is_refused_naming_its_field() {
        let v = validator();
        let files = yaml_files(&samples_dir().join("invalid"));
        assert!(files.len() >= 10, "expected the invalid samples");
        for file in files {
            let object = load(&file);
            let expected = object["metadata"]["annotations"]["ignis.dev/test-expect-field"]
                .as_str()
                .expect("invalid sample names its field")
                .to_string();
            let errors = v.validate(&object, None);
            assert!(!errors.is_empty(), "{} accepted", file.display());
            let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
            assert!(
                rendered.iter().any(|e| e.contains(&expected)),
                "{}: no error names {expected}: {rendered:?}",
                file.display()
            );
        }
    }

    fn minimal() -> Value {
        load(&samples_dir().join("microvm-minimal.yaml"))
    }

    #[test]
    fn immutable_fields_cannot_change_but_run_policy_can() {
        let v = validator();
        let old = minimal();

        let mut resized = old.clone();
        resized["spec"]["resources"]["memory"] = "512Mi".into();
        let errors = v.validate(&resized, Some(&old));
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("spec.resources is immutable")),
            "{errors:?}"
        );

        let mut new_kernel = old.clone();
        new_kernel["spec"]["kernel"]["cmdline"] = "console=ttyS0".into();
        let errors = v.validate(&new_kernel, Some(&old));
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("spec.kernel is immutable")),
            "{errors:?}"
        );

        let mut added_rootfs = old.clone();
        added_rootfs["spec"]["rootfs"] = serde_json::json!({"path": "/var/lib/disk.img"});
        let errors = v.validate(&added_rootfs, Some(&old));
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("spec.rootfs is immutable")),
            "{errors:?}"
        );

        let mut halted = old.clone();
        halted["spec"]["runPolicy"] = "Halted".into();
        halted["spec"]["terminationGracePeriodSeconds"] = 5.into();
        assert_eq!(v.validate(&halted, Some(&old)), vec![]);
    }

    #[test]
    fn rules_ratchet_on_writes_that_leave_the_spec_unchanged() {
        let v = validator();
        assert_eq!(v.rule_roots, Some(vec!["spec".to_string()]));
        // Stored before a rule forbade it (as after a CRD upgrade): a status write or a new
        // label passes, as on a ratcheting kube-apiserver; a spec change is checked again.
        let mut old = minimal();
        old["spec"]["kernel"]["path"] = "/boot/../etc/vmlinuz".into();
        assert!(!v.validate(&old, None).is_empty(), "the rule applies");
        let mut status = old.clone();
        status["status"] = serde_json::json!({"phase": "Running"});
        status["metadata"]["labels"] = serde_json::json!({"team": "a"});
        assert_eq!(v.validate(&status, Some(&old)), vec![]);
        let mut halted = old.clone();
        halted["spec"]["runPolicy"] = "Halted".into();
        // Stricter than kube-apiserver, which ratchets field by field: here a changed spec
        // runs every rule again.
        assert!(
            !v.validate(&halted, Some(&old)).is_empty(),
            "a changed spec runs the rules"
        );
    }

    #[test]
    fn structural_errors_name_the_path() {
        let v = validator();
        let mut object = minimal();
        object["spec"]["runPolicy"] = "Sometimes".into();
        let errors = v.validate(&object, None);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "spec.runPolicy");
        assert_eq!(errors[0].kind, FieldErrorKind::NotSupported);
        assert!(
            errors[0].to_string().contains("\"Always\""),
            "{}",
            errors[0]
        );

        let mut zero = minimal();
        zero["spec"]["resources"]["vcpus"] = 0.into();
        let errors = v.validate(&zero, None);
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "spec.resources.vcpus: Invalid value: 0: spec.resources.vcpus in body should be greater than or equal to 1"
            ]
        );
    }

    #[test]
    fn pointer_paths_read_like_kubectl() {
        assert_eq!(
            pointer_to_field_path("/spec/resources/vcpus"),
            "spec.resources.vcpus"
        );
        assert_eq!(
            pointer_to_field_path("/spec/network/interfaces/1/name"),
            "spec.network.interfaces[1].name"
        );
        assert_eq!(pointer_to_field_path(""), "<root>");
    }
}
