//! The storage work the engine asks of its driver, and what comes back. Every task has an
//! id; its result returns as [`crate::Input::IoDone`] with that id. Tasks may finish in any
//! order and run in parallel; the engine orders what must be ordered (a session's applies
//! run one at a time, in order).

use fieldsync_core::membership::{Grant, MemberRecord, MembershipState, Refusal};
use fieldsync_core::protocol::{Head, OfferEntry, Payload, WantEntry};
use fieldsync_core::{EntityId, PeerId};

use crate::verify::Incoming;

/// Names one task, so its result can find it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(pub u64);

/// Storage work for the driver.
#[derive(Debug)]
pub enum Task {
    /// How far this node has applied `peer`'s feed (0 if never): [`Outcome::Checkpoint`].
    ReadCheckpoint { peer: PeerId },
    /// The local changes feed after seq `after`, at most `limit` entries, keeping the
    /// entities a member with `grant` may see, each with its current heads:
    /// [`Outcome::Feed`] (`upto`: the last seq read, or the feed head when none).
    ReadFeed {
        after: u64,
        limit: usize,
        grant: Grant,
    },
    /// Read-ahead for the collections the schema gives a `priority`: entities of those
    /// collections in the feed after seq `after` that a member with `grant` may see, at most
    /// `limit`, highest priority first, then in feed order: [`Outcome::Priority`].
    ReadPriority {
        after: u64,
        limit: usize,
        grant: Grant,
    },
    /// The local heads of these entities (absent: `None`; purged here, so never to be
    /// fetched again: empty heads): [`Outcome::Heads`], in order.
    ReadHeads { ids: Vec<EntityId> },
    /// What to send for these wants, for a member with `grant`: whole stored documents
    /// where the want has no heads, else the changes after them. Entities that are absent
    /// or that `grant` may not see are skipped: [`Outcome::Payloads`].
    LoadPayloads { wants: Vec<WantEntry>, grant: Grant },
    /// Check received payloads against the limits and the schema, and load whole
    /// documents ([`crate::check_payloads`] does it): [`Outcome::Verified`].
    Verify { payloads: Vec<Payload> },
    /// Merge checked entities from `peer` (whose member has `grant`) and, in the same
    /// durable commit, set `peer`'s checkpoint to `checkpoint` if given:
    /// [`Outcome::Applied`]. The engine acknowledges only after this completed.
    Apply {
        peer: PeerId,
        items: Vec<Incoming>,
        checkpoint: Option<u64>,
        grant: Grant,
    },
    /// Remember that `peer` has applied this node's feed up to `upto` (a resume hint).
    SaveAcked { peer: PeerId, upto: u64 },
    /// Authority: bind an invite by writing the member record of the device that presented
    /// it, durably, before the device is admitted: [`Outcome::Done`].
    BindInvite { peer: PeerId, record: MemberRecord },
    /// Remember when this node last had a session with `peer` (and the name it gave).
    NoteSeen { peer: PeerId, name: Option<String> },
    /// `peer` admitted this node: a refusal it gave before no longer holds.
    NoteAdmittedBy { peer: PeerId },
    /// `peer` refused this node's membership, and why (kept for `status`).
    NoteRefusedBy {
        peer: PeerId,
        state: MembershipState,
        reason: String,
    },
}

/// What a task produced.
#[derive(Debug)]
pub enum Outcome {
    Checkpoint(u64),
    Feed {
        upto: u64,
        entries: Vec<OfferEntry>,
    },
    /// Priority read-ahead: entries with the feed seq each was read at.
    Priority(Vec<(u64, OfferEntry)>),
    Heads(Vec<Option<Vec<Head>>>),
    /// `refused`: how many of the skipped ones the grant may not see (a peer asking for
    /// what was never offered to it).
    Payloads {
        payloads: Vec<Payload>,
        skipped: Vec<EntityId>,
        refused: u64,
    },
    Verified(Result<Vec<Incoming>, String>),
    /// The merge is durable; the local feed head after it, and the entities refused by the
    /// write check (not applied).
    Applied {
        feed_seq: u64,
        refused: Vec<Refusal>,
    },
    /// Notes and bindings: done.
    Done,
    /// The received data cannot be applied (it contradicts what is stored): the sender's
    /// fault, so its session ends.
    Rejected(String),
    /// Local storage failed. The engine ends the session and reports
    /// [`crate::Event::StorageFailed`]; the driver decides what the node does.
    Failed(String),
}
