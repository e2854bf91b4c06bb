//! Confirmed values of `authority` fields: records signed by the workspace authority.
//!
//! A record is stored in the entity document under `_auth.<field>.<seq>` as JSON text. Its
//! signature covers the workspace, entity, field, sequence and value, so it cannot be moved
//! to another entity or field; a record under the wrong key, or with a bad signature, is
//! ignored by every view.
//!
//! A record is signed either by the authority's own key or by a **delegate**: a member
//! (a second relay) whose member record, signed by the authority, says `delegate: true`.
//! A delegate's record carries that member record in `by`, so it verifies on its own —
//! every node derives the same views whatever it knows of the member list. Withdrawing a
//! delegation is a newer member record; nodes that know of it refuse the delegate's new
//! records on receipt (`membership::check_delegates`), and its earlier ones stay valid.

use libp2p_identity::{ed25519, PeerId};
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
    /// For a delegate's record: the authority's confirmation of the delegate's member
    /// record (`delegate: true`), which names the key that signed this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Box<Confirmation>>,
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
            by: None,
        }
    }

    /// Whether the signature is the authority's over exactly this record, or a delegate's
    /// whose delegation (`by`) the authority signed.
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
        let msg = signed_bytes(ws, entity, field, self.seq, &self.value, self.accepts);
        match &self.by {
            None => authority.verify(&msg, &sig),
            Some(delegation) => delegation
                .delegate_key(authority, ws)
                .is_some_and(|key| key.verify(&msg, &sig)),
        }
    }

    /// The peer that signed this record: the authority, or the delegate named in `by`.
    pub fn signer(&self, authority: &PeerId) -> PeerId {
        self.by
            .as_ref()
            .and_then(|d| delegation_peer(&d.value))
            .unwrap_or(*authority)
    }

    /// Read as a delegation (a confirmed member record of a delegate): the delegate's key,
    /// if the authority itself signed it (delegates cannot delegate) and it grants
    /// delegation, unrevoked.
    pub fn delegate_key(
        &self,
        authority: &ed25519::PublicKey,
        ws: WorkspaceId,
    ) -> Option<ed25519::PublicKey> {
        if self.by.is_some() {
            return None;
        }
        let peer = delegation_peer(&self.value)?;
        let grants = |k: &str| self.value.get(k).and_then(Json::as_bool);
        if grants("delegate") != Some(true) || grants("revoked") == Some(true) {
            return None;
        }
        let member = crate::membership::member_entity_id(ws, &peer);
        if !self.verify(authority, ws, member, crate::membership::RECORD) {
            return None;
        }
        ed25519_key_of(&peer)
    }
}

fn delegation_peer(record: &Json) -> Option<PeerId> {
    record.get("peer")?.as_str()?.parse().ok()
}

/// The ed25519 key inside a peer id (libp2p inlines keys this small in the id itself).
pub fn ed25519_key_of(peer: &PeerId) -> Option<ed25519::PublicKey> {
    let bytes = peer.to_bytes();
    // An identity multihash: code 0, then the length, then the protobuf-encoded key.
    match bytes.as_slice() {
        [0, len, key @ ..] if usize::from(*len) == key.len() => {
            libp2p_identity::PublicKey::try_decode_protobuf(key)
                .ok()?
                .try_into_ed25519()
                .ok()
        }
        _ => None,
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

    fn peer_of(key: &ed25519::Keypair) -> PeerId {
        libp2p_identity::PublicKey::from(key.public()).to_peer_id()
    }

    /// `peer`'s member record as the authority `key` would confirm it.
    fn member_record(
        key: &ed25519::Keypair,
        ws: WorkspaceId,
        peer: &PeerId,
        extra: Json,
    ) -> Confirmation {
        let mut value =
            serde_json::json!({"peer": peer.to_string(), "user": "office", "role": "relay"});
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let id = crate::membership::member_entity_id(ws, peer);
        Confirmation::sign(key, ws, id, crate::membership::RECORD, 1, value, None)
    }

    #[test]
    fn a_delegate_signs_only_with_a_delegation_the_authority_signed() {
        let authority = ed25519::Keypair::generate();
        let relay = ed25519::Keypair::generate();
        let ws = WorkspaceId(uuid::Uuid::from_u128(1));
        let e = EntityId(uuid::Uuid::from_u128(2));
        let by_relay = |by: Confirmation| Confirmation {
            by: Some(Box::new(by)),
            ..Confirmation::sign(&relay, ws, e, "amount", 1, serde_json::json!(50), None)
        };
        let delegation = member_record(
            &authority,
            ws,
            &peer_of(&relay),
            serde_json::json!({"delegate": true}),
        );
        let c = by_relay(delegation.clone());
        assert!(c.verify(&authority.public(), ws, e, "amount"));
        assert_eq!(c.signer(&peer_of(&authority)), peer_of(&relay));
        assert!(
            !c.verify(&relay.public(), ws, e, "amount"),
            "the delegation names the authority"
        );
        let mut tampered = c.clone();
        tampered.value = serde_json::json!(5000);
        assert!(!tampered.verify(&authority.public(), ws, e, "amount"));

        let not_delegate = member_record(&authority, ws, &peer_of(&relay), serde_json::json!({}));
        let withdrawn = member_record(
            &authority,
            ws,
            &peer_of(&relay),
            serde_json::json!({"delegate": true, "revoked": true}),
        );
        let self_made = member_record(
            &relay,
            ws,
            &peer_of(&relay),
            serde_json::json!({"delegate": true}),
        );
        let other = ed25519::Keypair::generate();
        let for_another = member_record(
            &authority,
            ws,
            &peer_of(&other),
            serde_json::json!({"delegate": true}),
        );
        // The relay, as a delegate, confirming a member record that makes `other` a delegate.
        let sub_delegation = Confirmation {
            by: Some(Box::new(delegation.clone())),
            ..member_record(
                &relay,
                ws,
                &peer_of(&other),
                serde_json::json!({"delegate": true}),
            )
        };
        let mut moved = delegation.clone();
        moved.value["peer"] = Json::from(peer_of(&other).to_string());
        for (why, by) in [
            ("not a delegate", not_delegate),
            ("revoked", withdrawn),
            ("signed by the relay itself", self_made),
            ("another peer's delegation", for_another),
            ("a delegation moved to another peer", moved),
            ("a delegate's delegation", sub_delegation),
        ] {
            assert!(
                !by_relay(by).verify(&authority.public(), ws, e, "amount"),
                "{why}"
            );
        }
    }
}
