//! `counter`: increments add up. `{"$inc": n}` adds n; a plain integer sets the counter by
//! adding the difference from the value this writer sees, so concurrent increments
//! elsewhere still count.
//!
//! Increments without an operation id are Automerge counter increments on the root field.
//! Increments with one are kept as `_inc.<field>.<op id> = delta` and summed by the view,
//! so the same operation applied on several replicas, or retried, counts once.
//! Arithmetic is checked (`crate::numeric`): a write that would take the counter out of
//! ±(2^53−1) is refused naming the field.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{hydrate, AutoCommit, ObjType, ReadDoc, ScalarValue, TextEncoding, Value, ROOT};
use serde_json::Value as Json;

use super::{misfit, no_operator, Input, Semantics, Values, Write};
use crate::entity::layout::{map_objects, K_INC};
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Counter;

impl Semantics for Counter {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        match input {
            Input::Op("$inc", Json::Number(n)) => {
                crate::numeric::counter_arg(field, n).map(FieldOp::Inc)
            }
            Input::Op("$inc", arg) => Err(Error::Patch(format!(
                "field {field:?}: $inc takes an integer, got {}",
                describe(arg)
            ))),
            Input::Op(op, _) => Err(no_operator(field, rule, op)),
            Input::Plain(Json::Null) => Err(Error::Patch(format!(
                "field {field:?} is a counter and cannot be removed; use {{\"$inc\": n}}"
            ))),
            Input::Plain(v @ Json::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
                crate::numeric::counter_arg(field, n)?;
                Ok(FieldOp::Set(v.clone()))
            }
            Input::Plain(v) => Err(misfit(field, rule, "an integer or {\"$inc\": n}", v)),
        }
    }

    fn initial(&self, op: Option<&FieldOp>, _: TextEncoding) -> Option<hydrate::Value> {
        // No container until the first write: concurrent first writes make several root
        // counters, and the view sums them all.
        match op? {
            FieldOp::Set(v) => Some(ScalarValue::counter(v.as_i64().unwrap_or(0)).into()),
            FieldOp::Inc(n) => Some(ScalarValue::counter(*n).into()),
            _ => None,
        }
    }

    fn write(&self, w: &mut Write<'_>, op: &FieldOp) -> Result<(), Error> {
        let current = current(w.doc, w.field);
        let delta = match op {
            FieldOp::Inc(n) => *n,
            FieldOp::Set(v) => {
                crate::numeric::counter_delta(w.field, current, v.as_i64().unwrap_or(0))?
            }
            other => {
                return Err(Error::Patch(format!(
                    "field {:?} (rule counter) does not take {other:?}",
                    w.field
                )))
            }
        };
        crate::numeric::counter_add(w.field, current, delta)?;
        match w.op_id {
            Some(op_id) => put_delta(w.doc, w.field, op_id, delta),
            None => increment(w.doc, w.field, delta),
        }
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        Some(Json::from(sum_with_deltas(
            values.doc,
            values.field,
            values.all,
        )))
    }

    fn conflict(&self) -> Option<ConflictState> {
        None
    }
}

fn describe(v: &Json) -> String {
    match v {
        Json::Number(n) => format!("{n}"),
        other => crate::entity::json::kind(other).to_owned(),
    }
}

/// The counter's value as this writer sees it.
fn current(doc: &AutoCommit, field: &str) -> i64 {
    sum_with_deltas(
        doc,
        field,
        &doc.get_all(ROOT, field)
            .unwrap_or_default()
            .into_iter()
            .map(|(v, id)| (v.into_owned(), id))
            .collect::<Vec<_>>(),
    )
}

fn increment(doc: &mut AutoCommit, field: &str, n: i64) -> Result<(), Error> {
    match doc.get(ROOT, field).map_err(Error::automerge)? {
        Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
            doc.increment(ROOT, field, n).map_err(Error::automerge)
        }
        // The first write of the field makes its counter.
        _ => doc
            .put(ROOT, field, ScalarValue::counter(n))
            .map_err(Error::automerge),
    }
}

fn put_delta(doc: &mut AutoCommit, field: &str, op_id: &str, delta: i64) -> Result<(), Error> {
    let inc = match doc.get(ROOT, K_INC).map_err(Error::automerge)? {
        Some((Value::Object(ObjType::Map), id)) => id,
        _ => doc
            .put_object(ROOT, K_INC, ObjType::Map)
            .map_err(Error::automerge)?,
    };
    let per_field = match doc.get(&inc, field).map_err(Error::automerge)? {
        Some((Value::Object(ObjType::Map), id)) => id,
        _ => doc
            .put_object(&inc, field, ObjType::Map)
            .map_err(Error::automerge)?,
    };
    doc.put(&per_field, op_id, delta).map_err(Error::automerge)
}

/// Increments kept by operation id for `field` (op id → delta), the union over concurrent
/// copies of the maps; an op id stored twice (two replicas applied it) counts once.
pub(crate) fn delta_entries(doc: &AutoCommit, field: &str) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for inc in map_objects(doc, &ROOT, K_INC) {
        for per_field in map_objects(doc, &inc, field) {
            for key in doc.keys(&per_field) {
                if out.contains_key(&key) {
                    continue;
                }
                if let Ok(Some((Value::Scalar(s), _))) = doc.get(&per_field, key.as_str()) {
                    if let ScalarValue::Int(d) = s.as_ref() {
                        out.insert(key, *d);
                    }
                }
            }
        }
    }
    out
}

/// The counter's value: its concurrent root counters plus the increments kept by op id,
/// summed wide and clamped so replicas agree even where concurrent increments overflow.
pub(crate) fn sum_with_deltas(
    doc: &AutoCommit,
    field: &str,
    root: &[(Value<'_>, automerge::ObjId)],
) -> i64 {
    let counters: i128 = root.iter().map(|(v, _)| counter_value(v) as i128).sum();
    let deltas: i128 = delta_entries(doc, field).values().map(|d| *d as i128).sum();
    (counters + deltas).clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

fn counter_value(v: &Value<'_>) -> i64 {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Counter(c) => i64::from(c),
            ScalarValue::Int(i) => *i,
            _ => 0,
        },
        _ => 0,
    }
}
