//! `authority`: only values signed by the workspace authority count. Other nodes' writes
//! become proposals that the authority accepts or rejects; the view shows the newest
//! confirmed value and, under `_pending`, the newest pending proposal. Writing, signing
//! and settling live in `entity::authority`, which needs the workspace key; the view
//! reads confirmations, not root fields, so this rule has no root value to merge.

use serde_json::Value as Json;

use super::{parse_register, Input, Semantics, Values, Write};
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Authority;

impl Semantics for Authority {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        parse_register(field, rule, input)
    }

    fn initial(
        &self,
        _: Option<&FieldOp>,
        _: automerge::TextEncoding,
    ) -> Option<automerge::hydrate::Value> {
        // Confirmations are signed over the entity id and proposals carry their writer:
        // both are written after the creation change.
        None
    }

    fn write(&self, w: &mut Write<'_>, _: &FieldOp) -> Result<(), Error> {
        Err(Error::Document(format!(
            "authority field {:?} is written through the authority path",
            w.field
        )))
    }

    fn merged(&self, _: &Values<'_>) -> Option<Json> {
        None
    }

    fn conflict(&self) -> Option<ConflictState> {
        None
    }
}
