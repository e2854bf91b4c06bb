//! fieldsync-net: puts the sans-IO sync engine on libp2p.
//!
//! One task owns the libp2p swarm and the [`Engine`]; per peer, one stream of the
//! `/fieldsync/sync/1` protocol carries the engine's frames, each prefixed with its length
//! (u32, big-endian). The peer with the lower peer id opens the stream, so a pair has one
//! session however many connections it has. Readers and writers of streams are tasks that
//! talk to the owner through bounded channels.
//!
//! Transports: TCP and QUIC, noise, yamux; identify and ping; a connection limit; mDNS LAN
//! discovery only when [`Config::mdns`] is set. Configured peers are redialled with
//! exponential backoff and jitter.
//!
//! Refusals: the engine's `Goodbye` is written and the stream closed before the connection
//! is (flush, close the stream, then the connection a moment later; at most [`FLUSH_TIMEOUT`]), so the refused peer reads
//! why. A relay serves circuit relay v2 only to peers its engine admitted, unless
//! [`Config::open_relay`] is set.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fieldsync::core::protocol::Role;
use fieldsync::sync::{
    Config as EngineConfig, Engine, Event, Input, Outcome, SecurityStats, Task, TaskId,
};
use fieldsync::sync_host::{self, Watch};
use fieldsync::Replica;
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    dcutr, identify, mdns, noise, ping, relay, tcp, yamux, Multiaddr, PeerId, StreamProtocol,
};
use rand::Rng as _;
use tokio::sync::mpsc;

mod blobs;
pub use blobs::{FetchError, BLOB_PROTOCOL};

/// The sync protocol's libp2p name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/fieldsync/sync/1");

/// Frames a stream's writer may queue before the owner waits for it.
const WRITER_QUEUE: usize = 256;
/// KiB of frames queued for all writers together before the owner waits for them: bounds a
/// relay's memory however many slow devices it serves (each may have a window of pages in
/// flight). Far above one peer's window, so one stalled peer cannot hold it all.
const SEND_BUDGET_KIB: usize = 24 << 10;
/// KiB of received frames held at once by all sessions together, from the length prefix
/// until the engine took the frame.
const RECV_BUDGET_KIB: usize = 24 << 10;
/// Bytes a reader fills at a time (memory follows the bytes that arrived).
const RECV_CHUNK: usize = 64 << 10;
/// Largest first frame of a session: a `Hello` or a `Goodbye` (honest peers send nothing
/// else first), so a stranger cannot make a node buffer a large frame before admission.
pub const MAX_FIRST_FRAME: usize = 64 << 10;
/// Inputs (frames read, app notifications) queued for the owner.
const INPUT_QUEUE: usize = 1024;
/// How long opening the sync stream may take before it is retried.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer whose session failed (wrong workspace, bad frames) is left alone.
const SESSION_COOLDOWN: Duration = Duration::from_secs(10);
/// Sync streams a peer may open beyond its one session before it is refused.
const MAX_EXTRA_STREAMS: u32 = 8;
/// Notices queued for the embedding application; more are dropped (and logged).
pub const NOTICE_QUEUE: usize = 1024;
/// How long a refused peer's `Goodbye` may take to be written before its connections close.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused peer's connection stays open after its `Goodbye` was written, so the
/// muxer puts it on the wire before the connection closes.
const CLOSE_GRACE: Duration = Duration::from_millis(300);
/// How long a peer has to prove its membership after its sync stream opened.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed attempts to open the sync stream before this node gives up on a peer (until it
/// reconnects): a peer that does not speak the protocol is not retried forever.
pub const MAX_OPEN_ATTEMPTS: u32 = 3;
/// Most peers remembered as refused; beyond, the ban that ends soonest is forgotten.
const MAX_BANNED: usize = 4096;

/// Errors of the network layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport could not be set up.
    #[error("network setup failed: {0}")]
    Setup(String),
    /// An address to listen on could not be used.
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    /// The sync engine's store failed.
    #[error(transparent)]
    Replica(#[from] fieldsync::Error),
    /// The store failed under a sync task.
    #[error("storage failed during sync: {0}")]
    Storage(String),
}

/// Network settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Addresses to listen on (e.g. `/ip4/127.0.0.1/tcp/0`).
    pub listen: Vec<Multiaddr>,
    /// Peers to keep connected to (relays, known devices).
    pub dial: Vec<Multiaddr>,
    /// Relays (addresses ending in `/p2p/<id>`) to reserve a circuit on, so devices that
    /// cannot reach this one directly can dial it through the relay (circuit relay v2,
    /// upgraded to a direct connection by DCUtR where the NATs allow).
    pub circuit_relays: Vec<Multiaddr>,
    /// Serve circuit relay v2 to others (relays): reservations and circuits for admitted
    /// members only.
    pub relay_server: bool,
    /// Serve circuit relay v2 to anyone, members or not (default off).
    pub open_relay: bool,
    /// Discover peers on the LAN with mDNS (opt-in).
    pub mdns: bool,
    /// This node's role in the sync protocol.
    pub role: Role,
    /// Most established connections.
    pub max_connections: u32,
    /// First redial delay; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// How long a refused peer (not a member, bad frames, flooding) is kept away.
    pub ban: Duration,
    /// Frames per second a peer may send on average (bursts of twice that pass).
    pub max_frames_per_sec: u32,
    /// TLS for WebSocket: listening on `/tls/ws` (`/wss`) addresses needs a certificate,
    /// and dialing a relay whose certificate no public root signs needs it trusted.
    pub ws_tls: WsTls,
    /// Bytes per second this node sends of attachment files, all peers together (0: as
    /// fast as the link allows). Leaves room on a slow link for sync.
    pub blob_send_rate: u64,
}

/// Certificates for secure WebSocket (DER bytes; the node's config reads them from PEM).
#[derive(Clone, Default)]
pub struct WsTls {
    /// This node's certificate chain (leaf first) and its private key, for `/tls/ws`
    /// listeners; none: such listeners are refused.
    pub server: Option<(Vec<Vec<u8>>, Vec<u8>)>,
    /// Certificates trusted when dialing `/tls/ws` besides the public web roots (a
    /// self-signed relay, a private CA).
    pub trust: Vec<Vec<u8>>,
}

/// Says which certificates are set, never the key.
impl std::fmt::Debug for WsTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTls")
            .field("server_chain", &self.server.as_ref().map(|(c, _)| c.len()))
            .field("trust", &self.trust.len())
            .finish()
    }
}

/// The largest WebSocket message accepted: noise frames, the largest thing a peer sends in
/// one message, are at most 64 KiB.
const MAX_WS_MESSAGE: usize = 1 << 20;

/// The WebSocket transport (`/ws` and `/tls/ws`) over TCP, with noise and yamux as on TCP:
/// browsers reach a node this way.
fn websocket_transport(
    key: &libp2p::identity::Keypair,
    tls: &WsTls,
) -> Result<
    impl libp2p::Transport<
            Output = (PeerId, libp2p::core::muxing::StreamMuxerBox),
            Error = impl std::error::Error + Send + Sync + 'static,
            Dial = impl Send,
            ListenerUpgrade = impl Send,
        > + Send
        + Unpin
        + 'static,
    Error,
> {
    use libp2p::core::upgrade::Version;
    use libp2p::Transport as _;
    use libp2p_websocket::tls as wstls;
    let tls_error = |e: wstls::Error| Error::Setup(format!("WebSocket TLS: {e}"));
    let mut config = wstls::Config::builder();
    for cert in &tls.trust {
        config
            .add_trust(&wstls::Certificate::new(cert.clone()))
            .map_err(tls_error)?;
    }
    if let Some((chain, key)) = &tls.server {
        config
            .server(
                wstls::PrivateKey::new(key.clone()),
                chain.iter().cloned().map(wstls::Certificate::new),
            )
            .map_err(tls_error)?;
    }
    let mut ws = libp2p_websocket::Config::new(tcp::tokio::Transport::new(
        tcp::Config::default().nodelay(true),
    ));
    ws.set_max_data_size(MAX_WS_MESSAGE)
        .set_tls_config(config.finish());
    Ok(ws
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(key).map_err(|e| Error::Setup(e.to_string()))?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, libp2p::core::muxing::StreamMuxerBox::new(muxer))))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![],
            dial: vec![],
            circuit_relays: vec![],
            relay_server: false,
            open_relay: false,
            mdns: false,
            role: Role::Device,
            max_connections: 256,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            ban: Duration::from_secs(60),
            max_frames_per_sec: 2_000,
            ws_tls: WsTls::default(),
            blob_send_rate: 0,
        }
    }
}

/// What the node tells its embedder.
#[derive(Debug, Clone)]
pub enum Notice {
    /// The node listens on this address (with `/p2p/<peer id>` appended).
    Listening(Multiaddr),
    /// A sync session with the peer started.
    PeerConnected(PeerId),
    /// The sync session with the peer ended.
    PeerDisconnected(PeerId),
    /// An event of the sync engine.
    Sync(Event),
}

/// Traffic counters of a node's sync streams.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub bytes_received: AtomicU64,
    /// What the engine and this layer refused.
    pub security: Arc<SecurityStats>,
    /// Attachment files fetched from a peer whose bytes did not hash to what was asked
    /// (dropped, never stored).
    pub blobs_corrupt: Arc<AtomicU64>,
    /// Attachment files fetched from peers and stored.
    pub blobs_fetched: AtomicU64,
    /// Fetches of attachment files running now.
    pub blobs_in_flight: Arc<AtomicU64>,
    /// Bytes of attachment files received from peers.
    pub blob_bytes_received: AtomicU64,
    /// Bytes of attachment files sent to peers.
    pub blob_bytes_sent: Arc<AtomicU64>,
}

/// A handle to a running node: tell it about local writes, read its traffic counters.
#[derive(Clone, Debug)]
pub struct Handle {
    inputs: mpsc::Sender<Owned>,
    pub stats: Arc<Stats>,
}

impl Handle {
    /// Something was written locally: offer it to connected peers.
    pub async fn local_change(&self) {
        let _ = self.inputs.send(Owned::LocalChange).await;
    }

    /// Like [`Self::local_change`], from synchronous code; drops the nudge if the queue is full
    /// (a nudge already queued covers it).
    pub fn try_local_change(&self) {
        let _ = self.inputs.try_send(Owned::LocalChange);
    }

    /// Fetches an attachment's file from the connected peers (over [`BLOB_PROTOCOL`]) into
    /// the blob store; the bytes stored. Nothing is stored unless they hash to `hash`.
    pub async fn fetch_blob(&self, hash: fieldsync::blobs::Hash) -> Result<u64, FetchError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.inputs
            .send(Owned::FetchBlob {
                hash,
                exclude: None,
                forward: true,
                reply,
            })
            .await
            .map_err(|_| FetchError::NoPeer)?;
        answer.await.unwrap_or(Err(FetchError::NoPeer))
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: libp2p::connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_server: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
}

/// What the owner task receives from stream tasks and the app.
#[derive(Debug)]
enum Owned {
    /// Fetch an attachment's file from the connected peers (see [`Handle::fetch_blob`]).
    FetchBlob {
        hash: fieldsync::blobs::Hash,
        /// A peer not to ask (the one this fetch is for).
        exclude: Option<PeerId>,
        /// Whether the peers asked may fetch it from their own peers first.
        forward: bool,
        reply: tokio::sync::oneshot::Sender<Result<u64, FetchError>>,
    },
    /// A received frame with its share of the receive budget, released once handled.
    Frame {
        peer: PeerId,
        gen: u64,
        bytes: Vec<u8>,
        budget: tokio::sync::OwnedSemaphorePermit,
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
    writer: mpsc::Sender<(Vec<u8>, tokio::sync::OwnedSemaphorePermit)>,
}

struct Redial {
    addr: Multiaddr,
    failures: u32,
    due: Option<tokio::time::Instant>,
    connection: Option<ConnectionId>,
}

/// Creates the node's channels: pass the [`Handle`] to the app and the receiver to [`run`].
pub fn channel() -> (Handle, Inbox) {
    let (tx, rx) = mpsc::channel(INPUT_QUEUE);
    let stats = Arc::new(Stats::default());
    (
        Handle {
            inputs: tx.clone(),
            stats: stats.clone(),
        },
        Inbox { tx, rx, stats },
    )
}

/// The node's input queue, consumed by [`run`].
#[derive(Debug)]
pub struct Inbox {
    tx: mpsc::Sender<Owned>,
    rx: mpsc::Receiver<Owned>,
    stats: Arc<Stats>,
}

/// The owner task's bookkeeping of peers, beyond the engine's sessions. Every map is bounded:
/// by the connection limit (peers with a connection) or by `MAX_BANNED`.
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

/// Peers the engine admitted: the relay serves circuits to these only.
type Admitted = Arc<std::sync::Mutex<HashSet<PeerId>>>;

/// A relay rate limiter that lets admitted members through and counts everyone else.
fn members_only(
    admitted: Admitted,
    security: Arc<SecurityStats>,
    what: &'static str,
) -> Box<dyn relay::RateLimiter> {
    Box::new(move |peer: PeerId, _addr: &Multiaddr, _now| {
        let ok = admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer);
        if !ok {
            security.relay_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, what, "circuit relay refused to a peer that is not an admitted member");
        }
        ok
    })
}

/// Runs the node until `shutdown` resolves.
pub async fn run(
    replica: Arc<Replica>,
    config: Config,
    inbox: Inbox,
    notices: mpsc::Sender<Notice>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let keypair = replica.keypair();
    let local = keypair.public().to_peer_id();
    let mdns_on = config.mdns;
    let relay_server = config.relay_server;
    let max_connections = config.max_connections;
    check_secure_websocket(&config.listen, &config.ws_tls)?;
    let Inbox {
        tx: inputs,
        rx: mut inbox,
        stats,
    } = inbox;
    let admitted: Admitted = Arc::default();
    let relay_config = {
        let mut c = relay::Config::default();
        if !config.open_relay {
            c.reservation_rate_limiters.push(members_only(
                admitted.clone(),
                stats.security.clone(),
                "reservation",
            ));
            c.circuit_src_rate_limiters.push(members_only(
                admitted.clone(),
                stats.security.clone(),
                "circuit",
            ));
        }
        c
    };
    let websocket = websocket_transport(&keypair, &config.ws_tls)?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_quic()
        .with_other_transport(|_| websocket)
        .map_err(|never: std::convert::Infallible| -> Error { match never {} })?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let id = key.public().to_peer_id();
            // Query every 5 s (libp2p's default is 5 min): a device that missed the first
            // announcement still finds its peers quickly.
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config {
                        query_interval: Duration::from_secs(5),
                        ..Default::default()
                    },
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(
                    libp2p::connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max_connections)),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/fieldsync/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                stream: libp2p_stream::Behaviour::new(),
                mdns: Toggle::from(mdns),
                relay_server: Toggle::from(
                    relay_server.then(|| relay::Behaviour::new(id, relay_config)),
                ),
                relay_client,
                dcutr: dcutr::Behaviour::new(id),
            })
        })
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    check_listen(&config.listen)?;
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    }
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control
        .accept(PROTOCOL)
        .map_err(|e| Error::Setup(e.to_string()))?;
    let mut blob_requests = control
        .accept(BLOB_PROTOCOL)
        .map_err(|e| Error::Setup(e.to_string()))?;
    let serving = Arc::new(tokio::sync::Semaphore::new(blobs::MAX_SERVING));
    let send_limit = Arc::new(blobs::SendLimit::new(
        config.blob_send_rate,
        stats.blob_bytes_sent.clone(),
    ));

    let engine_config = EngineConfig::default()
        .with_role(config.role)
        .with_name(replica.name())
        .with_hello_timeout(HANDSHAKE_TIMEOUT);
    let engine = Engine::new(engine_config, sync_host::local_state(&replica)?)
        .with_security(stats.security.clone());
    let (results, mut io_results) = mpsc::channel(IO_RESULTS_QUEUE);
    let mut engine = Core {
        engine,
        watch: Watch::new(&replica),
        replica: replica.clone(),
        started: std::time::Instant::now(),
        results,
    };
    let mut peers = Peers::default();
    let mut sessions: HashMap<PeerId, Session> = HashMap::new();
    let budget = Arc::new(tokio::sync::Semaphore::new(SEND_BUDGET_KIB));
    let recv_budget = Arc::new(tokio::sync::Semaphore::new(RECV_BUDGET_KIB));
    let mut next_gen = 0u64;
    let mut redials: Vec<Redial> = config
        .dial
        .iter()
        .map(|a| Redial {
            addr: a.clone(),
            failures: 0,
            due: Some(tokio::time::Instant::now()),
            connection: None,
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                peers.cooldown.retain(|_, until| *until > now);
                peers.banned.retain(|_, until| *until > now);
                // Refused peers whose Goodbye did not drain in time are cut off anyway.
                let late: Vec<PeerId> = peers.closing.iter().filter(|(_, by)| **by <= now).map(|(p, _)| *p).collect();
                for peer in late {
                    peers.closing.remove(&peer);
                    let _ = swarm.disconnect_peer_id(peer);
                }
                let ended: Vec<(PeerId, u64)> = peers.lingering.iter().filter(|(_, (_, by))| *by <= now).map(|(p, (g, _))| (*p, *g)).collect();
                for (peer, gen) in ended {
                    peers.lingering.remove(&peer);
                    if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
                        sessions.remove(&peer);
                        engine.handle(Input::Disconnected(peer))?;
                        notify(&notices, Notice::PeerDisconnected(peer));
                    }
                }
                // Timers: a peer must prove itself in time, or the engine sends it away.
                // Also how writes the app made without telling reach the engine.
                engine.handle(Input::Tick)?;
                // One session per pair: the lower peer id opens it, and retries until it
                // exists or the peer proved it does not speak the protocol.
                let to_open: Vec<PeerId> = peers
                    .connected
                    .iter()
                    .filter(|p| local < **p && !sessions.contains_key(p) && !peers.opening.contains(p) && !peers.cooldown.contains_key(p) && !peers.banned.contains_key(p) && !peers.gave_up.contains(p))
                    .copied()
                    .collect();
                for peer in to_open {
                    peers.opening.insert(peer);
                    let (mut control, tx) = (control.clone(), inputs.clone());
                    tokio::spawn(async move {
                        // Bounded: with simultaneous dials the chosen connection can close
                        // under the request, which would otherwise wait forever.
                        match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PROTOCOL)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send(Owned::Opened { peer, stream }).await;
                            }
                            result => {
                                let error = result.map(|r| r.err().map(|e| e.to_string()).unwrap_or_default()).unwrap_or_else(|_| "timed out".into());
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                let _ = tx.send(Owned::OpenFailed { peer, error }).await;
                            }
                        }
                    });
                }
                for r in redials.iter_mut().filter(|r| r.connection.is_none() && r.due.is_some_and(|d| d <= now)) {
                    let opts = DialOpts::unknown_peer_id().address(r.addr.clone()).build();
                    r.connection = Some(opts.connection_id());
                    r.due = None;
                    if let Err(e) = swarm.dial(opts) {
                        tracing::debug!(addr = %r.addr, %e, "dial failed");
                        r.connection = None;
                        schedule(r, &config);
                    }
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    // A relay is reachable where it listens; devices' circuit reservations
                    // need those addresses.
                    if config.relay_server && !address.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit)) {
                        swarm.add_external_address(address.clone());
                    }
                    // Relayed addresses already end in this node's id.
                    let full = if peer_of(&address) == Some(local) { address } else { address.with(libp2p::multiaddr::Protocol::P2p(local)) };
                    tracing::info!(%full, "listening");
                    notify(&notices, Notice::Listening(full));
                }
                SwarmEvent::ListenerClosed { addresses, reason: Err(e), .. } => {
                    // A circuit reservation the relay refused (or lost): retried once the
                    // next session with that relay starts.
                    for relay_peer in addresses.iter().filter_map(relay_of) {
                        tracing::warn!(relay = %relay_peer, %e, "circuit reservation ended");
                        peers.circuits.remove(&relay_peer);
                    }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                    if let Some(r) = redials.iter_mut().find(|r| r.connection == Some(connection_id)) {
                        if !peers.refused_us.contains(&peer_id) {
                            r.failures = 0;
                        }
                    }
                    if peers.banned.contains_key(&peer_id) {
                        tracing::info!(peer = %peer_id, "connection from a refused peer closed");
                        swarm.close_connection(connection_id);
                        continue;
                    }
                    // The next tick opens the sync stream if this node is the lower peer id.
                    tracing::debug!(peer = %peer_id, %connection_id, "connection established");
                    peers.connected.insert(peer_id);
                    if endpoint.is_dialer() {
                        peers.dialed.insert(peer_id);
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                    tracing::debug!(peer = %peer_id, %connection_id, num_established, ?cause, "connection closed");
                    if let Some(r) = redials.iter_mut().find(|r| r.connection == Some(connection_id)) {
                        r.connection = None;
                        schedule(r, &config);
                    }
                    if num_established == 0 {
                        peers.forget(&peer_id);
                        admitted.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer_id);
                        // Not ended here: frames read before the close may still be
                        // queued behind this event (the reader ends the session after them).
                        if let Some(s) = sessions.get(&peer_id) {
                            peers.lingering.insert(peer_id, (s.gen, tokio::time::Instant::now() + FLUSH_TIMEOUT));
                        }
                    }
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some(r) = redials.iter_mut().find(|r| r.connection == Some(connection_id)) {
                        tracing::debug!(addr = %r.addr, %error, "connection failed");
                        r.connection = None;
                        schedule(r, &config);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (peer, addr) in found {
                        tracing::info!(%peer, %addr, "discovered on the LAN");
                        // Only the lower peer id dials: two devices that find each other at
                        // the same moment would otherwise cross dials and both fail. The
                        // redial list retries with backoff until connected.
                        if local < peer && !redials.iter().any(|r| r.addr == addr) {
                            redials.push(Redial { addr, failures: 0, due: Some(tokio::time::Instant::now()), connection: None });
                        }
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(gone))) => {
                    for (peer, addr) in gone {
                        tracing::info!(%peer, %addr, "gone from the LAN");
                        redials.retain(|r| r.addr != addr || r.connection.is_some());
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::RelayServer(event)) => {
                    tracing::debug!(?event, "relay");
                }
                _ => {}
            },
            Some((peer, stream)) = incoming.next() => {
                end_lingering(&mut engine, &mut sessions, &mut peers, &notices, peer)?;
                if peers.banned.contains_key(&peer) {
                    drop(stream);
                } else if sessions.contains_key(&peer) {
                    let n = peers.extra_streams.entry(peer).or_default();
                    *n += 1;
                    if *n > MAX_EXTRA_STREAMS {
                        tracing::warn!(%peer, "peer keeps opening sync streams; refused");
                        engine.handle(Input::Violation(peer, format!("more than {MAX_EXTRA_STREAMS} extra sync streams")))?;
                    }
                } else {
                    let dialed = peers.dialed.contains(&peer);
                    attach(&mut engine, &mut sessions, &mut next_gen, &inputs, &notices, &stats, &recv_budget, config.max_frames_per_sec, peer, stream, dialed)?;
                }
            }
            Some((peer, stream)) = blob_requests.next() => {
                // Its own stream and task: a file moving never holds up the sync loop.
                let is_admitted = admitted.lock().unwrap_or_else(|p| p.into_inner()).contains(&peer);
                match serving.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (replica, inputs, limit) = (replica.clone(), inputs.clone(), send_limit.clone());
                        tokio::spawn(async move {
                            blobs::serve(replica, peer, is_admitted, stream, inputs, limit).await;
                            drop(permit);
                        });
                    }
                    Err(_) => tracing::info!(%peer, "blob request dropped: serving the most at once"),
                }
            }
            Some(msg) = inbox.recv() => match msg {
                Owned::FetchBlob { hash, exclude, forward, reply } => {
                    let candidates: Vec<PeerId> = {
                        let admitted = admitted.lock().unwrap_or_else(|p| p.into_inner());
                        peers.connected.iter().filter(|p| admitted.contains(p) && Some(**p) != exclude).copied().collect()
                    };
                    let (replica, control, stats) = (replica.clone(), control.clone(), stats.clone());
                    stats.blobs_in_flight.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        let result = blobs::fetch(replica, control, candidates, hash, forward, stats.clone()).await;
                        stats.blobs_in_flight.fetch_sub(1, Ordering::Relaxed);
                        if result.is_ok() {
                            stats.blobs_fetched.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = reply.send(result);
                    });
                }
                Owned::Opened { peer, stream } => {
                    peers.opening.remove(&peer);
                    peers.open_failures.remove(&peer);
                    end_lingering(&mut engine, &mut sessions, &mut peers, &notices, peer)?;
                    if !peers.banned.contains_key(&peer) {
                        let dialed = peers.dialed.contains(&peer);
                        attach(&mut engine, &mut sessions, &mut next_gen, &inputs, &notices, &stats, &recv_budget, config.max_frames_per_sec, peer, stream, dialed)?;
                    }
                }
                Owned::Hostile { peer, gen, reason } => {
                    if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
                        // The engine says goodbye with the reason; the drain below bans.
                        engine.handle(Input::Violation(peer, reason))?;
                    }
                }
                Owned::WriterClosed { peer } => {
                    // The Goodbye is with the muxer, not yet on the wire: closing the
                    // connection at once can drop it, so close on a later tick.
                    if let Some(by) = peers.closing.get_mut(&peer) {
                        *by = (*by).min(tokio::time::Instant::now() + CLOSE_GRACE);
                    }
                }
                Owned::OpenFailed { peer, error } => {
                    peers.opening.remove(&peer);
                    if peers.connected.contains(&peer) {
                        let n = peers.open_failures.entry(peer).or_default();
                        *n += 1;
                        if *n >= MAX_OPEN_ATTEMPTS {
                            tracing::warn!(%peer, %error, attempts = *n, "cannot open the sync stream; giving up on this peer until it reconnects");
                            peers.open_failures.remove(&peer);
                            peers.gave_up.insert(peer);
                        } else {
                            tracing::warn!(%peer, %error, attempt = *n, "cannot open the sync stream; will retry");
                        }
                    }
                }
                Owned::Frame { peer, gen, bytes, budget } => {
                    if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
                        engine.handle(Input::Frame(peer, bytes))?;
                    }
                    drop(budget);
                }
                Owned::Closed { peer, gen } => {
                    if peers.lingering.get(&peer).is_some_and(|(g, _)| *g == gen) {
                        peers.lingering.remove(&peer);
                    }
                    if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
                        sessions.remove(&peer);
                        admitted.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer);
                        engine.handle(Input::Disconnected(peer))?;
                        notify(&notices, Notice::PeerDisconnected(peer));
                    }
                }
                Owned::LocalChange => engine.handle(Input::LocalChange { feed_seq: replica.feed_seq() })?,
            },
            Some((id, outcome)) = io_results.recv() => engine.handle(Input::IoDone(id, outcome))?,
        }
        let out = drain(&mut engine, &mut sessions, &notices, &budget).await?;
        {
            let mut admitted = admitted.lock().unwrap_or_else(|p| p.into_inner());
            for peer in &out.admitted {
                admitted.insert(*peer);
            }
            for peer in out.failed.iter().chain(&out.refused) {
                admitted.remove(peer);
            }
        }
        for peer in out.failed {
            peers
                .cooldown
                .insert(peer, tokio::time::Instant::now() + SESSION_COOLDOWN);
        }
        for peer in out.refused {
            ban(&mut peers, &stats.security, peer, config.ban);
        }
        for peer in out.refused_us {
            if peers.refused_us.len() < MAX_BANNED {
                peers.refused_us.insert(peer);
            }
        }
        // Reserve a circuit on a configured relay once it welcomed this node (it admitted
        // us, so it will grant the reservation), once per relay connection.
        for peer in out.started {
            peers.refused_us.remove(&peer);
            for relay_addr in config
                .circuit_relays
                .iter()
                .filter(|a| peer_of(a) == Some(peer))
            {
                if peers.circuits.insert(peer) {
                    let circuit = relay_addr
                        .clone()
                        .with(libp2p::multiaddr::Protocol::P2pCircuit);
                    if let Err(e) = swarm.listen_on(circuit.clone()) {
                        tracing::warn!(%circuit, %e, "cannot listen through the relay");
                        peers.circuits.remove(&peer);
                    }
                }
            }
        }
        peers.extra_streams.retain(|p, _| sessions.contains_key(p));
    }
    Ok(())
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
}

/// The peer id at the end of an address (`…/p2p/<id>`), if any.
/// Fails with `address in use` if another process already listens on one of `listen`'s
/// fixed TCP or UDP ports. libp2p's TCP listeners set `SO_REUSEPORT`, so a second node on the
/// same port would otherwise listen too and share the port's connections with the first.
/// The probe binds without port reuse and lets go at once (port 0 is not checked).
pub fn check_listen(listen: &[Multiaddr]) -> Result<(), Error> {
    use libp2p::multiaddr::Protocol;
    for addr in listen {
        let mut parts = addr.iter();
        let ip: std::net::IpAddr = match parts.next() {
            Some(Protocol::Ip4(ip)) => ip.into(),
            Some(Protocol::Ip6(ip)) => ip.into(),
            _ => continue,
        };
        let probe = match parts.next() {
            Some(Protocol::Tcp(port)) if port != 0 => {
                std::net::TcpListener::bind((ip, port)).map(drop)
            }
            Some(Protocol::Udp(port)) if port != 0 => {
                std::net::UdpSocket::bind((ip, port)).map(drop)
            }
            _ => continue,
        };
        match probe {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(Error::Listen { addr: addr.clone(), reason: "address in use: another process listens on this port (stop it or choose another --listen address)".into() });
            }
            // Other problems (an address not on this host…) are libp2p's to report.
            _ => {}
        }
    }
    Ok(())
}

/// A `/tls/ws` (or `/wss`) listener needs this node's certificate.
pub fn check_secure_websocket(listen: &[Multiaddr], tls: &WsTls) -> Result<(), Error> {
    use libp2p::multiaddr::Protocol;
    let secure = |addr: &Multiaddr| {
        addr.iter()
            .any(|p| matches!(p, Protocol::Tls | Protocol::Wss(_)))
    };
    match listen.iter().find(|a| secure(a)) {
        Some(addr) if tls.server.is_none() => Err(Error::Listen {
            addr: addr.clone(),
            reason: "a secure WebSocket listener needs a certificate and its key (config [net] tls_cert and tls_key)".into(),
        }),
        _ => Ok(()),
    }
}

fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// The relay of a circuit address (`…/p2p/<relay>/p2p-circuit…`), if it is one.
fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            libp2p::multiaddr::Protocol::P2p(id) => last = Some(id),
            libp2p::multiaddr::Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

fn schedule(r: &mut Redial, config: &Config) {
    r.failures = r.failures.saturating_add(1);
    let base = config
        .min_backoff
        .saturating_mul(1u32 << r.failures.min(16))
        .min(config.max_backoff);
    let jitter = rand::rng().random_range(0.5..1.5);
    r.due = Some(tokio::time::Instant::now() + base.mul_f64(jitter));
}

/// Refuses a peer until `for_how_long` passed. Its session is already gone (its writer
/// flushes the `Goodbye`); its connections close once that is written, or after
/// [`FLUSH_TIMEOUT`].
fn ban(peers: &mut Peers, security: &SecurityStats, peer: PeerId, for_how_long: Duration) {
    let now = tokio::time::Instant::now();
    if peers.banned.len() >= MAX_BANNED && !peers.banned.contains_key(&peer) {
        if let Some(soonest) = peers
            .banned
            .iter()
            .min_by_key(|(_, until)| **until)
            .map(|(p, _)| *p)
        {
            peers.banned.remove(&soonest);
        }
    }
    if peers.banned.insert(peer, now + for_how_long).is_none() {
        security.peers_banned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, secs = for_how_long.as_secs(), "peer disconnected and refused for a while");
    }
    if peers.connected.contains(&peer) {
        peers.closing.insert(peer, now + FLUSH_TIMEOUT);
    }
}

/// Ends a session whose connection closed and that still waits for its reader: a new
/// stream from the same peer replaces it.
fn end_lingering(
    engine: &mut Core,
    sessions: &mut HashMap<PeerId, Session>,
    peers: &mut Peers,
    notices: &mpsc::Sender<Notice>,
    peer: PeerId,
) -> Result<(), Error> {
    if let Some((gen, _)) = peers.lingering.remove(&peer) {
        if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
            sessions.remove(&peer);
            engine.handle(Input::Disconnected(peer))?;
            notify(notices, Notice::PeerDisconnected(peer));
        }
    }
    Ok(())
}

fn notify(notices: &mpsc::Sender<Notice>, notice: Notice) {
    if notices.try_send(notice).is_err() {
        tracing::debug!("notice queue full; notice dropped");
    }
}

#[allow(clippy::too_many_arguments)]
fn attach(
    engine: &mut Core,
    sessions: &mut HashMap<PeerId, Session>,
    next_gen: &mut u64,
    inputs: &mpsc::Sender<Owned>,
    notices: &mpsc::Sender<Notice>,
    stats: &Arc<Stats>,
    recv_budget: &Arc<tokio::sync::Semaphore>,
    max_frames_per_sec: u32,
    peer: PeerId,
    stream: libp2p::Stream,
    dialed: bool,
) -> Result<(), Error> {
    if sessions.contains_key(&peer) {
        tracing::debug!(%peer, "extra sync stream dropped");
        return Ok(()); // one session per peer; the extra stream is dropped
    }
    tracing::debug!(%peer, dialed, "sync stream attached");
    *next_gen += 1;
    let gen = *next_gen;
    let (mut read, mut write) = stream.split();
    let (writer, mut frames) =
        mpsc::channel::<(Vec<u8>, tokio::sync::OwnedSemaphorePermit)>(WRITER_QUEUE);
    let out_stats = stats.clone();
    let done = inputs.clone();
    tokio::spawn(async move {
        // Frames are written in order until the session drops its sender; then the stream
        // is closed (a refusal's Goodbye is the last frame) and the owner told.
        while let Some((bytes, _budget)) = frames.recv().await {
            let len = (bytes.len() as u32).to_be_bytes();
            if write.write_all(&len).await.is_err()
                || write.write_all(&bytes).await.is_err()
                || write.flush().await.is_err()
            {
                break;
            }
            out_stats.frames_sent.fetch_add(1, Ordering::Relaxed);
            out_stats
                .bytes_sent
                .fetch_add(4 + bytes.len() as u64, Ordering::Relaxed);
        }
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, write.close()).await;
        let _ = done.send(Owned::WriterClosed { peer }).await;
    });
    let max_frame = fieldsync::core::protocol::Limits::default().max_frame as usize;
    let tx = inputs.clone();
    let in_stats = stats.clone();
    let recv_budget = recv_budget.clone();
    tokio::spawn(async move {
        // A token bucket: `rate` frames a second, bursts up to twice that.
        let rate = f64::from(max_frames_per_sec.max(1));
        let mut tokens = 2.0 * rate;
        let mut refilled = tokio::time::Instant::now();
        let mut first = true;
        loop {
            let mut len = [0u8; 4];
            if read.read_exact(&mut len).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes(len) as usize;
            if len > max_frame {
                let reason = format!("frame of {len} bytes is over the {max_frame}-byte limit");
                let _ = tx.send(Owned::Hostile { peer, gen, reason }).await;
                return;
            }
            if first && len > MAX_FIRST_FRAME {
                let reason =
                    format!("a first frame of {len} bytes (a Hello is at most {MAX_FIRST_FRAME})");
                let _ = tx.send(Owned::Hostile { peer, gen, reason }).await;
                return;
            }
            first = false;
            let now = tokio::time::Instant::now();
            tokens = (tokens + now.duration_since(refilled).as_secs_f64() * rate).min(2.0 * rate);
            refilled = now;
            if tokens < 1.0 {
                in_stats.security.floods.fetch_add(1, Ordering::Relaxed);
                let reason = format!("more than {max_frames_per_sec} frames a second");
                let _ = tx.send(Owned::Hostile { peer, gen, reason }).await;
                return;
            }
            tokens -= 1.0;
            let Some((bytes, budget)) = read_budgeted(&mut read, len, &recv_budget).await else {
                break;
            };
            in_stats.frames_received.fetch_add(1, Ordering::Relaxed);
            in_stats
                .bytes_received
                .fetch_add(4 + len as u64, Ordering::Relaxed);
            if tx
                .send(Owned::Frame {
                    peer,
                    gen,
                    bytes,
                    budget,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Owned::Closed { peer, gen }).await;
    });
    sessions.insert(peer, Session { gen, writer });
    engine.handle(if dialed {
        Input::Dialed(peer)
    } else {
        Input::Connected(peer)
    })?;
    notify(notices, Notice::PeerConnected(peer));
    Ok(())
}

/// Reads a frame body of `len` bytes once its share of the receive budget is granted (all
/// of it at once: readers that each held part of a frame could otherwise wait on each
/// other for ever); memory is filled a chunk at a time as bytes arrive. `None` if the
/// stream ended first.
async fn read_budgeted<R: futures::AsyncRead + Unpin>(
    read: &mut R,
    len: usize,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Option<(Vec<u8>, tokio::sync::OwnedSemaphorePermit)> {
    let kib = len.div_ceil(1024).clamp(1, RECV_BUDGET_KIB) as u32;
    let held = budget.clone().acquire_many_owned(kib).await.ok()?;
    let mut bytes = Vec::with_capacity(len.min(RECV_CHUNK));
    while bytes.len() < len {
        let at = bytes.len();
        bytes.resize(at + (len - at).min(RECV_CHUNK), 0);
        read.read_exact(&mut bytes[at..]).await.ok()?;
    }
    Some((bytes, held))
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

/// Sends every queued frame to its stream's writer and reports every event.
async fn drain(
    core: &mut Core,
    sessions: &mut HashMap<PeerId, Session>,
    notices: &mpsc::Sender<Notice>,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<Drained, Error> {
    let mut out = Drained::default();
    loop {
        while let Some((peer, bytes)) = core.engine.poll_transmit() {
            if let Some(s) = sessions.get(&peer) {
                // Waiting here is the backpressure of slow peers (queues and bytes are bounded).
                let kib = (bytes.len() >> 10).clamp(1, SEND_BUDGET_KIB) as u32;
                let Ok(permit) = budget.clone().acquire_many_owned(kib).await else {
                    continue;
                };
                if s.writer.send((bytes, permit)).await.is_err() {
                    // The stream is gone: end the engine's session too (its reader's own
                    // notice will no longer match a session).
                    sessions.remove(&peer);
                    core.handle(Input::Disconnected(peer))?;
                    notify(notices, Notice::PeerDisconnected(peer));
                }
            }
        }
        let Some(event) = core.engine.poll_event() else {
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
                // Dropping the writer flushes what is queued (the Goodbye) and closes the
                // stream; the connection idles out, or closes at once if the peer is banned.
                if sessions.remove(peer).is_some() {
                    notify(notices, Notice::PeerDisconnected(*peer));
                }
                out.failed.push(*peer);
            }
            _ => {}
        }
        notify(notices, Notice::Sync(event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt as _;

    /// A stream that delivers `bytes`, then stalls forever (a peer trickling a frame).
    fn stalls_after(bytes: Vec<u8>) -> impl futures::AsyncRead + Unpin {
        futures::stream::iter([Ok::<_, std::io::Error>(bytes)])
            .chain(futures::stream::pending())
            .into_async_read()
    }

    /// A stream that delivers `len` bytes 64 KiB at a time, yielding between pieces.
    fn slowly(len: usize) -> impl futures::AsyncRead + Unpin {
        let pieces = (0..len.div_ceil(RECV_CHUNK))
            .map(move |i| vec![5u8; RECV_CHUNK.min(len - i * RECV_CHUNK)]);
        Box::pin(
            futures::stream::iter(pieces)
                .then(|piece| async move {
                    tokio::task::yield_now().await;
                    Ok::<_, std::io::Error>(piece)
                })
                .into_async_read(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arriving_together_over_the_budget_all_get_through() {
        let budget = Arc::new(tokio::sync::Semaphore::new(RECV_BUDGET_KIB));
        // Four 10 MiB frames at once (40 MiB against a 24 MiB budget), their bytes
        // interleaved: each reader holds all of its share or none, so none waits for ever.
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let budget = budget.clone();
                tokio::spawn(async move {
                    let (bytes, permit) = read_budgeted(&mut slowly(10 << 20), 10 << 20, &budget)
                        .await
                        .expect("a whole frame");
                    drop(permit); // the engine took it
                    bytes.len()
                })
            })
            .collect();
        for r in readers {
            let n = tokio::time::timeout(Duration::from_secs(60), r)
                .await
                .expect("no reader waits for ever")
                .unwrap();
            assert_eq!(n, 10 << 20);
        }
        assert_eq!(
            budget.available_permits(),
            RECV_BUDGET_KIB,
            "every share came back"
        );
    }

    #[tokio::test]
    async fn readers_wait_for_the_budget_instead_of_going_over_it() {
        let budget = Arc::new(tokio::sync::Semaphore::new(RECV_BUDGET_KIB));
        let (_first, held) = read_budgeted(&mut stalls_after(vec![1; 16 << 20]), 16 << 20, &budget)
            .await
            .expect("a whole frame");
        // 16 MiB are held: a second 16 MiB frame cannot be read whole until they are released.
        let second = tokio::spawn({
            let budget = budget.clone();
            async move {
                read_budgeted(&mut stalls_after(vec![2; 16 << 20]), 16 << 20, &budget)
                    .await
                    .map(|(b, _)| b.len())
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !second.is_finished(),
            "the second read went over the budget"
        );
        drop(held);
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), second)
                .await
                .expect("it finishes once the budget is back")
                .unwrap(),
            Some(16 << 20)
        );
        assert_eq!(
            budget.available_permits(),
            RECV_BUDGET_KIB,
            "every share came back"
        );
    }
}
