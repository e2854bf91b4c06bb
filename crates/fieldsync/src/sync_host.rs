//! What the sync engine ([`fieldsync_sync`]) asks of storage, done on a [`Replica`]: the
//! engine hands out [`Task`]s and a driver runs them here, on whatever thread it likes, and
//! hands the [`Outcome`] back. Also what the engine starts from ([`local_state`]) and the
//! member list updates it needs ([`Watch`]).

use std::sync::Arc;

use automerge::ChangeHash;
use fieldsync_core::membership::Grant;
use fieldsync_core::protocol::{OfferEntry, Payload, WantEntry};
use fieldsync_core::EntityId;
use fieldsync_sync::{Input, Local, Now, Outcome, Task};

use crate::replica::{Replica, META_CHECKPOINT_IN, META_CHECKPOINT_OUT};
use crate::transfer::ImportSummary;
use crate::Error;

/// What the engine of `replica` starts from.
pub fn local_state(replica: &Replica) -> Result<Local, Error> {
    Ok(Local {
        peer: replica.peer_id(),
        members: replica.member_list()?,
        credential: replica.credential()?,
        feed_seq: replica.feed_seq(),
    })
}

/// The time for the engine: `mono` from the driver's monotonic clock, wall time from the
/// replica's clock (virtual in the simulator).
pub fn now(replica: &Replica, mono: std::time::Duration) -> Now {
    Now {
        mono,
        wall_ms: replica.now_ms(),
    }
}

/// Notices what changed on the replica outside the engine — the feed head (local writes
/// by the app, imports), the member list (revocations, bindings, a new schema) — so the
/// engine hears of it even where a driver did not say.
#[derive(Debug)]
pub struct Watch {
    members_seen: u64,
    feed_seen: u64,
}

impl Watch {
    pub fn new(replica: &Replica) -> Self {
        Watch {
            members_seen: replica.members_version(),
            feed_seen: replica.feed_seq(),
        }
    }

    /// The inputs that bring the engine up to date with the replica, if it changed since
    /// last asked.
    pub fn poll(&mut self, replica: &Replica) -> Result<Vec<Input>, Error> {
        let mut inputs = Vec::new();
        let feed_seq = replica.feed_seq();
        if feed_seq > self.feed_seen {
            self.feed_seen = feed_seq;
            inputs.push(Input::LocalChange { feed_seq });
        }
        let version = replica.members_version();
        if version != self.members_seen {
            self.members_seen = version;
            inputs.push(Input::Members {
                members: replica.member_list()?,
                credential: replica.credential()?,
            });
        }
        Ok(inputs)
    }
}

fn seq_meta(replica: &Replica, key: &str) -> Result<u64, Error> {
    Ok(replica
        .store
        .meta(key)?
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

/// Whether an error is this node's storage failing (rather than bad received data).
fn is_local_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Store(_) | Error::File { .. } | Error::CorruptMeta(_)
    )
}

/// Runs one task of the engine against `replica`.
pub fn run_task(replica: &Replica, task: Task) -> Outcome {
    match run(replica, task) {
        Ok(outcome) => outcome,
        Err(e) if is_local_failure(&e) => Outcome::Failed(e.to_string()),
        Err(e) => Outcome::Rejected(e.to_string()),
    }
}

fn run(replica: &Replica, task: Task) -> Result<Outcome, Error> {
    Ok(match task {
        Task::ReadCheckpoint { peer } => {
            Outcome::Checkpoint(seq_meta(replica, &format!("{META_CHECKPOINT_IN}{peer}"))?)
        }
        Task::ReadFeed {
            after,
            limit,
            grant,
        } => read_feed(replica, after, limit, &grant)?,
        Task::ReadPriority {
            after,
            limit,
            grant,
        } => read_priority(replica, after, limit, &grant)?,
        Task::ReadHeads { ids } => {
            // Purged entities answer with empty heads, so they are never fetched (only
            // looked up when this node holds purge records at all).
            let purges = replica.holds_purges()?;
            let heads = ids
                .iter()
                .map(|id| match replica.store.record(id.as_bytes())? {
                    Some(r) => Ok(Some(r.heads)),
                    None if purges && replica.is_purged(*id)? => Ok(Some(vec![])),
                    None => Ok(None),
                })
                .collect::<Result<_, Error>>()?;
            Outcome::Heads(heads)
        }
        Task::LoadPayloads { wants, grant } => {
            let (mut payloads, mut skipped, mut refused) = (Vec::new(), Vec::new(), 0);
            for want in wants {
                match payload(replica, &want, &grant)? {
                    Loaded::Payload(p) => payloads.push(p),
                    Loaded::Absent => skipped.push(want.id),
                    Loaded::Invisible => {
                        tracing::warn!(entity = %want.id, user = %grant.user, "a peer asked for an entity outside its partitions");
                        refused += 1;
                        skipped.push(want.id);
                    }
                }
            }
            Outcome::Payloads {
                payloads,
                skipped,
                refused,
            }
        }
        Task::Verify { payloads } => Outcome::Verified(verify(replica, payloads)),
        Task::Apply {
            peer,
            items,
            checkpoint,
            grant,
        } => {
            let meta = checkpoint
                .map(|c| {
                    (
                        format!("{META_CHECKPOINT_IN}{peer}"),
                        Some(c.to_be_bytes().to_vec()),
                    )
                })
                .into_iter()
                .collect::<Vec<_>>();
            let mut summary = ImportSummary::default();
            if !items.is_empty() || !meta.is_empty() {
                replica.merge_incoming(items, meta, &grant, &mut summary)?;
            }
            Outcome::Applied {
                feed_seq: replica.feed_seq(),
                refused: summary.refused,
            }
        }
        Task::SaveAcked { peer, upto } => {
            // A resume hint: it need not wait for the flush.
            replica.store.commit(
                vec![],
                vec![(
                    format!("{META_CHECKPOINT_OUT}{peer}"),
                    Some(upto.to_be_bytes().to_vec()),
                )],
            )?;
            Outcome::Done
        }
        Task::BindInvite { peer, record } => {
            replica.bind_invite(&peer, &record)?;
            Outcome::Done
        }
        Task::NoteSeen { peer, name } => {
            replica.note_seen(&peer, name.as_deref())?;
            Outcome::Done
        }
        Task::NoteAdmittedBy { peer } => {
            replica.note_admitted_by(&peer)?;
            Outcome::Done
        }
        Task::NoteRefusedBy {
            peer,
            state,
            reason,
        } => {
            replica.note_refused_by(&peer, state, &reason)?;
            Outcome::Done
        }
    })
}

/// Checks received payloads; large batches are checked on the rayon pool.
fn verify(
    replica: &Replica,
    payloads: Vec<Payload>,
) -> Result<Vec<fieldsync_sync::Incoming>, String> {
    use rayon::prelude::*;
    let ws = replica.workspace();
    let brings = fieldsync_sync::brings_schema(&payloads);
    payloads
        .into_par_iter()
        .map(|p| fieldsync_sync::check_payload(p, &ws.schema, brings))
        .collect()
}

fn read_feed(replica: &Replica, after: u64, limit: usize, grant: &Grant) -> Result<Outcome, Error> {
    let last = replica.store.last_seq();
    let feed = replica.store.feed_since(after, limit)?;
    let upto = feed.last().map(|(s, _)| *s).unwrap_or(last).max(after);
    let mut entries = Vec::with_capacity(feed.len());
    for (_, key) in feed {
        let id = EntityId::from_bytes(key);
        let Some(record) = replica.store.record(&key)? else {
            continue;
        };
        // Only what the peer's member may see is offered.
        if replica.visible(grant, &record.collection, id)? {
            entries.push(OfferEntry {
                id,
                heads: record.heads,
            });
        }
    }
    Ok(Outcome::Feed { upto, entries })
}

/// Feed entries scanned per read while looking for priority entities, and at most in all
/// (a bound on what a (re)connect costs before its first page: priority entities further
/// along the feed come in feed order).
const PRIORITY_SCAN: usize = 4096;
const PRIORITY_SCAN_MAX: u64 = 32 * 1024;

fn read_priority(
    replica: &Replica,
    after: u64,
    limit: usize,
    grant: &Grant,
) -> Result<Outcome, Error> {
    let ws = replica.workspace();
    let priority = |c: &str| ws.schema.collection(c).map_or(0, |c| c.priority);
    // The best `limit` by (priority desc, seq asc): memory stays bounded by `limit`
    // however much of the feed is scanned.
    let mut best: std::collections::BTreeMap<(std::cmp::Reverse<u8>, u64), OfferEntry> =
        Default::default();
    let mut cursor = after;
    loop {
        let feed = replica.store.feed_since(cursor, PRIORITY_SCAN)?;
        let Some(&(last, _)) = feed.last() else { break };
        for (seq, key) in feed {
            let Some(record) = replica.store.record(&key)? else {
                continue;
            };
            let p = priority(&record.collection);
            if p == 0 {
                continue;
            }
            let id = EntityId::from_bytes(key);
            if best.len() >= limit
                && best
                    .keys()
                    .next_back()
                    .is_some_and(|w| *w < (std::cmp::Reverse(p), seq))
            {
                continue;
            }
            if replica.visible(grant, &record.collection, id)? {
                best.insert(
                    (std::cmp::Reverse(p), seq),
                    OfferEntry {
                        id,
                        heads: record.heads,
                    },
                );
                if best.len() > limit {
                    best.pop_last();
                }
            }
        }
        cursor = last;
        if cursor - after >= PRIORITY_SCAN_MAX {
            break;
        }
    }
    Ok(Outcome::Priority(
        best.into_iter().map(|((_, seq), e)| (seq, e)).collect(),
    ))
}

enum Loaded {
    Payload(Payload),
    Absent,
    Invisible,
}

/// The data for one want: stored snapshot and chunks as they are when the peer lacks the
/// entity, else the changes after the peer's heads.
fn payload(replica: &Replica, want: &WantEntry, grant: &Grant) -> Result<Loaded, Error> {
    let key = want.id.as_bytes();
    let Some(record) = replica.store.record(key)? else {
        return Ok(Loaded::Absent);
    };
    if !replica.visible(grant, &record.collection, want.id)? {
        return Ok(Loaded::Invisible); // never offered to this peer, or no longer visible to it
    }
    let chunks = if want.have.is_empty() {
        let Some(doc) = replica.store.load_doc(key)? else {
            return Ok(Loaded::Absent);
        };
        std::iter::once(doc.snapshot).chain(doc.chunks).collect()
    } else {
        let _guard = replica.lock(want.id);
        let Some(mut entity) = replica.load(want.id)? else {
            return Ok(Loaded::Absent);
        };
        let have: Vec<ChangeHash> = want.have.iter().map(|h| ChangeHash(*h)).collect();
        let changes = entity.changes_after(&have);
        replica.cache(entity);
        vec![changes]
    };
    Ok(Loaded::Payload(Payload {
        id: want.id,
        collection: record.collection,
        full: want.have.is_empty(),
        chunks: chunks.into_iter().map(serde_bytes::ByteBuf::from).collect(),
    }))
}

/// An engine whose storage tasks run inline, on the caller's thread, right after each
/// input: for drivers with nothing to overlap (tools, frame-level tests). Frames and events
/// stay queued for the caller.
#[derive(Debug)]
pub struct Inline {
    pub engine: fieldsync_sync::Engine,
    replica: Arc<Replica>,
    watch: Watch,
    mono: std::time::Duration,
}

impl Inline {
    pub fn new(replica: Arc<Replica>, config: fieldsync_sync::Config) -> Result<Self, Error> {
        let config = if config.name.is_empty() {
            config.with_name(replica.name())
        } else {
            config
        };
        let engine = fieldsync_sync::Engine::new(config, local_state(&replica)?);
        Ok(Inline {
            engine,
            watch: Watch::new(&replica),
            replica,
            mono: std::time::Duration::ZERO,
        })
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Moves this driver's monotonic clock on (timers fire on the next input or tick).
    pub fn advance(&mut self, by: std::time::Duration) {
        self.mono += by;
    }

    /// Handles `input`, then every task it (and what follows) asks for. A storage failure
    /// is an error.
    pub fn handle(&mut self, input: Input) -> Result<(), Error> {
        for change in self.watch.poll(&self.replica)? {
            self.engine.handle(now(&self.replica, self.mono), change);
        }
        self.engine.handle(now(&self.replica, self.mono), input);
        loop {
            for change in self.watch.poll(&self.replica)? {
                self.engine.handle(now(&self.replica, self.mono), change);
            }
            let Some((id, task)) = self.engine.poll_io() else {
                return Ok(());
            };
            let outcome = run_task(&self.replica, task);
            if let Outcome::Failed(reason) = &outcome {
                return Err(Error::SyncStorage(reason.clone()));
            }
            self.engine
                .handle(now(&self.replica, self.mono), Input::IoDone(id, outcome));
        }
    }

    /// Tells the engine that something was written locally.
    pub fn local_change(&mut self) -> Result<(), Error> {
        let feed_seq = self.replica.feed_seq();
        self.handle(Input::LocalChange { feed_seq })
    }

    pub fn poll_transmit(&mut self) -> Option<(fieldsync_core::PeerId, Vec<u8>)> {
        self.engine.poll_transmit()
    }

    pub fn poll_event(&mut self) -> Option<fieldsync_sync::Event> {
        self.engine.poll_event()
    }
}
