//! fieldsync-blobs: a content-addressed store of files on disk, for attachments.
//!
//! # Concepts
//! - A **blob** is a file named by the BLAKE3 hash of its bytes ([`Hash`], 64 hex
//!   characters). The same bytes written twice are stored once.
//! - A blob exists only **whole and verified**: bytes go to a temporary file while they are
//!   hashed, the file is flushed to disk, and only then renamed to its hash (and the
//!   directory flushed). A crash, a dropped [`BlobWriter`], a write over the limit or bytes
//!   that do not hash to the expected value leave no blob behind.
//! - **Limits** ([`Config`]): a size per blob and a quota for the whole store, both checked
//!   while bytes arrive, so an oversized upload is refused without being kept.
//! - **Removal** is explicit ([`BlobStore::remove`]) or by age for blobs nothing keeps
//!   ([`BlobStore::remove_unreferenced`]); [`BlobStore::pin`] marks a blob as just used so
//!   a collection running at the same time cannot take it.
//!
//! # Layout
//! `ROOT/ab/abcdef…` (the first two hex characters shard the directory), temporary files
//! in `ROOT/tmp/`, cleared when the store opens, and transfers that can resume in
//! `ROOT/partial/<hash>.partial` (see [`BlobStore::resume_writer`]). One process writes a store at a time (the
//! node's data directory already allows one).
//!
//! # Example
//! ```
//! # fn main() -> Result<(), fieldsync_blobs::Error> {
//! # let dir = tempfile::tempdir().unwrap();
//! use std::io::Read;
//! use fieldsync_blobs::{BlobStore, Config};
//! let store = BlobStore::open(dir.path(), Config::default())?;
//! let mut w = store.writer(None)?;
//! w.write(b"hello ")?;
//! w.write(b"world")?;
//! let stored = w.finish()?;
//! assert_eq!(stored.hash.to_string(), blake3::hash(b"hello world").to_hex().as_str());
//! let mut text = String::new();
//! store.read_range(&stored.hash, 6..11)?.read_to_string(&mut text).unwrap();
//! assert_eq!(text, "world");
//! # Ok(()) }
//! ```

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

pub mod wire;

/// Default largest blob: 256 MiB.
pub const DEFAULT_MAX_BLOB_BYTES: u64 = 256 << 20;
/// Default quota of a whole store: 10 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 10 << 30;

const TMP_DIR: &str = "tmp";
/// Each served blob's BLAKE3 tree (bao outboard, about 6 % of its size), made on first
/// serve: what lets a receiver check every 1 KiB chunk as it arrives.
const OUTBOARD_DIR: &str = "outboard";
/// Transfers from peers under way: kept across restarts, so they resume.
const PARTIAL_DIR: &str = "partial";

/// Everything that can go wrong in the blob store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The blob is larger than the per-blob limit.
    #[error("the file is over the limit of {} per attachment ([blobs] max_blob_bytes = {limit}); it was not stored", mib(*limit))]
    TooLarge { limit: u64 },
    /// The store would go over its quota.
    #[error("the blob store is full: {} of its {} quota used ([blobs] quota_bytes = {quota}), {} more needed; remove attachments or raise the quota", mib(*used), mib(*quota), mib(*needed))]
    QuotaExceeded { quota: u64, used: u64, needed: u64 },
    /// The bytes do not hash to the hash they were sent as.
    #[error("the bytes hash to {actual}, not {expected}: they are corrupt or truncated and were not stored")]
    HashMismatch { expected: Hash, actual: Hash },
    /// No blob with this hash here.
    #[error("blob {0} is not in this node's store")]
    NotFound(Hash),
    /// Text that is not a blob hash.
    #[error("invalid blob hash {0:?}: expected 64 hexadecimal characters (a BLAKE3 hash)")]
    InvalidHash(String),
    /// A byte range outside the blob.
    #[error("bytes {start}..{end} are not within the blob's {size} bytes")]
    BadRange { start: u64, end: u64, size: u64 },
    /// The file system failed.
    #[error("blob store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{bytes} bytes")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A BLAKE3 hash: a blob's name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash([u8; 32]);

impl Hash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Hash(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Display for Hash {
    /// Lowercase hex, 64 characters.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl std::str::FromStr for Hash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut out = [0u8; 32];
        if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(Error::InvalidHash(s.chars().take(80).collect()));
        }
        Ok(Hash(out))
    }
}

/// The store's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Largest blob, in bytes. Default [`DEFAULT_MAX_BLOB_BYTES`].
    pub max_blob_bytes: u64,
    /// Most bytes all blobs together may hold. Default [`DEFAULT_QUOTA_BYTES`].
    pub quota_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_blob_bytes: DEFAULT_MAX_BLOB_BYTES,
            quota_bytes: DEFAULT_QUOTA_BYTES,
        }
    }
}

impl Config {
    pub fn with_max_blob_bytes(mut self, bytes: u64) -> Self {
        self.max_blob_bytes = bytes;
        self
    }
    pub fn with_quota_bytes(mut self, bytes: u64) -> Self {
        self.quota_bytes = bytes;
        self
    }
}

/// What a finished write stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stored {
    pub hash: Hash,
    pub size: u64,
    /// The store held these bytes already (nothing new was kept).
    pub existed: bool,
}

/// One blob as [`BlobStore::list`] shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub hash: Hash,
    pub size: u64,
    /// When it was stored or last pinned.
    pub modified: SystemTime,
}

#[derive(Debug, Default)]
struct Usage {
    count: u64,
    bytes: u64,
    /// The BLAKE3 trees of the stored blobs, made or not yet (counted against the quota,
    /// so serving a file never needs room the store does not have).
    trees: u64,
    /// Bytes promised to writers still running (counted against the quota).
    reserved: u64,
}

impl Usage {
    /// What counts against the quota now.
    fn used(&self) -> u64 {
        self.bytes + self.trees + self.reserved
    }

    /// Stored blobs and their trees (what the quota error reports as used).
    fn stored(&self) -> u64 {
        self.bytes + self.trees
    }
}

/// A file written through a buffer that is flushed before any read or seek: bao's tree
/// encoder writes its 64-byte nodes one at a time, then reads them back once to reorder.
struct Buffered(BufWriter<File>);

impl Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Read for Buffered {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.flush()?;
        self.0.get_mut().read(buf)
    }
}

impl Seek for Buffered {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        // BufWriter flushes before it seeks.
        self.0.seek(to)
    }
}

/// Bytes of the BLAKE3 tree (bao outboard) of a blob of `size` bytes: about 6 % of it.
pub fn tree_size(size: u64) -> u64 {
    u64::try_from(bao::encode::outboard_size(size)).unwrap_or(u64::MAX)
}

/// A content-addressed store of files in one directory.
#[derive(Debug)]
pub struct BlobStore {
    root: PathBuf,
    config: Config,
    usage: Mutex<Usage>,
    /// Held while a blob is pinned or removed by age, so the two never interleave.
    removal: Mutex<()>,
    next_tmp: AtomicU64,
}

impl BlobStore {
    /// Opens (creating it if needed) the store in `root`. Temporary files a crash left are
    /// removed: they were never blobs.
    pub fn open(root: &Path, config: Config) -> Result<Self> {
        let tmp = root.join(TMP_DIR);
        std::fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
        let partial = root.join(PARTIAL_DIR);
        std::fs::create_dir_all(&partial).map_err(io_at(&partial))?;
        for entry in std::fs::read_dir(&tmp).map_err(io_at(&tmp))? {
            let path = entry.map_err(io_at(&tmp))?.path();
            let _ = std::fs::remove_file(&path);
        }
        let store = BlobStore {
            root: root.to_owned(),
            config,
            usage: Mutex::new(Usage::default()),
            removal: Mutex::new(()),
            next_tmp: AtomicU64::new(0),
        };
        let blobs = store.list()?;
        *store.usage() = Usage {
            count: blobs.len() as u64,
            bytes: blobs.iter().map(|b| b.size).sum(),
            trees: blobs.iter().map(|b| tree_size(b.size)).sum(),
            reserved: 0,
        };
        Ok(store)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn usage(&self) -> MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the blob `hash` lives (whether or not it is here).
    pub fn path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_string();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Starts writing a blob. `size`, when known in advance, is checked against the limits
    /// at once (the bytes are still counted as they come).
    pub fn writer(&self, size: Option<u64>) -> Result<BlobWriter<'_>> {
        if let Some(size) = size {
            if size > self.config.max_blob_bytes {
                return Err(Error::TooLarge {
                    limit: self.config.max_blob_bytes,
                });
            }
            let u = self.usage();
            if u.used() + size + tree_size(size) > self.config.quota_bytes {
                return Err(Error::QuotaExceeded {
                    quota: self.config.quota_bytes,
                    used: u.stored(),
                    needed: size + tree_size(size),
                });
            }
        }
        let tmp = self.tmp_path();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        Ok(BlobWriter {
            store: self,
            file: Some(file),
            tmp,
            hasher: blake3::Hasher::new(),
            written: 0,
            keep: false,
            flusher: Flusher::default(),
        })
    }

    /// A new name in the store's temporary directory (emptied on open).
    fn tmp_path(&self) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.root
            .join(TMP_DIR)
            .join(format!("{}-{n}.partial", std::process::id()))
    }

    /// Where the bytes of a transfer of `hash` under way are kept.
    fn partial_path(&self, hash: &Hash) -> PathBuf {
        self.root.join(PARTIAL_DIR).join(format!("{hash}.partial"))
    }

    /// How many bytes of `hash` an earlier, interrupted transfer left (0: none).
    pub fn partial_len(&self, hash: &Hash) -> u64 {
        std::fs::metadata(self.partial_path(hash))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// A writer for the blob `hash` of `size` bytes that continues an interrupted transfer
    /// from byte `start` (its bytes so far are hashed again from disk; `start` 0 starts
    /// over). Dropped unfinished, it keeps what it has for the next try; it becomes the
    /// blob only through [`BlobWriter::finish_expecting`], and bytes that do not hash to
    /// `hash` are thrown away, partial file included.
    pub fn resume_writer(&self, hash: &Hash, size: u64, start: u64) -> Result<BlobWriter<'_>> {
        if size > self.config.max_blob_bytes {
            return Err(Error::TooLarge {
                limit: self.config.max_blob_bytes,
            });
        }
        let path = self.partial_path(hash);
        let have = self.partial_len(hash);
        if start > size || (start > 0 && start != have) {
            return Err(Error::BadRange {
                start,
                end: size,
                size: have,
            });
        }
        {
            let mut u = self.usage();
            if u.used() + size + tree_size(size) > self.config.quota_bytes {
                return Err(Error::QuotaExceeded {
                    quota: self.config.quota_bytes,
                    used: u.stored(),
                    needed: size + tree_size(size),
                });
            }
            // The bytes already there count as written by this writer.
            u.reserved += start;
        }
        let mut hasher = blake3::Hasher::new();
        let file = if start == 0 {
            File::create(&path).map_err(io_at(&path))?
        } else {
            let mut old = File::open(&path).map_err(io_at(&path))?;
            hasher.update_reader(&mut old).map_err(io_at(&path))?;
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_at(&path))?
        };
        Ok(BlobWriter {
            store: self,
            file: Some(file),
            tmp: path,
            hasher,
            written: start,
            keep: true,
            flusher: Flusher::default(),
        })
    }

    /// Stores everything `from` reads (streamed, in 64 KiB pieces).
    pub fn write_from(&self, from: &mut dyn Read, size: Option<u64>) -> Result<Stored> {
        let mut w = self.writer(size)?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        path: PathBuf::from("(source)"),
                        source,
                    })
                }
            };
            w.write(&buf[..n])?;
        }
        w.finish()
    }

    /// Whether the blob is here.
    pub fn contains(&self, hash: &Hash) -> bool {
        self.path(hash).is_file()
    }

    /// The blob's size, or [`Error::NotFound`].
    pub fn size(&self, hash: &Hash) -> Result<u64> {
        let path = self.path(hash);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(*hash)),
            Err(e) => Err(io_at(&path)(e)),
        }
    }

    /// Opens the blob for reading; also returns its size.
    pub fn open_blob(&self, hash: &Hash) -> Result<(File, u64)> {
        let path = self.path(hash);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(*hash))
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        let size = file.metadata().map_err(io_at(&path))?.len();
        Ok((file, size))
    }

    /// The bytes `range` of the blob (end exclusive, within the blob).
    pub fn read_range(&self, hash: &Hash, range: Range<u64>) -> Result<std::io::Take<File>> {
        let (mut file, size) = self.open_blob(hash)?;
        if range.start > range.end || range.end > size {
            return Err(Error::BadRange {
                start: range.start,
                end: range.end,
                size,
            });
        }
        file.seek(SeekFrom::Start(range.start))
            .map_err(io_at(&self.path(hash)))?;
        Ok(file.take(range.end - range.start))
    }

    /// Whether the blob's bytes still hash to its name (reads it whole, in pieces).
    pub fn verify(&self, hash: &Hash) -> Result<bool> {
        let (mut file, _) = self.open_blob(hash)?;
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(&mut file)
            .map_err(io_at(&self.path(hash)))?;
        Ok(Hash(*hasher.finalize().as_bytes()) == *hash)
    }

    /// Every blob, in hash order.
    pub fn list(&self) -> Result<Vec<BlobInfo>> {
        let mut out = Vec::new();
        for shard in std::fs::read_dir(&self.root).map_err(io_at(&self.root))? {
            let shard = shard.map_err(io_at(&self.root))?;
            if !shard.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = shard.file_name();
            let Some(prefix) = name.to_str().filter(|n| n.len() == 2) else {
                continue;
            };
            let dir = shard.path();
            for entry in std::fs::read_dir(&dir).map_err(io_at(&dir))? {
                let entry = entry.map_err(io_at(&dir))?;
                let Some(hash) = entry
                    .file_name()
                    .to_str()
                    .filter(|n| n.starts_with(prefix))
                    .and_then(|n| n.parse::<Hash>().ok())
                else {
                    continue;
                };
                let meta = entry.metadata().map_err(io_at(&entry.path()))?;
                out.push(BlobInfo {
                    hash,
                    size: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        out.sort_by_key(|b| b.hash);
        Ok(out)
    }

    /// How many blobs the store holds.
    pub fn count(&self) -> u64 {
        self.usage().count
    }

    /// How many bytes its blobs hold.
    pub fn bytes(&self) -> u64 {
        self.usage().bytes
    }

    fn outboard_path(&self, hash: &Hash) -> PathBuf {
        self.root.join(OUTBOARD_DIR).join(hash.to_string())
    }

    /// The blob and its BLAKE3 tree (bao outboard encoding), to serve it as verified
    /// slices; the tree is made from the file on first use and kept beside it. A file
    /// whose bytes no longer hash to its name (damaged on disk) is
    /// [`Error::HashMismatch`]: it is never served.
    pub fn open_with_outboard(&self, hash: &Hash) -> Result<(File, File, u64)> {
        let (mut file, size) = self.open_blob(hash)?;
        let path = self.outboard_path(hash);
        let outboard = match File::open(&path) {
            Ok(outboard) => outboard,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = self.root.join(OUTBOARD_DIR);
                std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
                let tmp = self.tmp_path();
                let made = (|| {
                    let out = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&tmp)?;
                    let mut encoder =
                        bao::encode::Encoder::new_outboard(Buffered(BufWriter::new(out)));
                    std::io::copy(
                        &mut BufReader::with_capacity(64 << 10, &mut file),
                        &mut encoder,
                    )?;
                    let root = encoder.finalize()?;
                    let mut out = encoder
                        .into_inner()
                        .0
                        .into_inner()
                        .map_err(|e| e.into_error())?;
                    // (Readers of the tree start where the file's cursor is.)
                    out.seek(SeekFrom::Start(0))?;
                    Ok::<_, std::io::Error>((root, out))
                })();
                let (root, out) = match made {
                    Ok(made) => made,
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(io_at(&tmp)(e));
                    }
                };
                if root.as_bytes() != hash.as_bytes() {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(Error::HashMismatch {
                        expected: *hash,
                        actual: Hash(*root.as_bytes()),
                    });
                }
                // Not fsynced: a tree lost in a crash is made again.
                std::fs::rename(&tmp, &path).map_err(io_at(&path))?;
                file.seek(SeekFrom::Start(0))
                    .map_err(io_at(&self.path(hash)))?;
                out
            }
            Err(e) => return Err(io_at(&path)(e)),
        };
        Ok((file, outboard, size))
    }

    /// Removes the blob; `false` if it was not here.
    pub fn remove(&self, hash: &Hash) -> Result<bool> {
        let path = self.path(hash);
        let mut u = self.usage();
        let size = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_at(&path)(e)),
        };
        let _ = std::fs::remove_file(self.outboard_path(hash));
        std::fs::remove_file(&path).map_err(io_at(&path))?;
        u.count = u.count.saturating_sub(1);
        u.bytes = u.bytes.saturating_sub(size);
        u.trees = u.trees.saturating_sub(tree_size(size));
        Ok(true)
    }

    /// Marks the blob as used now (its age restarts), so [`Self::remove_unreferenced`]
    /// keeps it; its size, or [`Error::NotFound`]. Call it before writing a reference to it.
    pub fn pin(&self, hash: &Hash) -> Result<u64> {
        let _removal = self.removal.lock().unwrap_or_else(|p| p.into_inner());
        let (file, size) = self.open_blob(hash)?;
        file.set_modified(SystemTime::now())
            .map_err(io_at(&self.path(hash)))?;
        Ok(size)
    }

    /// Removes every blob that `keep` does not keep and that was stored or pinned before
    /// `older_than`; the hashes removed. The age is read again just before each removal,
    /// under the same lock as [`Self::pin`], so a blob pinned meanwhile stays. Partial
    /// transfers of files `keep` does not keep, untouched since `older_than`, go too (they
    /// are not blobs, so they are not in the answer).
    pub fn remove_unreferenced(
        &self,
        keep: &dyn Fn(&Hash) -> bool,
        older_than: SystemTime,
    ) -> Result<Vec<Hash>> {
        let partials = self.root.join(PARTIAL_DIR);
        if let Ok(entries) = std::fs::read_dir(&partials) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(hash) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".partial"))
                    .and_then(|h| h.parse::<Hash>().ok())
                else {
                    continue;
                };
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < older_than);
                if old && !keep(&hash) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let mut removed = Vec::new();
        for blob in self.list()? {
            if keep(&blob.hash) || blob.modified >= older_than {
                continue;
            }
            let _removal = self.removal.lock().unwrap_or_else(|p| p.into_inner());
            let path = self.path(&blob.hash);
            let modified = match std::fs::metadata(&path) {
                Ok(m) => m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                Err(_) => continue,
            };
            if modified < older_than && self.remove(&blob.hash)? {
                removed.push(blob.hash);
            }
        }
        Ok(removed)
    }
}

/// Writes one blob: hashes the bytes as they come, checks the limits, and stores the blob
/// under its hash on [`Self::finish`]. Dropped unfinished, it leaves nothing behind.
#[derive(Debug)]
pub struct BlobWriter<'a> {
    store: &'a BlobStore,
    file: Option<File>,
    tmp: PathBuf,
    hasher: blake3::Hasher,
    written: u64,
    /// A resumable transfer: dropped unfinished, its bytes stay for the next try.
    keep: bool,
    /// Flushes the file in the background while it is written (see [`FLUSH_EVERY`]).
    flusher: Flusher,
}

/// Bytes a writer lets pile up unflushed before it flushes them in the background: a large
/// file then never leaves hundreds of MB for its final flush, which would stall every other
/// fsync on the disk for as long (the node's entity commits among them).
const FLUSH_EVERY: u64 = 8 << 20;
/// Unflushed bytes at which the writer waits for the flush under way (the disk is slower
/// than the bytes arrive).
const FLUSH_BEHIND: u64 = 4 * FLUSH_EVERY;

/// A writer's background flushes, one at a time.
#[derive(Debug, Default)]
struct Flusher {
    unflushed: u64,
    running: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Flusher {
    /// Counts `n` bytes written to `file`; starts a flush of it when enough are unflushed,
    /// and waits for the one under way when too many are.
    fn wrote(&mut self, file: &File, n: u64) -> std::io::Result<()> {
        self.unflushed += n;
        if self.unflushed < FLUSH_EVERY {
            return Ok(());
        }
        if self.running.as_ref().is_some_and(|r| !r.is_finished()) && self.unflushed < FLUSH_BEHIND
        {
            return Ok(());
        }
        self.wait()?;
        let file = file.try_clone()?;
        self.unflushed = 0;
        self.running = Some(
            std::thread::Builder::new()
                .name("blob-flush".into())
                .spawn(move || file.sync_data())?,
        );
        Ok(())
    }

    /// Waits for the flush under way; its error, if it failed (the bytes it covered may
    /// not be on disk, so the blob must not be stored).
    fn wait(&mut self) -> std::io::Result<()> {
        match self.running.take().map(|r| r.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(std::io::Error::other("a background flush panicked")),
        }
    }
}

impl BlobWriter<'_> {
    /// Appends bytes. Over the size limit or the quota, it fails (the writer is then only
    /// good for dropping).
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let config = &self.store.config;
        let n = bytes.len() as u64;
        if self.written + n > config.max_blob_bytes {
            self.file = None;
            return Err(Error::TooLarge {
                limit: config.max_blob_bytes,
            });
        }
        {
            let mut u = self.store.usage();
            // The blob's tree will need room too (counted once the blob is stored).
            let total = self.written + n;
            if u.used() + n + tree_size(total) > config.quota_bytes {
                let used = u.stored();
                drop(u);
                self.file = None;
                return Err(Error::QuotaExceeded {
                    quota: config.quota_bytes,
                    used,
                    needed: total + tree_size(total),
                });
            }
            u.reserved += n;
        }
        // Counted before the write: a failed write still holds its reservation until drop.
        self.written += n;
        let Some(file) = self.file.as_mut() else {
            return Err(Error::Io {
                path: self.tmp.clone(),
                source: std::io::Error::other("this write failed earlier; start a new one"),
            });
        };
        std::io::Write::write_all(file, bytes).map_err(io_at(&self.tmp))?;
        self.flusher.wrote(file, n).map_err(io_at(&self.tmp))?;
        self.hasher.update(bytes);
        Ok(())
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Stores the blob: flushed to disk, then renamed to its hash, then the directory
    /// flushed. Bytes already stored are kept once (`existed`).
    pub fn finish(self) -> Result<Stored> {
        self.finish_checked(None)
    }

    /// Like [`Self::finish`], but only if the bytes hash to `expected`; otherwise nothing
    /// is stored and it fails with [`Error::HashMismatch`].
    pub fn finish_expecting(self, expected: &Hash) -> Result<Stored> {
        self.finish_checked(Some(expected))
    }

    fn finish_checked(mut self, expected: Option<&Hash>) -> Result<Stored> {
        let Some(file) = self.file.take() else {
            return Err(Error::Io {
                path: self.tmp.clone(),
                source: std::io::Error::other("this write failed earlier; start a new one"),
            });
        };
        self.flusher.wait().map_err(io_at(&self.tmp))?;
        file.sync_all().map_err(io_at(&self.tmp))?;
        drop(file);
        let hash = Hash(*self.hasher.finalize().as_bytes());
        if let Some(expected) = expected {
            if *expected != hash {
                // Wrong bytes are never resumed from.
                let _ = std::fs::remove_file(&self.tmp);
                return Err(Error::HashMismatch {
                    expected: *expected,
                    actual: hash,
                });
            }
        }
        let store = self.store;
        let target = store.path(&hash);
        let shard = target.parent().unwrap_or(&store.root).to_owned();
        let size = self.written;
        // Stored already: kept once, and its age restarts as for a new blob (pinned first,
        // so a collection running now cannot remove it under the answer).
        let existed = store.pin(&hash).is_ok();
        // Under the usage lock: two writers of the same bytes count them once.
        let mut u = store.usage();
        u.reserved = u.reserved.saturating_sub(size);
        // (Released above: Drop must not release it again.)
        self.written = 0;
        if existed || target.is_file() {
            drop(u);
            let _ = std::fs::remove_file(&self.tmp);
            return Ok(Stored {
                hash,
                size,
                existed: true,
            });
        }
        if !shard.is_dir() {
            std::fs::create_dir_all(&shard).map_err(io_at(&shard))?;
            sync_dir(&store.root)?;
        }
        std::fs::rename(&self.tmp, &target).map_err(io_at(&target))?;
        // The rename is durable only once the directory holding the name is.
        sync_dir(&shard)?;
        u.count += 1;
        u.bytes += size;
        u.trees += tree_size(size);
        Ok(Stored {
            hash,
            size,
            existed: false,
        })
    }
}

impl std::io::Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        BlobWriter::write(self, buf).map_err(std::io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        if self.written > 0 {
            let mut u = self.store.usage();
            u.reserved = u.reserved.saturating_sub(self.written);
        }
        self.file = None;
        // Gone already after a finish (renamed or removed); a resumable transfer keeps
        // its bytes for the next try.
        if !self.keep {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    // Directories can be opened and flushed on Unix; elsewhere the rename stands as is.
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests;
