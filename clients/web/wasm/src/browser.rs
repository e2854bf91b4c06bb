//! A browser tab as a full fieldsync device: the native [`Replica`] on a journaled memory
//! store whose durable copy is IndexedDB (kept by the JavaScript package), and the sync
//! engine driven inline over a libp2p WebSocket connection to a relay.
//!
//! Durability: a flush hands its writes to [`Node::take_writes`]; the JavaScript side saves
//! them in one IndexedDB transaction and only then reports a write done. The sync loop
//! does the same before it sends anything, so an `Ack` never leaves before the data it
//! covers is in IndexedDB.
//!
//! Attachments: the files live in IndexedDB too (the JavaScript package keeps them, each
//! whole, in a store of their own), and [`BlobIndex`] is what the replica knows of them —
//! which hashes are durably held, with their sizes — so a reference is written only once
//! its file is saved, exactly as on a native node. Files move over `/fieldsync/blobs/2`
//! to and from the relay (see `browser_sync`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use fieldsync::blobs::Hash;
use fieldsync::{Clock, HeldBlobs, Replica};
use fieldsync_core::{ConflictId, EntityId};
use fieldsync_store::{MemoryStore, Store};
use libp2p_identity::ed25519;
use wasm_bindgen::prelude::*;

use crate::{js_error, v7, MAX_BLOB_BYTES};

/// Stands for the data directory in `status`.
const LABEL: &str = "indexeddb";

/// Time from the page's clock (`Date.now()`); ids are UUID v7 of it.
struct PageClock;

fn page_now_ms() -> f64 {
    #[cfg(target_arch = "wasm32")]
    return js_sys::Date::now();
    #[cfg(not(target_arch = "wasm32"))]
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as f64)
        .unwrap_or(0.0)
}

impl Clock for PageClock {
    fn now_ms(&self) -> i64 {
        page_now_ms() as i64
    }
    fn new_id(&self) -> uuid::Uuid {
        v7(page_now_ms() as u64)
    }
}

/// The files this tab holds in IndexedDB: hash and size of each (the bytes stay there).
#[derive(Debug, Default)]
pub(crate) struct BlobIndex(Mutex<HashMap<Hash, u64>>);

impl BlobIndex {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Hash, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl HeldBlobs for BlobIndex {
    fn pin(&self, hash: &Hash) -> Option<u64> {
        self.held().get(hash).copied()
    }
}

fn parse_hash(hash: &str) -> Result<Hash, JsError> {
    hash.parse::<Hash>().map_err(js_error)
}

/// One device: its replica and store (the sync loop shares them).
#[wasm_bindgen]
pub struct Node {
    replica: Arc<Replica>,
    store: Arc<MemoryStore>,
    blobs: Arc<BlobIndex>,
    #[cfg(target_arch = "wasm32")]
    sync: Option<crate::browser_sync::Handle>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.replica.peer_id().to_string())
            .finish_non_exhaustive()
    }
}

fn parse_entity_id(id: &str) -> Result<EntityId, JsError> {
    id.parse()
        .map_err(|_| js_error(format!("{id:?} is not an entity id")))
}

#[wasm_bindgen]
impl Node {
    /// A new device joining the workspace of `invite_json` (a `fieldsync invite` file) as
    /// `name`, with a new key. Save [`Self::take_writes`] before using it.
    pub fn join(invite_json: &str, name: &str) -> Result<Node, JsError> {
        let store = Arc::new(MemoryStore::journaled([]).map_err(js_error)?);
        let replica = Replica::init_join_on(
            store.clone() as Arc<dyn Store>,
            Path::new(LABEL),
            invite_json.as_bytes(),
            name,
            ed25519::Keypair::generate(),
        )
        .map_err(js_error)?;
        Ok(Self::assemble(replica, store))
    }

    /// Reopens a device from its saved copy: `keys[i]` holds `values[i]`.
    pub fn reopen(keys: js_sys::Array, values: js_sys::Array) -> Result<Node, JsError> {
        if keys.length() != values.length() {
            return Err(js_error("keys and values differ in length"));
        }
        let bytes = |v: JsValue| -> Result<Vec<u8>, JsError> {
            v.dyn_into::<js_sys::Uint8Array>()
                .map(|a| a.to_vec())
                .map_err(|_| js_error("a saved key or value is not a Uint8Array"))
        };
        let mut pairs = Vec::with_capacity(keys.length() as usize);
        for (k, v) in keys.iter().zip(values.iter()) {
            pairs.push((bytes(k)?, bytes(v)?));
        }
        let store = Arc::new(MemoryStore::journaled(pairs).map_err(js_error)?);
        let replica = Replica::open_on(store.clone() as Arc<dyn Store>, Path::new(LABEL))
            .map_err(|e| js_error(format!("the saved device does not open: {e}")))?;
        Ok(Self::assemble(replica, store))
    }

    fn assemble(replica: Replica, store: Arc<MemoryStore>) -> Node {
        let blobs = Arc::new(BlobIndex::default());
        Node {
            replica: Arc::new(
                replica
                    .with_clock(Arc::new(PageClock))
                    .with_held_blobs(blobs.clone()),
            ),
            store,
            blobs,
            #[cfg(target_arch = "wasm32")]
            sync: None,
        }
    }

    /// The writes made durable in memory since the last call, to save in IndexedDB in one
    /// transaction, in order: an array of `[key, value]`, `value` `null` to delete.
    #[wasm_bindgen(js_name = takeWrites)]
    pub fn take_writes(&self) -> js_sys::Array {
        writes_to_js(self.store.take_flushed())
    }

    #[wasm_bindgen(js_name = peerId)]
    pub fn peer_id(&self) -> String {
        self.replica.peer_id().to_string()
    }

    /// Creates (no `id`) or updates an entity with `patch_json` (the CLI's patch
    /// language); its id.
    pub fn put(
        &self,
        collection: &str,
        id: Option<String>,
        patch_json: &str,
    ) -> Result<String, JsError> {
        let id = id.as_deref().map(parse_entity_id).transpose()?;
        let id = self
            .replica
            .put(collection, id, patch_json)
            .map_err(js_error)?;
        self.changed();
        Ok(id.to_string())
    }

    /// The view (JSON), as `fieldsync get` prints it.
    pub fn get(&self, collection: &str, id: &str) -> Result<String, JsError> {
        let view = self
            .replica
            .get(collection, parse_entity_id(id)?)
            .map_err(js_error)?;
        serde_json::to_string(&view).map_err(js_error)
    }

    /// The views of `collection` (JSON array) matching every `field=value` of `filters`,
    /// as `fieldsync list --where` selects them.
    pub fn list(&self, collection: &str, filters: Vec<String>) -> Result<String, JsError> {
        let mut views = Vec::new();
        self.replica
            .list(collection, &filters, false, &mut |v| {
                views.push(v);
                true
            })
            .map_err(js_error)?;
        serde_json::to_string(&views).map_err(js_error)
    }

    pub fn delete(&self, collection: &str, id: &str) -> Result<(), JsError> {
        self.replica
            .delete(collection, parse_entity_id(id)?)
            .map_err(js_error)?;
        self.changed();
        Ok(())
    }

    /// Open conflicts (JSON array), as `fieldsync conflicts` prints them.
    pub fn conflicts(&self) -> Result<String, JsError> {
        let conflicts = self.replica.conflicts(false).map_err(js_error)?;
        serde_json::to_string(&conflicts).map_err(js_error)
    }

    /// Settles conflict `conflict_id` with `value_json`; the entity's id.
    pub fn resolve(&self, conflict_id: &str, value_json: &str) -> Result<String, JsError> {
        let id: ConflictId = conflict_id
            .parse()
            .map_err(|_| js_error(format!("{conflict_id:?} is not a conflict id")))?;
        let entity = self.replica.resolve(&id, value_json).map_err(js_error)?;
        self.changed();
        Ok(entity.to_string())
    }

    /// The BLAKE3 hash (hex) of a file to attach, checked against the browser's limit
    /// ([`MAX_BLOB_BYTES`]) before anything is stored.
    #[wasm_bindgen(js_name = hashBlob)]
    pub fn hash_blob(&self, bytes: &[u8]) -> Result<String, JsError> {
        check_blob_size(bytes.len() as u64)?;
        Ok(Hash::of(bytes).to_string())
    }

    /// Refuses a file of `size` bytes over [`MAX_BLOB_BYTES`] (a `Blob`'s size, before its
    /// bytes are read).
    #[wasm_bindgen(js_name = checkBlobSize)]
    pub fn check_blob_size(&self, size: f64) -> Result<(), JsError> {
        check_blob_size(if size.is_finite() && size >= 0.0 {
            size as u64
        } else {
            u64::MAX
        })
    }

    /// Records that IndexedDB durably holds the file `hash` of `size` bytes (after saving
    /// it, and for each saved file when the device opens).
    #[wasm_bindgen(js_name = holdBlob)]
    pub fn hold_blob(&self, hash: &str, size: f64) -> Result<(), JsError> {
        let hash = parse_hash(hash)?;
        if !(0.0..=MAX_BLOB_BYTES as f64).contains(&size) {
            return Err(js_error(format!("{size} is not the size of a file here")));
        }
        self.blobs.held().insert(hash, size as u64);
        Ok(())
    }

    /// Whether a file may be attached to `field` of entity `id` (an `attachments` field,
    /// an entity that exists): asked before the bytes are stored.
    #[wasm_bindgen(js_name = checkAttach)]
    pub fn check_attach(&self, collection: &str, id: &str, field: &str) -> Result<(), JsError> {
        self.replica
            .check_attach_target(collection, parse_entity_id(id)?, field)
            .map_err(js_error)
    }

    /// Adds `reference_json` (`{hash, size, mime, name}`) to the `attachments` field
    /// `field`, once its file is held ([`Self::hold_blob`]); the reference (JSON).
    pub fn attach(
        &self,
        collection: &str,
        id: &str,
        field: &str,
        reference_json: &str,
    ) -> Result<String, JsError> {
        let reference: serde_json::Value = serde_json::from_str(reference_json)
            .map_err(|e| js_error(format!("the reference is not JSON: {e}")))?;
        let checked = self
            .replica
            .attach(collection, parse_entity_id(id)?, field, &reference)
            .map_err(js_error)?;
        self.changed();
        Ok(checked.to_json().to_string())
    }

    /// `fieldsync status` (JSON), with `connected` (whether the relay session is up) and
    /// `pending_to_relay`.
    pub fn status(&self) -> Result<String, JsError> {
        let mut status =
            serde_json::to_value(self.replica.status().map_err(js_error)?).map_err(js_error)?;
        // The files are in IndexedDB, not in a store on disk: counted from the index.
        {
            let held = self.blobs.held();
            status["blobs"]["count"] = serde_json::Value::from(held.len());
            status["blobs"]["bytes"] = serde_json::Value::from(held.values().sum::<u64>());
            status["blobs"]["max_blob_bytes"] = serde_json::Value::from(MAX_BLOB_BYTES);
        }
        status["connected"] = serde_json::Value::Bool(self.connected());
        // Local changes the relay has not acknowledged yet (as the daemon's status says).
        let acked = self.replica.acknowledged().map_err(js_error)?;
        status["pending_to_relay"] =
            serde_json::Value::from(self.replica.pending_after(acked).map_err(js_error)?);
        serde_json::to_string(&status).map_err(js_error)
    }
}

impl Node {
    #[cfg(target_arch = "wasm32")]
    fn changed(&self) {
        if let Some(sync) = &self.sync {
            sync.nudge();
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn changed(&self) {}

    #[cfg(target_arch = "wasm32")]
    fn connected(&self) -> bool {
        self.sync.as_ref().is_some_and(|s| s.connected())
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn connected(&self) -> bool {
        false
    }
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen]
impl Node {
    /// Starts syncing with the relay at `relay` (a `/ws` or `/tls/ws` multiaddr ending in
    /// `/p2p/<id>`), redialing while it is unreachable. `persist(writes)` must save
    /// [`Self::take_writes`]-shaped writes and return a Promise that settles once they are
    /// in IndexedDB; `on_event(json)` receives the daemon's JSON Lines events;
    /// `load_blob(hash)` returns a Promise of a held file's bytes (a `Uint8Array`, or
    /// `undefined`), for serving it to the relay.
    #[wasm_bindgen(js_name = startSync)]
    pub fn start_sync(
        &mut self,
        relay: &str,
        persist: js_sys::Function,
        on_event: js_sys::Function,
        load_blob: js_sys::Function,
    ) -> Result<(), JsError> {
        if self.sync.is_some() {
            return Err(js_error("this device is already syncing"));
        }
        self.sync = Some(crate::browser_sync::start(
            self.replica.clone(),
            self.store.clone(),
            relay,
            persist,
            on_event,
            load_blob,
        )?);
        Ok(())
    }

    /// Fetches the file `hash` from the relay (which asks its other peers when it lacks
    /// it), verified chunk by chunk against the hash as it arrives; a Promise of its bytes,
    /// not yet stored (the page saves them, then calls [`Self::hold_blob`]). Rejects with
    /// an `Error` whose `code` is `NOT_CONNECTED`, `NOT_HERE` (no peer sent it),
    /// `REFUSED` (no entity this device may see references it) or `FAILED`.
    #[wasm_bindgen(js_name = fetchBlob)]
    pub fn fetch_blob(&self, hash: &str) -> Result<js_sys::Promise, JsError> {
        let hash = parse_hash(hash)?;
        let fetch = self.sync.as_ref().map(|s| s.fetch_blob(hash));
        Ok(wasm_bindgen_futures::future_to_promise(async move {
            let Some(fetch) = fetch else {
                return Err(crate::browser_sync::coded_error(
                    "NOT_CONNECTED",
                    "this device is not syncing with a relay (open it with `relay`)",
                ));
            };
            let bytes = fetch.await?;
            Ok(js_sys::Uint8Array::from(bytes.as_slice()).into())
        }))
    }

    /// Stops syncing (the connection closes).
    #[wasm_bindgen(js_name = stopSync)]
    pub fn stop_sync(&mut self) {
        if let Some(sync) = self.sync.take() {
            sync.stop();
        }
    }
}

/// Refuses a file over [`MAX_BLOB_BYTES`].
pub(crate) fn check_blob_size(size: u64) -> Result<(), JsError> {
    if size > MAX_BLOB_BYTES {
        return Err(js_error(format!(
            "the file has {size} bytes, over the browser's limit of {} MiB per attachment (a tab holds a file whole while it hashes or sends it); it was not stored",
            MAX_BLOB_BYTES >> 20
        )));
    }
    Ok(())
}

/// Writes as JavaScript `[key, value | null]` pairs.
pub(crate) fn writes_to_js(writes: Vec<fieldsync_store::KvWrite>) -> js_sys::Array {
    writes
        .into_iter()
        .map(|(k, v)| {
            let pair = js_sys::Array::new();
            pair.push(&js_sys::Uint8Array::from(k.as_slice()));
            pair.push(&match v {
                Some(v) => js_sys::Uint8Array::from(v.as_slice()).into(),
                None => JsValue::NULL,
            });
            JsValue::from(pair)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// What IndexedDB would hold after saving every write handed over so far.
    fn save(saved: &mut BTreeMap<Vec<u8>, Vec<u8>>, node: &Node) {
        for (k, v) in node.store.take_flushed() {
            match v {
                Some(v) => saved.insert(k, v),
                None => saved.remove(&k),
            };
        }
    }

    fn reopen(saved: &BTreeMap<Vec<u8>, Vec<u8>>) -> Node {
        let store = Arc::new(MemoryStore::journaled(saved.clone()).unwrap());
        let replica = Replica::open_on(store.clone() as Arc<dyn Store>, Path::new(LABEL)).unwrap();
        Node::assemble(replica, store)
    }

    fn invite() -> String {
        let hq = Replica::init_authority_on(
            Arc::new(MemoryStore::new()),
            Path::new("hq"),
            include_str!("../../../../examples/schema.toml"),
            "hq",
            ed25519::Keypair::generate(),
        )
        .unwrap();
        String::from_utf8(hq.invite()).unwrap()
    }

    // (Error paths build a JavaScript `Error`, which needs a JavaScript engine: the
    // browser tests cover them.)
    #[test]
    fn a_device_reopens_from_exactly_what_was_saved() {
        let node = Node::join(&invite(), "ana-tab").unwrap();
        let mut saved = BTreeMap::new();
        save(&mut saved, &node);
        let joined_only = saved.clone();
        let id = node
            .put(
                "tasks",
                None,
                r#"{"title":"Fit boiler","status":"open","tags":["gas"]}"#,
            )
            .unwrap();
        node.put("tasks", Some(id.clone()), r#"{"status":"completed"}"#)
            .unwrap();
        node.put("tasks", None, r#"{"title":"Second"}"#).unwrap();
        save(&mut saved, &node);

        let again = reopen(&saved);
        assert_eq!(again.peer_id(), node.peer_id());
        assert_eq!(
            again.get("tasks", &id).unwrap(),
            node.get("tasks", &id).unwrap()
        );
        let view: serde_json::Value =
            serde_json::from_str(&again.get("tasks", &id).unwrap()).unwrap();
        assert_eq!(view["status"], "completed");
        let listed: Vec<serde_json::Value> =
            serde_json::from_str(&again.list("tasks", vec![]).unwrap()).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(again.status().unwrap(), node.status().unwrap());
        let status: serde_json::Value = serde_json::from_str(&again.status().unwrap()).unwrap();
        assert_eq!(
            status["pending_to_relay"], 2,
            "no relay acknowledged the two tasks"
        );
        assert_eq!(status["connected"], false);

        // Writes never saved are not there after a reopen (the page was closed first).
        let fresh = reopen(&joined_only);
        assert_eq!(fresh.peer_id(), node.peer_id());
        let none: Vec<serde_json::Value> =
            serde_json::from_str(&fresh.list("tasks", vec![]).unwrap()).unwrap();
        assert!(none.is_empty());
    }
}
