//! The replica's document cache: recently used entities, bounded by an estimate of the
//! bytes they hold in memory (not by count: one long-lived document can weigh as much as a
//! thousand fresh ones).

use fieldsync_core::{Entity, EntityId};

/// Least recently used entities up to `capacity` estimated bytes.
pub(crate) struct DocCache {
    lru: lru::LruCache<EntityId, (Entity, usize)>,
    bytes: usize,
    capacity: usize,
}

impl DocCache {
    pub(crate) fn new(capacity: usize) -> Self {
        // No entry-count limit: `put` evicts by estimated bytes, which bounds the cache.
        DocCache {
            lru: lru::LruCache::unbounded(),
            bytes: 0,
            capacity,
        }
    }

    /// Takes an entity out (the caller puts it back with [`Self::put`] when done).
    pub(crate) fn pop(&mut self, id: &EntityId) -> Option<Entity> {
        let (entity, size) = self.lru.pop(id)?;
        self.bytes -= size;
        Some(entity)
    }

    /// Keeps `entity`, evicting the least recently used ones over capacity. An entity larger
    /// than the whole capacity is not kept. Returns what left the cache, for the caller to
    /// drop after releasing the lock (dropping an Automerge document takes microseconds).
    #[must_use]
    pub(crate) fn put(&mut self, id: EntityId, entity: Entity) -> Vec<Entity> {
        let size = entity.memory_estimate();
        if size > self.capacity {
            return self.pop(&id).into_iter().chain([entity]).collect();
        }
        let mut out = Vec::new();
        if let Some((_, (old, old_size))) = self.lru.push(id, (entity, size)) {
            self.bytes -= old_size;
            out.push(old);
        }
        self.bytes += size;
        while self.bytes > self.capacity {
            match self.lru.pop_lru() {
                Some((_, (e, s))) => {
                    self.bytes -= s;
                    out.push(e);
                }
                None => break,
            }
        }
        out
    }

    /// (entities, estimated bytes) held.
    pub(crate) fn usage(&self) -> (usize, usize) {
        (self.lru.len(), self.bytes)
    }
}

/// Memory settings of a replica: what its caches may hold. Everything else is loaded on
/// demand from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Documents kept in memory after use, in estimated bytes.
    pub doc_cache_bytes: usize,
    /// The store's page cache (sled's `cache_capacity`), in bytes.
    pub store_cache_bytes: u64,
}

impl MemoryOptions {
    /// The defaults: 32 MiB of documents, 32 MiB of store cache.
    pub const DEFAULT: MemoryOptions = MemoryOptions {
        doc_cache_bytes: 32 << 20,
        store_cache_bytes: 32 << 20,
    };

    /// Both caches from MiB figures (`--cache-mb`, `--store-cache-mb`).
    pub fn from_mib(doc_cache_mib: u64, store_cache_mib: u64) -> Self {
        MemoryOptions {
            doc_cache_bytes: (doc_cache_mib << 20) as usize,
            store_cache_bytes: store_cache_mib << 20,
        }
    }
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}
