//! Moving entities in and out in bulk: bundles (file-based sync between nodes) and JSON
//! Lines import/export.
//!
//! Bundle checkpoints work like CouchDB's: a node remembers, per peer, the peer's feed seq up
//! to which it has applied everything (`ckin`), and learns from the acks in the peer's
//! bundles how far the peer has applied its own feed (`ckout`), so `--since PEER` sends only
//! what changed after that.

use std::collections::BTreeMap;

use fieldsync_core::bundle::{Bundle, BundleEncoder, BundleEntity, BundleHeader, Limits};
use fieldsync_core::membership::{
    check_delegates, check_write, Facts, Grant, Refusal, RefusalKind,
};
use fieldsync_core::purge::PURGES;
use fieldsync_core::schema_version::SCHEMAS;
use fieldsync_core::{Entity, EntityId, Patch, PeerId};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value as Json;

use crate::replica::{Replica, META_CHECKPOINT_IN, META_CHECKPOINT_OUT};
use crate::Error;

/// Entities per store commit during bulk work.
const BATCH: usize = 512;

/// A chunk of a bulk import, built: writes of new entities, and lines naming stored ones.
type Built = (Vec<fieldsync_store::EntityWrite>, Vec<(EntityId, Patch)>);

/// A bundle ready to be written to a file.
#[derive(Debug)]
pub struct ExportedBundle {
    pub bytes: Vec<u8>,
    pub entities: usize,
    pub since: u64,
    pub upto: u64,
}

pub(crate) use fieldsync_sync::Incoming;

/// One item per entity: a repeated entity's chunks join its first occurrence (two writes
/// for one entity in a commit would each start from the same stored state).
fn dedupe(items: Vec<Incoming>) -> Result<Vec<Incoming>, Error> {
    let mut at: std::collections::HashMap<EntityId, usize> = std::collections::HashMap::new();
    let mut out: Vec<Incoming> = Vec::with_capacity(items.len());
    for item in items {
        match at.get(&item.id()) {
            Some(&i) => {
                let extra = match item {
                    Incoming::Whole { chunks, .. } | Incoming::Changes { chunks, .. } => chunks,
                };
                match &mut out[i] {
                    Incoming::Whole { entity, chunks, .. } => {
                        for c in &extra {
                            entity.merge_bytes(c)?;
                        }
                        chunks.extend(extra);
                    }
                    Incoming::Changes { chunks, .. } => chunks.extend(extra),
                }
            }
            None => {
                at.insert(item.id(), out.len());
                out.push(item);
            }
        }
    }
    Ok(out)
}

enum Merged {
    Created,
    Updated,
    Accepted(usize),
}

/// One entity's outcome in [`Replica::merge_incoming`].
enum Outcome {
    Unchanged,
    /// The entity was purged here: taken in never again.
    Purged,
    Refused(Refusal),
    /// The store write, the entity to keep cached (if any), and what happened.
    Written(Box<(fieldsync_store::EntityWrite, Option<Entity>, Merged)>),
}

/// What an import did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ImportSummary {
    pub entities: usize,
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub auto_accepted: usize,
    /// Entities left out because they were purged (erased) here.
    #[serde(skip_serializing_if = "is_zero")]
    pub purged: usize,
    /// Entities refused by the write check (forged authority values, outside the sender's
    /// partitions…), with the reason; none of their changes were applied.
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "refusal_reasons"
    )]
    pub refused: Vec<Refusal>,
}

fn refusal_reasons<S: serde::Serializer>(refused: &[Refusal], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        refused
            .iter()
            .map(|r| serde_json::json!({ "kind": r.kind.name(), "reason": r.reason })),
    )
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn seq_of(bytes: Option<Vec<u8>>) -> u64 {
    bytes
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}

impl Replica {
    /// Every entity changed since `peer` last acknowledged this node's feed (all of them if
    /// `peer` is unknown or `None`). For a `peer`, only what its member may see goes in (a
    /// peer that is not a member gets an error). `progress(done, total)` is called as it goes.
    pub fn export_bundle(
        &self,
        peer: Option<PeerId>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ExportedBundle, Error> {
        let audience = match &peer {
            None => None,
            Some(p) => match self.admit(p, None) {
                Ok(grant) => Some(grant),
                // A device holds only what its own user may see; a relay or the authority
                // holds everything and exports only for members it knows.
                Err(Error::Refused(_)) if self.revoked(p)?.is_none() && !self.holds_everything()? => None,
                Err(Error::Refused(why)) if self.revoked(p)?.is_none() => {
                    return Err(Error::Refused(format!(
                        "{why}; import a bundle from it first (its invite makes it a member), or export without --since"
                    )))
                }
                Err(e) => return Err(e),
            },
        };
        let since = match peer {
            Some(p) => seq_of(self.store.meta(&format!("{META_CHECKPOINT_OUT}{p}"))?),
            None => 0,
        };
        let upto = self.store.last_seq();
        let acks: BTreeMap<String, u64> = self
            .store
            .meta_prefix(META_CHECKPOINT_IN)?
            .into_iter()
            .map(|(k, v)| (k[META_CHECKPOINT_IN.len()..].to_owned(), seq_of(Some(v))))
            .collect();
        let header = BundleHeader {
            workspace: self.ws().id,
            from: self.peer.to_string(),
            since,
            upto,
            acks,
            credential: self.credential()?,
        };
        let mut enc = BundleEncoder::new(&header);
        let mut out = Vec::new();
        let mut after = since;
        let mut count = 0;
        let total = (upto - since.min(upto)) as usize;
        loop {
            let page = self.store.feed_since(after, BATCH)?;
            let page: Vec<_> = page.into_iter().filter(|(seq, _)| *seq <= upto).collect();
            let Some((last, _)) = page.last() else { break };
            after = *last;
            let mut docs = Vec::with_capacity(page.len());
            for (_, id) in &page {
                let visible = match (&audience, self.store.record(id)?) {
                    (_, None) => false,
                    (None, Some(_)) => true,
                    (Some(grant), Some(r)) => {
                        self.visible(grant, &r.collection, EntityId::from_bytes(*id))?
                    }
                };
                docs.push(if visible {
                    self.store.load_doc(id)?
                } else {
                    None
                });
            }
            let entities: Vec<BundleEntity> = page
                .par_iter()
                .zip(docs)
                .filter_map(|((_, id), doc)| doc.map(|d| (EntityId::from_bytes(*id), d)))
                .map(|(id, d)| {
                    let mut e = Entity::load_stored(id, &d.snapshot, &d.chunks)?;
                    Ok(BundleEntity {
                        id,
                        collection: e.collection().unwrap_or_default(),
                        doc: e.save(),
                    })
                })
                .collect::<Result<_, Error>>()?;
            for e in &entities {
                enc.push(e);
            }
            count += entities.len();
            out.extend(enc.take_written());
            progress(count.min(total), total);
        }
        out.extend(enc.finish(&self.key));
        Ok(ExportedBundle {
            bytes: out,
            entities: count,
            since,
            upto,
        })
    }

    /// Merges a bundle. A bundle that is not valid, or is from another workspace, is refused
    /// whole: every entity is checked before any is applied. Importing the same bundle again,
    /// or bundles in any order, gives the same result.
    pub fn import_bundle(
        &self,
        bytes: &[u8],
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<ImportSummary, Error> {
        let bundle = Bundle::decode(bytes, Limits::default())?;
        if bundle.header.workspace != self.ws().id {
            return Err(Error::ForeignWorkspace {
                theirs: bundle.header.workspace.to_string(),
                ours: self.ws().id.to_string(),
            });
        }
        let from: PeerId = bundle.header.from.parse().map_err(|_| {
            fieldsync_core::Error::Bundle(format!(
                "sender {:?} is not a peer id",
                bundle.header.from
            ))
        })?;
        // Writes are checked against the sender's membership, as over the network.
        let grant = self.admit(&from, bundle.header.credential.as_ref())?;
        // A bundle that carries a schema version may carry entities of collections it adds.
        let brings_schema = bundle.entities.iter().any(|e| e.collection == SCHEMAS);
        // Check everything first; nothing is applied from a bundle with one bad entity.
        let mut received: Vec<Incoming> = bundle
            .entities
            .into_par_iter()
            .map(|be| {
                let e = Entity::load_received(be.id, &be.doc)?;
                let collection = e.collection().unwrap_or_default();
                if collection != be.collection {
                    return Err(fieldsync_core::Error::Bundle(format!(
                        "entity {} claims collection {:?} but holds {collection:?}",
                        be.id, be.collection
                    )));
                }
                if !brings_schema {
                    self.ws().schema.collection(&collection)?;
                }
                Ok(Incoming::Whole {
                    entity: Box::new(e),
                    collection,
                    chunks: vec![be.doc],
                })
            })
            .collect::<Result<_, fieldsync_core::Error>>()?;
        // Schema versions first, so the batches after them are read under the newest.
        received.sort_by_key(|i| i.collection() != SCHEMAS);

        let mut summary = ImportSummary {
            entities: received.len(),
            ..Default::default()
        };
        let total = received.len();
        let mut done = 0;
        let mut received = received.into_iter();
        loop {
            let chunk: Vec<Incoming> = received.by_ref().take(BATCH).collect();
            if chunk.is_empty() {
                break;
            }
            done += chunk.len();
            self.merge_incoming(chunk, vec![], &grant, &mut summary)?;
            progress(done, total);
        }

        let mut meta = Vec::new();
        let in_key = format!("{META_CHECKPOINT_IN}{from}");
        // Advance only over a contiguous range: the bundle covers (since, upto].
        if seq_of(self.store.meta(&in_key)?) >= bundle.header.since {
            meta.push((in_key, Some(bundle.header.upto.to_be_bytes().to_vec())));
        }
        if let Some(ack) = bundle.header.acks.get(&self.peer.to_string()) {
            let out_key = format!("{META_CHECKPOINT_OUT}{from}");
            if *ack > seq_of(self.store.meta(&out_key)?) {
                meta.push((out_key, Some(ack.to_be_bytes().to_vec())));
            }
        }
        self.commit_durable(vec![], meta)?;
        Ok(summary)
    }

    /// Merges received documents into the store in one durable commit together with `meta`
    /// (e.g. a checkpoint); on the authority, then confirms proposals of `auto_accept`
    /// fields. Entities are merged in parallel; if any fails, nothing is written.
    ///
    /// Every entity passes the write check for the sender's `grant` first (forged or removed
    /// authority values, partitions): a refused one is left as it was and listed in
    /// `summary.refused`.
    pub(crate) fn merge_incoming(
        &self,
        items: Vec<Incoming>,
        meta: Vec<(String, Option<Vec<u8>>)>,
        grant: &Grant,
        summary: &mut ImportSummary,
    ) -> Result<(), Error> {
        // A schema version first: it is adopted before the rest is read, so entities of
        // collections it adds are known and derived under its rules. Then purges, so an
        // entity purged in the same batch is not taken in.
        let (schemas, rest): (Vec<Incoming>, Vec<Incoming>) =
            items.into_iter().partition(|i| i.collection() == SCHEMAS);
        let (purges, rest): (Vec<Incoming>, Vec<Incoming>) =
            rest.into_iter().partition(|i| i.collection() == PURGES);
        let mut groups: Vec<Vec<Incoming>> = [schemas, purges, rest]
            .into_iter()
            .filter(|g| !g.is_empty())
            .collect();
        let last = groups.pop().unwrap_or_default();
        for group in groups {
            self.merge_batch(group, vec![], grant, summary)?;
        }
        self.merge_batch(last, meta, grant, summary)
    }

    fn merge_batch(
        &self,
        items: Vec<Incoming>,
        meta: Vec<(String, Option<Vec<u8>>)>,
        grant: &Grant,
        summary: &mut ImportSummary,
    ) -> Result<(), Error> {
        let now = self.now_ms();
        let ws = self.ws();
        let items = dedupe(items)?;
        // Held until the commit, so no local write to these entities slips in between.
        let guards = self.lock_many(items.iter().map(Incoming::id));
        let results: Vec<Outcome> = items
            .into_par_iter()
            .map(|item| {
                let w = self.writer(now);
                let id = item.id();
                if item.collection() != PURGES && self.is_purged(id)? {
                    return Ok(Outcome::Purged);
                }
                if ws.schema.collection(item.collection()).is_err() {
                    let reason = format!(
                        "entity {id} is in collection {:?}, which schema version {} lacks",
                        item.collection(),
                        ws.schema.version()
                    );
                    return Ok(Outcome::Refused(Refusal {
                        kind: RefusalKind::UnknownCollection,
                        reason,
                    }));
                }
                let mut as_received = None;
                let mut before = None;
                let (mut entity, how) = match (self.load(id)?, item) {
                    (
                        None,
                        Incoming::Whole {
                            entity, mut chunks, ..
                        },
                    ) => {
                        // A lone compact document can be stored exactly as received.
                        if chunks.len() == 1 {
                            as_received = chunks.pop();
                        }
                        (*entity, Merged::Created)
                    }
                    (None, Incoming::Changes { .. }) => {
                        return Err(fieldsync_core::Error::Protocol(format!(
                            "changes for entity {id}, which this node does not have"
                        ))
                        .into())
                    }
                    (
                        Some(mut local),
                        Incoming::Whole {
                            chunks, collection, ..
                        }
                        | Incoming::Changes {
                            chunks, collection, ..
                        },
                    ) => {
                        if local.collection().as_deref() != Some(collection.as_str()) {
                            return Err(fieldsync_core::Error::Protocol(format!(
                                "entity {id} is in another collection here"
                            ))
                            .into());
                        }
                        let facts = Facts::of(&self.ws(), &local);
                        let mut changed = false;
                        for chunk in &chunks {
                            changed |= local.merge_bytes(chunk)?;
                        }
                        if !changed {
                            self.cache(local);
                            return Ok(Outcome::Unchanged);
                        }
                        before = Some(facts);
                        (local, Merged::Updated)
                    }
                };
                let collection = entity.collection().unwrap_or_default();
                let after = Facts::of(&self.ws(), &entity);
                let members = self.member_list()?;
                let checked = check_write(
                    &self.ws().schema,
                    grant,
                    id,
                    &collection,
                    before.as_ref(),
                    &after,
                )
                .and_then(|()| check_delegates(&members, id, &collection, before.as_ref(), &after));
                if let Err(refusal) = checked {
                    // The merged document is dropped; the stored one is untouched.
                    return Ok(Outcome::Refused(refusal));
                }
                // A purge counts only with a valid signed record.
                if collection == PURGES {
                    if let Err(reason) = self.purge_target(&entity) {
                        return Ok(Outcome::Refused(Refusal {
                            kind: RefusalKind::Forged,
                            reason: format!("entity {id} ({PURGES}): {reason}"),
                        }));
                    }
                }
                // A device does not take in what its own user may not see either.
                if let Err(Error::Refused(reason)) = self.check_own_write(before.as_ref(), &entity)
                {
                    return Ok(Outcome::Refused(Refusal {
                        kind: RefusalKind::Partition,
                        reason: format!("this node's user may not hold it: {reason}"),
                    }));
                }
                let mut accepted = 0;
                if w.authority_key.is_some() {
                    for pid in entity.auto_acceptable(&self.ws()) {
                        entity.accept(&self.ws(), &w, pid, "auto_accept")?;
                        accepted += 1;
                    }
                }
                let write =
                    self.entity_write_from(&mut entity, as_received.filter(|_| accepted == 0))?;
                // Entities that arrived whole (a first sync, a bundle) are not cached: they are
                // rarely written again soon, and caching thousands would only evict each other.
                // Dropping them here spreads that cost over the worker threads.
                let keep = !matches!(how, Merged::Created);
                Ok(Outcome::Written(Box::new((
                    write,
                    keep.then_some(entity),
                    if accepted > 0 {
                        Merged::Accepted(accepted)
                    } else {
                        how
                    },
                ))))
            })
            .collect::<Result<_, Error>>()?;
        let mut writes = Vec::with_capacity(results.len());
        let mut merged = Vec::with_capacity(results.len());
        for r in results {
            match r {
                Outcome::Unchanged => summary.unchanged += 1,
                Outcome::Purged => summary.purged += 1,
                Outcome::Refused(refusal) => summary.refused.push(refusal),
                Outcome::Written(written) => {
                    let (write, entity, how) = *written;
                    match how {
                        Merged::Created => summary.created += 1,
                        Merged::Updated => summary.updated += 1,
                        Merged::Accepted(n) => {
                            summary.updated += 1;
                            summary.auto_accepted += n;
                        }
                    }
                    writes.push(write);
                    merged.extend(entity);
                }
            }
        }
        let schema_arrived = writes
            .iter()
            .any(|w| w.collection == fieldsync_core::schema_version::SCHEMAS);
        // Checked above: every written purge entity holds a valid record.
        let purged: Vec<EntityId> = writes
            .iter()
            .filter(|w| w.collection == PURGES)
            .filter_map(|w| serde_json::from_slice::<Json>(&w.view).ok())
            .filter_map(|v| {
                v.get(fieldsync_core::purge::RECORD)
                    .and_then(|t| t.as_str())
                    .and_then(|t| fieldsync_core::purge::PurgeRecord::parse(t).ok())
            })
            .map(|r| r.entity)
            .collect();
        self.commit_durable(writes, meta)?;
        for entity in merged {
            self.cache(entity);
        }
        drop(guards);
        self.apply_purges(&purged)?;
        if schema_arrived {
            self.adopt_newest_schema()?;
        }
        Ok(())
    }

    /// Creates (or, for lines with an `_id` already stored, updates) one entity per line of
    /// JSON Lines text. Every line is checked before anything is written.
    pub fn bulk_import(
        &self,
        collection: &str,
        jsonl: &str,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<usize, Error> {
        let ws = self.ws();
        let coll = ws.schema.collection(collection)?;
        let lines: Vec<(usize, &str)> = jsonl
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, l))
            .collect();
        let parsed: Vec<(Option<EntityId>, Patch)> = lines
            .par_iter()
            .map(|(n, line)| {
                let bad = |message: String| Error::ImportLine { line: *n, message };
                let mut json: Json =
                    serde_json::from_str(line).map_err(|e| bad(format!("malformed JSON: {e}")))?;
                let id = match json.as_object_mut().and_then(|m| m.remove("_id")) {
                    None => None,
                    Some(Json::String(s)) => Some(
                        s.parse::<EntityId>()
                            .map_err(|e| bad(format!("_id: {e}")))?,
                    ),
                    Some(_) => return Err(bad("_id must be a UUID string".into())),
                };
                let patch = Patch::from_json(coll, &json).map_err(|e| bad(e.to_string()))?;
                Ok((id, patch))
            })
            .collect::<Result<_, Error>>()?;
        let mut seen = std::collections::HashMap::new();
        for ((n, _), (id, patch)) in lines.iter().zip(&parsed) {
            // A reference is imported only with its file already here.
            self.check_attachments(collection, *id, patch)
                .map_err(|e| Error::ImportLine {
                    line: *n,
                    message: e.to_string(),
                })?;
            if let Some(id) = id {
                if self.is_purged(*id)? {
                    return Err(Error::ImportLine {
                        line: *n,
                        message: format!("_id {id} was purged; it cannot be written again"),
                    });
                }
                if let Some(first) = seen.insert(*id, *n) {
                    return Err(Error::ImportLine {
                        line: *n,
                        message: format!("_id {id} repeats line {first}"),
                    });
                }
            }
        }
        let total = parsed.len();
        let mut done = 0;
        // New entities are built in parallel, a chunk at a time; while one chunk is
        // committed (serial work in the store), the next is built, so both cores stay busy.
        // Ids are unique across lines, so a chunk never needs what the one before it commits.
        let build = |chunk: &[(Option<EntityId>, Patch)]| -> Result<Built, Error> {
            let now = self.now_ms();
            let built = chunk
                .par_iter()
                .map(|(id, patch)| {
                    // Only a line's own `_id` can name a stored entity; a new id cannot.
                    let id = match id {
                        Some(id) if self.store.record(id.as_bytes())?.is_some() => {
                            return Ok(Err((*id, patch.clone())));
                        }
                        Some(id) => *id,
                        None => EntityId(self.new_id()),
                    };
                    let w = self.writer(now);
                    let mut e = Entity::create(&self.ws(), id, collection, &w, patch, &mut || {
                        self.new_proposal_id()
                    })?;
                    self.entity_write(&mut e).map(Ok)
                })
                .collect::<Result<Vec<_>, Error>>()?;
            let (fresh, existing): (Vec<_>, Vec<_>) = built.into_iter().partition(Result::is_ok);
            Ok((
                fresh.into_iter().filter_map(Result::ok).collect(),
                existing.into_iter().filter_map(Result::err).collect(),
            ))
        };
        let mut pending: Option<Built> = None;
        for chunk in parsed.chunks(BATCH).map(Some).chain([None]) {
            let (next, committed) = rayon::join(
                || chunk.map(build).transpose(),
                || match pending.take() {
                    Some((writes, existing)) => {
                        let n = writes.len() + existing.len();
                        self.store.commit(writes, vec![])?;
                        // Lines naming stored entities update them, one by one.
                        for (id, patch) in existing {
                            self.put_patch(collection, Some(id), &patch)?;
                        }
                        Ok::<usize, Error>(n)
                    }
                    None => Ok(0),
                },
            );
            let n = committed?;
            if n > 0 {
                done += n;
                progress(done, total);
            }
            pending = next?;
        }
        self.commit_durable(vec![], vec![])?;
        Ok(total)
    }
}
