//! Confirmed values of `authority` fields: records signed by the workspace authority.
//!
//! A record is stored in the entity document under `_auth.<field>.<seq>` as JSON text. Its
//! signature covers the workspace, entity, field, sequence and value, so it cannot be moved
//! to another entity or field; a record under the wrong key, or with a bad signature, is
//! ignored by every view.

use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::ids::{EntityId, ProposalId, WorkspaceId};

/// One signed confirmation, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Confirmation {
    pub seq: u64,
    pub value: Json,
    /// The proposal this confirmation accepted, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepts: Option<ProposalId>,
    /// ed25519 signature, hex.
    pub sig: String,
}

/// The map key a confirmation with `seq` lives under (fixed width so keys sort by seq).
pub fn seq_key(seq: u64) -> String {
    format!("{seq:016x}")
}

fn signed_bytes(
    ws: WorkspaceId,
    entity: EntityId,
    field: &str,
    seq: u64,
    value: &Json,
    accepts: Option<ProposalId>,
) -> Vec<u8> {
    let mut msg = b"fieldsync/confirm/v1\0".to_vec();
    msg.extend_from_slice(ws.as_bytes());
    msg.extend_from_slice(entity.as_bytes());
    msg.extend_from_slice(field.as_bytes());
    msg.push(0);
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend_from_slice(accepts.map(|p| *p.as_bytes()).unwrap_or([0; 16]).as_slice());
    // serde_json's default map is ordered by key, so this text is canonical.
    msg.extend_from_slice(value.to_string().as_bytes());
    msg
}

impl Confirmation {
    /// Signs `value` for `field` of `entity` with the authority's key.
    pub fn sign(
        key: &ed25519::Keypair,
        ws: WorkspaceId,
        entity: EntityId,
        field: &str,
        seq: u64,
        value: Json,
        accepts: Option<ProposalId>,
    ) -> Self {
        let sig = key.sign(&signed_bytes(ws, entity, field, seq, &value, accepts));
        Confirmation {
            seq,
            value,
            accepts,
            sig: hex::encode(sig),
        }
    }

    /// Whether the signature is the authority's over exactly this record.
    pub fn verify(
        &self,
        authority: &ed25519::PublicKey,
        ws: WorkspaceId,
        entity: EntityId,
        field: &str,
    ) -> bool {
        let Ok(sig) = hex::decode(&self.sig) else {
            return false;
        };
        authority.verify(
            &signed_bytes(ws, entity, field, self.seq, &self.value, self.accepts),
            &sig,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_value_field_entity_and_key() {
        let key = ed25519::Keypair::generate();
        let other = ed25519::Keypair::generate();
        let ws = WorkspaceId(uuid::Uuid::from_u128(1));
        let e = EntityId(uuid::Uuid::from_u128(2));
        let c = Confirmation::sign(&key, ws, e, "amount", 1, serde_json::json!(50), None);
        assert!(c.verify(&key.public(), ws, e, "amount"));
        assert!(!c.verify(&other.public(), ws, e, "amount"));
        assert!(!c.verify(&key.public(), ws, e, "status"));
        assert!(!c.verify(
            &key.public(),
            ws,
            EntityId(uuid::Uuid::from_u128(3)),
            "amount"
        ));
        let mut tampered = c.clone();
        tampered.value = serde_json::json!(5000);
        assert!(!tampered.verify(&key.public(), ws, e, "amount"));
        let mut bumped = c;
        bumped.seq = 9;
        assert!(!bumped.verify(&key.public(), ws, e, "amount"));
    }
}
