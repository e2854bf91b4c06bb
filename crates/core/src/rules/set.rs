//! `set`: an add-wins set of scalars. The field is a map from each element's canonical JSON
//! to an integer marker; a remove deletes only the adds it has seen, so an add concurrent
//! with a remove survives. Every add writes a fresh marker (one above any stored), because
//! Automerge drops a put of the value already there and a re-add must count as new.
//! Concurrent first writes make several maps; the view is the union of all of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::transaction::Transactable;
use automerge::{
    hydrate, AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, TextEncoding, Value, ROOT,
};
use serde_json::Value as Json;

use super::{misfit, no_operator, Input, Semantics, Values, Write};
use crate::entity::json::kind;
use crate::entity::layout::{map_objects, next_marker};
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Set;

impl Semantics for Set {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        match input {
            Input::Op("$add", arg) => Ok(FieldOp::Add(elements(field, arg)?)),
            Input::Op("$remove", arg) => Ok(FieldOp::RemoveElems(elements(field, arg)?)),
            Input::Op(op, _) => Err(no_operator(field, rule, op)),
            Input::Plain(Json::Null) => Err(Error::Patch(format!(
                "field {field:?} is a set and cannot be removed; use {{\"$remove\": [..]}}"
            ))),
            Input::Plain(v @ Json::Array(_)) => Ok(FieldOp::Set(Json::Array(elements(field, v)?))),
            Input::Plain(v) => Err(misfit(
                field,
                rule,
                "an array of strings, numbers or booleans, {\"$add\": [..]} or {\"$remove\": [..]}",
                v,
            )),
        }
    }

    fn initial(&self, op: Option<&FieldOp>, _: TextEncoding) -> Option<hydrate::Value> {
        let (FieldOp::Set(Json::Array(items)) | FieldOp::Add(items)) = op? else {
            return None;
        };
        let members: HashMap<String, hydrate::Value> = items
            .iter()
            .map(|i| (element_key(i), ScalarValue::Int(1).into()))
            .collect();
        Some(hydrate::Value::Map(members.into()))
    }

    fn write(&self, w: &mut Write<'_>, op: &FieldOp) -> Result<(), Error> {
        match op {
            FieldOp::Add(items) => add(w.doc, w.field, items),
            FieldOp::RemoveElems(items) => remove(w.doc, w.field, items),
            FieldOp::Set(Json::Array(items)) => {
                let wanted: BTreeSet<String> = items.iter().map(element_key).collect();
                let gone: Vec<Json> = members(w.doc, w.field)
                    .into_iter()
                    .filter(|(k, _)| !wanted.contains(k))
                    .map(|(_, v)| v)
                    .collect();
                remove(w.doc, w.field, &gone)?;
                add(w.doc, w.field, items)
            }
            other => Err(Error::Patch(format!(
                "field {:?} (rule set) does not take {other:?}",
                w.field
            ))),
        }
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        let mut out = BTreeMap::new();
        for (v, obj) in values.all {
            if matches!(v, Value::Object(ObjType::Map)) {
                collect(values.doc, obj, &mut out);
            }
        }
        Some(Json::Array(out.into_values().collect()))
    }

    fn conflict(&self) -> Option<ConflictState> {
        None
    }
}

fn elements(field: &str, arg: &Json) -> Result<Vec<Json>, Error> {
    let Json::Array(items) = arg else {
        return Err(Error::Patch(format!(
            "field {field:?}: set operations take an array, got {}",
            kind(arg)
        )));
    };
    if let Some(bad) = items
        .iter()
        .find(|i| !matches!(i, Json::String(_) | Json::Number(_) | Json::Bool(_)))
    {
        return Err(Error::Patch(format!(
            "field {field:?}: set elements must be strings, numbers or booleans, got {}",
            kind(bad)
        )));
    }
    Ok(items.clone())
}

/// The canonical key of a set element: its JSON text, integers without a fraction.
pub(crate) fn element_key(v: &Json) -> String {
    match v {
        Json::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => (f as i64).to_string(),
            _ => v.to_string(),
        },
        _ => v.to_string(),
    }
}

pub(super) fn collect(doc: &AutoCommit, obj: &ObjId, out: &mut BTreeMap<String, Json>) {
    for k in doc.keys(obj) {
        if let Ok(j) = serde_json::from_str(&k) {
            out.insert(k, j);
        }
    }
}

/// Members (canonical key → element), the union over concurrent copies.
pub(super) fn members(doc: &AutoCommit, field: &str) -> BTreeMap<String, Json> {
    let mut out = BTreeMap::new();
    for obj in map_objects(doc, &ROOT, field) {
        collect(doc, &obj, &mut out);
    }
    out
}

pub(super) fn add(doc: &mut AutoCommit, field: &str, items: &[Json]) -> Result<(), Error> {
    let obj = match doc.get(ROOT, field).map_err(Error::automerge)? {
        Some((Value::Object(ObjType::Map), id)) => id,
        _ => doc
            .put_object(ROOT, field, ObjType::Map)
            .map_err(Error::automerge)?,
    };
    for item in items {
        let key = element_key(item);
        let marker = next_marker(doc, &obj, &key);
        doc.put(&obj, key, marker).map_err(Error::automerge)?;
    }
    Ok(())
}

pub(super) fn remove(doc: &mut AutoCommit, field: &str, items: &[Json]) -> Result<(), Error> {
    // Remove from every concurrent copy of the set: the remove has seen them all.
    for obj in map_objects(doc, &ROOT, field) {
        for item in items {
            let key = element_key(item);
            if doc
                .get(&obj, key.as_str())
                .map_err(Error::automerge)?
                .is_some()
            {
                doc.delete(&obj, key.as_str()).map_err(Error::automerge)?;
            }
        }
    }
    Ok(())
}
