//! Conversion between Automerge values and JSON.

use std::collections::HashMap;

use automerge::transaction::Transactable;
use automerge::{hydrate, AutoCommit, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value};
use serde_json::{Map, Value as Json};

pub(crate) fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(t) => Json::String(t.to_string()),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(b) => Json::String(hex::encode(b)),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// Reads a value (recursively for objects) as JSON.
pub(crate) fn to_json(doc: &AutoCommit, v: &Value<'_>, id: &ObjId) -> Json {
    match v {
        Value::Scalar(s) => scalar_to_json(s),
        Value::Object(ObjType::Map | ObjType::Table) => {
            let mut m = Map::new();
            for k in doc.keys(id) {
                if let Ok(Some((cv, cid))) = doc.get(id, k.as_str()) {
                    m.insert(k, to_json(doc, &cv, &cid));
                }
            }
            Json::Object(m)
        }
        Value::Object(ObjType::List) => Json::Array(
            (0..doc.length(id))
                .filter_map(|i| doc.get(id, i).ok().flatten())
                .map(|(cv, cid)| to_json(doc, &cv, &cid))
                .collect(),
        ),
        Value::Object(ObjType::Text) => Json::String(doc.text(id).unwrap_or_default()),
    }
}

pub(crate) fn json_scalar(v: &Json) -> ScalarValue {
    match v {
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => ScalarValue::Int(i),
            (None, Some(u)) => ScalarValue::Uint(u),
            _ => ScalarValue::F64(n.as_f64().unwrap_or(0.0)),
        },
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        _ => ScalarValue::Null,
    }
}

/// A JSON value as an Automerge value tree, for batch insertion at creation.
pub(crate) fn json_hydrate(v: &Json) -> hydrate::Value {
    match v {
        Json::Object(m) => {
            let map: HashMap<String, hydrate::Value> = m
                .iter()
                .map(|(k, v)| (k.clone(), json_hydrate(v)))
                .collect();
            hydrate::Value::Map(map.into())
        }
        Json::Array(a) => {
            hydrate::Value::List(a.iter().map(json_hydrate).collect::<Vec<_>>().into())
        }
        scalar => json_scalar(scalar).into(),
    }
}

/// Writes a JSON value at `prop` of `obj`, nested objects and arrays as Automerge objects.
pub(crate) fn put_json(
    doc: &mut AutoCommit,
    obj: &ObjId,
    prop: Prop,
    v: &Json,
) -> Result<(), automerge::AutomergeError> {
    let child = match v {
        Json::Object(_) => ObjType::Map,
        Json::Array(_) => ObjType::List,
        scalar => {
            return match prop {
                Prop::Map(k) => doc.put(obj, k, json_scalar(scalar)),
                Prop::Seq(i) => doc.insert(obj, i, json_scalar(scalar)),
            }
        }
    };
    let new = match prop {
        Prop::Map(k) => doc.put_object(obj, k, child)?,
        Prop::Seq(i) => doc.insert_object(obj, i, child)?,
    };
    match v {
        Json::Object(m) => m
            .iter()
            .try_for_each(|(k, cv)| put_json(doc, &new, Prop::Map(k.clone()), cv)),
        Json::Array(a) => a
            .iter()
            .enumerate()
            .try_for_each(|(i, cv)| put_json(doc, &new, Prop::Seq(i), cv)),
        _ => Ok(()),
    }
}

/// The text of a string scalar at `obj.key`.
pub(crate) fn scalar_str(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
            ScalarValue::Str(t) => Some(t.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// Orders numbers; non-numbers sort as NaN.
pub(crate) fn cmp_num(a: &Json, b: &Json) -> std::cmp::Ordering {
    let (x, y) = (
        a.as_f64().unwrap_or(f64::NAN),
        b.as_f64().unwrap_or(f64::NAN),
    );
    x.total_cmp(&y)
}

/// The JSON kind of a value, for error messages.
pub(crate) fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}
