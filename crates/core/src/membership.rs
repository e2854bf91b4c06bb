//! Who belongs to a workspace and what each member may see and write.
//!
//! The member list is the built-in collection `_members`: one entity per member, whose only
//! field `record` is an authority field. Its confirmed value (signed by the authority, see
//! [`crate::authority`]) is a [`MemberRecord`]; a revocation is a newer confirmation with
//! `revoked: true`. Since only signed values count, any member may carry the list to any
//! other, and nobody but the authority can add, change or revoke a member.
//!
//! A device joins with an [`InviteToken`]: a grant (user, role, partitions) signed by the
//! authority, valid until it expires. The authority binds an invite to the first device
//! that presents it by writing that device's member record; until a node has seen that
//! record it honours the unexpired token itself (so devices can meet on a LAN before either
//! reached the authority).

use std::collections::BTreeMap;

use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};

use crate::authority::Confirmation;
use crate::ids::{EntityId, PeerId, WorkspaceId};
use crate::schema::{Access, Collection, FieldSpec, Rule, Schema};
use crate::Error;

/// Where a node stands in its workspace: what `status` shows as `membership.state`, and what
/// a `Goodbye` that refuses a node's membership tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipState {
    /// A member (or the authority): peers admit it.
    Active,
    /// The authority revoked it: no peer that knows of it syncs with it.
    Revoked,
    /// A peer refused it: not a member, an invite already used by another device, expired
    /// or cancelled.
    Refused,
}

/// The built-in collection holding the member list.
pub const MEMBERS: &str = "_members";
/// The authority field of a member entity.
pub const RECORD: &str = "record";
/// Invite tokens larger than this are refused before parsing.
pub const MAX_TOKEN_BYTES: usize = 64 << 10;

/// The `_members` collection's schema.
pub(crate) fn members_collection() -> Collection {
    let fields = BTreeMap::from([(
        RECORD.to_owned(),
        FieldSpec {
            rule: Rule::Authority,
            auto_accept: false,
            default: None,
            renamed_from: None,
        },
    )]);
    Collection {
        fields,
        ..Default::default()
    }
}

/// The entity holding `peer`'s member record: the same id on every node.
pub fn member_entity_id(ws: WorkspaceId, peer: &PeerId) -> EntityId {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"fieldsync/member/v1\0");
    h.update(ws.as_bytes());
    h.update(peer.to_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    EntityId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// A member's role: devices see their partitions; relays and admins see everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Device,
    Relay,
    Admin,
}

impl std::str::FromStr for MemberRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "device" => Ok(MemberRole::Device),
            "relay" => Ok(MemberRole::Relay),
            "admin" => Ok(MemberRole::Admin),
            other => Err(format!("role {other:?} is not one of device, relay, admin")),
        }
    }
}

/// What a member is allowed: its user name, role, and per-collection access that overrides
/// the schema's default (`access` in the schema).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    pub user: String,
    pub role: MemberRole,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, Access>,
}

impl Grant {
    /// The grant of the workspace authority itself.
    pub fn authority() -> Self {
        Grant {
            user: "authority".into(),
            role: MemberRole::Admin,
            partitions: BTreeMap::new(),
        }
    }

    /// Checks the grant against the schema: known collections, `own` only where the
    /// collection names an owner field.
    pub fn check(&self, schema: &Schema) -> Result<(), Error> {
        if self.user.is_empty() || self.user.chars().count() > 128 {
            return Err(Error::Invite(
                "the user name must have 1 to 128 characters".into(),
            ));
        }
        for (c, access) in &self.partitions {
            let coll = schema.collection(c)?;
            if c.starts_with('_') {
                return Err(Error::Invite(format!(
                    "{c} is built in; its access cannot be changed"
                )));
            }
            if *access == Access::Own && coll.owner.is_none() {
                return Err(Error::Invite(format!(
                    "{c} has no `owner` field in the schema, so \"own\" cannot apply"
                )));
            }
        }
        Ok(())
    }

    /// What this member may see and write of `collection`.
    pub fn access(&self, schema: &Schema, collection: &str) -> Access {
        if collection == MEMBERS || self.role != MemberRole::Device {
            return Access::All;
        }
        match schema.collection(collection) {
            Ok(coll) => self
                .partitions
                .get(collection)
                .copied()
                .unwrap_or(coll.access),
            Err(_) => Access::None,
        }
    }

    /// Whether this member may see an entity of `collection` whose owner field holds
    /// `owner` (asked only for [`Access::Own`]).
    pub fn may_see(
        &self,
        schema: &Schema,
        collection: &str,
        owner: impl FnOnce() -> Option<String>,
    ) -> bool {
        match self.access(schema, collection) {
            Access::All => true,
            Access::None => false,
            Access::Own => owner().as_deref() == Some(self.user.as_str()),
        }
    }
}

/// The confirmed value of a member entity's `record`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    /// The member's peer id (its noise-authenticated key).
    pub peer: String,
    #[serde(flatten)]
    pub grant: Grant,
    #[serde(default)]
    pub revoked: bool,
    /// The invite this device joined with, if any (an invite admits one device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invite: Option<uuid::Uuid>,
    /// A relay or admin the authority delegated to: it confirms proposals and binds
    /// invites with its own key (see `crate::authority`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delegate: bool,
}

impl MemberRecord {
    /// Reads the record out of a verified confirmation of `peer`'s member entity.
    pub fn from_confirmation(c: &Confirmation, peer: &PeerId) -> Option<Self> {
        let r: MemberRecord = serde_json::from_value(c.value.clone()).ok()?;
        (r.peer == peer.to_string()).then_some(r)
    }
}

/// A one-time, expiring invitation to join as `grant`, signed by the authority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InviteToken {
    pub id: uuid::Uuid,
    pub workspace: WorkspaceId,
    pub grant: Grant,
    /// Milliseconds since the Unix epoch after which the token is refused.
    pub expires_ms: i64,
    /// The public half of the invite's one-time key, hex. Its secret half stays on the
    /// device that joins with the invite; a `Hello` carries only a signature by it over the
    /// presenter's peer id ([`invite_proof`]), so a peer that receives the token cannot
    /// present it as its own.
    pub key: String,
    /// ed25519 signature by the authority, hex.
    pub sig: String,
}

fn token_bytes(
    id: uuid::Uuid,
    ws: WorkspaceId,
    grant: &Grant,
    expires_ms: i64,
    key: &str,
) -> Vec<u8> {
    let mut msg = b"fieldsync/invite/v2\0".to_vec();
    msg.extend_from_slice(id.as_bytes());
    msg.extend_from_slice(ws.as_bytes());
    msg.extend_from_slice(&expires_ms.to_be_bytes());
    msg.extend_from_slice(key.as_bytes());
    msg.push(0);
    // A struct serialises its fields in declaration order: canonical.
    msg.extend_from_slice(&serde_json::to_vec(grant).unwrap_or_default());
    msg
}

impl InviteToken {
    /// A token signed by the authority `key`, bound to the one-time key `holder` (whose
    /// secret half goes in the invite beside the token).
    pub fn sign(
        key: &ed25519::Keypair,
        id: uuid::Uuid,
        workspace: WorkspaceId,
        grant: Grant,
        expires_ms: i64,
        holder: &ed25519::PublicKey,
    ) -> Self {
        let holder = hex::encode(holder.to_bytes());
        let sig = hex::encode(key.sign(&token_bytes(id, workspace, &grant, expires_ms, &holder)));
        InviteToken {
            id,
            workspace,
            grant,
            expires_ms,
            key: holder,
            sig,
        }
    }

    /// Checks that `proof` was made with this token's one-time key for `peer`.
    pub fn verify_proof(&self, peer: &PeerId, proof: &str) -> Result<(), String> {
        let key = hex::decode(&self.key)
            .ok()
            .and_then(|b| ed25519::PublicKey::try_from_bytes(&b).ok())
            .ok_or_else(|| "the invite's key is not an ed25519 public key".to_owned())?;
        let sig = hex::decode(proof).map_err(|_| "the invite proof is not hex".to_owned())?;
        if !key.verify(&proof_bytes(self.workspace, self.id, peer), &sig) {
            return Err(format!(
                "the invite {} was presented without its key (a copied token)",
                self.id
            ));
        }
        Ok(())
    }

    /// Checks signature, workspace and expiry; the reason it is refused otherwise.
    pub fn verify(
        &self,
        authority: &ed25519::PublicKey,
        workspace: WorkspaceId,
        now_ms: i64,
    ) -> Result<(), String> {
        if self.workspace != workspace {
            return Err(format!("the invite is for workspace {}", self.workspace));
        }
        let sig =
            hex::decode(&self.sig).map_err(|_| "the invite's signature is not hex".to_owned())?;
        if !authority.verify(
            &token_bytes(
                self.id,
                self.workspace,
                &self.grant,
                self.expires_ms,
                &self.key,
            ),
            &sig,
        ) {
            return Err("the invite's signature is not the authority's".into());
        }
        if now_ms > self.expires_ms {
            return Err(format!("the invite {} expired", self.id));
        }
        Ok(())
    }
}

/// How a peer proves, in its `Hello`, that it may sync.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    /// The authority's confirmation of the peer's member record.
    Member { record: Confirmation },
    /// An invite not yet known to be bound to the peer, with the proof that the peer holds
    /// the invite's one-time key.
    Invite { token: InviteToken, proof: String },
}

fn proof_bytes(workspace: WorkspaceId, invite: uuid::Uuid, peer: &PeerId) -> Vec<u8> {
    let mut msg = b"fieldsync/invite-proof/v1\0".to_vec();
    msg.extend_from_slice(workspace.as_bytes());
    msg.extend_from_slice(invite.as_bytes());
    msg.extend_from_slice(&peer.to_bytes());
    msg
}

/// The proof that `peer` holds the one-time key `secret` of `token`: what its `Hello`
/// carries instead of the key.
pub fn invite_proof(token: &InviteToken, secret: &ed25519::Keypair, peer: &PeerId) -> String {
    hex::encode(secret.sign(&proof_bytes(token.workspace, token.id, peer)))
}

/// Why a received write was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefusalKind {
    /// Outside the sender's partitions.
    Partition,
    /// Carries authority records the authority did not sign.
    Forged,
    /// Removes confirmed authority values.
    Rollback,
    /// Changes the member list other than by authority signatures.
    Members,
    /// In a collection this node's schema version lacks (and the batch brought no version
    /// that adds it).
    UnknownCollection,
}

impl RefusalKind {
    pub fn name(self) -> &'static str {
        match self {
            RefusalKind::Partition => "partition",
            RefusalKind::Forged => "forged_authority",
            RefusalKind::Rollback => "authority_rollback",
            RefusalKind::Members => "member_list",
            RefusalKind::UnknownCollection => "unknown_collection",
        }
    }
}

/// A refused write: its kind and a sentence for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub reason: String,
}

/// What the write check needs to know of a document, before or after a merge.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub integrity: crate::entity::Integrity,
    pub owner: Option<String>,
}

impl Facts {
    pub fn of(ws: &crate::Workspace, entity: &crate::Entity) -> Self {
        Facts {
            integrity: entity.integrity(ws),
            owner: entity.owner(ws),
        }
    }
}

/// Whether a member with `grant` may turn an entity from `before` (absent: new to this
/// node) into `after` by the changes it sent. Authority records are checked for everyone,
/// partitions for the sender's grant.
pub fn check_write(
    schema: &Schema,
    grant: &Grant,
    id: EntityId,
    collection: &str,
    before: Option<&Facts>,
    after: &Facts,
) -> Result<(), Refusal> {
    let refuse = |kind, reason: String| {
        Err(Refusal {
            kind,
            reason: format!("entity {id} ({collection}): {reason}"),
        })
    };
    let new_forged: Vec<&String> = after
        .integrity
        .forged
        .iter()
        .filter(|f| before.is_none_or(|b| !b.integrity.forged.contains(*f)))
        .collect();
    if !new_forged.is_empty() {
        return refuse(
            RefusalKind::Forged,
            format!("authority records not signed by the authority: {new_forged:?}"),
        );
    }
    if let Some(b) = before {
        let lost = b
            .integrity
            .confirmed
            .difference(&after.integrity.confirmed)
            .count();
        if lost > 0 {
            return refuse(
                RefusalKind::Rollback,
                format!("removes {lost} confirmed authority value(s)"),
            );
        }
    }
    if collection == MEMBERS
        && (after.integrity.plain_fields > 0
            || after.integrity.proposals > 0
            || after.integrity.tombstone)
    {
        return refuse(
            RefusalKind::Members,
            "the member list changes only by the authority's signed records".into(),
        );
    }
    match grant.access(schema, collection) {
        Access::All => Ok(()),
        Access::None => refuse(
            RefusalKind::Partition,
            format!("user {:?} may not write this collection", grant.user),
        ),
        Access::Own => {
            let mine = |f: &Facts| f.owner.as_deref() == Some(grant.user.as_str());
            let not_mine = match before {
                Some(b) if !mine(b) => Some(b),
                _ => (!mine(after)).then_some(after),
            };
            if let Some(f) = not_mine {
                let owner = f.owner.clone().unwrap_or_else(|| "nobody".into());
                return refuse(
                    RefusalKind::Partition,
                    format!("would belong to {owner:?}, not to user {:?}", grant.user),
                );
            }
            Ok(())
        }
    }
}

/// Whether the delegate records a merge adds are still backed by their delegations, as far
/// as `list` knows: a record whose delegate's member record was replaced, by a newer one
/// than the delegation it carries, with one that withdraws or revokes it is refused. What
/// a node held before it learnt of the withdrawal stays valid.
pub fn check_delegates(
    list: &MemberList,
    id: EntityId,
    collection: &str,
    before: Option<&Facts>,
    after: &Facts,
) -> Result<(), Refusal> {
    for (sig, (peer, delegation_seq)) in &after.integrity.delegated {
        if before.is_some_and(|b| b.integrity.confirmed.contains(sig)) {
            continue;
        }
        let Ok(peer) = peer.parse::<PeerId>() else {
            continue;
        };
        if let Some((seq, false)) = list.delegates.get(&peer) {
            if seq > delegation_seq {
                return Err(Refusal {
                    kind: RefusalKind::Forged,
                    reason: format!(
                        "entity {id} ({collection}): confirmed by {peer}, whose delegation was withdrawn"
                    ),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::from_toml(
            "[collections.tasks]\nowner = \"assignee\"\naccess = \"own\"\n[collections.payments]\nowner = \"collector\"\n[collections.prices]\n",
        )
        .unwrap()
    }

    #[test]
    fn access_follows_role_partitions_and_schema_defaults() {
        let s = schema();
        let mut g = Grant {
            user: "ana".into(),
            role: MemberRole::Device,
            partitions: BTreeMap::new(),
        };
        assert_eq!(g.access(&s, "tasks"), Access::Own);
        assert_eq!(g.access(&s, "payments"), Access::All);
        assert_eq!(g.access(&s, MEMBERS), Access::All);
        assert_eq!(g.access(&s, "unknown"), Access::None);
        assert!(g.may_see(&s, "tasks", || Some("ana".into())));
        assert!(!g.may_see(&s, "tasks", || Some("bo".into())));
        assert!(!g.may_see(&s, "tasks", || None));
        g.partitions.insert("payments".into(), Access::Own);
        g.partitions.insert("prices".into(), Access::None);
        assert!(!g.may_see(&s, "payments", || Some("bo".into())));
        assert!(!g.may_see(&s, "prices", || None));
        assert!(g.check(&s).is_ok());
        g.partitions.insert("prices".into(), Access::Own);
        assert!(g.check(&s).unwrap_err().to_string().contains("no `owner`"));
        let relay = Grant {
            role: MemberRole::Relay,
            ..g
        };
        assert_eq!(relay.access(&s, "prices"), Access::All);
    }

    #[test]
    fn tokens_bind_grant_workspace_and_expiry() {
        let key = ed25519::Keypair::generate();
        let ws = WorkspaceId(uuid::Uuid::from_u128(1));
        let grant = Grant {
            user: "ana".into(),
            role: MemberRole::Device,
            partitions: BTreeMap::new(),
        };
        let holder = ed25519::Keypair::generate();
        let t = InviteToken::sign(
            &key,
            uuid::Uuid::from_u128(7),
            ws,
            grant,
            1_000,
            &holder.public(),
        );
        assert!(t.verify(&key.public(), ws, 999).is_ok());
        let mut rekeyed = t.clone();
        rekeyed.key = hex::encode(ed25519::Keypair::generate().public().to_bytes());
        assert!(
            rekeyed.verify(&key.public(), ws, 0).is_err(),
            "the one-time key is signed too"
        );
        assert!(t
            .verify(&key.public(), ws, 1_001)
            .unwrap_err()
            .contains("expired"));
        assert!(t
            .verify(&ed25519::Keypair::generate().public(), ws, 0)
            .unwrap_err()
            .contains("signature"));
        assert!(t
            .verify(&key.public(), WorkspaceId(uuid::Uuid::from_u128(2)), 0)
            .is_err());
        let mut admin = t.clone();
        admin.grant.role = MemberRole::Admin;
        assert!(
            admin.verify(&key.public(), ws, 0).is_err(),
            "a changed grant breaks the signature"
        );
        let mut later = t;
        later.expires_ms = i64::MAX;
        assert!(later.verify(&key.public(), ws, 0).is_err());
    }

    #[test]
    fn an_invite_proof_holds_only_for_the_peer_that_made_it() {
        let key = ed25519::Keypair::generate();
        let ws = WorkspaceId(uuid::Uuid::from_u128(1));
        let grant = Grant {
            user: "ana".into(),
            role: MemberRole::Device,
            partitions: BTreeMap::new(),
        };
        let holder = ed25519::Keypair::generate();
        let t = InviteToken::sign(
            &key,
            uuid::Uuid::from_u128(7),
            ws,
            grant,
            1_000,
            &holder.public(),
        );
        let device = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let thief = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let proof = invite_proof(&t, &holder, &device);
        assert!(t.verify_proof(&device, &proof).is_ok());
        assert!(
            t.verify_proof(&thief, &proof)
                .unwrap_err()
                .contains("without its key"),
            "a copied proof is another peer's"
        );
        let forged = invite_proof(&t, &ed25519::Keypair::generate(), &thief);
        assert!(
            t.verify_proof(&thief, &forged).is_err(),
            "a proof needs the invite's own key"
        );
        assert!(t.verify_proof(&device, "zz").unwrap_err().contains("hex"));
    }

    #[test]
    fn member_entities_are_per_peer_and_workspace() {
        let ws = WorkspaceId(uuid::Uuid::from_u128(1));
        let a = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let b = libp2p_identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        assert_eq!(member_entity_id(ws, &a), member_entity_id(ws, &a));
        assert_ne!(member_entity_id(ws, &a), member_entity_id(ws, &b));
        assert_ne!(
            member_entity_id(ws, &a),
            member_entity_id(WorkspaceId(uuid::Uuid::from_u128(2)), &a)
        );
    }
}

/// The reason a revoked member is refused (every node words it the same way, so the peer
/// it refuses can tell a revocation from other refusals).
pub fn revoked_reason(peer: &PeerId) -> String {
    format!("peer {peer} was revoked")
}

/// Whether a refusal's reason is a revocation.
pub fn is_revocation(reason: &str) -> bool {
    reason.ends_with(" was revoked")
}

/// The member list as one node knows it: what admission is decided from. Pure data; the
/// replica builds it from its store and hands a fresh one to the sync engine whenever the
/// list changes.
#[derive(Clone, Debug)]
pub struct MemberList {
    pub workspace: std::sync::Arc<crate::Workspace>,
    /// Whether this node is the authority: it binds invites to the devices presenting them.
    pub authority: bool,
    /// This node's own delegation, if the authority made it a delegate: then it binds
    /// invites too, and signs what it confirms with it.
    pub delegation: Option<Confirmation>,
    /// Relays and admins: the seq of their current member record and whether it makes
    /// them an active delegate (what [`check_delegates`] compares delegations against).
    pub delegates: std::collections::HashMap<PeerId, (u64, bool)>,
    pub by_peer: std::collections::HashMap<PeerId, MemberRecord>,
    /// Invite id → the device it admitted.
    pub invites: std::collections::HashMap<uuid::Uuid, PeerId>,
    /// Invites the authority cancelled (only the authority knows them).
    pub cancelled: std::collections::HashSet<uuid::Uuid>,
}

/// What [`MemberList::admit`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A member (or the authority) with this grant.
    Admitted(Grant),
    /// A valid, unused invite presented to the authority: once this record is written (the
    /// invite bound to the peer), the peer is a member with its grant.
    Bind(MemberRecord),
    /// Not admitted, and why.
    Refused(String),
}

impl MemberList {
    /// An empty list for `workspace`.
    pub fn new(workspace: std::sync::Arc<crate::Workspace>, authority: bool) -> Self {
        MemberList {
            workspace,
            authority,
            delegation: None,
            delegates: Default::default(),
            by_peer: Default::default(),
            invites: Default::default(),
            cancelled: Default::default(),
        }
    }

    /// Decides whether `peer` may sync from the list and what it presented, at wall-clock
    /// time `now_ms` (invites expire).
    pub fn admit(&self, peer: &PeerId, credential: Option<&Credential>, now_ms: i64) -> Admission {
        let ws = &self.workspace;
        if *peer == ws.authority_peer() {
            return Admission::Admitted(Grant::authority());
        }
        if let Some(r) = self.by_peer.get(peer) {
            return if r.revoked {
                Admission::Refused(revoked_reason(peer))
            } else {
                Admission::Admitted(r.grant.clone())
            };
        }
        match credential {
            Some(Credential::Member { record }) => {
                let id = member_entity_id(ws.id, peer);
                if !record.verify(&ws.authority, ws.id, id, RECORD) {
                    return Admission::Refused(format!(
                        "peer {peer} presented a member record the authority did not sign"
                    ));
                }
                match MemberRecord::from_confirmation(record, peer) {
                    Some(r) if !r.revoked => Admission::Admitted(r.grant),
                    Some(_) => Admission::Refused(revoked_reason(peer)),
                    None => Admission::Refused(format!(
                        "peer {peer} presented another peer's member record"
                    )),
                }
            }
            Some(Credential::Invite { token, proof }) => {
                if let Err(why) = token
                    .verify(&ws.authority, ws.id, now_ms)
                    .and_then(|()| token.verify_proof(peer, proof))
                {
                    return Admission::Refused(format!("peer {peer}: {why}"));
                }
                if let Err(e) = token.grant.check(&ws.schema) {
                    return Admission::Refused(format!("peer {peer}: {e}"));
                }
                if let Some(other) = self.invites.get(&token.id).filter(|p| *p != peer) {
                    return Admission::Refused(format!(
                        "peer {peer}: invite {} was already used by {other}",
                        token.id
                    ));
                }
                if !self.binds_invites() {
                    return Admission::Admitted(token.grant.clone());
                }
                if self.cancelled.contains(&token.id) {
                    return Admission::Refused(format!(
                        "peer {peer}: invite {} was cancelled",
                        token.id
                    ));
                }
                Admission::Bind(MemberRecord {
                    peer: peer.to_string(),
                    grant: token.grant.clone(),
                    revoked: false,
                    invite: Some(token.id),
                    delegate: false,
                })
            }
            None => Admission::Refused(format!("peer {peer} is not a member of this workspace")),
        }
    }

    /// Whether this node binds invites to the devices presenting them: the authority and
    /// its delegates do.
    pub fn binds_invites(&self) -> bool {
        self.authority || self.delegation.is_some()
    }

    /// Why `peer` may no longer sync, if the list says it was revoked.
    pub fn revoked(&self, peer: &PeerId) -> Option<String> {
        self.by_peer
            .get(peer)
            .filter(|r| r.revoked)
            .map(|_| revoked_reason(peer))
    }
}
