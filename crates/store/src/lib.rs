//! fieldsync-store: durable storage of entity documents, the local changes feed, derived
//! indexes and node metadata, behind the narrow [`Store`] trait, with a sled engine.
//!
//! # Layout (one sled tree, keys by prefix)
//! | prefix | key | value |
//! |---|---|---|
//! | `d` | entity id | compact document snapshot |
//! | `c` | entity id, u32 chunk no | a change chunk appended since the snapshot |
//! | `e` | entity id | [`EntityRecord`] (collection, feed seq, chunk count, index keys) |
//! | `v` | collection, `0`, entity id | the entity's view (JSON), for list and filter |
//! | `f` | u64 seq | entity id: the changes feed, one live entry per entity |
//! | `x` | index name, `0`, key | derived index entry (conflicts, proposals) |
//! | `m` | name | metadata (identity, workspace, checkpoints) |
//!
//! Every [`Store::commit`] is one atomic batch. It is durable once [`Store::wait_durable`]
//! returns: concurrent writers share one flush (group commit).
//!
//! The layout is written once, on an ordered key-value map ([`Kv`]): sled's tree for
//! [`SledStore`], or memory for [`MemoryStore`] — the simulator's, which can crash (lose
//! what was not flushed) and pause its flushes.

mod crypt;
mod memory;
pub use crypt::{
    generate_key_file, open_sealed_file, seal_file, EncryptedKv, Header as KeyHeader, KeyKind,
    KeyProvider, Secret, MAX_KEY_FILE_BYTES, MAX_SEALED_BYTES, MIN_KEY_FILE_BYTES,
};
pub use memory::{MemKv, MemoryStore};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// An entity id as stored: 16 bytes (a UUID).
pub type EntityKey = [u8; 16];

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage engine failed (disk full, permissions, corruption).
    #[error(
        "storage failed: {0}. Check the disk and permissions of the data directory, then retry"
    )]
    Engine(#[from] sled::Error),
    /// Stored bytes could not be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// Another process holds the store.
    #[error("the data directory is in use by another fieldsync process (a running daemon?); stop it or use its API")]
    Locked,
    /// A failure the memory store was told to simulate.
    #[error("simulated storage failure: {0}")]
    Simulated(String),
    /// The store is encrypted and no key was given; says what to give.
    #[error("this data directory is encrypted: {0}")]
    KeyNeeded(String),
    /// The key given does not open the store (or is not usable).
    #[error("cannot open the encrypted store: {0}")]
    WrongKey(String),
    /// An earlier flush failed, so durability is unknown.
    #[error("a previous flush failed ({0}); close and reopen the store")]
    FlushFailed(String),
}

/// How an entity's document changes in a commit.
#[derive(Debug, Clone)]
pub enum DocWrite {
    /// Replace snapshot and all chunks with this compact document.
    Snapshot(Vec<u8>),
    /// Append one change chunk.
    Append(Vec<u8>),
}

/// One entity's part of a commit.
#[derive(Debug, Clone)]
pub struct EntityWrite {
    pub id: EntityKey,
    pub collection: String,
    pub doc: DocWrite,
    /// The view (JSON) for list and filter.
    pub view: Vec<u8>,
    /// The document's heads (change hashes), so sync can offer it without loading it.
    pub heads: Vec<[u8; 32]>,
    /// The entity's derived index entries, replacing its previous ones:
    /// (index name, key, value).
    pub index: Vec<(String, Vec<u8>, Vec<u8>)>,
}

/// What the store keeps per entity besides its document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRecord {
    pub collection: String,
    /// Position of the entity's live entry in the changes feed.
    pub seq: u64,
    /// Change chunks appended since the snapshot.
    pub chunks: u32,
    /// Bytes in those chunks.
    pub chunk_bytes: u64,
    /// Snapshot size.
    pub snapshot_bytes: u64,
    /// The document's heads.
    pub heads: Vec<[u8; 32]>,
    index_keys: Vec<Vec<u8>>,
    /// A hash of the view and index entries last written ([`derived_fingerprint`]; zero:
    /// unknown, as in records from before it). An update that derives the same skips
    /// writing them again.
    derived: [u8; 16],
}

/// What identifies a write's view and index entries: BLAKE2b over their length-prefixed
/// bytes, 128 bits, so two different derivations never pass for the same.
fn derived_fingerprint(view: &[u8], index: &[(String, Vec<u8>, Vec<u8>)]) -> [u8; 16] {
    use blake2::digest::consts::U16;
    use blake2::{Blake2b, Digest};
    let mut h = Blake2b::<U16>::new();
    let mut part = |b: &[u8]| {
        h.update((b.len() as u64).to_be_bytes());
        h.update(b);
    };
    part(view);
    for (name, k, v) in index {
        part(name.as_bytes());
        part(k);
        part(v);
    }
    h.finalize().into()
}

/// Writes gathered for one [`Kv::apply`].
#[derive(Default)]
struct Batch(Vec<KvWrite>);

impl Batch {
    fn insert(&mut self, k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) {
        self.0.push((k.into(), Some(v.into())));
    }

    fn remove(&mut self, k: impl Into<Vec<u8>>) {
        self.0.push((k.into(), None));
    }
}

/// A derived index entry: (key, value).
pub type IndexEntry = (Vec<u8>, Vec<u8>);

/// A document as stored: snapshot and the chunks appended since.
#[derive(Debug, Clone)]
pub struct StoredDoc {
    pub snapshot: Vec<u8>,
    pub chunks: Vec<Vec<u8>>,
}

/// A commit's durability ticket, for [`Store::wait_durable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// A key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);
/// A write: a key and its new value (`None` removes it).
pub type KvWrite = (Vec<u8>, Option<Vec<u8>>);

/// The ordered key-value map a [`KvStore`] keeps its layout in.
pub trait Kv: Send + Sync + std::fmt::Debug {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;
    /// Entries from `start` on, ascending, while `keep` accepts their key; at most `limit`.
    fn scan(
        &self,
        start: &[u8],
        limit: usize,
        keep: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<KvPair>, Error>;
    /// The greatest key starting with `prefix`.
    fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, Error>;
    /// Applies the writes atomically (`None` removes the key).
    fn apply(&self, batch: Vec<KvWrite>) -> Result<(), Error>;
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), Error>;
    /// Whether values are encrypted ([`EncryptedKv`]).
    fn encrypted(&self) -> bool {
        false
    }
    /// Removes `drop_key`, and makes removed values unreadable from the files (they may
    /// linger in a log until then); a map with no log only removes the key.
    fn rewrite(&self, drop_key: &[u8]) -> Result<(), Error> {
        self.apply(vec![(drop_key.to_vec(), None)])
    }
}

/// sled's tree as a [`Kv`]. The handles sit behind a lock only so [`Kv::rewrite`] can
/// swap in a fresh copy of the data.
#[derive(Debug)]
pub struct SledKv {
    dir: std::path::PathBuf,
    cache_bytes: u64,
    handles: std::sync::RwLock<Option<(sled::Db, sled::Tree)>>,
}

/// How long opening waits for a lock that a handle closing in this process still holds
/// (sled's last background writes hold it briefly after the store is dropped); another
/// process holding it (a daemon) keeps it, and opening then fails with [`Error::Locked`].
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_sled(dir: &std::path::Path, cache_bytes: u64) -> Result<(sled::Db, sled::Tree), Error> {
    remove_unfinished_snapshots(dir)?;
    let started = std::time::Instant::now();
    let db = loop {
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
        {
            Ok(db) => break db,
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock") =>
            {
                if started.elapsed() > LOCK_WAIT {
                    return Err(Error::Locked);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let tree = db.open_tree("fieldsync")?;
    Ok((db, tree))
}

fn io_error(e: std::io::Error) -> Error {
    Error::Engine(sled::Error::Io(e))
}

/// Where [`Kv::rewrite`] builds the copy, and where the old files wait to be removed.
fn rewrite_dirs(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (dir.with_extension("rewrite"), dir.with_extension("old"))
}

/// Finishes or drops a rewrite a crash interrupted: a complete copy is renamed into place
/// only after it was flushed, so a copy beside a missing store is complete.
fn recover_rewrite(dir: &std::path::Path) -> Result<(), Error> {
    let (fresh, old) = rewrite_dirs(dir);
    if !dir.exists() && fresh.exists() {
        std::fs::rename(&fresh, dir).map_err(io_error)?;
    }
    for leftover in [fresh, old] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover).map_err(io_error)?;
        }
    }
    Ok(())
}

impl SledKv {
    fn open(dir: &std::path::Path, cache_bytes: u64) -> Result<Self, Error> {
        recover_rewrite(dir)?;
        let handles = open_sled(dir, cache_bytes)?;
        Ok(SledKv {
            dir: dir.to_owned(),
            cache_bytes,
            handles: std::sync::RwLock::new(Some(handles)),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&sled::Db, &sled::Tree) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Some((db, tree)) => f(db, tree),
            None => Err(Error::FlushFailed(
                "a rewrite of the store failed and it could not be reopened".into(),
            )),
        }
    }
}

impl Kv for SledKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.with(|_, tree| Ok(tree.get(key)?.map(|v| v.to_vec())))
    }

    fn scan(
        &self,
        start: &[u8],
        limit: usize,
        keep: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<KvPair>, Error> {
        self.with(|_, tree| {
            let mut out = Vec::new();
            for kv in tree.range(start..) {
                let (k, v) = kv?;
                if out.len() >= limit || !keep(&k) {
                    break;
                }
                out.push((k.to_vec(), v.to_vec()));
            }
            Ok(out)
        })
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.with(|_, tree| {
            Ok(tree
                .scan_prefix(prefix)
                .next_back()
                .transpose()?
                .map(|(k, _)| k.to_vec()))
        })
    }

    fn apply(&self, batch: Vec<KvWrite>) -> Result<(), Error> {
        let mut b = sled::Batch::default();
        for (k, v) in batch {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.with(|_, tree| Ok(tree.apply_batch(b)?))
    }

    fn flush(&self) -> Result<(), Error> {
        self.with(|db, _| {
            db.flush()?;
            Ok(())
        })
    }

    /// sled keeps overwritten and removed values in its log until it happens to rewrite
    /// their segments. To make a removal final, the live entries are copied into a new
    /// store beside this one, which then replaces it; the old files are deleted. Reads and
    /// writes wait meanwhile.
    fn rewrite(&self, drop_key: &[u8]) -> Result<(), Error> {
        let mut guard = self.handles.write().unwrap_or_else(|p| p.into_inner());
        let (fresh, old) = rewrite_dirs(&self.dir);
        if fresh.exists() {
            std::fs::remove_dir_all(&fresh).map_err(io_error)?;
        }
        let copied = (|| {
            let Some((_, tree)) = &*guard else {
                return Err(Error::FlushFailed("the store is closed".into()));
            };
            let (db2, tree2) = open_sled(&fresh, self.cache_bytes)?;
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for kv in tree.iter() {
                let (k, v) = kv?;
                if &*k == drop_key {
                    continue;
                }
                batch.insert(k, v);
                n += 1;
                if n % 1024 == 0 {
                    tree2.apply_batch(std::mem::take(&mut batch))?;
                }
            }
            tree2.apply_batch(batch)?;
            db2.flush()?;
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = std::fs::remove_dir_all(&fresh);
            return Err(e);
        }
        // Close the old store (every handle: sled's flusher stops with the last one).
        if let Some((db, tree)) = guard.take() {
            let flushed = db.flush();
            drop(tree);
            drop(db);
            flushed?;
        }
        let swapped = std::fs::rename(&self.dir, &old)
            .and_then(|_| std::fs::rename(&fresh, &self.dir))
            .map_err(io_error);
        let reopened =
            recover_rewrite(&self.dir).and_then(|_| open_sled(&self.dir, self.cache_bytes));
        match (swapped, reopened) {
            (Ok(()), Ok(handles)) => {
                *guard = Some(handles);
                Ok(())
            }
            (Err(e), Ok(handles)) => {
                *guard = Some(handles);
                Err(e)
            }
            (_, Err(e)) => Err(e),
        }
    }
}

/// The storage a replica needs. Narrow on purpose, so another engine can replace sled.
pub trait Store: Send + Sync {
    /// Applies entity writes and metadata changes atomically; every written entity moves
    /// to the head of the changes feed. Returns a ticket to wait on for durability.
    fn commit(
        &self,
        entities: Vec<EntityWrite>,
        meta: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<Ticket, Error>;
    /// Blocks until the commit behind `ticket` is on disk.
    fn wait_durable(&self, ticket: Ticket) -> Result<(), Error>;
    /// An entity's stored document.
    fn load_doc(&self, id: &EntityKey) -> Result<Option<StoredDoc>, Error>;
    /// An entity's record.
    fn record(&self, id: &EntityKey) -> Result<Option<EntityRecord>, Error>;
    /// An entity's stored view.
    fn view(&self, collection: &str, id: &EntityKey) -> Result<Option<Vec<u8>>, Error>;
    /// Views of a collection in id order, starting after `after`, at most `limit`.
    fn views(
        &self,
        collection: &str,
        after: Option<&EntityKey>,
        limit: usize,
    ) -> Result<Vec<(EntityKey, Vec<u8>)>, Error>;
    /// Feed entries with seq greater than `after`, at most `limit`, ascending.
    fn feed_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, EntityKey)>, Error>;
    /// The highest feed seq assigned (0 when empty).
    fn last_seq(&self) -> u64;
    /// All entries of a derived index.
    fn index(&self, name: &str) -> Result<Vec<IndexEntry>, Error>;
    /// One derived index entry.
    fn index_get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, Error>;
    /// The entries of one derived index whose keys start with `prefix`, in key order.
    fn index_prefix(&self, name: &str, prefix: &[u8]) -> Result<Vec<IndexEntry>, Error>;
    /// A metadata value.
    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, Error>;
    /// Metadata values whose names start with `prefix`.
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, Error>;
    /// Number of entities per collection.
    fn counts(&self) -> Result<Vec<(String, u64)>, Error>;
    /// (commits, flushes) since open: their ratio is how many commits share a flush.
    fn commit_stats(&self) -> (u64, u64);
    /// Whether values are encrypted at rest.
    fn encrypted(&self) -> bool;
    /// Removes entities whole — document, chunks, record, view, feed entry, index entries —
    /// in one atomic batch, and returns once no byte of them is readable in the store's
    /// files (see [`Kv::rewrite`]). Ids not stored are skipped.
    fn purge(&self, ids: &[EntityKey]) -> Result<(), Error>;
}

/// Set while a purge's rewrite is unfinished: the next open finishes it.
const META_REWRITE: &[u8] = b"~rewrite";

fn key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn view_key(collection: &str, id: &EntityKey) -> Vec<u8> {
    key(b'v', &[collection.as_bytes(), &[0], id])
}

fn index_key(name: &str, k: &[u8]) -> Vec<u8> {
    key(b'x', &[name.as_bytes(), &[0], k])
}

fn chunk_key(id: &EntityKey, n: u32) -> Vec<u8> {
    key(b'c', &[id, &n.to_be_bytes()])
}

impl EntityRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![1u8];
        let put = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_be_bytes());
            out.extend_from_slice(b);
        };
        put(&mut out, self.collection.as_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.chunks.to_be_bytes());
        out.extend_from_slice(&self.chunk_bytes.to_be_bytes());
        out.extend_from_slice(&self.snapshot_bytes.to_be_bytes());
        out.extend_from_slice(&(self.index_keys.len() as u32).to_be_bytes());
        for k in &self.index_keys {
            put(&mut out, k);
        }
        out.extend_from_slice(&(self.heads.len() as u32).to_be_bytes());
        for h in &self.heads {
            out.extend_from_slice(h);
        }
        // Last, so records from before it decode (as unknown) and older code ignores it.
        out.extend_from_slice(&self.derived);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, Error> {
        let corrupt = || Error::Corrupt("entity record".into());
        let mut r = bytes.strip_prefix(&[1u8]).ok_or_else(corrupt)?;
        let mut take = |n: usize| -> Result<&[u8], Error> {
            if r.len() < n {
                return Err(corrupt());
            }
            let (a, b) = r.split_at(n);
            r = b;
            Ok(a)
        };
        let u32_of = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let u64_of =
            |b: &[u8]| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let clen = u32_of(take(4)?) as usize;
        let collection = String::from_utf8(take(clen)?.to_vec()).map_err(|_| corrupt())?;
        let seq = u64_of(take(8)?);
        let chunks = u32_of(take(4)?);
        let chunk_bytes = u64_of(take(8)?);
        let snapshot_bytes = u64_of(take(8)?);
        let n = u32_of(take(4)?) as usize;
        let mut index_keys = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let len = u32_of(take(4)?) as usize;
            index_keys.push(take(len)?.to_vec());
        }
        let n = u32_of(take(4)?) as usize;
        let mut heads = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            heads.push(take(32)?.try_into().map_err(|_| corrupt())?);
        }
        let derived = match take(16) {
            Ok(b) => b.try_into().map_err(|_| corrupt())?,
            Err(_) => [0; 16],
        };
        Ok(EntityRecord {
            collection,
            seq,
            chunks,
            chunk_bytes,
            snapshot_bytes,
            heads,
            index_keys,
            derived,
        })
    }
}

/// Group commit: writers wait for a flush that started after their commit; one of them
/// performs it for all.
#[derive(Debug, Default)]
struct FlushState {
    durable: u64,
    flushing: bool,
    /// Writers inside `wait_durable`.
    waiting: usize,
    failed: Option<String>,
}

/// The longest a flusher waits for other writers' commits to join its flush…
const FLUSH_LINGER: std::time::Duration = std::time::Duration::from_micros(5000);
/// …checking this often whether commits still arrive (it flushes once they stop).
const FLUSH_LINGER_STEP: std::time::Duration = std::time::Duration::from_micros(300);

/// sled's page cache when not configured.
pub const DEFAULT_CACHE_BYTES: u64 = 32 << 20;

/// The store's layout on a [`Kv`]; see [`SledStore`] and [`MemoryStore`].
#[derive(Debug)]
pub struct KvStore<K: Kv> {
    kv: K,
    /// Serialises commits, so feed seqs follow commit order and record updates don't race.
    commit_lock: Mutex<()>,
    last_seq: AtomicU64,
    committed: AtomicU64,
    flushes: AtomicU64,
    flush: Mutex<FlushState>,
    flushed: Condvar,
    /// Entities per collection: counted once at the first [`Store::counts`], then kept up to
    /// date by every commit and purge (so `status` does not walk the views each call).
    counts: Mutex<Option<BTreeMap<String, u64>>>,
}

/// The sled engine.
pub type SledStore = KvStore<SledKv>;

/// The sled engine with encryption at rest.
pub type EncryptedSledStore = KvStore<EncryptedKv<SledKv>>;

impl SledStore {
    /// Opens (or creates) the store in `dir` with the default page cache.
    pub fn open(dir: &std::path::Path) -> Result<Self, Error> {
        Self::open_with(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) an unencrypted store in `dir`; sled's page cache may hold
    /// `cache_bytes`. An encrypted store is refused ([`open_store`] opens both).
    pub fn open_with(dir: &std::path::Path, cache_bytes: u64) -> Result<Self, Error> {
        let kv = SledKv::open(dir, cache_bytes)?;
        if let Some(h) = crypt::header_of(&kv)? {
            return Err(Error::KeyNeeded(format!("it needs {}", h.kind.name())));
        }
        KvStore::on(kv)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, Error> {
        self.kv.with(|db, _| Ok(db.size_on_disk()?))
    }
}

impl EncryptedSledStore {
    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, Error> {
        self.kv.inner.with(|db, _| Ok(db.size_on_disk()?))
    }
}

/// Creates the store in `dir` (which must hold none), encrypted with `secret` if given.
pub fn create_store(
    dir: &std::path::Path,
    cache_bytes: u64,
    secret: Option<&Secret>,
) -> Result<Arc<dyn Store>, Error> {
    let kv = SledKv::open(dir, cache_bytes)?;
    Ok(match secret {
        None => Arc::new(KvStore::on(kv)?),
        Some(s) => Arc::new(KvStore::on(EncryptedKv::create(kv, s)?)?),
    })
}

/// Opens the store in `dir`, encrypted or not: `key` is asked for the secret only when the
/// store is encrypted (its `Err` says what is missing and becomes [`Error::KeyNeeded`]).
pub fn open_store(
    dir: &std::path::Path,
    cache_bytes: u64,
    key: KeyProvider<'_>,
) -> Result<Arc<dyn Store>, Error> {
    let kv = SledKv::open(dir, cache_bytes)?;
    Ok(match crypt::header_of(&kv)? {
        None => Arc::new(KvStore::on(kv)?),
        Some(h) => {
            let secret = key(h.kind).map_err(Error::KeyNeeded)?;
            Arc::new(KvStore::on(EncryptedKv::open(kv, &h, &secret)?)?)
        }
    })
}

impl<K: Kv> KvStore<K> {
    /// The store over `kv`, which may hold an earlier store's layout.
    fn on(kv: K) -> Result<Self, Error> {
        let last_seq = match kv.last_key(b"f")? {
            Some(k) => {
                let b: [u8; 8] = k[1..]
                    .try_into()
                    .map_err(|_| Error::Corrupt("feed key".into()))?;
                u64::from_be_bytes(b)
            }
            None => 0,
        };
        // A purge whose rewrite a crash cut short: finish it before anything is read.
        if kv.get(&key(b'm', &[META_REWRITE]))?.is_some() {
            kv.rewrite(&key(b'm', &[META_REWRITE]))?;
        }
        Ok(KvStore {
            kv,
            commit_lock: Mutex::new(()),
            last_seq: AtomicU64::new(last_seq),
            committed: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush: Mutex::new(FlushState::default()),
            flushed: Condvar::new(),
            counts: Mutex::new(None),
        })
    }

    /// Adds `delta` to `collection`'s count, if counts were taken yet (callers hold the
    /// commit lock, so no commit slips between a count and its update).
    fn count_change(&self, collection: &str, delta: i64) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(counts) = counts.as_mut() else {
            return;
        };
        let n = counts.entry(collection.to_owned()).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            counts.remove(collection);
        }
    }

    /// Counts the views once, by collection.
    fn scan_counts(&self) -> Result<BTreeMap<String, u64>, Error> {
        let mut out: BTreeMap<String, u64> = BTreeMap::new();
        for (k, _) in self
            .kv
            .scan(b"v", usize::MAX, &mut |k| k.first() == Some(&b'v'))?
        {
            let name = &k[1..k.len().saturating_sub(17)];
            *out.entry(String::from_utf8_lossy(name).into_owned())
                .or_default() += 1;
        }
        Ok(out)
    }

    fn wait_durable_locked<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, FlushState>,
        ticket: Ticket,
    ) -> Result<(), Error> {
        loop {
            if let Some(e) = &st.failed {
                return Err(Error::FlushFailed(e.clone()));
            }
            if st.durable >= ticket.0 {
                return Ok(());
            }
            if st.flushing {
                st = self.flushed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Become the flusher for every commit made so far. When other writers are
            // waiting too, linger a moment so the commits they are about to make share it.
            st.flushing = true;
            let linger = st.waiting > 1;
            drop(st);
            if linger {
                // Keep waiting while commits keep arriving, up to FLUSH_LINGER.
                let start = std::time::Instant::now();
                let mut seen = self.committed.load(Ordering::SeqCst);
                while start.elapsed() < FLUSH_LINGER {
                    std::thread::sleep(FLUSH_LINGER_STEP);
                    let now = self.committed.load(Ordering::SeqCst);
                    if now == seen {
                        break;
                    }
                    seen = now;
                }
            }
            let target = self.committed.load(Ordering::SeqCst);
            let result = self.kv.flush();
            self.flushes.fetch_add(1, Ordering::Relaxed);
            st = self.flush.lock().unwrap_or_else(|p| p.into_inner());
            st.flushing = false;
            match result {
                Ok(_) => st.durable = st.durable.max(target),
                Err(e) => st.failed = Some(e.to_string()),
            }
            self.flushed.notify_all();
        }
    }
}

impl<K: Kv> Store for KvStore<K> {
    fn commit(
        &self,
        entities: Vec<EntityWrite>,
        meta: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<Ticket, Error> {
        let _guard = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = Batch::default();
        let mut seq = self.last_seq.load(Ordering::SeqCst);
        let mut moved: Vec<(String, i64)> = Vec::new();
        let mut created = std::collections::HashSet::new();
        let mut written = std::collections::HashSet::new();
        for w in entities {
            let old = self.record(&w.id)?;
            let derived = derived_fingerprint(&w.view, &w.index);
            // The view and index entries are written only when they change; not when the
            // same entity came earlier in this batch (`old` is the stored record, not that
            // write).
            let first_in_batch = written.insert(w.id);
            let same_derived = first_in_batch
                && old.as_ref().is_some_and(|o| {
                    o.collection == w.collection && o.derived != [0; 16] && o.derived == derived
                });
            match &old {
                None if created.insert(w.id) => moved.push((w.collection.clone(), 1)),
                None => {}
                Some(o) if o.collection != w.collection => {
                    moved.extend([(o.collection.clone(), -1), (w.collection.clone(), 1)])
                }
                Some(_) => {}
            }
            seq += 1;
            let mut rec = EntityRecord {
                collection: w.collection.clone(),
                seq,
                chunks: 0,
                chunk_bytes: 0,
                snapshot_bytes: 0,
                heads: w.heads,
                index_keys: Vec::with_capacity(w.index.len()),
                derived,
            };
            if let Some(old) = &old {
                batch.remove(key(b'f', &[&old.seq.to_be_bytes()]));
                if same_derived {
                    rec.index_keys = old.index_keys.clone();
                } else {
                    for k in &old.index_keys {
                        batch.remove(k.as_slice());
                    }
                }
                if old.collection != w.collection {
                    batch.remove(view_key(&old.collection, &w.id));
                }
                rec.chunks = old.chunks;
                rec.chunk_bytes = old.chunk_bytes;
                rec.snapshot_bytes = old.snapshot_bytes;
            }
            match w.doc {
                DocWrite::Snapshot(bytes) => {
                    for n in 0..rec.chunks {
                        batch.remove(chunk_key(&w.id, n));
                    }
                    rec.chunks = 0;
                    rec.chunk_bytes = 0;
                    rec.snapshot_bytes = bytes.len() as u64;
                    batch.insert(key(b'd', &[&w.id]), bytes);
                }
                DocWrite::Append(bytes) => {
                    rec.chunk_bytes += bytes.len() as u64;
                    batch.insert(chunk_key(&w.id, rec.chunks), bytes);
                    rec.chunks += 1;
                }
            }
            if !same_derived {
                for (name, k, v) in w.index {
                    let full = index_key(&name, &k);
                    batch.insert(full.clone(), v);
                    rec.index_keys.push(full);
                }
                batch.insert(view_key(&w.collection, &w.id), w.view);
            }
            batch.insert(key(b'f', &[&seq.to_be_bytes()]), &w.id[..]);
            batch.insert(key(b'e', &[&w.id]), rec.encode());
        }
        for (name, value) in meta {
            match value {
                Some(v) => batch.insert(key(b'm', &[name.as_bytes()]), v),
                None => batch.remove(key(b'm', &[name.as_bytes()])),
            }
        }
        self.kv.apply(batch.0)?;
        for (collection, delta) in moved {
            self.count_change(&collection, delta);
        }
        self.last_seq.store(seq, Ordering::SeqCst);
        Ok(Ticket(self.committed.fetch_add(1, Ordering::SeqCst) + 1))
    }

    fn wait_durable(&self, ticket: Ticket) -> Result<(), Error> {
        let mut st = self.flush.lock().unwrap_or_else(|p| p.into_inner());
        st.waiting += 1;
        let result = self.wait_durable_locked(st, ticket);
        self.flush.lock().unwrap_or_else(|p| p.into_inner()).waiting -= 1;
        result
    }

    fn load_doc(&self, id: &EntityKey) -> Result<Option<StoredDoc>, Error> {
        let Some(snapshot) = self.kv.get(&key(b'd', &[id]))? else {
            return Ok(None);
        };
        let prefix = key(b'c', &[id]);
        let chunks = self
            .kv
            .scan(&prefix, usize::MAX, &mut |k| k.starts_with(&prefix))?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        Ok(Some(StoredDoc { snapshot, chunks }))
    }

    fn record(&self, id: &EntityKey) -> Result<Option<EntityRecord>, Error> {
        self.kv
            .get(&key(b'e', &[id]))?
            .map(|b| EntityRecord::decode(&b))
            .transpose()
    }

    fn view(&self, collection: &str, id: &EntityKey) -> Result<Option<Vec<u8>>, Error> {
        self.kv.get(&view_key(collection, id))
    }

    fn views(
        &self,
        collection: &str,
        after: Option<&EntityKey>,
        limit: usize,
    ) -> Result<Vec<(EntityKey, Vec<u8>)>, Error> {
        let prefix = key(b'v', &[collection.as_bytes(), &[0]]);
        let start = match after {
            Some(id) => {
                let mut k = view_key(collection, id);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for (k, v) in self
            .kv
            .scan(&start, limit, &mut |k| k.starts_with(&prefix))?
        {
            let id: EntityKey = k[prefix.len()..]
                .try_into()
                .map_err(|_| Error::Corrupt("view key".into()))?;
            out.push((id, v));
        }
        Ok(out)
    }

    fn feed_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, EntityKey)>, Error> {
        let start = key(b'f', &[&(after.saturating_add(1)).to_be_bytes()]);
        let mut out = Vec::new();
        for (k, v) in self
            .kv
            .scan(&start, limit, &mut |k| k.first() == Some(&b'f'))?
        {
            let seq: [u8; 8] = k[1..]
                .try_into()
                .map_err(|_| Error::Corrupt("feed key".into()))?;
            let id: EntityKey = v
                .as_slice()
                .try_into()
                .map_err(|_| Error::Corrupt("feed entry".into()))?;
            out.push((u64::from_be_bytes(seq), id));
        }
        Ok(out)
    }

    fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::SeqCst)
    }

    fn index(&self, name: &str) -> Result<Vec<IndexEntry>, Error> {
        self.index_prefix(name, &[])
    }

    fn index_get(&self, name: &str, k: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.kv.get(&index_key(name, k))
    }

    fn index_prefix(&self, name: &str, prefix: &[u8]) -> Result<Vec<IndexEntry>, Error> {
        let start = index_key(name, prefix);
        let skip = index_key(name, &[]).len();
        Ok(self
            .kv
            .scan(&start, usize::MAX, &mut |k| k.starts_with(&start))?
            .into_iter()
            .map(|(k, v)| (k[skip..].to_vec(), v))
            .collect())
    }

    fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        self.kv.get(&key(b'm', &[name.as_bytes()]))
    }

    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let start = key(b'm', &[prefix.as_bytes()]);
        Ok(self
            .kv
            .scan(&start, usize::MAX, &mut |k| k.starts_with(&start))?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k[1..]).into_owned(), v))
            .collect())
    }

    fn commit_stats(&self) -> (u64, u64) {
        (
            self.committed.load(Ordering::Relaxed),
            self.flushes.load(Ordering::Relaxed),
        )
    }

    fn encrypted(&self) -> bool {
        self.kv.encrypted()
    }

    fn purge(&self, ids: &[EntityKey]) -> Result<(), Error> {
        let flag = key(b'm', &[META_REWRITE]);
        {
            let _guard = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut batch = Batch::default();
            let mut gone: Vec<String> = Vec::new();
            for id in ids {
                let Some(rec) = self.record(id)? else {
                    continue;
                };
                gone.push(rec.collection.clone());
                batch.remove(key(b'd', &[id]));
                for n in 0..rec.chunks {
                    batch.remove(chunk_key(id, n));
                }
                batch.remove(key(b'e', &[id]));
                batch.remove(view_key(&rec.collection, id));
                batch.remove(key(b'f', &[&rec.seq.to_be_bytes()]));
                for k in &rec.index_keys {
                    batch.remove(k.as_slice());
                }
            }
            batch.insert(flag.clone(), vec![1]);
            self.kv.apply(batch.0)?;
            for collection in gone {
                self.count_change(&collection, -1);
            }
            self.kv.flush()?;
            // The copy leaves the flag out: once it replaced the store, the purge is final.
            self.kv.rewrite(&flag)?;
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn counts(&self) -> Result<Vec<(String, u64)>, Error> {
        if let Some(counts) = self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(counts.iter().map(|(c, n)| (c.clone(), *n)).collect());
        }
        // The first call counts, holding off commits so none is missed or counted twice.
        let _guard = self.commit_lock.lock().unwrap_or_else(|p| p.into_inner());
        let counted = self.scan_counts()?;
        let out = counted.iter().map(|(c, n)| (c.clone(), *n)).collect();
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()) = Some(counted);
        Ok(out)
    }
}

/// sled 0.34 writes its snapshot to `snap.<lsn>.generating` and renames it when complete,
/// but on open it reads the newest `snap.*` file, unfinished ones included: a process killed
/// while writing one leaves a store that refuses to open ("Read corrupted data", sled
/// issue #1527). The file is only an index over the log, and the last finished snapshot is
/// still there until the rename, so removing it loses nothing; sled replays the log instead.
fn remove_unfinished_snapshots(dir: &std::path::Path) -> Result<(), Error> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Engine(sled::Error::Io(e))),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %entry.path().display(), "removing an unfinished storage snapshot left by a crash");
            std::fs::remove_file(entry.path()).map_err(|e| Error::Engine(sled::Error::Io(e)))?;
        }
    }
    Ok(())
}

#[cfg(test)]
impl SledStore {
    fn flush_for_test(&self) {
        self.kv.flush().unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(id: u8, doc: DocWrite, index: Vec<(String, Vec<u8>, Vec<u8>)>) -> EntityWrite {
        EntityWrite {
            id: [id; 16],
            collection: "tasks".into(),
            doc,
            view: vec![id],
            heads: vec![[id; 32]],
            index,
        }
    }

    #[test]
    fn views_and_index_entries_are_written_only_when_they_change() {
        let s = MemoryStore::journaled([]).unwrap();
        let flushed_keys = |s: &MemoryStore| -> Vec<Vec<u8>> {
            s.kv.flush().unwrap();
            s.take_flushed().into_iter().map(|(k, _)| k).collect()
        };
        let entry = |k: &[u8], v: &[u8]| ("blob".to_owned(), k.to_vec(), v.to_vec());
        let mut w = write(1, DocWrite::Snapshot(vec![1]), vec![entry(b"k1", b"v1")]);
        s.commit(vec![w.clone()], vec![]).unwrap();
        let first = flushed_keys(&s);
        let view = view_key("tasks", &[1; 16]);
        let k1 = index_key("blob", b"k1");
        assert!(first.contains(&view) && first.contains(&k1));

        // The same view and index: only the document, record and feed are written.
        w.doc = DocWrite::Append(vec![2]);
        s.commit(vec![w.clone()], vec![]).unwrap();
        let second = flushed_keys(&s);
        assert!(!second.contains(&view), "unchanged view rewritten");
        assert!(
            !second.contains(&k1),
            "unchanged index entry rewritten or removed"
        );
        assert!(second.contains(&chunk_key(&[1; 16], 0)));
        assert_eq!(s.view("tasks", &[1; 16]).unwrap(), Some(vec![1]));
        assert_eq!(s.index_get("blob", b"k1").unwrap(), Some(b"v1".to_vec()));

        // A change to either is written, and the entries the skipped write kept are still
        // known: the old one goes.
        w.doc = DocWrite::Append(vec![3]);
        w.index = vec![entry(b"k2", b"v2")];
        s.commit(vec![w.clone()], vec![]).unwrap();
        assert_eq!(s.index_get("blob", b"k1").unwrap(), None);
        assert_eq!(s.index_get("blob", b"k2").unwrap(), Some(b"v2".to_vec()));
        w.doc = DocWrite::Append(vec![4]);
        w.view = vec![9];
        s.commit(vec![w], vec![]).unwrap();
        assert_eq!(s.view("tasks", &[1; 16]).unwrap(), Some(vec![9]));
        assert_eq!(s.index_get("blob", b"k2").unwrap(), Some(b"v2".to_vec()));
    }

    #[test]
    fn a_record_from_before_the_fingerprint_reads_as_unknown_and_is_rewritten_whole() {
        let mut rec = EntityRecord {
            collection: "tasks".into(),
            seq: 7,
            chunks: 1,
            chunk_bytes: 3,
            snapshot_bytes: 9,
            heads: vec![[5; 32]],
            index_keys: vec![b"ik".to_vec()],
            derived: [7; 16],
        };
        let bytes = rec.encode();
        assert_eq!(EntityRecord::decode(&bytes).unwrap().derived, [7; 16]);
        let old = &bytes[..bytes.len() - 16];
        rec.derived = [0; 16];
        let decoded = EntityRecord::decode(old).unwrap();
        assert_eq!(decoded.derived, [0; 16]);
        assert_eq!(decoded.encode(), rec.encode());
    }

    #[test]
    fn counts_follow_commits_moves_and_purges_as_a_fresh_count_would() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        s.commit(vec![write(1, DocWrite::Snapshot(vec![1]), vec![])], vec![])
            .unwrap();
        assert_eq!(
            s.counts().unwrap(),
            vec![("tasks".into(), 1)],
            "the first call counts"
        );
        let mut other = write(2, DocWrite::Snapshot(vec![2]), vec![]);
        other.collection = "notes".into();
        s.commit(
            vec![
                write(3, DocWrite::Snapshot(vec![3]), vec![]),
                other,
                write(1, DocWrite::Append(vec![9]), vec![]),
            ],
            vec![],
        )
        .unwrap();
        assert_eq!(
            s.counts().unwrap(),
            vec![("notes".into(), 1), ("tasks".into(), 2)]
        );
        // An entity that changes collection moves between the counts.
        let mut moved = write(3, DocWrite::Append(vec![4]), vec![]);
        moved.collection = "notes".into();
        s.commit(vec![moved], vec![]).unwrap();
        assert_eq!(
            s.counts().unwrap(),
            vec![("notes".into(), 2), ("tasks".into(), 1)]
        );
        s.purge(&[[1; 16], [9; 16]]).unwrap();
        assert_eq!(
            s.counts().unwrap(),
            vec![("notes".into(), 2)],
            "a purged entity leaves its count; an unknown id changes nothing"
        );
        assert_eq!(
            s.counts().unwrap(),
            s.scan_counts().unwrap().into_iter().collect::<Vec<_>>(),
            "kept counts equal a fresh count"
        );
        drop(s);
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(
            s.counts().unwrap(),
            vec![("notes".into(), 2)],
            "reopened, the count is taken again"
        );
    }

    #[test]
    fn feed_keeps_one_live_entry_per_entity_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let t = s
                .commit(vec![write(1, DocWrite::Snapshot(vec![9]), vec![])], vec![])
                .unwrap();
            s.commit(vec![write(2, DocWrite::Snapshot(vec![8]), vec![])], vec![])
                .unwrap();
            let t2 = s
                .commit(
                    vec![write(
                        1,
                        DocWrite::Append(vec![7]),
                        vec![("conflict".into(), b"k1".to_vec(), b"v".to_vec())],
                    )],
                    vec![("x".into(), Some(b"y".to_vec()))],
                )
                .unwrap();
            assert!(t2 > t);
            s.wait_durable(t2).unwrap();
            assert_eq!(
                s.feed_since(0, 10).unwrap(),
                vec![(2, [2; 16]), (3, [1; 16])]
            );
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.last_seq(), 3);
        assert_eq!(s.feed_since(2, 10).unwrap(), vec![(3, [1; 16])]);
        let doc = s.load_doc(&[1; 16]).unwrap().unwrap();
        assert_eq!((doc.snapshot, doc.chunks), (vec![9], vec![vec![7]]));
        assert_eq!(
            s.index("conflict").unwrap(),
            vec![(b"k1".to_vec(), b"v".to_vec())]
        );
        assert_eq!(s.meta("x").unwrap(), Some(b"y".to_vec()));
        assert_eq!(s.counts().unwrap(), vec![("tasks".into(), 2)]);
        // A snapshot replaces chunks; index entries not rewritten disappear.
        s.commit(vec![write(1, DocWrite::Snapshot(vec![6]), vec![])], vec![])
            .unwrap();
        let doc = s.load_doc(&[1; 16]).unwrap().unwrap();
        assert_eq!((doc.snapshot, doc.chunks.len()), (vec![6], 0));
        assert!(s.index("conflict").unwrap().is_empty());
        assert_eq!(
            s.views("tasks", Some(&[1; 16]), 10).unwrap(),
            vec![([2; 16], vec![2])]
        );
    }

    #[test]
    fn a_snapshot_cut_by_a_crash_does_not_stop_the_store_opening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let t = s
                .commit(vec![write(1, DocWrite::Snapshot(vec![9]), vec![])], vec![])
                .unwrap();
            s.wait_durable(t).unwrap();
        }
        // What a kill during sled's snapshot write leaves: a newer, truncated snapshot file.
        std::fs::write(
            dir.path().join("snap.7FFFFFFFFFFFFFFF.generating"),
            [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
        )
        .unwrap();
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.load_doc(&[1; 16]).unwrap().unwrap().snapshot, vec![9]);
        assert!(!dir.path().join("snap.7FFFFFFFFFFFFFFF.generating").exists());
    }

    fn files_contain(dir: &std::path::Path, needle: &[u8]) -> bool {
        let mut found = false;
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                found |= files_contain(&path, needle);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                found |= bytes.windows(needle.len()).any(|w| w == needle);
            }
        }
        found
    }

    #[test]
    fn a_purge_leaves_no_byte_of_the_entity_in_the_files_and_the_rest_intact() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("db");
        let marker = b"PURGE-ME-7f3a9c";
        {
            let s = SledStore::open(&dir).unwrap();
            let mut w = write(
                1,
                DocWrite::Snapshot(marker.to_vec()),
                vec![("conflict".into(), b"k1".to_vec(), marker.to_vec())],
            );
            w.view = marker.to_vec();
            let t = s
                .commit(
                    vec![w, write(2, DocWrite::Snapshot(vec![8]), vec![])],
                    vec![],
                )
                .unwrap();
            // Overwritten versions linger in sled's log too.
            s.commit(
                vec![write(1, DocWrite::Append(marker.to_vec()), vec![])],
                vec![],
            )
            .unwrap();
            s.wait_durable(t).unwrap();
            s.flush_for_test();
            assert!(
                files_contain(root.path(), marker),
                "the marker is on disk before the purge (else this test proves nothing)"
            );
            s.purge(&[[1; 16]]).unwrap();
            assert!(
                !files_contain(root.path(), marker),
                "a byte of the purged entity is still in the files"
            );
            assert!(s.record(&[1; 16]).unwrap().is_none());
            assert_eq!(s.load_doc(&[2; 16]).unwrap().unwrap().snapshot, vec![8]);
            let t = s
                .commit(vec![write(3, DocWrite::Snapshot(vec![7]), vec![])], vec![])
                .unwrap();
            s.wait_durable(t).unwrap();
        }
        let s = SledStore::open(&dir).unwrap();
        assert_eq!(
            s.feed_since(0, 10)
                .unwrap()
                .iter()
                .map(|(_, id)| id[0])
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(s.index("conflict").unwrap().is_empty());
        assert!(!files_contain(root.path(), marker));
    }

    #[test]
    fn a_rewrite_cut_by_a_crash_is_finished_on_open() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("db");
        {
            let s = SledStore::open(&dir).unwrap();
            let t = s
                .commit(
                    vec![write(1, DocWrite::Snapshot(vec![9]), vec![])],
                    vec![("~rewrite".into(), Some(vec![1]))],
                )
                .unwrap();
            s.wait_durable(t).unwrap();
        }
        // A crash after the copy was complete and the old store moved aside.
        std::fs::rename(&dir, dir.with_extension("old")).unwrap();
        std::fs::create_dir(dir.with_extension("rewrite")).unwrap();
        std::fs::remove_dir(dir.with_extension("rewrite")).unwrap();
        std::fs::rename(dir.with_extension("old"), dir.with_extension("rewrite")).unwrap();
        let s = SledStore::open(&dir).unwrap();
        assert!(
            s.meta("~rewrite").unwrap().is_none(),
            "the unfinished rewrite ran on open"
        );
        assert_eq!(s.load_doc(&[1; 16]).unwrap().unwrap().snapshot, vec![9]);
        assert!(!dir.with_extension("rewrite").exists() && !dir.with_extension("old").exists());
    }

    #[test]
    fn an_encrypted_store_needs_its_key_and_shows_no_content() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("db");
        let marker = b"SECRET-CUSTOMER-41";
        let secret = || Secret::KeyFile(vec![3; 32]);
        {
            let s = create_store(&dir, DEFAULT_CACHE_BYTES, Some(&secret())).unwrap();
            assert!(s.encrypted());
            let mut w = write(
                1,
                DocWrite::Snapshot(marker.to_vec()),
                vec![("conflict".into(), marker.to_vec(), marker.to_vec())],
            );
            w.collection = "customers".into();
            w.view = marker.to_vec();
            let t = s
                .commit(
                    vec![w],
                    vec![("seen/SECRET-CUSTOMER-41".into(), Some(marker.to_vec()))],
                )
                .unwrap();
            s.wait_durable(t).unwrap();
        }
        assert!(!files_contain(root.path(), marker));
        assert!(!files_contain(root.path(), b"customers"));
        let err = SledStore::open(&dir).err().unwrap();
        assert!(
            err.to_string().contains("encrypted") && err.to_string().contains("key file"),
            "{err}"
        );
        let err = open_store(&dir, DEFAULT_CACHE_BYTES, &mut |_| {
            Err("pass --key-file FILE".into())
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("--key-file"), "{err}");
        let err = open_store(&dir, DEFAULT_CACHE_BYTES, &mut |_| {
            Ok(Secret::KeyFile(vec![4; 32]))
        })
        .err()
        .unwrap();
        assert!(matches!(err, Error::WrongKey(_)), "{err}");
        let s = open_store(&dir, DEFAULT_CACHE_BYTES, &mut |_| Ok(secret())).unwrap();
        assert_eq!(
            s.view("customers", &[1; 16]).unwrap(),
            Some(marker.to_vec())
        );
        assert_eq!(
            s.index_get("conflict", marker).unwrap(),
            Some(marker.to_vec())
        );
        assert_eq!(
            s.meta_prefix("seen/").unwrap(),
            vec![("seen/SECRET-CUSTOMER-41".to_owned(), marker.to_vec())]
        );
        assert_eq!(s.counts().unwrap(), vec![("customers".to_owned(), 1)]);
        assert_eq!(s.last_seq(), 1);
        s.purge(&[[1; 16]]).unwrap();
        assert!(s.view("customers", &[1; 16]).unwrap().is_none());
        assert!(s.index("conflict").unwrap().is_empty());
    }

    #[test]
    fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(SledStore::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..20u8 {
                        let mut w = write(t, DocWrite::Append(vec![i]), vec![]);
                        w.id[1] = i;
                        let ticket = s.commit(vec![w], vec![]).unwrap();
                        s.wait_durable(ticket).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.last_seq(), 160);
        assert_eq!(s.feed_since(0, 1000).unwrap().len(), 160);
    }
}
