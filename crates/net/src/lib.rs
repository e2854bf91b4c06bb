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

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fieldsync::core::protocol::Role;
use fieldsync::sync::{Config as EngineConfig, Engine, Event, Input, SecurityStats};
use fieldsync::Replica;
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{dcutr, identify, mdns, noise, ping, relay, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use rand::Rng as _;
use tokio::sync::mpsc;

/// The sync protocol's libp2p name.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/fieldsync/sync/1");

/// Frames a stream's writer may queue before the owner waits for it.
const WRITER_QUEUE: usize = 256;
/// KiB of frames queued for all writers together before the owner waits for them: bounds a
/// relay's memory however many slow devices it serves (each may have a window of pages in
/// flight). Far above one peer's window, so one stalled peer cannot hold it all.
const SEND_BUDGET_KIB: usize = 24 << 10;
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
    /// Serve circuit relay v2 to others (relays).
    pub relay_server: bool,
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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![],
            dial: vec![],
            circuit_relays: vec![],
            relay_server: false,
            mdns: false,
            role: Role::Device,
            max_connections: 256,
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(30),
            ban: Duration::from_secs(60),
            max_frames_per_sec: 2_000,
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
    Frame { peer: PeerId, gen: u64, bytes: Vec<u8> },
    Closed { peer: PeerId, gen: u64 },
    Opened { peer: PeerId, stream: libp2p::Stream },
    /// The peer sent frames faster than allowed or an oversized frame.
    Hostile { peer: PeerId, gen: u64, reason: String },
    OpenFailed { peer: PeerId },
    LocalChange,
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
    (Handle { inputs: tx.clone(), stats: stats.clone() }, Inbox { tx, rx, stats })
}

/// The node's input queue, consumed by [`run`].
#[derive(Debug)]
pub struct Inbox {
    tx: mpsc::Sender<Owned>,
    rx: mpsc::Receiver<Owned>,
    stats: Arc<Stats>,
}

/// Runs the node until `shutdown` resolves.
pub async fn run(replica: Arc<Replica>, config: Config, inbox: Inbox, notices: mpsc::Sender<Notice>, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let keypair = replica.keypair();
    let local = keypair.public().to_peer_id();
    let mdns_on = config.mdns;
    let relay_server = config.relay_server;
    let max_connections = config.max_connections;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let id = key.public().to_peer_id();
            // Query every 5 s (libp2p's default is 5 min): a device that missed the first
            // announcement still finds its peers quickly.
            let mdns = if mdns_on { Some(mdns::tokio::Behaviour::new(mdns::Config { query_interval: Duration::from_secs(5), ..Default::default() }, key.public().to_peer_id())?) } else { None };
            Ok(Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(
                    libp2p::connection_limits::ConnectionLimits::default().with_max_established(Some(max_connections)),
                ),
                identify: identify::Behaviour::new(identify::Config::new("/fieldsync/1".into(), key.public())),
                ping: ping::Behaviour::default(),
                stream: libp2p_stream::Behaviour::new(),
                mdns: Toggle::from(mdns),
                relay_server: Toggle::from(relay_server.then(|| relay::Behaviour::new(id, relay::Config::default()))),
                relay_client,
                dcutr: dcutr::Behaviour::new(id),
            })
        })
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).map_err(|e| Error::Listen { addr: addr.clone(), reason: e.to_string() })?;
    }
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control.accept(PROTOCOL).map_err(|e| Error::Setup(e.to_string()))?;

    let Inbox { tx: inputs, rx: mut inbox, stats } = inbox;
    let mut engine = Engine::new(replica.clone(), EngineConfig::default().with_role(config.role)).with_security(stats.security.clone());
    // Refused peers and until when; extra streams opened per peer.
    let mut banned: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
    let mut extra_streams: HashMap<PeerId, u32> = HashMap::new();
    let mut sessions: HashMap<PeerId, Session> = HashMap::new();
    let budget = Arc::new(tokio::sync::Semaphore::new(SEND_BUDGET_KIB));
    let mut next_gen = 0u64;
    // Peers with at least one connection, and those this node is opening a stream to.
    let mut connected: std::collections::HashSet<PeerId> = std::collections::HashSet::new();
    let mut opening: std::collections::HashSet<PeerId> = std::collections::HashSet::new();
    // Relays this node holds a circuit reservation on (or is making one).
    let mut circuits: std::collections::HashSet<PeerId> = std::collections::HashSet::new();
    // Peers whose session failed recently are not reopened before this time.
    let mut cooldown: HashMap<PeerId, tokio::time::Instant> = HashMap::new();
    let mut redials: Vec<Redial> = config.dial.iter().map(|a| Redial { addr: a.clone(), failures: 0, due: Some(tokio::time::Instant::now()), connection: None }).collect();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = tick.tick() => {
                // One session per pair: the lower peer id opens it, and retries until it exists.
                let now = tokio::time::Instant::now();
                cooldown.retain(|_, until| *until > now);
                banned.retain(|_, until| *until > now);
                let to_open: Vec<PeerId> = connected
                    .iter()
                    .filter(|p| local < **p && !sessions.contains_key(p) && !opening.contains(p) && !cooldown.contains_key(p) && !banned.contains_key(p))
                    .copied()
                    .collect();
                for peer in to_open {
                    opening.insert(peer);
                    let (mut control, tx) = (control.clone(), inputs.clone());
                    tokio::spawn(async move {
                        // Bounded: with simultaneous dials the chosen connection can close
                        // under the request, which would otherwise wait forever.
                        match tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, PROTOCOL)).await {
                            Ok(Ok(stream)) => {
                                let _ = tx.send(Owned::Opened { peer, stream }).await;
                            }
                            result => {
                                let e = result.map(|r| r.err().map(|e| e.to_string()).unwrap_or_default()).unwrap_or_else(|_| "timed out".into());
                                tracing::warn!(%peer, %e, "cannot open the sync stream; will retry");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                let _ = tx.send(Owned::OpenFailed { peer }).await;
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
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, .. } => {
                    if let Some(r) = redials.iter_mut().find(|r| r.connection == Some(connection_id)) {
                        r.failures = 0;
                    }
                    if banned.contains_key(&peer_id) {
                        tracing::info!(peer = %peer_id, "connection from a refused peer closed");
                        swarm.close_connection(connection_id);
                        continue;
                    }
                    // The next tick opens the sync stream if this node is the lower peer id.
                    tracing::debug!(peer = %peer_id, %connection_id, "connection established");
                    connected.insert(peer_id);
                    // Reserve a circuit on each relay we reach, once per relay.
                    for relay_addr in config.circuit_relays.iter().filter(|a| peer_of(a) == Some(peer_id)) {
                        if circuits.insert(peer_id) {
                            let circuit = relay_addr.clone().with(libp2p::multiaddr::Protocol::P2pCircuit);
                            if let Err(e) = swarm.listen_on(circuit.clone()) {
                                tracing::warn!(%circuit, %e, "cannot listen through the relay");
                                circuits.remove(&peer_id);
                            }
                        }
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, cause, .. } => {
                    tracing::debug!(peer = %peer_id, %connection_id, num_established, ?cause, "connection closed");
                    if let Some(r) = redials.iter_mut().find(|r| r.connection == Some(connection_id)) {
                        r.connection = None;
                        schedule(r, &config);
                    }
                    if num_established == 0 {
                        connected.remove(&peer_id);
                        circuits.remove(&peer_id);
                        if sessions.remove(&peer_id).is_some() {
                            engine.handle(Input::Disconnected(peer_id))?;
                            notify(&notices, Notice::PeerDisconnected(peer_id));
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
                _ => {}
            },
            Some((peer, stream)) = incoming.next() => {
                if banned.contains_key(&peer) {
                    drop(stream);
                } else if sessions.contains_key(&peer) {
                    let n = extra_streams.entry(peer).or_default();
                    *n += 1;
                    if *n > MAX_EXTRA_STREAMS {
                        tracing::warn!(%peer, "peer keeps opening sync streams; refused");
                        stats.security.protocol_violations.fetch_add(1, Ordering::Relaxed);
                        ban(&mut swarm, &mut banned, &mut sessions, &mut engine, &notices, &stats.security, peer, config.ban)?;
                    }
                } else {
                    attach(&mut engine, &mut sessions, &mut next_gen, &inputs, &notices, &stats, config.max_frames_per_sec, peer, stream)?;
                }
            }
            Some(msg) = inbox.recv() => match msg {
                Owned::Opened { peer, stream } => {
                    opening.remove(&peer);
                    if !banned.contains_key(&peer) {
                        attach(&mut engine, &mut sessions, &mut next_gen, &inputs, &notices, &stats, config.max_frames_per_sec, peer, stream)?;
                    }
                }
                Owned::Hostile { peer, gen, reason } => {
                    if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
                        tracing::warn!(%peer, %reason, "peer refused");
                        ban(&mut swarm, &mut banned, &mut sessions, &mut engine, &notices, &stats.security, peer, config.ban)?;
                    }
                }
                Owned::OpenFailed { peer } => {
                    opening.remove(&peer);
                }
                Owned::Frame { peer, gen, bytes } => {
                    if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
                        engine.handle(Input::Frame(peer, bytes))?;
                    }
                }
                Owned::Closed { peer, gen } => {
                    if sessions.get(&peer).is_some_and(|s| s.gen == gen) {
                        sessions.remove(&peer);
                        engine.handle(Input::Disconnected(peer))?;
                        notify(&notices, Notice::PeerDisconnected(peer));
                    }
                }
                Owned::LocalChange => engine.handle(Input::LocalChange)?,
            },
        }
        let (failed, refused) = drain(&mut engine, &mut sessions, &notices, &budget).await;
        for peer in failed {
            cooldown.insert(peer, tokio::time::Instant::now() + SESSION_COOLDOWN);
        }
        for peer in refused {
            ban(&mut swarm, &mut banned, &mut sessions, &mut engine, &notices, &stats.security, peer, config.ban)?;
        }
        extra_streams.retain(|p, _| sessions.contains_key(p));
    }
    Ok(())
}

/// The peer id at the end of an address (`…/p2p/<id>`), if any.
fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

fn schedule(r: &mut Redial, config: &Config) {
    r.failures = r.failures.saturating_add(1);
    let base = config.min_backoff.saturating_mul(1u32 << r.failures.min(16)).min(config.max_backoff);
    let jitter = rand::rng().random_range(0.5..1.5);
    r.due = Some(tokio::time::Instant::now() + base.mul_f64(jitter));
}

/// Ends a peer's session, disconnects it and refuses it until `for_how_long` passed.
#[allow(clippy::too_many_arguments)]
fn ban(
    swarm: &mut libp2p::Swarm<Behaviour>,
    banned: &mut HashMap<PeerId, tokio::time::Instant>,
    sessions: &mut HashMap<PeerId, Session>,
    engine: &mut Engine,
    notices: &mpsc::Sender<Notice>,
    security: &SecurityStats,
    peer: PeerId,
    for_how_long: Duration,
) -> Result<(), Error> {
    if banned.insert(peer, tokio::time::Instant::now() + for_how_long).is_none() {
        security.peers_banned.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, secs = for_how_long.as_secs(), "peer disconnected and refused for a while");
    }
    if sessions.remove(&peer).is_some() {
        engine.handle(Input::Disconnected(peer))?;
        notify(notices, Notice::PeerDisconnected(peer));
    }
    let _ = swarm.disconnect_peer_id(peer);
    Ok(())
}

fn notify(notices: &mpsc::Sender<Notice>, notice: Notice) {
    if notices.try_send(notice).is_err() {
        tracing::debug!("notice queue full; notice dropped");
    }
}

#[allow(clippy::too_many_arguments)]
fn attach(
    engine: &mut Engine,
    sessions: &mut HashMap<PeerId, Session>,
    next_gen: &mut u64,
    inputs: &mpsc::Sender<Owned>,
    notices: &mpsc::Sender<Notice>,
    stats: &Arc<Stats>,
    max_frames_per_sec: u32,
    peer: PeerId,
    stream: libp2p::Stream,
) -> Result<(), Error> {
    if sessions.contains_key(&peer) {
        tracing::debug!(%peer, "extra sync stream dropped");
        return Ok(()); // one session per peer; the extra stream is dropped
    }
    tracing::debug!(%peer, "sync stream attached");
    *next_gen += 1;
    let gen = *next_gen;
    let (mut read, mut write) = stream.split();
    let (writer, mut frames) = mpsc::channel::<(Vec<u8>, tokio::sync::OwnedSemaphorePermit)>(WRITER_QUEUE);
    let out_stats = stats.clone();
    tokio::spawn(async move {
        while let Some((bytes, _budget)) = frames.recv().await {
            let len = (bytes.len() as u32).to_be_bytes();
            if write.write_all(&len).await.is_err() || write.write_all(&bytes).await.is_err() || write.flush().await.is_err() {
                break;
            }
            out_stats.frames_sent.fetch_add(1, Ordering::Relaxed);
            out_stats.bytes_sent.fetch_add(4 + bytes.len() as u64, Ordering::Relaxed);
        }
        let _ = write.close().await;
    });
    let max_frame = fieldsync::core::protocol::Limits::default().max_frame as usize;
    let tx = inputs.clone();
    let in_stats = stats.clone();
    tokio::spawn(async move {
        // A token bucket: `rate` frames a second, bursts up to twice that.
        let rate = f64::from(max_frames_per_sec.max(1));
        let mut tokens = 2.0 * rate;
        let mut refilled = tokio::time::Instant::now();
        loop {
            let mut len = [0u8; 4];
            if read.read_exact(&mut len).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes(len) as usize;
            if len > max_frame {
                in_stats.security.protocol_violations.fetch_add(1, Ordering::Relaxed);
                let reason = format!("frame of {len} bytes is over the {max_frame}-byte limit");
                let _ = tx.send(Owned::Hostile { peer, gen, reason }).await;
                return;
            }
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
            let mut bytes = vec![0u8; len];
            if read.read_exact(&mut bytes).await.is_err() {
                break;
            }
            in_stats.frames_received.fetch_add(1, Ordering::Relaxed);
            in_stats.bytes_received.fetch_add(4 + len as u64, Ordering::Relaxed);
            if tx.send(Owned::Frame { peer, gen, bytes }).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Owned::Closed { peer, gen }).await;
    });
    sessions.insert(peer, Session { gen, writer });
    engine.handle(Input::Connected(peer))?;
    notify(notices, Notice::PeerConnected(peer));
    Ok(())
}

/// Sends every queued frame to its stream's writer and reports every event; returns the
/// peers whose session failed and those refused (to be banned).
async fn drain(
    engine: &mut Engine,
    sessions: &mut HashMap<PeerId, Session>,
    notices: &mpsc::Sender<Notice>,
    budget: &Arc<tokio::sync::Semaphore>,
) -> (Vec<PeerId>, Vec<PeerId>) {
    let mut failed = Vec::new();
    let mut refused = Vec::new();
    loop {
        while let Some((peer, bytes)) = engine.poll_transmit() {
            if let Some(s) = sessions.get(&peer) {
                // Waiting here is the backpressure of slow peers (queues and bytes are bounded).
                let kib = (bytes.len() >> 10).clamp(1, SEND_BUDGET_KIB) as u32;
                let Ok(permit) = budget.clone().acquire_many_owned(kib).await else { continue };
                if s.writer.send((bytes, permit)).await.is_err() {
                    // The stream is gone: end the engine's session too (its reader's own
                    // notice will no longer match a session).
                    sessions.remove(&peer);
                    let _ = engine.handle(Input::Disconnected(peer));
                    notify(notices, Notice::PeerDisconnected(peer));
                }
            }
        }
        let Some(event) = engine.poll_event() else { return (failed, refused) };
        if let Event::PeerRefused { peer, .. } = &event {
            refused.push(*peer);
        }
        if let Event::SessionFailed { peer, reason } = &event {
            tracing::warn!(%peer, %reason, "sync session ended");
            // Dropping the writer closes the stream; the connection idles out.
            sessions.remove(peer);
            failed.push(*peer);
        }
        notify(notices, Notice::Sync(event));
    }
}
