//! `rank`: the highest value in the field's `order` wins among concurrent values
//! ("completed wins"); values outside the order rank lowest.

use serde_json::Value as Json;

use super::{misfit, no_operator, Input, Semantics, Values};
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Rank;

fn order(rule: &Rule) -> &[String] {
    match rule {
        Rule::Rank { order } => order,
        _ => &[],
    }
}

impl Semantics for Rank {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        let order = order(rule);
        match input {
            Input::Op(op, _) => Err(no_operator(field, rule, op)),
            Input::Plain(Json::Null) => Ok(FieldOp::Remove),
            Input::Plain(Json::String(s)) if order.contains(s) => {
                Ok(FieldOp::Set(Json::String(s.clone())))
            }
            Input::Plain(Json::String(s)) => Err(Error::Patch(format!(
                "field {field:?} (rule rank) takes one of {order:?}, got {s:?}"
            ))),
            Input::Plain(v) => Err(misfit(field, rule, &format!("one of {order:?}"), v)),
        }
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        let order = order(values.rule);
        let rank = |v: &Json| {
            v.as_str()
                .and_then(|s| order.iter().position(|o| o == s))
                .map(|r| r as i64)
                .unwrap_or(-1)
        };
        // max_by_key keeps the last of equals, matching Automerge's winner on ties.
        values.each().max_by_key(rank)
    }

    fn conflict(&self) -> Option<ConflictState> {
        Some(ConflictState::Auto)
    }
}
