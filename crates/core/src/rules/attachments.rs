//! `attachments`: an add-wins set of file references `{hash, size, mime, name}` (see
//! [`crate::attachment`]). It is the `set` rule with references as elements: each
//! reference's canonical JSON text is its key, so concurrent adds on two replicas both
//! stay and an add concurrent with a remove survives. `$remove` takes references or bare
//! hashes (a hash removes every reference to those bytes). The bytes are not here: a node
//! writes a reference only once the blob is in its own store (the replica checks that).

use automerge::{hydrate, TextEncoding};
use serde_json::Value as Json;

use super::set;
use super::{misfit, no_operator, Input, Semantics, Values, Write};
use crate::attachment::{is_hash, Reference};
use crate::entity::json::kind;
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Attachments;

impl Semantics for Attachments {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        match input {
            Input::Op("$add", arg) => Ok(FieldOp::Add(references(field, arg)?)),
            Input::Op("$remove", arg) => Ok(FieldOp::RemoveElems(removals(field, arg)?)),
            Input::Op(op, _) => Err(no_operator(field, rule, op)),
            Input::Plain(Json::Null) => Err(Error::Patch(format!(
                "field {field:?} holds attachments and cannot be removed; use {{\"$remove\": [hash or reference, ..]}}"
            ))),
            Input::Plain(v @ Json::Array(_)) => {
                Ok(FieldOp::Set(Json::Array(references(field, v)?)))
            }
            Input::Plain(v) => Err(misfit(
                field,
                rule,
                "an array of references {hash, size, mime, name}, {\"$add\": [..]} or {\"$remove\": [..]}",
                v,
            )),
        }
    }

    fn initial(&self, op: Option<&FieldOp>, encoding: TextEncoding) -> Option<hydrate::Value> {
        set::Set.initial(op, encoding)
    }

    fn write(&self, w: &mut Write<'_>, op: &FieldOp) -> Result<(), Error> {
        match op {
            FieldOp::RemoveElems(items) => {
                // A bare hash stands for every reference to those bytes.
                let hashes: Vec<&str> = items.iter().filter_map(Json::as_str).collect();
                let mut gone: Vec<Json> = items.iter().filter(|i| i.is_object()).cloned().collect();
                gone.extend(
                    set::members(w.doc, w.field)
                        .into_values()
                        .filter(|m| m["hash"].as_str().is_some_and(|h| hashes.contains(&h))),
                );
                set::remove(w.doc, w.field, &gone)
            }
            other => set::Set.write(w, other),
        }
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        set::Set.merged(values)
    }

    fn conflict(&self) -> Option<ConflictState> {
        None
    }
}

/// The checked references of an array, each in its canonical form.
fn references(field: &str, arg: &Json) -> Result<Vec<Json>, Error> {
    let Json::Array(items) = arg else {
        return Err(Error::Patch(format!(
            "field {field:?}: attachment operations take an array, got {}",
            kind(arg)
        )));
    };
    items
        .iter()
        .map(|i| Reference::from_json(field, i).map(|r| r.to_json()))
        .collect()
}

/// What `$remove` takes: references (canonical) or hashes.
fn removals(field: &str, arg: &Json) -> Result<Vec<Json>, Error> {
    let Json::Array(items) = arg else {
        return Err(Error::Patch(format!(
            "field {field:?}: $remove takes an array of hashes or references, got {}",
            kind(arg)
        )));
    };
    items
        .iter()
        .map(|i| match i {
            Json::String(h) if is_hash(h) => Ok(i.clone()),
            Json::String(h) => Err(Error::Patch(format!(
                "field {field:?}: {:?} is not an attachment hash (64 lowercase hex characters)",
                h.chars().take(80).collect::<String>()
            ))),
            other => Reference::from_json(field, other).map(|r| r.to_json()),
        })
        .collect()
}
