//! One entity = one Automerge document, and the pure functions over it: writing a checked
//! patch, and deriving the view, conflicts, proposals and history from the document state.
//!
//! - [`layout`]: where things live in the document, and the deterministic creation change;
//! - this module: the entity's life (create, load, save, merge) and its writes;
//! - `authority`: proposals, signed confirmations and settling them;
//! - `derive`: the view, conflicts and proposals, derived together;
//! - `integrity`: what a receiver checks in another node's changes;
//! - `history`: the audit trail, with each field's value before and after;
//! - [`json`]: Automerge ↔ JSON.
//!
//! What each merge rule means lives in `crate::rules`, one module per rule.

mod authority;
mod derive;
mod history;
mod integrity;
pub(crate) mod json;
pub(crate) mod layout;
mod migrate;

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, AutoCommit, ChangeHash, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

pub use derive::{Conflict, ConflictState, Derived, Proposal, ProposalRecord, Resolution};
pub use history::{FieldChange, HistoryEntry};
pub use integrity::Integrity;

use crate::authority::Confirmation;
use crate::ids::{ConflictId, EntityId, OpId, PeerId, ProposalId};
use crate::patch::Patch;
use crate::rules;
use crate::schema::{Collection, OnDelete, Rule};
use crate::workspace::Workspace;
use crate::Error;
use layout::{K_CREATED, K_DELETED, K_OPS};

/// Saved documents larger than this are compressed (bytes, uncompressed).
const DEFLATE_ABOVE: usize = 16 << 10;

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
    /// The key that confirms authority fields: the authority's, on the authority node, or
    /// a delegate's. Its authority-field writes are confirmed values, everyone else's are
    /// proposals.
    pub authority_key: Option<&'a ed25519::Keypair>,
    /// On a delegate: the authority's confirmation of its delegation, carried by every
    /// record it signs (see `crate::authority`).
    pub delegation: Option<Confirmation>,
}

impl Writer<'_> {
    fn actor(&self) -> ActorId {
        ActorId::from(self.peer.to_bytes())
    }
}

/// Whether a write with an operation id took effect now or had already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The write changed the document (or, without an op id, was simply applied).
    Now,
    /// The document already holds this operation (a retry): nothing was written.
    Already,
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
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    op: Option<String>,
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
    /// The latest change time among the heads when this node began its current write: the
    /// write's change is never older (read before the write opens a transaction, because
    /// reading heads would commit it).
    seen_ms: i64,
    /// The heads `seen_ms` was read at: while they have not changed (this node's own
    /// writes one after another) it is not read again (reading a change's time makes
    /// Automerge rebuild the change).
    seen_heads: Vec<ChangeHash>,
    /// During `resolve`: the record of the resolution, written in the same change.
    resolve_record: Option<(String, String)>,
    /// The last derivation and the local write after it, so that write re-derives only
    /// the fields it touched (`derive::Rederive`).
    rederive: derive::Rederive,
}

/// Runs an Automerge decode of received bytes, turning a panic into an error: Automerge 0.12
/// panics on some malformed documents (fuzzing found a column decoder unwrapping a
/// truncated number), and a hostile peer must not be able to crash a node with them.
fn guarded<T>(decode: impl FnOnce() -> Result<T, automerge::AutomergeError>) -> Result<T, Error> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(result) => result.map_err(Error::automerge),
        Err(_) => Err(Error::Document(
            "malformed document: the Automerge decoder failed on it".into(),
        )),
    }
}

impl Entity {
    /// A new entity of `collection`, holding `patch`.
    pub fn create(
        ws: &Workspace,
        id: EntityId,
        collection: &str,
        w: &Writer<'_>,
        patch: &Patch,
        new_proposal: &mut dyn FnMut() -> ProposalId,
    ) -> Result<Self, Error> {
        Self::create_op(ws, id, collection, w, patch, None, new_proposal)
    }

    /// A new entity of `collection`, holding `patch`, recording operation `op`.
    ///
    /// Two changes: the creation change, identical on every node that creates this entity
    /// with this content (see [`layout`]), then the writer's own: `_created`, the op id,
    /// and authority fields (proposals or signed values).
    pub fn create_op(
        ws: &Workspace,
        id: EntityId,
        collection: &str,
        w: &Writer<'_>,
        patch: &Patch,
        op: Option<&OpId>,
        new_proposal: &mut dyn FnMut() -> ProposalId,
    ) -> Result<Self, Error> {
        let coll = ws.schema.collection(collection)?;
        let plain = Patch {
            ops: patch
                .ops
                .iter()
                .filter(|(f, _)| *coll.rule(f) != Rule::Authority)
                .cloned()
                .collect(),
        };
        let mut doc =
            AutoCommit::new().with_actor(layout::creation_actor(ws.id, id, collection, &plain));
        let root = layout::initial_root(coll, collection, &plain, doc.text_encoding());
        doc.init_root_from_hydrate(&root)
            .map_err(Error::automerge)?;
        let note = ChangeNote {
            user: String::new(),
            kind: "init".into(),
            fields: plain.fields(),
            op: None,
        };
        doc.commit_with(
            CommitOptions::default()
                .with_message(serde_json::to_string(&note).unwrap_or_default())
                .with_time(0),
        );
        // The only change so far is the creation change, at time 0.
        let seen_heads = doc.get_heads();
        let mut entity = Entity {
            id,
            doc,
            persisted: vec![],
            collection: Some(collection.to_owned()),
            seen_ms: 0,
            seen_heads,
            resolve_record: None,
            rederive: Default::default(),
        };
        entity.set_writer(w);
        let created = entity.map(K_CREATED)?;
        entity
            .doc
            .put(&created, w.peer.to_string(), w.now_ms.clamp(0, MAX_TIME_MS))
            .map_err(Error::automerge)?;
        if let Some(op) = op {
            entity.record_op(
                op,
                &layout::fingerprint(collection, "put", &layout::canonical(patch)),
            )?;
        }
        let authority_ops = Patch {
            ops: patch
                .ops
                .iter()
                .filter(|(f, _)| *coll.rule(f) == Rule::Authority)
                .cloned()
                .collect(),
        };
        entity.write_patch(ws, coll, w, &authority_ops, op, new_proposal)?;
        entity.commit(w, "create", patch.fields(), op);
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
        Self::load_with(
            id,
            AutoCommit::load_unverified_heads(snapshot).map_err(Error::automerge)?,
            changes,
        )
    }

    fn load_with(id: EntityId, mut doc: AutoCommit, changes: &[Vec<u8>]) -> Result<Self, Error> {
        for c in changes {
            doc.load_incremental(c).map_err(Error::automerge)?;
        }
        let persisted = doc.get_heads();
        let collection = layout::read_collection(&doc);
        Ok(Entity {
            id,
            doc,
            persisted,
            collection,
            seen_ms: 0,
            seen_heads: vec![],
            resolve_record: None,
            rederive: Default::default(),
        })
    }

    /// Loads an entity received from elsewhere (a bundle), checking that it is one:
    /// it must name a collection.
    pub fn load_received(id: EntityId, bytes: &[u8]) -> Result<Self, Error> {
        let doc = guarded(|| AutoCommit::load(bytes))?;
        // Not persisted here yet: the first save stores it whole.
        let collection = layout::read_collection(&doc);
        let entity = Entity {
            id,
            doc,
            persisted: vec![],
            collection,
            seen_ms: 0,
            seen_heads: vec![],
            resolve_record: None,
            rederive: Default::default(),
        };
        if entity.collection().is_none() {
            return Err(Error::Document(format!("entity {id} has no _collection")));
        }
        Ok(entity)
    }

    /// Sets the actor for this node's next writes (call before writing).
    pub fn set_writer(&mut self, w: &Writer<'_>) {
        self.doc.set_actor(w.actor());
        let heads = self.doc.get_heads();
        if heads != self.seen_heads {
            // The change's metadata, not the change: rebuilding a change re-encodes its ops.
            self.seen_ms = heads
                .iter()
                .filter_map(|h| self.doc.get_change_meta_by_hash(h).map(|m| m.timestamp))
                .max()
                .unwrap_or(0);
            self.seen_heads = heads;
        }
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

    /// The whole document, compacted; marks everything as persisted. Small documents are
    /// saved without DEFLATE: setting up a compressor per column cost more than the rest
    /// of a write (callgrind, `examples/write_profile`), for a few hundred bytes saved.
    pub fn save(&mut self) -> Vec<u8> {
        let plain = self.doc.save_nocompress();
        let bytes = if plain.len() > DEFLATE_ABOVE {
            self.doc.save()
        } else {
            plain
        };
        self.persisted = self.doc.get_heads();
        bytes
    }

    /// The changes not yet persisted (since load or the last save), as one chunk.
    /// Whether the document holds changes not saved yet (a put of the value already there
    /// makes none: Automerge drops it).
    pub fn has_unsaved_changes(&mut self) -> bool {
        self.doc.get_heads() != self.persisted
    }

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
        MEM_BASE
            + s.num_ops as usize * MEM_PER_OP
            + s.num_changes as usize * MEM_PER_CHANGE
            + s.num_actors as usize * MEM_PER_ACTOR
            + self.rederive.memory_estimate()
    }

    /// Whether the document was never persisted (created here or received whole).
    pub fn is_new(&self) -> bool {
        self.persisted.is_empty()
    }

    /// The changes after `have` (heads of another copy), as one chunk. Heads this copy does
    /// not know are ignored, so the result may hold more than needed, never less.
    pub fn changes_after(&mut self, have: &[ChangeHash]) -> Vec<u8> {
        let known: Vec<ChangeHash> = have
            .iter()
            .filter(|h| self.doc.get_change_meta_by_hash(h).is_some())
            .copied()
            .collect();
        self.doc.save_after(&known)
    }

    /// Merges another copy's document bytes; whether anything new arrived. After an error
    /// the entity must be dropped (it may hold part of the bytes).
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Result<bool, Error> {
        let before = self.doc.get_heads();
        guarded(|| self.doc.load_incremental(bytes))?;
        self.collection = layout::read_collection(&self.doc);
        Ok(self.doc.get_heads() != before)
    }

    /// Applies a checked patch as one change.
    pub fn update(
        &mut self,
        ws: &Workspace,
        w: &Writer<'_>,
        patch: &Patch,
        new_proposal: &mut dyn FnMut() -> ProposalId,
    ) -> Result<(), Error> {
        self.update_op(ws, w, patch, None, new_proposal).map(|_| ())
    }

    /// Applies a checked patch as one change, once per operation id: if the document
    /// already holds `op` (a retry, here or on another node) nothing is written.
    pub fn update_op(
        &mut self,
        ws: &Workspace,
        w: &Writer<'_>,
        patch: &Patch,
        op: Option<&OpId>,
        new_proposal: &mut dyn FnMut() -> ProposalId,
    ) -> Result<Applied, Error> {
        let coll = self.schema_collection(ws)?;
        let fp = layout::fingerprint(
            &self.collection.clone().unwrap_or_default(),
            "put",
            &layout::canonical(patch),
        );
        if let Some(op) = op {
            if self.op_seen(op, &fp)? {
                return Ok(Applied::Already);
            }
        }
        // Migrations first, so the write follows them (and sees what they filled in).
        self.migrate(ws)?;
        self.update_as(
            ws,
            coll,
            w,
            patch,
            op.map(|o| (o, fp)),
            new_proposal,
            "update",
        )?;
        Ok(Applied::Now)
    }

    #[allow(clippy::too_many_arguments)]
    fn update_as(
        &mut self,
        ws: &Workspace,
        coll: &Collection,
        w: &Writer<'_>,
        patch: &Patch,
        op: Option<(&OpId, String)>,
        new_proposal: &mut dyn FnMut() -> ProposalId,
        kind: &str,
    ) -> Result<(), Error> {
        if self.is_deleted(coll) && coll.on_delete == OnDelete::DeleteWins {
            return Err(Error::Deleted(self.id));
        }
        self.set_writer(w);
        // `set_writer` read the heads: the state this write starts from.
        let before = self.seen_heads.clone();
        let res = (|| {
            if coll.on_delete == OnDelete::UpdateWins {
                // Every update re-asserts "alive"; a delete that saw it overwrites it, a
                // concurrent delete does not (see `is_deleted`). The marker must differ from
                // the current value: Automerge drops a put of the value already there.
                let marker = layout::next_marker(&self.doc, &ROOT, K_DELETED);
                self.doc
                    .put(ROOT, K_DELETED, marker)
                    .map_err(Error::automerge)?;
            }
            if let Some((op, fp)) = &op {
                self.record_op(op, fp)?;
            }
            if let Some((key, text)) = self.resolve_record.clone() {
                let resolved = self.map(layout::K_RESOLVED)?;
                self.doc
                    .put(&resolved, key, text)
                    .map_err(Error::automerge)?;
            }
            self.write_patch(
                ws,
                coll,
                w,
                patch,
                op.as_ref().map(|(o, _)| *o),
                new_proposal,
            )
        })();
        if let Err(e) = res {
            self.doc.rollback();
            return Err(e);
        }
        self.commit(w, kind, patch.fields(), op.map(|(o, _)| o));
        let only_fields = self.resolve_record.is_none();
        self.rederive
            .note_write(coll, before, &self.seen_heads, patch, only_fields);
        Ok(())
    }

    /// Marks the entity deleted (a tombstone that merges like any write).
    pub fn delete(&mut self, ws: &Workspace, w: &Writer<'_>) -> Result<(), Error> {
        self.delete_op(ws, w, None).map(|_| ())
    }

    /// Marks the entity deleted, once per operation id.
    pub fn delete_op(
        &mut self,
        ws: &Workspace,
        w: &Writer<'_>,
        op: Option<&OpId>,
    ) -> Result<Applied, Error> {
        let coll = self.schema_collection(ws)?;
        let fp = layout::fingerprint(
            &self.collection.clone().unwrap_or_default(),
            "delete",
            &Json::Null,
        );
        if let Some(op) = op {
            if self.op_seen(op, &fp)? {
                return Ok(Applied::Already);
            }
        }
        if self.is_deleted(coll) {
            return Err(Error::Deleted(self.id));
        }
        self.set_writer(w);
        if let Some(op) = op {
            if let Err(e) = self.record_op(op, &fp) {
                self.doc.rollback();
                return Err(e);
            }
        }
        self.doc
            .put(ROOT, K_DELETED, true)
            .map_err(Error::automerge)?;
        self.commit(w, "delete", vec![], op);
        Ok(Applied::Now)
    }

    /// Writes `value` to the field of conflict `id`, which settles it because the write has
    /// seen every concurrent value.
    pub fn resolve(
        &mut self,
        ws: &Workspace,
        w: &Writer<'_>,
        id: &ConflictId,
        value: &Json,
    ) -> Result<(), Error> {
        let conflict = self
            .conflicts(ws)
            .into_iter()
            .find(|c| &c.id == id)
            .ok_or_else(|| Error::NotFound(format!("conflict {id} (already resolved?)")))?;
        let coll = self.schema_collection(ws)?;
        let patch = Patch::from_json(
            coll,
            &Json::Object(Map::from_iter([(conflict.field.clone(), value.clone())])),
        )?;
        let record = derive::ResolvedRecord {
            field: conflict.field,
            values: conflict.values,
            rule: conflict.rule.to_owned(),
            resolution: Resolution {
                chosen: value.clone(),
                user: w.user.to_owned(),
                peer: w.peer.to_string(),
                time_ms: w.now_ms,
            },
        };
        let record = (
            id.to_string(),
            serde_json::to_string(&record).map_err(|e| Error::Document(e.to_string()))?,
        );
        self.resolve_record = Some(record);
        // `resolve` writes only fields that can conflict, which excludes authority fields.
        let res = self.update_as(
            ws,
            coll,
            w,
            &patch,
            None,
            &mut || ProposalId(uuid::Uuid::nil()),
            "resolve",
        );
        self.resolve_record = None;
        res
    }

    /// Whether the document already holds operation `op`; an op id that named a different
    /// write is refused.
    fn op_seen(&self, op: &OpId, fingerprint: &str) -> Result<bool, Error> {
        let mut seen = false;
        for ops in layout::map_objects(&self.doc, &ROOT, K_OPS) {
            for (v, _) in self.doc.get_all(&ops, op.as_str()).unwrap_or_default() {
                let Value::Scalar(s) = v else { continue };
                let ScalarValue::Str(fp) = s.as_ref() else {
                    continue;
                };
                if fp.as_str() != fingerprint {
                    return Err(Error::OpReused(op.clone()));
                }
                seen = true;
            }
        }
        Ok(seen)
    }

    fn record_op(&mut self, op: &OpId, fingerprint: &str) -> Result<(), Error> {
        let ops = self.map(K_OPS)?;
        self.doc
            .put(&ops, op.as_str(), fingerprint)
            .map_err(Error::automerge)
    }

    /// The root map `key`, made here if this (older) document has none.
    fn map(&mut self, key: &str) -> Result<automerge::ObjId, Error> {
        match self.doc.get(ROOT, key).map_err(Error::automerge)? {
            Some((Value::Object(ObjType::Map), id)) => Ok(id),
            _ => self
                .doc
                .put_object(ROOT, key, ObjType::Map)
                .map_err(Error::automerge),
        }
    }

    fn schema_collection<'w>(&self, ws: &'w Workspace) -> Result<&'w Collection, Error> {
        let name = self
            .collection()
            .ok_or_else(|| Error::Document(format!("entity {} has no _collection", self.id)))?;
        ws.schema.collection(&name)
    }

    /// Commits the pending operations as one change. Its time is the writer's clock, but
    /// never earlier than a change it has seen, so a causally later write is never older
    /// (`lww` compares times). Automerge delta-encodes times; clamping to 0 … year
    /// ~144,000 keeps a bad clock from overflowing that encoding.
    fn commit(&mut self, w: &Writer<'_>, kind: &str, fields: Vec<String>, op: Option<&OpId>) {
        let note = ChangeNote {
            user: w.user.to_owned(),
            kind: kind.to_owned(),
            fields,
            op: op.map(|o| o.to_string()),
        };
        let msg = serde_json::to_string(&note).unwrap_or_default();
        let time = w.now_ms.max(self.seen_ms).clamp(0, MAX_TIME_MS);
        self.doc
            .commit_with(CommitOptions::default().with_message(msg).with_time(time));
        // If a change was made, it is the one head now, and its time is `time`.
        let heads = self.doc.get_heads();
        if heads != self.seen_heads {
            self.seen_ms = time;
            self.seen_heads = heads;
        }
    }

    fn write_patch(
        &mut self,
        ws: &Workspace,
        coll: &Collection,
        w: &Writer<'_>,
        patch: &Patch,
        op: Option<&OpId>,
        new_proposal: &mut dyn FnMut() -> ProposalId,
    ) -> Result<(), Error> {
        for (field, fop) in &patch.ops {
            let rule = coll.rule(field);
            if *rule == Rule::Authority {
                self.write_authority(ws, w, field, fop, op, new_proposal)?;
                continue;
            }
            let mut write = rules::Write {
                doc: &mut self.doc,
                field,
                rule,
                op_id: op.map(OpId::as_str),
            };
            rules::of(rule).write(&mut write, fop)?;
            // The write has seen the values under the field's earlier name: it replaces them.
            if let Some(old) = coll
                .fields
                .get(field)
                .and_then(|f| f.renamed_from.as_deref())
            {
                if self.doc.get(ROOT, old).map_err(Error::automerge)?.is_some() {
                    self.doc.delete(ROOT, old).map_err(Error::automerge)?;
                }
            }
        }
        Ok(())
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

    /// The user an entity belongs to: its collection's `owner` field, when that holds text
    /// (read through the field's rule, so every replica names the same owner).
    pub fn owner(&self, ws: &Workspace) -> Option<String> {
        let coll = self.schema_collection(ws).ok()?;
        let field = coll.owner.as_deref()?;
        match self.merged_field(coll, field, &std::cell::OnceCell::new())? {
            Json::String(s) => Some(s),
            _ => None,
        }
    }
}
