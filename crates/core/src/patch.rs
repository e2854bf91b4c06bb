//! The patch language apps write with: a JSON object of field operations.
//!
//! Plain values set fields, `null` removes one, `{"$inc": n}` adds to a counter,
//! `{"$add": [..]}` / `{"$remove": [..]}` change a set. Parsing checks every operation against
//! the field's rule, so a bad patch is refused whole before anything is written.

use serde_json::{Map, Value as Json};

use crate::rules::{self, Input};
use crate::schema::{Collection, Rule};
use crate::Error;

/// One operation on one field, already checked against the field's rule.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum FieldOp {
    /// Replace the value (for sets: the whole membership; for text: the whole string).
    Set(Json),
    /// Remove the field.
    Remove,
    /// Add to a counter.
    Inc(i64),
    /// Add elements to a set.
    Add(Vec<Json>),
    /// Remove elements from a set.
    RemoveElems(Vec<Json>),
}

/// A checked patch: field operations in field-name order.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Patch {
    pub ops: Vec<(String, FieldOp)>,
}

impl Patch {
    /// Parses `text` as a patch for `collection`.
    pub fn parse(collection: &Collection, text: &str) -> Result<Self, Error> {
        let json: Json =
            serde_json::from_str(text).map_err(|e| Error::Patch(format!("malformed JSON: {e}")))?;
        Self::from_json(collection, &json)
    }

    /// Checks an already-parsed JSON patch for `collection`.
    pub fn from_json(collection: &Collection, json: &Json) -> Result<Self, Error> {
        let Json::Object(map) = json else {
            return Err(Error::Patch(format!(
                "a patch is a JSON object of fields, got {}",
                crate::entity::json::kind(json)
            )));
        };
        let mut ops = Vec::with_capacity(map.len());
        for (field, value) in map {
            if field.starts_with('_') {
                return Err(Error::Patch(format!(
                    "field {field:?}: names starting with '_' are reserved"
                )));
            }
            if field.is_empty() || field.chars().count() > 64 {
                return Err(Error::Patch(
                    "field names must be 1 to 64 characters".into(),
                ));
            }
            let op = parse_op(field, collection.rule(field), value)?;
            ops.push((field.clone(), op));
        }
        Ok(Patch { ops })
    }

    /// The names of the fields this patch touches.
    pub fn fields(&self) -> Vec<String> {
        self.ops.iter().map(|(f, _)| f.clone()).collect()
    }
}

/// The operator of `{"$op": arg}`, if `value` is exactly that shape.
fn operator(value: &Json) -> Option<(&str, &Json)> {
    let Json::Object(m) = value else { return None };
    if m.len() != 1 {
        return None;
    }
    let (k, v) = m.iter().next()?;
    k.starts_with('$').then_some((k.as_str(), v))
}

/// Checks one field's value; what each rule takes is decided by the rule (see `rules`).
fn parse_op(field: &str, rule: &Rule, value: &Json) -> Result<FieldOp, Error> {
    let input = match operator(value) {
        Some((op @ ("$inc" | "$add" | "$remove"), arg)) => Input::Op(op, arg),
        Some((op, _)) => {
            return Err(Error::Patch(format!(
                "field {field:?}: unknown operator {op}; expected $inc, $add or $remove"
            )))
        }
        None => {
            if let Json::Object(m) = value {
                if m.keys().any(|k| k.starts_with('$')) {
                    return Err(Error::Patch(format!(
                        "field {field:?}: an operator object must hold exactly one operator"
                    )));
                }
            }
            Input::Plain(value)
        }
    };
    rules::of(rule).parse(field, rule, input)
}

/// Parses a `FIELD=VALUE` filter: VALUE is JSON if it parses, else a plain string.
pub fn parse_filter(text: &str) -> Result<(String, Json), Error> {
    let (field, value) = text
        .split_once('=')
        .ok_or_else(|| Error::Patch(format!("filter {text:?} must look like FIELD=VALUE")))?;
    if field.is_empty() {
        return Err(Error::Patch(format!("filter {text:?} has no field name")));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_owned()));
    Ok((field.to_owned(), value))
}

/// Whether a view matches a filter: equal, or for arrays (sets), containing the value.
pub fn matches_filter(view: &Map<String, Json>, field: &str, value: &Json) -> bool {
    match view.get(field) {
        Some(Json::Array(items)) if !value.is_array() => items.contains(value),
        Some(v) => v == value || numbers_equal(v, value),
        None => value.is_null(),
    }
}

fn numbers_equal(a: &Json, b: &Json) -> bool {
    matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    fn tasks() -> Collection {
        Schema::from_toml(
            r#"[collections.tasks.fields]
status = { rule = "rank", order = ["open", "done"] }
progress = { rule = "max" }
tags = { rule = "set" }
stock = { rule = "counter" }
notes = { rule = "text" }"#,
        )
        .unwrap()
        .collection("tasks")
        .unwrap()
        .clone()
    }

    #[test]
    fn accepts_each_rule_s_operations() {
        let c = tasks();
        let p = Patch::parse(&c, r#"{"status":"done","progress":3.5,"tags":{"$add":["a",1]},"stock":{"$inc":-2},"notes":"hi","title":{"x":[1]},"gone":null}"#).unwrap();
        assert_eq!(p.ops.len(), 7);
        assert!(p.ops.contains(&("stock".into(), FieldOp::Inc(-2))));
        assert!(p.ops.contains(&("gone".into(), FieldOp::Remove)));
    }

    #[test]
    fn refuses_misfits_naming_the_field() {
        let c = tasks();
        for (bad, needle) in [
            (r#"{"status":"closed"}"#, "\"status\""),
            (r#"{"status":3}"#, "\"status\""),
            (r#"{"progress":"high"}"#, "a number"),
            (r#"{"progress":{"$inc":1}}"#, "does not take $inc"),
            (r#"{"tags":{"$inc":1}}"#, "does not take $inc"),
            (r#"{"tags":{"$add":[{"a":1}]}}"#, "set elements"),
            (r#"{"tags":"a"}"#, "\"tags\""),
            (r#"{"tags":null}"#, "cannot be removed"),
            (r#"{"stock":{"$inc":1.5}}"#, "integer"),
            (r#"{"stock":{"$inc":9223372036854775808}}"#, "\"stock\""),
            (r#"{"stock":{"$inc":9007199254740992}}"#, "\"stock\""),
            (r#"{"stock":-9007199254740992}"#, "\"stock\""),
            (r#"{"stock":18446744073709551615}"#, "\"stock\""),
            (r#"{"progress":9007199254740992}"#, "\"progress\""),
            (r#"{"progress":-1e300}"#, "\"progress\""),
            (r#"{"stock":null}"#, "cannot be removed"),
            (r#"{"notes":5}"#, "a string"),
            (r#"{"x":{"$mul":2}}"#, "unknown operator"),
            (r#"{"x":{"$inc":1,"y":2}}"#, "exactly one operator"),
            (r#"{"_id":"x"}"#, "reserved"),
            (r#"[1]"#, "JSON object"),
            (r#"{"a":"#, "malformed JSON"),
        ] {
            let err = Patch::parse(&c, bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad} gave {err}");
        }
    }

    #[test]
    fn filters_match_values_and_set_members() {
        let view: Map<String, Json> =
            serde_json::from_str(r#"{"a":"x","n":2,"tags":["t"]}"#).unwrap();
        let (f, v) = parse_filter("a=x").unwrap();
        assert!(matches_filter(&view, &f, &v));
        let (f, v) = parse_filter("n=2.0").unwrap();
        assert!(matches_filter(&view, &f, &v));
        let (f, v) = parse_filter("tags=t").unwrap();
        assert!(matches_filter(&view, &f, &v));
        let (f, v) = parse_filter("a=y").unwrap();
        assert!(!matches_filter(&view, &f, &v));
        assert!(parse_filter("novalue").is_err());
    }
}
