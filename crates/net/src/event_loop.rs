//! The task that owns the swarm and the engine: it turns swarm events, stream frames, timer
//! ticks and finished storage tasks into engine inputs, and the engine's frames and events
//! into stream writes, bans, circuit reservations and notices. The shape of rust-libp2p's
//! file-sharing example: one struct holds what the loop knows, one method per kind of input.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fieldsync::sync::{Engine, Event, Input, Outcome, SecurityStats, Task, TaskId};
use fieldsync::sync_host::{self, Watch};
use fieldsync::Replica;
use futures::{AsyncReadExt as _, StreamExt as _};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{mdns, Multiaddr, PeerId, Swarm};
use rand::Rng as _;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::streams::{spawn_reader, spawn_writer, StreamSide};
use crate::swarm::{Admitted, Behaviour, BehaviourEvent};
use crate::{
    peer_of, relay_of, Config, Error, Notice, Stats, CLOSE_GRACE, FLUSH_TIMEOUT, MAX_BANNED,
    MAX_EXTRA_STREAMS, MAX_OPEN_ATTEMPTS, OPEN_TIMEOUT, PROTOCOL, SEND_BUDGET_KIB,
    SESSION_COOLDOWN, WRITER_QUEUE,
};

/// What the event loop receives from stream tasks and the app.
#[derive(Debug)]
pub(crate) enum Owned {
    /// Fetch an attachment's file from the connected peers (see `Handle::fetch_blob`).
    FetchBlob {
        hash: fieldsync::blobs::Hash,
        /// A peer not to ask (the one this fetch is for).
        exclude: Option<PeerId>,
        /// Whether the peers asked may fetch it from their own peers first.
        forward: bool,
        reply: tokio::sync::oneshot::Sender<Result<u64, crate::FetchError>>,
    },
    /// A received frame with its share of the receive budget, released once handled.
    Frame {
        peer: PeerId,
        gen: u64,
        bytes: Vec<u8>,
        budget: OwnedSemaphorePermit,
    },
    Closed {
        peer: PeerId,
        gen: u64,
    },
    Opened {
        peer: PeerId,
        stream: libp2p::Stream,
    },
    /// The peer sent frames faster than allowed or an oversized frame.
    Hostile {
        peer: PeerId,
        gen: u64,
        reason: String,
    },
    /// A session's writer wrote everything queued and closed its half of the stream.
    WriterClosed {
        peer: PeerId,
    },
    /// Opening the sync stream failed; `unsupported` if the peer does not speak it.
    OpenFailed {
        peer: PeerId,
        error: String,
    },
    LocalChange,
}

/// Storage tasks of the engine whose results have not been read yet; more wait in the
/// pool (the engine bounds them: a feed read and an apply per session, a window of pages).
const IO_RESULTS_QUEUE: usize = 256;

/// The engine with what drives it: the replica its storage tasks run on (on tokio's
/// blocking pool, so the event loop never waits on fsync or Automerge), the member list
/// watch, and the clock.
struct Core {
    engine: Engine,
    replica: Arc<Replica>,
    watch: Watch,
    started: std::time::Instant,
    results: mpsc::Sender<(TaskId, Outcome)>,
}

impl Core {
    fn handle(&mut self, input: Input) -> Result<(), Error> {
        let now = sync_host::now(&self.replica, self.started.elapsed());
        for change in self.watch.poll(&self.replica)? {
            self.engine.handle(now, change);
        }
        self.engine.handle(now, input);
        for change in self.watch.poll(&self.replica)? {
            self.engine.handle(now, change);
        }
        while let Some((id, task)) = self.engine.poll_io() {
            self.spawn(id, task);
        }
        Ok(())
    }

    fn spawn(&self, id: TaskId, task: Task) {
        let (replica, results) = (self.replica.clone(), self.results.clone());
        tokio::task::spawn_blocking(move || {
            let outcome = sync_host::run_task(&replica, task);
            // Waits while the loop is behind on results: the queue stays bounded.
            let _ = results.blocking_send((id, outcome));
        });
    }
}

struct Session {
    gen: u64,
    /// Frames with their share of the send budget, released once written.
    writer: mpsc::Sender<(Vec<u8>, OwnedSemaphorePermit)>,
}

struct Redial {
    addr: Multiaddr,
    failures: u32,
    due: Option<tokio::time::Instant>,
    connection: Option<ConnectionId>,
}

impl Redial {
    fn now(addr: Multiaddr) -> Self {
        Redial {
            addr,
            failures: 0,
            due: Some(tokio::time::Instant::now()),
            connection: None,
        }
    }

    /// The next attempt: exponential backoff with jitter.
    fn schedule(&mut self, config: &Config) {
        self.failures = self.failures.saturating_add(1);
        let base = config
            .min_backoff
            .saturating_mul(1u32 << self.failures.min(16))
            .min(config.max_backoff);
        let jitter = rand::rng().random_range(0.5..1.5);
        self.due = Some(tokio::time::Instant::now() + base.mul_f64(jitter));
    }
}

/// The event loop's bookkeeping of peers, beyond the engine's sessions. Every map is
/// bounded: by the connection limit (peers with a connection) or by `MAX_BANNED`.
#[derive(Default)]
struct Peers {
    /// Refused peers and until when.
    banned: HashMap<PeerId, tokio::time::Instant>,
    /// Refused peers whose connections close once their `Goodbye` is written, or at this time.
    closing: HashMap<PeerId, tokio::time::Instant>,
    /// Extra sync streams opened per peer.
    extra_streams: HashMap<PeerId, u32>,
    /// Peers with at least one connection, and those this node is opening a stream to.
    connected: HashSet<PeerId>,
    opening: HashSet<PeerId>,
    /// Peers with a connection this node dialed: it proves itself first to them.
    dialed: HashSet<PeerId>,
    /// Failed attempts to open the sync stream, and peers given up on (until they reconnect).
    open_failures: HashMap<PeerId, u32>,
    gave_up: HashSet<PeerId>,
    /// Relays this node holds a circuit reservation on (or is making one).
    circuits: HashSet<PeerId>,
    /// Peers whose session failed recently are not reopened before this time.
    cooldown: HashMap<PeerId, tokio::time::Instant>,
    /// Peers that refused this node's membership: redials to them keep backing off (up to
    /// `max_backoff`) until one welcomes it, instead of looping at the shortest delay.
    refused_us: HashSet<PeerId>,
    /// Sessions whose peer's last connection closed: their reader still hands over the
    /// frames that arrived before (a refusal's `Goodbye`) and then ends the session; if it
    /// has not by this time, the session ends anyway.
    lingering: HashMap<PeerId, (u64, tokio::time::Instant)>,
}

impl Peers {
    /// Everything about a peer whose last connection closed, but its ban.
    fn forget(&mut self, peer: &PeerId) {
        self.connected.remove(peer);
        self.dialed.remove(peer);
        self.circuits.remove(peer);
        self.open_failures.remove(peer);
        self.gave_up.remove(peer);
        self.closing.remove(peer);
    }

    /// Refuses a peer until `for_how_long` passed. Its session is already gone (its writer
    /// flushes the `Goodbye`); its connections close once that is written, or after
    /// [`FLUSH_TIMEOUT`].
    fn ban(&mut self, security: &SecurityStats, peer: PeerId, for_how_long: Duration) {
        let now = tokio::time::Instant::now();
        if self.banned.len() >= MAX_BANNED && !self.banned.contains_key(&peer) {
            if let Some(soonest) = self
                .banned
                .iter()
                .min_by_key(|(_, until)| **until)
                .map(|(p, _)| *p)
            {
                self.banned.remove(&soonest);
            }
        }
        if self.banned.insert(peer, now + for_how_long).is_none() {
            security
                .peers_banned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(%peer, secs = for_how_long.as_secs(), "peer disconnected and refused for a while");
        }
        if self.connected.contains(&peer) {
            self.closing.insert(peer, now + FLUSH_TIMEOUT);
        }
    }
}

/// What a drain found: peers whose session failed, of those the refused (to be banned), the
/// admitted, and those whose catch-up started (they welcomed this node).
#[derive(Default)]
struct Drained {
    failed: Vec<PeerId>,
    refused: Vec<PeerId>,
    admitted: Vec<PeerId>,
    started: Vec<PeerId>,
    /// Peers that refused this node.
    refused_us: Vec<PeerId>,
}

/// Everything the node's owner task holds.
pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    control: libp2p_stream::Control,
    incoming: libp2p_stream::IncomingStreams,
    /// Requests for attachment files (`/fieldsync/blobs/2`), and the files being served.
    blob_requests: libp2p_stream::IncomingStreams,
    serving: Arc<Semaphore>,
    /// What this node may send of files, all transfers together.
    send_limit: Arc<crate::blobs::SendLimit>,
    core: Core,
    io_results: mpsc::Receiver<(TaskId, Outcome)>,
    config: Config,
    local: PeerId,
    /// Where stream tasks and the app send (a clone of the inbox's sender).
    inputs: mpsc::Sender<Owned>,
    inbox: mpsc::Receiver<Owned>,
    stats: Arc<Stats>,
    notices: mpsc::Sender<Notice>,
    admitted: Admitted,
    peers: Peers,
    sessions: HashMap<PeerId, Session>,
    send_budget: Arc<Semaphore>,
    recv_budget: Arc<Semaphore>,
    next_gen: u64,
    redials: Vec<Redial>,
}

/// What [`EventLoop::new`] is built from.
pub(crate) struct Parts {
    pub replica: Arc<Replica>,
    pub config: Config,
    pub swarm: Swarm<Behaviour>,
    pub engine: Engine,
    pub inputs: mpsc::Sender<Owned>,
    pub inbox: mpsc::Receiver<Owned>,
    pub stats: Arc<Stats>,
    pub notices: mpsc::Sender<Notice>,
    pub admitted: Admitted,
}

impl EventLoop {
    pub(crate) fn new(parts: Parts) -> Result<Self, Error> {
        let Parts {
            replica,
            config,
            mut swarm,
            engine,
            inputs,
            inbox,
            stats,
            notices,
            admitted,
        } = parts;
        let mut control = swarm.behaviour_mut().stream.new_control();
        let incoming = control
            .accept(PROTOCOL)
            .map_err(|e| Error::Setup(e.to_string()))?;
        let blob_requests = control
            .accept(crate::BLOB_PROTOCOL)
            .map_err(|e| Error::Setup(e.to_string()))?;
        let (results, io_results) = mpsc::channel(IO_RESULTS_QUEUE);
        let core = Core {
            engine,
            watch: Watch::new(&replica),
            replica,
            started: std::time::Instant::now(),
            results,
        };
        let redials = config.dial.iter().cloned().map(Redial::now).collect();
        Ok(EventLoop {
            local: *swarm.local_peer_id(),
            swarm,
            control,
            incoming,
            blob_requests,
            serving: Arc::new(Semaphore::new(crate::blobs::MAX_SERVING)),
            send_limit: Arc::new(crate::blobs::SendLimit::new(
                config.blob_send_rate,
                stats.clone(),
            )),
            core,
            io_results,
            config,
            inputs,
            inbox,
            stats,
            notices,
            admitted,
            peers: Peers::default(),
            sessions: HashMap::new(),
            send_budget: Arc::new(Semaphore::new(SEND_BUDGET_KIB)),
            recv_budget: Arc::new(Semaphore::new(crate::RECV_BUDGET_KIB)),
            next_gen: 0,
            redials,
        })
    }

    /// Runs until `shutdown` resolves (or the store fails).
    pub(crate) async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => self.on_tick()?,
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                Some((peer, stream)) = self.incoming.next() => self.on_incoming(peer, stream)?,
                Some((peer, stream)) = self.blob_requests.next() => self.on_blob_request(peer, stream),
                Some(msg) = self.inbox.recv() => self.on_owned(msg)?,
                Some((id, outcome)) = self.io_results.recv() => self.core.handle(Input::IoDone(id, outcome))?,
            }
            self.after_input().await?;
        }
        Ok(())
    }

    fn on_tick(&mut self) -> Result<(), Error> {
        let now = tokio::time::Instant::now();
        self.peers.cooldown.retain(|_, until| *until > now);
        self.peers.banned.retain(|_, until| *until > now);
        // Refused peers whose Goodbye did not drain in time are cut off anyway.
        let late: Vec<PeerId> = self
            .peers
            .closing
            .iter()
            .filter(|(_, by)| **by <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            self.peers.closing.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let ended: Vec<(PeerId, u64)> = self
            .peers
            .lingering
            .iter()
            .filter(|(_, (_, by))| *by <= now)
            .map(|(p, (g, _))| (*p, *g))
            .collect();
        for (peer, gen) in ended {
            self.peers.lingering.remove(&peer);
            self.end_session(peer, gen)?;
        }
        // Timers: a peer must prove itself in time, or the engine sends it away. Also how
        // writes the app made without telling reach the engine.
        self.core.handle(Input::Tick)?;
        self.open_streams();
        self.redial(now);
        Ok(())
    }

    /// One session per pair: the lower peer id opens it, and retries until it exists or
    /// the peer proved it does not speak the protocol.
    fn open_streams(&mut self) {
        let peers = &self.peers;
        let to_open: Vec<PeerId> = peers
            .connected
            .iter()
            .filter(|p| {
                self.local < **p
                    && !self.sessions.contains_key(p)
                    && !peers.opening.contains(p)
                    && !peers.cooldown.contains_key(p)
                    && !peers.banned.contains_key(p)
                    && !peers.gave_up.contains(p)
            })
            .copied()
            .collect();
        for peer in to_open {
            self.peers.opening.insert(peer);
            let (mut control, tx) = (self.control.clone(), self.inputs.clone());
            tokio::spawn(async move {
                // Bounded: with simultaneous dials the chosen connection can close under
                // the request, which would otherwise wait forever.
                match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PROTOCOL)).await
                {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Owned::Opened { peer, stream }).await;
                    }
                    result => {
                        let error = result
                            .map(|r| r.err().map(|e| e.to_string()).unwrap_or_default())
                            .unwrap_or_else(|_| "timed out".into());
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let _ = tx.send(Owned::OpenFailed { peer, error }).await;
                    }
                }
            });
        }
    }

    fn redial(&mut self, now: tokio::time::Instant) {
        for r in self
            .redials
            .iter_mut()
            .filter(|r| r.connection.is_none() && r.due.is_some_and(|d| d <= now))
        {
            let opts = DialOpts::unknown_peer_id().address(r.addr.clone()).build();
            r.connection = Some(opts.connection_id());
            r.due = None;
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(addr = %r.addr, %e, "dial failed");
                r.connection = None;
                r.schedule(&self.config);
            }
        }
    }

    fn redial_of(&mut self, connection: ConnectionId) -> Option<&mut Redial> {
        self.redials
            .iter_mut()
            .find(|r| r.connection == Some(connection))
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                // A relay is reachable where it listens; devices' circuit reservations need
                // those addresses.
                let circuit = address
                    .iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit));
                if self.config.relay_server && !circuit {
                    self.swarm.add_external_address(address.clone());
                }
                // Relayed addresses already end in this node's id.
                let full = if peer_of(&address) == Some(self.local) {
                    address
                } else {
                    address.with(libp2p::multiaddr::Protocol::P2p(self.local))
                };
                tracing::info!(%full, "listening");
                self.notify(Notice::Listening(full));
            }
            SwarmEvent::ListenerClosed {
                addresses,
                reason: Err(e),
                ..
            } => {
                // A circuit reservation the relay refused (or lost): retried once the next
                // session with that relay starts.
                for relay_peer in addresses.iter().filter_map(relay_of) {
                    tracing::warn!(relay = %relay_peer, %e, "circuit reservation ended");
                    self.peers.circuits.remove(&relay_peer);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                let refused_us = self.peers.refused_us.contains(&peer_id);
                if let Some(r) = self.redial_of(connection_id) {
                    if !refused_us {
                        r.failures = 0;
                    }
                }
                if self.peers.banned.contains_key(&peer_id) {
                    tracing::info!(peer = %peer_id, "connection from a refused peer closed");
                    self.swarm.close_connection(connection_id);
                    return;
                }
                tracing::debug!(peer = %peer_id, %connection_id, "connection established");
                self.peers.connected.insert(peer_id);
                if endpoint.is_dialer() {
                    self.peers.dialed.insert(peer_id);
                }
                // The lower peer id opens the sync stream now, not on the next tick (up to
                // 100 ms of every reconnect); ticks retry if it fails.
                self.open_streams();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(peer = %peer_id, %connection_id, num_established, ?cause, "connection closed");
                let config = self.config.clone();
                if let Some(r) = self.redial_of(connection_id) {
                    r.connection = None;
                    r.schedule(&config);
                }
                if num_established == 0 {
                    self.peers.forget(&peer_id);
                    self.admitted_mut().remove(&peer_id);
                    // Not ended here: frames read before the close may still be queued
                    // behind this event (the reader ends the session after them).
                    if let Some(s) = self.sessions.get(&peer_id) {
                        let by = tokio::time::Instant::now() + FLUSH_TIMEOUT;
                        self.peers.lingering.insert(peer_id, (s.gen, by));
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                let config = self.config.clone();
                if let Some(r) = self.redial_of(connection_id) {
                    tracing::debug!(addr = %r.addr, %error, "connection failed");
                    r.connection = None;
                    r.schedule(&config);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    tracing::info!(%peer, %addr, "discovered on the LAN");
                    // Only the lower peer id dials: two devices that find each other at the
                    // same moment would otherwise cross dials and both fail. The redial
                    // list retries with backoff until connected.
                    if self.local < peer && !self.redials.iter().any(|r| r.addr == addr) {
                        self.redials.push(Redial::now(addr));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                for (peer, addr) in gone {
                    tracing::info!(%peer, %addr, "gone from the LAN");
                    self.redials
                        .retain(|r| r.addr != addr || r.connection.is_some());
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::RelayServer(event)) => {
                tracing::debug!(?event, "relay");
            }
            _ => {}
        }
    }

    fn on_incoming(&mut self, peer: PeerId, stream: libp2p::Stream) -> Result<(), Error> {
        self.end_lingering(peer)?;
        if self.peers.banned.contains_key(&peer) {
            drop(stream);
        } else if self.sessions.contains_key(&peer) {
            let n = self.peers.extra_streams.entry(peer).or_default();
            *n += 1;
            if *n > MAX_EXTRA_STREAMS {
                tracing::warn!(%peer, "peer keeps opening sync streams; refused");
                let why = format!("more than {MAX_EXTRA_STREAMS} extra sync streams");
                self.core.handle(Input::Violation(peer, why))?;
            }
        } else {
            self.attach(peer, stream)?;
        }
        Ok(())
    }

    /// Serves a file on its own stream and task: a file moving never holds up the sync loop.
    fn on_blob_request(&mut self, peer: PeerId, stream: libp2p::Stream) {
        let admitted = self.admitted_mut().contains(&peer);
        match self.serving.clone().try_acquire_owned() {
            Ok(permit) => {
                let (replica, inputs) = (self.core.replica.clone(), self.inputs.clone());
                let limit = self.send_limit.clone();
                tokio::spawn(async move {
                    crate::blobs::serve(replica, peer, admitted, stream, inputs, limit).await;
                    drop(permit);
                });
            }
            Err(_) => tracing::info!(%peer, "blob request dropped: serving the most at once"),
        }
    }

    /// Fetches a file from the admitted peers (but `exclude`) on a task of its own.
    fn fetch_blob(
        &mut self,
        hash: fieldsync::blobs::Hash,
        exclude: Option<PeerId>,
        forward: bool,
        reply: tokio::sync::oneshot::Sender<Result<u64, crate::FetchError>>,
    ) {
        let candidates: Vec<PeerId> = {
            let admitted = self.admitted_mut();
            self.peers
                .connected
                .iter()
                .filter(|p| admitted.contains(p) && Some(**p) != exclude)
                .copied()
                .collect()
        };
        let (replica, control, stats) = (
            self.core.replica.clone(),
            self.control.clone(),
            self.stats.clone(),
        );
        stats
            .blobs_in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let result =
                crate::blobs::fetch(replica, control, candidates, hash, forward, stats.clone())
                    .await;
            stats
                .blobs_in_flight
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            if result.is_ok() {
                stats
                    .blobs_fetched
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let _ = reply.send(result);
        });
    }

    fn on_owned(&mut self, msg: Owned) -> Result<(), Error> {
        match msg {
            Owned::FetchBlob {
                hash,
                exclude,
                forward,
                reply,
            } => self.fetch_blob(hash, exclude, forward, reply),
            Owned::Opened { peer, stream } => {
                self.peers.opening.remove(&peer);
                self.peers.open_failures.remove(&peer);
                self.end_lingering(peer)?;
                if !self.peers.banned.contains_key(&peer) {
                    self.attach(peer, stream)?;
                }
            }
            Owned::Hostile { peer, gen, reason } => {
                if self.is_session(peer, gen) {
                    // The engine says goodbye with the reason; the drain after it bans.
                    self.core.handle(Input::Violation(peer, reason))?;
                }
            }
            Owned::WriterClosed { peer } => {
                // The Goodbye is with the muxer, not yet on the wire: closing the connection
                // at once can drop it, so close on a later tick.
                if let Some(by) = self.peers.closing.get_mut(&peer) {
                    *by = (*by).min(tokio::time::Instant::now() + CLOSE_GRACE);
                }
            }
            Owned::OpenFailed { peer, error } => {
                self.peers.opening.remove(&peer);
                if self.peers.connected.contains(&peer) {
                    let n = self.peers.open_failures.entry(peer).or_default();
                    *n += 1;
                    if *n >= MAX_OPEN_ATTEMPTS {
                        tracing::warn!(%peer, %error, attempts = *n, "cannot open the sync stream; giving up on this peer until it reconnects");
                        self.peers.open_failures.remove(&peer);
                        self.peers.gave_up.insert(peer);
                    } else {
                        tracing::warn!(%peer, %error, attempt = *n, "cannot open the sync stream; will retry");
                    }
                }
            }
            Owned::Frame {
                peer,
                gen,
                bytes,
                budget,
            } => {
                if self.is_session(peer, gen) {
                    self.core.handle(Input::Frame(peer, bytes))?;
                }
                drop(budget);
            }
            Owned::Closed { peer, gen } => {
                if self
                    .peers
                    .lingering
                    .get(&peer)
                    .is_some_and(|(g, _)| *g == gen)
                {
                    self.peers.lingering.remove(&peer);
                }
                self.end_session(peer, gen)?;
            }
            Owned::LocalChange => {
                let feed_seq = self.core.replica.feed_seq();
                self.core.handle(Input::LocalChange { feed_seq })?;
            }
        }
        Ok(())
    }

    fn is_session(&self, peer: PeerId, gen: u64) -> bool {
        self.sessions.get(&peer).is_some_and(|s| s.gen == gen)
    }

    /// Ends session `gen` with `peer`, if it is still the current one.
    fn end_session(&mut self, peer: PeerId, gen: u64) -> Result<(), Error> {
        if self.is_session(peer, gen) {
            self.sessions.remove(&peer);
            self.admitted_mut().remove(&peer);
            self.core.handle(Input::Disconnected(peer))?;
            self.notify(Notice::PeerDisconnected(peer));
        }
        Ok(())
    }

    /// Ends a session whose connection closed and that still waits for its reader: a new
    /// stream from the same peer replaces it.
    fn end_lingering(&mut self, peer: PeerId) -> Result<(), Error> {
        if let Some((gen, _)) = self.peers.lingering.remove(&peer) {
            self.end_session(peer, gen)?;
        }
        Ok(())
    }

    /// Starts a session on a sync stream: its writer and reader tasks, and the engine's.
    fn attach(&mut self, peer: PeerId, stream: libp2p::Stream) -> Result<(), Error> {
        if self.sessions.contains_key(&peer) {
            tracing::debug!(%peer, "extra sync stream dropped");
            return Ok(()); // one session per peer; the extra stream is dropped
        }
        let dialed = self.peers.dialed.contains(&peer);
        tracing::debug!(%peer, dialed, "sync stream attached");
        self.next_gen += 1;
        let side = StreamSide {
            peer,
            gen: self.next_gen,
            to_loop: self.inputs.clone(),
            stats: self.stats.clone(),
            max_frame: fieldsync::core::protocol::Limits::default().max_frame as usize,
        };
        let (read, write) = stream.split();
        let (writer, frames) = mpsc::channel(WRITER_QUEUE);
        spawn_writer(side.clone(), write, frames);
        spawn_reader(
            side,
            read,
            self.recv_budget.clone(),
            self.config.max_frames_per_sec,
        );
        self.sessions.insert(
            peer,
            Session {
                gen: self.next_gen,
                writer,
            },
        );
        self.core.handle(if dialed {
            Input::Dialed(peer)
        } else {
            Input::Connected(peer)
        })?;
        self.notify(Notice::PeerConnected(peer));
        Ok(())
    }

    /// After every input: send what the engine queued, then act on what it reported.
    async fn after_input(&mut self) -> Result<(), Error> {
        let out = self.drain().await?;
        {
            let mut admitted = self.admitted_mut();
            for peer in &out.admitted {
                admitted.insert(*peer);
            }
            for peer in out.failed.iter().chain(&out.refused) {
                admitted.remove(peer);
            }
        }
        for peer in out.failed {
            let until = tokio::time::Instant::now() + SESSION_COOLDOWN;
            self.peers.cooldown.insert(peer, until);
        }
        for peer in out.refused {
            self.peers.ban(&self.stats.security, peer, self.config.ban);
        }
        for peer in out.refused_us {
            if self.peers.refused_us.len() < MAX_BANNED {
                self.peers.refused_us.insert(peer);
            }
        }
        for peer in out.started {
            self.peers.refused_us.remove(&peer);
            self.reserve_circuit(peer);
        }
        let sessions = &self.sessions;
        self.peers
            .extra_streams
            .retain(|p, _| sessions.contains_key(p));
        Ok(())
    }

    /// Reserves a circuit on a configured relay once it welcomed this node (it admitted us,
    /// so it will grant the reservation), once per relay connection.
    fn reserve_circuit(&mut self, peer: PeerId) {
        let relays: Vec<Multiaddr> = self
            .config
            .circuit_relays
            .iter()
            .filter(|a| peer_of(a) == Some(peer))
            .cloned()
            .collect();
        for relay_addr in relays {
            if self.peers.circuits.insert(peer) {
                let circuit = relay_addr.with(libp2p::multiaddr::Protocol::P2pCircuit);
                if let Err(e) = self.swarm.listen_on(circuit.clone()) {
                    tracing::warn!(%circuit, %e, "cannot listen through the relay");
                    self.peers.circuits.remove(&peer);
                }
            }
        }
    }

    /// Sends every queued frame to its stream's writer and reports every event.
    async fn drain(&mut self) -> Result<Drained, Error> {
        let mut out = Drained::default();
        loop {
            while let Some((peer, bytes)) = self.core.engine.poll_transmit() {
                if let Some(s) = self.sessions.get(&peer) {
                    // Waiting here is the backpressure of slow peers (queues and bytes are
                    // bounded).
                    let kib = (bytes.len() >> 10).clamp(1, SEND_BUDGET_KIB) as u32;
                    let Ok(permit) = self.send_budget.clone().acquire_many_owned(kib).await else {
                        continue;
                    };
                    if s.writer.send((bytes, permit)).await.is_err() {
                        // The stream is gone: end the engine's session too (its reader's
                        // own notice will no longer match a session).
                        self.sessions.remove(&peer);
                        self.core.handle(Input::Disconnected(peer))?;
                        self.notify(Notice::PeerDisconnected(peer));
                    }
                }
            }
            let Some(event) = self.core.engine.poll_event() else {
                return Ok(out);
            };
            match &event {
                Event::StorageFailed { reason } => return Err(Error::Storage(reason.clone())),
                Event::PeerRefused { peer, .. } => out.refused.push(*peer),
                Event::PeerAdmitted { peer } => out.admitted.push(*peer),
                Event::SyncStarted { peer, .. } => out.started.push(*peer),
                Event::Refused { peer, .. } => out.refused_us.push(*peer),
                Event::SessionFailed { peer, reason } => {
                    tracing::warn!(%peer, %reason, "sync session ended");
                    // Dropping the writer flushes what is queued (the Goodbye) and closes
                    // the stream; the connection idles out, or closes at once if banned.
                    if self.sessions.remove(peer).is_some() {
                        self.notify(Notice::PeerDisconnected(*peer));
                    }
                    out.failed.push(*peer);
                }
                _ => {}
            }
            self.notify(Notice::Sync(event));
        }
    }

    fn admitted_mut(&self) -> std::sync::MutexGuard<'_, HashSet<PeerId>> {
        self.admitted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, notice: Notice) {
        if self.notices.try_send(notice).is_err() {
            tracing::debug!("notice queue full; notice dropped");
        }
    }
}
