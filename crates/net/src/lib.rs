//! fieldsync-net: puts the sans-IO sync engine on libp2p.
//!
//! One task (`event_loop`) owns the libp2p swarm (`swarm`) and the [`Engine`]; per peer, one stream of the
//! `/fieldsync/sync/1` protocol carries the engine's frames, each prefixed with its length
//! (u32, big-endian). The peer with the lower peer id opens the stream, so a pair has one
//! session however many connections it has. Readers and writers of streams (`streams`) are
//! tasks that talk to the owner through bounded channels.
//!
//! Transports: TCP and QUIC, noise, yamux; identify and ping; a connection limit; mDNS LAN
//! discovery only when [`Config::mdns`] is set. Configured peers are redialled with
//! exponential backoff and jitter.
//!
//! Refusals: the engine's `Goodbye` is written and the stream closed before the connection
//! is (flush, close the stream, then the connection a moment later; at most [`FLUSH_TIMEOUT`]), so the refused peer reads
//! why. A relay serves circuit relay v2 only to peers its engine admitted, unless
//! [`Config::open_relay`] is set.

mod blobs;
mod event_loop;
mod streams;
mod swarm;

pub use blobs::{FetchError, BLOB_PROTOCOL};

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use fieldsync::core::protocol::Role;
use fieldsync::sync::{Config as EngineConfig, Engine, Event, SecurityStats};
use fieldsync::sync_host;
use fieldsync::Replica;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use tokio::sync::mpsc;

use event_loop::{EventLoop, Owned, Parts};

/// The sync protocol's libp2p name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/fieldsync/sync/1");

/// Frames a stream's writer may queue before the owner waits for it.
pub(crate) const WRITER_QUEUE: usize = 256;
/// KiB of frames queued for all writers together before the owner waits for them: bounds a
/// relay's memory however many slow devices it serves (each may have a window of pages in
/// flight). Far above one peer's window, so one stalled peer cannot hold it all.
pub(crate) const SEND_BUDGET_KIB: usize = 24 << 10;
/// KiB of received frames held at once by all sessions together, from the length prefix
/// until the engine took the frame.
pub(crate) const RECV_BUDGET_KIB: usize = 24 << 10;
/// Bytes a reader fills at a time (memory follows the bytes that arrived).
pub(crate) const RECV_CHUNK: usize = 64 << 10;
/// Largest first frame of a session: a `Hello` or a `Goodbye` (honest peers send nothing
/// else first), so a stranger cannot make a node buffer a large frame before admission.
pub const MAX_FIRST_FRAME: usize = 64 << 10;
/// Inputs (frames read, app notifications) queued for the owner.
pub(crate) const INPUT_QUEUE: usize = 1024;
/// How long opening the sync stream may take before it is retried.
pub(crate) const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer whose session failed (wrong workspace, bad frames) is left alone.
pub(crate) const SESSION_COOLDOWN: Duration = Duration::from_secs(10);
/// Sync streams a peer may open beyond its one session before it is refused.
pub(crate) const MAX_EXTRA_STREAMS: u32 = 8;
/// Notices queued for the embedding application; more are dropped (and logged).
pub const NOTICE_QUEUE: usize = 1024;
/// How long a refused peer's `Goodbye` may take to be written before its connections close.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused peer's connection stays open after its `Goodbye` was written, so the
/// muxer puts it on the wire before the connection closes.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_millis(300);
/// How long a peer has to prove its membership after its sync stream opened.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed attempts to open the sync stream before this node gives up on a peer (until it
/// reconnects): a peer that does not speak the protocol is not retried forever.
pub const MAX_OPEN_ATTEMPTS: u32 = 3;
/// Most peers remembered as refused; beyond, the ban that ends soonest is forgotten.
pub(crate) const MAX_BANNED: usize = 4096;

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
    /// Sync frames taken for sending, counted before they are written: file transfers
    /// pause while sync frames move.
    pub frames_queued: AtomicU64,
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

/// Runs the node until `shutdown` resolves.
pub async fn run(
    replica: Arc<Replica>,
    config: Config,
    inbox: Inbox,
    notices: mpsc::Sender<Notice>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    check_secure_websocket(&config.listen, &config.ws_tls)?;
    let Inbox { tx, rx, stats } = inbox;
    let admitted = swarm::Admitted::default();
    let swarm = swarm::build(replica.keypair(), &config, &stats, &admitted)?;
    let engine_config = EngineConfig::default()
        .with_role(config.role)
        .with_name(replica.name())
        .with_hello_timeout(HANDSHAKE_TIMEOUT);
    let engine = Engine::new(engine_config, sync_host::local_state(&replica)?)
        .with_security(stats.security.clone());
    EventLoop::new(Parts {
        replica,
        config,
        swarm,
        engine,
        inputs: tx,
        inbox: rx,
        stats,
        notices,
        admitted,
    })?
    .run(shutdown)
    .await
}

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

/// The peer id at the end of an address (`…/p2p/<id>`), if any.
pub(crate) fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

/// The relay of a circuit address (`…/p2p/<relay>/p2p-circuit…`), if it is one.
pub(crate) fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
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
