//! Each merge rule's whole meaning, one module per rule: the patch values and operators it
//! takes, the container it needs at creation, how a write lands in the document, how
//! concurrent values merge into the view, and whether they conflict.
//!
//! [`of`] is the only place that maps a [`Rule`] to its meaning; everything else (patch
//! parsing, creation, writes, view derivation) asks the [`Semantics`] it returns.

mod attachments;
mod authority;
mod counter;
mod extremum;
mod lww;
mod manual;
mod rank;
mod set;
mod text;

use automerge::transaction::Transactable;
use automerge::{hydrate, AutoCommit, ObjId, Prop, ReadDoc, TextEncoding, Value, ROOT};
use serde_json::Value as Json;

use crate::entity::json::{kind, put_json, to_json};
use crate::entity::ConflictState;
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::Error;

pub(crate) use counter::{delta_entries, sum_with_deltas};

/// One patch value as the app wrote it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Input<'a> {
    /// A plain value (`null` included).
    Plain(&'a Json),
    /// `{"$op": arg}` with a known operator.
    Op(&'a str, &'a Json),
}

/// The concurrent values of one field, as the view derivation sees them.
pub(crate) struct Values<'a> {
    pub doc: &'a AutoCommit,
    pub field: &'a str,
    pub rule: &'a Rule,
    /// Every concurrent value with its op id; the last is Automerge's own winner.
    pub all: &'a [(Value<'static>, ObjId)],
}

impl Values<'_> {
    /// Automerge's deterministic winner (highest op id).
    pub fn winner(&self) -> Option<Json> {
        self.all.last().map(|(v, id)| to_json(self.doc, v, id))
    }

    /// Every concurrent value as JSON, in Automerge's order.
    pub fn each(&self) -> impl Iterator<Item = Json> + '_ {
        self.all.iter().map(|(v, id)| to_json(self.doc, v, id))
    }
}

/// Where a write lands.
pub(crate) struct Write<'a> {
    pub doc: &'a mut AutoCommit,
    pub field: &'a str,
    pub rule: &'a Rule,
    /// The operation id of an idempotent write, if the app gave one.
    pub op_id: Option<&'a str>,
}

/// What a rule means. Implemented once per rule, in the rule's own module.
pub(crate) trait Semantics: Sync {
    /// Checks one patch value for a field of this rule; a misfit is refused naming the field.
    fn parse(&self, field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error>;

    /// The value this field gets in the creation change: the patch's value, or an empty
    /// container made once at creation so replicas never race to make it.
    fn initial(&self, op: Option<&FieldOp>, encoding: TextEncoding) -> Option<hydrate::Value> {
        match op {
            Some(FieldOp::Set(v)) => Some(crate::entity::json::json_hydrate(v)),
            _ => {
                let _ = encoding;
                None
            }
        }
    }

    /// Applies one checked operation after creation.
    fn write(&self, w: &mut Write<'_>, op: &FieldOp) -> Result<(), Error> {
        plain_write(w, op)
    }

    /// The field's value in the view, from its concurrent values (`None`: absent).
    fn merged(&self, values: &Values<'_>) -> Option<Json>;

    /// How several distinct concurrent values show: `None` if they merge and never
    /// conflict, else the state of the conflict.
    fn conflict(&self) -> Option<ConflictState>;
}

/// The meaning of `rule`.
pub(crate) fn of(rule: &Rule) -> &'static dyn Semantics {
    match rule {
        Rule::Lww { by_actor: false } => &lww::Lww,
        Rule::Lww { by_actor: true } => &lww::LwwByActor,
        Rule::Rank { .. } => &rank::Rank,
        Rule::Max => &extremum::Max,
        Rule::Min => &extremum::Min,
        Rule::Counter => &counter::Counter,
        Rule::Set => &set::Set,
        Rule::Attachments => &attachments::Attachments,
        Rule::Text => &text::Text,
        Rule::Authority => &authority::Authority,
        Rule::Manual => &manual::Manual,
    }
}

/// "`field` (rule R) takes EXPECTED, got KIND".
pub(crate) fn misfit(field: &str, rule: &Rule, expected: &str, got: &Json) -> Error {
    Error::Patch(format!(
        "field {field:?} (rule {}) takes {expected}, got {}",
        rule.name(),
        kind(got)
    ))
}

/// The error for an operator the rule does not take.
pub(crate) fn no_operator(field: &str, rule: &Rule, op: &str) -> Error {
    Error::Patch(format!(
        "field {field:?} has rule {}, which does not take {op}",
        rule.name()
    ))
}

/// A plain register's parse: any value, `null` removes.
fn parse_register(field: &str, rule: &Rule, input: Input<'_>) -> Result<FieldOp, Error> {
    match input {
        Input::Op(op, _) => Err(no_operator(field, rule, op)),
        Input::Plain(Json::Null) => Ok(FieldOp::Remove),
        Input::Plain(v) => Ok(FieldOp::Set(v.clone())),
    }
}

/// A register write: put the value, or remove the field (removing an absent one is a no-op).
fn plain_write(w: &mut Write<'_>, op: &FieldOp) -> Result<(), Error> {
    match op {
        FieldOp::Set(v) => {
            // Automerge drops a put equal to its own winner, which then leaves the other
            // concurrent values standing; a write that has seen them all must replace them,
            // so clear the field first.
            if w.doc
                .get_all(ROOT, w.field)
                .map_err(Error::automerge)?
                .len()
                > 1
            {
                w.doc.delete(ROOT, w.field).map_err(Error::automerge)?;
            }
            put_json(w.doc, &ROOT, Prop::Map(w.field.to_owned()), v).map_err(Error::automerge)
        }
        FieldOp::Remove => {
            if w.doc
                .get(ROOT, w.field)
                .map_err(Error::automerge)?
                .is_some()
            {
                w.doc.delete(ROOT, w.field).map_err(Error::automerge)?;
            }
            Ok(())
        }
        other => Err(Error::Patch(format!(
            "field {:?} (rule {}) does not take {other:?}",
            w.field,
            w.rule.name()
        ))),
    }
}
