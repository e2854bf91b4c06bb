//! Erasure on a replica: issuing a purge (authority or admin), taking in purges from peers
//! and bundles, and refusing a purged entity forever after. The records are in
//! [`fieldsync_core::purge`].
//!
//! A purge is written as a `_purges` entity first (durable, so it syncs on), then the
//! entity is dropped whole with [`fieldsync_store::Store::purge`], which returns once no
//! byte of it is readable in the store's files. A crash between the two is finished on the
//! next open.

use fieldsync_core::membership::MemberRole;
use fieldsync_core::purge::{purge_entity_id, PurgeRecord, PURGES, RECORD};
use fieldsync_core::{Entity, EntityId, Patch};

use crate::replica::Replica;
use crate::Error;

impl Replica {
    /// Erases entity `id` of `collection` on every node (authority or admin only): signs a
    /// purge record, stores it in `_purges` (it syncs like any entity) and drops the entity's
    /// document, history, view and index entries here. The record is all that remains.
    pub fn purge(&self, collection: &str, id: EntityId) -> Result<PurgeRecord, Error> {
        if collection.starts_with('_') {
            return Err(Error::Refused(format!(
                "{collection} is built in; its entities cannot be purged"
            )));
        }
        let ws = self.ws();
        ws.schema.collection(collection)?;
        let may = self.authority
            || self
                .own_grant()?
                .is_some_and(|g| g.role == MemberRole::Admin);
        if !may {
            return Err(Error::Refused(
                "only the workspace authority or an admin member can purge entities".into(),
            ));
        }
        if self.is_purged(id)? {
            return Err(fieldsync_core::Error::NotFound(format!(
                "entity {id} (it was already purged)"
            ))
            .into());
        }
        match self.store.record(id.as_bytes())? {
            None => {
                return Err(Error::EntityNotFound {
                    collection: collection.to_owned(),
                    id,
                })
            }
            Some(r) if r.collection != collection => {
                return Err(Error::WrongCollection {
                    id,
                    actual: r.collection,
                    asked: collection.to_owned(),
                })
            }
            Some(_) => {}
        }
        let record = PurgeRecord::sign(&self.key, ws.id, collection, id, self.now_ms());
        let patch = Patch::from_json(
            ws.schema.collection(PURGES)?,
            &serde_json::json!({ RECORD: record.to_text() }),
        )?;
        self.put_patch(PURGES, Some(purge_entity_id(ws.id, id)), &patch)?;
        self.apply_purges(&[id])?;
        tracing::info!(%id, collection, "purged an entity");
        Ok(record)
    }

    /// Whether entity `id` was purged (a valid purge record for it is held here).
    pub fn is_purged(&self, id: EntityId) -> Result<bool, Error> {
        Ok(self
            .store
            .record(purge_entity_id(self.ws().id, id).as_bytes())?
            .is_some_and(|r| r.collection == PURGES))
    }

    /// Whether this node holds any purge record.
    pub fn holds_purges(&self) -> Result<bool, Error> {
        // One view read, not `counts()`: the first count scans every record.
        Ok(!self.store.views(PURGES, None, 1)?.is_empty())
    }

    /// Every purge record held here.
    pub fn purges(&self) -> Result<Vec<PurgeRecord>, Error> {
        let mut out = Vec::new();
        self.list(PURGES, &[], true, &mut |view| {
            if let Some(r) = view
                .get(RECORD)
                .and_then(|v| v.as_str())
                .and_then(|t| PurgeRecord::parse(t).ok())
            {
                out.push(r);
            }
            true
        })?;
        Ok(out)
    }

    /// The entity a received `_purges` entity purges, if its record is valid: in its own
    /// entity, signed by the authority or an admin member. Else why it is refused.
    pub(crate) fn purge_target(&self, entity: &Entity) -> Result<EntityId, String> {
        let ws = self.ws();
        let derived = entity.derive(&ws).map_err(|e| e.to_string())?;
        if derived
            .view
            .keys()
            .any(|k| !k.starts_with('_') && k != RECORD)
            || derived.view.contains_key("_deleted")
        {
            return Err(format!(
                "purge entity {} holds more than its record",
                entity.id()
            ));
        }
        let text = derived
            .view
            .get(RECORD)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("purge entity {} has no record", entity.id()))?;
        let record = PurgeRecord::parse(text)?;
        record.verify(ws.id, &ws.authority, entity.id(), |peer| {
            self.is_admin(peer).unwrap_or(false)
        })?;
        Ok(record.entity)
    }

    /// Drops purged entities whole (store, cache, attachment files no other entity here
    /// references) and waits until no byte of them is left in the files.
    pub(crate) fn apply_purges(&self, targets: &[EntityId]) -> Result<(), Error> {
        if targets.is_empty() {
            return Ok(());
        }
        let _guards = self.lock_many(targets.iter().copied());
        for id in targets {
            self.uncache(*id);
        }
        // Their attachments' files go too, unless another entity here references them.
        let blobs = self.blobs_of(targets)?;
        let keys: Vec<[u8; 16]> = targets.iter().map(|id| *id.as_bytes()).collect();
        self.store.purge(&keys)?;
        self.remove_unless_referenced(&blobs)
    }

    /// Purges whose entity is still stored (a crash after the record was written): done now.
    pub(crate) fn finish_purges(&self) -> Result<(), Error> {
        let mut pending = Vec::new();
        for r in self.purges()? {
            if self.store.record(r.entity.as_bytes())?.is_some() {
                pending.push(r.entity);
            }
        }
        if !pending.is_empty() {
            tracing::info!(
                entities = pending.len(),
                "finishing purges a crash cut short"
            );
        }
        self.apply_purges(&pending)
    }
}
