//! `max` and `min`: the largest (smallest) concurrent number wins ("progress only grows").

use serde_json::Value as Json;

use super::{misfit, no_operator, Input, Semantics, Values};
use crate::entity::json::cmp_num;
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Max;
pub(crate) struct Min;

fn parse_number(field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
    match input {
        Input::Op(op, _) => Err(no_operator(field, rule, op)),
        Input::Plain(Json::Null) => Ok(FieldOp::Remove),
        Input::Plain(v @ Json::Number(n)) => {
            crate::numeric::check_ordered(field, rule.name(), n)?;
            Ok(FieldOp::Set(v.clone()))
        }
        Input::Plain(v) => Err(misfit(field, rule, "a number", v)),
    }
}

impl Semantics for Max {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        parse_number(field, rule, input)
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        values
            .each()
            .filter(Json::is_number)
            .max_by(cmp_num)
            .or_else(|| values.winner())
    }

    fn conflict(&self) -> Option<ConflictState> {
        Some(ConflictState::Auto)
    }
}

impl Semantics for Min {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        parse_number(field, rule, input)
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        values
            .each()
            .filter(Json::is_number)
            .min_by(cmp_num)
            .or_else(|| values.winner())
    }

    fn conflict(&self) -> Option<ConflictState> {
        Some(ConflictState::Auto)
    }
}
