//! Just enough of the Kubernetes protobuf encoding to accept what client-go's typed clients send
//! (kubectl, Helm): the `k8s\0` envelope, ObjectMeta's user-set fields, the Namespace,
//! ConfigMap and Secret bodies, and `DeleteOptions` (every typed delete, e.g. Helm's uninstall
//! deleting its release Secrets). Everything else is refused with 415, and answers are always
//! JSON (those clients accept both).

use serde_json::{Map, Value, json};

use super::tls::base64;

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtobufError {
    #[error("not a Kubernetes protobuf envelope")]
    NoEnvelope,
    #[error("truncated or malformed protobuf")]
    Malformed,
    #[error("protobuf bodies of {0} are not supported by the dev API server")]
    Unsupported(String),
}

impl ProtobufError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProtobufError::NoEnvelope => "NoEnvelope",
            ProtobufError::Malformed => "Malformed",
            ProtobufError::Unsupported(_) => "Unsupported",
        }
    }
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, ProtobufError> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or(ProtobufError::Malformed)?;
        *pos += 1;
        out |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(out);
        }
    }
    Err(ProtobufError::Malformed)
}

fn fields(buf: &[u8]) -> Result<Vec<(u64, Field<'_>)>, ProtobufError> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(buf, &mut pos)?),
            1 => {
                pos += 8;
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?)
                    .map_err(|_| ProtobufError::Malformed)?;
                let end = pos.checked_add(len).ok_or(ProtobufError::Malformed)?;
                let bytes = buf.get(pos..end).ok_or(ProtobufError::Malformed)?;
                pos = end;
                Field::Bytes(bytes)
            }
            5 => {
                pos += 4;
                Field::Fixed
            }
            _ => return Err(ProtobufError::Malformed),
        };
        if pos > buf.len() {
            return Err(ProtobufError::Malformed);
        }
        out.push((key >> 3, field));
    }
    Ok(out)
}

fn text(bytes: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(bytes).into_owned())
}

/// A `map<string, string|bytes>` entry.
fn map_entry(bytes: &[u8], binary: bool) -> Result<(String, Value), ProtobufError> {
    let mut key = String::new();
    let mut value = Value::String(String::new());
    for (n, f) in fields(bytes)? {
        match (n, f) {
            (1, Field::Bytes(b)) => key = String::from_utf8_lossy(b).into_owned(),
            (2, Field::Bytes(b)) => {
                value = if binary {
                    Value::String(base64(b))
                } else {
                    text(b)
                }
            }
            _ => {}
        }
    }
    Ok((key, value))
}

fn insert_entry(
    map: &mut Map<String, Value>,
    name: &str,
    bytes: &[u8],
    binary: bool,
) -> Result<(), ProtobufError> {
    let (k, v) = map_entry(bytes, binary)?;
    if let Value::Object(m) = map.entry(name).or_insert_with(|| Value::Object(Map::new())) {
        m.insert(k, v);
    }
    Ok(())
}

fn object_meta(bytes: &[u8]) -> Result<Value, ProtobufError> {
    let mut meta = Map::new();
    for (n, f) in fields(bytes)? {
        match (n, f) {
            (1, Field::Bytes(b)) => {
                meta.insert("name".into(), text(b));
            }
            (2, Field::Bytes(b)) => {
                meta.insert("generateName".into(), text(b));
            }
            (3, Field::Bytes(b)) => {
                meta.insert("namespace".into(), text(b));
            }
            (6, Field::Bytes(b)) => {
                meta.insert("resourceVersion".into(), text(b));
            }
            (11, Field::Bytes(b)) => insert_entry(&mut meta, "labels", b, false)?,
            (12, Field::Bytes(b)) => insert_entry(&mut meta, "annotations", b, false)?,
            (14, Field::Bytes(b)) => {
                let list = meta.entry("finalizers").or_insert_with(|| json!([]));
                if let Some(items) = list.as_array_mut() {
                    items.push(text(b));
                }
            }
            _ => {}
        }
    }
    Ok(Value::Object(meta))
}

/// Decode a protobuf request body of a supported core kind into its JSON form.
pub fn decode(body: &[u8]) -> Result<Value, ProtobufError> {
    let envelope = body
        .strip_prefix(b"k8s\0")
        .ok_or(ProtobufError::NoEnvelope)?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    for (n, f) in fields(envelope)? {
        match (n, f) {
            (1, Field::Bytes(type_meta)) => {
                for (m, g) in fields(type_meta)? {
                    match (m, g) {
                        (1, Field::Bytes(b)) => {
                            api_version = String::from_utf8_lossy(b).into_owned()
                        }
                        (2, Field::Bytes(b)) => kind = String::from_utf8_lossy(b).into_owned(),
                        _ => {}
                    }
                }
            }
            (2, Field::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    if kind == "DeleteOptions" && ["v1", "meta.k8s.io/v1"].contains(&api_version.as_str()) {
        return delete_options(raw);
    }
    if api_version != "v1" || !["Namespace", "ConfigMap", "Secret"].contains(&kind.as_str()) {
        return Err(ProtobufError::Unsupported(format!("{api_version} {kind}")));
    }
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!(kind));
    for (n, f) in fields(raw)? {
        match (kind.as_str(), n, f) {
            (_, 1, Field::Bytes(b)) => {
                out.insert("metadata".into(), object_meta(b)?);
            }
            ("ConfigMap", 2, Field::Bytes(b)) => insert_entry(&mut out, "data", b, false)?,
            ("ConfigMap", 3, Field::Bytes(b)) => insert_entry(&mut out, "binaryData", b, true)?,
            ("Secret", 2, Field::Bytes(b)) => insert_entry(&mut out, "data", b, true)?,
            ("Secret", 3, Field::Bytes(b)) => {
                out.insert("type".into(), text(b));
            }
            ("Secret", 4, Field::Bytes(b)) => insert_entry(&mut out, "stringData", b, false)?,
            ("ConfigMap", 4, Field::Varint(v)) | ("Secret", 5, Field::Varint(v)) => {
                out.insert("immutable".into(), json!(v != 0));
            }
            _ => {}
        }
    }
    Ok(Value::Object(out))
}

/// `metav1.DeleteOptions` in its JSON form.
fn delete_options(raw: &[u8]) -> Result<Value, ProtobufError> {
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!("meta.k8s.io/v1"));
    out.insert("kind".into(), json!("DeleteOptions"));
    for (n, f) in fields(raw)? {
        match (n, f) {
            // int64, two's complement in a varint.
            (1, Field::Varint(v)) => {
                out.insert("gracePeriodSeconds".into(), json!(v as i64));
            }
            (2, Field::Bytes(b)) => {
                let mut pre = Map::new();
                for (m, g) in fields(b)? {
                    match (m, g) {
                        (1, Field::Bytes(b)) => {
                            pre.insert("uid".into(), text(b));
                        }
                        (2, Field::Bytes(b)) => {
                            pre.insert("resourceVersion".into(), text(b));
                        }
                        _ => {}
                    }
                }
                out.insert("preconditions".into(), Value::Object(pre));
            }
            (3, Field::Varint(v)) => {
                out.insert("orphanDependents".into(), json!(v != 0));
            }
            (4, Field::Bytes(b)) => {
                out.insert("propagationPolicy".into(), text(b));
            }
            (5, Field::Bytes(b)) => {
                let list = out.entry("dryRun").or_insert_with(|| json!([]));
                if let Some(items) = list.as_array_mut() {
                    items.push(text(b));
                }
            }
            _ => {}
        }
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ld(field: u8, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![(field << 3) | 2, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn configmap_with_labels_decodes() {
        let label = [ld(1, b"app"), ld(2, b"web")].concat();
        let meta = [ld(1, b"c1"), ld(11, &label)].concat();
        let data = [ld(1, b"a"), ld(2, b"b")].concat();
        let raw = [ld(1, &meta), ld(2, &data)].concat();
        let type_meta = [ld(1, b"v1"), ld(2, b"ConfigMap")].concat();
        let body = [b"k8s\0".to_vec(), ld(1, &type_meta), ld(2, &raw)].concat();
        let obj = decode(&body).expect("decode");
        assert_eq!(obj["kind"], "ConfigMap");
        assert_eq!(obj["metadata"]["name"], "c1");
        assert_eq!(obj["metadata"]["labels"]["app"], "web");
        assert_eq!(obj["data"]["a"], "b");
    }

    #[test]
    fn delete_options_decode() {
        // What client-go sends for a delete with propagationPolicy and a uid precondition.
        let pre = ld(1, b"u-1");
        let raw = [ld(2, &pre), ld(4, b"Background"), vec![0x08, 0x1e]].concat();
        let type_meta = [ld(1, b"meta.k8s.io/v1"), ld(2, b"DeleteOptions")].concat();
        let body = [b"k8s\0".to_vec(), ld(1, &type_meta), ld(2, &raw)].concat();
        let opts = decode(&body).expect("decode");
        assert_eq!(opts["kind"], "DeleteOptions");
        assert_eq!(opts["preconditions"]["uid"], "u-1");
        assert_eq!(opts["propagationPolicy"], "Background");
        assert_eq!(opts["gracePeriodSeconds"], 30);
    }

    #[test]
    fn other_kinds_and_garbage_are_refused() {
        let type_meta = [ld(1, b"apps/v1"), ld(2, b"Deployment")].concat();
        let body = [b"k8s\0".to_vec(), ld(1, &type_meta)].concat();
        assert!(matches!(decode(&body), Err(ProtobufError::Unsupported(_))));
        assert!(matches!(decode(b"{}"), Err(ProtobufError::NoEnvelope)));
        assert!(matches!(
            decode(b"k8s\0\x0a\xff"),
            Err(ProtobufError::Malformed)
        ));
    }
}
