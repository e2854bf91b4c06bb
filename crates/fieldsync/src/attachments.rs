//! Attachments on a replica: the node's blob store (`DATA/blobs`), attaching a stored file
//! to an entity's `attachments` field, the check that every reference a local write adds
//! names a blob held here with that size, and the collection of blobs that no live entity
//! references any more.
//!
//! **A reference is written only after its blob is durably in the local store**: every
//! local write path (put, attach, import) pins each new reference's blob first (a
//! collection running at the same time then keeps it) and refuses a reference to a file
//! this node does not hold. References that arrive from peers are not checked: their
//! bytes are on the writer's node, and the network layer fetches them (on demand, or
//! eagerly on relays and for `prefetch` collections).
//!
//! Which live entities reference which file is kept in the store's `blob` index, written
//! with each entity: serving a file and collecting unreferenced ones never scan the views.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fieldsync_blobs::{BlobStore, Hash};
use fieldsync_core::attachment::{in_view, Reference};
use fieldsync_core::{EntityId, FieldOp, Patch, Rule};
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::replica::INDEX_BLOB;
use crate::{Error, Replica};

/// The blob store's directory inside the data directory.
pub const BLOBS_DIR: &str = "blobs";

/// The files of a node that keeps them outside a blob store on disk — a browser tab keeps
/// them in IndexedDB — as the reference check sees them: a local write may reference a
/// file only once [`Self::pin`] finds it durably held. Set with
/// [`Replica::with_held_blobs`]; a node without it uses its blob store (`DATA/blobs`).
pub trait HeldBlobs: Send + Sync {
    /// The size of the file `hash` if it is durably held here (and marks it as just used).
    fn pin(&self, hash: &Hash) -> Option<u64>;
}

/// The blob store in `status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BlobStatus {
    /// Blobs held here.
    pub count: u64,
    /// Bytes they hold.
    pub bytes: u64,
    /// The store's quota and per-blob limit (`[blobs]` in the config).
    pub quota_bytes: u64,
    pub max_blob_bytes: u64,
}

impl Replica {
    /// Sets the blob store's limits (before its first use).
    pub fn with_blob_config(self, config: fieldsync_blobs::Config) -> Self {
        *self.blob_config.lock().unwrap_or_else(|p| p.into_inner()) = config;
        self
    }

    /// Keeps this node's files in `held` instead of a blob store on disk (see
    /// [`HeldBlobs`]).
    pub fn with_held_blobs(self, held: Arc<dyn HeldBlobs>) -> Self {
        let _ = self.held_blobs.set(held);
        self
    }

    /// Replaces the blob store's limits; the store opens again with them on its next use.
    pub fn set_blob_config(&self, config: fieldsync_blobs::Config) {
        *self.blob_config.lock().unwrap_or_else(|p| p.into_inner()) = config;
        *self.blobs.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// This node's blob store, opened on first use.
    pub fn blobs(&self) -> Result<Arc<BlobStore>, Error> {
        let mut slot = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(store) = slot.as_ref() {
            return Ok(store.clone());
        }
        if self.encrypted() {
            // The store encrypts documents at rest; blob files are not encrypted yet, so
            // they are refused rather than kept in the clear beside an encrypted store.
            return Err(Error::BlobsEncrypted);
        }
        let config = self
            .blob_config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let store = Arc::new(BlobStore::open(&self.dir.join(BLOBS_DIR), config)?);
        *slot = Some(store.clone());
        Ok(store)
    }

    /// The blob store's counts, without creating it where there is none.
    pub fn blob_status(&self) -> BlobStatus {
        let config = self
            .blob_config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut status = BlobStatus {
            quota_bytes: config.quota_bytes,
            max_blob_bytes: config.max_blob_bytes,
            ..Default::default()
        };
        let exists = self.dir.join(BLOBS_DIR).is_dir()
            || self
                .blobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some();
        if let (true, Ok(store)) = (exists, self.blobs()) {
            status.count = store.count();
            status.bytes = store.bytes();
        }
        status
    }

    /// Adds `reference` (`{hash, size, mime, name}`) to the `attachments` field `field` of
    /// an existing entity, once its blob is here; the checked reference.
    pub fn attach(
        &self,
        collection: &str,
        id: EntityId,
        field: &str,
        reference: &Json,
    ) -> Result<Reference, Error> {
        self.check_attach_target(collection, id, field)?;
        let checked = Reference::from_json(field, reference)?;
        let patch = json!({ field: { "$add": [checked.to_json()] } });
        self.put_op(collection, Some(id), &patch.to_string(), None)?;
        Ok(checked)
    }

    /// Whether a file may be attached to `field` of entity `id`: the field is an
    /// `attachments` field and the entity exists. [`Self::attach`] checks it too; a caller
    /// that must store the bytes first (a browser tab) asks before it does.
    pub fn check_attach_target(
        &self,
        collection: &str,
        id: EntityId,
        field: &str,
    ) -> Result<(), Error> {
        let ws = self.ws();
        let coll = ws.schema.collection(collection)?;
        let rule = coll.rule(field);
        if *rule != Rule::Attachments {
            return Err(Error::NotAttachments {
                collection: collection.to_owned(),
                field: field.to_owned(),
                rule: rule.name(),
            });
        }
        // Attaching creates nothing: the entity must exist (a mistyped id is not found).
        self.get(collection, id)?;
        Ok(())
    }

    /// Refuses a local write that adds a reference to a blob this node does not hold (or
    /// holds with another size), and pins the blobs it names. References the entity
    /// already shows are not checked again (they may have come from a peer).
    pub(crate) fn check_attachments(
        &self,
        collection: &str,
        id: Option<EntityId>,
        patch: &Patch,
    ) -> Result<(), Error> {
        let ws = self.ws();
        let Ok(coll) = ws.schema.collection(collection) else {
            return Ok(());
        };
        let mut current = None;
        for (field, op) in &patch.ops {
            if *coll.rule(field) != Rule::Attachments {
                continue;
            }
            let (FieldOp::Add(items) | FieldOp::Set(Json::Array(items))) = op else {
                continue;
            };
            if current.is_none() {
                current = Some(match id.map(|id| self.get(collection, id)) {
                    Some(Ok(view)) => view,
                    _ => Default::default(),
                });
            }
            let shown = in_view(current.as_ref().and_then(|v| v.get(field)));
            for item in items {
                let r = Reference::from_json(field, item)?;
                if shown.contains(&r) {
                    continue;
                }
                self.pin_reference(&r)?;
            }
        }
        Ok(())
    }

    /// Pins the blob of `r`, checking its size.
    fn pin_reference(&self, r: &Reference) -> Result<(), Error> {
        let hash: Hash = r.hash.parse()?;
        let held = match self.held_blobs.get() {
            Some(held) => held
                .pin(&hash)
                .ok_or(fieldsync_blobs::Error::NotFound(hash)),
            None => self.blobs()?.pin(&hash),
        };
        let size = match held {
            Ok(size) => size,
            Err(fieldsync_blobs::Error::NotFound(_)) => {
                return Err(Error::BlobMissing {
                    hash: r.hash.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        if size != r.size {
            return Err(Error::BlobSizeMismatch {
                hash: r.hash.clone(),
                claimed: r.size,
                actual: size,
            });
        }
        Ok(())
    }

    /// Whether this node may send the file `hash` to `peer`: the peer is a member (or the
    /// authority) and a live entity that its member may see references the file.
    pub fn may_serve_blob(
        &self,
        peer: &fieldsync_core::PeerId,
        hash: &Hash,
    ) -> Result<bool, Error> {
        use fieldsync_core::membership::Admission;
        let grant = match self.member_list()?.admit(peer, None, self.now_ms()) {
            Admission::Admitted(grant) => grant,
            _ => return Ok(false),
        };
        for (key, collection) in self.store.index_prefix(INDEX_BLOB, hash.as_bytes())? {
            let (Some(id), Ok(collection)) = (index_entity(&key), std::str::from_utf8(&collection))
            else {
                return Err(Error::CorruptMeta("blob index entry".into()));
            };
            if self.visible(&grant, collection, id)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The blobs that live (not deleted) entities on this node reference.
    pub fn referenced_blobs(&self) -> Result<HashSet<Hash>, Error> {
        self.referenced_in(&|_| true)
    }

    /// The blobs this node should fetch without being asked, and does not hold: on a relay
    /// (`everything`) every file a live entity references, elsewhere those of `prefetch`
    /// collections. In hash order.
    pub fn missing_blobs(&self, everything: bool) -> Result<Vec<Hash>, Error> {
        if self.encrypted() {
            return Ok(Vec::new());
        }
        let wanted = self.referenced_in(&|c| everything || c.prefetch)?;
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let store = self.blobs()?;
        let mut missing: Vec<Hash> = wanted.into_iter().filter(|h| !store.contains(h)).collect();
        missing.sort();
        Ok(missing)
    }

    /// The blobs referenced by live entities of the collections `pick` keeps.
    fn referenced_in(
        &self,
        pick: &dyn Fn(&fieldsync_core::Collection) -> bool,
    ) -> Result<HashSet<Hash>, Error> {
        let ws = self.ws();
        let mut out = HashSet::new();
        for (key, collection) in self.store.index(INDEX_BLOB)? {
            let picked = std::str::from_utf8(&collection)
                .ok()
                .and_then(|c| ws.schema.collections.get(c))
                .is_some_and(pick);
            if picked {
                let hash: [u8; 32] = key
                    .get(..32)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(|| Error::CorruptMeta("blob index entry".into()))?;
                out.insert(Hash::from_bytes(hash));
            }
        }
        Ok(out)
    }

    /// Writes the `blob` index for entities stored before it existed (once per store):
    /// every live entity that references a file is stored again, with its index entries.
    pub(crate) fn index_blob_references(&self) -> Result<(), Error> {
        if self.store.meta(META_BLOB_INDEX)?.is_some() {
            return Ok(());
        }
        let ws = self.ws();
        for (name, coll) in &ws.schema.collections {
            let fields = attachment_fields(coll);
            if fields.is_empty() {
                continue;
            }
            let mut ids = Vec::new();
            self.list(name, &[], false, &mut |view| {
                let refers = fields.iter().any(|f| !in_view(view.get(*f)).is_empty());
                if let Some(id) = view
                    .get("_id")
                    .and_then(Json::as_str)
                    .and_then(|i| i.parse::<EntityId>().ok())
                    .filter(|_| refers)
                {
                    ids.push(id);
                }
                true
            })?;
            for page in ids.chunks(256) {
                let _guards = self.lock_many(page.iter().copied());
                let mut writes = Vec::with_capacity(page.len());
                for id in page {
                    if let Some(mut entity) = self.load(*id)? {
                        writes.push(self.entity_write(&mut entity)?);
                    }
                }
                self.commit_durable(writes, vec![])?;
            }
            if !ids.is_empty() {
                tracing::info!(collection = %name, entities = ids.len(), "indexed the files entities reference");
            }
        }
        self.commit_durable(vec![], vec![(META_BLOB_INDEX.to_owned(), Some(vec![1]))])
    }

    /// The blobs the attachment fields of entities `ids` reference (as stored now).
    pub(crate) fn blobs_of(&self, ids: &[EntityId]) -> Result<HashSet<Hash>, Error> {
        let ws = self.ws();
        let mut out = HashSet::new();
        for id in ids {
            let Some(entity) = self.load_committed(*id)? else {
                continue;
            };
            let Some(coll) = entity
                .collection()
                .and_then(|c| ws.schema.collections.get(&c).cloned())
            else {
                continue;
            };
            let view = entity.view(&ws)?;
            for (name, _) in coll
                .fields
                .iter()
                .filter(|(_, f)| f.rule == Rule::Attachments)
            {
                out.extend(
                    in_view(view.get(name))
                        .iter()
                        .filter_map(|r| r.hash.parse::<Hash>().ok()),
                );
            }
        }
        Ok(out)
    }

    /// Removes, at once, those of `blobs` that no live entity here references (a purge
    /// erases its entity's files now, not after the grace period).
    pub(crate) fn remove_unless_referenced(&self, blobs: &HashSet<Hash>) -> Result<(), Error> {
        if blobs.is_empty() || !self.dir.join(BLOBS_DIR).is_dir() {
            return Ok(());
        }
        let referenced = self.referenced_blobs()?;
        let store = self.blobs()?;
        for hash in blobs.difference(&referenced) {
            store.remove(hash)?;
        }
        Ok(())
    }

    /// Removes the blobs that no live entity references and that were stored or last
    /// pinned more than `grace` ago; the hashes removed.
    pub fn collect_blobs(&self, grace: Duration) -> Result<Vec<Hash>, Error> {
        if !self.dir.join(BLOBS_DIR).is_dir() || self.encrypted() {
            return Ok(Vec::new());
        }
        let store = self.blobs()?;
        if store.count() == 0 {
            return Ok(Vec::new());
        }
        // Read before the ages are: a reference written after this pinned its blob, so
        // the blob is younger than the cutoff and stays.
        let referenced = self.referenced_blobs()?;
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(store.remove_unreferenced(&|h| referenced.contains(h), cutoff)?)
    }
}

/// Marks a store whose `blob` index covers every entity.
pub(crate) const META_BLOB_INDEX: &str = "blob_index";

/// The `blob` index keys of an entity with view `view` in `coll`: (hash, entity id) for
/// each file its attachment fields reference; none once it is deleted.
pub(crate) fn blob_index_keys(
    coll: &fieldsync_core::Collection,
    id: EntityId,
    view: &serde_json::Map<String, Json>,
) -> Vec<Vec<u8>> {
    if view.contains_key("_deleted") {
        return Vec::new();
    }
    let mut keys: Vec<Vec<u8>> = attachment_fields(coll)
        .into_iter()
        .flat_map(|f| in_view(view.get(f)))
        .filter_map(|r| r.hash.parse::<Hash>().ok())
        .map(|h| [h.as_bytes().as_slice(), id.as_bytes().as_slice()].concat())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The entity of a `blob` index key.
fn index_entity(key: &[u8]) -> Option<EntityId> {
    let id: [u8; 16] = key.get(32..48)?.try_into().ok()?;
    Some(EntityId::from_bytes(id))
}

/// The fields of `coll` under the `attachments` rule.
fn attachment_fields(coll: &fieldsync_core::Collection) -> Vec<&String> {
    coll.fields
        .iter()
        .filter(|(_, f)| f.rule == Rule::Attachments)
        .map(|(n, _)| n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"
[collections.jobs.fields]
photos = { rule = "attachments" }
"#;

    fn attached_photo(replica: &Replica, job: EntityId, bytes: &[u8]) -> (Hash, Json) {
        let stored = replica
            .blobs()
            .expect("blob store")
            .write_from(&mut &bytes[..], Some(bytes.len() as u64))
            .expect("store the photo");
        let reference = json!({ "hash": stored.hash.to_string(), "size": stored.size, "mime": "image/jpeg", "name": "p.jpg" });
        replica
            .attach("jobs", job, "photos", &reference)
            .expect("attach");
        (stored.hash, reference)
    }

    /// The index follows the views: a photo removed from its job is no longer referenced,
    /// one in a second job is until that job is deleted too.
    #[test]
    fn the_file_index_follows_references_as_they_come_and_go() {
        let tmp = tempfile::tempdir().expect("tmp");
        let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").expect("init");
        let (a, b) = (
            hq.put("jobs", None, r#"{"title": "A"}"#).expect("job"),
            hq.put("jobs", None, r#"{"title": "B"}"#).expect("job"),
        );
        let (first, first_ref) = attached_photo(&hq, a, b"first photo");
        let (shared, _) = attached_photo(&hq, a, b"shared photo");
        attached_photo(&hq, b, b"shared photo");
        assert_eq!(
            hq.referenced_blobs().expect("referenced"),
            [first, shared].into()
        );
        let removal = json!({ "photos": { "$remove": [first_ref] } });
        hq.put("jobs", Some(a), &removal.to_string())
            .expect("remove the photo");
        assert_eq!(hq.referenced_blobs().expect("referenced"), [shared].into());
        hq.delete("jobs", a).expect("delete");
        assert_eq!(hq.referenced_blobs().expect("referenced"), [shared].into());
        hq.delete("jobs", b).expect("delete");
        assert!(hq.referenced_blobs().expect("referenced").is_empty());
    }

    /// A store written before the index existed gets it when it is opened.
    #[test]
    fn a_store_without_the_file_index_is_indexed_when_opened() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("hq");
        let hq = Replica::init_authority(&dir, SCHEMA, "hq").expect("init");
        let job = hq.put("jobs", None, r#"{"title": "A"}"#).expect("job");
        let (hash, _) = attached_photo(&hq, job, b"an old photo");
        // As an older version stored it: no index entries, no mark.
        let mut entity = hq.load(job).expect("load").expect("held");
        let mut write = hq.entity_write(&mut entity).expect("write");
        write.index.retain(|(name, _, _)| name != INDEX_BLOB);
        hq.commit_durable(vec![write], vec![(META_BLOB_INDEX.to_owned(), None)])
            .expect("commit");
        assert!(hq.referenced_blobs().expect("referenced").is_empty());
        drop(hq);
        let hq = Replica::open(&dir).expect("reopen");
        assert_eq!(hq.referenced_blobs().expect("referenced"), [hash].into());
        assert!(hq.store.meta(META_BLOB_INDEX).expect("meta").is_some());
    }
}
