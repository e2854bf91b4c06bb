//! The sync engine: a deterministic state machine per node that opens no socket, reads no
//! clock and spawns nothing. A driver (the simulator, later libp2p) feeds it [`Input`]s and
//! drains its outputs with [`Engine::poll_transmit`] and [`Engine::poll_event`].
//!
//! Storage goes through the node's [`Replica`] synchronously: received data is applied and
//! made durable inside `handle`, before the acknowledgement that covers it is queued.
//!
//! # The drive loop
//! 1. Call [`Engine::handle`] with the input (connection up/down, frame, local change, tick).
//! 2. **Drain [`Engine::poll_transmit`] and [`Engine::poll_event`] completely after every
//!    `handle`**: frames go to their peer in order; a [`Event::SessionFailed`] means the
//!    driver must close that connection.
//!
//! # Handshake: admission before information
//! A `Hello` carries only the sender's proof of membership. The side that dialed (driver:
//! [`Input::Dialed`]) or whose peer is the workspace authority sends it at once; the other
//! side ([`Input::Connected`]) waits for the peer's `Hello`, admits it, and only then sends
//! its own `Hello`. Each side sends its `Welcome` (workspace, role, limits, feed head,
//! checkpoint) only after admitting the peer. A refusal is a `Goodbye` with the reason and
//! nothing else, so a stranger learns nothing but that.
//!
//! # Conversation (per direction; both directions run at once)
//! `Hello`, `Welcome` both ways → the server offers pages of its changes feed after the client's
//! checkpoint (`Offer`: ids and heads) → the client answers what it lacks (`Want`) → the server
//! sends it (`Data`: whole documents for entities the client lacks, changes after the
//! client's heads otherwise) → the client applies a page durably, advances its checkpoint
//! over contiguous pages and sends `Ack`. At most `window` pages are in flight. After
//! catch-up the same loop carries live changes: a local change moves the feed head and the
//! server offers it. See docs/protocol.md.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use automerge::ChangeHash;
use fieldsync_core::protocol::{Frame, Head, Limits, OfferEntry, PageRange, Payload, Role, WantEntry, VERSION};
use fieldsync_core::membership::{Grant, MembershipState, RefusalKind};
use fieldsync_core::{Entity, EntityId, PeerId};

use crate::replica::{Replica, META_CHECKPOINT_IN, META_CHECKPOINT_OUT};
use crate::transfer::{ImportSummary, Incoming};
use crate::Error;

/// Frames received before the session is ready for them (the peer admitted, its
/// `Welcome` received) that are kept for after.
const MAX_EARLY_FRAMES: usize = 64;
/// Entities per session whose heads at the peer are remembered (to skip echoing them back).
const MAX_REMEMBERED_HEADS: usize = 250_000;
/// Largest entity document (all its chunks) accepted in one payload.
pub const MAX_ENTITY_BYTES: usize = 8 << 20;
/// Most chunks in one entity's payload.
pub const MAX_CHUNKS_PER_ENTITY: usize = 1024;

/// What the engine refused, for metrics. Shared with the driver, which adds what it
/// refuses itself (banned peers, frame floods).
#[derive(Debug, Default)]
pub struct SecurityStats {
    /// Sessions refused: strangers, revoked members, expired or reused invites.
    pub sessions_refused: AtomicU64,
    /// Sessions ended for breaking the protocol: malformed, oversized or out-of-order frames.
    pub protocol_violations: AtomicU64,
    /// Entities whose received changes were refused (any reason, forged ones included).
    pub writes_refused: AtomicU64,
    /// Of those: carrying authority values the authority did not sign, or removing some.
    pub forged_refused: AtomicU64,
    /// Entities a peer asked for but may not see.
    pub reads_refused: AtomicU64,
    /// Peers the driver disconnected and refuses for a while.
    pub peers_banned: AtomicU64,
    /// Sessions the driver ended for sending frames too fast.
    pub floods: AtomicU64,
    /// Replayed or duplicated frames (hellos, offers, data of completed pages), ignored.
    pub frames_ignored: AtomicU64,
    /// Circuit relay reservations and circuits refused to peers that are not admitted members.
    pub relay_refused: AtomicU64,
}

impl SecurityStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Engine settings.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub role: Role,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config { role: Role::Device, limits: Limits::default() }
    }
}

impl Config {
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// What happens to the engine.
#[derive(Debug)]
pub enum Input {
    /// A connection to `peer` is up (the transport authenticated the peer id) that the peer
    /// initiated: this node waits for the peer's proof before saying anything (unless the
    /// peer is the workspace authority).
    Connected(PeerId),
    /// A connection this node initiated to `peer` is up: this node proves itself first.
    Dialed(PeerId),
    /// The driver found `peer` breaking the protocol below the engine (an oversized frame,
    /// a flood, no `Hello` in time): the session ends with a `Goodbye` naming `reason`.
    Violation(PeerId, String),
    /// The connection to `peer` is gone.
    Disconnected(PeerId),
    /// A frame arrived from `peer`.
    Frame(PeerId, Vec<u8>),
    /// Something was written locally: offer it to connected peers.
    LocalChange,
}

/// What the engine reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Catch-up from `peer` began; `total` feed entries to go (an upper bound).
    SyncStarted { peer: PeerId, role: Role, total: u64 },
    /// `done` of `total` feed entries from `peer` are applied.
    SyncProgress { peer: PeerId, done: u64, total: u64 },
    /// Everything `peer` had when the session began is applied here.
    SyncCompleted { peer: PeerId },
    /// `peer` has durably applied this node's feed up to `upto` (a relay's ack means an
    /// entity with a feed seq ≤ `upto` is safe there).
    Acknowledged { peer: PeerId, upto: u64 },
    /// `peer` proved its membership (or is the authority): it may now learn this node's
    /// details and get circuit relay service.
    PeerAdmitted { peer: PeerId },
    /// The session with `peer` ended; the driver should close the connection.
    SessionFailed { peer: PeerId, reason: String },
    /// `peer` was refused (not a member, revoked) or broke the protocol; follows its
    /// `SessionFailed`. The driver should refuse it for a while.
    PeerRefused { peer: PeerId, reason: String },
    /// Entities `peer` sent were refused by the write check and not applied.
    WritesRefused { peer: PeerId, reasons: Vec<String> },
    /// `peer` refused this node's membership (`state`: revoked or refused) and said why;
    /// follows by its `SessionFailed`. The replica remembers it for `status`.
    Refused { peer: PeerId, state: MembershipState, reason: String },
}

#[derive(Debug, Default)]
struct Session {
    /// Whether this node sent its `Hello` (its proof) yet.
    hello_sent: bool,
    /// The peer's `Welcome`, once received (after this node's `Hello` was admitted).
    remote: Option<RemoteHello>,
    early: VecDeque<Vec<u8>>,
    // Serving: this node's feed to the peer.
    serve_cursor: u64,
    in_flight: BTreeMap<u64, PageRange>,
    acked: u64,
    remote_heads: HashMap<EntityId, Vec<Head>>,
    // Receiving: the peer's feed to this node.
    checkpoint: u64,
    /// Pages complete but not yet contiguous with the checkpoint: from → upto.
    done_pages: BTreeMap<u64, u64>,
    /// Pages asked for and not complete: from → (page, entities still to come).
    wanted: BTreeMap<u64, (PageRange, HashSet<EntityId>)>,
    started_at: u64,
    target: u64,
    completed: bool,
    /// What the peer's member may see and write, once its `Hello` was admitted.
    grant: Option<Grant>,
}

#[derive(Debug, Clone, Copy)]
struct RemoteHello {
    limits: Limits,
}

/// One node's sync engine.
pub struct Engine {
    replica: Arc<Replica>,
    config: Config,
    /// Ordered, so pumping sessions happens in the same order on every run.
    sessions: BTreeMap<PeerId, Session>,
    transmit: VecDeque<(PeerId, Vec<u8>)>,
    events: VecDeque<Event>,
    security: Arc<SecurityStats>,
    /// The replica's member list version when sessions were last checked against it.
    members_seen: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("peer", &self.replica.peer_id()).field("sessions", &self.sessions.len()).finish()
    }
}

fn seq_meta(replica: &Replica, key: &str) -> Result<u64, Error> {
    Ok(replica.store.meta(key)?.and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0))
}

impl Engine {
    pub fn new(replica: Arc<Replica>, config: Config) -> Self {
        let members_seen = replica.members_version();
        Engine {
            replica,
            config,
            sessions: BTreeMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            security: Arc::default(),
            members_seen,
        }
    }

    /// Counts refusals into `stats` (shared with the driver and the metrics endpoint).
    pub fn with_security(mut self, stats: Arc<SecurityStats>) -> Self {
        self.security = stats;
        self
    }

    /// Counters of what this engine refused.
    pub fn security(&self) -> Arc<SecurityStats> {
        self.security.clone()
    }

    /// The replica this engine syncs.
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    /// Peers with a session.
    pub fn peers(&self) -> Vec<PeerId> {
        self.sessions.keys().copied().collect()
    }

    /// The next frame to send: (peer, bytes).
    pub fn poll_transmit(&mut self) -> Option<(PeerId, Vec<u8>)> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn send(&mut self, peer: PeerId, frame: &Frame) {
        self.transmit.push_back((peer, frame.encode()));
    }

    fn fail(&mut self, peer: PeerId, reason: String) {
        self.fail_with(peer, reason, None);
    }

    /// Ends the session with a `Goodbye`; `membership` tells the peer its membership is why.
    fn fail_with(&mut self, peer: PeerId, reason: String, membership: Option<MembershipState>) {
        tracing::warn!(%peer, %reason, "sync session failed");
        self.send(peer, &Frame::Goodbye { reason: reason.clone(), membership });
        if let Some(session) = self.sessions.remove(&peer) {
            self.note_gone(peer, &session);
        }
        self.events.push_back(Event::SessionFailed { peer, reason });
    }

    /// Ends the session with a peer that may not sync or broke the protocol: counted, and
    /// the driver is told to keep it away.
    fn refuse(&mut self, peer: PeerId, reason: String, protocol: bool) {
        self.refuse_with(peer, reason, protocol, None);
    }

    /// [`Self::refuse`] for a peer whose membership is the reason: its `Goodbye` says so.
    fn refuse_member(&mut self, peer: PeerId, reason: String) {
        let state = if crate::members::is_revocation(&reason) { MembershipState::Revoked } else { MembershipState::Refused };
        self.refuse_with(peer, reason, false, Some(state));
    }

    fn refuse_with(&mut self, peer: PeerId, reason: String, protocol: bool, membership: Option<MembershipState>) {
        SecurityStats::bump(if protocol { &self.security.protocol_violations } else { &self.security.sessions_refused });
        tracing::warn!(%peer, %reason, "peer refused");
        self.fail_with(peer, reason.clone(), membership);
        self.events.push_back(Event::PeerRefused { peer, reason });
    }

    /// Remembers when an admitted peer was last here (for `members`).
    fn note_gone(&self, peer: PeerId, session: &Session) {
        if session.grant.is_some() {
            if let Err(e) = self.replica.note_seen(&peer, None) {
                tracing::warn!(%peer, %e, "could not note when the peer was last seen");
            }
        }
    }

    /// Ends sessions of peers the member list no longer admits (a revocation arrived).
    fn recheck_members(&mut self) -> Result<(), Error> {
        let version = self.replica.members_version();
        if version == self.members_seen {
            return Ok(());
        }
        self.members_seen = version;
        let peers: Vec<PeerId> = self.sessions.iter().filter(|(_, s)| s.grant.is_some()).map(|(p, _)| *p).collect();
        for peer in peers {
            if let Some(why) = self.replica.revoked(&peer)? {
                self.refuse_member(peer, why);
            }
        }
        Ok(())
    }

    /// Handles one input. An `Err` is a local storage failure; protocol problems end the
    /// session with [`Event::SessionFailed`] instead.
    pub fn handle(&mut self, input: Input) -> Result<(), Error> {
        self.handle_input(input)?;
        self.recheck_members()
    }

    fn handle_input(&mut self, input: Input) -> Result<(), Error> {
        match input {
            Input::Connected(peer) | Input::Dialed(peer) => {
                let resume_from = seq_meta(&self.replica, &format!("{META_CHECKPOINT_IN}{peer}"))?;
                let session = Session { checkpoint: resume_from, started_at: resume_from, ..Default::default() };
                self.sessions.insert(peer, session);
                // Who proves first: the side that chose to talk (dialed), or anyone talking
                // to the authority. The other side waits, so a stranger gets nothing.
                if matches!(input, Input::Dialed(_)) || peer == self.replica.workspace().authority_peer() {
                    self.send_hello(peer)?;
                }
                Ok(())
            }
            Input::Violation(peer, reason) => {
                if self.sessions.contains_key(&peer) {
                    self.refuse(peer, reason, true);
                }
                Ok(())
            }
            Input::Disconnected(peer) => {
                if let Some(session) = self.sessions.remove(&peer) {
                    self.note_gone(peer, &session);
                }
                Ok(())
            }
            Input::Frame(peer, bytes) => self.handle_frame(peer, bytes),
            Input::LocalChange => {
                let peers: Vec<PeerId> = self.sessions.keys().copied().collect();
                for peer in peers {
                    self.pump(peer)?;
                }
                Ok(())
            }
        }
    }

    /// Sends this node's proof of membership, once per session.
    fn send_hello(&mut self, peer: PeerId) -> Result<(), Error> {
        let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
        if session.hello_sent {
            return Ok(());
        }
        session.hello_sent = true;
        let credential = self.replica.credential()?;
        self.send(peer, &Frame::Hello { version: VERSION, credential });
        Ok(())
    }

    fn handle_frame(&mut self, peer: PeerId, bytes: Vec<u8>) -> Result<(), Error> {
        let Some(session) = self.sessions.get_mut(&peer) else {
            // A frame for a session that ended: late, ignore it.
            return Ok(());
        };
        let frame = match Frame::decode(&bytes, self.config.limits.max_frame) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(peer, e.to_string(), true);
                return Ok(());
            }
        };
        let ready = match frame {
            Frame::Hello { .. } | Frame::Goodbye { .. } => true,
            // A peer may welcome this node only after admitting it, and this node listens
            // only after admitting the peer.
            Frame::Welcome { .. } => session.grant.is_some(),
            _ => session.remote.is_some(),
        };
        if !ready {
            // Frames can overtake the Hello on a reordering network: keep a few for later.
            if session.early.len() >= MAX_EARLY_FRAMES {
                self.refuse(peer, "too many frames before Hello".into(), true);
            } else {
                session.early.push_back(bytes);
            }
            return Ok(());
        }
        match frame {
            Frame::Hello { version, credential } => {
                if session.grant.is_some() {
                    SecurityStats::bump(&self.security.frames_ignored);
                    return Ok(()); // a duplicate Hello changes nothing
                }
                if version != VERSION {
                    self.fail(peer, format!("protocol version {version} is not supported (this node speaks {VERSION})"));
                    return Ok(());
                }
                // Membership is checked before anything about this node is told.
                let grant = match self.replica.admit(&peer, credential.as_ref()) {
                    Ok(grant) => grant,
                    Err(Error::Refused(why)) => {
                        self.refuse_member(peer, why);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
                session.grant = Some(grant);
                let resume_from = session.checkpoint;
                self.events.push_back(Event::PeerAdmitted { peer });
                self.send_hello(peer)?;
                let welcome = Frame::Welcome {
                    workspace: self.replica.workspace().id,
                    role: self.config.role,
                    limits: self.config.limits,
                    feed_seq: self.replica.store.last_seq(),
                    resume_from,
                    name: Some(self.replica.name.chars().take(fieldsync_core::protocol::MAX_NAME_CHARS).collect()),
                };
                self.send(peer, &welcome);
                self.replay_early(peer)
            }
            Frame::Welcome { workspace, role, limits, feed_seq, resume_from, name } => {
                if session.remote.is_some() {
                    SecurityStats::bump(&self.security.frames_ignored);
                    return Ok(()); // a duplicate Welcome changes nothing
                }
                if workspace != self.replica.workspace().id {
                    let reason = format!("peer is in workspace {workspace}, this node in {}", self.replica.workspace().id);
                    self.refuse(peer, reason, false);
                    return Ok(());
                }
                if limits.window == 0 || limits.page_entities == 0 || limits.max_frame < 4096 {
                    self.refuse(peer, format!("unusable limits {limits:?}"), true);
                    return Ok(());
                }
                // The peer admitted this node: a refusal it gave before no longer holds.
                self.replica.note_admitted_by(&peer)?;
                let name: Option<String> = name.map(|n| n.chars().take(fieldsync_core::protocol::MAX_NAME_CHARS).collect());
                self.replica.note_seen(&peer, name.as_deref())?;
                let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
                session.remote = Some(RemoteHello { limits });
                session.serve_cursor = resume_from;
                session.acked = resume_from;
                session.target = feed_seq;
                let total = feed_seq.saturating_sub(session.checkpoint);
                self.events.push_back(Event::SyncStarted { peer, role, total });
                if total == 0 {
                    session.completed = true;
                    self.events.push_back(Event::SyncCompleted { peer });
                }
                self.replay_early(peer)?;
                self.pump(peer)
            }
            Frame::Goodbye { reason, membership } => {
                if let Some(session) = self.sessions.remove(&peer) {
                    self.note_gone(peer, &session);
                }
                if let Some(state) = membership.filter(|s| *s != MembershipState::Active) {
                    // Bounded like any text a peer sends that is kept.
                    let reason: String = reason.chars().take(1024).collect();
                    tracing::warn!(%peer, ?state, %reason, "this node's membership was refused");
                    self.replica.note_refused_by(&peer, state, &reason)?;
                    self.events.push_back(Event::Refused { peer, state, reason: reason.clone() });
                }
                self.events.push_back(Event::SessionFailed { peer, reason: format!("peer ended the session: {reason}") });
                Ok(())
            }
            Frame::Offer { page, entries } => self.on_offer(peer, page, entries),
            Frame::Want { page, wants } => self.on_want(peer, page, wants),
            Frame::Data { page, payloads, skipped } => self.on_data(peer, page, payloads, skipped),
            Frame::Ack { upto } => {
                if upto > session.acked {
                    session.acked = upto;
                    session.in_flight.retain(|u, _| *u > upto);
                    let key = format!("{META_CHECKPOINT_OUT}{peer}");
                    self.replica.commit_durable(vec![], vec![(key, Some(upto.to_be_bytes().to_vec()))])?;
                    self.events.push_back(Event::Acknowledged { peer, upto });
                }
                self.pump(peer)
            }
        }
    }

    /// Handles the frames kept while the session was not ready for them, in order (those
    /// still early are kept again).
    fn replay_early(&mut self, peer: PeerId) -> Result<(), Error> {
        let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
        let early: Vec<Vec<u8>> = session.early.drain(..).collect();
        for bytes in early {
            self.handle_frame(peer, bytes)?;
        }
        Ok(())
    }

    /// Offers the next pages of this node's feed to `peer`, within its window.
    fn pump(&mut self, peer: PeerId) -> Result<(), Error> {
        loop {
            let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
            let Some(remote) = session.remote else { return Ok(()) };
            let last = self.replica.store.last_seq();
            if session.in_flight.len() >= remote.limits.window as usize || session.serve_cursor >= last {
                return Ok(());
            }
            let limit = remote.limits.page_entities.min(self.config.limits.page_entities) as usize;
            let feed = self.replica.store.feed_since(session.serve_cursor, limit)?;
            let upto = feed.last().map(|(s, _)| *s).unwrap_or(last);
            let page = PageRange { from: session.serve_cursor, upto };
            let grant = session.grant.clone();
            let mut entries = Vec::with_capacity(feed.len());
            for (_, key) in feed {
                let id = EntityId::from_bytes(key);
                let Some(record) = self.replica.store.record(&key)? else { continue };
                // Only what the peer's member may see is offered.
                let visible = match &grant {
                    Some(g) => self.replica.visible(g, &record.collection, id)?,
                    None => false,
                };
                if !visible {
                    continue;
                }
                // Skip what the peer is known to hold already (typically what it just sent).
                if session.remote_heads.get(&id) == Some(&record.heads) {
                    continue;
                }
                entries.push(OfferEntry { id, heads: record.heads });
            }
            let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
            session.serve_cursor = upto;
            session.in_flight.insert(upto, page);
            self.send(peer, &Frame::Offer { page, entries });
        }
    }

    fn on_offer(&mut self, peer: PeerId, page: PageRange, entries: Vec<OfferEntry>) -> Result<(), Error> {
        let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
        let Some(remote) = session.remote else { return Ok(()) };
        if page.upto <= session.checkpoint || session.done_pages.contains_key(&page.from) || session.wanted.contains_key(&page.from) {
            SecurityStats::bump(&self.security.frames_ignored);
            return Ok(()); // a replayed or duplicated offer
        }
        if page.upto < page.from || entries.len() > self.config.limits.page_entities.max(remote.limits.page_entities) as usize {
            self.refuse(peer, format!("bad offer for page {page:?} with {} entries", entries.len()), true);
            return Ok(());
        }
        if session.wanted.len() + session.done_pages.len() >= 4 * self.config.limits.window.max(remote.limits.window) as usize {
            self.refuse(peer, "too many pages in flight".into(), true);
            return Ok(());
        }
        let mut wants = Vec::new();
        for entry in entries {
            let local = self.replica.store.record(entry.id.as_bytes())?.map(|r| r.heads);
            match local {
                Some(heads) if heads == entry.heads => {}
                Some(heads) => wants.push(WantEntry { id: entry.id, have: heads }),
                None => wants.push(WantEntry { id: entry.id, have: vec![] }),
            }
            if session.remote_heads.len() < MAX_REMEMBERED_HEADS || session.remote_heads.contains_key(&entry.id) {
                session.remote_heads.insert(entry.id, entry.heads);
            }
        }
        let outstanding: HashSet<EntityId> = wants.iter().map(|w| w.id).collect();
        let nothing_wanted = outstanding.is_empty();
        session.wanted.insert(page.from, (page, outstanding));
        self.send(peer, &Frame::Want { page, wants });
        if nothing_wanted {
            // No data will be needed: the page is complete now.
            self.on_data(peer, page, vec![], vec![])?;
        }
        Ok(())
    }

    fn on_want(&mut self, peer: PeerId, page: PageRange, wants: Vec<WantEntry>) -> Result<(), Error> {
        let Some(session) = self.sessions.get(&peer) else { return Ok(()) };
        let (Some(remote), Some(grant)) = (session.remote, session.grant.clone()) else { return Ok(()) };
        if wants.len() > remote.limits.page_entities.max(self.config.limits.page_entities) as usize {
            self.refuse(peer, format!("a Want of {} entities is over the page limit", wants.len()), true);
            return Ok(());
        }
        // Leave room for framing within the peer's frame limit.
        let budget = remote.limits.max_frame as usize * 7 / 8;
        let mut payloads = Vec::new();
        let mut skipped = Vec::new();
        let mut size = 0;
        for want in wants {
            let Some(payload) = self.payload(&want, &grant)? else {
                skipped.push(want.id);
                continue;
            };
            let len: usize = payload.chunks.iter().map(|c| c.len()).sum::<usize>() + 64;
            if size + len > budget && !payloads.is_empty() {
                self.send(peer, &Frame::Data { page, payloads: std::mem::take(&mut payloads), skipped: vec![] });
                size = 0;
            }
            size += len;
            payloads.push(payload);
        }
        self.send(peer, &Frame::Data { page, payloads, skipped });
        Ok(())
    }

    /// The data for one want: stored snapshot and chunks as they are when the peer lacks the
    /// entity, else the changes after the peer's heads.
    fn payload(&self, want: &WantEntry, grant: &Grant) -> Result<Option<Payload>, Error> {
        let key = want.id.as_bytes();
        let Some(record) = self.replica.store.record(key)? else { return Ok(None) };
        if !self.replica.visible(grant, &record.collection, want.id)? {
            // Never offered to this peer, or no longer visible to it: counted, skipped.
            SecurityStats::bump(&self.security.reads_refused);
            tracing::warn!(entity = %want.id, user = %grant.user, "a peer asked for an entity outside its partitions");
            return Ok(None);
        }
        let chunks = if want.have.is_empty() {
            let Some(doc) = self.replica.store.load_doc(key)? else { return Ok(None) };
            std::iter::once(doc.snapshot).chain(doc.chunks).collect()
        } else {
            let _guard = self.replica.lock(want.id);
            let Some(mut entity) = self.replica.load(want.id)? else { return Ok(None) };
            let have: Vec<ChangeHash> = want.have.iter().map(|h| ChangeHash(*h)).collect();
            let changes = entity.changes_after(&have);
            self.replica.cache(entity);
            vec![changes]
        };
        Ok(Some(Payload {
            id: want.id,
            collection: record.collection,
            full: want.have.is_empty(),
            chunks: chunks.into_iter().map(serde_bytes::ByteBuf::from).collect(),
        }))
    }

    fn on_data(&mut self, peer: PeerId, page: PageRange, payloads: Vec<Payload>, skipped: Vec<EntityId>) -> Result<(), Error> {
        let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
        let page_limit = session.remote.map(|r| r.limits.page_entities).unwrap_or(0).max(self.config.limits.page_entities) as usize;
        if payloads.len() + skipped.len() > page_limit {
            let reason = format!("a Data frame of {} entities is over the page limit of {page_limit}", payloads.len() + skipped.len());
            self.refuse(peer, reason, true);
            return Ok(());
        }
        let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
        let Some((_, outstanding)) = session.wanted.get(&page.from) else {
            SecurityStats::bump(&self.security.frames_ignored);
            return Ok(()); // data for a page already complete: a replay
        };
        // Only what is still outstanding counts; repeats are dropped.
        let mut remaining = outstanding.clone();
        let payloads: Vec<Payload> = payloads.into_iter().filter(|p| remaining.remove(&p.id)).collect();
        for id in &skipped {
            remaining.remove(id);
        }
        let complete = remaining.is_empty();
        let mut done_pages = session.done_pages.clone();
        let mut checkpoint = session.checkpoint;
        let mut meta = Vec::new();
        if complete {
            done_pages.insert(page.from, page.upto);
            while let Some(upto) = done_pages.remove(&checkpoint) {
                checkpoint = upto;
            }
            if checkpoint > session.checkpoint {
                meta.push((format!("{META_CHECKPOINT_IN}{peer}"), Some(checkpoint.to_be_bytes().to_vec())));
            }
        }
        // Check every payload before applying any; then apply them and the checkpoint they
        // complete in one durable commit.
        let Some(grant) = session.grant.clone() else { return Ok(()) };
        let items = match self.check_payloads(payloads) {
            Ok(items) => items,
            Err(reason) => {
                self.refuse(peer, reason, true);
                return Ok(());
            }
        };
        if !items.is_empty() || !meta.is_empty() {
            let mut summary = ImportSummary::default();
            if let Err(e) = self.replica.merge_incoming(items, meta, &grant, &mut summary) {
                if matches!(e, Error::Store(_) | Error::File { .. }) {
                    return Err(e);
                }
                self.refuse(peer, format!("received data could not be applied: {e}"), true);
                return Ok(());
            }
            if !summary.refused.is_empty() {
                for r in &summary.refused {
                    SecurityStats::bump(&self.security.writes_refused);
                    if matches!(r.kind, RefusalKind::Forged | RefusalKind::Rollback) {
                        SecurityStats::bump(&self.security.forged_refused);
                    }
                    tracing::warn!(%peer, kind = r.kind.name(), reason = %r.reason, "write refused");
                }
                let reasons = summary.refused.into_iter().map(|r| r.reason).collect();
                self.events.push_back(Event::WritesRefused { peer, reasons });
            }
        }
        let Some(session) = self.sessions.get_mut(&peer) else { return Ok(()) };
        if !complete {
            if let Some((_, outstanding)) = session.wanted.get_mut(&page.from) {
                *outstanding = remaining;
            }
            return Ok(());
        }
        session.wanted.remove(&page.from);
        session.done_pages = done_pages;
        session.checkpoint = checkpoint;
        let total = session.target.saturating_sub(session.started_at);
        let done = checkpoint.saturating_sub(session.started_at).min(total);
        self.events.push_back(Event::SyncProgress { peer, done, total });
        if !session.completed && checkpoint >= session.target {
            session.completed = true;
            self.events.push_back(Event::SyncCompleted { peer });
        }
        self.send(peer, &Frame::Ack { upto: checkpoint });
        // Applying moved entities in the local feed: offer them on (to other peers too).
        self.handle(Input::LocalChange)
    }

    fn check_payloads(&self, payloads: Vec<Payload>) -> Result<Vec<Incoming>, String> {
        use rayon::prelude::*;
        let ws = self.replica.workspace();
        // A batch that carries a schema version may carry entities of collections it adds
        // (the replica adopts the version before it reads them).
        let brings_schema = payloads.iter().any(|p| p.collection == fieldsync_core::schema_version::SCHEMAS);
        payloads
            .into_par_iter()
            .map(|p| {
                if !brings_schema && ws.schema.collection(&p.collection).is_err() {
                    return Err(format!("entity {} is in unknown collection {:?}", p.id, p.collection));
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
                if p.full {
                    let (first, rest) = chunks.split_first().ok_or_else(|| format!("entity {} came with no data", p.id))?;
                    let entity = Entity::load(p.id, first, rest).map_err(|e| format!("entity {}: {e}", p.id))?;
                    if entity.collection().as_deref() != Some(p.collection.as_str()) {
                        return Err(format!("entity {} claims collection {:?} but holds {:?}", p.id, p.collection, entity.collection()));
                    }
                    Ok(Incoming::Whole { entity: Box::new(entity), collection: p.collection, chunks })
                } else {
                    Ok(Incoming::Changes { id: p.id, collection: p.collection, chunks })
                }
            })
            .collect()
    }
}
