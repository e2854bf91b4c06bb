//! Membership on a replica: issuing invites and revocations (authority), deciding who may
//! sync and what each peer may see. The rules themselves are in
//! [`fieldsync_core::membership`]; this module keeps the member list at hand.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fieldsync_core::authority::Confirmation;
use fieldsync_core::membership::{
    check_write, member_entity_id, Admission, Credential, Facts, Grant, InviteToken, MemberList,
    MemberRecord, MemberRole, MembershipState, MEMBERS, RECORD,
};
use fieldsync_core::workspace::{HeldInvite, Invite};
use fieldsync_core::{Access, Entity, EntityId, Patch, PeerId};
use libp2p_identity::ed25519;

use crate::replica::{Replica, META_INVITE_SECRET, META_INVITE_TOKEN};
use crate::Error;

/// Where this node's last membership refusal is kept (absent: none).
const META_MEMBERSHIP: &str = "membership";
/// Per peer: its name and when this node last had a session with it (`seen/<peer>`).
const META_SEEN: &str = "seen/";
/// Per invite the authority issued: what it grants, and whether it was cancelled
/// (`invites/<id>`).
const META_INVITES: &str = "invites/";

/// Where this node stands in its workspace, and why (`status` → `membership`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    pub state: MembershipState,
    /// Why it is revoked or refused, as the peer that refused it said (null when active).
    pub reason: Option<String>,
    /// The peer that refused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// When (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<i64>,
}

impl Membership {
    fn active() -> Self {
        Membership {
            state: MembershipState::Active,
            reason: None,
            by: None,
            at_ms: None,
        }
    }

    /// What a write on a node that will not sync should warn about; `None` when active.
    pub fn warning(&self) -> Option<String> {
        let state = match self.state {
            MembershipState::Active => return None,
            MembershipState::Revoked => "revoked",
            MembershipState::Refused => "refused",
        };
        let why = self
            .reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        Some(format!(
            "this device's membership is {state}{why}: the write is kept here but will not sync"
        ))
    }
}

/// An invite the authority issued and nobody used yet (`members` lists them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingInvite {
    pub id: uuid::Uuid,
    #[serde(flatten)]
    pub grant: Grant,
    pub issued_ms: i64,
    pub expires_ms: i64,
    #[serde(default)]
    pub cancelled: bool,
}

/// A member record with what this node knows of the device: the name it gave itself and
/// when this node last had a session with it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberInfo {
    #[serde(flatten)]
    pub record: MemberRecord,
    pub name: Option<String>,
    pub last_seen_ms: Option<i64>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Seen {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    last_seen_ms: Option<i64>,
}

impl Replica {
    /// Issues a one-time invite (JSON) for a device of `user`, valid for `ttl_ms`.
    pub fn issue_invite(
        &self,
        user: &str,
        role: MemberRole,
        partitions: BTreeMap<String, Access>,
        ttl_ms: i64,
    ) -> Result<Vec<u8>, Error> {
        if !self.authority {
            return Err(Error::AuthorityOnly("issue invites"));
        }
        let grant = Grant {
            user: user.to_owned(),
            role,
            partitions,
        };
        grant.check(&self.ws().schema)?;
        let expires = self.now_ms().saturating_add(ttl_ms.max(0));
        // The invite's one-time key: its secret goes only into the invite, so the token
        // alone (what a Hello shows) admits nobody.
        let holder = ed25519::Keypair::generate();
        let token = InviteToken::sign(
            &self.key,
            self.new_id(),
            self.ws().id,
            grant,
            expires,
            &holder.public(),
        );
        // Remembered so `members` lists it until it is used, and so it can be cancelled.
        let pending = PendingInvite {
            id: token.id,
            grant: token.grant.clone(),
            issued_ms: self.now_ms(),
            expires_ms: expires,
            cancelled: false,
        };
        self.commit_durable(
            vec![],
            vec![(
                format!("{META_INVITES}{}", token.id),
                Some(serde_json::to_vec(&pending).unwrap_or_default()),
            )],
        )?;
        let invite = Invite {
            token: Some(token),
            token_secret: Some(hex::encode(holder.secret().as_ref())),
            ..Invite::new(&self.ws())
        };
        Ok(serde_json::to_vec_pretty(&invite).unwrap_or_default())
    }

    /// An invite for a device of user `device` that sees everything, valid for a week
    /// (tests and examples; `fieldsync invite` chooses user and partitions).
    pub fn invite(&self) -> Vec<u8> {
        self.issue_invite(
            "device",
            MemberRole::Device,
            BTreeMap::new(),
            7 * 24 * 3600 * 1000,
        )
        .unwrap_or_else(|_| {
            // A device has no key to sign with: it hands out the bare workspace.
            serde_json::to_vec_pretty(&Invite::new(&self.ws())).unwrap_or_default()
        })
    }

    /// Every member record known here (revoked ones included), by peer id.
    pub fn members(&self) -> Result<Vec<MemberRecord>, Error> {
        let mut out: Vec<MemberRecord> = self.member_list()?.by_peer.values().cloned().collect();
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        Ok(out)
    }

    /// Every member record with the device's name and when this node last saw it.
    pub fn member_infos(&self) -> Result<Vec<MemberInfo>, Error> {
        self.members()?
            .into_iter()
            .map(|record| {
                let seen = self.seen(&record.peer)?;
                Ok(MemberInfo {
                    record,
                    name: seen.name,
                    last_seen_ms: seen.last_seen_ms,
                })
            })
            .collect()
    }

    fn seen(&self, peer: &str) -> Result<Seen, Error> {
        Ok(self
            .store
            .meta(&format!("{META_SEEN}{peer}"))?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default())
    }

    /// Notes that this node had a session with `peer` now (and its name, if it said).
    pub(crate) fn note_seen(&self, peer: &PeerId, name: Option<&str>) -> Result<(), Error> {
        let key = peer.to_string();
        let mut seen = self.seen(&key)?;
        if let Some(name) = name {
            seen.name = Some(name.to_owned());
        }
        seen.last_seen_ms = Some(self.now_ms());
        // A hint, not data: it need not wait for the flush.
        self.store.commit(
            vec![],
            vec![(
                format!("{META_SEEN}{key}"),
                Some(serde_json::to_vec(&seen).unwrap_or_default()),
            )],
        )?;
        Ok(())
    }

    /// Invites issued here (authority) that no device used yet, not cancelled and not
    /// expired, oldest first.
    pub fn pending_invites(&self) -> Result<Vec<PendingInvite>, Error> {
        if !self.authority {
            return Ok(vec![]);
        }
        let used = self.member_list()?;
        let now = self.now_ms();
        let mut out: Vec<PendingInvite> = self
            .store
            .meta_prefix(META_INVITES)?
            .into_iter()
            .filter_map(|(_, bytes)| serde_json::from_slice::<PendingInvite>(&bytes).ok())
            .filter(|i| !i.cancelled && i.expires_ms > now && !used.invites.contains_key(&i.id))
            .collect();
        out.sort_by_key(|i| (i.issued_ms, i.id));
        Ok(out)
    }

    /// Cancels an unused invite (authority only): the authority refuses it from now on.
    /// Other nodes honour it until they learn the device was refused, or it expires.
    pub fn cancel_invite(&self, id: uuid::Uuid) -> Result<PendingInvite, Error> {
        if !self.authority {
            return Err(Error::AuthorityOnly("cancel invites"));
        }
        let key = format!("{META_INVITES}{id}");
        let mut invite: PendingInvite = self
            .store
            .meta(&key)?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| fieldsync_core::Error::NotFound(format!("invite {id}")))?;
        if let Some(peer) = self.member_list()?.invites.get(&id) {
            return Err(fieldsync_core::Error::Invite(format!(
                "invite {id} was already used by {peer}; revoke that member instead"
            ))
            .into());
        }
        invite.cancelled = true;
        self.commit_durable(
            vec![],
            vec![(key, Some(serde_json::to_vec(&invite).unwrap_or_default()))],
        )?;
        // The member list carries the cancelled invites: it is stale now.
        self.members_version.fetch_add(1, Ordering::AcqRel);
        Ok(invite)
    }

    /// Where this node stands: revoked if the member list says so, refused if a peer
    /// refused it since a peer last admitted it, else active.
    pub fn membership(&self) -> Result<Membership, Error> {
        if self.authority {
            return Ok(Membership::active());
        }
        if self.revoked(&self.peer)?.is_some() {
            let reason = Some("the workspace authority revoked this device".to_owned());
            return Ok(Membership {
                state: MembershipState::Revoked,
                reason,
                by: None,
                at_ms: None,
            });
        }
        Ok(self
            .store
            .meta(META_MEMBERSHIP)?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(Membership::active))
    }

    /// Notes that `peer` refused this node's membership.
    pub(crate) fn note_refused_by(
        &self,
        peer: &PeerId,
        state: MembershipState,
        reason: &str,
    ) -> Result<(), Error> {
        let m = Membership {
            state,
            reason: Some(reason.to_owned()),
            by: Some(peer.to_string()),
            at_ms: Some(self.now_ms()),
        };
        self.commit_durable(
            vec![],
            vec![(
                META_MEMBERSHIP.to_owned(),
                Some(serde_json::to_vec(&m).unwrap_or_default()),
            )],
        )
    }

    /// Notes that `peer` admitted this node: a refusal by that peer, or any refusal once the
    /// authority admits it, is over.
    pub(crate) fn note_admitted_by(&self, peer: &PeerId) -> Result<(), Error> {
        let Some(bytes) = self.store.meta(META_MEMBERSHIP)? else {
            return Ok(());
        };
        let by = serde_json::from_slice::<Membership>(&bytes)
            .ok()
            .and_then(|m| m.by);
        if *peer == self.ws().authority_peer() || by.is_none_or(|b| b == peer.to_string()) {
            self.commit_durable(vec![], vec![(META_MEMBERSHIP.to_owned(), None)])?;
        }
        Ok(())
    }

    /// Revokes a member (authority only): every node refuses it once it learns of this.
    pub fn revoke(&self, peer: &PeerId) -> Result<MemberRecord, Error> {
        if !self.authority {
            return Err(Error::AuthorityOnly("revoke members"));
        }
        let mut record = self.member_record(peer)?;
        record.revoked = true;
        self.write_member_record(peer, &record)?;
        Ok(record)
    }

    /// Makes a relay or admin member a delegate, or withdraws its delegation (authority
    /// only): a delegate confirms proposals and binds invites with its own key.
    pub fn delegate(&self, peer: &PeerId, delegate: bool) -> Result<MemberRecord, Error> {
        if !self.authority {
            return Err(Error::AuthorityOnly("delegate"));
        }
        let mut record = self.member_record(peer)?;
        if delegate && (record.revoked || record.grant.role == MemberRole::Device) {
            return Err(fieldsync_core::Error::Invite(format!(
                "{peer} is {}; only an unrevoked relay or admin can be a delegate",
                if record.revoked {
                    "revoked"
                } else {
                    "a device"
                }
            ))
            .into());
        }
        if record.delegate != delegate {
            record.delegate = delegate;
            self.write_member_record(peer, &record)?;
        }
        Ok(record)
    }

    /// Whether this node confirms authority values: the authority, or a delegate whose
    /// delegation this node holds.
    pub fn confirms(&self) -> Result<bool, Error> {
        Ok(self.authority || self.member_list()?.delegation.is_some())
    }

    /// `peer`'s member record, or not found.
    fn member_record(&self, peer: &PeerId) -> Result<MemberRecord, Error> {
        Ok(self
            .member_list()?
            .by_peer
            .get(peer)
            .cloned()
            .ok_or_else(|| fieldsync_core::Error::NotFound(format!("member {peer}")))?)
    }

    fn write_member_record(&self, peer: &PeerId, record: &MemberRecord) -> Result<(), Error> {
        let ws = self.ws();
        let coll = ws.schema.collection(MEMBERS)?;
        let value = serde_json::to_value(record).map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let patch = Patch::parse(coll, &serde_json::json!({ RECORD: value }).to_string())?;
        self.put_patch(MEMBERS, Some(member_entity_id(self.ws().id, peer)), &patch)?;
        Ok(())
    }

    /// Decides whether `peer` may sync, from the member list and what it presented; its
    /// grant, or why it is refused. On the authority, a valid unused invite makes the peer
    /// a member (the invite is then bound to it).
    pub fn admit(&self, peer: &PeerId, credential: Option<&Credential>) -> Result<Grant, Error> {
        match self.member_list()?.admit(peer, credential, self.now_ms()) {
            Admission::Admitted(grant) => Ok(grant),
            Admission::Refused(why) => Err(Error::Refused(why)),
            Admission::Bind(record) => {
                self.bind_invite(peer, &record)?;
                Ok(record.grant)
            }
        }
    }

    /// Binds an invite to the device that presented it first (authority): writes the
    /// device's member record.
    pub fn bind_invite(&self, peer: &PeerId, record: &MemberRecord) -> Result<(), Error> {
        if !self.confirms()? {
            return Err(Error::AuthorityOnly("bind invites"));
        }
        self.write_member_record(peer, record)?;
        tracing::info!(%peer, user = %record.grant.user, "admitted a new member");
        Ok(())
    }

    /// Whether this node may hold every entity: the authority, relays and admins.
    pub(crate) fn holds_everything(&self) -> Result<bool, Error> {
        Ok(match self.credential()? {
            None => true,
            Some(Credential::Member { record }) => {
                MemberRecord::from_confirmation(&record, &self.peer)
                    .is_none_or(|r| r.grant.role != MemberRole::Device)
            }
            Some(Credential::Invite { token, .. }) => token.grant.role != MemberRole::Device,
        })
    }

    /// This device's own grant (from its member record, else its invite); `None` on the
    /// authority or a node that joined without an invite.
    pub fn own_grant(&self) -> Result<Option<Grant>, Error> {
        if self.authority {
            return Ok(None);
        }
        if let Some(r) = self.member_list()?.by_peer.get(&self.peer) {
            return Ok(Some(r.grant.clone()));
        }
        // The invite never changes: read once (this runs for every received entity).
        if let Some(grant) = self.invite_grant.get() {
            return Ok(grant.clone());
        }
        let grant = match self.store.meta(META_INVITE_TOKEN)? {
            Some(bytes) => serde_json::from_slice::<InviteToken>(&bytes)
                .ok()
                .map(|t| t.grant),
            None => None,
        };
        Ok(self.invite_grant.get_or_init(|| grant).clone())
    }

    /// Checks a local write against this device's own partitions, as every peer will:
    /// `before` is the entity before the write (absent: new).
    pub(crate) fn check_own_write(
        &self,
        before: Option<&Facts>,
        after: &Entity,
    ) -> Result<(), Error> {
        let collection = after.collection().unwrap_or_default();
        let Some(grant) = self.own_grant()? else {
            return Ok(());
        };
        if grant.access(&self.ws().schema, &collection) == Access::All {
            return Ok(());
        }
        check_write(
            &self.ws().schema,
            &grant,
            after.id(),
            &collection,
            before,
            &Facts::of(&self.ws(), after),
        )
        .map_err(|r| Error::Refused(r.reason))
    }

    /// What the write check needs of `entity` before a local write, when this device's
    /// partitions restrict its collection.
    pub(crate) fn facts_before_own_write(&self, entity: &Entity) -> Result<Option<Facts>, Error> {
        let collection = entity.collection().unwrap_or_default();
        Ok(match self.own_grant()? {
            Some(g) if g.access(&self.ws().schema, &collection) != Access::All => {
                Some(Facts::of(&self.ws(), entity))
            }
            _ => None,
        })
    }

    /// Whether `peer` is an unrevoked admin member.
    pub(crate) fn is_admin(&self, peer: &PeerId) -> Result<bool, Error> {
        Ok(self
            .member_list()?
            .by_peer
            .get(peer)
            .is_some_and(|r| !r.revoked && r.grant.role == MemberRole::Admin))
    }

    /// Why `peer` may no longer sync, if the member list now says it was revoked.
    pub fn revoked(&self, peer: &PeerId) -> Result<Option<String>, Error> {
        Ok(self.member_list()?.revoked(peer))
    }

    /// What this node presents in its `Hello`: its member record once it has it, else the
    /// invite it joined with. The authority needs neither.
    pub fn credential(&self) -> Result<Option<Credential>, Error> {
        if self.authority {
            return Ok(None);
        }
        if let Some(record) = self.member_confirmation(&self.peer)? {
            return Ok(Some(Credential::Member { record }));
        }
        let Some(token) = self.store.meta(META_INVITE_TOKEN)? else {
            return Ok(None);
        };
        let token = serde_json::from_slice(&token)
            .map_err(|e| Error::CorruptMeta(format!("stored invite: {e}")))?;
        let secret = self.store.meta(META_INVITE_SECRET)?.ok_or_else(|| {
            Error::CorruptMeta("the stored invite has no key; join again with a new invite".into())
        })?;
        let held = HeldInvite::new(token, &secret)
            .map_err(|e| Error::CorruptMeta(format!("stored invite: {e}")))?;
        Ok(Some(held.credential(&self.peer)))
    }

    /// The authority's (or a delegate's) confirmation of `peer`'s member record, if this
    /// node has it.
    fn member_confirmation(&self, peer: &PeerId) -> Result<Option<Confirmation>, Error> {
        // Read from the store, past the lock and the cache: the member list is rebuilt
        // while other entities' locks may be held (a stripe could be this entity's).
        let id = member_entity_id(self.ws().id, peer);
        Ok(self
            .load_committed(id)?
            .and_then(|e| e.confirmed(&self.ws(), RECORD)))
    }

    /// Whether a member with `grant` may see entity `id` of `collection`.
    pub(crate) fn visible(
        &self,
        grant: &Grant,
        collection: &str,
        id: EntityId,
    ) -> Result<bool, Error> {
        match grant.access(&self.ws().schema, collection) {
            Access::All => return Ok(true),
            Access::None => return Ok(false),
            Access::Own => {}
        }
        let _guard = self.lock(id);
        let Some(entity) = self.load(id)? else {
            return Ok(false);
        };
        let owner = entity.owner(&self.ws());
        self.cache(entity);
        Ok(grant.may_see(&self.ws().schema, collection, || owner))
    }

    /// Bumped whenever the member list may have changed.
    pub fn members_version(&self) -> u64 {
        self.members_version.load(Ordering::Acquire)
    }

    /// The member list, re-read from the store after it changed.
    pub fn member_list(&self) -> Result<Arc<MemberList>, Error> {
        let version = self.members_version();
        {
            let cached = self.members.lock().unwrap_or_else(|p| p.into_inner());
            if cached.0 == version {
                return Ok(cached.1.clone());
            }
        }
        let mut cache = MemberList::new(self.ws(), self.authority);
        if self.authority {
            for (_, bytes) in self.store.meta_prefix(META_INVITES)? {
                if let Some(i) = serde_json::from_slice::<PendingInvite>(&bytes)
                    .ok()
                    .filter(|i| i.cancelled)
                {
                    cache.cancelled.insert(i.id);
                }
            }
        }
        self.list(MEMBERS, &[], true, &mut |view| {
            let record = view
                .get(RECORD)
                .and_then(|v| serde_json::from_value::<MemberRecord>(v.clone()).ok());
            let id = view
                .get("_id")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse::<EntityId>().ok());
            if let (Some(r), Some(id)) = (record, id) {
                // A record counts only under its own peer's entity id.
                if let Ok(peer) = r.peer.parse::<PeerId>() {
                    if member_entity_id(self.ws().id, &peer) == id {
                        if let Some(invite) = r.invite {
                            cache.invites.insert(invite, peer);
                        }
                        cache.by_peer.insert(peer, r);
                    }
                }
            }
            true
        })?;
        // Relays and admins may be delegates: their records' seqs order delegations and
        // withdrawals (few members, so loading their documents is cheap).
        let ws = self.ws();
        let staff: Vec<PeerId> = cache
            .by_peer
            .iter()
            .filter(|(_, r)| r.grant.role != MemberRole::Device)
            .map(|(p, _)| *p)
            .collect();
        for peer in staff {
            let Some(record) = self.member_confirmation(&peer)? else {
                continue;
            };
            let active = record.delegate_key(&ws.authority, ws.id).is_some();
            cache.delegates.insert(peer, (record.seq, active));
            if peer == self.peer && active && !self.authority {
                cache.delegation = Some(record);
            }
        }
        // Stored under the version read before listing: a write meanwhile makes it stale.
        let cache = Arc::new(cache);
        *self.members.lock().unwrap_or_else(|p| p.into_inner()) = (version, cache.clone());
        Ok(cache)
    }

    /// Notes a commit: if it touched the member list, the cached list is stale.
    pub(crate) fn note_written(&self, collections: impl IntoIterator<Item = impl AsRef<str>>) {
        if collections.into_iter().any(|c| c.as_ref() == MEMBERS) {
            self.members_version.fetch_add(1, Ordering::AcqRel);
        }
    }
}
