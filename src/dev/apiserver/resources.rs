//! The resource registry: every kind the dev server serves, as data. One generic store and one
//! set of handlers serve them all; what differs per kind (scope, status subresource, printer
//! columns, schema) lives here.

use kube::CustomResourceExt;
use serde_json::Value;

use crate::api::MicroVM;

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
    pub schema: Option<Value>,
    /// Served from another resource's storage, converted on the way in and out.
    pub conversion: Conversion,
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
        }
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
        let mut verbs = vec!["create", "get", "list", "patch", "update", "watch"];
        if !self.undeletable {
            verbs.extend(["delete", "deletecollection"]);
        }
        verbs.sort_unstable();
        verbs
    }
}

/// Errors building the registry (a bug in the Rust types, never user input).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("the MicroVM CRD cannot be encoded")]
    Encode(#[source] serde_json::Error),
    #[error("the MicroVM CRD has no served version")]
    NoVersion,
}

impl RegistryError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            RegistryError::Encode(_) => "CrdEncode",
            RegistryError::NoVersion => "CrdNoVersion",
        }
    }
}

/// Every served resource.
#[derive(Clone, Debug)]
pub struct Registry {
    pub resources: Vec<ResourceDef>,
    /// The MicroVM CRD as JSON, served under `apiextensions.k8s.io`.
    pub microvm_crd: Value,
}

impl Registry {
    /// The dev server's fixed set of resources.
    pub fn new() -> Result<Self, RegistryError> {
        let crd = serde_json::to_value(MicroVM::crd()).map_err(RegistryError::Encode)?;
        let mut resources = vec![custom_resource(&crd)?];

        let mut namespaces = ResourceDef::builtin("", "v1", "Namespace", "namespaces", false);
        namespaces.short_names = vec!["ns".into()];
        namespaces.status_subresource = true;
        namespaces.printer_columns = vec![
            PrinterColumn::new("Status", "string", ".status.phase"),
            PrinterColumn::new("Age", "date", ".metadata.creationTimestamp"),
        ];
        let mut nodes = ResourceDef::builtin("", "v1", "Node", "nodes", false);
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
        let mut core_events = ResourceDef::builtin("", "v1", "Event", "events", true);
        core_events.short_names = vec!["ev".into()];
        core_events.printer_columns = event_columns.clone();
        core_events
            .printer_columns
            .push(PrinterColumn::new("Message", "string", ".message"));
        core_events.conversion = Conversion::CoreEvent;
        let mut events = ResourceDef::builtin("events.k8s.io", "v1", "Event", "events", true);
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
        let mut secrets = ResourceDef::builtin("", "v1", "Secret", "secrets", true);
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
        resources.extend([
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
            microvm_crd: crd,
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
    let spec = &crd["spec"];
    let names = &spec["names"];
    let version = spec["versions"]
        .as_array()
        .and_then(|v| v.first())
        .ok_or(RegistryError::NoVersion)?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
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
            .then(|| version["schema"]["openAPIV3Schema"].clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microvm_comes_from_the_crd() {
        let reg = Registry::new().expect("registry");
        let mvm = reg.find("ignis.dev", "v1alpha1", "microvms").expect("mvm");
        assert!(mvm.namespaced && mvm.status_subresource && mvm.custom);
        assert_eq!(mvm.short_names, vec!["mvm".to_string()]);
        let cols: Vec<&str> = mvm
            .printer_columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(cols, ["Phase", "Node", "IP", "Ready", "Age"]);
        assert!(mvm.schema.is_some());
        assert_eq!(mvm.qualified(), "microvms.ignis.dev");
    }

    #[test]
    fn core_group_comes_first_and_scopes_are_right() {
        let reg = Registry::new().expect("registry");
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
