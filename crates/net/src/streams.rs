//! A sync stream's two halves, each a task talking to the event loop through bounded
//! channels: the writer frames what the engine sends (tokio-util's `LengthDelimitedCodec`:
//! a u32 big-endian length, then the frame); the reader takes frames apart under the
//! limits (largest frame, smaller first frame, frames per second) and the receive budget.
//!
//! The reader keeps its own framing: `LengthDelimitedCodec` reserves a buffer for the whole
//! frame as soon as it reads the length, before a share of the receive budget could be
//! taken, so a few peers announcing large frames could make a node hold gigabytes. Here the
//! budget is granted from the length first, and memory follows the bytes that arrive.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::{AsyncReadExt as _, SinkExt};
use libp2p::PeerId;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{FramedWrite, LengthDelimitedCodec};
use tokio_util::compat::FuturesAsyncWriteCompatExt as _;

use crate::event_loop::Owned;
use crate::{Stats, FLUSH_TIMEOUT, MAX_FIRST_FRAME, RECV_BUDGET_KIB, RECV_CHUNK};

/// The codec both sides frame with: a u32 big-endian length, then the frame.
fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .big_endian()
        .max_frame_length(max_frame)
        .new_codec()
}

/// What both halves of one session's stream know.
#[derive(Clone)]
pub(crate) struct StreamSide {
    pub peer: PeerId,
    /// The session's generation (tells its frames from an older session's).
    pub gen: u64,
    pub to_loop: mpsc::Sender<Owned>,
    pub stats: Arc<Stats>,
    pub max_frame: usize,
}

/// Writes queued frames in order until the session drops its sender, then closes the
/// stream (a refusal's `Goodbye` is the last frame) and tells the event loop.
pub(crate) fn spawn_writer(
    side: StreamSide,
    write: futures::io::WriteHalf<libp2p::Stream>,
    mut frames: mpsc::Receiver<(Vec<u8>, OwnedSemaphorePermit)>,
) {
    tokio::spawn(async move {
        let mut sink = FramedWrite::new(write.compat_write(), codec(side.max_frame));
        while let Some((bytes, _budget)) = frames.recv().await {
            side.stats.frames_queued.fetch_add(1, Ordering::Relaxed);
            let len = bytes.len() as u64;
            // `send` flushes: the frame is with the muxer before the next is taken.
            if sink.send(bytes::Bytes::from(bytes)).await.is_err() {
                break;
            }
            side.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
            side.stats.bytes_sent.fetch_add(4 + len, Ordering::Relaxed);
        }
        let _ =
            tokio::time::timeout(FLUSH_TIMEOUT, SinkExt::<bytes::Bytes>::close(&mut sink)).await;
        let _ = side
            .to_loop
            .send(Owned::WriterClosed { peer: side.peer })
            .await;
    });
}

/// Reads frames and hands them to the event loop with their share of the receive budget;
/// a frame over the limits, or a flood, is reported as hostile and ends the reading.
pub(crate) fn spawn_reader(
    side: StreamSide,
    mut read: futures::io::ReadHalf<libp2p::Stream>,
    recv_budget: Arc<Semaphore>,
    max_frames_per_sec: u32,
) {
    let StreamSide {
        peer,
        gen,
        to_loop: tx,
        stats,
        max_frame,
    } = side;
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
                stats.security.floods.fetch_add(1, Ordering::Relaxed);
                let reason = format!("more than {max_frames_per_sec} frames a second");
                let _ = tx.send(Owned::Hostile { peer, gen, reason }).await;
                return;
            }
            tokens -= 1.0;
            let Some((bytes, budget)) = read_budgeted(&mut read, len, &recv_budget).await else {
                break;
            };
            stats.frames_received.fetch_add(1, Ordering::Relaxed);
            stats
                .bytes_received
                .fetch_add(4 + len as u64, Ordering::Relaxed);
            let frame = Owned::Frame {
                peer,
                gen,
                bytes,
                budget,
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Owned::Closed { peer, gen }).await;
    });
}

/// Reads a frame body of `len` bytes once its share of the receive budget is granted (all
/// of it at once: readers that each held part of a frame could otherwise wait on each
/// other for ever); memory is filled a chunk at a time as bytes arrive. `None` if the
/// stream ended first.
async fn read_budgeted<R: futures::AsyncRead + Unpin>(
    read: &mut R,
    len: usize,
    budget: &Arc<Semaphore>,
) -> Option<(Vec<u8>, OwnedSemaphorePermit)> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use futures::{StreamExt as _, TryStreamExt as _};

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
