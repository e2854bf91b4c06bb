//! Applying data migrations (`crate::migration`) as deterministic Automerge changes, and
//! reading fields so that duplicated or superseded migration values never show.
//!
//! **A migration change is computed on the document forked at its dependencies** — the
//! entity's creation change(s), plus for `copy`/`split` the changes that wrote the source
//! field's current values — with an actor hashed from (workspace, entity, migration id,
//! dependencies), the newest dependency's time and a fixed message. Automerge numbers a
//! change's operations from the highest operation of the document it is made in, so
//! forking at the dependencies (not writing at the current heads) is what makes two nodes'
//! changes byte-identical, whatever else each has seen: same hash, kept once. A marker
//! `_mig.<id>` written in the same change says the entity is migrated.
//!
//! Nodes holding different source values make different changes (different actors, so
//! no clash of sequence numbers). Their writes only set registers, add set elements,
//! add to an absent counter or fill an empty text, and reading settles them: among
//! concurrent values of a register or text field, values by migration actors yield to any
//! other value (a person's write always wins over a concurrent migration), and among
//! migration values `lww` keeps the one whose change is newest, i.e. computed from the
//! newest source. Sets and counters add concurrent containers up (union, sum), as they
//! would after one application.

use std::cell::OnceCell;
use std::collections::HashSet;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Change, ChangeHash, ObjId, ReadDoc, Value, ROOT};
use serde_json::{Map, Value as Json};
use sha2::Digest;

use super::layout::K_COLLECTION;
use super::{ChangeNote, Entity};
use crate::migration::{Migration, MigrationKind};
use crate::patch::Patch;
use crate::rules;
use crate::schema::{Collection, Rule};
use crate::workspace::Workspace;
use crate::Error;

/// Root key prefix of migration markers: `_mig.<migration id>`.
pub(crate) const K_MIG: &str = "_mig.";

/// Concurrent values of one field, with the op ids that wrote them.
pub(crate) type FieldValues = Vec<(Value<'static>, ObjId)>;

/// The actor of a migration change: a hash of everything the change is a function of.
/// The content is part of it: nodes whose targets differ (one filled elsewhere) write
/// different content on the same dependencies, and must not make two different changes
/// with one actor and sequence number (Automerge refuses that).
pub(crate) fn migration_actor(
    ws: &Workspace,
    entity: crate::EntityId,
    id: &str,
    deps: &[ChangeHash],
    patch: &Patch,
) -> ActorId {
    let mut h = sha2::Sha256::new();
    h.update(b"fieldsync/migrate/v1\0");
    h.update(ws.id.as_bytes());
    h.update(entity.as_bytes());
    h.update(id.as_bytes());
    h.update([0]);
    for d in deps {
        h.update(d.0);
    }
    h.update(super::layout::canonical(patch).to_string().as_bytes());
    ActorId::from(&h.finalize()[..16])
}

impl Entity {
    /// Applies the schema's migrations this entity has not had yet, each as its own
    /// deterministic change (see the module docs); how many were applied. A migration
    /// whose input is missing here (no source value, targets already filled, a source
    /// value the target's rule does not take) writes nothing and is tried again the next
    /// time the entity is written.
    pub fn migrate(&mut self, ws: &Workspace) -> Result<usize, Error> {
        let Some(collection) = self.collection.clone() else {
            return Ok(0);
        };
        let pending: Vec<&Migration> = ws
            .schema
            .migrations
            .iter()
            .filter(|m| m.collection == collection && !self.migrated(&m.id))
            .collect();
        if pending.is_empty() {
            return Ok(0);
        }
        let coll = ws.schema.collection(&collection)?;
        let mut applied = 0;
        for m in pending {
            let Some((patch, read)) = self.migration_input(coll, m) else {
                continue;
            };
            let mut deps: Vec<ChangeHash> = self
                .doc
                .get_all(ROOT, K_COLLECTION)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(_, id)| self.doc.hash_for_opid(&id))
                .collect();
            deps.extend(read.iter().filter_map(|id| self.doc.hash_for_opid(id)));
            deps.sort();
            deps.dedup();
            if deps.is_empty() {
                continue;
            }
            let change = self.migration_change(ws, coll, m, &patch, &deps)?;
            self.doc.apply_changes([change]).map_err(Error::automerge)?;
            applied += 1;
        }
        Ok(applied)
    }

    /// Whether migration `id` was applied to this document (by any node).
    pub fn migrated(&self, id: &str) -> bool {
        matches!(self.doc.get(ROOT, format!("{K_MIG}{id}")), Ok(Some(_)))
    }

    /// What migration `m` writes here, and the op ids of the values it read; `None` if it
    /// has nothing to write.
    fn migration_input(&self, coll: &Collection, m: &Migration) -> Option<(Patch, Vec<ObjId>)> {
        let mig = OnceCell::new();
        let empty = |field: &str| {
            self.merged_field(coll, field, &mig)
                .is_none_or(|v| v == Json::Null || v == "" || v == Json::Array(vec![]))
        };
        let mut out = Map::new();
        let mut read = Vec::new();
        match &m.kind {
            MigrationKind::Backfill { field, value } => {
                if empty(field) {
                    out.insert(field.clone(), value.clone());
                }
            }
            MigrationKind::Copy { from, field } => {
                let source = self.merged_field(coll, from, &mig)?;
                if empty(field) && !source.is_null() {
                    // Into a set, one value is one element.
                    let source = match (coll.rule(field), source) {
                        (Rule::Set, v @ Json::Array(_)) => v,
                        (Rule::Set, v) => Json::Array(vec![v]),
                        (_, v) => v,
                    };
                    out.insert(field.clone(), source);
                    read = self
                        .field_values(coll, from, &mig)
                        .into_iter()
                        .map(|(_, id)| id)
                        .collect();
                }
            }
            MigrationKind::Split {
                from,
                into,
                separator,
            } => {
                let source = self.merged_field(coll, from, &mig)?;
                let text = source.as_str()?;
                for (field, part) in into.iter().zip(text.splitn(into.len(), separator.as_str())) {
                    if empty(field) && !part.is_empty() {
                        out.insert(field.clone(), Json::String(part.to_owned()));
                    }
                }
                read = self
                    .field_values(coll, from, &mig)
                    .into_iter()
                    .map(|(_, id)| id)
                    .collect();
            }
        }
        if out.is_empty() {
            return None;
        }
        // Checked like a write; a value the target's rule does not take is not copied.
        let patch = Patch::from_json(coll, &Json::Object(out)).ok()?;
        Some((patch, read))
    }

    /// The change migration `m` makes: `patch` written on the document as of `deps`.
    fn migration_change(
        &mut self,
        ws: &Workspace,
        coll: &Collection,
        m: &Migration,
        patch: &Patch,
        deps: &[ChangeHash],
    ) -> Result<Change, Error> {
        let mut fork = self.doc.fork_at(deps).map_err(Error::automerge)?;
        fork.set_actor(migration_actor(ws, self.id, &m.id, deps, patch));
        for (field, op) in &patch.ops {
            let rule = coll.rule(field);
            let mut w = rules::Write {
                doc: &mut fork,
                field,
                rule,
                op_id: None,
            };
            rules::of(rule).write(&mut w, op)?;
        }
        fork.put(ROOT, format!("{K_MIG}{}", m.id), m.kind_name())
            .map_err(Error::automerge)?;
        let time = deps
            .iter()
            .filter_map(|h| self.doc.get_change_meta_by_hash(h).map(|m| m.timestamp))
            .max()
            .unwrap_or(0);
        let note = ChangeNote {
            user: String::new(),
            kind: "migrate".into(),
            fields: patch.fields(),
            op: Some(m.id.clone()),
        };
        fork.commit_with(
            CommitOptions::default()
                .with_message(serde_json::to_string(&note).unwrap_or_default())
                .with_time(time),
        );
        fork.get_last_local_change()
            .ok_or_else(|| Error::Document(format!("migration {} made no change", m.id)))
    }

    /// The actors of every migration change in this document (the writers of its markers).
    fn migration_actors(&self) -> HashSet<ActorId> {
        self.doc
            .map_range(ROOT, K_MIG.to_owned()..)
            .take_while(|item| item.key.starts_with(K_MIG))
            .flat_map(|item| {
                self.doc
                    .get_all(ROOT, item.key.as_ref())
                    .unwrap_or_default()
            })
            .filter_map(|(_, id)| match id {
                ObjId::Id(_, actor, _) => Some(actor),
                ObjId::Root => None,
            })
            .collect()
    }

    /// Drops from concurrent values those written by migrations, if any other remains.
    /// Not for `set` and `counter`: their concurrent containers add up (a union, a sum),
    /// which is what one application followed by the other writes gives.
    pub(crate) fn yield_to_people(
        &self,
        rule: &Rule,
        all: &mut FieldValues,
        mig: &OnceCell<HashSet<ActorId>>,
    ) {
        if all.len() < 2 || matches!(rule, Rule::Set | Rule::Attachments | Rule::Counter) {
            return;
        }
        let actors = mig.get_or_init(|| self.migration_actors());
        if actors.is_empty() {
            return;
        }
        let by_migration = |id: &ObjId| matches!(id, ObjId::Id(_, a, _) if actors.contains(a));
        if all.iter().any(|(_, id)| !by_migration(id)) {
            all.retain(|(_, id)| !by_migration(id));
        }
    }

    /// Every concurrent value of `field` as the view reads it: its own key's values plus
    /// those of the name it was renamed from, without superseded migration values.
    pub(crate) fn field_values(
        &self,
        coll: &Collection,
        field: &str,
        mig: &OnceCell<HashSet<ActorId>>,
    ) -> FieldValues {
        let get = |key: &str| -> FieldValues {
            self.doc
                .get_all(ROOT, key)
                .unwrap_or_default()
                .into_iter()
                .map(|(v, id)| (v.into_owned(), id))
                .collect()
        };
        let mut all = get(field);
        if let Some(old) = coll
            .fields
            .get(field)
            .and_then(|f| f.renamed_from.as_deref())
        {
            let before = get(old);
            if !before.is_empty() {
                all.extend(before);
                // Automerge's order (the last is its winner), over both names.
                all.sort_by(|a, b| a.1.cmp(&b.1));
            }
        }
        self.yield_to_people(coll.rule(field), &mut all, mig);
        all
    }

    /// `field`'s merged value through its rule (no read-time default); `None`: no value.
    pub(crate) fn merged_field(
        &self,
        coll: &Collection,
        field: &str,
        mig: &OnceCell<HashSet<ActorId>>,
    ) -> Option<Json> {
        let rule = coll.rule(field);
        if *rule == Rule::Authority {
            return None;
        }
        let all = self.field_values(coll, field, mig);
        if all.is_empty() {
            return (*rule == Rule::Counter && !rules::delta_entries(&self.doc, field).is_empty())
                .then(|| Json::from(rules::sum_with_deltas(&self.doc, field, &[])));
        }
        rules::of(rule).merged(&rules::Values {
            doc: &self.doc,
            field,
            rule,
            all: &all,
        })
    }
}
