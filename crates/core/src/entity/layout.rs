//! Where things live in an entity's document, and the creation change.
//!
//! Root map:
//! - declared and undeclared fields are root keys named like the field;
//! - `_collection`: the collection name, written in the creation change;
//! - `_deleted`: the tombstone register (see `Entity::is_deleted`);
//! - `_auth`: map field → map seq → signed `Confirmation` JSON (authority fields);
//! - `_prop`: map proposal id → `ProposalRecord` JSON (pending proposals);
//! - `_ops`: map operation id → fingerprint of the write it named (idempotent writes);
//! - `_inc`: map counter field → map operation id → delta (increments with an op id);
//! - `_created`: map peer id → time, one key per node that created the entity;
//! - `_resolved`: map conflict id → the alternatives and how a person resolved them;
//! - `_mig.<migration id>`: the migration's kind, written by its deterministic change
//!   (see `migrate`); the writers of these keys are the migration actors.
//!
//! **The creation change is a pure function of (workspace, entity id, collection, initial
//! content)**: its actor is a hash of those, its time 0, it has no dependencies. Two nodes
//! that create the same entity with the same content make the identical Automerge change,
//! so the creations merge as one (a counter created at 25 stays 25). Different content
//! makes different actors: a real concurrent edit that merges by the rules. What depends
//! on the writer (proposals, signatures, `_created`) goes in a second change by the
//! writer's own actor.

use std::collections::HashMap;

use automerge::{
    hydrate, ActorId, AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, TextEncoding, Value, ROOT,
};
use serde_json::{json, Value as Json};
use sha2::Digest;

use crate::ids::{EntityId, WorkspaceId};
use crate::patch::{FieldOp, Patch};
use crate::rules;
use crate::schema::{Collection, OnDelete, Rule};

pub(crate) const K_COLLECTION: &str = "_collection";
pub(crate) const K_DELETED: &str = "_deleted";
pub(crate) const K_AUTH: &str = "_auth";
pub(crate) const K_PROP: &str = "_prop";
pub(crate) const K_OPS: &str = "_ops";
pub(crate) const K_INC: &str = "_inc";
pub(crate) const K_CREATED: &str = "_created";
pub(crate) const K_RESOLVED: &str = "_resolved";

/// The patch as canonical JSON (field order is the patch's, which is sorted).
pub(crate) fn canonical(patch: &Patch) -> Json {
    let ops: Vec<Json> = patch
        .ops
        .iter()
        .map(|(f, op)| match op {
            FieldOp::Set(v) => json!([f, "set", v]),
            FieldOp::Remove => json!([f, "remove"]),
            FieldOp::Inc(n) => json!([f, "inc", n]),
            FieldOp::Add(v) => json!([f, "add", v]),
            FieldOp::RemoveElems(v) => json!([f, "remove_elems", v]),
        })
        .collect();
    Json::Array(ops)
}

/// What an operation id records: a hash of the write it named, so reusing an op id for a
/// different write is refused instead of silently skipped.
pub(crate) fn fingerprint(collection: &str, kind: &str, content: &Json) -> String {
    let mut h = sha2::Sha256::new();
    h.update(collection.as_bytes());
    h.update([0]);
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(content.to_string().as_bytes());
    hex::encode(&h.finalize()[..12])
}

/// The actor of a creation change: a hash of everything the change holds.
pub(crate) fn creation_actor(
    ws: WorkspaceId,
    id: EntityId,
    collection: &str,
    patch: &Patch,
) -> ActorId {
    let mut h = sha2::Sha256::new();
    h.update(b"fieldsync/create/v1\0");
    h.update(ws.as_bytes());
    h.update(id.as_bytes());
    h.update(collection.as_bytes());
    h.update([0]);
    h.update(canonical(patch).to_string().as_bytes());
    ActorId::from(&h.finalize()[..16])
}

/// The root of a new entity: `_collection`, the bookkeeping maps, the containers rules
/// make at creation, and the patch's non-authority fields. Built as one value so Automerge
/// inserts it in a single batch (it sorts the keys, so the change is deterministic).
pub(crate) fn initial_root(
    coll: &Collection,
    collection: &str,
    patch: &Patch,
    encoding: TextEncoding,
) -> hydrate::Map {
    let empty_map = || hydrate::Value::Map(HashMap::<String, hydrate::Value>::new().into());
    let mut root: HashMap<String, hydrate::Value> = HashMap::new();
    root.insert(
        K_COLLECTION.into(),
        ScalarValue::Str(collection.into()).into(),
    );
    root.insert(K_OPS.into(), empty_map());
    root.insert(K_CREATED.into(), empty_map());
    if coll.fields.values().any(|f| f.rule == Rule::Counter) {
        root.insert(K_INC.into(), empty_map());
    }
    if coll.fields.values().any(|f| f.rule == Rule::Authority) {
        root.insert(K_AUTH.into(), empty_map());
        root.insert(K_PROP.into(), empty_map());
    }
    if coll.on_delete == OnDelete::UpdateWins {
        root.insert(K_DELETED.into(), ScalarValue::Int(1).into());
    }
    let ops: HashMap<&str, &FieldOp> = patch.ops.iter().map(|(f, op)| (f.as_str(), op)).collect();
    for (name, spec) in &coll.fields {
        if spec.rule == Rule::Authority {
            continue;
        }
        let op = ops.get(name.as_str()).copied();
        if let Some(value) = rules::of(&spec.rule).initial(op, encoding) {
            root.insert(name.clone(), value);
        }
    }
    // Undeclared fields are lww registers.
    for (field, op) in &patch.ops {
        if !coll.fields.contains_key(field) {
            if let Some(value) = rules::of(coll.rule(field)).initial(Some(op), encoding) {
                root.insert(field.clone(), value);
            }
        }
    }
    root.into()
}

/// The collection named in the creation change.
pub(crate) fn read_collection(doc: &AutoCommit) -> Option<String> {
    crate::entity::json::scalar_str(doc, &ROOT, K_COLLECTION)
}

/// Every concurrent map object stored at `obj.key` (one, unless replicas made it at once).
pub(crate) fn map_objects(doc: &AutoCommit, obj: &ObjId, key: &str) -> Vec<ObjId> {
    doc.get_all(obj, key)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(v, id)| matches!(v, Value::Object(ObjType::Map)).then_some(id))
        .collect()
}

/// An integer one above every integer concurrently stored at `obj.key`: a put Automerge
/// will not drop as unchanged.
pub(crate) fn next_marker(doc: &AutoCommit, obj: &ObjId, key: &str) -> i64 {
    let highest = doc
        .get_all(obj, key)
        .unwrap_or_default()
        .iter()
        .filter_map(|(v, _)| match v {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Int(i) => Some(*i),
                _ => None,
            },
            _ => None,
        })
        .max()
        .unwrap_or(0);
    highest.saturating_add(1)
}
