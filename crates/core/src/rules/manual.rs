//! `manual`: concurrent distinct values open a conflict that a person settles; until then
//! the view shows Automerge's winner and lists every value under `_conflicts`.

use serde_json::Value as Json;

use super::{parse_register, Input, Semantics, Values};
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Manual;

impl Semantics for Manual {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        parse_register(field, rule, input)
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        values.winner()
    }

    fn conflict(&self) -> Option<ConflictState> {
        Some(ConflictState::Open)
    }
}
