//! `lww`: the later write wins. Among concurrent values the one whose change has the latest
//! time wins; equal times fall back to Automerge's order (highest op id), so every replica
//! picks the same. Change times never go backwards along a node's causal history (see
//! `Entity::commit`), so a write that saw another always wins over it anyway.
//! `order = "actor"` keeps Automerge's own order (op counter, then actor id) instead.

use automerge::ReadDoc;
use serde_json::Value as Json;

use super::{parse_register, Input, Semantics, Values};
use crate::entity::json::to_json;
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Lww;
pub(crate) struct LwwByActor;

impl Semantics for Lww {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        parse_register(field, rule, input)
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        latest(values)
    }

    fn conflict(&self) -> Option<ConflictState> {
        Some(ConflictState::Auto)
    }
}

impl Semantics for LwwByActor {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        parse_register(field, rule, input)
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        values.winner()
    }

    fn conflict(&self) -> Option<ConflictState> {
        Some(ConflictState::Auto)
    }
}

/// The value written by the latest change; ties keep Automerge's order.
pub(crate) fn latest(values: &Values<'_>) -> Option<Json> {
    if values.all.len() < 2 {
        return values.winner();
    }
    // Only concurrent values need change times (rare): look each op's change up.
    let time = |id: &automerge::ObjId| {
        values
            .doc
            .hash_for_opid(id)
            .and_then(|h| ReadDoc::get_change_by_hash(values.doc, &h))
            .map(|c| c.timestamp())
            .unwrap_or(i64::MIN)
    };
    // max_by_key keeps the last of equals: Automerge's winner among equal times.
    let (v, id) = values.all.iter().max_by_key(|(_, id)| time(id))?;
    Some(to_json(values.doc, v, id))
}
