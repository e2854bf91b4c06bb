//! fieldsync: one node's replica — the core's entities and rules on a durable store, with
//! the node's identity and the clock.
//!
//! # Typical workflow
//! ```no_run
//! # fn main() -> Result<(), fieldsync::Error> {
//! use fieldsync::Replica;
//! let schema = r#"[collections.tasks.fields]
//! status = { rule = "rank", order = ["open", "in_progress", "completed"] }"#;
//! let hq = Replica::init_authority("hq-data".as_ref(), schema, "hq")?;
//! let invite = hq.invite();
//! let device = Replica::init_join("device-data".as_ref(), &invite, "ana")?;
//! let id = device.put("tasks", None, r#"{"status": "open", "title": "Fit boiler"}"#)?;
//! let bundle = device.export_bundle(None, &mut |_, _| {})?;
//! hq.import_bundle(&bundle.bytes, &mut |_, _| {})?;
//! assert_eq!(hq.get("tasks", id)?["status"], "open");
//! # Ok(()) }
//! ```

mod attachments;
mod backup;
mod cache;
mod error;
mod members;
mod purge;
mod replica;
mod schemas;
pub mod sync_host;
mod transfer;

pub use attachments::{BlobStatus, HeldBlobs, BLOBS_DIR};
pub use cache::MemoryOptions;
pub use error::{Error, ErrorKind};
/// The node's content-addressed file store (its own crate).
pub use fieldsync_blobs as blobs;
pub use fieldsync_core as core;
pub use fieldsync_core::{
    Applied, Conflict, ConflictId, EntityId, HistoryEntry, OpId, PeerId, Proposal, ProposalId, View,
};
pub use fieldsync_store::{generate_key_file, KeyKind, Secret, MAX_KEY_FILE_BYTES};
/// The sans-IO sync engine (its own crate); [`sync_host`] runs its storage tasks here.
pub use fieldsync_sync as sync;
pub use members::{MemberInfo, Membership, PendingInvite};
pub use replica::{Clock, FeedChange, Replica, Status, SystemClock};
pub use schemas::{RecomputeProgress, SchemaDiff, SchemaInfo, SchemaPushed};
pub use transfer::{ExportedBundle, ImportSummary};
