//! One entity = one Automerge document, and the pure functions over it: writing a checked
//! patch, and deriving the view, conflicts, proposals and history from the document state.
//!
//! Document layout (root map):
//! - declared and undeclared fields are root keys named like the field;
//! - `_collection`: the collection name, written once at creation;
//! - `_deleted`: the tombstone register (see [`Entity::is_deleted`]);
//! - `_auth`: map field → map seq → signed [`Confirmation`] JSON (authority fields);
//! - `_prop`: map proposal id → [`ProposalRecord`] JSON (pending proposals).
//!
//! Sets are maps from the element's canonical JSON to `true`, so Automerge's map semantics
//! give add-wins for free: a remove deletes only the adds it has seen. Counters are Automerge
//! counters, text fields Automerge text. Each change's message records the user, the kind
//! of write and the fields touched; the change's actor is the writing peer.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{hydrate, ActorId, AutoCommit, ChangeHash, ObjId, ObjType, Prop, ReadDoc, ScalarValue, Value, ROOT};
use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::authority::{seq_key, Confirmation};
use crate::ids::{ConflictId, EntityId, PeerId, ProposalId};
use crate::patch::{FieldOp, Patch};
use crate::schema::{Collection, OnDelete, Rule};
use crate::workspace::Workspace;
use crate::Error;

const K_COLLECTION: &str = "_collection";
const K_DELETED: &str = "_deleted";
const K_AUTH: &str = "_auth";
const K_PROP: &str = "_prop";
/// Latest change time stored (ms since the Unix epoch).
const MAX_TIME_MS: i64 = 1 << 52;

/// An app's view of an entity: its fields plus `_id`, `_collection` and, when present,
/// `_conflicts`, `_pending` and `_deleted`.
pub type View = Map<String, Json>;

/// Who writes, and when. Time comes from the caller: the core reads no clock.
#[derive(Clone, Debug)]
pub struct Writer<'a> {
    pub peer: PeerId,
    pub user: &'a str,
    pub now_ms: i64,
    /// The authority's key, on the authority node only: its authority-field writes are
    /// confirmed values, everyone else's are proposals.
    pub authority_key: Option<&'a ed25519::Keypair>,
}

impl Writer<'_> {
    fn actor(&self) -> ActorId {
        ActorId::from(self.peer.to_bytes())
    }
}

/// What a change says about itself, stored as its message.
#[derive(Serialize, Deserialize)]
struct ChangeNote {
    #[serde(rename = "u")]
    user: String,
    #[serde(rename = "k")]
    kind: String,
    #[serde(rename = "f", default)]
    fields: Vec<String>,
}

/// A pending proposal, as stored under `_prop`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ProposalRecord {
    pub field: String,
    pub value: Json,
    pub peer: String,
    pub user: String,
    pub time_ms: i64,
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
}

/// One change in an entity's history.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistoryEntry {
    pub change: String,
    pub device: String,
    pub user: String,
    pub time_ms: i64,
    pub kind: String,
    pub fields: Vec<String>,
}

/// What is derived from an entity's document: its view, conflicts and pending proposals.
#[derive(Clone, Debug, PartialEq)]
pub struct Derived {
    pub view: View,
    pub conflicts: Vec<Conflict>,
    pub proposals: Vec<Proposal>,
}

/// Authority records and other contents of a document, as [`Entity::integrity`] finds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Integrity {
    /// Signatures of the valid confirmations present.
    pub confirmed: BTreeSet<String>,
    /// Authority records that do not verify (`field/seq`).
    pub forged: BTreeSet<String>,
    /// Non-reserved root fields (counted for `_members` entities only).
    pub plain_fields: usize,
    /// Pending proposal records (`_members` only).
    pub proposals: usize,
    /// Whether a tombstone was ever written (`_members` only).
    pub tombstone: bool,
}

/// Runs an Automerge decode of received bytes, turning a panic into an error: Automerge 0.12
/// panics on some malformed documents (fuzzing found a column decoder unwrapping a
/// truncated number), and a hostile peer must not be able to crash a node with them.
fn guarded<T>(decode: impl FnOnce() -> Result<T, automerge::AutomergeError>) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(result) => result.map_err(Error::automerge),
        Err(_) => Err(Error::Document("malformed document: the Automerge decoder failed on it".into())),
    }
}

/// Memory model of [`Entity::memory_estimate`]: fixed cost per document…
const MEM_BASE: usize = 16 << 10;
/// …per operation…
const MEM_PER_OP: usize = 64;
/// …per change (graph node, hash, metadata)…
const MEM_PER_CHANGE: usize = 128;
/// …and per actor.
const MEM_PER_ACTOR: usize = 64;

/// An entity's document with the operations fieldsync performs on it.
#[derive(Debug)]
pub struct Entity {
    id: EntityId,
    doc: AutoCommit,
    /// Heads already in storage: `save_incremental` returns what came after them.
    persisted: Vec<ChangeHash>,
    /// `_collection`, read once per document state (it is written only at creation).
    collection: Option<String>,
}

impl Entity {
    /// A new entity of `collection`, holding `patch` as its first change.
    pub fn create(ws: &Workspace, id: EntityId, collection: &str, w: &Writer<'_>, patch: &Patch, new_proposal: &mut dyn FnMut() -> ProposalId) -> Result<Self, Error> {
        let coll = ws.schema.collection(collection)?;
        let mut doc = AutoCommit::new().with_actor(w.actor());
        let root = initial_root(coll, collection, patch, doc.text_encoding());
        doc.init_root_from_hydrate(&root).map_err(Error::automerge)?;
        let mut entity = Entity { id, doc, persisted: vec![], collection: Some(collection.to_owned()) };
        // Authority fields need the entity id in their signature, so they go the normal way.
        let authority_ops = Patch {
            ops: patch.ops.iter().filter(|(f, _)| *coll.rule(f) == Rule::Authority).cloned().collect(),
        };
        entity.write_patch(ws, coll, w, &authority_ops, new_proposal, true)?;
        entity.commit(w, "create", patch.fields());
        Ok(entity)
    }

    /// Loads an entity from a snapshot and appended changes, verifying every change hash
    /// (for data from elsewhere).
    pub fn load(id: EntityId, snapshot: &[u8], changes: &[Vec<u8>]) -> Result<Self, Error> {
        guarded(|| {
            let mut doc = AutoCommit::load(snapshot)?;
            for c in changes {
                doc.load_incremental(c)?;
            }
            Ok(doc)
        })
        .and_then(|doc| Self::load_with(id, doc, &[]))
    }

    /// Loads an entity this node stored itself: the heads' hashes were verified when the
    /// data arrived, so loading skips recomputing them (about twice as fast).
    pub fn load_stored(id: EntityId, snapshot: &[u8], changes: &[Vec<u8>]) -> Result<Self, Error> {
        Self::load_with(id, AutoCommit::load_unverified_heads(snapshot).map_err(Error::automerge)?, changes)
    }

    fn load_with(id: EntityId, mut doc: AutoCommit, changes: &[Vec<u8>]) -> Result<Self, Error> {
        for c in changes {
            doc.load_incremental(c).map_err(Error::automerge)?;
        }
        let persisted = doc.get_heads();
        let collection = read_collection(&doc);
        Ok(Entity { id, doc, persisted, collection })
    }

    /// Loads an entity received from elsewhere (a bundle), checking that it is one:
    /// it must name a collection.
    pub fn load_received(id: EntityId, bytes: &[u8]) -> Result<Self, Error> {
        let doc = guarded(|| AutoCommit::load(bytes))?;
        // Not persisted here yet: the first save stores it whole.
        let collection = read_collection(&doc);
        let entity = Entity { id, doc, persisted: vec![], collection };
        if entity.collection().is_none() {
            return Err(Error::Document(format!("entity {id} has no _collection")));
        }
        Ok(entity)
    }

    /// Sets the actor for this node's next writes.
    pub fn set_writer(&mut self, w: &Writer<'_>) {
        self.doc.set_actor(w.actor());
    }

    pub fn id(&self) -> EntityId {
        self.id
    }

    /// The collection named at creation.
    pub fn collection(&self) -> Option<String> {
        self.collection.clone()
    }

    /// The current heads.
    pub fn heads(&mut self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The whole document, compacted; marks everything as persisted.
    pub fn save(&mut self) -> Vec<u8> {
        let bytes = self.doc.save();
        self.persisted = self.doc.get_heads();
        bytes
    }

    /// The changes not yet persisted (since load or the last save), as one chunk.
    pub fn save_incremental(&mut self) -> Vec<u8> {
        let bytes = self.doc.save_after(&self.persisted);
        self.persisted = self.doc.get_heads();
        bytes
    }

    /// Roughly how many bytes this entity holds in memory (Automerge keeps per document a
    /// change graph, an op set and actor tables). Calibrated on 10-field tasks with
    /// `cargo run --release -p fieldsync --example doc_memory`: ~19 KB fresh, ~200 B more
    /// per update. Used to bound caches by bytes.
    pub fn memory_estimate(&self) -> usize {
        let s = self.doc.stats();
        MEM_BASE + s.num_ops as usize * MEM_PER_OP + s.num_changes as usize * MEM_PER_CHANGE + s.num_actors as usize * MEM_PER_ACTOR
    }

    /// Whether the document was never persisted (created here or received whole).
    pub fn is_new(&self) -> bool {
        self.persisted.is_empty()
    }

    /// The changes after `have` (heads of another copy), as one chunk. Heads this copy does
    /// not know are ignored, so the result may hold more than needed, never less.
    pub fn changes_after(&mut self, have: &[ChangeHash]) -> Vec<u8> {
        let known: Vec<ChangeHash> = have.iter().filter(|h| self.doc.get_change_by_hash(h).is_some()).copied().collect();
        self.doc.save_after(&known)
    }

    /// Merges another copy's document bytes; whether anything new arrived. After an error
    /// the entity must be dropped (it may hold part of the bytes).
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Result<bool, Error> {
        let before = self.doc.get_heads();
        guarded(|| self.doc.load_incremental(bytes))?;
        self.collection = read_collection(&self.doc);
        Ok(self.doc.get_heads() != before)
    }

    /// Applies a checked patch as one change.
    pub fn update(&mut self, ws: &Workspace, w: &Writer<'_>, patch: &Patch, new_proposal: &mut dyn FnMut() -> ProposalId) -> Result<(), Error> {
        self.update_as(ws, w, patch, new_proposal, "update")
    }

    fn update_as(&mut self, ws: &Workspace, w: &Writer<'_>, patch: &Patch, new_proposal: &mut dyn FnMut() -> ProposalId, kind: &str) -> Result<(), Error> {
        let coll = self.schema_collection(ws)?;
        if self.is_deleted(coll) && coll.on_delete == OnDelete::DeleteWins {
            return Err(Error::Deleted(self.id));
        }
        self.set_writer(w);
        if coll.on_delete == OnDelete::UpdateWins {
            // Every update re-asserts "alive"; a delete that saw it overwrites it, a
            // concurrent delete does not (see `is_deleted`). The marker must differ from the
            // current value: Automerge drops a put of the value already there.
            let marker = self.next_marker(&ROOT, K_DELETED);
            self.doc.put(ROOT, K_DELETED, marker).map_err(Error::automerge)?;
        }
        if let Err(e) = self.write_patch(ws, coll, w, patch, new_proposal, false) {
            self.doc.rollback();
            return Err(e);
        }
        self.commit(w, kind, patch.fields());
        Ok(())
    }

    /// Marks the entity deleted (a tombstone that merges like any write).
    pub fn delete(&mut self, ws: &Workspace, w: &Writer<'_>) -> Result<(), Error> {
        let coll = self.schema_collection(ws)?;
        if self.is_deleted(coll) {
            return Err(Error::Deleted(self.id));
        }
        self.set_writer(w);
        self.doc.put(ROOT, K_DELETED, true).map_err(Error::automerge)?;
        self.commit(w, "delete", vec![]);
        Ok(())
    }

    /// Writes `value` to the field of conflict `id`, which settles it because the write has
    /// seen every concurrent value.
    pub fn resolve(&mut self, ws: &Workspace, w: &Writer<'_>, id: &ConflictId, value: &Json) -> Result<(), Error> {
        let conflict = self
            .conflicts(ws)
            .into_iter()
            .find(|c| &c.id == id)
            .ok_or_else(|| Error::NotFound(format!("conflict {id} (already resolved?)")))?;
        let coll = self.schema_collection(ws)?;
        let patch = Patch::from_json(coll, &Json::Object(Map::from_iter([(conflict.field, value.clone())])))?;
        self.update_as(ws, w, &patch, &mut || unreachable_proposal(), "resolve")
    }

    /// On the authority: confirms proposal `id`, settling it and older proposals for the
    /// same field.
    pub fn accept(&mut self, ws: &Workspace, w: &Writer<'_>, id: ProposalId, kind: &str) -> Result<(), Error> {
        let key = w.authority_key.ok_or(Error::NotAuthority)?;
        let proposal = self.proposal(id)?;
        self.set_writer(w);
        let field = proposal.field.clone();
        let res = (|| -> Result<(), automerge::AutomergeError> {
            self.confirm(ws, key, &field, proposal.value.clone(), Some(id))?;
            self.settle_proposals(&field, Some(id))
        })();
        if let Err(e) = res {
            self.doc.rollback();
            return Err(Error::automerge(e));
        }
        self.commit(w, kind, vec![field]);
        Ok(())
    }

    /// On the authority: drops proposal `id` without confirming it.
    pub fn reject(&mut self, w: &Writer<'_>, id: ProposalId) -> Result<(), Error> {
        if w.authority_key.is_none() {
            return Err(Error::NotAuthority);
        }
        let proposal = self.proposal(id)?;
        self.set_writer(w);
        let prop = self.prop_map().ok_or_else(|| Error::NotFound(format!("proposal {id}")))?;
        self.doc.delete(&prop, id.to_string()).map_err(Error::automerge)?;
        self.commit(w, "reject", vec![proposal.field]);
        Ok(())
    }

    fn proposal(&self, id: ProposalId) -> Result<ProposalRecord, Error> {
        self.proposal_records()
            .into_iter()
            .find(|(pid, _)| *pid == id)
            .map(|(_, r)| r)
            .ok_or_else(|| Error::NotFound(format!("proposal {id} (already settled?)")))
    }

    fn schema_collection<'w>(&self, ws: &'w Workspace) -> Result<&'w Collection, Error> {
        let name = self.collection().ok_or_else(|| Error::Document(format!("entity {} has no _collection", self.id)))?;
        ws.schema.collection(&name)
    }

    fn commit(&mut self, w: &Writer<'_>, kind: &str, fields: Vec<String>) {
        let note = ChangeNote { user: w.user.to_owned(), kind: kind.to_owned(), fields };
        let msg = serde_json::to_string(&note).unwrap_or_default();
        // Automerge delta-encodes change times; clamping to a sane range (0 to year ~144,000)
        // keeps a bad clock from overflowing that encoding.
        let time = w.now_ms.clamp(0, MAX_TIME_MS);
        self.doc.commit_with(CommitOptions::default().with_message(msg).with_time(time));
    }

    fn write_patch(&mut self, ws: &Workspace, coll: &Collection, w: &Writer<'_>, patch: &Patch, new_proposal: &mut dyn FnMut() -> ProposalId, creating: bool) -> Result<(), Error> {
        for (field, op) in &patch.ops {
            let rule = coll.rule(field);
            match (rule, op) {
                (Rule::Authority, FieldOp::Set(v)) => self.write_authority(ws, w, field, v.clone(), new_proposal)?,
                (Rule::Authority, FieldOp::Remove) => self.write_authority(ws, w, field, Json::Null, new_proposal)?,
                (Rule::Counter, FieldOp::Inc(n)) => {
                    let all = self.doc.get_all(ROOT, field.as_str()).map_err(Error::automerge)?;
                    let current = self.field_value(rule, &all).and_then(|v| v.as_i64()).unwrap_or(0);
                    crate::numeric::counter_add(field, current, *n)?;
                    self.increment(field, *n)?
                }
                (Rule::Counter, FieldOp::Set(v)) => {
                    let n = v.as_i64().unwrap_or(0);
                    if creating {
                        self.doc.put(ROOT, field.as_str(), ScalarValue::counter(n)).map_err(Error::automerge)?;
                    } else {
                        // "Set to n" is the increment from the value this writer sees, so
                        // concurrent increments elsewhere still add up.
                        let all = self.doc.get_all(ROOT, field.as_str()).map_err(Error::automerge)?;
                        let current = self.field_value(rule, &all).and_then(|v| v.as_i64()).unwrap_or(0);
                        self.increment(field, crate::numeric::counter_delta(field, current, n)?)?;
                    }
                }
                (Rule::Set, FieldOp::Add(items)) => self.set_add(field, items)?,
                (Rule::Set, FieldOp::RemoveElems(items)) => self.set_remove(field, items)?,
                (Rule::Set, FieldOp::Set(Json::Array(items))) => {
                    let present: Vec<String> = self.set_members(field).into_keys().collect();
                    let wanted: BTreeSet<String> = items.iter().map(element_key).collect();
                    let gone: Vec<Json> = present
                        .iter()
                        .filter(|k| !wanted.contains(*k))
                        .filter_map(|k| serde_json::from_str(k).ok())
                        .collect();
                    self.set_remove(field, &gone)?;
                    self.set_add(field, items)?;
                }
                (Rule::Text, FieldOp::Set(Json::String(s))) => {
                    let text = match self.doc.get(ROOT, field.as_str()).map_err(Error::automerge)? {
                        Some((Value::Object(ObjType::Text), id)) => id,
                        _ => self.doc.put_object(ROOT, field.as_str(), ObjType::Text).map_err(Error::automerge)?,
                    };
                    self.doc.update_text(&text, s).map_err(Error::automerge)?;
                }
                (_, FieldOp::Set(v)) => put_json(&mut self.doc, &ROOT, Prop::Map(field.clone()), v).map_err(Error::automerge)?,
                (_, FieldOp::Remove) => {
                    // Removing an absent field is a no-op, not an error.
                    if self.doc.get(ROOT, field.as_str()).map_err(Error::automerge)?.is_some() {
                        self.doc.delete(ROOT, field.as_str()).map_err(Error::automerge)?;
                    }
                }
                (rule, op) => {
                    return Err(Error::Patch(format!("field {field:?} (rule {}) does not take {op:?}", rule.name())))
                }
            }
        }
        Ok(())
    }

    fn increment(&mut self, field: &str, n: i64) -> Result<(), Error> {
        match self.doc.get(ROOT, field).map_err(Error::automerge)? {
            Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                self.doc.increment(ROOT, field, n).map_err(Error::automerge)
            }
            // Counters are made at creation; one missing (schema grew) starts here.
            _ => self.doc.put(ROOT, field, ScalarValue::counter(n)).map_err(Error::automerge),
        }
    }

    fn set_obj(&mut self, field: &str) -> Result<ObjId, Error> {
        match self.doc.get(ROOT, field).map_err(Error::automerge)? {
            Some((Value::Object(ObjType::Map), id)) => Ok(id),
            _ => self.doc.put_object(ROOT, field, ObjType::Map).map_err(Error::automerge),
        }
    }

    fn set_add(&mut self, field: &str, items: &[Json]) -> Result<(), Error> {
        let obj = self.set_obj(field)?;
        for item in items {
            // A fresh marker, so re-adding a present element is a new add that a concurrent
            // remove has not seen (add-wins), not a put Automerge would drop as unchanged.
            let key = element_key(item);
            let marker = self.next_marker(&obj, &key);
            self.doc.put(&obj, key, marker).map_err(Error::automerge)?;
        }
        Ok(())
    }

    /// An integer one above every integer concurrently stored at `obj.key`.
    fn next_marker(&self, obj: &ObjId, key: &str) -> i64 {
        let highest = self
            .doc
            .get_all(obj, key)
            .unwrap_or_default()
            .iter()
            .filter_map(|(v, _)| match v {
                Value::Scalar(s) => match s.as_ref() {
                    ScalarValue::Int(i) => Some(*i),
                    _ => None,
                },
                _ => None,
            })
            .max()
            .unwrap_or(0);
        highest.saturating_add(1)
    }

    fn set_remove(&mut self, field: &str, items: &[Json]) -> Result<(), Error> {
        // Remove from every concurrent copy of the set object: the remove has seen them all.
        for obj in self.set_objects(field) {
            for item in items {
                let key = element_key(item);
                if self.doc.get(&obj, key.as_str()).map_err(Error::automerge)?.is_some() {
                    self.doc.delete(&obj, key.as_str()).map_err(Error::automerge)?;
                }
            }
        }
        Ok(())
    }

    fn set_objects(&self, field: &str) -> Vec<ObjId> {
        self.doc
            .get_all(ROOT, field)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(v, id)| matches!(v, Value::Object(ObjType::Map)).then_some(id))
            .collect()
    }

    /// Set members (canonical key → element), the union over concurrent copies.
    fn set_members(&self, field: &str) -> BTreeMap<String, Json> {
        self.members_of(&self.doc.get_all(ROOT, field).unwrap_or_default())
    }

    fn write_authority(&mut self, ws: &Workspace, w: &Writer<'_>, field: &str, value: Json, new_proposal: &mut dyn FnMut() -> ProposalId) -> Result<(), Error> {
        match w.authority_key {
            Some(key) => {
                self.confirm(ws, key, field, value, None).map_err(Error::automerge)?;
                self.settle_proposals(field, None).map_err(Error::automerge)
            }
            None => {
                let record = ProposalRecord {
                    field: field.to_owned(),
                    value,
                    peer: w.peer.to_string(),
                    user: w.user.to_owned(),
                    time_ms: w.now_ms,
                };
                let prop = match self.prop_map() {
                    Some(p) => p,
                    None => self.doc.put_object(ROOT, K_PROP, ObjType::Map).map_err(Error::automerge)?,
                };
                let text = serde_json::to_string(&record).map_err(|e| Error::Document(e.to_string()))?;
                self.doc.put(&prop, new_proposal().to_string(), text).map_err(Error::automerge)
            }
        }
    }

    fn confirm(&mut self, ws: &Workspace, key: &ed25519::Keypair, field: &str, value: Json, accepts: Option<ProposalId>) -> Result<(), automerge::AutomergeError> {
        let seq = self.confirmations(ws, field).last().map(|c| c.seq).unwrap_or(0) + 1;
        let record = Confirmation::sign(key, ws.id, self.id, field, seq, value, accepts);
        let auth = match self.doc.get(ROOT, K_AUTH)? {
            Some((Value::Object(ObjType::Map), id)) => id,
            _ => self.doc.put_object(ROOT, K_AUTH, ObjType::Map)?,
        };
        let per_field = match self.doc.get(&auth, field)? {
            Some((Value::Object(ObjType::Map), id)) => id,
            _ => self.doc.put_object(&auth, field, ObjType::Map)?,
        };
        let text = serde_json::to_string(&record).unwrap_or_default();
        self.doc.put(&per_field, seq_key(seq), text)?;
        Ok(())
    }

    /// Deletes the pending proposals for `field` that are settled: all of them for a
    /// direct authority write, those up to `upto` for an acceptance.
    fn settle_proposals(&mut self, field: &str, upto: Option<ProposalId>) -> Result<(), automerge::AutomergeError> {
        let Some(prop) = self.prop_map() else { return Ok(()) };
        for (pid, record) in self.proposal_records() {
            if record.field == field && upto.is_none_or(|u| pid <= u) {
                self.doc.delete(&prop, pid.to_string())?;
            }
        }
        Ok(())
    }

    fn prop_map(&self) -> Option<ObjId> {
        match self.doc.get(ROOT, K_PROP) {
            Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
            _ => None,
        }
    }

    fn proposal_records(&self) -> Vec<(ProposalId, ProposalRecord)> {
        let mut out = Vec::new();
        for (v, obj) in self.doc.get_all(ROOT, K_PROP).unwrap_or_default() {
            if !matches!(v, Value::Object(ObjType::Map)) {
                continue;
            }
            for key in self.doc.keys(&obj) {
                let Ok(pid) = key.parse::<ProposalId>() else { continue };
                if let Some(text) = scalar_str(&self.doc, &obj, &key) {
                    if let Ok(record) = serde_json::from_str::<ProposalRecord>(&text) {
                        out.push((pid, record));
                    }
                }
            }
        }
        out.sort_by_key(|(pid, _)| *pid);
        out.dedup_by_key(|(pid, _)| *pid);
        out
    }

    /// Valid confirmations of `field`, by ascending seq. Records whose signature does not
    /// verify, or that sit under a key other than their seq, are ignored.
    fn confirmations(&self, ws: &Workspace, field: &str) -> Vec<Confirmation> {
        let mut out: Vec<Confirmation> = Vec::new();
        for (v, auth) in self.doc.get_all(ROOT, K_AUTH).unwrap_or_default() {
            if !matches!(v, Value::Object(ObjType::Map)) {
                continue;
            }
            for (v, per_field) in self.doc.get_all(&auth, field).unwrap_or_default() {
                if !matches!(v, Value::Object(ObjType::Map)) {
                    continue;
                }
                for key in self.doc.keys(&per_field) {
                    for (v, _) in self.doc.get_all(&per_field, key.as_str()).unwrap_or_default() {
                        let Value::Scalar(s) = v else { continue };
                        let ScalarValue::Str(text) = s.as_ref() else { continue };
                        let Ok(c) = serde_json::from_str::<Confirmation>(text) else { continue };
                        if seq_key(c.seq) == key && c.verify(&ws.authority, ws.id, self.id, field) {
                            out.push(c);
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.sig.cmp(&b.sig)));
        out
    }

    /// The newest valid confirmation of an authority `field`.
    pub fn confirmed(&self, ws: &Workspace, field: &str) -> Option<Confirmation> {
        self.confirmations(ws, field).pop()
    }

    /// The user an entity belongs to: its collection's `owner` field, when that holds text.
    pub fn owner(&self, ws: &Workspace) -> Option<String> {
        let field = self.schema_collection(ws).ok()?.owner.as_deref()?;
        match self.doc.get(ROOT, field).ok()?? {
            (Value::Scalar(s), _) => match s.as_ref() {
                ScalarValue::Str(t) => Some(t.to_string()),
                _ => None,
            },
            _ => None,
        }
    }

    /// What a receiver checks before and after merging another node's changes: which
    /// authority records verify and which do not, and what else the document holds.
    pub fn integrity(&self, ws: &Workspace) -> Integrity {
        let mut out = Integrity::default();
        // Only the member list is checked for anything but authority records.
        if self.collection.as_deref() == Some(crate::membership::MEMBERS) {
            out.plain_fields = self.doc.map_range(ROOT, ..).filter(|i| !i.key.starts_with('_')).count();
            out.proposals = self.proposal_records().len();
            out.tombstone = self.doc.get(ROOT, K_DELETED).ok().flatten().is_some();
        }
        for (v, auth) in self.doc.get_all(ROOT, K_AUTH).unwrap_or_default() {
            if !matches!(v, Value::Object(ObjType::Map)) {
                out.forged.insert(K_AUTH.to_owned());
                continue;
            }
            for field in self.doc.keys(&auth) {
                for (v, per_field) in self.doc.get_all(&auth, field.as_str()).unwrap_or_default() {
                    if !matches!(v, Value::Object(ObjType::Map)) {
                        out.forged.insert(field.clone());
                        continue;
                    }
                    for key in self.doc.keys(&per_field) {
                        for (v, _) in self.doc.get_all(&per_field, key.as_str()).unwrap_or_default() {
                            let valid = match &v {
                                Value::Scalar(s) => match s.as_ref() {
                                    ScalarValue::Str(text) => serde_json::from_str::<Confirmation>(text)
                                        .ok()
                                        .filter(|c| seq_key(c.seq) == key && c.verify(&ws.authority, ws.id, self.id, &field)),
                                    _ => None,
                                },
                                _ => None,
                            };
                            match valid {
                                Some(c) => out.confirmed.insert(c.sig),
                                None => out.forged.insert(format!("{field}/{key}")),
                            };
                        }
                    }
                }
            }
        }
        out
    }

    /// Whether the tombstone holds. A delete writes `true`; in `update_wins` collections
    /// every update writes an "alive" integer marker. `delete_wins`: any concurrent `true`
    /// wins. `update_wins`: any concurrent alive marker revives.
    pub fn is_deleted(&self, coll: &Collection) -> bool {
        let tombstones: Vec<bool> = self
            .doc
            .get_all(ROOT, K_DELETED)
            .unwrap_or_default()
            .into_iter()
            .map(|(v, _)| matches!(v, Value::Scalar(s) if matches!(s.as_ref(), ScalarValue::Boolean(true))))
            .collect();
        match coll.on_delete {
            OnDelete::DeleteWins => tombstones.contains(&true),
            OnDelete::UpdateWins => !tombstones.is_empty() && tombstones.iter().all(|t| *t),
        }
    }

    /// Every non-reserved root field with all its concurrent values, in one pass over the
    /// root map; `get_all` only where Automerge reports a conflict.
    fn root_fields(&self) -> Vec<(String, Vec<(Value<'static>, ObjId)>)> {
        self.doc
            .map_range(ROOT, ..)
            .filter(|item| !item.key.starts_with('_'))
            .map(|item| {
                let key = item.key.to_string();
                let values = if item.conflict {
                    self.doc.get_all(ROOT, key.as_str()).unwrap_or_default().into_iter().map(|(v, id)| (v.into_owned(), id)).collect()
                } else {
                    vec![(item.value.clone().into_value(), item.id())]
                };
                (key, values)
            })
            .collect()
    }

    /// Members of a set field given its concurrent values: the union of their keys.
    fn members_of(&self, all: &[(Value<'_>, ObjId)]) -> BTreeMap<String, Json> {
        let mut out = BTreeMap::new();
        for (v, obj) in all {
            if matches!(v, Value::Object(ObjType::Map)) {
                for k in self.doc.keys(obj) {
                    if let Ok(j) = serde_json::from_str(&k) {
                        out.insert(k, j);
                    }
                }
            }
        }
        out
    }

    /// The value of one field under its rule, from its concurrent values (the last entry is
    /// Automerge's own winner).
    fn field_value(&self, rule: &Rule, all: &[(Value<'_>, ObjId)]) -> Option<Json> {
        let (last_v, last_id) = all.last()?;
        let winner = || to_json(&self.doc, last_v, last_id);
        let values = || all.iter().map(|(v, id)| to_json(&self.doc, v, id));
        Some(match rule {
            Rule::Rank { order } => {
                let rank = |v: &Json| v.as_str().and_then(|s| order.iter().position(|o| o == s));
                // max_by_key keeps the last of equals, matching Automerge's winner on ties.
                values().max_by_key(|v| rank(v).map(|r| r as i64).unwrap_or(-1))?
            }
            Rule::Max => values().filter(Json::is_number).max_by(cmp_num).unwrap_or_else(winner),
            Rule::Min => values().filter(Json::is_number).min_by(cmp_num).unwrap_or_else(winner),
            Rule::Counter => Json::from(crate::numeric::counter_sum(all.iter().map(|(v, _)| counter_value(v)))),
            Rule::Set => Json::Array(self.members_of(all).into_values().collect()),
            _ => winner(),
        })
    }

    /// The view, conflicts and proposals of the entity, derived together in one pass.
    /// All three are pure functions of the document (and the workspace).
    pub fn derive(&self, ws: &Workspace) -> Result<Derived, Error> {
        let collection = self.collection().ok_or_else(|| Error::Document(format!("entity {} has no _collection", self.id)))?;
        let coll = ws.schema.collection(&collection)?;
        let mut view = View::new();
        let mut conflicts = Vec::new();
        for (field, all) in self.root_fields() {
            let rule = coll.rule(&field);
            if *rule == Rule::Authority {
                continue;
            }
            if let Some(v) = self.field_value(rule, &all) {
                view.insert(field.clone(), v);
            }
            if all.len() > 1 && !matches!(rule, Rule::Counter | Rule::Set | Rule::Text) {
                if let Some(c) = self.conflict(&collection, field, rule, &all) {
                    conflicts.push(c);
                }
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
        let open: Map<String, Json> = conflicts
            .iter()
            .filter(|c| c.state == ConflictState::Open)
            .map(|c| (c.field.clone(), Json::Array(c.values.clone())))
            .collect();
        if !open.is_empty() {
            view.insert("_conflicts".into(), Json::Object(open));
        }
        // A proposal is settled once the newest confirmation of its field accepted it or a
        // newer one, even if it reached the authority only after that acceptance.
        let accepted_upto: BTreeMap<&str, ProposalId> =
            confirmed.iter().filter_map(|(field, c)| Some((*field, c.accepts?))).collect();
        let proposals: Vec<Proposal> = self
            .proposal_records()
            .into_iter()
            .filter(|(id, record)| accepted_upto.get(record.field.as_str()).is_none_or(|upto| id > upto))
            .map(|(id, record)| Proposal { id, entity: self.id, collection: collection.clone(), record })
            .collect();
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
        view.insert("_collection".into(), Json::String(collection));
        Ok(Derived { view, conflicts, proposals })
    }

    /// A conflict on `field` if its concurrent values are not all equal.
    fn conflict(&self, collection: &str, field: String, rule: &Rule, all: &[(Value<'_>, ObjId)]) -> Option<Conflict> {
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
            state: if *rule == Rule::Manual { ConflictState::Open } else { ConflictState::Auto },
        })
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

    /// Fields with proposals the authority confirms on receipt (`auto_accept = true`):
    /// the newest proposal per such field.
    pub fn auto_acceptable(&self, ws: &Workspace) -> Vec<ProposalId> {
        let Ok(coll) = self.schema_collection(ws) else { return vec![] };
        let mut newest: BTreeMap<String, ProposalId> = BTreeMap::new();
        for (pid, record) in self.proposal_records() {
            if coll.fields.get(&record.field).is_some_and(|f| f.auto_accept && f.rule == Rule::Authority) {
                newest.insert(record.field, pid);
            }
        }
        newest.into_values().collect()
    }

    /// Every change, in causal order: device, user, time, kind and fields touched.
    pub fn history(&mut self) -> Vec<HistoryEntry> {
        self.doc
            .get_changes(&[])
            .into_iter()
            .map(|c| {
                let note: Option<ChangeNote> = c.message().and_then(|m| serde_json::from_str(m).ok());
                let device = PeerId::from_bytes(c.actor_id().to_bytes())
                    .map(|p| p.to_string())
                    .unwrap_or_else(|_| c.actor_id().to_hex_string());
                let (user, kind, fields) = note.map(|n| (n.user, n.kind, n.fields)).unwrap_or_default();
                HistoryEntry { change: c.hash().to_string(), device, user, time_ms: c.timestamp(), kind, fields }
            })
            .collect()
    }
}

/// The root of a new entity: `_collection`, the containers of merging fields (made once,
/// here, so replicas never race to create them — two concurrent creations would be two
/// separate objects), and the patch's non-authority fields. Built as one value so
/// Automerge inserts it in a single batch.
fn initial_root(coll: &Collection, collection: &str, patch: &Patch, encoding: automerge::TextEncoding) -> hydrate::Map {
    let mut root: HashMap<String, hydrate::Value> = HashMap::new();
    root.insert(K_COLLECTION.into(), ScalarValue::Str(collection.into()).into());
    for (name, spec) in &coll.fields {
        let empty = match spec.rule {
            Rule::Counter => ScalarValue::counter(0).into(),
            Rule::Set => hydrate::Value::Map(hydrate::Map::from(HashMap::<String, hydrate::Value>::new())),
            Rule::Text => hydrate::Value::Text(hydrate::Text::new(encoding, "")),
            _ => continue,
        };
        root.insert(name.clone(), empty);
    }
    if coll.fields.values().any(|f| f.rule == Rule::Authority) {
        root.insert(K_AUTH.into(), hydrate::Value::Map(HashMap::<String, hydrate::Value>::new().into()));
        root.insert(K_PROP.into(), hydrate::Value::Map(HashMap::<String, hydrate::Value>::new().into()));
    }
    if coll.on_delete == OnDelete::UpdateWins {
        root.insert(K_DELETED.into(), ScalarValue::Int(1).into());
    }
    for (field, op) in &patch.ops {
        let value = match (coll.rule(field), op) {
            (Rule::Authority, _) | (_, FieldOp::RemoveElems(_)) => continue,
            (_, FieldOp::Remove) => {
                root.remove(field);
                continue;
            }
            (Rule::Counter, FieldOp::Set(v)) => ScalarValue::counter(v.as_i64().unwrap_or(0)).into(),
            (_, FieldOp::Inc(n)) => ScalarValue::counter(*n).into(),
            (Rule::Set, FieldOp::Set(Json::Array(items)) | FieldOp::Add(items)) => {
                let members: HashMap<String, hydrate::Value> =
                    items.iter().map(|i| (element_key(i), ScalarValue::Int(1).into())).collect();
                hydrate::Value::Map(members.into())
            }
            (Rule::Text, FieldOp::Set(Json::String(t))) => hydrate::Value::Text(hydrate::Text::new(encoding, t)),
            (_, FieldOp::Set(v)) => json_hydrate(v),
            (_, FieldOp::Add(_)) => continue,
        };
        root.insert(field.clone(), value);
    }
    root.into()
}

fn json_hydrate(v: &Json) -> hydrate::Value {
    match v {
        Json::Object(m) => {
            let map: HashMap<String, hydrate::Value> = m.iter().map(|(k, v)| (k.clone(), json_hydrate(v))).collect();
            hydrate::Value::Map(map.into())
        }
        Json::Array(a) => hydrate::Value::List(a.iter().map(|v| json_hydrate(v)).collect::<Vec<_>>().into()),
        scalar => json_scalar(scalar).into(),
    }
}

fn unreachable_proposal() -> ProposalId {
    // `resolve` writes only fields that can conflict, which excludes authority fields.
    ProposalId(uuid::Uuid::nil())
}

fn read_collection(doc: &AutoCommit) -> Option<String> {
    match doc.get(ROOT, K_COLLECTION) {
        Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
            ScalarValue::Str(s) => Some(s.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn cmp_num(a: &Json, b: &Json) -> std::cmp::Ordering {
    let (x, y) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
    x.total_cmp(&y)
}

fn counter_value(v: &Value<'_>) -> i64 {
    match v {
        Value::Scalar(s) => match s.as_ref() {
            ScalarValue::Counter(c) => i64::from(c),
            ScalarValue::Int(i) => *i,
            _ => 0,
        },
        _ => 0,
    }
}

fn scalar_str(doc: &AutoCommit, obj: &ObjId, key: &str) -> Option<String> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(s), _))) => match s.as_ref() {
            ScalarValue::Str(t) => Some(t.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// The canonical key of a set element: its JSON text, integers without a fraction.
fn element_key(v: &Json) -> String {
    match v {
        Json::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => (f as i64).to_string(),
            _ => v.to_string(),
        },
        _ => v.to_string(),
    }
}

fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(t) => Json::String(t.to_string()),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f).map(Json::Number).unwrap_or(Json::Null),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(b) => Json::String(hex::encode(b)),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

/// Reads a value (recursively for objects) as JSON.
fn to_json(doc: &AutoCommit, v: &Value<'_>, id: &ObjId) -> Json {
    match v {
        Value::Scalar(s) => scalar_to_json(s),
        Value::Object(ObjType::Map | ObjType::Table) => {
            let mut m = Map::new();
            for k in doc.keys(id) {
                if let Ok(Some((cv, cid))) = doc.get(id, k.as_str()) {
                    m.insert(k, to_json(doc, &cv, &cid));
                }
            }
            Json::Object(m)
        }
        Value::Object(ObjType::List) => Json::Array(
            (0..doc.length(id))
                .filter_map(|i| doc.get(id, i).ok().flatten())
                .map(|(cv, cid)| to_json(doc, &cv, &cid))
                .collect(),
        ),
        Value::Object(ObjType::Text) => Json::String(doc.text(id).unwrap_or_default()),
    }
}

fn json_scalar(v: &Json) -> ScalarValue {
    match v {
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => ScalarValue::Int(i),
            (None, Some(u)) => ScalarValue::Uint(u),
            _ => ScalarValue::F64(n.as_f64().unwrap_or(0.0)),
        },
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        _ => ScalarValue::Null,
    }
}

/// Writes a JSON value at `prop` of `obj`, nested objects and arrays as Automerge objects.
fn put_json(doc: &mut AutoCommit, obj: &ObjId, prop: Prop, v: &Json) -> Result<(), automerge::AutomergeError> {
    let child = match v {
        Json::Object(_) => ObjType::Map,
        Json::Array(_) => ObjType::List,
        scalar => {
            return match prop {
                Prop::Map(k) => doc.put(obj, k, json_scalar(scalar)),
                Prop::Seq(i) => doc.insert(obj, i, json_scalar(scalar)),
            }
        }
    };
    let new = match prop {
        Prop::Map(k) => doc.put_object(obj, k, child)?,
        Prop::Seq(i) => doc.insert_object(obj, i, child)?,
    };
    match v {
        Json::Object(m) => m.iter().try_for_each(|(k, cv)| put_json(doc, &new, Prop::Map(k.clone()), cv)),
        Json::Array(a) => a.iter().enumerate().try_for_each(|(i, cv)| put_json(doc, &new, Prop::Seq(i), cv)),
        _ => Ok(()),
    }
}
