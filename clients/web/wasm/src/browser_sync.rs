//! The browser's sync driver: rust-libp2p over the page's WebSocket (noise, yamux, the
//! `/fieldsync/sync/1` stream, as on a native device) to one relay, and the sans-IO engine
//! run inline on the page's only thread. Before any frame is sent, what the engine's tasks
//! wrote is saved through the page's `persist` (IndexedDB), so an `Ack` follows the data
//! it covers to disk.
//!
//! Attachments travel over `/fieldsync/blobs/2` on the same connection, with the messages
//! of `fieldsync::blobs::wire` (as a native node): the tab fetches a file from the relay
//! (which asks its other peers when it lacks it), and serves the relay the files attached
//! here, one at a time, to a peer whose member may see an entity referencing them.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use fieldsync::blobs::wire::{self, Head, Request, Status, Verifier};
use fieldsync::blobs::Hash;
use fieldsync::core::protocol::{Limits, Role};
use fieldsync::sync::{Config, Event, Input};
use fieldsync::sync_host::Inline;
use fieldsync::Replica;
use fieldsync_store::MemoryStore;
use futures::channel::mpsc;
use futures::{
    AsyncReadExt as _, AsyncWriteExt as _, FutureExt as _, SinkExt as _, StreamExt as _,
};
use libp2p::core::upgrade::Version;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, yamux, Multiaddr, PeerId, StreamProtocol, Transport as _};
use serde_json::json;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::browser::writes_to_js;
use crate::js_error;

const PROTOCOL: StreamProtocol = StreamProtocol::new("/fieldsync/sync/1");
const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::PROTOCOL);
/// Bytes of a file written or read at once.
const PIECE: usize = 64 << 10;
/// How long opening a stream to the relay may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Frames read ahead of the engine (each at most `Limits::max_frame`).
const READ_AHEAD: usize = 2;
/// Redial delays: from the first up to the last, doubling.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

#[derive(NetworkBehaviour)]
struct Behaviour {
    stream: libp2p_stream::Behaviour,
    ping: libp2p::ping::Behaviour,
}

/// The running driver, as the page's `Node` holds it.
pub(crate) struct Handle {
    nudge: mpsc::Sender<()>,
    connected: Rc<Cell<bool>>,
    stopped: Rc<Cell<bool>>,
    control: libp2p_stream::Control,
    relay: PeerId,
}

impl Handle {
    /// Something was written locally.
    pub(crate) fn nudge(&self) {
        // Full: a nudge is already waiting, which covers this write too.
        let _ = self.nudge.clone().try_send(());
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected.get()
    }

    pub(crate) fn stop(&self) {
        self.stopped.set(true);
        self.nudge();
    }

    /// Fetches the file `hash` from the relay, verified; its bytes.
    pub(crate) fn fetch_blob(
        &self,
        hash: Hash,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, JsValue>> {
        let up = self.connected.get() && !self.stopped.get();
        let (control, relay) = (self.control.clone(), self.relay);
        async move {
            if !up {
                return Err(coded_error(
                    "NOT_CONNECTED",
                    "not connected to the relay: the file can be fetched once the device is back online",
                ));
            }
            fetch_blob(control, relay, hash).await
        }
    }
}

/// An `Error` with `code` set (`NOT_HERE`, `REFUSED`…), for the page to tell cases apart.
pub(crate) fn coded_error(code: &str, message: &str) -> JsValue {
    let error = js_sys::Error::new(message);
    let _ = js_sys::Reflect::set(&error, &"code".into(), &code.into());
    error.into()
}

/// `f`, or an error after `d`.
async fn within<T>(
    d: Duration,
    what: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, String> {
    futures::select! {
        r = f.fuse() => r.map_err(|e| format!("{what}: {e}")),
        _ = sleep(d).fuse() => Err(format!("{what}: nothing within {} s", d.as_secs())),
    }
}

/// Asks the relay for the whole file `hash` (it may fetch it from its other peers first)
/// and checks every chunk against the hash's BLAKE3 tree as it arrives; the bytes, only
/// if all of them came and verified.
async fn fetch_blob(
    mut control: libp2p_stream::Control,
    relay: PeerId,
    hash: Hash,
) -> Result<Vec<u8>, JsValue> {
    let failed = |why: String| coded_error("FAILED", &format!("fetching file {hash}: {why}"));
    let mut stream = futures::select! {
        s = control.open_stream(relay, BLOB_PROTOCOL).fuse() => s.map_err(|e| failed(e.to_string()))?,
        _ = sleep(OPEN_TIMEOUT).fuse() => return Err(failed("opening a stream to the relay timed out".into())),
    };
    let request = Request {
        hash,
        offset: 0,
        may_forward: true,
    };
    within(wire::IDLE_TIMEOUT, "sending the request", async {
        stream.write_all(&request.encode()).await?;
        stream.flush().await
    })
    .await
    .map_err(failed)?;
    let mut status = [0u8; 1];
    within(
        wire::ANSWER_TIMEOUT,
        "the answer",
        stream.read_exact(&mut status),
    )
    .await
    .map_err(failed)?;
    match Status::from_byte(status[0]).map_err(|e| failed(e.to_string()))? {
        Status::Ok => {}
        Status::NotHere => {
            return Err(coded_error(
                "NOT_HERE",
                &format!("file {hash} is not here: the relay does not hold it and no peer connected to it sent it"),
            ))
        }
        Status::Refused => {
            return Err(coded_error(
                "REFUSED",
                &format!("the relay refused file {hash}: no entity this device may see references it (outside its partitions)"),
            ))
        }
    }
    let mut head = [0u8; wire::HEAD_LEN];
    within(wire::IDLE_TIMEOUT, "the size", stream.read_exact(&mut head))
        .await
        .map_err(failed)?;
    // Checked against the tab's limit before the first byte of the file.
    let head = Head::decode(&head, 0, crate::MAX_BLOB_BYTES).map_err(|e| failed(e.to_string()))?;
    let mut verifier = Verifier::new(&hash, head.size);
    let mut bytes = Vec::with_capacity(head.size as usize);
    let mut buf = vec![0u8; PIECE];
    loop {
        let n = within(wire::IDLE_TIMEOUT, "the transfer", stream.read(&mut buf))
            .await
            .map_err(failed)?;
        if n == 0 {
            break;
        }
        verifier
            .push(&buf[..n], &mut bytes)
            .map_err(|e| failed(e.to_string()))?;
    }
    verifier.finish().map_err(|e| failed(e.to_string()))?;
    let _ = stream.close().await;
    Ok(bytes)
}

/// Answers the relay's requests for files, one at a time (a tab holds each whole while it
/// sends it; further requests wait in libp2p-stream's bounded queue, or are dropped).
/// Ends with the swarm (the device stopped syncing).
async fn serve_blobs(
    mut requests: libp2p_stream::IncomingStreams,
    replica: Arc<Replica>,
    relay: PeerId,
    load_blob: js_sys::Function,
) {
    while let Some((peer, stream)) = requests.next().await {
        serve_blob(&replica, peer == relay, peer, stream, &load_blob).await;
    }
}

/// Answers one request as a native node does: only to the relay this tab syncs with, and
/// only a file that a live entity its member may see references; a held copy that does
/// not hash to its name is not served.
async fn serve_blob(
    replica: &Replica,
    from_relay: bool,
    peer: PeerId,
    mut stream: libp2p::Stream,
    load_blob: &js_sys::Function,
) {
    let mut request = [0u8; wire::REQUEST_LEN];
    if within(
        wire::IDLE_TIMEOUT,
        "request",
        stream.read_exact(&mut request),
    )
    .await
    .is_err()
    {
        return;
    }
    let Ok(Request { hash, offset, .. }) = Request::decode(&request) else {
        return;
    };
    if !(from_relay && replica.may_serve_blob(&peer, &hash).unwrap_or(false)) {
        return answer_only(stream, Status::Refused).await;
    }
    let content = match load(load_blob, &hash).await {
        Some(content) if content.len() as u64 <= crate::MAX_BLOB_BYTES => content,
        _ => return answer_only(stream, Status::NotHere).await,
    };
    let head = Head::answering(content.len() as u64, offset);
    let Some(mut slice) = wire::slice_from_memory(&content, &hash, head.start) else {
        return answer_only(stream, Status::NotHere).await;
    };
    if stream.write_all(&head.encode_ok()).await.is_err() {
        return;
    }
    let mut piece = vec![0u8; PIECE];
    loop {
        // Whole pieces: one read of the extractor gives a chunk or a tree node.
        let mut filled = 0;
        while filled < PIECE {
            match std::io::Read::read(&mut slice, &mut piece[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(_) => return,
            }
        }
        if filled == 0 {
            break;
        }
        if within(
            wire::IDLE_TIMEOUT,
            "sending",
            stream.write_all(&piece[..filled]),
        )
        .await
        .is_err()
        {
            return;
        }
    }
    let _ = stream.close().await;
}

/// Answers with `status` alone (not here, refused) and closes the stream.
async fn answer_only(mut stream: libp2p::Stream, status: Status) {
    let _ = stream.write_all(&[status.to_byte()]).await;
    let _ = stream.close().await;
}

/// The bytes of a held file, through the page's `load_blob(hash)`.
async fn load(load_blob: &js_sys::Function, hash: &Hash) -> Option<Vec<u8>> {
    let promise = load_blob
        .call1(&JsValue::NULL, &JsValue::from_str(&hash.to_string()))
        .ok()?;
    let value = JsFuture::from(js_sys::Promise::resolve(&promise))
        .await
        .ok()?;
    value
        .dyn_into::<js_sys::Uint8Array>()
        .ok()
        .map(|a| a.to_vec())
}

/// What the loop waits on.
enum Wake {
    Frame(Option<Result<Vec<u8>, String>>),
    Nudge,
    Timer,
}

struct Driver {
    inline: Inline,
    store: Arc<MemoryStore>,
    persist: js_sys::Function,
    on_event: js_sys::Function,
    last_ms: f64,
    /// The engine's monotonic clock (what its deadlines count in).
    mono: Duration,
}

impl Driver {
    fn emit(&self, event: serde_json::Value) {
        let _ = self
            .on_event
            .call1(&JsValue::NULL, &JsValue::from_str(&event.to_string()));
    }

    /// Feeds `input` to the engine (its tasks run inline), saves what they wrote, then
    /// sends what the engine has to send and reports its events; whether the engine ended
    /// the session.
    async fn step(
        &mut self,
        input: Input,
        write: &mut (impl futures::AsyncWrite + Unpin),
    ) -> Result<bool, String> {
        let now = js_sys::Date::now();
        let passed = Duration::from_millis((now - self.last_ms).max(0.0) as u64);
        self.last_ms = now;
        self.mono += passed;
        self.inline.advance(passed);
        let feed_before = self.inline.replica().feed_seq();
        self.inline.handle(input).map_err(|e| e.to_string())?;
        self.save().await?;
        let feed_seq = self.inline.replica().feed_seq();
        if feed_seq != feed_before {
            // Entities arrived (and are saved): views on the page may be stale.
            self.emit(json!({"event": "changed", "feed_seq": feed_seq}));
        }
        while let Some((_, frame)) = self.inline.poll_transmit() {
            let len = (frame.len() as u32).to_be_bytes();
            write.write_all(&len).await.map_err(|e| e.to_string())?;
            write.write_all(&frame).await.map_err(|e| e.to_string())?;
        }
        write.flush().await.map_err(|e| e.to_string())?;
        let mut ended = false;
        while let Some(event) = self.inline.poll_event() {
            ended |= matches!(event, Event::SessionFailed { .. });
            self.emit(event_json(&event));
        }
        Ok(ended)
    }

    /// Saves the engine's writes through `persist`, waiting until they are in IndexedDB.
    async fn save(&self) -> Result<(), String> {
        let writes = self.store.take_flushed();
        if writes.is_empty() {
            return Ok(());
        }
        let promise = self
            .persist
            .call1(&JsValue::NULL, &writes_to_js(writes))
            .map_err(|e| format!("persist failed: {e:?}"))?;
        JsFuture::from(js_sys::Promise::from(promise))
            .await
            .map_err(|e| format!("saving to IndexedDB failed: {e:?}"))?;
        Ok(())
    }
}

/// Sleeps `d` on the page's timer.
async fn sleep(d: Duration) {
    let ms = d.as_millis().min(i32::MAX as u128) as i32;
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let global = js_sys::global();
        if let Ok(set_timeout) = js_sys::Reflect::get(&global, &"setTimeout".into()) {
            let set_timeout: js_sys::Function = set_timeout.unchecked_into();
            let _ = set_timeout.call2(&global, &resolve, &JsValue::from(ms));
        }
    });
    let _ = JsFuture::from(promise).await;
}

pub(crate) fn start(
    replica: Arc<Replica>,
    store: Arc<MemoryStore>,
    relay: &str,
    persist: js_sys::Function,
    on_event: js_sys::Function,
    load_blob: js_sys::Function,
) -> Result<Handle, JsError> {
    let addr: Multiaddr = relay
        .parse()
        .map_err(|e| js_error(format!("relay address {relay:?}: {e}")))?;
    let Some(Protocol::P2p(relay_peer)) = addr.iter().last() else {
        return Err(js_error(format!(
            "relay address {relay:?} must end in /p2p/<relay peer id>"
        )));
    };
    if !addr
        .iter()
        .any(|p| matches!(p, Protocol::Ws(_) | Protocol::Wss(_)))
    {
        return Err(js_error(format!(
            "relay address {relay:?} is not a WebSocket address (…/tcp/PORT/ws or …/tls/ws)"
        )));
    }
    let keypair = libp2p::identity::Keypair::from(replica.keypair());
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_wasm_bindgen()
        .with_other_transport(|key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                libp2p::websocket_websys::Transport::default()
                    .upgrade(Version::V1Lazy)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
            )
        })
        .map_err(js_error)?
        .with_behaviour(|_| Behaviour {
            stream: libp2p_stream::Behaviour::new(),
            ping: libp2p::ping::Behaviour::default(),
        })
        .map_err(js_error)?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let mut control = swarm.behaviour().stream.new_control();
    let blob_requests = control.accept(BLOB_PROTOCOL).map_err(js_error)?;
    let engine_config = Config::default()
        .with_role(Role::Device)
        .with_name(replica.name());
    wasm_bindgen_futures::spawn_local(serve_blobs(
        blob_requests,
        replica.clone(),
        relay_peer,
        load_blob,
    ));
    let inline = Inline::new(replica, engine_config).map_err(js_error)?;
    let (nudge_tx, nudge_rx) = mpsc::channel(1);
    let (dial_tx, dial_rx) = mpsc::channel::<()>(1);
    let connected = Rc::new(Cell::new(false));
    let stopped = Rc::new(Cell::new(false));

    // The swarm runs on its own task: connections, noise, yamux and ping need polling
    // whether or not a session is open. It dials when asked.
    wasm_bindgen_futures::spawn_local({
        let stopped = stopped.clone();
        let addr = addr.clone();
        let mut dial_rx = dial_rx;
        async move {
            loop {
                futures::select! {
                    event = swarm.select_next_some() => {
                        // Failed dials show as the session's open timing out.
                        let _: SwarmEvent<_> = event;
                    }
                    asked = dial_rx.next() => {
                        if asked.is_none() || stopped.get() {
                            return;
                        }
                        // Already connected or dialing: the open waits for that one.
                        let _ = swarm.dial(addr.clone());
                    }
                }
            }
        }
    });

    let driver = Driver {
        inline,
        store,
        persist,
        on_event,
        last_ms: js_sys::Date::now(),
        mono: Duration::ZERO,
    };
    wasm_bindgen_futures::spawn_local(sessions(
        driver,
        control.clone(),
        relay_peer,
        dial_tx,
        nudge_rx,
        connected.clone(),
        stopped.clone(),
    ));
    Ok(Handle {
        nudge: nudge_tx,
        connected,
        stopped,
        control,
        relay: relay_peer,
    })
}

/// One session after another with the relay, until stopped.
async fn sessions(
    mut driver: Driver,
    mut control: libp2p_stream::Control,
    relay: PeerId,
    mut dial: mpsc::Sender<()>,
    mut nudges: mpsc::Receiver<()>,
    connected: Rc<Cell<bool>>,
    stopped: Rc<Cell<bool>>,
) {
    let mut backoff = MIN_BACKOFF;
    let max_frame = Limits::default().max_frame as usize;
    while !stopped.get() {
        let _ = dial.send(()).await;
        // Opening the stream waits for the connection the dial makes.
        let opened = futures::select! {
            s = control.open_stream(relay, PROTOCOL).fuse() => s.map_err(|e| e.to_string()),
            _ = sleep(Duration::from_secs(10)).fuse() => Err("no connection within 10 s".into()),
        };
        let stream = match opened {
            Ok(s) => s,
            Err(reason) => {
                driver.emit(
                    json!({"event": "sync_failed", "peer": relay.to_string(), "reason": reason}),
                );
                sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (mut read, mut write) = stream.split();
        connected.set(true);
        driver.emit(json!({"event": "peer_connected", "peer": relay.to_string()}));
        let (mut frame_tx, mut frames) = mpsc::channel::<Result<Vec<u8>, String>>(READ_AHEAD);
        wasm_bindgen_futures::spawn_local(async move {
            loop {
                let mut len = [0u8; 4];
                if read.read_exact(&mut len).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes(len) as usize;
                let frame = if len > max_frame {
                    Err(format!(
                        "frame of {len} bytes is over the {max_frame}-byte limit"
                    ))
                } else {
                    let mut bytes = vec![0u8; len];
                    match read.read_exact(&mut bytes).await {
                        Ok(()) => Ok(bytes),
                        Err(_) => return,
                    }
                };
                let stop = frame.is_err();
                if frame_tx.send(frame).await.is_err() || stop {
                    return;
                }
            }
        });
        let mut result = driver.step(Input::Dialed(relay), &mut write).await;
        while result == Ok(false) && !stopped.get() {
            let timer = driver
                .inline
                .engine
                .poll_timeout()
                .map(|deadline| deadline.saturating_sub(driver.mono));
            let wake = futures::select! {
                f = frames.next() => Wake::Frame(f),
                n = nudges.next() => if n.is_some() { Wake::Nudge } else { break },
                _ = sleep(timer.unwrap_or(Duration::from_secs(3600))).fuse() => Wake::Timer,
            };
            let input = match wake {
                Wake::Frame(Some(Ok(frame))) => Input::Frame(relay, frame),
                Wake::Frame(Some(Err(reason))) => Input::Violation(relay, reason),
                Wake::Frame(None) => break,
                Wake::Nudge => Input::LocalChange {
                    feed_seq: driver.inline.replica().feed_seq(),
                },
                Wake::Timer => Input::Tick,
            };
            result = driver.step(input, &mut write).await;
        }
        connected.set(false);
        let _ = write.close().await;
        let mut sink = futures::io::sink();
        let _ = driver.step(Input::Disconnected(relay), &mut sink).await;
        if result.is_ok() {
            backoff = MIN_BACKOFF;
        }
        let reason = match result {
            Err(e) => e,
            Ok(true) => "the session ended".into(),
            Ok(false) => "the connection closed".into(),
        };

        driver.emit(
            json!({"event": "peer_disconnected", "peer": relay.to_string(), "reason": reason}),
        );
        if !stopped.get() {
            sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// An engine event as the daemon prints it (JSON Lines of `fieldsync run`).
fn event_json(event: &Event) -> serde_json::Value {
    match event {
        Event::PeerAdmitted { peer } => json!({"event": "peer_admitted", "peer": peer.to_string()}),
        Event::SyncStarted { peer, total, .. } => {
            json!({"event": "sync_started", "peer": peer.to_string(), "total": total})
        }
        Event::SyncProgress { peer, done, total } => {
            json!({"event": "sync_progress", "peer": peer.to_string(), "done": done, "total": total})
        }
        Event::SyncCompleted { peer } => {
            json!({"event": "sync_completed", "peer": peer.to_string()})
        }
        Event::Acknowledged { peer, upto } => {
            json!({"event": "acknowledged", "peer": peer.to_string(), "upto": upto})
        }
        Event::StorageFailed { reason } => json!({"event": "storage_failed", "reason": reason}),
        Event::SessionFailed { peer, reason } => {
            json!({"event": "sync_failed", "peer": peer.to_string(), "reason": reason})
        }
        Event::PeerRefused { peer, reason } => {
            json!({"event": "peer_refused", "peer": peer.to_string(), "reason": reason})
        }
        Event::WritesRefused { peer, reasons } => {
            json!({"event": "writes_refused", "peer": peer.to_string(), "reasons": reasons})
        }
        Event::Refused {
            peer,
            state,
            reason,
        } => {
            json!({"event": "refused", "peer": peer.to_string(), "state": state, "reason": reason})
        }
    }
}
