//! The resource registry: every kind the dev server serves, as data. One generic store and one
//! set of handlers serve them all; what differs per kind (scope, status subresource, printer
//! columns, schema, name rule, field selectors) lives here. Custom resources come in from the
//! outside as a CRD plus an optional [`Admission`] hook (what schema rules and CEL do on a
//! real server), so this server knows no resource of its embedder.

use std::sync::Arc;

use serde_json::Value;

use super::errors::Cause;
use super::meta::NameRule;

/// Resource-specific admission, run after schema defaulting and pruning.
pub trait Admission: Send + Sync {
    /// Every problem of `object` (`old` is the stored object on updates), as the causes of a
    /// 422 answer; empty when the object is admitted.
    fn validate(&self, object: &Value, old: Option<&Value>) -> Vec<Cause>;
}

/// A custom resource to serve: its CustomResourceDefinition (as JSON) and its admission hook.
#[derive(Clone)]
pub struct CustomResource {
    pub crd: Value,
    pub admission: Option<Arc<dyn Admission>>,
}

impl std::fmt::Debug for CustomResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomResource")
            .field("name", &self.crd["metadata"]["name"])
            .field("admission", &self.admission.is_some())
            .finish()
    }
}

/// An admission hook in a resource definition (Debug-printable).
#[derive(Clone)]
pub struct AdmissionHook(pub Arc<dyn Admission>);

impl std::fmt::Debug for AdmissionHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmissionHook")
    }
}

/// A printer column, as in a CRD's `additionalPrinterColumns`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrinterColumn {
    pub name: String,
    /// `string`, `integer`, `date`, …
    pub type_: String,
    pub json_path: String,
    pub description: String,
    /// 0 is always shown; higher only with `-o wide`.
    pub priority: i64,
}

impl PrinterColumn {
    fn new(name: &str, type_: &str, json_path: &str) -> Self {
        PrinterColumn {
            name: name.into(),
            type_: type_.into(),
            json_path: json_path.into(),
            description: String::new(),
            priority: 0,
        }
    }
}

/// One served resource.
#[derive(Clone, Debug)]
pub struct ResourceDef {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    pub namespaced: bool,
    /// Has a `/status` subresource: main writes keep status, status writes keep the rest.
    pub status_subresource: bool,
    /// `metadata.generation` is maintained (bumped when anything but metadata/status changes).
    pub generation: bool,
    /// A custom resource: strategic merge patch is refused, as on a real server.
    pub custom: bool,
    /// Deletion is refused (objects the dev server itself owns, e.g. the Node and the CRD).
    pub undeletable: bool,
    pub printer_columns: Vec<PrinterColumn>,
    /// The structural `openAPIV3Schema` (custom resources only): defaulting, pruning, explain.
    /// Shared: every request takes its own copy of the definition.
    pub schema: Option<std::sync::Arc<Value>>,
    /// Served from another resource's storage, converted on the way in and out.
    pub conversion: Conversion,
    /// What names are valid.
    pub name_rule: NameRule,
    /// Field selectors besides `metadata.name` (and `metadata.namespace` when namespaced).
    pub field_labels: Vec<String>,
    /// PUT without `metadata.resourceVersion` overwrites (core kinds) instead of being refused.
    pub unconditional_update: bool,
    /// A create-only review (access reviews): answered, never stored.
    pub review: bool,
    pub admission: Option<AdmissionHook>,
}

/// How a resource maps onto shared storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conversion {
    /// Stored as served.
    None,
    /// Core `v1` Events, stored as `events.k8s.io/v1` Events.
    CoreEvent,
}

impl ResourceDef {
    fn builtin(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        ResourceDef {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_ascii_lowercase(),
            short_names: Vec::new(),
            categories: Vec::new(),
            namespaced,
            status_subresource: false,
            generation: false,
            custom: false,
            undeletable: false,
            printer_columns: Vec::new(),
            schema: None,
            conversion: Conversion::None,
            name_rule: NameRule::Subdomain,
            field_labels: Vec::new(),
            unconditional_update: true,
            review: false,
            admission: None,
        }
    }

    fn with_field_labels(mut self, labels: &[&str]) -> Self {
        self.field_labels = labels.iter().map(|l| l.to_string()).collect();
        self
    }

    /// The top-level fields of a core kind without a schema here, for unknown-field checks
    /// (None: not checked).
    pub fn known_fields(&self) -> Option<&'static [&'static str]> {
        const COMMON: [&str; 3] = ["apiVersion", "kind", "metadata"];
        let fields: &'static [&'static str] = match (self.group.as_str(), self.kind.as_str()) {
            ("", "ConfigMap") => &[
                "apiVersion",
                "kind",
                "metadata",
                "data",
                "binaryData",
                "immutable",
            ],
            ("", "Secret") => &[
                "apiVersion",
                "kind",
                "metadata",
                "data",
                "stringData",
                "type",
                "immutable",
            ],
            ("", "Namespace") | ("", "Node") => {
                &["apiVersion", "kind", "metadata", "spec", "status"]
            }
            ("coordination.k8s.io", "Lease") => &["apiVersion", "kind", "metadata", "spec"],
            _ => return None,
        };
        debug_assert!(COMMON.iter().all(|c| fields.contains(c)));
        Some(fields)
    }

    /// Whether `field` may be used in a field selector.
    pub fn selectable(&self, field: &str) -> bool {
        field == "metadata.name"
            || (self.namespaced && field == "metadata.namespace")
            || self.field_labels.iter().any(|l| l == field)
    }

    /// `ignis.dev/v1alpha1`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `microvms.ignis.dev`, or `namespaces` for the core group: how errors name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The storage key of the resource (one per group and plural; versions share storage).
    pub fn storage_key(&self) -> String {
        match self.conversion {
            Conversion::None => format!("{}/{}", self.group, self.plural),
            Conversion::CoreEvent => "events.k8s.io/events".into(),
        }
    }

    /// The group and version whose storage form this resource converts to, if any.
    pub fn stored_as(&self) -> Option<(&'static str, &'static str, &'static str)> {
        match self.conversion {
            Conversion::None => None,
            Conversion::CoreEvent => Some(("events.k8s.io", "v1", "events")),
        }
    }

    /// A stored object as this resource serves it.
    pub fn present(&self, stored: Value) -> Value {
        match self.conversion {
            Conversion::None => stored,
            Conversion::CoreEvent => super::convert::event_to_core(&stored),
        }
    }

    /// A served object in its stored form.
    pub fn to_stored(&self, served: Value) -> Value {
        match self.conversion {
            Conversion::None => served,
            Conversion::CoreEvent => super::convert::core_to_event(&served),
        }
    }

    /// The verbs discovery advertises.
    pub fn verbs(&self) -> Vec<&'static str> {
        if self.review {
            return vec!["create"];
        }
        let mut verbs = vec!["create", "get", "list", "patch", "update", "watch"];
        if !self.undeletable {
            verbs.extend(["delete", "deletecollection"]);
        }
        verbs.sort_unstable();
        verbs
    }
}

/// Errors building the registry (a bug in the embedder's CRD, never user input).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the CustomResourceDefinition {0} has no served version")]
    NoVersion(String),
}

impl RegistryError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::NoVersion(_) => "CrdNoVersion",
        }
    }
}

/// Every served resource.
#[derive(Clone, Debug)]
pub struct Registry {
    pub resources: Vec<ResourceDef>,
    /// The CRDs of the custom resources, served under `apiextensions.k8s.io`.
    pub crds: Vec<Value>,
}

impl Registry {
    /// The built-in kinds plus the given custom resources.
    pub fn new(custom: &[CustomResource]) -> Result<Self, RegistryError> {
        let mut resources = Vec::new();
        for cr in custom {
            let mut def = custom_resource(&cr.crd)?;
            def.admission = cr.admission.clone().map(AdmissionHook);
            resources.push(def);
        }

        let mut namespaces = ResourceDef::builtin("", "v1", "Namespace", "namespaces", false)
            .with_field_labels(&["status.phase"]);
        namespaces.name_rule = NameRule::Label;
        namespaces.short_names = vec!["ns".into()];
        namespaces.status_subresource = true;
        namespaces.printer_columns = vec![
            PrinterColumn::new("Status", "string", ".status.phase"),
            PrinterColumn::new("Age", "date", ".metadata.creationTimestamp"),
        ];
        let mut nodes = ResourceDef::builtin("", "v1", "Node", "nodes", false)
            .with_field_labels(&["spec.unschedulable"]);
        nodes.short_names = vec!["no".into()];
        nodes.status_subresource = true;
        nodes.undeletable = true;
        nodes.printer_columns = vec![
            PrinterColumn::new(
                "Ready",
                "string",
                ".status.conditions[?(@.type==\"Ready\")].status",
            ),
            PrinterColumn::new("Age", "date", ".metadata.creationTimestamp"),
            PrinterColumn::new("Version", "string", ".status.nodeInfo.kubeletVersion"),
        ];
        let event_columns = vec![
            PrinterColumn::new("Type", "string", ".type"),
            PrinterColumn::new("Reason", "string", ".reason"),
            PrinterColumn::new("Age", "date", ".metadata.creationTimestamp"),
        ];
        let mut core_events = ResourceDef::builtin("", "v1", "Event", "events", true)
            .with_field_labels(&[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]);
        core_events.short_names = vec!["ev".into()];
        core_events.printer_columns = event_columns.clone();
        core_events
            .printer_columns
            .push(PrinterColumn::new("Message", "string", ".message"));
        core_events.conversion = Conversion::CoreEvent;
        let mut events = ResourceDef::builtin("events.k8s.io", "v1", "Event", "events", true)
            .with_field_labels(&[
                "regarding.kind",
                "regarding.namespace",
                "regarding.name",
                "regarding.uid",
                "regarding.apiVersion",
                "regarding.resourceVersion",
                "regarding.fieldPath",
                "reason",
                "reportingController",
                "type",
            ]);
        events.short_names = vec!["ev".into()];
        events.printer_columns = event_columns;
        events
            .printer_columns
            .push(PrinterColumn::new("Note", "string", ".note"));
        let mut leases = ResourceDef::builtin("coordination.k8s.io", "v1", "Lease", "leases", true);
        leases.printer_columns = vec![
            PrinterColumn::new("Holder", "string", ".spec.holderIdentity"),
            PrinterColumn::new("Age", "date", ".metadata.creationTimestamp"),
        ];
        let mut configmaps = ResourceDef::builtin("", "v1", "ConfigMap", "configmaps", true);
        configmaps.short_names = vec!["cm".into()];
        let mut secrets =
            ResourceDef::builtin("", "v1", "Secret", "secrets", true).with_field_labels(&["type"]);
        secrets.printer_columns = vec![
            PrinterColumn::new("Type", "string", ".type"),
            PrinterColumn::new("Age", "date", ".metadata.creationTimestamp"),
        ];
        let mut crds = ResourceDef::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        );
        crds.short_names = vec!["crd".into(), "crds".into()];
        crds.status_subresource = true;
        crds.generation = true;
        crds.undeletable = true;
        crds.printer_columns = vec![PrinterColumn::new(
            "Created At",
            "date",
            ".metadata.creationTimestamp",
        )];
        let review = |group: &str, kind: &str, plural: &str| {
            let mut def = ResourceDef::builtin(group, "v1", kind, plural, false);
            def.review = true;
            def.undeletable = true;
            def
        };
        resources.extend([
            review(
                "authorization.k8s.io",
                "SelfSubjectAccessReview",
                "selfsubjectaccessreviews",
            ),
            review(
                "authorization.k8s.io",
                "SelfSubjectRulesReview",
                "selfsubjectrulesreviews",
            ),
            review(
                "authentication.k8s.io",
                "SelfSubjectReview",
                "selfsubjectreviews",
            ),
            namespaces,
            nodes,
            core_events,
            events,
            leases,
            configmaps,
            secrets,
            crds,
        ]);
        for def in &mut resources {
            if def.printer_columns.is_empty() {
                def.printer_columns = vec![PrinterColumn::new(
                    "Age",
                    "date",
                    ".metadata.creationTimestamp",
                )];
            }
        }
        Ok(Registry {
            resources,
            crds: custom.iter().map(|c| c.crd.clone()).collect(),
        })
    }

    /// The resource served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceDef> {
        self.resources
            .iter()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
    }

    /// Every served `group/version`, core first.
    pub fn group_versions(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for r in &self.resources {
            let gv = (r.group.clone(), r.version.clone());
            if !out.contains(&gv) {
                out.push(gv);
            }
        }
        out.sort_by_key(|(g, _)| !g.is_empty());
        out
    }

    /// The resources of one `group/version`.
    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a ResourceDef> + 'a {
        self.resources
            .iter()
            .filter(move |r| r.group == group && r.version == version)
    }
}

/// Build the resource definition of a CRD's first served version.
fn custom_resource(crd: &Value) -> Result<ResourceDef, RegistryError> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let spec = &crd["spec"];
    let names = &spec["names"];
    let version = spec["versions"]
        .as_array()
        .and_then(|v| v.first())
        .ok_or_else(|| RegistryError::NoVersion(text(&crd["metadata"]["name"])))?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let printer_columns = version["additionalPrinterColumns"]
        .as_array()
        .map(|cols| {
            cols.iter()
                .map(|c| PrinterColumn {
                    name: text(&c["name"]),
                    type_: text(&c["type"]),
                    json_path: text(&c["jsonPath"]),
                    description: text(&c["description"]),
                    priority: c["priority"].as_i64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ResourceDef {
        group: text(&spec["group"]),
        version: text(&version["name"]),
        kind: text(&names["kind"]),
        plural: text(&names["plural"]),
        singular: text(&names["singular"]),
        short_names: strings(&names["shortNames"]),
        categories: strings(&names["categories"]),
        namespaced: spec["scope"] == "Namespaced",
        status_subresource: version["subresources"]["status"].is_object(),
        generation: true,
        custom: true,
        undeletable: false,
        printer_columns,
        conversion: Conversion::None,
        schema: version["schema"]["openAPIV3Schema"]
            .is_object()
            .then(|| std::sync::Arc::new(version["schema"]["openAPIV3Schema"].clone())),
        name_rule: NameRule::Subdomain,
        field_labels: version["selectableFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["jsonPath"].as_str())
            .map(|p| p.trim_start_matches('.').to_string())
            .collect(),
        unconditional_update: false,
        review: false,
        admission: None,
    })
}

/// A CRD shaped like the MicroVM one (printer columns, status, list-map conditions), for the
/// unit tests of this server, which knows no resource of its embedder.
#[cfg(test)]
pub(crate) fn test_crd() -> Value {
    serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget",
                "shortNames": ["wd"], "categories": ["all"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Node", "type": "string", "jsonPath": ".status.nodeName"},
                    {"name": "IP", "type": "string", "jsonPath": ".status.ipAddresses[0]"},
                    {"name": "Ready", "type": "string",
                        "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {
                        "size": {"type": "integer", "default": 1},
                        "resources": {"type": "object", "properties": {
                            "vcpus": {"type": "integer"}}}}},
                    "status": {"type": "object", "properties": {
                        "phase": {"type": "string"},
                        "conditions": {"type": "array", "x-kubernetes-list-type": "map",
                            "x-kubernetes-list-map-keys": ["type"],
                            "items": {"type": "object"}}}}}}}
            }]
        }
    })
}

/// The registry of the unit tests: the built-ins and [`test_crd`].
#[cfg(test)]
pub(crate) fn test_registry() -> Registry {
    let custom = CustomResource {
        crd: test_crd(),
        admission: None,
    };
    match Registry::new(&[custom]) {
        Ok(reg) => reg,
        Err(e) => panic!("test registry: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_resources_come_from_their_crd() {
        let reg = test_registry();
        let mvm = reg.find("example.com", "v1", "widgets").expect("widget");
        assert!(mvm.namespaced && mvm.status_subresource && mvm.custom);
        assert!(!mvm.unconditional_update);
        assert_eq!(mvm.short_names, vec!["wd".to_string()]);
        let cols: Vec<&str> = mvm
            .printer_columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Phase", "Node", "IP", "Ready", "Age"]);
        assert!(mvm.schema.is_some());
        assert_eq!(mvm.qualified(), "widgets.example.com");
        assert!(mvm.selectable("metadata.namespace") && !mvm.selectable("spec.size"));
    }

    #[test]
    fn core_group_comes_first_and_scopes_are_right() {
        let reg = test_registry();
        assert_eq!(reg.group_versions()[0], (String::new(), "v1".to_string()));
        assert!(!reg.find("", "v1", "namespaces").expect("ns").namespaced);
        assert!(
            reg.find("coordination.k8s.io", "v1", "leases")
                .expect("lease")
                .namespaced
        );
        assert!(reg.find("", "v1", "pods").is_none());
    }
}
