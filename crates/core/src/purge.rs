//! Erasure: signed purge records.
//!
//! A purge is carried by the built-in collection `_purges`: one entity per purged entity,
//! its id derived from the workspace and the purged id (the same on every node), whose only
//! field `record` holds a [`PurgeRecord`] as JSON text: which entity, by whom, when, and the
//! issuer's ed25519 signature. The issuer is the workspace authority or an admin member (its
//! peer id holds its key, its role comes from the authority-signed member list). Every node
//! that takes in a valid record drops the purged entity whole and keeps only this record,
//! the tombstone that stops the entity coming back from an old peer or bundle. The record
//! holds ids only, never content.

use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};

use crate::ids::{EntityId, PeerId, WorkspaceId};
use crate::schema::Collection;

/// The built-in collection of purge records.
pub const PURGES: &str = "_purges";
/// The field holding the record (JSON text).
pub const RECORD: &str = "record";
/// Records larger than this are refused before parsing.
pub const MAX_RECORD_BYTES: usize = 4 << 10;

/// The `_purges` collection's schema: one plain field.
pub(crate) fn purges_collection() -> Collection {
    Collection::default()
}

/// The entity holding the purge of `entity`: the same id on every node, so two purges of
/// one entity meet in one record entity.
pub fn purge_entity_id(ws: WorkspaceId, entity: EntityId) -> EntityId {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"fieldsync/purge/v1\0");
    h.update(ws.as_bytes());
    h.update(entity.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    EntityId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// A signed order to erase one entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRecord {
    pub collection: String,
    pub entity: EntityId,
    /// The issuer's peer id: the authority or an admin.
    pub by: String,
    pub at_ms: i64,
    /// ed25519 signature by `by`, hex.
    pub sig: String,
}

fn signed_bytes(
    ws: WorkspaceId,
    collection: &str,
    entity: EntityId,
    by: &str,
    at_ms: i64,
) -> Vec<u8> {
    let mut msg = b"fieldsync/purge/v1\0".to_vec();
    msg.extend_from_slice(ws.as_bytes());
    msg.extend_from_slice(entity.as_bytes());
    msg.extend_from_slice(collection.as_bytes());
    msg.push(0);
    msg.extend_from_slice(by.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&at_ms.to_be_bytes());
    msg
}

impl PurgeRecord {
    /// A record signed by `key`, whose peer id is `by`.
    pub fn sign(
        key: &ed25519::Keypair,
        ws: WorkspaceId,
        collection: &str,
        entity: EntityId,
        at_ms: i64,
    ) -> Self {
        let by = libp2p_identity::PublicKey::from(key.public())
            .to_peer_id()
            .to_string();
        let sig = hex::encode(key.sign(&signed_bytes(ws, collection, entity, &by, at_ms)));
        PurgeRecord {
            collection: collection.to_owned(),
            entity,
            by,
            at_ms,
            sig,
        }
    }

    /// Reads a record from the `record` field's text; bounded, never panics.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_RECORD_BYTES {
            return Err(format!(
                "a purge record of {} bytes is over the {MAX_RECORD_BYTES}-byte limit",
                text.len()
            ));
        }
        serde_json::from_str(text).map_err(|e| format!("not a purge record: {e}"))
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether the record is valid under entity `carrier` of workspace `ws`: in its own
    /// entity, from the authority or a peer `is_admin` accepts, and signed by that peer.
    pub fn verify(
        &self,
        ws: WorkspaceId,
        authority: &ed25519::PublicKey,
        carrier: EntityId,
        is_admin: impl FnOnce(&PeerId) -> bool,
    ) -> Result<(), String> {
        if purge_entity_id(ws, self.entity) != carrier {
            return Err(format!(
                "the purge record of {} is under another entity",
                self.entity
            ));
        }
        if self.collection.starts_with('_') {
            return Err(format!(
                "built-in collection {} cannot be purged",
                self.collection
            ));
        }
        let by: PeerId = self
            .by
            .parse()
            .map_err(|_| format!("purge issuer {:?} is not a peer id", self.by))?;
        let authority_peer = libp2p_identity::PublicKey::from(authority.clone()).to_peer_id();
        let key = if by == authority_peer {
            authority.clone()
        } else if is_admin(&by) {
            crate::bundle::peer_key(&by)
                .ok_or_else(|| format!("purge issuer {by} has no ed25519 key"))?
        } else {
            return Err(format!(
                "purge issuer {by} is neither the authority nor an admin member"
            ));
        };
        let sig = hex::decode(&self.sig)
            .map_err(|_| "the purge record's signature is not hex".to_owned())?;
        if !key.verify(
            &signed_bytes(ws, &self.collection, self.entity, &self.by, self.at_ms),
            &sig,
        ) {
            return Err(format!(
                "the purge record of {} is not signed by {by}",
                self.entity
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_binds_entity_issuer_and_workspace() {
        let authority = ed25519::Keypair::generate();
        let admin = ed25519::Keypair::generate();
        let ws = WorkspaceId(uuid::Uuid::from_u128(1));
        let e = EntityId(uuid::Uuid::from_u128(2));
        let carrier = purge_entity_id(ws, e);
        let r = PurgeRecord::sign(&authority, ws, "customers", e, 5);
        assert!(r
            .verify(ws, &authority.public(), carrier, |_| false)
            .is_ok());
        assert_eq!(PurgeRecord::parse(&r.to_text()).unwrap(), r);
        assert!(r
            .verify(
                ws,
                &authority.public(),
                purge_entity_id(ws, EntityId(uuid::Uuid::from_u128(3))),
                |_| false
            )
            .is_err());
        assert!(r
            .verify(
                WorkspaceId(uuid::Uuid::from_u128(9)),
                &authority.public(),
                carrier,
                |_| false
            )
            .is_err());
        let by_admin = PurgeRecord::sign(&admin, ws, "customers", e, 5);
        assert!(by_admin
            .verify(ws, &authority.public(), carrier, |_| true)
            .is_ok());
        assert!(by_admin
            .verify(ws, &authority.public(), carrier, |_| false)
            .unwrap_err()
            .contains("neither"));
        let mut moved = by_admin.clone();
        moved.collection = "payments".into();
        assert!(moved
            .verify(ws, &authority.public(), carrier, |_| true)
            .unwrap_err()
            .contains("not signed"));
        let mut forged = r.clone();
        forged.by = by_admin.by.clone();
        assert!(
            forged
                .verify(ws, &authority.public(), carrier, |_| true)
                .is_err(),
            "an authority signature relabelled as an admin's"
        );
        assert!(PurgeRecord::parse(&"x".repeat(MAX_RECORD_BYTES + 1)).is_err());
        assert!(PurgeRecord::parse("{\"collection\": 1}").is_err());
    }
}
