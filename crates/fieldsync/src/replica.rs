//! The replica: entity operations made durable.
//!
//! Every write follows the same steps: 1. check the input against the schema (nothing is
//! written on bad input); 2. lock the entity; 3. load its document; 4. apply the change in
//! the core; 5. derive view and indexes; 6. commit them atomically; 7. **wait until the
//! commit is durable before reporting success** (concurrent writers share one flush).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use fieldsync_core::patch::{matches_filter, parse_filter};
use fieldsync_core::workspace::Invite;
use fieldsync_core::{
    Applied, Conflict, ConflictId, ConflictState, Entity, EntityId, HistoryEntry, OpId, Patch,
    PeerId, Proposal, ProposalId, Schema, View, Workspace, WorkspaceId, Writer,
};
use fieldsync_store::{DocWrite, EntityWrite, KeyKind, Secret, Store, Ticket};
use libp2p_identity::ed25519;
use serde::Serialize;
use serde_json::Value as Json;

use crate::cache::{DocCache, MemoryOptions};
use crate::Error;

const META_IDENTITY: &str = "identity";
const META_NODE: &str = "node";
pub(crate) const META_WORKSPACE: &str = "workspace";
/// `ckin/<peer>`: the peer's feed seq up to which this node has applied everything.
pub(crate) const META_CHECKPOINT_IN: &str = "ckin/";
/// `ckout/<peer>`: this node's feed seq up to which the peer has applied everything.
pub(crate) const META_CHECKPOINT_OUT: &str = "ckout/";
/// The invite token this device joined with (presented until its member record arrives).
pub(crate) const META_INVITE_TOKEN: &str = "invite_token";
/// The secret half of the invite token's one-time key (32 bytes).
pub(crate) const META_INVITE_SECRET: &str = "invite_secret";
pub(crate) const INDEX_CONFLICT: &str = "conflict";
pub(crate) const INDEX_PROPOSAL: &str = "proposal";
/// Files referenced by live entities: key = BLAKE3 hash (32 bytes) then entity id (16),
/// value = the entity's collection. Serving a file and collecting unreferenced ones read it
/// instead of every view.
pub(crate) const INDEX_BLOB: &str = "blob";

/// Compact a document when this many chunks were appended since its snapshot…
const COMPACT_AFTER_CHUNKS: u32 = 32;
/// …or when the chunks outweigh the snapshot.
const COMPACT_RATIO: u64 = 1;
/// Entity lock stripes: writes to one entity are serialised, others run in parallel.
const LOCK_STRIPES: usize = 256;

/// Where a replica gets time and new ids. The system clock by default; the simulator
/// injects a seeded one so a run is reproducible from its seed.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// A new UUID v7 (time-ordered).
    fn new_id(&self) -> uuid::Uuid;
}

/// The system clock and OS randomness.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
    fn new_id(&self) -> uuid::Uuid {
        uuid::Uuid::now_v7()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeMeta {
    name: String,
    authority: bool,
}

/// One entry of the changes feed ([`Replica::changes`]): an entity's latest state.
#[derive(Debug, Clone, Serialize)]
pub struct FeedChange {
    pub seq: u64,
    pub collection: String,
    pub id: EntityId,
    /// The view (for a deleted entity, its last view with `_deleted`).
    pub view: View,
    pub deleted: bool,
    /// The document's heads (hex, sorted): equal heads, equal documents.
    pub heads: Vec<String>,
}

/// What `fieldsync status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    pub peer_id: String,
    pub name: String,
    pub workspace: WorkspaceId,
    pub authority: bool,
    pub entities: serde_json::Map<String, Json>,
    pub open_conflicts: usize,
    pub pending_proposals: usize,
    pub feed_seq: u64,
    pub data_dir: PathBuf,
    /// Whether this node may sync: `active`, `revoked` or `refused`, and why.
    pub membership: crate::Membership,
    /// The schema version in use here.
    pub schema_version: u64,
    /// The schema version the stored views follow (lower only while they are recomputed).
    pub views_schema_version: u64,
    /// While views are recomputed under a new version: how far (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_recompute: Option<crate::schemas::RecomputeProgress>,
    /// Whether the store is encrypted at rest (`init --encrypt`).
    pub encrypted: bool,
    /// The attachments' blob store: counts, bytes and limits.
    pub blobs: crate::BlobStatus,
}

/// A page of views: the last id read, and each id with its view.
type ViewPage = ([u8; 16], Vec<([u8; 16], View)>);

/// One node's replica of its workspace.
pub struct Replica {
    pub(crate) store: Arc<dyn Store>,
    /// The workspace, whose schema is swapped when a newer version is adopted.
    ws: std::sync::RwLock<Arc<Workspace>>,
    pub(crate) key: ed25519::Keypair,
    pub(crate) peer: PeerId,
    pub(crate) name: String,
    pub(crate) authority: bool,
    pub(crate) dir: PathBuf,
    clock: Arc<dyn Clock>,
    locks: Vec<Mutex<()>>,
    /// Recently used documents, all fully persisted, bounded by bytes. An entity is taken out
    /// while a writer holds its lock and put back only after its write is durable.
    cache: Mutex<DocCache>,
    /// The member list read from the store, with the `members_version` it was read at
    /// (starts at 1, so the first use reads it).
    pub(crate) members: Mutex<(u64, Arc<fieldsync_core::membership::MemberList>)>,
    pub(crate) members_version: std::sync::atomic::AtomicU64,
    /// The grant of the invite this device joined with, once read.
    pub(crate) invite_grant: std::sync::OnceLock<Option<fieldsync_core::membership::Grant>>,
    /// (feed seq, open conflicts, pending proposals) as `status` last counted them: every
    /// write moves the feed, so the counts are walked again only after something changed.
    status_counts: Mutex<Option<(u64, usize, usize)>>,
    /// (acknowledged seq, feed seq, entities changed in between) as last counted.
    pending_count: Mutex<Option<(u64, u64, usize)>>,
    /// Held while a schema version is adopted, so two adoptions do not interleave.
    pub(crate) adopting: Mutex<()>,
    /// Held while views are recomputed under a new schema version.
    pub(crate) recomputing: Mutex<()>,
    /// Progress of the views' recomputation under a newly adopted schema version.
    pub(crate) recompute: Mutex<Option<crate::schemas::RecomputeProgress>>,
    /// Bumped at every change of `recompute`: a list that read views across a change reads
    /// them again (see `list_after`).
    pub(crate) recompute_gen: std::sync::atomic::AtomicU64,
    /// The background recompute thread, once started.
    pub(crate) background: std::sync::OnceLock<Arc<crate::schemas::Worker>>,
    /// The blob store's limits, and the store once opened (see `attachments`).
    pub(crate) blob_config: Mutex<fieldsync_blobs::Config>,
    pub(crate) blobs: Mutex<Option<Arc<fieldsync_blobs::BlobStore>>>,
    /// Where this node keeps its files when not in a blob store on disk (a browser tab's
    /// IndexedDB); see [`crate::HeldBlobs`].
    pub(crate) held_blobs: std::sync::OnceLock<Arc<dyn crate::HeldBlobs>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("peer", &self.peer)
            .field("workspace", &self.ws().id)
            .field("dir", &self.dir)
            .finish()
    }
}

fn db_dir(dir: &Path) -> PathBuf {
    dir.join("db")
}

impl Replica {
    /// Creates a new workspace in `dir` with this node as its authority.
    pub fn init_authority(dir: &Path, schema_toml: &str, name: &str) -> Result<Self, Error> {
        Self::init_authority_with_key(dir, schema_toml, name, ed25519::Keypair::generate())
    }

    /// Like [`Self::init_authority`] with a given identity key (the simulator's are seeded).
    pub fn init_authority_with_key(
        dir: &Path,
        schema_toml: &str,
        name: &str,
        key: ed25519::Keypair,
    ) -> Result<Self, Error> {
        Self::init_authority_with(dir, schema_toml, name, key, None)
    }

    /// Like [`Self::init_authority_with_key`]; with `secret`, the store is encrypted at rest
    /// and every later open needs the same secret ([`Self::open_with_key`]).
    pub fn init_authority_with(
        dir: &Path,
        schema_toml: &str,
        name: &str,
        key: ed25519::Keypair,
        secret: Option<&Secret>,
    ) -> Result<Self, Error> {
        Self::ensure_free(dir)?;
        Schema::from_toml(schema_toml)?; // before anything is created
        Self::init_authority_on(Self::new_store(dir, secret)?, dir, schema_toml, name, key)
    }

    /// Joins the workspace of `invite` (JSON bytes from `fieldsync invite`) as a device.
    pub fn init_join(dir: &Path, invite: &[u8], name: &str) -> Result<Self, Error> {
        Self::init_join_with_key(dir, invite, name, ed25519::Keypair::generate())
    }

    /// Like [`Self::init_join`] with a given identity key.
    pub fn init_join_with_key(
        dir: &Path,
        invite: &[u8],
        name: &str,
        key: ed25519::Keypair,
    ) -> Result<Self, Error> {
        Self::init_join_with(dir, invite, name, key, None)
    }

    /// Like [`Self::init_join_with_key`]; with `secret`, the store is encrypted at rest.
    pub fn init_join_with(
        dir: &Path,
        invite: &[u8],
        name: &str,
        key: ed25519::Keypair,
        secret: Option<&Secret>,
    ) -> Result<Self, Error> {
        Self::ensure_free(dir)?;
        Invite::decode_with_token(invite)?; // before anything is created
        Self::init_join_on(Self::new_store(dir, secret)?, dir, invite, name, key)
    }

    /// Uses `clock` for time and new ids from now on.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub(crate) fn ensure_free(dir: &Path) -> Result<(), Error> {
        if db_dir(dir).exists() {
            return Err(Error::AlreadyInitialized(dir.to_owned()));
        }
        Ok(())
    }

    /// A new sled store in `dir`, encrypted with `secret` if given.
    pub(crate) fn new_store(dir: &Path, secret: Option<&Secret>) -> Result<Arc<dyn Store>, Error> {
        std::fs::create_dir_all(dir).map_err(Error::file(dir))?;
        Ok(fieldsync_store::create_store(
            &db_dir(dir),
            fieldsync_store::DEFAULT_CACHE_BYTES,
            secret,
        )?)
    }

    /// A new workspace on `store` (any engine, e.g. [`fieldsync_store::MemoryStore`]), with
    /// this node its authority; `label` stands for the data directory in `status`.
    pub fn init_authority_on(
        store: Arc<dyn Store>,
        label: &Path,
        schema_toml: &str,
        name: &str,
        key: ed25519::Keypair,
    ) -> Result<Self, Error> {
        let schema = Schema::from_toml(schema_toml)?;
        let ws = Workspace {
            id: WorkspaceId(uuid::Uuid::now_v7()),
            schema,
            authority: key.public(),
        };
        Self::init_on(store, label, ws, key, name, true)
    }

    /// Joins the workspace of `invite` on `store`, like [`Self::init_join_with_key`].
    pub fn init_join_on(
        store: Arc<dyn Store>,
        label: &Path,
        invite: &[u8],
        name: &str,
        key: ed25519::Keypair,
    ) -> Result<Self, Error> {
        let (ws, held) = Invite::decode_with_token(invite)?;
        let replica = Self::init_on(store, label, ws, key, name, false)?;
        if let Some(held) = held {
            replica.commit_durable(
                vec![],
                vec![
                    (
                        META_INVITE_TOKEN.to_owned(),
                        Some(to_json_bytes(&held.token)),
                    ),
                    (META_INVITE_SECRET.to_owned(), Some(held.secret_bytes())),
                ],
            )?;
        }
        Ok(replica)
    }

    pub(crate) fn init_on(
        store: Arc<dyn Store>,
        dir: &Path,
        ws: Workspace,
        key: ed25519::Keypair,
        name: &str,
        authority: bool,
    ) -> Result<Self, Error> {
        if store.meta(META_IDENTITY)?.is_some() {
            return Err(Error::AlreadyInitialized(dir.to_owned()));
        }
        let node = NodeMeta {
            name: name.to_owned(),
            authority,
        };
        let invite =
            serde_json::to_vec(&Invite::new(&ws)).map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let meta = vec![
            (META_IDENTITY.to_owned(), Some(key.to_bytes().to_vec())),
            (
                META_NODE.to_owned(),
                Some(serde_json::to_vec(&node).map_err(|e| Error::CorruptMeta(e.to_string()))?),
            ),
            (META_WORKSPACE.to_owned(), Some(invite)),
            // Empty, so its `blob` index covers every entity from the start.
            (
                crate::attachments::META_BLOB_INDEX.to_owned(),
                Some(vec![1]),
            ),
        ];
        let ticket = store.commit(vec![], meta)?;
        store.wait_durable(ticket)?;
        let replica = Self::assemble(store, ws, key, node, dir);
        // Joined with an invite of a later version: the (empty) views follow it.
        replica.adopt_newest_schema()?;
        Ok(replica)
    }

    /// Opens the node in `dir`.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        Self::open_with(dir, MemoryOptions::default())
    }

    /// Opens the node in `dir` with caches sized by `memory`.
    pub fn open_with(dir: &Path, memory: MemoryOptions) -> Result<Self, Error> {
        Self::open_with_key(dir, memory, &mut |kind: KeyKind| {
            Err(format!("it needs {} to open", kind.name()))
        })
    }

    /// Opens the node in `dir`, encrypted or not: `key` is asked for the secret (passphrase
    /// or key file) only if the store is encrypted; its `Err` says what is missing.
    pub fn open_with_key(
        dir: &Path,
        memory: MemoryOptions,
        key: fieldsync_store::KeyProvider<'_>,
    ) -> Result<Self, Error> {
        if !db_dir(dir).exists() {
            return Err(Error::NotInitialized(dir.to_owned()));
        }
        let store = fieldsync_store::open_store(&db_dir(dir), memory.store_cache_bytes, key)?;
        Ok(Self::open_on(store, dir)?.with_doc_cache_bytes(memory.doc_cache_bytes))
    }

    /// Whether this node's store is encrypted at rest.
    pub fn encrypted(&self) -> bool {
        self.store.encrypted()
    }

    /// Opens the node kept in `store` (any engine); `label` stands for the data directory.
    pub fn open_on(store: Arc<dyn Store>, label: &Path) -> Result<Self, Error> {
        let missing = |what: &str| Error::CorruptMeta(format!("{what} is missing"));
        let mut key_bytes = store
            .meta(META_IDENTITY)?
            .ok_or_else(|| missing("identity"))?;
        let key = ed25519::Keypair::try_from_bytes(&mut key_bytes)
            .map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let node: NodeMeta =
            serde_json::from_slice(&store.meta(META_NODE)?.ok_or_else(|| missing("node"))?)
                .map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let ws = Invite::decode(
            &store
                .meta(META_WORKSPACE)?
                .ok_or_else(|| missing("workspace"))?,
        )?;
        let replica = Self::assemble(store, ws, key, node, label);
        // The newest schema version held, and views that follow it (after a crash mid-way).
        replica.adopt_newest_schema()?;
        replica.finish_purges()?;
        replica.index_blob_references()?;
        Ok(replica)
    }

    /// Bounds the document cache to `bytes` (estimated; see [`Entity::memory_estimate`]).
    pub fn with_doc_cache_bytes(self, bytes: usize) -> Self {
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = DocCache::new(bytes);
        self
    }

    /// (entities, estimated bytes) in the document cache.
    pub fn doc_cache_usage(&self) -> (usize, usize) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).usage()
    }

    fn assemble(
        store: Arc<dyn Store>,
        ws: Workspace,
        key: ed25519::Keypair,
        node: NodeMeta,
        dir: &Path,
    ) -> Self {
        let peer = libp2p_identity::PublicKey::from(key.public()).to_peer_id();
        let ws = Arc::new(ws);
        Replica {
            store,
            ws: std::sync::RwLock::new(ws.clone()),
            key,
            peer,
            name: node.name,
            authority: node.authority,
            dir: dir.to_owned(),
            clock: Arc::new(SystemClock),
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            cache: Mutex::new(DocCache::new(MemoryOptions::DEFAULT.doc_cache_bytes)),
            members: Mutex::new((
                0,
                Arc::new(fieldsync_core::membership::MemberList::new(
                    ws,
                    node.authority,
                )),
            )),
            members_version: std::sync::atomic::AtomicU64::new(1),
            invite_grant: std::sync::OnceLock::new(),
            status_counts: Mutex::new(None),
            pending_count: Mutex::new(None),
            adopting: Mutex::new(()),
            recomputing: Mutex::new(()),
            recompute: Mutex::new(None),
            recompute_gen: std::sync::atomic::AtomicU64::new(0),
            background: std::sync::OnceLock::new(),
            blob_config: Mutex::new(fieldsync_blobs::Config::default()),
            blobs: Mutex::new(None),
            held_blobs: std::sync::OnceLock::new(),
        }
    }

    /// The name this node gave itself at init.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The workspace, with the schema version this node has adopted.
    pub fn workspace(&self) -> Arc<Workspace> {
        self.ws()
    }

    pub(crate) fn ws(&self) -> Arc<Workspace> {
        self.ws.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Swaps in a workspace with a newer schema (see `schemas.rs`).
    pub(crate) fn set_ws(&self, ws: Workspace) {
        *self.ws.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ws);
        // The member list holds the workspace (its schema checks invites): re-read it.
        self.members_version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether this node is the workspace authority.
    pub fn is_authority(&self) -> bool {
        self.authority
    }

    /// This node's libp2p identity (the same ed25519 key that signs as authority).
    pub fn keypair(&self) -> libp2p_identity::Keypair {
        libp2p_identity::Keypair::from(self.key.clone())
    }

    /// (commits, flushes) of the store since open.
    pub fn commit_stats(&self) -> (u64, u64) {
        self.store.commit_stats()
    }

    pub(crate) fn writer(&self, now_ms: i64) -> Writer<'_> {
        // A delegate confirms with its own key and carries its delegation. A member list
        // that cannot be read leaves it proposing, like any member.
        let delegation = if self.authority {
            None
        } else {
            self.member_list().ok().and_then(|l| l.delegation.clone())
        };
        Writer {
            peer: self.peer,
            user: &self.name,
            now_ms,
            authority_key: (self.authority || delegation.is_some()).then_some(&self.key),
            delegation,
        }
    }

    /// Milliseconds since the Unix epoch by this replica's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub(crate) fn new_id(&self) -> uuid::Uuid {
        self.clock.new_id()
    }

    fn stripe(id: EntityId) -> usize {
        id.as_bytes()[15] as usize % LOCK_STRIPES
    }

    pub(crate) fn lock(&self, id: EntityId) -> MutexGuard<'_, ()> {
        self.locks[Self::stripe(id)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Locks several entities until the guards drop (stripes in ascending order, so two
    /// callers cannot deadlock).
    pub(crate) fn lock_many(
        &self,
        ids: impl IntoIterator<Item = EntityId>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let stripes: std::collections::BTreeSet<usize> =
            ids.into_iter().map(Self::stripe).collect();
        stripes
            .into_iter()
            .map(|s| self.locks[s].lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Loads an entity's document, if stored: from the cache, else from the store. The
    /// caller holds the entity's lock and hands the entity back with [`Self::cache`].
    pub(crate) fn load(&self, id: EntityId) -> Result<Option<Entity>, Error> {
        if let Some(e) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop(&id)
        {
            return Ok(Some(e));
        }
        self.load_committed(id)
    }

    /// The entity as last committed, without taking the lock or touching the cache.
    pub(crate) fn load_committed(&self, id: EntityId) -> Result<Option<Entity>, Error> {
        match self.store.load_doc(id.as_bytes())? {
            Some(doc) => Ok(Some(Entity::load_stored(id, &doc.snapshot, &doc.chunks)?)),
            None => Ok(None),
        }
    }

    fn load_in(&self, collection: &str, id: EntityId) -> Result<Entity, Error> {
        let entity = self.load(id)?.ok_or_else(|| Error::EntityNotFound {
            collection: collection.to_owned(),
            id,
        })?;
        match entity.collection() {
            Some(c) if c == collection => Ok(entity),
            Some(actual) => Err(Error::WrongCollection {
                id,
                actual,
                asked: collection.to_owned(),
            }),
            None => Err(Error::EntityNotFound {
                collection: collection.to_owned(),
                id,
            }),
        }
    }

    /// Forgets a cached entity (it is being purged).
    pub(crate) fn uncache(&self, id: EntityId) {
        let gone = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop(&id);
        drop(gone);
    }

    /// Keeps a fully persisted entity in memory for its next use.
    pub(crate) fn cache(&self, entity: Entity) {
        let evicted = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(entity.id(), entity);
        drop(evicted);
    }

    /// The store write for an entity's new state: its new changes (or a fresh snapshot
    /// when new or due for compaction), view and derived index entries.
    pub(crate) fn entity_write(&self, entity: &mut Entity) -> Result<EntityWrite, Error> {
        self.entity_write_from(entity, None)
    }

    /// Like [`Self::entity_write`]; `snapshot`, when given, is a compact save of exactly this
    /// document (as received) and is stored as it is instead of saving again.
    pub(crate) fn entity_write_from(
        &self,
        entity: &mut Entity,
        snapshot: Option<Vec<u8>>,
    ) -> Result<EntityWrite, Error> {
        let id = entity.id();
        // Whichever node writes an entity first applies the schema's pending migrations
        // (deterministic changes: every node makes the same ones). A given snapshot no
        // longer matches the document then.
        let snapshot = if entity.migrate(&self.ws())? > 0 {
            None
        } else {
            snapshot
        };
        // A new entity (created, or received whole) is rarely written again soon: keeping
        // its derivation would only cost a copy.
        let derived = if entity.is_new() {
            entity.derive(&self.ws())?
        } else {
            entity.derive_for_write(&self.ws())?
        };
        let collection = entity.collection().unwrap_or_default();
        // A given snapshot is stored as it is: no need to look up the stored record.
        let compact = snapshot.is_none()
            && (entity.is_new()
                || match self.store.record(id.as_bytes())? {
                    Some(r) => {
                        r.chunks >= COMPACT_AFTER_CHUNKS
                            || r.chunk_bytes > r.snapshot_bytes * COMPACT_RATIO
                    }
                    None => true,
                });
        let doc = match snapshot {
            Some(bytes) => DocWrite::Snapshot(bytes),
            None if compact => DocWrite::Snapshot(entity.save()),
            None => DocWrite::Append(entity.save_incremental()),
        };
        let heads = entity.heads().into_iter().map(|h| h.0).collect();
        let mut index = Vec::new();
        for c in &derived.conflicts {
            index.push((
                INDEX_CONFLICT.to_owned(),
                c.id.as_str().as_bytes().to_vec(),
                to_json_bytes(c),
            ));
        }
        for c in &derived.resolved {
            index.push((
                INDEX_CONFLICT.to_owned(),
                c.id.as_str().as_bytes().to_vec(),
                to_json_bytes(c),
            ));
        }
        for p in &derived.proposals {
            index.push((
                INDEX_PROPOSAL.to_owned(),
                p.id.as_bytes().to_vec(),
                to_json_bytes(p),
            ));
        }
        if let Some(coll) = self.ws().schema.collections.get(&collection) {
            for key in crate::attachments::blob_index_keys(coll, id, &derived.view) {
                index.push((INDEX_BLOB.to_owned(), key, collection.as_bytes().to_vec()));
            }
        }
        Ok(EntityWrite {
            id: *id.as_bytes(),
            collection,
            doc,
            view: to_json_bytes(&derived.view),
            heads,
            index,
        })
    }

    /// Commits entity writes and waits until they are durable.
    pub(crate) fn commit_durable(
        &self,
        writes: Vec<EntityWrite>,
        meta: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<(), Error> {
        let touched: Vec<String> = writes
            .iter()
            .filter(|w| w.collection.starts_with('_'))
            .map(|w| w.collection.clone())
            .collect();
        let ticket: Ticket = self.store.commit(writes, meta)?;
        self.store.wait_durable(ticket)?;
        self.note_written(touched);
        Ok(())
    }

    pub(crate) fn new_proposal_id(&self) -> ProposalId {
        ProposalId(self.new_id())
    }

    /// Creates (no `id`, or an id not stored yet) or updates an entity with a JSON patch.
    pub fn put(
        &self,
        collection: &str,
        id: Option<EntityId>,
        patch_json: &str,
    ) -> Result<EntityId, Error> {
        self.put_op(collection, id, patch_json, None)
            .map(|(id, _)| id)
    }

    /// [`Replica::put`] once per operation id: the same `op` applied again — a retry, here
    /// or on another node — has exactly one effect and returns the same entity id, with
    /// [`Applied::Already`]. Without `id`, the op id names the entity it creates.
    pub fn put_op(
        &self,
        collection: &str,
        id: Option<EntityId>,
        patch_json: &str,
        op: Option<&OpId>,
    ) -> Result<(EntityId, Applied), Error> {
        if collection.starts_with('_') {
            return Err(Error::Refused(format!(
                "{collection} is built in: members change with `fieldsync invite` and `fieldsync revoke`, schema versions with `fieldsync schema push`"
            )));
        }
        let ws = self.ws();
        let coll = ws.schema.collection(collection)?;
        let patch = Patch::parse(coll, patch_json)?;
        let id = id.or_else(|| op.map(|o| o.entity(self.ws().id)));
        self.put_patch_op(collection, id, &patch, op)
    }

    pub(crate) fn put_patch(
        &self,
        collection: &str,
        id: Option<EntityId>,
        patch: &Patch,
    ) -> Result<EntityId, Error> {
        self.put_patch_op(collection, id, patch, None)
            .map(|(id, _)| id)
    }

    fn put_patch_op(
        &self,
        collection: &str,
        id: Option<EntityId>,
        patch: &Patch,
        op: Option<&OpId>,
    ) -> Result<(EntityId, Applied), Error> {
        // Before the entity's lock: the check reads the entity's view.
        self.check_attachments(collection, id, patch)?;
        let id = id.unwrap_or_else(|| EntityId(self.new_id()));
        let _guard = self.lock(id);
        let w = self.writer(self.now_ms());
        let mut before = None;
        let (mut entity, applied) = match self.load(id)? {
            None if collection != fieldsync_core::purge::PURGES && self.is_purged(id)? => {
                return Err(Error::Refused(format!(
                    "entity {id} was purged; it cannot be written again"
                )))
            }
            None => (
                Entity::create_op(&self.ws(), id, collection, &w, patch, op, &mut || {
                    self.new_proposal_id()
                })?,
                Applied::Now,
            ),
            Some(mut e) => {
                let actual = e.collection().unwrap_or_default();
                if actual != collection {
                    return Err(Error::WrongCollection {
                        id,
                        actual,
                        asked: collection.to_owned(),
                    });
                }
                before = self.facts_before_own_write(&e)?;
                let applied =
                    e.update_op(&self.ws(), &w, patch, op, &mut || self.new_proposal_id())?;
                (e, applied)
            }
        };
        if applied == Applied::Already {
            self.cache(entity);
            return Ok((id, applied));
        }
        // Nothing changed (the values were there already): nothing to store or to sync. It
        // returns once what is stored is durable, like any write.
        if !entity.is_new() && !entity.has_unsaved_changes() {
            self.cache(entity);
            self.commit_durable(vec![], vec![])?;
            return Ok((id, applied));
        }
        // Refused here as every peer would; the changed document is dropped, unstored.
        self.check_own_write(before.as_ref(), &entity)?;
        let write = self.entity_write(&mut entity)?;
        self.commit_durable(vec![write], vec![])?;
        self.cache(entity);
        Ok((id, applied))
    }

    /// The view of an entity. Deleted entities are returned with `"_deleted": true`.
    pub fn get(&self, collection: &str, id: EntityId) -> Result<View, Error> {
        let bytes =
            self.store
                .view(collection, id.as_bytes())?
                .ok_or_else(|| Error::EntityNotFound {
                    collection: collection.to_owned(),
                    id,
                })?;
        if self.view_is_stale(collection, id.as_bytes()) {
            if let Some(view) = self.fresh_view(id)? {
                return Ok(view);
            }
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::CorruptMeta(format!("stored view of {id}: {e}")))
    }

    /// Views of a collection in id (= creation) order, filtered by `FIELD=VALUE` strings.
    /// Calls `each` per view; stops early if it returns false.
    pub fn list(
        &self,
        collection: &str,
        filters: &[String],
        include_deleted: bool,
        each: &mut dyn FnMut(View) -> bool,
    ) -> Result<(), Error> {
        self.list_after(
            collection,
            filters,
            include_deleted,
            None,
            &mut |_, view| each(view),
        )
    }

    /// Like [`Replica::list`], starting after entity `after` (a page cursor); `each` gets
    /// the id with the view.
    pub fn list_after(
        &self,
        collection: &str,
        filters: &[String],
        include_deleted: bool,
        after: Option<EntityId>,
        each: &mut dyn FnMut(EntityId, View) -> bool,
    ) -> Result<(), Error> {
        self.ws().schema.collection(collection)?;
        let filters = filters
            .iter()
            .map(|f| parse_filter(f))
            .collect::<Result<Vec<_>, _>>()?;
        let mut after: Option<[u8; 16]> = after.map(|id| *id.as_bytes());
        loop {
            let (last, views) = match self.read_view_page(collection, after.as_ref())? {
                Some(page) => page,
                None => return Ok(()),
            };
            after = Some(last);
            for (id, view) in views {
                if !include_deleted && view.contains_key("_deleted") {
                    continue;
                }
                if filters.iter().all(|(f, v)| matches_filter(&view, f, v))
                    && !each(EntityId::from_bytes(id), view)
                {
                    return Ok(());
                }
            }
        }
    }

    /// The next page of a collection's views after `after`, each under the schema in use
    /// (the last id of the page with them); `None` past the end. While a new schema
    /// version's views are recomputed, those not yet recomputed are derived now; a page read
    /// while the recompute's progress moved is read again, so an old view never passes for
    /// a new one (the progress can move between reading a view and asking whether it is
    /// stale).
    fn read_view_page(
        &self,
        collection: &str,
        after: Option<&[u8; 16]>,
    ) -> Result<Option<ViewPage>, Error> {
        use std::sync::atomic::Ordering;
        for attempt in 0.. {
            let gen = self.recompute_gen.load(Ordering::Acquire);
            // Asked before the page is read: a view the worker rewrites after the read is
            // read again below.
            let recomputing = self.recomputing();
            let page = self.store.views(collection, after, 1024)?;
            let Some((last, _)) = page.last() else {
                return Ok(None);
            };
            let last = *last;
            let mut views = Vec::with_capacity(page.len());
            for (id, mut bytes) in page {
                // While a new schema version's views are recomputed, the rest is derived now.
                let fresh = if self.view_is_stale(collection, &id) {
                    self.fresh_view(EntityId::from_bytes(id))?
                } else {
                    if recomputing {
                        match self.store.view(collection, &id)? {
                            Some(now) => bytes = now,
                            None => continue, // moved or purged meanwhile
                        }
                    }
                    None
                };
                let view: View = match fresh {
                    Some(v) => v,
                    None => serde_json::from_slice(&bytes).map_err(|e| {
                        Error::CorruptMeta(format!(
                            "stored view of {}: {e}",
                            EntityId::from_bytes(id)
                        ))
                    })?,
                };
                views.push((id, view));
            }
            // A few tries while the worker moves on; then every view is derived now, which
            // is right whatever the progress says.
            if self.recompute_gen.load(Ordering::Acquire) == gen {
                return Ok(Some((last, views)));
            }
            if attempt >= 3 {
                let mut derived = Vec::with_capacity(views.len());
                for (id, view) in views {
                    match self.fresh_view(EntityId::from_bytes(id))? {
                        Some(v) => derived.push((id, v)),
                        None => derived.push((id, view)),
                    }
                }
                return Ok(Some((last, derived)));
            }
        }
        unreachable!("the loop returns")
    }

    /// Deletes an entity (a tombstone that syncs).
    pub fn delete(&self, collection: &str, id: EntityId) -> Result<(), Error> {
        self.delete_op(collection, id, None).map(|_| ())
    }

    /// Deletes an entity once per operation id (a retried delete answers as the first did).
    pub fn delete_op(
        &self,
        collection: &str,
        id: EntityId,
        op: Option<&OpId>,
    ) -> Result<Applied, Error> {
        self.ws().schema.collection(collection)?;
        let _guard = self.lock(id);
        let mut entity = self.load_in(collection, id)?;
        let applied = entity.delete_op(&self.ws(), &self.writer(self.now_ms()), op)?;
        if applied == Applied::Now {
            let write = self.entity_write(&mut entity)?;
            self.commit_durable(vec![write], vec![])?;
        }
        self.cache(entity);
        Ok(applied)
    }

    /// Every change of an entity: device, user, time, kind, fields.
    pub fn history(&self, collection: &str, id: EntityId) -> Result<Vec<HistoryEntry>, Error> {
        self.ws().schema.collection(collection)?;
        let _guard = self.lock(id);
        let mut entity = self.load_in(collection, id)?;
        let mut history = entity.history(&self.ws());
        self.cache(entity);
        // The audit user is the one the authority signed into the device's member record,
        // not the name a device gave itself.
        let users: std::collections::HashMap<String, String> = self
            .members()?
            .into_iter()
            .map(|m| (m.peer.clone(), m.grant.user.clone()))
            .collect();
        for h in &mut history {
            if let Some(user) = users.get(&h.device) {
                h.user = user.clone();
            }
        }
        Ok(history)
    }

    /// Conflicts: open ones, or with `all` also those settled by a rule.
    pub fn conflicts(&self, all: bool) -> Result<Vec<Conflict>, Error> {
        let mut out = Vec::new();
        for (_, bytes) in self.store.index(INDEX_CONFLICT)? {
            let c: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| Error::CorruptMeta(e.to_string()))?;
            let c = conflict_from_json(&c)
                .ok_or_else(|| Error::CorruptMeta("conflict index entry".into()))?;
            if all || c.state == ConflictState::Open {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// One entity's conflicts (open, settled by a rule and resolved) and its view: what
    /// the daemon turns into conflict events.
    pub fn conflicts_of(&self, id: EntityId) -> Result<(Vec<Conflict>, View), Error> {
        let _guard = self.lock(id);
        let Some(entity) = self.load(id)? else {
            return Ok((vec![], View::new()));
        };
        let derived = entity.derive(&self.ws());
        self.cache(entity);
        let derived = derived?;
        Ok((
            derived
                .conflicts
                .into_iter()
                .chain(derived.resolved)
                .collect(),
            derived.view,
        ))
    }

    /// Settles a conflict by writing `value_json` to its field.
    pub fn resolve(&self, conflict: &ConflictId, value_json: &str) -> Result<EntityId, Error> {
        let value: Json = serde_json::from_str(value_json)
            .map_err(|e| fieldsync_core::Error::Patch(format!("malformed JSON value: {e}")))?;
        let entry = self
            .store
            .index_get(INDEX_CONFLICT, conflict.as_str().as_bytes())?
            .ok_or_else(|| {
                fieldsync_core::Error::NotFound(format!("conflict {conflict} (already resolved?)"))
            })?;
        let entry: Json =
            serde_json::from_slice(&entry).map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let id: EntityId = entry["entity"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| Error::CorruptMeta("conflict index entry".into()))?;
        let _guard = self.lock(id);
        let mut entity = self.load(id)?.ok_or_else(|| {
            Error::CorruptMeta(format!("conflict {conflict} names missing entity {id}"))
        })?;
        entity.resolve(&self.ws(), &self.writer(self.now_ms()), conflict, &value)?;
        let write = self.entity_write(&mut entity)?;
        self.commit_durable(vec![write], vec![])?;
        self.cache(entity);
        Ok(id)
    }

    /// Pending proposals (authority only).
    pub fn proposals(&self) -> Result<Vec<Proposal>, Error> {
        if !self.confirms()? {
            return Err(fieldsync_core::Error::NotAuthority.into());
        }
        self.all_proposals()
    }

    /// This node's own proposals still waiting for the authority (any node).
    pub fn my_proposals(&self) -> Result<Vec<Proposal>, Error> {
        let me = self.peer.to_string();
        Ok(self
            .all_proposals()?
            .into_iter()
            .filter(|p| p.record.peer == me)
            .collect())
    }

    /// Every pending proposal this node knows of (on any node, e.g. for a mirror; only
    /// the authority can settle them).
    pub fn pending_proposals(&self) -> Result<Vec<Proposal>, Error> {
        self.all_proposals()
    }

    fn all_proposals(&self) -> Result<Vec<Proposal>, Error> {
        self.store
            .index(INDEX_PROPOSAL)?
            .into_iter()
            .map(|(_, bytes)| proposal_from_json(&bytes))
            .collect()
    }

    fn settle(&self, id: ProposalId, accept: bool) -> Result<EntityId, Error> {
        if !self.confirms()? {
            return Err(fieldsync_core::Error::NotAuthority.into());
        }
        let entry = self
            .store
            .index_get(INDEX_PROPOSAL, id.as_bytes())?
            .ok_or_else(|| {
                fieldsync_core::Error::NotFound(format!("proposal {id} (already settled?)"))
            })?;
        let entity_id = proposal_from_json(&entry)?.entity;
        let _guard = self.lock(entity_id);
        let mut entity = self
            .load(entity_id)?
            .ok_or_else(|| Error::CorruptMeta(format!("proposal {id} names missing entity")))?;
        let w = self.writer(self.now_ms());
        if accept {
            entity.accept(&self.ws(), &w, id, "accept")?;
        } else {
            entity.reject(&w, id)?;
        }
        let write = self.entity_write(&mut entity)?;
        self.commit_durable(vec![write], vec![])?;
        self.cache(entity);
        Ok(entity_id)
    }

    /// Confirms a proposal (authority only).
    pub fn accept(&self, id: ProposalId) -> Result<EntityId, Error> {
        self.settle(id, true)
    }

    /// Drops a proposal (authority only).
    pub fn reject(&self, id: ProposalId) -> Result<EntityId, Error> {
        self.settle(id, false)
    }

    /// Entities changed after feed position `after` (at most `limit`), oldest change first:
    /// (seq, collection, id).
    pub fn changes_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String, EntityId)>, Error> {
        let mut out = Vec::new();
        for (seq, key) in self.store.feed_since(after, limit)? {
            let collection = self
                .store
                .record(&key)?
                .map(|r| r.collection)
                .unwrap_or_default();
            out.push((seq, collection, EntityId::from_bytes(key)));
        }
        Ok(out)
    }

    /// What changed after feed position `since`, oldest first, at most `limit` entries:
    /// each entity once, with its current view, or as a tombstone if it is deleted. An app
    /// mirrors the store by asking again from the last `seq` it saw.
    pub fn changes(&self, since: u64, limit: usize) -> Result<Vec<FeedChange>, Error> {
        let mut out = Vec::new();
        for (seq, key) in self.store.feed_since(since, limit)? {
            let id = EntityId::from_bytes(key);
            let record = self.store.record(&key)?.ok_or_else(|| {
                Error::CorruptMeta(format!(
                    "feed entry {seq} names entity {id}, which has no record"
                ))
            })?;
            let view = self.get(&record.collection, id)?;
            let deleted = view.get("_deleted").is_some_and(|d| d == true);
            let mut heads: Vec<String> = record.heads.iter().map(hex::encode).collect();
            heads.sort();
            out.push(FeedChange {
                seq,
                collection: record.collection,
                id,
                view,
                deleted,
                heads,
            });
        }
        Ok(out)
    }

    /// How far sync with `peer` got, as kept here (read-only; for the console's devices):
    /// `(acked, received)` — the position of this node's feed that `peer` last
    /// acknowledged, and the position of `peer`'s feed that this node has applied up to.
    /// Both 0 for a peer this node never synced with.
    pub fn sync_checkpoints(&self, peer: &str) -> Result<(u64, u64), Error> {
        let seq = |key: String| -> Result<u64, Error> {
            Ok(self
                .store
                .meta(&key)?
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0))
        };
        Ok((
            seq(format!("{META_CHECKPOINT_OUT}{peer}"))?,
            seq(format!("{META_CHECKPOINT_IN}{peer}"))?,
        ))
    }

    /// The head of the local changes feed.
    pub fn feed_seq(&self) -> u64 {
        self.store.last_seq()
    }

    /// A summary of the node.
    pub fn status(&self) -> Result<Status, Error> {
        let entities = self
            .store
            .counts()?
            .into_iter()
            .map(|(c, n)| (c, Json::from(n)))
            .collect();
        let (open_conflicts, pending_proposals) = self.status_counts()?;
        Ok(Status {
            peer_id: self.peer.to_string(),
            name: self.name.clone(),
            workspace: self.ws().id,
            authority: self.authority,
            entities,
            open_conflicts,
            pending_proposals,
            feed_seq: self.store.last_seq(),
            data_dir: self.dir.clone(),
            membership: self.membership()?,
            schema_version: self.schema_version(),
            views_schema_version: self.views_schema_version()?,
            schema_recompute: self.recompute_progress(),
            encrypted: self.store.encrypted(),
            blobs: self.blob_status(),
        })
    }
}

impl Replica {
    /// The furthest feed position any peer acknowledged having applied (0 if none): with
    /// one relay, what [`Self::pending_after`] counts from.
    pub fn acknowledged(&self) -> Result<u64, Error> {
        Ok(self
            .store
            .meta_prefix(META_CHECKPOINT_OUT)?
            .into_iter()
            .filter_map(|(_, v)| Some(u64::from_be_bytes(v.as_slice().try_into().ok()?)))
            .max()
            .unwrap_or(0))
    }

    /// Entities changed after feed position `acked` (what a peer that acknowledged up to
    /// there has yet to take), counted again only when `acked` or the feed moved.
    pub fn pending_after(&self, acked: u64) -> Result<usize, Error> {
        let seq = self.store.last_seq();
        if let Some((a, at, n)) = *self.pending_count.lock().unwrap_or_else(|p| p.into_inner()) {
            if a == acked && at == seq {
                return Ok(n);
            }
        }
        let n = self.store.feed_since(acked, usize::MAX)?.len();
        *self.pending_count.lock().unwrap_or_else(|p| p.into_inner()) = Some((acked, seq, n));
        Ok(n)
    }

    /// Open conflicts and pending proposals, counted again only when the feed moved.
    fn status_counts(&self) -> Result<(usize, usize), Error> {
        let seq = self.store.last_seq();
        if let Some((at, conflicts, proposals)) =
            *self.status_counts.lock().unwrap_or_else(|p| p.into_inner())
        {
            if at == seq {
                return Ok((conflicts, proposals));
            }
        }
        let counts = (
            self.conflicts(false)?.len(),
            self.store.index(INDEX_PROPOSAL)?.len(),
        );
        // Counted after reading `seq`: a write in between is seen now and counted again next time.
        *self.status_counts.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((seq, counts.0, counts.1));
        Ok(counts)
    }
}

pub(crate) fn to_json_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn proposal_from_json(bytes: &[u8]) -> Result<Proposal, Error> {
    let v: Json = serde_json::from_slice(bytes).map_err(|e| Error::CorruptMeta(e.to_string()))?;
    let bad = || Error::CorruptMeta("proposal index entry".into());
    Ok(Proposal {
        id: v["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?,
        entity: v["entity"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?,
        collection: v["collection"].as_str().unwrap_or_default().to_owned(),
        record: serde_json::from_value(v).map_err(|_| bad())?,
    })
}

fn conflict_from_json(v: &Json) -> Option<Conflict> {
    Some(Conflict {
        id: v["id"].as_str()?.parse().ok()?,
        collection: v["collection"].as_str()?.to_owned(),
        entity: v["entity"].as_str()?.parse().ok()?,
        field: v["field"].as_str()?.to_owned(),
        values: v["values"].as_array()?.clone(),
        rule: fieldsync_core::Rule::name_of(v["rule"].as_str()?),
        state: match v["state"].as_str()? {
            "open" => ConflictState::Open,
            "resolved" => ConflictState::Resolved,
            _ => ConflictState::Auto,
        },
        resolution: serde_json::from_value(v["resolution"].clone()).ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys each flush wrote, for a journaled memory store.
    fn flushed_keys(store: &fieldsync_store::MemoryStore) -> Vec<Vec<u8>> {
        store.take_flushed().into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn updates_write_only_what_they_change() {
        let store = Arc::new(fieldsync_store::MemoryStore::journaled([]).unwrap());
        let replica = Replica::init_authority_on(
            store.clone(),
            Path::new("mem"),
            "[collections.tasks.fields]\nprogress = { rule = \"max\" }\n",
            "test",
            ed25519::Keypair::generate(),
        )
        .unwrap();
        let id = replica
            .put("tasks", None, r#"{"title":"a","progress":50}"#)
            .unwrap();
        // What the last flushes wrote of this entity, by key kind (b'e' record, b'v' view).
        let written = || {
            let keys = flushed_keys(&store);
            move |k: u8| {
                keys.iter()
                    .any(|key| key.first() == Some(&k) && key.ends_with(id.as_bytes()))
            }
        };
        let first = written();
        assert!(first(b'v') && first(b'e'));
        // The values already there: the document does not change, nothing is written.
        replica
            .put("tasks", Some(id), r#"{"progress":50}"#)
            .unwrap();
        let same = written();
        assert!(
            !same(b'e') && !same(b'v'),
            "a write that changed nothing was stored"
        );
        // The same value under an operation id: the document records the op, the view is
        // as it was and is not written again.
        let op: fieldsync_core::OpId = "op-1".parse().unwrap();
        replica
            .put_op("tasks", Some(id), r#"{"progress":50}"#, Some(&op))
            .unwrap();
        let recorded = written();
        assert!(recorded(b'e'), "the op's change was not stored");
        assert!(!recorded(b'v'), "the unchanged view was written again");
        replica
            .put("tasks", Some(id), r#"{"progress":70}"#)
            .unwrap();
        assert!(written()(b'v'));
        assert_eq!(replica.get("tasks", id).unwrap()["progress"], 70);
    }

    #[test]
    fn a_bulk_import_over_many_chunks_creates_and_updates_every_line_once() {
        let store = Arc::new(fieldsync_store::MemoryStore::new());
        let replica = Replica::init_authority_on(
            store,
            Path::new("mem"),
            "[collections.tasks.fields]\nprogress = { rule = \"max\" }\n",
            "test",
            ed25519::Keypair::generate(),
        )
        .unwrap();
        let stored: Vec<EntityId> = (0..3)
            .map(|i| {
                replica
                    .put(
                        "tasks",
                        None,
                        &format!(r#"{{"title":"old {i}","progress":1}}"#),
                    )
                    .unwrap()
            })
            .collect();
        // 1,300 new lines (three chunks), with the stored entities named in the first,
        // second and last chunk.
        let mut lines: Vec<String> = (0..1300)
            .map(|i| format!(r#"{{"title":"new {i}","progress":{i}}}"#))
            .collect();
        for (at, id) in [10, 700, 1290].into_iter().zip(&stored) {
            lines[at] = format!(r#"{{"_id":"{id}","title":"updated","progress":5}}"#);
        }
        let mut seen = vec![];
        let n = replica
            .bulk_import("tasks", &lines.join("\n"), &mut |done, total| {
                seen.push((done, total))
            })
            .unwrap();
        assert_eq!(n, 1300);
        assert!(
            seen.windows(2).all(|w| w[0].0 < w[1].0),
            "progress goes forward"
        );
        assert_eq!(seen.last(), Some(&(1300, 1300)));
        let mut titles = std::collections::BTreeMap::new();
        replica
            .list("tasks", &[], false, &mut |v| {
                *titles
                    .entry(v["title"].as_str().unwrap_or_default().to_owned())
                    .or_insert(0) += 1;
                true
            })
            .unwrap();
        assert_eq!(titles.values().sum::<usize>(), 1300 - 3 + 3);
        assert_eq!(titles.get("updated"), Some(&3));
        assert!(titles.keys().all(|t| !t.starts_with("old")));
        assert_eq!(titles.get("new 0"), Some(&1));
        assert_eq!(titles.get("new 1299"), Some(&1));
    }
}
