//! fieldsync in JavaScript: the Rust core compiled to WebAssembly, not a second
//! implementation. A [`Device`] is a member identity (an ed25519 key and the workspace of
//! an invite); a [`Doc`] is one entity's Automerge document with the schema's rules
//! applied by `fieldsync-core` exactly as on a native node.
//!
//! The crate reads no clock and does no IO: JavaScript passes the time (`Date.now()`) and
//! keeps the bytes (IndexedDB in the browser package). Errors are `Error` objects whose
//! message is the same text the CLI prints.

use fieldsync_core::membership::Credential;
use fieldsync_core::workspace::HeldInvite;
use fieldsync_core::{Entity, EntityId, Invite, Patch, ProposalId, Workspace, Writer};
use libp2p_identity::ed25519;
use wasm_bindgen::prelude::*;

pub mod browser;
#[cfg(target_arch = "wasm32")]
mod browser_sync;

/// The largest document `Doc.load` takes (the native per-entity limit).
pub const MAX_DOC_BYTES: usize = fieldsync_sync::MAX_ENTITY_BYTES;

/// The largest file a browser device attaches, serves or fetches: 64 MiB (a native node's
/// default is 256 MiB). A tab holds a file whole in memory while it hashes, sends or
/// receives it, so its limit is lower; a larger file on the relay is refused with a clear
/// error before any of it is fetched.
pub const MAX_BLOB_BYTES: u64 = 64 << 20;

fn js_error(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// `now_ms` (from the caller's clock), checked to be a time since 1970.
fn check_time(now_ms: f64) -> Result<u64, JsError> {
    if !(now_ms.is_finite() && (0.0..9.0e15).contains(&now_ms)) {
        return Err(js_error(format!(
            "now_ms {now_ms} is not a time in milliseconds since 1970"
        )));
    }
    Ok(now_ms as u64)
}

/// A UUID v7 for time `ms`, with random bits from the platform's generator.
fn v7(ms: u64) -> uuid::Uuid {
    uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        ms / 1000,
        ((ms % 1000) * 1_000_000) as u32,
    ))
}

/// A member identity: this device's key and the workspace it joined.
#[wasm_bindgen]
pub struct Device {
    ws: Workspace,
    key: ed25519::Keypair,
    user: String,
    invite: Option<HeldInvite>,
}

/// Names the device without printing its secret key.
impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("user", &self.user)
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl Device {
    /// A new device for the workspace of `invite_json` (a `fieldsync invite` file), with a
    /// new key. Writes are made as the invite's user.
    #[wasm_bindgen(js_name = fromInvite)]
    pub fn from_invite(invite_json: &str) -> Result<Device, JsError> {
        Self::with_key(invite_json, ed25519::Keypair::generate())
    }

    /// Reopens a device from its invite and the 32-byte secret of its key (`secretKey()`).
    #[wasm_bindgen(js_name = restore)]
    pub fn restore(invite_json: &str, secret_key: &[u8]) -> Result<Device, JsError> {
        let mut bytes = secret_key.to_vec();
        let secret = ed25519::SecretKey::try_from_bytes(&mut bytes)
            .map_err(|e| js_error(format!("secret key: {e}")))?;
        Self::with_key(invite_json, secret.into())
    }

    fn with_key(invite_json: &str, key: ed25519::Keypair) -> Result<Device, JsError> {
        let (ws, invite) = Invite::decode_with_token(invite_json.as_bytes()).map_err(js_error)?;
        let user = invite
            .as_ref()
            .map(|h| h.token.grant.user.clone())
            .unwrap_or_default();
        Ok(Device {
            ws,
            key,
            user,
            invite,
        })
    }

    /// The device's peer id (as `fieldsync status` shows it).
    #[wasm_bindgen(js_name = peerId)]
    pub fn peer_id(&self) -> String {
        self.peer().to_string()
    }

    /// The secret half of the device's key (32 bytes): keep it to reopen the device.
    #[wasm_bindgen(js_name = secretKey)]
    pub fn secret_key(&self) -> Vec<u8> {
        self.key.secret().as_ref().to_vec()
    }

    /// The workspace id.
    #[wasm_bindgen(js_name = workspaceId)]
    pub fn workspace_id(&self) -> String {
        self.ws.id.to_string()
    }

    /// The user the invite names (empty for a bare workspace).
    pub fn user(&self) -> String {
        self.user.clone()
    }

    /// The credential this device presents in its `Hello` (JSON): its invite token with a
    /// proof for this peer id — never the invite's secret.
    pub fn credential(&self) -> Result<String, JsError> {
        let credential: Option<Credential> =
            self.invite.as_ref().map(|h| h.credential(&self.peer()));
        serde_json::to_string(&credential).map_err(js_error)
    }

    /// Creates an entity of `collection` holding `patch_json` (the CLI's patch language), at
    /// time `now_ms`.
    pub fn create(&self, collection: &str, patch_json: &str, now_ms: f64) -> Result<Doc, JsError> {
        let coll = self.ws.schema.collection(collection).map_err(js_error)?;
        let patch = Patch::parse(coll, patch_json).map_err(js_error)?;
        let ms = check_time(now_ms)?;
        let entity = Entity::create(
            &self.ws,
            EntityId(v7(ms)),
            collection,
            &self.writer(ms),
            &patch,
            &mut || ProposalId(v7(ms)),
        )
        .map_err(js_error)?;
        Ok(Doc { entity })
    }

    /// Applies `patch_json` to `doc` as this device, at time `now_ms`.
    pub fn update(&self, doc: &mut Doc, patch_json: &str, now_ms: f64) -> Result<(), JsError> {
        let collection = doc
            .entity
            .collection()
            .ok_or_else(|| js_error("the document has no collection"))?;
        let coll = self.ws.schema.collection(&collection).map_err(js_error)?;
        let patch = Patch::parse(coll, patch_json).map_err(js_error)?;
        let ms = check_time(now_ms)?;
        doc.entity
            .update(&self.ws, &self.writer(ms), &patch, &mut || {
                ProposalId(v7(ms))
            })
            .map_err(js_error)
    }

    /// Deletes the entity of `doc` (a tombstone that merges like any write).
    pub fn delete(&self, doc: &mut Doc, now_ms: f64) -> Result<(), JsError> {
        let ms = check_time(now_ms)?;
        doc.entity
            .delete(&self.ws, &self.writer(ms))
            .map_err(js_error)
    }

    /// The view of `doc` with the schema's rules applied (JSON), as `fieldsync get` prints it.
    pub fn view(&self, doc: &Doc) -> Result<String, JsError> {
        let derived = doc.entity.derive(&self.ws).map_err(js_error)?;
        serde_json::to_string(&derived.view).map_err(js_error)
    }

    /// The open conflicts of `doc` (JSON array), as `fieldsync conflicts` prints them.
    pub fn conflicts(&self, doc: &Doc) -> Result<String, JsError> {
        let derived = doc.entity.derive(&self.ws).map_err(js_error)?;
        serde_json::to_string(&derived.conflicts).map_err(js_error)
    }

    fn peer(&self) -> fieldsync_core::PeerId {
        libp2p_identity::PublicKey::from(self.key.public()).to_peer_id()
    }

    fn writer(&self, ms: u64) -> Writer<'_> {
        Writer {
            peer: self.peer(),
            user: &self.user,
            now_ms: ms as i64,
            authority_key: None,
            delegation: None,
        }
    }
}

/// One entity's document.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Doc {
    entity: Entity,
}

#[wasm_bindgen]
impl Doc {
    /// A document from its saved bytes (`save()`, or received from a peer), checked as a
    /// native node checks a received document.
    pub fn load(id: &str, bytes: &[u8]) -> Result<Doc, JsError> {
        if bytes.len() > MAX_DOC_BYTES {
            return Err(js_error(format!(
                "a document of {} bytes is over the {MAX_DOC_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let id: EntityId = id
            .parse()
            .map_err(|_| js_error(format!("{id:?} is not an entity id")))?;
        Ok(Doc {
            entity: Entity::load_received(id, bytes).map_err(js_error)?,
        })
    }

    /// The entity id.
    pub fn id(&self) -> String {
        self.entity.id().to_string()
    }

    /// The collection the entity belongs to.
    pub fn collection(&self) -> Option<String> {
        self.entity.collection()
    }

    /// The whole document, compact.
    pub fn save(&mut self) -> Vec<u8> {
        self.entity.save()
    }

    /// Merges another copy of the same entity (its saved bytes); whether anything changed.
    pub fn merge(&mut self, bytes: &[u8]) -> Result<bool, JsError> {
        if bytes.len() > MAX_DOC_BYTES {
            return Err(js_error(format!(
                "a document of {} bytes is over the {MAX_DOC_BYTES}-byte limit",
                bytes.len()
            )));
        }
        self.entity.merge_bytes(bytes).map_err(js_error)
    }
}
