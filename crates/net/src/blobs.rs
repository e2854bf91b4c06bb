//! The attachments' file protocol, `/fieldsync/blobs/2`, beside the sync protocol: one
//! stream per request, so a file moving never delays entity sync (each stream has its own
//! yamux flow control).
//!
//! The messages (request, status, head) and their limits are
//! [`fieldsync::blobs::wire`], shared with the browser package: the file's BLAKE3 hash, the
//! offset to start at and a flags byte ([`wire::MAY_FORWARD`]: the server may fetch the
//! file from its own peers first); answered by a status (OK, not here, refused), then, when
//! OK, the file's size and the offset its bytes start at, then the bao slice of the bytes
//! from there: 1 KiB chunks with the BLAKE3 tree nodes that prove them, so the asker checks
//! each chunk as it arrives. An interrupted or tampered transfer keeps its verified bytes
//! (also across restarts) and the next request resumes after them.
//!
//! Forwarding: a relay asked for a file it lacks fetches it from its other peers (never
//! the asker, and without the flag, so a request travels one hop at most), stores it, then
//! serves it: a file attached on one device reaches another through the relay on demand.
//!
//! Serving: only to peers the sync engine admitted, and only a file that a live entity the
//! peer's member may see references (partitions apply). Fetching: the bytes stream into the
//! blob store as they are verified (bounded queues, never whole in memory) and become a
//! blob only if the whole file hashes to the hash asked for.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use fieldsync::blobs::wire::{self, Head, Request, Status, IDLE_TIMEOUT};
use fieldsync::blobs::Hash;
use fieldsync::Replica;
use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use libp2p::{PeerId, StreamProtocol};

/// The file protocol's libp2p name.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new(wire::PROTOCOL);

/// Files served at once; a request beyond it is dropped (the asker tries another peer).
pub(crate) const MAX_SERVING: usize = 8;
/// Bytes per piece, both ways.
const PIECE: usize = 64 << 10;
/// Pieces queued between the stream and the blob writer.
const WRITE_QUEUE: usize = 8;
/// Pieces read ahead of the stream when serving.
const SEND_QUEUE: usize = 4;
/// How long opening the stream may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Behind the send schedule by more than this, the sender was idle: the schedule restarts.
const IDLE_SPELL: Duration = Duration::from_millis(100);

/// Sync frames this recent (queued to send, or received) make file sends wait: an entity
/// exchange takes a few round trips, each of a few milliseconds.
const SYNC_QUIET: Duration = Duration::from_millis(5);
/// The longest one piece waits for sync to go quiet, so files still move (at least a piece
/// per this, per transfer) beside a sync that never stops.
const MAX_YIELD: Duration = Duration::from_millis(20);

/// The pace of sending files, shared by every transfer of a node: entity sync first (a
/// piece waits while sync frames are moving), then at most `rate` bytes a second in all
/// (0: no limit); counts what was sent.
pub(crate) struct SendLimit {
    rate: u64,
    stats: Arc<crate::Stats>,
    /// (when the pace started, bytes sent since): the schedule every transfer follows.
    pace: tokio::sync::Mutex<(tokio::time::Instant, u64)>,
    /// (sync frames counted, when that count was first seen).
    sync_seen: std::sync::Mutex<(u64, tokio::time::Instant)>,
}

impl SendLimit {
    pub(crate) fn new(rate: u64, stats: Arc<crate::Stats>) -> Self {
        let now = tokio::time::Instant::now();
        SendLimit {
            rate,
            stats,
            pace: tokio::sync::Mutex::new((now, 0)),
            sync_seen: std::sync::Mutex::new((0, now.checked_sub(SYNC_QUIET).unwrap_or(now))),
        }
    }

    /// Counts `n` bytes about to be sent, waiting until sync is quiet and the rate allows
    /// them.
    async fn take(&self, n: usize) {
        self.stats
            .blob_bytes_sent
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.yield_to_sync().await;
        if self.rate == 0 {
            return;
        }
        let due = {
            let mut pace = self.pace.lock().await;
            let now = tokio::time::Instant::now();
            // An idle spell does not bank credit for a burst later. Falling behind by less
            // (each sleep wakes a little late, then the piece is written) is caught up:
            // restarting the schedule then would lose that time on every piece.
            let on_schedule = pace.0 + Duration::from_secs_f64(pace.1 as f64 / self.rate as f64);
            if on_schedule + IDLE_SPELL < now {
                *pace = (now, 0);
            }
            pace.1 += n as u64;
            pace.0 + Duration::from_secs_f64(pace.1 as f64 / self.rate as f64)
        };
        tokio::time::sleep_until(due).await;
    }

    /// Waits (up to [`MAX_YIELD`]) until no sync frame was queued or received for
    /// [`SYNC_QUIET`]: a file's bytes then never sit in the connection ahead of an entity
    /// exchange that is under way.
    async fn yield_to_sync(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let give_up = tokio::time::Instant::now() + MAX_YIELD;
        loop {
            let frames =
                self.stats.frames_queued.load(Relaxed) + self.stats.frames_received.load(Relaxed);
            let now = tokio::time::Instant::now();
            let last_seen = {
                let mut seen = self.sync_seen.lock().unwrap_or_else(|p| p.into_inner());
                if seen.0 != frames {
                    *seen = (frames, now);
                }
                seen.1
            };
            let quiet_at = (last_seen + SYNC_QUIET).min(give_up);
            if quiet_at <= now {
                return;
            }
            tokio::time::sleep_until(quiet_at).await;
        }
    }
}

/// Nice value of the threads that read, verify and write files: entity sync (on the async
/// threads and the blocking pool) gets the CPU first when both are busy.
const FILE_THREAD_NICE: i32 = 10;

/// Runs `work` on a thread of its own at a lower priority; its result comes on the receiver.
fn background<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // Only this thread (Linux takes a thread id here); a failure leaves it as it was.
            #[cfg(target_os = "linux")]
            let _ = rustix::process::setpriority_process(
                Some(rustix::thread::gettid()),
                FILE_THREAD_NICE,
            );
            let _ = tx.send(work());
        })?;
    Ok(rx)
}

/// Serves one request from `peer` (`admitted`: the sync engine admitted it); `inputs`
/// reaches the node's owner task, for forwarding.
pub(crate) async fn serve(
    replica: Arc<Replica>,
    peer: PeerId,
    admitted: bool,
    mut stream: libp2p::Stream,
    inputs: tokio::sync::mpsc::Sender<crate::event_loop::Owned>,
    limit: Arc<SendLimit>,
) {
    let mut request = [0u8; wire::REQUEST_LEN];
    match tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut request)).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let Ok(Request {
        hash,
        offset,
        may_forward,
    }) = Request::decode(&request)
    else {
        return;
    };
    let r = replica.clone();
    let allowed = admitted
        && tokio::task::spawn_blocking(move || r.may_serve_blob(&peer, &hash))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(false);
    if !allowed {
        tracing::info!(%peer, %hash, "blob request refused: not admitted, or no entity it may see references the file");
        let _ = stream.write_all(&[Status::Refused.to_byte()]).await;
        let _ = stream.close().await;
        return;
    }
    let path = match replica.blobs() {
        Ok(store) => store.path(&hash),
        Err(_) => {
            let _ = stream.write_all(&[Status::NotHere.to_byte()]).await;
            let _ = stream.close().await;
            return;
        }
    };
    if may_forward && !path.is_file() {
        // Not here: fetch it from the other peers first (one hop, not back from the asker).
        let (reply, answer) = tokio::sync::oneshot::channel();
        let asked = inputs
            .send(crate::event_loop::Owned::FetchBlob {
                hash,
                exclude: Some(peer),
                forward: false,
                reply,
            })
            .await;
        if asked.is_ok() {
            match tokio::time::timeout(wire::ANSWER_TIMEOUT, answer).await {
                Ok(Ok(Ok(_))) => tracing::info!(%peer, %hash, "blob fetched for a peer"),
                other => tracing::info!(%peer, %hash, ?other, "blob not found for a peer"),
            }
        }
    }
    // The file with its BLAKE3 tree (made on first serve; a file damaged on disk is not
    // served at all).
    let opened = tokio::task::spawn_blocking(move || store_open(&replica, &hash)).await;
    let Ok(Ok((file, outboard, size))) = opened else {
        let _ = stream.write_all(&[Status::NotHere.to_byte()]).await;
        let _ = stream.close().await;
        return;
    };
    let head = Head::answering(size, offset);
    let start = head.start;
    if stream.write_all(&head.encode_ok()).await.is_err() {
        return;
    }
    // The slice [start, size) with the tree nodes that prove each chunk, read on a
    // low-priority thread into a bounded queue.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(SEND_QUEUE);
    let reader = background("blob-send", move || {
        // Buffered: the extractor reads 1 KiB chunks and 64-byte tree nodes.
        let mut slice = bao::encode::SliceExtractor::new_outboard(
            std::io::BufReader::with_capacity(PIECE, file),
            std::io::BufReader::with_capacity(PIECE, outboard),
            start,
            size - start,
        );
        loop {
            // Whole pieces: one read of the extractor gives a chunk or a tree node.
            let mut piece = Vec::with_capacity(PIECE);
            let next = match Read::by_ref(&mut slice)
                .take(PIECE as u64)
                .read_to_end(&mut piece)
            {
                Ok(0) => return,
                Ok(_) => Ok(piece),
                Err(e) => Err(e),
            };
            let failed = next.is_err();
            if tx.blocking_send(next).is_err() || failed {
                return;
            }
        }
    });
    if reader.is_err() {
        return; // no thread: the stream closes, and the asker tries again
    }
    while let Some(piece) = rx.recv().await {
        let Ok(piece) = piece else { return };
        limit.take(piece.len()).await;
        if stream.write_all(&piece).await.is_err() {
            return;
        }
    }
    let _ = stream.close().await;
    tracing::debug!(%peer, %hash, size, "blob served");
}

fn store_open(
    replica: &Replica,
    hash: &Hash,
) -> Result<(std::fs::File, std::fs::File, u64), String> {
    let store = replica.blobs().map_err(|e| e.to_string())?;
    store.open_with_outboard(hash).map_err(|e| {
        if matches!(e, fieldsync::blobs::Error::HashMismatch { .. }) {
            tracing::warn!(%hash, %e, "a stored file is damaged: not served");
        }
        e.to_string()
    })
}

/// Why a fetch from one peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No connected, admitted peer to ask.
    #[error("no connected peer to ask")]
    NoPeer,
    /// The peer does not hold the file.
    #[error("{0} does not hold it")]
    NotHere(PeerId),
    /// The peer refused (not admitted, or outside its partitions).
    #[error("{0} refused: this node may not see an entity referencing it there")]
    Refused(PeerId),
    /// The transfer failed or the bytes were wrong (nothing was stored).
    #[error("from {0}: {1}")]
    Failed(PeerId, String),
}

/// Fetches `hash` from the first of `peers` that serves it; the bytes stored. `forward`:
/// the peers may fetch it from their own peers first.
pub(crate) async fn fetch(
    replica: Arc<Replica>,
    control: libp2p_stream::Control,
    peers: Vec<PeerId>,
    hash: Hash,
    forward: bool,
    stats: Arc<super::Stats>,
) -> Result<u64, FetchError> {
    let mut last = FetchError::NoPeer;
    for peer in peers {
        match fetch_from(&replica, control.clone(), peer, hash, forward, &stats).await {
            Ok(n) => return Ok(n),
            Err(e) => {
                tracing::info!(%peer, %hash, %e, "blob fetch failed");
                last = e;
            }
        }
    }
    Err(last)
}

async fn fetch_from(
    replica: &Arc<Replica>,
    mut control: libp2p_stream::Control,
    peer: PeerId,
    hash: Hash,
    forward: bool,
    stats: &Arc<super::Stats>,
) -> Result<u64, FetchError> {
    let failed = |why: String| FetchError::Failed(peer, why);
    let store = replica.blobs().map_err(|e| failed(e.to_string()))?;
    // What an interrupted transfer left (here, or before a restart): resumed from there.
    let have = store.partial_len(&hash);
    let mut stream = tokio::time::timeout(OPEN_TIMEOUT, control.open_stream(peer, BLOB_PROTOCOL))
        .await
        .map_err(|_| failed("opening the stream timed out".into()))?
        .map_err(|e| failed(e.to_string()))?;
    let request = Request {
        hash,
        offset: have,
        may_forward: forward,
    };
    stream
        .write_all(&request.encode())
        .await
        .map_err(|e| failed(e.to_string()))?;
    stream.flush().await.map_err(|e| failed(e.to_string()))?;
    let mut status = [0u8; 1];
    tokio::time::timeout(wire::ANSWER_TIMEOUT, stream.read_exact(&mut status))
        .await
        .map_err(|_| failed("no answer".into()))?
        .map_err(|e| failed(e.to_string()))?;
    match Status::from_byte(status[0]).map_err(|e| failed(e.to_string()))? {
        Status::Ok => {}
        Status::NotHere => return Err(FetchError::NotHere(peer)),
        Status::Refused => return Err(FetchError::Refused(peer)),
    }
    let mut head = [0u8; wire::HEAD_LEN];
    tokio::time::timeout(IDLE_TIMEOUT, stream.read_exact(&mut head))
        .await
        .map_err(|_| failed("no size".into()))?
        .map_err(|e| failed(e.to_string()))?;
    // Checked against this node's limit before the first byte of the file.
    let Head { size, start } =
        Head::decode(&head, have, store.config().max_blob_bytes).map_err(|e| match e {
            // Said as the store says it (names the setting to raise).
            wire::WireError::TooLarge { limit, .. } => {
                failed(fieldsync::blobs::Error::TooLarge { limit }.to_string())
            }
            e => failed(e.to_string()),
        })?;
    // Checked against the limits before the first byte (a hostile size is refused here).
    // The slice goes through a verifying decoder on a low-priority thread: only bytes that
    // check against the hash's tree reach the partial file, so a tampered chunk is caught
    // where it arrives and what came before it is kept for the next try.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let received = stats.clone();
    let decoded = background("blob-receive", move || {
        let mut writer = store
            .resume_writer(&hash, size, start)
            .map_err(|e| Received::Ended(e.to_string()))?;
        let root = bao::Hash::from(*hash.as_bytes());
        let mut decoder =
            bao::decode::SliceDecoder::new(QueueReader::new(rx), &root, start, size - start);
        loop {
            // Whole pieces to the writer: one read of the decoder gives one chunk (1 KiB).
            // Bytes read before a chunk that fails are verified: they are kept.
            let mut piece = Vec::with_capacity(PIECE);
            let read = Read::by_ref(&mut decoder)
                .take(PIECE as u64)
                .read_to_end(&mut piece);
            if !piece.is_empty() {
                writer
                    .write(&piece)
                    .map_err(|e| Received::Ended(e.to_string()))?;
                received
                    .blob_bytes_received
                    .fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            match read {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(Received::Corrupt(writer.written()))
                }
                Err(e) => return Err(Received::Ended(e.to_string())),
            }
        }
        if writer.written() < size {
            return Err(Received::Ended(format!(
                "the stream ended after {} of {size} bytes",
                writer.written()
            )));
        }
        writer.finish_expecting(&hash).map_err(|e| match e {
            fieldsync::blobs::Error::HashMismatch { .. } => Received::Corrupt(size),
            e => Received::Ended(e.to_string()),
        })
    });
    let mut buf = vec![0u8; PIECE];
    let mut broken = None;
    loop {
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                // The decoder has all it needs (or stopped): the rest is not read.
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    break;
                }
            }
            Ok(Err(e)) => {
                broken = Some(e.to_string());
                break;
            }
            Err(_) => {
                broken = Some("the transfer stalled".to_owned());
                break;
            }
        }
    }
    drop(tx);
    let decoded = decoded.map_err(|e| failed(e.to_string()))?;
    match decoded
        .await
        .map_err(|_| failed("the decoder stopped".into()))?
    {
        Ok(stored) => Ok(stored.size),
        Err(Received::Corrupt(kept)) => {
            stats
                .blobs_corrupt
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Err(failed(format!(
                "a chunk after byte {kept} did not hash to the file's BLAKE3 tree: refused (the {kept} bytes before it are kept)"
            )))
        }
        Err(Received::Ended(why)) => Err(failed(broken.unwrap_or(why))),
    }
}

/// How receiving a slice ended, when it did not store the file.
enum Received {
    /// A chunk did not verify; the verified bytes written before it.
    Corrupt(u64),
    /// The stream ended, stalled or failed early (what was verified stays).
    Ended(String),
}

/// The pieces a transfer task queues, as a reader for the (blocking) decoder.
struct QueueReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    piece: Vec<u8>,
    at: usize,
}

impl QueueReader {
    fn new(rx: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Self {
        QueueReader {
            rx,
            piece: Vec::new(),
            at: 0,
        }
    }
}

impl Read for QueueReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.piece.len() {
            match self.rx.blocking_recv() {
                Some(piece) => (self.piece, self.at) = (piece, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len() - self.at);
        buf[..n].copy_from_slice(&self.piece[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 KiB pieces at 1 MB/s, each written 1 ms after its sleep ends (as a real write
    /// takes time): the total stays at the rate. Restarting the schedule whenever it was
    /// behind made each piece cost its share plus that 1 ms (here +1.6 %; at 50 MB/s the
    /// rate halved).
    #[tokio::test(start_paused = true)]
    async fn a_sender_a_little_late_after_each_piece_still_keeps_the_rate() {
        let limit = SendLimit::new(1_000_000, Arc::default());
        let start = tokio::time::Instant::now();
        let pieces = 100u64;
        for _ in 0..pieces {
            limit.take(64 << 10).await;
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let ideal = Duration::from_secs_f64((pieces * (64 << 10)) as f64 / 1e6);
        let took = start.elapsed();
        assert!(
            took <= ideal + Duration::from_millis(2),
            "{pieces} pieces took {took:?}, the rate allows {ideal:?}"
        );
    }

    /// After an idle spell the schedule restarts: no burst beyond the rate.
    #[tokio::test(start_paused = true)]
    async fn an_idle_spell_banks_no_credit() {
        let limit = SendLimit::new(1_000_000, Arc::default());
        limit.take(100_000).await;
        tokio::time::advance(Duration::from_secs(10)).await;
        let start = tokio::time::Instant::now();
        limit.take(500_000).await;
        assert!(start.elapsed() >= Duration::from_millis(500));
    }

    /// A piece waits while sync frames move, and goes once they stop for `SYNC_QUIET`.
    #[tokio::test(start_paused = true)]
    async fn a_piece_waits_for_sync_frames_to_go_quiet() {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = Arc::new(crate::Stats::default());
        let limit = SendLimit::new(0, stats.clone());
        // Quiet: no wait at all.
        let start = tokio::time::Instant::now();
        limit.take(1).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // A frame now, then none: the piece goes SYNC_QUIET later.
        stats.frames_queued.fetch_add(1, Relaxed);
        let start = tokio::time::Instant::now();
        limit.take(1).await;
        assert_eq!(start.elapsed(), SYNC_QUIET);
        // Frames every millisecond without end: the piece still goes after MAX_YIELD.
        stats.frames_received.fetch_add(1, Relaxed);
        let busy = stats.clone();
        let chatter = tokio::spawn(async move {
            loop {
                busy.frames_received.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let start = tokio::time::Instant::now();
        limit.take(1).await;
        let waited = start.elapsed();
        assert!(
            waited >= MAX_YIELD && waited <= MAX_YIELD + SYNC_QUIET,
            "waited {waited:?}"
        );
        chatter.abort();
        assert_eq!(stats.blob_bytes_sent.load(Relaxed), 3);
    }
}
