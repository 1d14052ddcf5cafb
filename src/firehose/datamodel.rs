//! The atproto data model's rules beyond DAG-CBOR, checked on records of collections without a
//! typed schema: no floats, `$type` (where present) a non-empty string, blobs well formed.
//! Also the atproto JSON form → data model, used by the interop vector tests.

use base64::Engine;
use ipld_core::ipld::Ipld;

/// Why a value is outside the atproto data model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DataModelError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, DataModelError> {
    Err(DataModelError(msg.into()))
}

/// Checks a record (or any value inside one) against the data model.
pub fn check(v: &Ipld) -> Result<(), DataModelError> {
    match v {
        Ipld::Float(f) => err(format!("float {f} (the data model has no floats)")),
        Ipld::List(items) => items.iter().try_for_each(check),
        Ipld::Map(m) => {
            match m.get("$type") {
                None => {}
                Some(Ipld::String(t)) if t == "blob" => check_blob(m)?,
                Some(Ipld::String(t)) if !t.is_empty() => {}
                Some(other) => {
                    return err(format!("$type must be a non-empty string, got {other:?}"))
                }
            }
            m.values().try_for_each(check)
        }
        _ => Ok(()),
    }
}

fn check_blob(m: &std::collections::BTreeMap<String, Ipld>) -> Result<(), DataModelError> {
    match (m.get("ref"), m.get("mimeType"), m.get("size")) {
        (Some(Ipld::Link(_)), Some(Ipld::String(_)), Some(Ipld::Integer(_))) => Ok(()),
        _ => err("blob needs ref (link), mimeType (string) and size (integer)"),
    }
}

/// The atproto JSON form of a record (`{"$link"}`, `{"$bytes"}`) → a data-model value.
pub fn from_json(v: &serde_json::Value) -> Result<Ipld, DataModelError> {
    use serde_json::Value;
    Ok(match v {
        Value::Null => Ipld::Null,
        Value::Bool(b) => Ipld::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Ipld::Integer(i.into()),
            (_, Some(u), _) => Ipld::Integer(u.into()),
            // JSON cannot tell 123.0 from 123: integer-like floats are integers.
            (_, _, Some(f)) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                Ipld::Integer((f as i64).into())
            }
            (_, _, Some(f)) => Ipld::Float(f),
            _ => return err("unrepresentable number"),
        },
        Value::String(s) => Ipld::String(s.clone()),
        Value::Array(a) => Ipld::List(a.iter().map(from_json).collect::<Result<_, _>>()?),
        Value::Object(o) => {
            if let Some(link) = o.get("$link") {
                let Some(s) = link.as_str().filter(|_| o.len() == 1) else {
                    return err("$link must be the only key and a string");
                };
                return s
                    .parse()
                    .map(Ipld::Link)
                    .map_err(|e| DataModelError(format!("$link: {e}")));
            }
            if let Some(bytes) = o.get("$bytes") {
                let Some(s) = bytes.as_str().filter(|_| o.len() == 1) else {
                    return err("$bytes must be the only key and a string");
                };
                return base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(s.trim_end_matches('='))
                    .map(Ipld::Bytes)
                    .map_err(|e| DataModelError(format!("$bytes: {e}")));
            }
            Ipld::Map(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), from_json(v)?)))
                    .collect::<Result<_, DataModelError>>()?,
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors(name: &str) -> Vec<serde_json::Value> {
        let path = format!(
            "{}/fixtures/interop/data-model/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    /// A top-level data-model value must be an object.
    fn accept(v: &serde_json::Value) -> Result<(), DataModelError> {
        let ipld = from_json(v)?;
        if !matches!(ipld, Ipld::Map(_)) {
            return err("top level is not an object");
        }
        check(&ipld)
    }

    #[test]
    fn interop_data_model_valid_and_invalid() {
        let valid = vectors("data-model-valid.json");
        let invalid = vectors("data-model-invalid.json");
        assert!(!valid.is_empty() && !invalid.is_empty());
        for v in valid {
            assert!(
                accept(&v["json"]).is_ok(),
                "{}: {:?}",
                v["note"],
                accept(&v["json"])
            );
        }
        for v in invalid {
            assert!(accept(&v["json"]).is_err(), "{} accepted", v["note"]);
        }
    }

    #[test]
    fn round_trips_the_fixtures_json_form() {
        for f in vectors("data-model-fixtures.json") {
            let ipld = from_json(&f["json"]).unwrap();
            assert_eq!(crate::firehose::record::ipld_to_json(&ipld), f["json"]);
        }
    }
}
