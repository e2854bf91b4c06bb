//! The sync engine: a deterministic state machine per node that opens no socket, touches no
//! storage, reads no clock and spawns nothing. A driver (the simulator, the libp2p node, a
//! browser tab) feeds it [`Input`]s with the time, and drains four outputs:
//! [`Engine::poll_transmit`] (frames to send), [`Engine::poll_event`] (what happened),
//! [`Engine::poll_io`] (storage [`Task`]s, whose results come back as [`Input::IoDone`]) and
//! [`Engine::poll_timeout`] (when to call again with [`Input::Tick`]).
//!
//! # The drive loop
//! 1. Call [`Engine::handle`] with the input and the time.
//! 2. Drain the outputs after every `handle`: frames go to their peer in order; a
//!    [`Event::SessionFailed`] means the driver should close that connection; tasks run
//!    wherever the driver likes, in any order, and each result is handed back.
//!
//! # Durability
//! Received data is acknowledged (`Ack`) only after the [`Task::Apply`] that covers it has
//! completed durably. A session's applies run one at a time, so its checkpoint only moves
//! forward; verifying page N+1 ([`Task::Verify`]) may overlap applying page N.
//!
//! # Handshake: admission before information
//! A `Hello` carries only the sender's proof of membership. The side that dialed (driver:
//! [`Input::Dialed`]) or whose peer is the workspace authority sends it at once; the other
//! side ([`Input::Connected`]) waits for the peer's `Hello`, admits it from the member list
//! it was given ([`Input::Members`]; pure core code), and only then sends its own `Hello`.
//! Each side sends its `Welcome` (workspace, role, limits, feed head, checkpoint) only after
//! admitting the peer. A refusal is a `Goodbye` with the reason and nothing else. A peer
//! that is not admitted within [`Config::hello_timeout`] is sent away.
//!
//! # Conversation (per direction; both directions run at once)
//! The server offers pages of its changes feed after the client's checkpoint (`Offer`: ids
//! and heads) → the client answers what it lacks (`Want`) → the server sends it (`Data`) →
//! the client applies a page durably, advances its checkpoint over contiguous pages and
//! sends `Ack`. At most `window` pages are in flight. After catch-up the same loop carries
//! live changes. See docs/protocol.md.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fieldsync_core::membership::{
    is_revocation, Admission, Credential, Grant, MemberList, MembershipState, RefusalKind,
};
use fieldsync_core::protocol::{
    Frame, Head, Limits, OfferEntry, PageRange, Payload, Role, WantEntry, MAX_NAME_CHARS, VERSION,
};
use fieldsync_core::{EntityId, PeerId};

mod io;
mod verify;

pub use io::{Outcome, Task, TaskId};
pub use verify::{
    brings_schema, check_payload, check_payloads, Incoming, MAX_CHUNKS_PER_ENTITY, MAX_ENTITY_BYTES,
};

/// Frames kept while a session is not ready for them (they overtook the `Hello` or
/// `Welcome` on a reordering network).
const MAX_EARLY_FRAMES: usize = 64;
/// Bytes a peer may have kept before it is admitted: a stranger costs little.
const MAX_EARLY_BYTES_BEFORE_ADMISSION: usize = 64 << 10;
/// Bytes kept for an admitted peer before its `Welcome` (a window of offers fits).
const MAX_EARLY_BYTES: usize = 1 << 20;
/// Entities per session whose heads at the peer are remembered (to skip echoing them back).
const MAX_REMEMBERED_HEADS: usize = 250_000;
/// Remembered heads across all sessions together (about 100 bytes each): many peers cannot
/// multiply the per-session cap.
pub const MAX_REMEMBERED_HEADS_TOTAL: usize = 1_000_000;
/// Longest text from a peer that is kept (a refusal's reason, a name).
const MAX_KEPT_TEXT: usize = 1024;

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
        Self::add(counter, 1);
    }
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub role: Role,
    pub limits: Limits,
    /// The name this node gives itself in its `Welcome`.
    pub name: String,
    /// How long a peer has to be admitted after its connection came up.
    pub hello_timeout: Duration,
    /// Entities whose heads at a peer are remembered, all sessions together (about 100
    /// bytes each; [`MAX_REMEMBERED_HEADS_TOTAL`] by default).
    pub max_remembered_heads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            role: Role::Device,
            limits: Limits::default(),
            name: String::new(),
            hello_timeout: Duration::from_secs(10),
            max_remembered_heads: MAX_REMEMBERED_HEADS_TOTAL,
        }
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
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.chars().take(MAX_NAME_CHARS).collect();
        self
    }
    pub fn with_max_remembered_heads(mut self, n: usize) -> Self {
        self.max_remembered_heads = n;
        self
    }
    pub fn with_hello_timeout(mut self, timeout: Duration) -> Self {
        self.hello_timeout = timeout;
        self
    }
}

/// What the engine knows of its own node when it starts.
#[derive(Clone, Debug)]
pub struct Local {
    /// This node's peer id.
    pub peer: PeerId,
    /// The member list (admission is decided from it).
    pub members: Arc<MemberList>,
    /// What this node presents in its `Hello` (none on the authority).
    pub credential: Option<Credential>,
    /// The local changes feed's head.
    pub feed_seq: u64,
}

/// The time, as the driver tells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Now {
    /// Monotonic time since any fixed point the driver chose (timers use it).
    pub mono: Duration,
    /// Wall-clock milliseconds since the Unix epoch (invites expire by it).
    pub wall_ms: i64,
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
    /// a flood): the session ends with a `Goodbye` naming `reason`.
    Violation(PeerId, String),
    /// The connection to `peer` is gone.
    Disconnected(PeerId),
    /// A frame arrived from `peer`.
    Frame(PeerId, Vec<u8>),
    /// Something was written locally; the local feed head is now `feed_seq`.
    LocalChange { feed_seq: u64 },
    /// The member list or this node's own credential changed.
    Members {
        members: Arc<MemberList>,
        credential: Option<Credential>,
    },
    /// A task from [`Engine::poll_io`] finished.
    IoDone(TaskId, Outcome),
    /// Time passed: deadlines from [`Engine::poll_timeout`] that are due fire.
    Tick,
}

/// What the engine reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Catch-up from `peer` began; `total` feed entries to go (an upper bound).
    SyncStarted {
        peer: PeerId,
        role: Role,
        total: u64,
    },
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
    /// followed by its `SessionFailed`.
    Refused {
        peer: PeerId,
        state: MembershipState,
        reason: String,
    },
    /// Local storage failed (`reason`); the sessions it concerned ended.
    StorageFailed { reason: String },
}

#[derive(Debug, Default)]
struct Session {
    /// Tells this session from an earlier one with the same peer (late task results).
    gen: u64,
    /// When the connection came up (the `Hello` deadline counts from here).
    opened_at: Duration,
    /// Whether the stored checkpoint was read (frames wait until it is).
    checkpoint_known: bool,
    /// Whether this node sent its `Hello` (its proof) yet.
    hello_sent: bool,
    /// An invite binding is being written; the peer is admitted once it is durable.
    binding: bool,
    /// The peer's limits, once its `Welcome` arrived (after this node was admitted).
    remote: Option<Limits>,
    early: VecDeque<Vec<u8>>,
    early_bytes: usize,
    // Serving: this node's feed to the peer.
    serve_cursor: u64,
    /// A feed page is being read.
    reading: bool,
    /// The feed moved while a page was being read: read again after it.
    reread: bool,
    in_flight: BTreeMap<u64, PageRange>,
    /// Entities of priority collections read ahead of the feed, offered first: each page
    /// carries up to half its entries from here until it is empty.
    priority: VecDeque<(u64, OfferEntry)>,
    priority_read: ReadAhead,
    acked: u64,
    remote_heads: HashMap<EntityId, Vec<Head>>,
    // Receiving: the peer's feed to this node.
    checkpoint: u64,
    /// Pages complete and applied but not yet contiguous with the checkpoint: from → upto.
    done_pages: BTreeMap<u64, u64>,
    /// Offers whose local heads are being read: page from → page.
    offered: BTreeMap<u64, PageRange>,
    /// Pages asked for and not complete: from → (page, entities still to come).
    wanted: BTreeMap<u64, (PageRange, HashSet<EntityId>)>,
    /// Verifications in flight per page.
    verifying: BTreeMap<u64, usize>,
    /// Checked entities waiting for the next apply, and pages they complete.
    ready: Vec<Incoming>,
    ready_pages: Vec<PageRange>,
    /// An apply is in flight, with the pages it completes.
    applying: Option<Vec<PageRange>>,
    started_at: u64,
    target: u64,
    completed: bool,
    /// What the peer's member may see and write, once its `Hello` was admitted.
    grant: Option<Grant>,
}

/// Where a session's priority read-ahead stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ReadAhead {
    #[default]
    NotYet,
    Reading,
    Done,
}

impl Session {
    fn ready_for(&self, frame: &Frame) -> bool {
        // A refusal is read at once: the connection closes right after it.
        if matches!(frame, Frame::Goodbye { .. }) {
            return true;
        }
        if !self.checkpoint_known || self.binding {
            return false;
        }
        match frame {
            Frame::Hello { .. } | Frame::Goodbye { .. } => true,
            // A peer may welcome this node only after admitting it, and this node listens
            // only after admitting the peer.
            Frame::Welcome { .. } => self.grant.is_some(),
            _ => self.remote.is_some(),
        }
    }
}

/// What a task in flight was for.
#[derive(Debug)]
enum Pending {
    Checkpoint,
    Feed {
        page_from: u64,
    },
    Priority,
    Heads {
        page: PageRange,
        entries: Vec<OfferEntry>,
    },
    Payloads {
        page: PageRange,
    },
    Verify {
        page: PageRange,
    },
    Apply,
    Bind {
        grant: Grant,
    },
    Note,
}

/// Pages' worth of priority entities read ahead on (re)connect (see `Engine::pump`).
const PRIORITY_PAGES: usize = 8;

/// One node's sync engine.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    local: Local,
    now: Now,
    /// Ordered, so pumping sessions happens in the same order on every run.
    sessions: BTreeMap<PeerId, Session>,
    next_gen: u64,
    next_task: u64,
    tasks: HashMap<TaskId, (PeerId, u64, Pending)>,
    transmit: VecDeque<(PeerId, Vec<u8>)>,
    events: VecDeque<Event>,
    io: VecDeque<(TaskId, Task)>,
    security: Arc<SecurityStats>,
}

impl Engine {
    pub fn new(config: Config, local: Local) -> Self {
        Engine {
            config,
            local,
            now: Now::default(),
            sessions: BTreeMap::new(),
            next_gen: 0,
            next_task: 0,
            tasks: HashMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            io: VecDeque::new(),
            security: Arc::default(),
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

    /// Peers with a session.
    pub fn peers(&self) -> Vec<PeerId> {
        self.sessions.keys().copied().collect()
    }

    /// Tasks handed out and not yet done.
    pub fn tasks_in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// The next frame to send: (peer, bytes).
    pub fn poll_transmit(&mut self) -> Option<(PeerId, Vec<u8>)> {
        self.transmit.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next storage task.
    pub fn poll_io(&mut self) -> Option<(TaskId, Task)> {
        self.io.pop_front()
    }

    /// When the engine next needs an [`Input::Tick`] (monotonic time, as in [`Now::mono`]).
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.sessions
            .values()
            .filter(|s| s.grant.is_none())
            .map(|s| s.opened_at + self.config.hello_timeout)
            .min()
    }

    /// Handles one input at time `now`. Protocol problems end the session with
    /// [`Event::SessionFailed`]; a storage failure is [`Event::StorageFailed`].
    pub fn handle(&mut self, now: Now, input: Input) {
        self.now = now;
        match input {
            Input::Connected(peer) => self.open(peer, false),
            Input::Dialed(peer) => self.open(peer, true),
            Input::Violation(peer, reason) => {
                if self.sessions.contains_key(&peer) {
                    self.refuse(peer, reason, true);
                }
            }
            Input::Disconnected(peer) => {
                if let Some(session) = self.sessions.remove(&peer) {
                    self.note_gone(peer, &session);
                }
            }
            Input::Frame(peer, bytes) => self.handle_frame(peer, bytes),
            Input::LocalChange { feed_seq } => {
                self.local.feed_seq = self.local.feed_seq.max(feed_seq);
                self.pump_all();
            }
            Input::Members {
                members,
                credential,
            } => {
                self.local.members = members;
                self.local.credential = credential;
                self.recheck_members();
            }
            Input::IoDone(id, outcome) => self.io_done(id, outcome),
            Input::Tick => {
                let late: Vec<PeerId> = self
                    .sessions
                    .iter()
                    .filter(|(_, s)| {
                        s.grant.is_none() && s.opened_at + self.config.hello_timeout <= now.mono
                    })
                    .map(|(p, _)| *p)
                    .collect();
                for peer in late {
                    let reason = format!(
                        "no valid hello within {} s",
                        self.config.hello_timeout.as_secs()
                    );
                    self.refuse(peer, reason, true);
                }
            }
        }
    }

    fn open(&mut self, peer: PeerId, dialed: bool) {
        if let Some(old) = self.sessions.remove(&peer) {
            self.note_gone(peer, &old);
        }
        self.next_gen += 1;
        let gen = self.next_gen;
        self.sessions.insert(
            peer,
            Session {
                gen,
                opened_at: self.now.mono,
                ..Default::default()
            },
        );
        self.task(peer, Pending::Checkpoint, Task::ReadCheckpoint { peer });
        // Who proves first: the side that chose to talk (dialed), or anyone talking to the
        // authority. The other side waits, so a stranger gets nothing.
        if dialed || peer == self.local.members.workspace.authority_peer() {
            self.send_hello(peer);
        }
    }

    fn task(&mut self, peer: PeerId, pending: Pending, task: Task) {
        let gen = self.sessions.get(&peer).map(|s| s.gen).unwrap_or(0);
        self.next_task += 1;
        let id = TaskId(self.next_task);
        self.tasks.insert(id, (peer, gen, pending));
        self.io.push_back((id, task));
    }

    fn send(&mut self, peer: PeerId, frame: &Frame) {
        self.transmit.push_back((peer, frame.encode()));
    }

    /// Ends the session with a `Goodbye`; `membership` tells the peer its membership is why.
    fn fail_with(&mut self, peer: PeerId, reason: String, membership: Option<MembershipState>) {
        tracing::warn!(%peer, %reason, "sync session failed");
        self.send(
            peer,
            &Frame::Goodbye {
                reason: reason.clone(),
                membership,
            },
        );
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
        let state = if is_revocation(&reason) {
            MembershipState::Revoked
        } else {
            MembershipState::Refused
        };
        self.refuse_with(peer, reason, false, Some(state));
    }

    fn refuse_with(
        &mut self,
        peer: PeerId,
        reason: String,
        protocol: bool,
        membership: Option<MembershipState>,
    ) {
        SecurityStats::bump(if protocol {
            &self.security.protocol_violations
        } else {
            &self.security.sessions_refused
        });
        tracing::warn!(%peer, %reason, "peer refused");
        self.fail_with(peer, reason.clone(), membership);
        self.events.push_back(Event::PeerRefused { peer, reason });
    }

    /// Remembers when an admitted peer was last here (for `members`).
    fn note_gone(&mut self, peer: PeerId, session: &Session) {
        if session.grant.is_some() {
            self.task(peer, Pending::Note, Task::NoteSeen { peer, name: None });
        }
    }

    /// Ends sessions of peers the member list no longer admits (a revocation arrived).
    fn recheck_members(&mut self) {
        let peers: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.grant.is_some())
            .map(|(p, _)| *p)
            .collect();
        for peer in peers {
            if let Some(why) = self.local.members.revoked(&peer) {
                self.refuse_member(peer, why);
            }
        }
    }

    /// Sends this node's proof of membership, once per session.
    fn send_hello(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if session.hello_sent {
            return;
        }
        session.hello_sent = true;
        let credential = self.local.credential.clone();
        self.send(
            peer,
            &Frame::Hello {
                version: VERSION,
                credential,
            },
        );
    }

    fn io_done(&mut self, id: TaskId, outcome: Outcome) {
        let Some((peer, gen, pending)) = self.tasks.remove(&id) else {
            tracing::debug!(?id, "result of an unknown task ignored");
            return;
        };
        let current = self.sessions.get(&peer).is_some_and(|s| s.gen == gen);
        match outcome {
            Outcome::Failed(reason) => {
                tracing::error!(%peer, %reason, "local storage failed");
                if current {
                    self.fail_with(peer, "this node's storage failed".into(), None);
                }
                self.events.push_back(Event::StorageFailed { reason });
                return;
            }
            Outcome::Rejected(reason) => {
                if current {
                    self.refuse(
                        peer,
                        format!("received data could not be applied: {reason}"),
                        true,
                    );
                }
                return;
            }
            Outcome::Applied { feed_seq, refused } if matches!(pending, Pending::Apply) => {
                // Applied durably even if the session ended meanwhile: the feed moved.
                self.local.feed_seq = self.local.feed_seq.max(feed_seq);
                self.note_refused_writes(peer, refused);
                if current {
                    self.applied(peer);
                }
                self.pump_all();
                return;
            }
            _ => {}
        }
        if !current {
            return; // the session it was for is gone
        }
        match (pending, outcome) {
            (Pending::Checkpoint, Outcome::Checkpoint(seq)) => {
                let Some(session) = self.sessions.get_mut(&peer) else {
                    return;
                };
                session.checkpoint = seq;
                session.started_at = seq;
                session.checkpoint_known = true;
                self.replay_early(peer);
            }
            (Pending::Feed { page_from }, Outcome::Feed { upto, entries }) => {
                self.offer(peer, page_from, upto, entries)
            }
            (Pending::Priority, Outcome::Priority(entries)) => {
                if let Some(session) = self.sessions.get_mut(&peer) {
                    session.priority = entries.into();
                    session.priority_read = ReadAhead::Done;
                }
                self.pump(peer);
            }
            (Pending::Heads { page, entries }, Outcome::Heads(heads)) => {
                self.want(peer, page, entries, heads)
            }
            (
                Pending::Payloads { page },
                Outcome::Payloads {
                    payloads,
                    skipped,
                    refused,
                },
            ) => {
                SecurityStats::add(&self.security.reads_refused, refused);
                self.send_data(peer, page, payloads, skipped);
            }
            (Pending::Verify { page }, Outcome::Verified(result)) => {
                self.verified(peer, page, result)
            }
            (Pending::Bind { grant }, Outcome::Done) => {
                if let Some(session) = self.sessions.get_mut(&peer) {
                    session.binding = false;
                }
                self.admitted(peer, grant);
            }
            (Pending::Note, Outcome::Done) => {}
            (pending, outcome) => tracing::error!(
                ?pending,
                ?outcome,
                "a task came back with the wrong kind of result; ignored"
            ),
        }
    }

    fn handle_frame(&mut self, peer: PeerId, bytes: Vec<u8>) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return; // a frame for a session that ended: late, ignore it
        };
        let frame = match Frame::decode(&bytes, self.config.limits.max_frame) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(peer, e.to_string(), true);
                return;
            }
        };
        if !session.ready_for(&frame) {
            let cap = if session.grant.is_some() {
                MAX_EARLY_BYTES
            } else {
                MAX_EARLY_BYTES_BEFORE_ADMISSION
            };
            if session.early.len() >= MAX_EARLY_FRAMES || session.early_bytes + bytes.len() > cap {
                let reason = format!("more than {MAX_EARLY_FRAMES} frames or {cap} bytes before the handshake finished");
                self.refuse(peer, reason, true);
            } else {
                session.early_bytes += bytes.len();
                session.early.push_back(bytes);
            }
            return;
        }
        match frame {
            Frame::Hello {
                version,
                credential,
            } => {
                if session.grant.is_some() {
                    SecurityStats::bump(&self.security.frames_ignored);
                    return; // a duplicate Hello changes nothing
                }
                if version != VERSION {
                    self.fail_with(peer, format!("protocol version {version} is not supported (this node speaks {VERSION})"), None);
                    return;
                }
                // Membership is checked before anything about this node is told.
                match self
                    .local
                    .members
                    .admit(&peer, credential.as_ref(), self.now.wall_ms)
                {
                    Admission::Admitted(grant) => self.admitted(peer, grant),
                    Admission::Refused(why) => self.refuse_member(peer, why),
                    Admission::Bind(record) => {
                        session.binding = true;
                        let grant = record.grant.clone();
                        self.task(
                            peer,
                            Pending::Bind { grant },
                            Task::BindInvite { peer, record },
                        );
                    }
                }
            }
            Frame::Welcome {
                workspace,
                role,
                limits,
                feed_seq,
                resume_from,
                name,
            } => {
                if session.remote.is_some() {
                    SecurityStats::bump(&self.security.frames_ignored);
                    return; // a duplicate Welcome changes nothing
                }
                let ours = self.local.members.workspace.id;
                if workspace != ours {
                    self.refuse(
                        peer,
                        format!("peer is in workspace {workspace}, this node in {ours}"),
                        false,
                    );
                    return;
                }
                if limits.window == 0 || limits.page_entities == 0 || limits.max_frame < 4096 {
                    self.refuse(peer, format!("unusable limits {limits:?}"), true);
                    return;
                }
                session.remote = Some(limits);
                session.serve_cursor = resume_from;
                session.acked = resume_from;
                session.target = feed_seq;
                let total = feed_seq.saturating_sub(session.checkpoint);
                let completed = total == 0;
                session.completed = completed;
                let name: Option<String> = name.map(|n| n.chars().take(MAX_NAME_CHARS).collect());
                // The peer admitted this node: a refusal it gave before no longer holds.
                self.task(peer, Pending::Note, Task::NoteAdmittedBy { peer });
                self.task(peer, Pending::Note, Task::NoteSeen { peer, name });
                self.events
                    .push_back(Event::SyncStarted { peer, role, total });
                if completed {
                    self.events.push_back(Event::SyncCompleted { peer });
                }
                self.replay_early(peer);
                self.pump(peer);
            }
            Frame::Goodbye { reason, membership } => {
                if let Some(session) = self.sessions.remove(&peer) {
                    self.note_gone(peer, &session);
                }
                let reason: String = reason.chars().take(MAX_KEPT_TEXT).collect();
                if let Some(state) = membership.filter(|s| *s != MembershipState::Active) {
                    tracing::warn!(%peer, ?state, %reason, "this node's membership was refused");
                    self.task(
                        peer,
                        Pending::Note,
                        Task::NoteRefusedBy {
                            peer,
                            state,
                            reason: reason.clone(),
                        },
                    );
                    self.events.push_back(Event::Refused {
                        peer,
                        state,
                        reason: reason.clone(),
                    });
                }
                self.events.push_back(Event::SessionFailed {
                    peer,
                    reason: format!("peer ended the session: {reason}"),
                });
            }
            Frame::Offer { page, entries } => self.on_offer(peer, page, entries),
            Frame::Want { page, wants } => self.on_want(peer, page, wants),
            Frame::Data {
                page,
                payloads,
                skipped,
            } => self.on_data(peer, page, payloads, skipped),
            Frame::Ack { upto } => {
                if upto > session.acked {
                    session.acked = upto;
                    session.in_flight.retain(|u, _| *u > upto);
                    self.task(peer, Pending::Note, Task::SaveAcked { peer, upto });
                    self.events.push_back(Event::Acknowledged { peer, upto });
                }
                self.pump(peer);
            }
        }
    }

    /// The peer proved itself: it learns this node's proof and details, and its kept frames
    /// are read.
    fn admitted(&mut self, peer: PeerId, grant: Grant) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        session.grant = Some(grant);
        let resume_from = session.checkpoint;
        self.events.push_back(Event::PeerAdmitted { peer });
        self.send_hello(peer);
        let welcome = Frame::Welcome {
            workspace: self.local.members.workspace.id,
            role: self.config.role,
            limits: self.config.limits,
            feed_seq: self.local.feed_seq,
            resume_from,
            name: Some(self.config.name.clone()),
        };
        self.send(peer, &welcome);
        self.replay_early(peer);
    }

    /// Handles the frames kept while the session was not ready for them, in order (those
    /// still early are kept again).
    fn replay_early(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let early: Vec<Vec<u8>> = session.early.drain(..).collect();
        session.early_bytes = 0;
        for bytes in early {
            self.handle_frame(peer, bytes);
        }
    }

    fn pump_all(&mut self) {
        let peers: Vec<PeerId> = self.sessions.keys().copied().collect();
        for peer in peers {
            self.pump(peer);
        }
    }

    /// Reads the next page of this node's feed for `peer`, within its window.
    fn pump(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let (Some(remote), Some(grant)) = (session.remote, session.grant.clone()) else {
            return;
        };
        if session.reading {
            session.reread = true;
            return;
        }
        if session.in_flight.len() >= remote.window as usize
            || session.serve_cursor >= self.local.feed_seq
        {
            return;
        }
        let limit = remote.page_entities.min(self.config.limits.page_entities) as usize;
        // On (re)connect, what the schema ranks first is read ahead once, before the first
        // page, so a short connection carries it (payments before tasks before photos).
        match session.priority_read {
            ReadAhead::NotYet if self.local.members.workspace.schema.has_priorities() => {
                session.priority_read = ReadAhead::Reading;
                let after = session.serve_cursor;
                self.task(
                    peer,
                    Pending::Priority,
                    Task::ReadPriority {
                        after,
                        limit: PRIORITY_PAGES * limit,
                        grant,
                    },
                );
                return;
            }
            ReadAhead::Reading => return,
            _ => {}
        }
        // Half of each page is left for read-ahead entries while there are any.
        let limit = limit - session.priority.len().min(limit / 2);
        session.reading = true;
        let after = session.serve_cursor;
        self.task(
            peer,
            Pending::Feed { page_from: after },
            Task::ReadFeed {
                after,
                limit,
                grant,
            },
        );
    }

    /// A feed page was read: offer what the peer does not hold yet, then read on.
    fn offer(&mut self, peer: PeerId, from: u64, upto: u64, entries: Vec<OfferEntry>) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        session.reading = false;
        let reread = std::mem::take(&mut session.reread);
        if from != session.serve_cursor || upto < from {
            tracing::error!(%peer, from, upto, cursor = session.serve_cursor, "a feed read does not continue the cursor; ignored");
            return;
        }
        if upto == from {
            // Nothing after the cursor yet (the write that moved the head lands later).
            if reread {
                self.pump(peer);
            }
            return;
        }
        // Skip what the peer is known to hold already (typically what it just sent).
        let mut entries: Vec<OfferEntry> = entries
            .into_iter()
            .filter(|e| session.remote_heads.get(&e.id) != Some(&e.heads))
            .collect();
        // Read-ahead entries ride along (beyond the page's range: the receiver takes them
        // like any; they come again in their own page, where its heads match).
        let room = self.config.limits.page_entities as usize;
        let room = session
            .remote
            .map_or(room, |r| room.min(r.page_entities as usize))
            .saturating_sub(entries.len());
        // Those this page or an earlier one covers are offered already.
        let covered = upto.max(from);
        session.priority.retain(|(seq, _)| *seq > covered);
        let n = room.min(session.priority.len());
        entries.extend(session.priority.drain(..n).map(|(_, e)| e));
        let page = PageRange {
            from,
            upto: upto.max(from),
        };
        session.serve_cursor = page.upto;
        session.in_flight.insert(page.upto, page);
        self.send(peer, &Frame::Offer { page, entries });
        self.pump(peer);
    }

    /// Entities whose heads at a peer are remembered, over all sessions.
    pub fn remembered_heads(&self) -> usize {
        self.sessions.values().map(|s| s.remote_heads.len()).sum()
    }

    fn on_offer(&mut self, peer: PeerId, page: PageRange, entries: Vec<OfferEntry>) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let Some(remote) = session.remote else { return };
        let known = session.done_pages.contains_key(&page.from)
            || session.wanted.contains_key(&page.from)
            || session.offered.contains_key(&page.from)
            || session
                .ready_pages
                .iter()
                .chain(session.applying.iter().flatten())
                .any(|p| p.from == page.from);
        if page.upto <= session.checkpoint || known {
            SecurityStats::bump(&self.security.frames_ignored);
            return; // a replayed or duplicated offer
        }
        if page.upto < page.from
            || entries.len() > self.config.limits.page_entities.max(remote.page_entities) as usize
        {
            self.refuse(
                peer,
                format!("bad offer for page {page:?} with {} entries", entries.len()),
                true,
            );
            return;
        }
        let window = self.config.limits.window.max(remote.window) as usize;
        if session.wanted.len() + session.offered.len() + session.done_pages.len() >= 4 * window {
            self.refuse(peer, "too many pages in flight".into(), true);
            return;
        }
        session.offered.insert(page.from, page);
        let ids = entries.iter().map(|e| e.id).collect();
        self.task(
            peer,
            Pending::Heads { page, entries },
            Task::ReadHeads { ids },
        );
    }

    /// The local heads of an offer's entities are known: ask for what differs.
    fn want(
        &mut self,
        peer: PeerId,
        page: PageRange,
        entries: Vec<OfferEntry>,
        heads: Vec<Option<Vec<Head>>>,
    ) {
        let mut remembered = self.remembered_heads();
        let cap = self.config.max_remembered_heads;
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        session.offered.remove(&page.from);
        if heads.len() != entries.len() {
            tracing::error!(%peer, "a heads read answered {} of {} entities", heads.len(), entries.len());
        }
        let mut wants = Vec::new();
        for (entry, local) in entries.into_iter().zip(heads) {
            match local {
                // Held already, or purged here (an entity held has at least one head).
                Some(heads) if heads == entry.heads || heads.is_empty() => {}
                Some(heads) => wants.push(WantEntry {
                    id: entry.id,
                    have: heads,
                }),
                None => wants.push(WantEntry {
                    id: entry.id,
                    have: vec![],
                }),
            }
            // Bounded per session and in all; a remembered entity is kept up to date.
            if session.remote_heads.contains_key(&entry.id) {
                session.remote_heads.insert(entry.id, entry.heads);
            } else if session.remote_heads.len() < MAX_REMEMBERED_HEADS && remembered < cap {
                session.remote_heads.insert(entry.id, entry.heads);
                remembered += 1;
            }
        }
        let outstanding: HashSet<EntityId> = wants.iter().map(|w| w.id).collect();
        let nothing_wanted = outstanding.is_empty();
        session.wanted.insert(page.from, (page, outstanding));
        self.send(peer, &Frame::Want { page, wants });
        if nothing_wanted {
            // No data will come: the page is complete now.
            self.on_data(peer, page, vec![], vec![]);
        }
    }

    fn on_want(&mut self, peer: PeerId, page: PageRange, wants: Vec<WantEntry>) {
        let Some(session) = self.sessions.get(&peer) else {
            return;
        };
        let (Some(remote), Some(grant)) = (session.remote, session.grant.clone()) else {
            return;
        };
        if wants.len() > remote.page_entities.max(self.config.limits.page_entities) as usize {
            self.refuse(
                peer,
                format!("a Want of {} entities is over the page limit", wants.len()),
                true,
            );
            return;
        }
        self.task(
            peer,
            Pending::Payloads { page },
            Task::LoadPayloads { wants, grant },
        );
    }

    /// Sends loaded payloads in frames that fit the peer's frame limit.
    fn send_data(
        &mut self,
        peer: PeerId,
        page: PageRange,
        loaded: Vec<Payload>,
        skipped: Vec<EntityId>,
    ) {
        let Some(remote) = self.sessions.get(&peer).and_then(|s| s.remote) else {
            return;
        };
        // Leave room for framing within the peer's frame limit.
        let budget = remote.max_frame as usize * 7 / 8;
        let mut payloads = Vec::new();
        let mut size = 0;
        for payload in loaded {
            let len: usize = payload.chunks.iter().map(|c| c.len()).sum::<usize>() + 64;
            if size + len > budget && !payloads.is_empty() {
                self.send(
                    peer,
                    &Frame::Data {
                        page,
                        payloads: std::mem::take(&mut payloads),
                        skipped: vec![],
                    },
                );
                size = 0;
            }
            size += len;
            payloads.push(payload);
        }
        self.send(
            peer,
            &Frame::Data {
                page,
                payloads,
                skipped,
            },
        );
    }

    fn on_data(
        &mut self,
        peer: PeerId,
        page: PageRange,
        payloads: Vec<Payload>,
        skipped: Vec<EntityId>,
    ) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let page_limit = session
            .remote
            .map(|r| r.page_entities)
            .unwrap_or(0)
            .max(self.config.limits.page_entities) as usize;
        if payloads.len() + skipped.len() > page_limit {
            let reason = format!(
                "a Data frame of {} entities is over the page limit of {page_limit}",
                payloads.len() + skipped.len()
            );
            self.refuse(peer, reason, true);
            return;
        }
        let Some((_, outstanding)) = session.wanted.get_mut(&page.from) else {
            SecurityStats::bump(&self.security.frames_ignored);
            return; // data for a page already complete: a replay
        };
        // Only what is still outstanding counts; repeats are dropped.
        let payloads: Vec<Payload> = payloads
            .into_iter()
            .filter(|p| outstanding.remove(&p.id))
            .collect();
        for id in &skipped {
            outstanding.remove(id);
        }
        if !payloads.is_empty() {
            *session.verifying.entry(page.from).or_default() += 1;
            self.task(peer, Pending::Verify { page }, Task::Verify { payloads });
        }
        self.maybe_complete(peer, page);
    }

    fn verified(&mut self, peer: PeerId, page: PageRange, result: Result<Vec<Incoming>, String>) {
        let items = match result {
            Ok(items) => items,
            Err(reason) => {
                self.refuse(peer, reason, true);
                return;
            }
        };
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if let Some(n) = session.verifying.get_mut(&page.from) {
            *n -= 1;
            if *n == 0 {
                session.verifying.remove(&page.from);
            }
        }
        session.ready.extend(items);
        self.maybe_complete(peer, page);
        self.apply_next(peer);
    }

    /// A page whose data all came and was checked waits for the next apply.
    fn maybe_complete(&mut self, peer: PeerId, page: PageRange) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let complete = session
            .wanted
            .get(&page.from)
            .is_some_and(|(_, o)| o.is_empty())
            && !session.verifying.contains_key(&page.from);
        if complete {
            session.wanted.remove(&page.from);
            session.ready_pages.push(page);
        }
        self.apply_next(peer);
    }

    /// Starts the session's next apply if none runs: everything checked so far, and the
    /// checkpoint over the pages it completes.
    fn apply_next(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        if session.applying.is_some()
            || (session.ready.is_empty() && session.ready_pages.is_empty())
        {
            return;
        }
        let Some(grant) = session.grant.clone() else {
            return;
        };
        let items = std::mem::take(&mut session.ready);
        let pages = std::mem::take(&mut session.ready_pages);
        let checkpoint = advance(&session.done_pages, session.checkpoint, &pages).0;
        let checkpoint = (checkpoint > session.checkpoint).then_some(checkpoint);
        session.applying = Some(pages);
        self.task(
            peer,
            Pending::Apply,
            Task::Apply {
                peer,
                items,
                checkpoint,
                grant,
            },
        );
    }

    /// An apply is durable: the pages it completed count, the checkpoint moves and is
    /// acknowledged.
    fn applied(&mut self, peer: PeerId) {
        let Some(session) = self.sessions.get_mut(&peer) else {
            return;
        };
        let Some(pages) = session.applying.take() else {
            return;
        };
        let (checkpoint, done_pages) = advance(&session.done_pages, session.checkpoint, &pages);
        let moved = checkpoint > session.checkpoint;
        session.done_pages = done_pages;
        session.checkpoint = checkpoint;
        if !pages.is_empty() {
            let total = session.target.saturating_sub(session.started_at);
            let done = checkpoint.saturating_sub(session.started_at).min(total);
            self.events
                .push_back(Event::SyncProgress { peer, done, total });
        }
        if !session.completed && session.remote.is_some() && checkpoint >= session.target {
            session.completed = true;
            self.events.push_back(Event::SyncCompleted { peer });
        }
        if moved || !pages.is_empty() {
            self.send(peer, &Frame::Ack { upto: checkpoint });
        }
        self.apply_next(peer);
    }

    fn note_refused_writes(
        &mut self,
        peer: PeerId,
        refused: Vec<fieldsync_core::membership::Refusal>,
    ) {
        if refused.is_empty() {
            return;
        }
        for r in &refused {
            SecurityStats::bump(&self.security.writes_refused);
            if matches!(r.kind, RefusalKind::Forged | RefusalKind::Rollback) {
                SecurityStats::bump(&self.security.forged_refused);
            }
            tracing::warn!(%peer, kind = r.kind.name(), reason = %r.reason, "write refused");
        }
        let reasons = refused.into_iter().map(|r| r.reason).collect();
        self.events
            .push_back(Event::WritesRefused { peer, reasons });
    }
}

/// The checkpoint after `pages` complete, and the complete pages still ahead of it.
fn advance(
    done: &BTreeMap<u64, u64>,
    checkpoint: u64,
    pages: &[PageRange],
) -> (u64, BTreeMap<u64, u64>) {
    let mut done = done.clone();
    for p in pages {
        done.insert(p.from, p.upto);
    }
    let mut at = checkpoint;
    while let Some(upto) = done.remove(&at) {
        at = upto;
    }
    (at, done)
}
