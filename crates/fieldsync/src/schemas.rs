//! Schema versions on a replica: publishing one (authority), adopting the newest on
//! arrival, and recomputing views under it. The records and the change table are in
//! [`fieldsync_core::schema_version`].
//!
//! Adoption: 1. read every valid signed record of `_schemas`; 2. if the newest is newer
//! than the schema in use, swap it in; 3. recompute every entity's view, conflicts and
//! proposals under it, in pages; 4. **only then note the version the stored views follow**
//! (`views_schema`), so a crash mid-way recomputes again on the next open.

use fieldsync_core::schema_version::{schema_entity_id, Evolution, SchemaRecord, MAX_SCHEMA_BYTES, RECORD, SCHEMAS};
use fieldsync_core::{EntityId, Patch, Schema, Workspace};
use serde::Serialize;

use crate::replica::{to_json_bytes, Replica};
use crate::Error;

/// The schema version the stored views were computed under (absent: the first one).
const META_VIEWS_SCHEMA: &str = "views_schema";
/// Entities recomputed per commit while adopting a schema.
const RECOMPUTE_PAGE: usize = 256;

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
        return Err(fieldsync_core::Error::Schema(format!("{} bytes is over the {MAX_SCHEMA_BYTES}-byte limit", text.len())).into());
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
        Ok(self.store.meta(META_VIEWS_SCHEMA)?.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(1))
    }

    /// Every valid signed schema record held here, by version.
    fn schema_records(&self) -> Result<Vec<(SchemaRecord, Schema)>, Error> {
        let ws = self.ws();
        let mut out = Vec::new();
        self.list(SCHEMAS, &[], true, &mut |view| {
            let record = view.get(RECORD).and_then(|v| serde_json::from_value::<SchemaRecord>(v.clone()).ok());
            let id = view.get("_id").and_then(|v| v.as_str()).and_then(|s| s.parse::<EntityId>().ok());
            if let (Some(r), Some(id)) = (record, id) {
                match r.schema(ws.id, id) {
                    Ok(schema) => out.push((r, schema)),
                    Err(e) => tracing::warn!(version = r.version, "ignoring a signed schema record: {e}"),
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
        let mut out = vec![SchemaInfo { version: base.version(), current: base.version() == current, schema: base.source().to_owned(), published_ms: None }];
        for (r, _) in self.schema_records()?.into_iter().filter(|(r, _)| r.version > base.version()) {
            out.push(SchemaInfo { version: r.version, current: r.version == current, schema: r.schema, published_ms: Some(r.published_ms) });
        }
        Ok(out)
    }

    /// Schema `version` (the one in use when `None`).
    pub fn schema_info(&self, version: Option<u64>) -> Result<SchemaInfo, Error> {
        let want = version.unwrap_or_else(|| self.schema_version());
        self.schema_versions()?
            .into_iter()
            .find(|i| i.version == want)
            .ok_or_else(|| fieldsync_core::Error::NotFound(format!("schema version {want} (this node holds versions up to {})", self.schema_version())).into())
    }

    /// What publishing `text` would change, and whether it is allowed.
    pub fn diff_schema(&self, text: &str) -> Result<SchemaDiff, Error> {
        let ws = self.ws();
        let next = parse_text(text)?;
        let evolution = ws.schema.evolve(&next);
        Ok(SchemaDiff { from_version: ws.schema.version(), to_version: ws.schema.version() + 1, allowed: evolution.allowed(), evolution })
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
            return Err(fieldsync_core::Error::Schema(format!("nothing changes from version {}; edit the schema first", diff.from_version)).into());
        }
        let ws = self.ws();
        let record = SchemaRecord { version: diff.to_version, schema: text.to_owned(), published_ms: self.now_ms() };
        let value = serde_json::to_value(&record).map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let coll = ws.schema.collection(SCHEMAS)?;
        let patch = Patch::from_json(coll, &serde_json::json!({ RECORD: value }))?;
        self.put_patch(SCHEMAS, Some(schema_entity_id(ws.id, record.version)), &patch)?;
        let recomputed = self.adopt_newest_schema()?.unwrap_or(0);
        tracing::info!(version = record.version, recomputed, "published a schema version");
        Ok(SchemaPushed { version: record.version, evolution: diff.evolution, recomputed })
    }

    /// The schema this node started from (init, or the invite it joined with).
    fn base_schema(&self) -> Result<Schema, Error> {
        let bytes = self.store.meta(crate::replica::META_WORKSPACE)?.ok_or_else(|| Error::CorruptMeta("workspace is missing".into()))?;
        Ok(fieldsync_core::workspace::Invite::decode(&bytes)?.schema)
    }

    /// Adopts the newest valid schema version held here if it is newer than the one in use,
    /// and brings stored views up to the version in use. The number of entities recomputed,
    /// if any were. Called after every commit that may have brought a schema record, and
    /// on open. Never while holding an entity lock.
    pub(crate) fn adopt_newest_schema(&self) -> Result<Option<usize>, Error> {
        let _adopting = self.adopting.lock().unwrap_or_else(|p| p.into_inner());
        let ws = self.ws();
        if let Some((record, schema)) = self.schema_records()?.pop().filter(|(r, _)| r.version > ws.schema.version()) {
            tracing::info!(from = ws.schema.version(), to = record.version, "adopting a new schema version");
            self.set_ws(Workspace { id: ws.id, schema, authority: ws.authority.clone() });
        }
        let version = self.schema_version();
        if self.views_schema_version()? == version {
            return Ok(None);
        }
        let n = self.recompute_views()?;
        self.commit_durable(vec![], vec![(META_VIEWS_SCHEMA.to_owned(), Some(version.to_be_bytes().to_vec()))])?;
        tracing::info!(version, entities = n, "views follow the new schema version");
        Ok(Some(n))
    }

    /// Derives every stored entity's view, conflicts and proposals again under the schema
    /// in use, a page of entities per commit.
    fn recompute_views(&self) -> Result<usize, Error> {
        let collections: Vec<String> = self.store.counts()?.into_iter().map(|(c, _)| c).filter(|c| !c.starts_with('_')).collect();
        let mut done = 0;
        for collection in collections {
            let mut after: Option<[u8; 16]> = None;
            loop {
                let page = self.store.views(&collection, after.as_ref(), RECOMPUTE_PAGE)?;
                let Some((last, _)) = page.last() else { break };
                after = Some(*last);
                let ids: Vec<EntityId> = page.iter().map(|(id, _)| EntityId::from_bytes(*id)).collect();
                let _guards = self.lock_many(ids.iter().copied());
                let mut writes = Vec::with_capacity(ids.len());
                let mut entities = Vec::with_capacity(ids.len());
                for (id, (_, old_view)) in ids.into_iter().zip(page) {
                    let Some(mut entity) = self.load(id)? else { continue };
                    let derived = entity.derive(&self.ws())?;
                    // Unchanged views (and indexes, which follow the same rules) stay as they are.
                    if to_json_bytes(&derived.view) == old_view && derived.conflicts.is_empty() && derived.proposals.is_empty() {
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
                tracing::info!(collection = %collection, recomputed = done, "recomputing views under the new schema");
            }
        }
        Ok(done)
    }
}
