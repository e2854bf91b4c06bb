//! fieldsync-core: what an entity is and how it merges, with no IO and no clock.
//!
//! - [`schema`]: collections, fields and their merge [`schema::Rule`]s, parsed from TOML.
//! - [`patch`]: the JSON patch language, checked against the schema before any write.
//! - `rules`: what each merge rule means (patch operators, merged value, conflicts), one
//!   module per rule.
//! - [`attachment`]: the file references an `attachments` field holds.
//! - [`entity`]: one Automerge document per entity; the view, conflicts, proposals and
//!   history are pure functions of the document, so replicas with the same changes agree.
//! - [`authority`]: confirmed values signed by the workspace authority.
//! - [`bundle`]: the file format that carries documents between nodes with no network.
//! - [`schema_version`]: later schema versions, signed by the authority, and what may change.
//! - [`migration`]: data migrations a version declares, applied as deterministic changes.
//! - [`workspace`]: the workspace identity and the invite that carries it.
//! - [`membership`]: the signed member list, invite tokens and per-user partitions.
//! - [`protocol`]: the sync protocol's frames and their size-limited codec.
//! - [`purge`]: signed purge records (erasure) and the tombstones they leave.
//!
//! Time, randomness and storage come from the caller (see the `fieldsync` crate).

pub mod attachment;
pub mod authority;
pub mod bundle;
pub mod entity;
pub mod ids;
pub mod membership;
pub mod migration;
pub mod numeric;
pub mod patch;
pub mod protocol;
pub mod purge;
pub(crate) mod rules;
pub mod schema;
pub mod schema_version;
pub mod workspace;

pub use entity::{
    Applied, Conflict, ConflictState, Derived, Entity, FieldChange, HistoryEntry, Proposal,
    Resolution, View, Writer,
};
pub use ids::{ConflictId, EntityId, OpId, PeerId, ProposalId, Seq, WorkspaceId};
pub use patch::{FieldOp, Patch};
pub use schema::{Access, Collection, OnDelete, Rule, Schema};
pub use workspace::{Invite, Workspace};

/// Everything that can go wrong in the core. Expected outcomes of merging (conflicts,
/// proposals, forged values being ignored) are data, not errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The schema text is not valid.
    #[error("invalid schema: {0}")]
    Schema(String),
    /// A patch does not fit its collection's schema.
    #[error("invalid patch: {0}")]
    Patch(String),
    /// The named collection is not in the schema.
    #[error("unknown collection {name:?}; the schema has: {known}")]
    UnknownCollection { name: String, known: String },
    /// The entity is deleted and its collection does not let updates revive it.
    #[error("entity {0} is deleted")]
    Deleted(EntityId),
    /// A conflict or proposal that does not exist (or no longer does).
    #[error("not found: {0}")]
    NotFound(String),
    /// An operation id already named a different write.
    #[error(
        "operation id {0} was already used for a different write; use a new op id for a new write"
    )]
    OpReused(crate::ids::OpId),
    /// Only the workspace authority may do this.
    #[error(
        "only the workspace authority or a delegate can settle proposals; this node is neither"
    )]
    NotAuthority,
    /// A document could not be read or written.
    #[error("bad document: {0}")]
    Document(String),
    /// A bundle file is not valid.
    #[error("invalid bundle: {0}")]
    Bundle(String),
    /// An invite is not valid.
    #[error("invalid invite: {0}")]
    Invite(String),
    /// A sync frame is not valid.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    pub(crate) fn automerge(e: impl std::fmt::Display) -> Self {
        Error::Document(e.to_string())
    }
}
