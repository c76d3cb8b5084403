//! Request bodies, bounded before they are parsed: at most [`MAX_BODY`] bytes (read with that
//! limit, so a larger body is never buffered whole) and at most [`MAX_DEPTH`] levels of
//! nesting (a linear scan refuses a deeper body before any parser recurses into it). JSON is
//! decoded noting duplicate keys, which `fieldValidation=Strict` refuses; YAML is read only
//! when the `Content-Type` says so, protobuf only for the kinds `protobuf.rs` knows.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::errors::ApiError;
use super::protobuf;

/// Largest request body accepted (the real server's limit, 3 MiB).
pub(crate) const MAX_BODY: usize = 3 * 1024 * 1024;

/// Deepest nesting accepted. The real server accepts up to 10 000 levels; this one stops at
/// the depth its parser handles without risking its stack (no real object comes near it).
pub(crate) const MAX_DEPTH: usize = 100;

/// What a body is, by its `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Yaml,
    Protobuf,
}

/// Media types an object body may have, for the 415 message.
pub(crate) const ACCEPTED: &str =
    "application/json, application/yaml, application/vnd.kubernetes.protobuf";

impl Format {
    /// Classify a `Content-Type`; None for anything the server does not decode.
    pub(crate) fn of(content_type: &str) -> Option<Self> {
        let mime = content_type.split(';').next().unwrap_or_default().trim();
        match mime.to_ascii_lowercase().as_str() {
            "application/json" | "" => Some(Format::Json),
            "application/yaml" => Some(Format::Yaml),
            "application/vnd.kubernetes.protobuf" => Some(Format::Protobuf),
            _ => None,
        }
    }
}

/// A decoded body and the keys it repeated (dotted paths).
#[derive(Debug, Default)]
pub(crate) struct Decoded {
    pub value: Value,
    pub duplicates: Vec<String>,
}

/// Refuse a body nested deeper than [`MAX_DEPTH`], counting brackets outside strings (JSON,
/// YAML flow style), in one pass and without allocating.
pub(crate) fn check_depth(body: &[u8]) -> Result<(), ApiError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, None::<u8>, false);
    for &b in body {
        if let Some(quote) = in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' && quote == b'"' {
                escaped = true;
            } else if b == quote {
                in_string = None;
            }
            continue;
        }
        match b {
            b'"' => in_string = Some(b'"'),
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(ApiError::BadRequest(format!(
                        "the request body is nested deeper than {MAX_DEPTH} levels"
                    )));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Decode an object body of the given format.
pub(crate) fn decode(body: &[u8], format: Format) -> Result<Decoded, ApiError> {
    match format {
        Format::Json => decode_json(body),
        Format::Yaml => decode_yaml(body).map(|value| Decoded {
            value,
            duplicates: Vec::new(),
        }),
        Format::Protobuf => protobuf::decode(body)
            .map(|value| Decoded {
                value,
                duplicates: Vec::new(),
            })
            .map_err(|e| {
                tracing::debug!(reason = e.reason(), "protobuf body refused");
                ApiError::UnsupportedMediaType {
                    accepted: format!("application/json, application/yaml ({e})"),
                }
            }),
    }
}

/// Decode JSON, noting repeated keys.
pub(crate) fn decode_json(body: &[u8]) -> Result<Decoded, ApiError> {
    check_depth(body)?;
    let mut duplicates = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = Tracked {
        path: String::new(),
        duplicates: &mut duplicates,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v))
    .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))?;
    Ok(Decoded { value, duplicates })
}

/// Decode YAML (one document).
pub(crate) fn decode_yaml(body: &[u8]) -> Result<Value, ApiError> {
    check_depth(body)?;
    serde_yaml::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("error converting YAML to JSON: {e}")))
}

/// Deserializes a `Value` while recording keys that appear twice in one object.
struct Tracked<'a> {
    path: String,
    duplicates: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Tracked<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Tracked<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        loop {
            let seed = Tracked {
                path: format!("{}[{}]", self.path, out.len()),
                duplicates: &mut *self.duplicates,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let seed = Tracked {
                path: path.clone(),
                duplicates: &mut *self.duplicates,
            };
            let value = map.next_value_seed(seed)?;
            if out.insert(key, value).is_some() {
                self.duplicates.push(path);
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_bodies_are_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let err = decode_json(deep.as_bytes()).expect_err("too deep");
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
        assert_eq!(err.code(), 400);
        assert!(decode_yaml(deep.as_bytes()).is_err());
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(decode_json(ok.as_bytes()).is_ok());
        // Brackets inside strings do not count.
        let quoted = format!("{{\"a\": \"{}\\\"[\"}}", "[".repeat(500));
        assert!(decode_json(quoted.as_bytes()).is_ok());
    }

    #[test]
    fn duplicate_keys_are_noted_with_their_path() {
        let d = decode_json(
            br#"{"metadata": {"labels": {"a": "1", "a": "2"}}, "k": [{"x": 1, "x": 2}]}"#,
        )
        .expect("valid");
        assert_eq!(d.duplicates, ["metadata.labels.a", "k[0].x"]);
        assert_eq!(d.value["metadata"]["labels"]["a"], "2");
        assert!(decode_json(b"{} {}").is_err());
    }

    #[test]
    fn content_types_pick_the_format() {
        assert_eq!(
            Format::of("application/json; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(Format::of("application/yaml"), Some(Format::Yaml));
        assert_eq!(
            Format::of("application/vnd.kubernetes.protobuf"),
            Some(Format::Protobuf)
        );
        assert_eq!(Format::of("text/plain"), None);
    }
}
