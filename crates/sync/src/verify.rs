//! Checking received documents before anything is applied: limits, collection, and that
//! whole documents load. Pure CPU work; the driver runs it where it likes (the native
//! driver on its worker pool, in parallel).

use fieldsync_core::protocol::Payload;
use fieldsync_core::schema_version::SCHEMAS;
use fieldsync_core::{Entity, EntityId, Schema};

/// Largest entity document (all its chunks) accepted in one payload.
pub const MAX_ENTITY_BYTES: usize = 8 << 20;
/// Most chunks in one entity's payload.
pub const MAX_CHUNKS_PER_ENTITY: usize = 1024;

/// A received entity, checked: a whole document (`entity` loaded from `chunks`), or change
/// chunks for an entity the receiver has.
#[derive(Debug)]
pub enum Incoming {
    Whole {
        entity: Box<Entity>,
        collection: String,
        chunks: Vec<Vec<u8>>,
    },
    Changes {
        id: EntityId,
        collection: String,
        chunks: Vec<Vec<u8>>,
    },
}

impl Incoming {
    pub fn collection(&self) -> &str {
        match self {
            Incoming::Whole { collection, .. } | Incoming::Changes { collection, .. } => collection,
        }
    }

    pub fn id(&self) -> EntityId {
        match self {
            Incoming::Whole { entity, .. } => entity.id(),
            Incoming::Changes { id, .. } => *id,
        }
    }
}

/// Whether a batch carries a schema version: then it may carry entities of collections
/// that version adds (the receiver adopts the version before it reads them).
pub fn brings_schema(payloads: &[Payload]) -> bool {
    payloads.iter().any(|p| p.collection == SCHEMAS)
}

/// Checks one payload against the limits and `schema`; the reason it is refused otherwise.
pub fn check_payload(p: Payload, schema: &Schema, brings_schema: bool) -> Result<Incoming, String> {
    if !brings_schema && schema.collection(&p.collection).is_err() {
        return Err(format!(
            "entity {} is in unknown collection {:?}",
            p.id, p.collection
        ));
    }
    let bytes: usize = p.chunks.iter().map(|c| c.len()).sum();
    if bytes > MAX_ENTITY_BYTES || p.chunks.len() > MAX_CHUNKS_PER_ENTITY {
        return Err(format!(
            "entity {} came as {} chunks of {bytes} bytes, over the limits ({MAX_CHUNKS_PER_ENTITY} chunks, {MAX_ENTITY_BYTES} bytes)",
            p.id,
            p.chunks.len()
        ));
    }
    let chunks: Vec<Vec<u8>> = p.chunks.into_iter().map(|c| c.into_vec()).collect();
    if !p.full {
        return Ok(Incoming::Changes {
            id: p.id,
            collection: p.collection,
            chunks,
        });
    }
    let (first, rest) = chunks
        .split_first()
        .ok_or_else(|| format!("entity {} came with no data", p.id))?;
    let entity = Entity::load(p.id, first, rest).map_err(|e| format!("entity {}: {e}", p.id))?;
    if entity.collection().as_deref() != Some(p.collection.as_str()) {
        return Err(format!(
            "entity {} claims collection {:?} but holds {:?}",
            p.id,
            p.collection,
            entity.collection()
        ));
    }
    Ok(Incoming::Whole {
        entity: Box::new(entity),
        collection: p.collection,
        chunks,
    })
}

/// [`check_payload`] for a whole batch, in order, on this thread.
pub fn check_payloads(payloads: Vec<Payload>, schema: &Schema) -> Result<Vec<Incoming>, String> {
    let brings = brings_schema(&payloads);
    payloads
        .into_iter()
        .map(|p| check_payload(p, schema, brings))
        .collect()
}
