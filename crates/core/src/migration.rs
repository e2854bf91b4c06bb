//! Deterministic data migrations: writes a schema version declares for existing entities.
//!
//! ```toml
//! [[migrations]]
//! id = "tasks-priority-0"      # names the migration forever
//! collection = "tasks"
//! kind = "backfill"            # write `value` into `field` where it has no value
//! field = "priority"
//! value = 0
//!
//! [[migrations]]
//! id = "contacts-split-name"
//! collection = "contacts"
//! kind = "split"               # split the string in `from` at `separator` into `into`
//! from = "name"
//! into = ["first_name", "last_name"]
//! separator = " "
//!
//! [[migrations]]
//! id = "tasks-notes-to-text"
//! collection = "tasks"
//! kind = "copy"                # copy the value of `from` into `field`
//! from = "legacy_notes"
//! field = "notes"
//! ```
//!
//! **A migration's change is a pure function of (workspace, entity, migration, the state it
//! reads)** (see `Entity::migrate`): whichever node meets an entity first applies it, and
//! every node that applies it to the same state makes the byte-identical Automerge change,
//! which Automerge keeps once. The state it reads is fixed by its dependencies: the
//! entity's creation change(s), plus for `copy`/`split` the changes that wrote the source
//! field's current value. Nodes that hold different source values make different changes;
//! then the value computed from the later source wins (the change's time is its newest
//! dependency's), and a value a person wrote wins over any migration's concurrent value.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value as Json;

use crate::schema::{Collection, Rule};
use crate::Error;

/// Most migrations one schema may declare.
pub const MAX_MIGRATIONS: usize = 256;

/// What a migration writes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationKind {
    /// `value` into `field` where the field has no value.
    Backfill { field: String, value: Json },
    /// The value of `from` into `field` where `field` has no value and `from` has one.
    Copy { from: String, field: String },
    /// The string in `from` cut at `separator` into the fields `into` (the last takes the
    /// rest), each where it has no value.
    Split {
        from: String,
        into: Vec<String>,
        separator: String,
    },
}

/// One declared migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// Names the migration in every version from the one that declares it on.
    pub id: String,
    pub collection: String,
    pub kind: MigrationKind,
}

impl Migration {
    /// `backfill`, `copy` or `split`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            MigrationKind::Backfill { .. } => "backfill",
            MigrationKind::Copy { .. } => "copy",
            MigrationKind::Split { .. } => "split",
        }
    }

    /// The fields it writes.
    pub fn targets(&self) -> Vec<String> {
        match &self.kind {
            MigrationKind::Backfill { field, .. } | MigrationKind::Copy { field, .. } => {
                vec![field.clone()]
            }
            MigrationKind::Split { into, .. } => into.clone(),
        }
    }

    /// The field it reads, if any.
    pub fn source(&self) -> Option<&str> {
        match &self.kind {
            MigrationKind::Backfill { .. } => None,
            MigrationKind::Copy { from, .. } | MigrationKind::Split { from, .. } => Some(from),
        }
    }
}

/// `[[migrations]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMigration {
    id: String,
    collection: String,
    kind: String,
    field: Option<String>,
    value: Option<toml::Value>,
    from: Option<String>,
    into: Option<Vec<String>>,
    separator: Option<String>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// Rules a migration may write: everything but authority fields (only the authority's
/// signature makes those) and the owner of a partitioned collection.
fn writable(coll: &Collection, cname: &str, field: &str, id: &str) -> Result<(), Error> {
    if field.starts_with('_') {
        return Err(Error::Schema(format!(
            "migration {id:?}: field {field:?} is reserved"
        )));
    }
    if *coll.rule(field) == Rule::Authority {
        return Err(Error::Schema(format!(
            "migration {id:?}: {cname}.{field} is an authority field; only the authority's signed values count there, so a migration cannot write it"
        )));
    }
    if *coll.rule(field) == Rule::Attachments {
        return Err(Error::Schema(format!(
            "migration {id:?}: {cname}.{field} holds attachments; a reference is written only by a node that holds the file, so a migration cannot write one"
        )));
    }
    if coll.owner.as_deref() == Some(field) {
        return Err(Error::Schema(format!("migration {id:?}: {cname}.{field} is the collection's owner field; moving entities between users is not a migration")));
    }
    Ok(())
}

/// Checks the declared migrations against the collections.
pub(crate) fn parse(
    raw: Vec<RawMigration>,
    collections: &BTreeMap<String, Collection>,
) -> Result<Vec<Migration>, Error> {
    if raw.len() > MAX_MIGRATIONS {
        return Err(Error::Schema(format!(
            "{} migrations is over the limit of {MAX_MIGRATIONS}",
            raw.len()
        )));
    }
    let mut out: Vec<Migration> = Vec::with_capacity(raw.len());
    for r in raw {
        let id = r.id.clone();
        if !valid_id(&id) {
            return Err(Error::Schema(format!(
                "migration id {id:?} must be 1–64 letters, digits, '_', '-' or '.'"
            )));
        }
        if out.iter().any(|m| m.id == id) {
            return Err(Error::Schema(format!(
                "migration id {id:?} is declared twice"
            )));
        }
        let coll = match collections.get(&r.collection) {
            Some(c) if !r.collection.starts_with('_') => c,
            _ => {
                return Err(Error::Schema(format!(
                    "migration {id:?}: collection {:?} is not declared",
                    r.collection
                )))
            }
        };
        let cname = r.collection.as_str();
        let misplaced = |key: &str, kind: &str| {
            Error::Schema(format!(
                "migration {id:?}: `{key}` does not apply to kind {kind:?}"
            ))
        };
        let need = |key: &str, kind: &str| {
            Error::Schema(format!("migration {id:?}: kind {kind:?} needs `{key}`"))
        };
        let kind = match r.kind.as_str() {
            "backfill" => {
                if r.from.is_some() || r.into.is_some() || r.separator.is_some() {
                    return Err(misplaced("from/into/separator", "backfill"));
                }
                let field = r.field.ok_or_else(|| need("field", "backfill"))?;
                let value = r.value.ok_or_else(|| need("value", "backfill"))?;
                let value = serde_json::to_value(&value)
                    .map_err(|e| Error::Schema(format!("migration {id:?}: value: {e}")))?;
                writable(coll, cname, &field, &id)?;
                // The value must be one the field's rule takes, as a write would be checked.
                crate::patch::Patch::from_json(
                    coll,
                    &serde_json::json!({ field.clone(): value.clone() }),
                )
                .map_err(|e| {
                    Error::Schema(format!(
                        "migration {id:?}: value does not fit {cname}.{field}: {e}"
                    ))
                })?;
                if value.is_null() {
                    return Err(Error::Schema(format!(
                        "migration {id:?}: a backfill value cannot be null"
                    )));
                }
                MigrationKind::Backfill { field, value }
            }
            "copy" => {
                if r.value.is_some() || r.into.is_some() || r.separator.is_some() {
                    return Err(misplaced("value/into/separator", "copy"));
                }
                let from = r.from.ok_or_else(|| need("from", "copy"))?;
                let field = r.field.ok_or_else(|| need("field", "copy"))?;
                if from == field {
                    return Err(Error::Schema(format!(
                        "migration {id:?}: `from` and `field` are the same field"
                    )));
                }
                source(coll, cname, &from, &id)?;
                writable(coll, cname, &field, &id)?;
                MigrationKind::Copy { from, field }
            }
            "split" => {
                if r.value.is_some() || r.field.is_some() {
                    return Err(misplaced("value/field", "split"));
                }
                let from = r.from.ok_or_else(|| need("from", "split"))?;
                let into = r.into.ok_or_else(|| need("into", "split"))?;
                let separator = r.separator.ok_or_else(|| need("separator", "split"))?;
                if separator.is_empty() || into.len() < 2 || into.len() > 16 {
                    return Err(Error::Schema(format!("migration {id:?}: split needs a non-empty separator and 2 to 16 `into` fields")));
                }
                let mut seen = std::collections::BTreeSet::new();
                if !into.iter().all(|f| seen.insert(f.clone())) || into.contains(&from) {
                    return Err(Error::Schema(format!(
                        "migration {id:?}: `into` must name distinct fields other than `from`"
                    )));
                }
                source(coll, cname, &from, &id)?;
                for f in &into {
                    writable(coll, cname, f, &id)?;
                    if !matches!(coll.rule(f), Rule::Lww { .. } | Rule::Text | Rule::Manual) {
                        return Err(Error::Schema(format!("migration {id:?}: split writes strings; {cname}.{f} (rule {}) does not take one", coll.rule(f).name())));
                    }
                }
                MigrationKind::Split {
                    from,
                    into,
                    separator,
                }
            }
            other => {
                return Err(Error::Schema(format!(
                    "migration {id:?}: unknown kind {other:?}; expected backfill, copy or split"
                )))
            }
        };
        out.push(Migration {
            id,
            collection: r.collection,
            kind,
        });
    }
    Ok(out)
}

/// A source must be a field whose value is one value (not a counter, set, text or
/// authority field, whose values are not plain registers).
fn source(coll: &Collection, cname: &str, from: &str, id: &str) -> Result<(), Error> {
    if from.starts_with('_') {
        return Err(Error::Schema(format!(
            "migration {id:?}: field {from:?} is reserved"
        )));
    }
    match coll.rule(from) {
        Rule::Lww { .. } | Rule::Rank { .. } | Rule::Max | Rule::Min | Rule::Manual => Ok(()),
        other => Err(Error::Schema(format!(
            "migration {id:?}: {cname}.{from} (rule {}) cannot be a source; copy and split read lww, rank, max, min or manual fields",
            other.name()
        ))),
    }
}
