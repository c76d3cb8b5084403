//! The objects the server itself owns, created or refreshed at every start: the protected
//! namespaces, the one Node, and the CRDs of the registered custom resources.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::errors::ApiError;
use super::resources::ResourceDef;
use super::server::{Server, WriteOptions};
use super::store::EventType;
use super::{ApiServerConfig, PROTECTED_NAMESPACES, discovery, meta};

/// The Node object for this machine.
fn node_object(config: &ApiServerConfig) -> Value {
    let mut labels: BTreeMap<String, String> = BTreeMap::from([
        ("kubernetes.io/hostname".into(), config.node_name.clone()),
        ("kubernetes.io/arch".into(), discovery::arch().into()),
        ("kubernetes.io/os".into(), std::env::consts::OS.into()),
    ]);
    labels.extend(config.node_labels.clone());
    let capacity = json!({
        "cpu": config.node_vcpus.to_string(),
        "memory": format!("{}Ki", config.node_memory_bytes / 1024),
        "pods": "0",
    });
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": config.node_name, "labels": labels},
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "IgnisDevReady",
                "message": "ignis dev runs this node",
                "lastHeartbeatTime": meta::now(), "lastTransitionTime": meta::now(),
            }],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": config.node_name},
            ],
            "nodeInfo": {
                "architecture": discovery::arch(),
                "operatingSystem": std::env::consts::OS,
                "kubeletVersion": format!("ignis-dev-{}", crate::VERSION),
                "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": "",
            },
        },
    })
}

/// Create or refresh the objects the server itself owns: namespaces, the Node, the CRD.
pub(crate) fn seed(server: &Server, config: &ApiServerConfig) -> Result<(), ApiError> {
    let opts = WriteOptions::default();
    let find = |g: &str, p: &str| {
        server
            .registry
            .find(g, "v1", p)
            .cloned()
            .ok_or(ApiError::NoSuchPath)
    };
    let namespaces = find("", "namespaces")?;
    for ns in PROTECTED_NAMESPACES {
        if matches!(
            server.get(&namespaces, "", ns),
            Err(ApiError::NotFound { .. })
        ) {
            server.create(&namespaces, "", json!({"metadata": {"name": ns}}), &opts)?;
        }
    }
    let upsert = |def: &ResourceDef, desired: Value| -> Result<(), ApiError> {
        let name = desired["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match server.get(def, "", &name) {
            Err(ApiError::NotFound { .. }) => {
                server.create(def, "", desired.clone(), &opts)?;
            }
            Err(other) => return Err(other),
            Ok(_) => {}
        }
        // Refresh everything but identity, directly in the store: these objects are ours.
        let mut live = server.get(def, "", &name)?;
        let mut changed = false;
        for part in ["spec", "status"] {
            if live.get(part) != desired.get(part) {
                live[part] = desired[part].clone();
                changed = true;
            }
        }
        if live["metadata"]["labels"] != desired["metadata"]["labels"] {
            live["metadata"]["labels"] = desired["metadata"]["labels"].clone();
            changed = true;
        }
        if changed {
            let mut store = server.lock();
            let event = store
                .write(&def.storage_key(), "", &name, EventType::Modified, live)
                .map_err(|e| ApiError::internal("refreshing a built-in object", e))?;
            server.hub.publish(event);
        }
        Ok(())
    };
    let mut node = node_object(config);
    // The heartbeat times would make every start a change; keep the stored ones if present.
    if let Ok(live) = server.get(&find("", "nodes")?, "", &config.node_name)
        && live["status"]["conditions"][0]["status"] == "True"
    {
        node["status"]["conditions"] = live["status"]["conditions"].clone();
    }
    upsert(&find("", "nodes")?, node)?;
    let crds = find("apiextensions.k8s.io", "customresourcedefinitions")?;
    for crd in &server.registry.crds {
        let mut crd = crd.clone();
        let served: Vec<Value> = crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["storage"] == true)
            .map(|v| v["name"].clone())
            .collect();
        crd["status"] = json!({
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
            ],
            "acceptedNames": crd["spec"]["names"].clone(),
            "storedVersions": served,
        });
        upsert(&crds, crd)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_reports_labels_and_capacity() {
        let mut config = ApiServerConfig::new("/nonexistent");
        config.node_name = "n1".into();
        config.node_vcpus = 4;
        config.node_memory_bytes = 8 << 30;
        config
            .node_labels
            .insert("ignis.dev/kvm".into(), "false".into());
        let node = node_object(&config);
        assert_eq!(node["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        assert_eq!(node["metadata"]["labels"]["ignis.dev/kvm"], "false");
        assert_eq!(node["status"]["capacity"]["cpu"], "4");
        assert_eq!(node["status"]["capacity"]["memory"], "8388608Ki");
    }
}
