//! The view, conflicts and pending proposals of an entity, derived together in one pass.
//! All three are pure functions of the document (and the workspace), so replicas holding
//! the same changes agree.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ChangeHash, ObjId, ReadDoc, Value, ROOT};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::json::to_json;
use super::{Entity, View};
use crate::authority::Confirmation;
use crate::ids::{ConflictId, EntityId, ProposalId};
use crate::patch::Patch;
use crate::rules::{self, Values};
use crate::schema::{Collection, Rule};
use crate::workspace::Workspace;
use crate::Error;

/// A pending proposal, as stored under `_prop`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProposalRecord {
    pub field: String,
    pub value: Json,
    pub peer: String,
    pub user: String,
    pub time_ms: i64,
    /// The operation id of the write that made it, if the app gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
}

/// A pending proposal, as listed by `fieldsync proposals`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Proposal {
    pub id: ProposalId,
    pub entity: EntityId,
    pub collection: String,
    #[serde(flatten)]
    pub record: ProposalRecord,
}

/// Whether a conflict waits for a person (`open`) or was settled by its field's rule (`auto`).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConflictState {
    Open,
    Auto,
    /// Settled by a person (`resolve`); kept for the record with its resolution.
    Resolved,
}

/// How a person settled a conflict, kept in the document under `_resolved.<conflict id>`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Resolution {
    pub chosen: Json,
    pub user: String,
    pub peer: String,
    pub time_ms: i64,
}

/// A field holding several concurrent values.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Conflict {
    pub id: ConflictId,
    pub collection: String,
    pub entity: EntityId,
    pub field: String,
    /// Every distinct concurrent value, in a deterministic order.
    pub values: Vec<Json>,
    pub rule: &'static str,
    pub state: ConflictState,
    /// For resolved conflicts: the chosen value, who chose it and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
}

/// A resolved conflict as stored under `_resolved`.
#[derive(Serialize, Deserialize)]
pub(crate) struct ResolvedRecord {
    pub field: String,
    pub values: Vec<Json>,
    pub rule: String,
    #[serde(flatten)]
    pub resolution: Resolution,
}

/// What is derived from an entity's document: its view, conflicts and pending proposals.
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    pub view: View,
    pub conflicts: Vec<Conflict>,
    pub proposals: Vec<Proposal>,
    /// Conflicts a person resolved, with the alternatives and the resolution.
    pub resolved: Vec<Conflict>,
}

/// An entity's last derivation, and the one local write made since, if any. A write of
/// declared plain fields changes only those fields' values and conflicts (and the delete
/// marker), so deriving after it starts from the last derivation and reads just them:
/// about a fifth of a write's instructions otherwise go to re-reading every field.
#[derive(Debug, Default)]
pub(super) struct Rederive {
    last: Option<Box<Kept>>,
    /// The write since: the heads it started from and ended at, and the fields it wrote;
    /// `None` when the write may have changed anything else.
    write: Option<(Vec<ChangeHash>, Vec<ChangeHash>, Vec<String>)>,
}

/// The last derivation, with the heads and schema version it was made at.
#[derive(Debug)]
struct Kept {
    heads: Vec<ChangeHash>,
    version: u64,
    derived: Derived,
}

/// The view's `_conflicts`: each open conflict's values, by field; absent when none is open.
fn set_open_conflicts(view: &mut View, conflicts: &[Conflict]) {
    let open: Map<String, Json> = conflicts
        .iter()
        .filter(|c| c.state == ConflictState::Open)
        .map(|c| (c.field.clone(), Json::Array(c.values.clone())))
        .collect();
    view.remove("_conflicts");
    if !open.is_empty() {
        view.insert("_conflicts".into(), Json::Object(open));
    }
}

impl Rederive {
    /// Roughly the bytes the kept derivation holds, for the document cache's budget.
    pub(super) fn memory_estimate(&self) -> usize {
        fn json(v: &Json) -> usize {
            32 + match v {
                Json::String(s) => s.len(),
                Json::Array(a) => a.iter().map(json).sum(),
                Json::Object(m) => m.iter().map(|(k, v)| 32 + k.len() + json(v)).sum(),
                _ => 0,
            }
        }
        self.last.as_ref().map_or(0, |l| {
            let d = &l.derived;
            256 + d
                .view
                .iter()
                .map(|(k, v)| 32 + k.len() + json(v))
                .sum::<usize>()
                + (d.conflicts.len() + d.proposals.len() + d.resolved.len()) * 256
        })
    }

    /// Notes a local patch write from `before` to `after`. Only declared fields whose
    /// value is a pure function of their own key qualify: not authority fields (they
    /// write proposals), not counters (their op-id deltas live elsewhere), not a field
    /// another one was renamed from. `only_fields`: the change wrote nothing but the
    /// patch, its op record and the delete marker.
    pub(super) fn note_write(
        &mut self,
        coll: &Collection,
        before: Vec<ChangeHash>,
        after: &[ChangeHash],
        patch: &Patch,
        only_fields: bool,
    ) {
        let plain = |field: &str| {
            coll.fields
                .get(field)
                .is_some_and(|f| !matches!(f.rule, Rule::Authority | Rule::Counter))
                && !coll
                    .fields
                    .values()
                    .any(|f| f.renamed_from.as_deref() == Some(field))
        };
        self.write = (only_fields && patch.ops.iter().all(|(f, _)| plain(f)))
            .then(|| (before, after.to_vec(), patch.fields()));
    }
}

impl Entity {
    /// [`Self::derive`], for the write path: after a local write of plain fields it
    /// re-derives only those fields from the last derivation (the same result, as the
    /// `rederive_matches_a_full_derive` property test checks); otherwise in full.
    pub fn derive_for_write(&mut self, ws: &Workspace) -> Result<Derived, Error> {
        let heads = self.doc.get_heads();
        let version = ws.schema.version();
        let last = self.rederive.last.take();
        let write = self.rederive.write.take();
        let derived = match (last, write) {
            (Some(last), Some((before, after, fields)))
                if last.heads == before && after == heads && last.version == version =>
            {
                self.rederive_fields(ws, last.derived, &fields)?
            }
            _ => self.derive(ws)?,
        };
        self.rederive.last = Some(Box::new(Kept {
            heads,
            version,
            derived: derived.clone(),
        }));
        Ok(derived)
    }

    /// `last` with `fields` derived again, and the entries that follow from them.
    fn rederive_fields(
        &self,
        ws: &Workspace,
        mut last: Derived,
        fields: &[String],
    ) -> Result<Derived, Error> {
        let collection = self
            .collection()
            .ok_or_else(|| Error::Document(format!("entity {} has no _collection", self.id)))?;
        let coll = ws.schema.collection(&collection)?;
        let mig = std::cell::OnceCell::new();
        let view = &mut last.view;
        for field in fields {
            let rule = coll.rule(field);
            let all = self.field_values(coll, field, &mig);
            view.remove(field);
            last.conflicts.retain(|c| c.field != *field);
            let semantics = rules::of(rule);
            let values = Values {
                doc: &self.doc,
                field,
                rule,
                all: &all,
            };
            // No value left (a removal): no entry, as a full derive finds no key.
            if let Some(v) = (!all.is_empty())
                .then(|| semantics.merged(&values))
                .flatten()
            {
                view.insert(field.clone(), v);
            }
            if let (true, Some(state)) = (all.len() > 1, semantics.conflict()) {
                if let Some(c) = self.conflict(&collection, field.clone(), rule, state, &all) {
                    // In field order, as a full derive lists them.
                    let at = last.conflicts.partition_point(|k| k.field < *field);
                    last.conflicts.insert(at, c);
                }
            }
            if let (Some(d), false) = (
                coll.fields.get(field).and_then(|f| f.default.as_ref()),
                view.contains_key(field),
            ) {
                view.insert(field.clone(), d.clone());
            }
        }
        set_open_conflicts(view, &last.conflicts);
        // A local write leaves the entity alive: `delete_wins` refuses to write a deleted
        // one, and in `update_wins` the write's marker replaces every tombstone it saw.
        view.remove("_deleted");
        Ok(last)
    }

    /// The view, conflicts and proposals of the entity, derived together in one pass.
    pub fn derive(&self, ws: &Workspace) -> Result<Derived, Error> {
        let collection = self
            .collection()
            .ok_or_else(|| Error::Document(format!("entity {} has no _collection", self.id)))?;
        let coll = ws.schema.collection(&collection)?;
        let mut view = View::new();
        let mut conflicts = Vec::new();
        let mig = std::cell::OnceCell::new();
        // Values under a field's earlier name read as the field's (`renamed_from`).
        let mut fields: BTreeMap<String, super::migrate::FieldValues> = BTreeMap::new();
        let renames: Vec<(&str, &String)> = coll
            .fields
            .iter()
            .filter_map(|(n, f)| Some((f.renamed_from.as_deref()?, n)))
            .collect();
        let mut renamed = false;
        for (key, all) in self.root_fields() {
            let name = renames
                .iter()
                .find(|(old, _)| *old == key)
                .map(|(_, n)| (*n).clone());
            renamed |= name.is_some();
            fields.entry(name.unwrap_or(key)).or_default().extend(all);
        }
        for (field, all) in fields.iter_mut() {
            if renamed {
                all.sort_by(|a, b| a.1.cmp(&b.1));
            }
            self.yield_to_people(coll.rule(field), all, &mig);
        }
        for (field, all) in fields {
            let rule = coll.rule(&field);
            if *rule == Rule::Authority {
                continue;
            }
            let semantics = rules::of(rule);
            let values = Values {
                doc: &self.doc,
                field: &field,
                rule,
                all: &all,
            };
            if let Some(v) = semantics.merged(&values) {
                view.insert(field.clone(), v);
            }
            if let (true, Some(state)) = (all.len() > 1, semantics.conflict()) {
                if let Some(c) = self.conflict(&collection, field, rule, state, &all) {
                    conflicts.push(c);
                }
            }
        }
        // Counters written only by op id have no root value yet.
        for (name, spec) in &coll.fields {
            if spec.rule == Rule::Counter
                && !view.contains_key(name)
                && !rules::delta_entries(&self.doc, name).is_empty()
            {
                view.insert(
                    name.clone(),
                    Json::from(rules::sum_with_deltas(&self.doc, name, &[])),
                );
            }
        }
        // Read-time defaults of fields that have no value (nothing is written).
        for (name, spec) in &coll.fields {
            if let (Some(d), false) = (&spec.default, view.contains_key(name)) {
                view.insert(name.clone(), d.clone());
            }
        }
        // The newest valid confirmation of each authority field.
        let confirmed: BTreeMap<&str, Confirmation> = coll
            .fields
            .iter()
            .filter(|(_, spec)| spec.rule == Rule::Authority)
            .filter_map(|(name, _)| Some((name.as_str(), self.confirmations(ws, name).pop()?)))
            .collect();
        for (field, c) in &confirmed {
            if !c.value.is_null() {
                view.insert((*field).to_owned(), c.value.clone());
            }
        }
        set_open_conflicts(&mut view, &conflicts);
        let proposals = self.pending(&collection, &confirmed);
        let mut pending = Map::new();
        for p in &proposals {
            // Proposals are in id order, so the newest per field wins.
            pending.insert(p.record.field.clone(), p.record.value.clone());
        }
        if !pending.is_empty() {
            view.insert("_pending".into(), Json::Object(pending));
        }
        if self.is_deleted(coll) {
            view.insert("_deleted".into(), Json::Bool(true));
        }
        view.insert("_id".into(), Json::String(self.id.to_string()));
        let resolved = self.resolved(&collection);
        view.insert("_collection".into(), Json::String(collection));
        Ok(Derived {
            view,
            conflicts,
            proposals,
            resolved,
        })
    }

    /// Pending proposals, oldest first. A proposal is settled once the newest confirmation
    /// of its field accepted it or a newer one (even if it reached the authority only after
    /// that acceptance), or once the confirmed value equals it. Repeats — the same field
    /// and value from the same device, or the same operation id — count once (the oldest).
    fn pending(&self, collection: &str, confirmed: &BTreeMap<&str, Confirmation>) -> Vec<Proposal> {
        let mut seen: BTreeSet<(String, String, String)> = BTreeSet::new();
        let mut seen_ops: BTreeSet<(String, String)> = BTreeSet::new();
        self.proposal_records()
            .into_iter()
            .filter(|(id, record)| {
                let c = confirmed.get(record.field.as_str());
                c.and_then(|c| c.accepts).is_none_or(|upto| *id > upto)
                    && c.is_none_or(|c| c.value != record.value)
            })
            .filter(|(_, r)| seen.insert((r.field.clone(), r.value.to_string(), r.peer.clone())))
            .filter(|(_, r)| {
                r.op.as_ref()
                    .is_none_or(|op| seen_ops.insert((r.field.clone(), op.clone())))
            })
            .map(|(id, record)| Proposal {
                id,
                entity: self.id,
                collection: collection.to_owned(),
                record,
            })
            .collect()
    }

    /// A conflict on `field` if its concurrent values are not all equal.
    fn conflict(
        &self,
        collection: &str,
        field: String,
        rule: &Rule,
        state: ConflictState,
        all: &[(Value<'_>, ObjId)],
    ) -> Option<Conflict> {
        let mut values: Vec<Json> = Vec::new();
        for (v, id) in all {
            let j = to_json(&self.doc, v, id);
            if !values.contains(&j) {
                values.push(j);
            }
        }
        if values.len() < 2 {
            return None;
        }
        let op_ids: Vec<String> = all.iter().map(|(_, id)| id.to_string()).collect();
        Some(Conflict {
            id: ConflictId::derive(self.id, &field, &op_ids),
            collection: collection.to_owned(),
            entity: self.id,
            field,
            values,
            rule: rule.name(),
            state,
            resolution: None,
        })
    }

    /// Resolved conflicts on record, by id (the union over concurrent copies of the map).
    fn resolved(&self, collection: &str) -> Vec<Conflict> {
        let mut out = BTreeMap::new();
        for obj in super::layout::map_objects(&self.doc, &ROOT, super::layout::K_RESOLVED) {
            for key in self.doc.keys(&obj) {
                let Ok(id) = key.parse::<ConflictId>() else {
                    continue;
                };
                let Some(text) = super::json::scalar_str(&self.doc, &obj, &key) else {
                    continue;
                };
                let Ok(r) = serde_json::from_str::<ResolvedRecord>(&text) else {
                    continue;
                };
                let rule = crate::schema::Rule::name_of(&r.rule);
                out.entry(id.clone()).or_insert(Conflict {
                    id,
                    collection: collection.to_owned(),
                    entity: self.id,
                    field: r.field,
                    values: r.values,
                    rule,
                    state: ConflictState::Resolved,
                    resolution: Some(r.resolution),
                });
            }
        }
        out.into_values().collect()
    }

    /// The view of the entity (see [`Entity::derive`]).
    pub fn view(&self, ws: &Workspace) -> Result<View, Error> {
        Ok(self.derive(ws)?.view)
    }

    /// Fields with several distinct concurrent values. Counters, sets and text merge and
    /// never conflict; `manual` fields conflict `open`, the others `auto`.
    pub fn conflicts(&self, ws: &Workspace) -> Vec<Conflict> {
        self.derive(ws).map(|d| d.conflicts).unwrap_or_default()
    }

    /// Pending proposals, oldest first (see [`Entity::derive`]).
    pub fn proposals(&self, ws: &Workspace) -> Vec<Proposal> {
        self.derive(ws).map(|d| d.proposals).unwrap_or_default()
    }

    /// Every non-reserved root field with all its concurrent values, in one pass over the
    /// root map; `get_all` only where Automerge reports a conflict.
    pub(super) fn root_fields(&self) -> Vec<(String, Vec<(Value<'static>, ObjId)>)> {
        self.doc
            .map_range(ROOT, ..)
            .filter(|item| !item.key.starts_with('_'))
            .map(|item| {
                let key = item.key.to_string();
                let values = if item.conflict {
                    self.doc
                        .get_all(ROOT, key.as_str())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(v, id)| (v.into_owned(), id))
                        .collect()
                } else {
                    vec![(item.value.clone().into_value(), item.id())]
                };
                (key, values)
            })
            .collect()
    }
}
