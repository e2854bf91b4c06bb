//! `text`: a character-level merge of a string (Automerge text). The text object is made at
//! creation so that concurrent first edits land in one object; a text never written, or
//! emptied, is absent from the view.

use automerge::transaction::Transactable;
use automerge::{hydrate, ObjType, ReadDoc, TextEncoding, Value, ROOT};
use serde_json::Value as Json;

use super::{misfit, no_operator, Input, Semantics, Values, Write};
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) struct Text;

impl Semantics for Text {
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
        match input {
            Input::Op(op, _) => Err(no_operator(field, rule, op)),
            Input::Plain(Json::Null) => Ok(FieldOp::Remove),
            Input::Plain(v @ Json::String(_)) => Ok(FieldOp::Set(v.clone())),
            Input::Plain(v) => Err(misfit(field, rule, "a string", v)),
        }
    }

    fn initial(&self, op: Option<&FieldOp>, encoding: TextEncoding) -> Option<hydrate::Value> {
        let text = match op {
            Some(FieldOp::Set(Json::String(t))) => t.as_str(),
            _ => "",
        };
        Some(hydrate::Value::Text(hydrate::Text::new(encoding, text)))
    }

    fn write(&self, w: &mut Write<'_>, op: &FieldOp) -> Result<(), Error> {
        match op {
            FieldOp::Set(Json::String(s)) => {
                let text = match w.doc.get(ROOT, w.field).map_err(Error::automerge)? {
                    Some((Value::Object(ObjType::Text), id)) => id,
                    _ => w
                        .doc
                        .put_object(ROOT, w.field, ObjType::Text)
                        .map_err(Error::automerge)?,
                };
                w.doc.update_text(&text, s).map_err(Error::automerge)
            }
            _ => super::plain_write(w, op),
        }
    }

    fn merged(&self, values: &Values<'_>) -> Option<Json> {
        values.winner().filter(|v| v.as_str() != Some(""))
    }

    fn conflict(&self) -> Option<ConflictState> {
        None
    }
}
