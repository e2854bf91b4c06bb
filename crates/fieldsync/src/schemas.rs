//! Schema versions on a replica: publishing one (authority), adopting the newest on
//! arrival, and recomputing views under it. The records and the change table are in
//! [`fieldsync_core::schema_version`].
//!
//! Adoption: 1. read every valid signed record of `_schemas`; 2. if the newest is newer
//! than the schema in use, swap it in; 3. recompute every entity's view, conflicts and
//! proposals under it, in pages; 4. **only then note the version the stored views follow**
//! (`views_schema`), so a crash mid-way recomputes again on the next open.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};

use fieldsync_core::schema_version::{
    schema_entity_id, Evolution, SchemaRecord, MAX_SCHEMA_BYTES, RECORD, SCHEMAS,
};
use fieldsync_core::{EntityId, Patch, Schema, Workspace};
use serde::Serialize;

use crate::replica::{to_json_bytes, Replica};
use crate::Error;

/// The schema version the stored views were computed under (absent: the first one).
const META_VIEWS_SCHEMA: &str = "views_schema";
/// Entities recomputed per commit while adopting a schema.
const RECOMPUTE_PAGE: usize = 256;

/// How far stored views are recomputed under a newly adopted version (`status`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RecomputeProgress {
    /// The version the views are being brought to.
    pub version: u64,
    /// Entities looked at so far.
    pub done: usize,
    /// Entities stored when the recomputation began.
    pub total: usize,
    /// Collections finished.
    #[serde(skip)]
    finished: BTreeSet<String>,
    /// The collection under way and the last entity id done in it.
    #[serde(skip)]
    current: Option<(String, [u8; 16])>,
}

/// Wakes the background recompute thread.
#[derive(Debug, Default)]
pub(crate) struct Worker {
    /// (work pending, disabled)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Worker {
    /// Hands work to the thread; false if there is no thread.
    fn wake(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.1 {
            return false;
        }
        s.0 = true;
        self.cv.notify_one();
        true
    }

    fn disable(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
    }

    /// Waits for work, at most `timeout` (so the thread notices the replica is gone).
    fn wait(&self, timeout: std::time::Duration) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (mut s, _) = self
            .cv
            .wait_timeout_while(s, timeout, |s| !s.0)
            .unwrap_or_else(|p| p.into_inner());
        s.0 = false;
    }
}

/// One schema version this node holds (`schema show`).
#[derive(Debug, Clone, Serialize)]
pub struct SchemaInfo {
    pub version: u64,
    /// Whether this is the version in use here.
    pub current: bool,
    /// The TOML text.
    pub schema: String,
    /// When the authority published it (absent for the version given at `init`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_ms: Option<i64>,
}

/// What `schema push` did.
#[derive(Debug, Clone, Serialize)]
pub struct SchemaPushed {
    pub version: u64,
    pub evolution: Evolution,
    /// Entities whose views were recomputed here.
    pub recomputed: usize,
}

/// What `schema diff` reports: the changes and whether they may be published.
#[derive(Debug, Clone, Serialize)]
pub struct SchemaDiff {
    pub from_version: u64,
    pub to_version: u64,
    pub allowed: bool,
    #[serde(flatten)]
    pub evolution: Evolution,
}

fn parse_text(text: &str) -> Result<Schema, Error> {
    if text.len() > MAX_SCHEMA_BYTES {
        return Err(fieldsync_core::Error::Schema(format!(
            "{} bytes is over the {MAX_SCHEMA_BYTES}-byte limit",
            text.len()
        ))
        .into());
    }
    Ok(Schema::from_toml(text)?)
}

impl Replica {
    /// The version of the schema in use here.
    pub fn schema_version(&self) -> u64 {
        self.ws().schema.version()
    }

    /// The version the stored views follow (equal to [`Self::schema_version`] except while
    /// a recomputation runs or after a crash cut one short).
    pub fn views_schema_version(&self) -> Result<u64, Error> {
        Ok(self
            .store
            .meta(META_VIEWS_SCHEMA)?
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .unwrap_or(1))
    }

    /// Every valid signed schema record held here, by version.
    fn schema_records(&self) -> Result<Vec<(SchemaRecord, Schema)>, Error> {
        let ws = self.ws();
        let mut out = Vec::new();
        self.list(SCHEMAS, &[], true, &mut |view| {
            let record = view
                .get(RECORD)
                .and_then(|v| serde_json::from_value::<SchemaRecord>(v.clone()).ok());
            let id = view
                .get("_id")
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse::<EntityId>().ok());
            if let (Some(r), Some(id)) = (record, id) {
                match r.schema(ws.id, id) {
                    Ok(schema) => out.push((r, schema)),
                    Err(e) => {
                        tracing::warn!(version = r.version, "ignoring a signed schema record: {e}")
                    }
                }
            }
            true
        })?;
        out.sort_by_key(|(r, _)| r.version);
        Ok(out)
    }

    /// The schema versions held here: the one this node started from and every later one.
    pub fn schema_versions(&self) -> Result<Vec<SchemaInfo>, Error> {
        let current = self.schema_version();
        let base = self.base_schema()?;
        let mut out = vec![SchemaInfo {
            version: base.version(),
            current: base.version() == current,
            schema: base.source().to_owned(),
            published_ms: None,
        }];
        for (r, _) in self
            .schema_records()?
            .into_iter()
            .filter(|(r, _)| r.version > base.version())
        {
            out.push(SchemaInfo {
                version: r.version,
                current: r.version == current,
                schema: r.schema,
                published_ms: Some(r.published_ms),
            });
        }
        Ok(out)
    }

    /// Schema `version` (the one in use when `None`).
    pub fn schema_info(&self, version: Option<u64>) -> Result<SchemaInfo, Error> {
        let want = version.unwrap_or_else(|| self.schema_version());
        self.schema_versions()?
            .into_iter()
            .find(|i| i.version == want)
            .ok_or_else(|| {
                fieldsync_core::Error::NotFound(format!(
                    "schema version {want} (this node holds versions up to {})",
                    self.schema_version()
                ))
                .into()
            })
    }

    /// What publishing `text` would change, and whether it is allowed.
    pub fn diff_schema(&self, text: &str) -> Result<SchemaDiff, Error> {
        let ws = self.ws();
        let next = parse_text(text)?;
        let evolution = ws.schema.evolve(&next);
        Ok(SchemaDiff {
            from_version: ws.schema.version(),
            to_version: ws.schema.version() + 1,
            allowed: evolution.allowed(),
            evolution,
        })
    }

    /// Publishes `text` as the next schema version (authority only): checked against the
    /// change table, signed, stored in `_schemas` (so it syncs) and adopted here.
    pub fn push_schema(&self, text: &str) -> Result<SchemaPushed, Error> {
        if !self.authority {
            return Err(Error::AuthorityOnly("publish schema versions"));
        }
        let diff = self.diff_schema(text)?;
        if !diff.allowed {
            return Err(Error::SchemaRefused(diff.evolution.refusals().join("; ")));
        }
        if diff.evolution.changes.is_empty() {
            return Err(fieldsync_core::Error::Schema(format!(
                "nothing changes from version {}; edit the schema first",
                diff.from_version
            ))
            .into());
        }
        let ws = self.ws();
        let record = SchemaRecord {
            version: diff.to_version,
            schema: text.to_owned(),
            published_ms: self.now_ms(),
        };
        let value = serde_json::to_value(&record).map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let coll = ws.schema.collection(SCHEMAS)?;
        let patch = Patch::from_json(coll, &serde_json::json!({ RECORD: value }))?;
        self.put_patch(
            SCHEMAS,
            Some(schema_entity_id(ws.id, record.version)),
            &patch,
        )?;
        let recomputed = self.adopt_newest_schema()?.unwrap_or(0);
        // (0 while a background recomputation runs: `status` shows its progress.)
        tracing::info!(
            version = record.version,
            recomputed,
            "published a schema version"
        );
        Ok(SchemaPushed {
            version: record.version,
            evolution: diff.evolution,
            recomputed,
        })
    }

    /// The schema this node started from (init, or the invite it joined with).
    fn base_schema(&self) -> Result<Schema, Error> {
        let bytes = self
            .store
            .meta(crate::replica::META_WORKSPACE)?
            .ok_or_else(|| Error::CorruptMeta("workspace is missing".into()))?;
        Ok(fieldsync_core::workspace::Invite::decode(&bytes)?.schema)
    }

    /// Adopts the newest valid schema version held here if it is newer than the one in use,
    /// and brings stored views up to the version in use. The number of entities recomputed,
    /// if any were. Called after every commit that may have brought a schema record, and
    /// on open. Never while holding an entity lock. With a background worker running
    /// ([`Replica::start_background_recompute`]) the recomputation is handed to it.
    pub(crate) fn adopt_newest_schema(&self) -> Result<Option<usize>, Error> {
        {
            let _adopting = self.adopting.lock().unwrap_or_else(|p| p.into_inner());
            let ws = self.ws();
            if let Some((record, schema)) = self
                .schema_records()?
                .pop()
                .filter(|(r, _)| r.version > ws.schema.version())
            {
                tracing::info!(
                    from = ws.schema.version(),
                    to = record.version,
                    "adopting a new schema version"
                );
                // Until the views are recomputed, reads derive not-yet-recomputed entities.
                self.set_progress(Some(RecomputeProgress {
                    version: record.version,
                    ..Default::default()
                }));
                self.set_ws(Workspace {
                    id: ws.id,
                    schema,
                    authority: ws.authority.clone(),
                });
            }
        }
        if self.views_schema_version()? == self.schema_version() {
            self.set_progress(None);
            return Ok(None);
        }
        if self.background.get().is_some_and(|b| b.wake()) {
            return Ok(None);
        }
        self.bring_views_up_to_date()
    }

    /// Recomputes views until they follow the schema in use (the worker's step).
    fn bring_views_up_to_date(&self) -> Result<Option<usize>, Error> {
        // Not `adopting`: a newer version may be adopted while this runs (it runs again).
        let _recomputing = self.recomputing.lock().unwrap_or_else(|p| p.into_inner());
        let version = self.schema_version();
        let from = self.views_schema_version()?;
        if from == version {
            self.set_progress(None);
            return Ok(None);
        }
        let total = self
            .store
            .counts()?
            .into_iter()
            .filter(|(c, _)| !c.starts_with('_'))
            .map(|(_, n)| n as usize)
            .sum();
        self.set_progress(Some(RecomputeProgress {
            version,
            total,
            ..Default::default()
        }));
        // Collections whose partitions changed: every entity is stored again, which offers
        // it again to peers (who may now see it).
        let before = self.schema_of(from)?;
        let ws = self.ws();
        let repartitioned: BTreeSet<String> = ws
            .schema
            .collections
            .iter()
            .filter(|(c, new)| {
                before
                    .as_ref()
                    .and_then(|b| b.collections.get(*c))
                    .is_some_and(|old| old.owner != new.owner || old.access != new.access)
            })
            .map(|(c, _)| c.clone())
            .collect();
        let n = self.recompute_views(&repartitioned)?;
        self.commit_durable(
            vec![],
            vec![(
                META_VIEWS_SCHEMA.to_owned(),
                Some(version.to_be_bytes().to_vec()),
            )],
        )?;
        let _adopting = self.adopting.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.schema_version();
        // A newer version adopted meanwhile keeps reads deriving until its own pass.
        self.set_progress((now != version).then(|| RecomputeProgress {
            version: now,
            ..Default::default()
        }));
        tracing::info!(version, entities = n, "views follow the new schema version");
        Ok(Some(n))
    }

    /// The schema of `version`, if held.
    fn schema_of(&self, version: u64) -> Result<Option<Schema>, Error> {
        let base = self.base_schema()?;
        if base.version() == version {
            return Ok(Some(base));
        }
        Ok(self
            .schema_records()?
            .into_iter()
            .find(|(r, _)| r.version == version)
            .map(|(_, s)| s))
    }

    fn set_progress(&self, p: Option<RecomputeProgress>) {
        *self.recompute.lock().unwrap_or_else(|p| p.into_inner()) = p;
        self.recompute_gen
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// How far the views are recomputed under a new version (`None`: they follow it).
    pub fn recompute_progress(&self) -> Option<RecomputeProgress> {
        self.recompute
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the stored view of `id` (in `collection`) may predate the schema in use.
    /// Whether a recomputation of views is under way (views may change under a reader).
    pub(crate) fn recomputing(&self) -> bool {
        self.recompute
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    pub(crate) fn view_is_stale(&self, collection: &str, id: &[u8; 16]) -> bool {
        // Built-in collections keep their rules across versions (and are not recomputed).
        if collection.starts_with('_') {
            return false;
        }
        match &*self.recompute.lock().unwrap_or_else(|p| p.into_inner()) {
            None => false,
            Some(p) => {
                !(p.finished.contains(collection)
                    || p.current
                        .as_ref()
                        .is_some_and(|(c, last)| c == collection && id <= last))
            }
        }
    }

    /// The view of `id` derived now from its document under the schema in use, with its
    /// pending migrations applied in memory only (the recomputation stores them).
    pub(crate) fn fresh_view(&self, id: EntityId) -> Result<Option<fieldsync_core::View>, Error> {
        let Some(doc) = self.store.load_doc(id.as_bytes())? else {
            return Ok(None);
        };
        let mut entity = fieldsync_core::Entity::load_stored(id, &doc.snapshot, &doc.chunks)?;
        let ws = self.ws();
        entity.migrate(&ws)?;
        Ok(Some(entity.view(&ws)?))
    }

    /// Runs view recomputation on a thread of its own from now on, so adopting a version
    /// returns at once; reads stay correct meanwhile (see [`Self::view_is_stale`]). The
    /// thread ends when the replica is dropped.
    pub fn start_background_recompute(self: &Arc<Self>) {
        let worker = Arc::new(Worker::default());
        if self.background.set(worker.clone()).is_err() {
            return;
        }
        let replica = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("schema-recompute".into())
            .spawn(move || loop {
                let Some(r) = replica.upgrade() else { return };
                if let Err(e) = r.bring_views_up_to_date() {
                    tracing::error!(
                        "recomputing views under the new schema failed (retrying): {e}"
                    );
                }
                drop(r);
                worker.wait(std::time::Duration::from_secs(1));
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the schema recompute thread ({e}); adopting versions recomputes in place");
            if let Some(w) = self.background.get() {
                w.disable();
            }
        }
    }

    /// Derives every stored entity's view, conflicts and proposals again under the schema
    /// in use, a page of entities per commit, applying pending migrations; entities of
    /// `rewrite` collections are stored again even if unchanged.
    fn recompute_views(&self, rewrite: &BTreeSet<String>) -> Result<usize, Error> {
        let collections: Vec<String> = self
            .store
            .counts()?
            .into_iter()
            .map(|(c, _)| c)
            .filter(|c| !c.starts_with('_'))
            .collect();
        let mut done = 0;
        let mut seen = 0;
        for collection in collections {
            let mut after: Option<[u8; 16]> = None;
            loop {
                let page = self
                    .store
                    .views(&collection, after.as_ref(), RECOMPUTE_PAGE)?;
                let Some((last, _)) = page.last() else { break };
                let last = *last;
                after = Some(last);
                seen += page.len();
                let ids: Vec<EntityId> = page
                    .iter()
                    .map(|(id, _)| EntityId::from_bytes(*id))
                    .collect();
                let _guards = self.lock_many(ids.iter().copied());
                let mut writes = Vec::with_capacity(ids.len());
                let mut entities = Vec::with_capacity(ids.len());
                for (id, (_, old_view)) in ids.into_iter().zip(page) {
                    let Some(mut entity) = self.load(id)? else {
                        continue;
                    };
                    let migrated = entity.migrate(&self.ws())?;
                    let derived = entity.derive(&self.ws())?;
                    // Unchanged views (and indexes, which follow the same rules) stay as they are.
                    if migrated == 0
                        && !rewrite.contains(&collection)
                        && to_json_bytes(&derived.view) == old_view
                        && derived.conflicts.is_empty()
                        && derived.proposals.is_empty()
                    {
                        entities.push(entity);
                        continue;
                    }
                    let snapshot = entity.save();
                    writes.push(self.entity_write_from(&mut entity, Some(snapshot))?);
                    entities.push(entity);
                }
                done += writes.len();
                self.commit_durable(writes, vec![])?;
                for e in entities {
                    self.cache(e);
                }
                if let Some(p) = self
                    .recompute
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                {
                    p.done = seen;
                    p.total = p.total.max(seen);
                    p.current = Some((collection.clone(), last));
                }
                self.recompute_gen
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                tracing::info!(collection = %collection, recomputed = done, seen, "recomputing views under the new schema");
            }
            if let Some(p) = self
                .recompute
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                p.finished.insert(collection.clone());
                p.current = None;
            }
            self.recompute_gen
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(done)
    }
}
