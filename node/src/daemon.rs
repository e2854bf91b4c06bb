//! `fieldsync run` and `fieldsync relay`: the long-running node — libp2p sync plus the local
//! HTTP API — until Ctrl-C or SIGTERM.
//!
//! It prints JSON Lines on stdout as things happen (`listening`, `api`, `peer_connected`,
//! `sync_completed`, …) so scripts and tests can follow it, and writes `daemon.json` in the
//! data directory so CLI data commands go through its API while it runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fieldsync::core::protocol::Role;
use fieldsync::sync::Event;
use fieldsync::Replica;
use fieldsync_api::{AppState, Live, Metrics};
use fieldsync_net::{Config, Notice, NOTICE_QUEUE};
use serde_json::json;

use crate::cli::CliError;

/// The file a running daemon leaves in its data directory.
pub const DAEMON_FILE: &str = "daemon.json";

/// What to run.
#[derive(Debug)]
pub struct Options {
    pub role: Role,
    pub listen: Vec<libp2p::Multiaddr>,
    pub dial: Vec<libp2p::Multiaddr>,
    /// The subset of `dial` that are relays (for circuit reservations).
    pub relays: Vec<libp2p::Multiaddr>,
    pub mdns: bool,
    /// Relay circuits for non-members too (relays).
    pub open_relay: bool,
    pub api: SocketAddr,
    /// Cache sizes.
    pub memory: fieldsync::MemoryOptions,
    pub net: crate::config::Net,
    /// Mirror into PostgreSQL (relays).
    pub mirror: Option<fieldsync_mirror::MirrorConfig>,
    /// Who may use the API (`[api]`: token everywhere, CORS origins).
    pub api_access: crate::config::Api,
    /// The attachments' blob store: limits and collection (`[blobs]`).
    pub blobs: crate::config::Blobs,
}

fn print(value: serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Removes `daemon.json` when the daemon stops, however it stops.
struct DaemonFile(PathBuf);

impl Drop for DaemonFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A node to run: its data directory, the key file of an encrypted store, and what to run.
#[derive(Debug)]
pub struct NodeConfig {
    pub dir: PathBuf,
    /// The store's key file (encrypted stores; else FIELDSYNC_PASSPHRASE or the terminal).
    pub key_file: Option<PathBuf>,
    pub options: Options,
}

/// Runs the node until `shutdown` completes (the binary passes Ctrl-C/SIGTERM; tests and
/// embedders their own signal), or until its network stops by itself. Needs a multi-thread
/// tokio runtime. On return the store is flushed and `daemon.json` removed.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), CliError> {
    let NodeConfig {
        dir,
        key_file,
        options,
    } = config;
    let blobs = options.blobs.store_config();
    let memory = options.memory;
    let open_dir = dir.clone();
    // Opening may ask for the passphrase on the terminal: off the async threads.
    let replica = tokio::task::spawn_blocking(move || {
        crate::cli::open_replica(&open_dir, memory, key_file.as_deref())
    })
    .await
    .map_err(|e| CliError::runtime(e.to_string()))??
    .with_blob_config(blobs);
    let replica = Arc::new(replica);
    // Schema versions that arrive while running are recomputed off the sync path.
    replica.start_background_recompute();
    serve(&dir, replica, options, shutdown).await
}

async fn serve(
    dir: &Path,
    replica: Arc<Replica>,
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), CliError> {
    let (handle, inbox) = fieldsync_net::channel();
    let metrics = Arc::new(Metrics {
        security: handle.stats.security.clone(),
        ..Default::default()
    });
    let (notice_tx, mut notices) = tokio::sync::mpsc::channel(NOTICE_QUEUE);

    let nudge = handle.clone();
    let live = Arc::new(Live::new());
    // Writes always need the token, so there always is one (`fieldsync api-token` prints it).
    fieldsync_api::auth::ensure_token(dir).map_err(|e| {
        CliError::runtime(format!(
            "cannot create the API token in {}: {e}",
            dir.display()
        ))
    })?;
    let token_everywhere = fieldsync_api::auth::token_required_everywhere(
        &options.api,
        options.api_access.require_token,
    );
    let access = Arc::new(fieldsync_api::auth::Access::new(
        dir,
        token_everywhere,
        options.api_access.cors_origins.clone(),
    ));
    let fetcher = handle.clone();
    let state = AppState {
        replica: replica.clone(),
        on_change: Arc::new(move || nudge.try_local_change()),
        metrics: metrics.clone(),
        live: live.clone(),
        access,
        fetch_blob: Some(Arc::new(move |hash| {
            let fetcher = fetcher.clone();
            Box::pin(async move { fetcher.fetch_blob(hash).await.map_err(|e| e.to_string()) })
        })),
    };
    // Both ports are checked before anything starts: a second node on a port in use fails
    // at once, naming the port, instead of sharing it.
    fieldsync_net::check_listen(&options.listen).map_err(|e| CliError::runtime(e.to_string()))?;
    let ws_tls = options.net.ws_tls()?;
    fieldsync_net::check_secure_websocket(&options.listen, &ws_tls)
        .map_err(|e| CliError::invalid(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(options.api).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            CliError::runtime(format!("cannot serve the API on {}: address in use: another process listens on this port (stop it or choose another --api address)", options.api))
        } else {
            CliError::runtime(format!("cannot serve the API on {}: {e}", options.api))
        }
    })?;
    let api_addr = listener
        .local_addr()
        .map_err(|e| CliError::runtime(e.to_string()))?;
    let _daemon_file = {
        let path = dir.join(DAEMON_FILE);
        let body = json!({ "api": format!("http://{api_addr}"), "pid": std::process::id() });
        std::fs::write(&path, body.to_string())
            .map_err(|e| CliError::runtime(format!("{}: {e}", path.display())))?;
        DaemonFile(path)
    };
    print(json!({
        "event": "api",
        "addr": api_addr.to_string(),
        "peer_id": replica.peer_id().to_string(),
        "console": format!("http://{api_addr}/console/"),
        "token_required": if token_everywhere { "all" } else { "writes" },
    }));
    let app = fieldsync_api::router(state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = api_stop.changed().await;
            })
            .await;
    });

    let config = Config {
        listen: options.listen,
        circuit_relays: options.relays.clone(),
        relay_server: options.role == Role::Relay,
        open_relay: options.open_relay,
        dial: options.dial,
        mdns: options.mdns,
        role: options.role,
        max_connections: options.net.max_connections,
        min_backoff: std::time::Duration::from_millis(options.net.min_backoff_ms),
        max_backoff: std::time::Duration::from_millis(options.net.max_backoff_ms),
        ban: std::time::Duration::from_secs(options.net.ban_secs),
        max_frames_per_sec: options.net.max_frames_per_sec,
        ws_tls,
        blob_send_rate: options.blobs.send_bytes_per_sec,
    };
    let mut net_stop = stop_rx.clone();
    let mut net = tokio::spawn(fieldsync_net::run(
        replica.clone(),
        config,
        inbox,
        notice_tx,
        async move {
            let _ = net_stop.changed().await;
        },
    ));

    let metrics_for_traffic = metrics.clone();
    let reporter = {
        let live = live.clone();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                report(&live, &metrics, notice);
            }
        })
    };
    let watcher = tokio::spawn(watch_feed(replica.clone(), live.clone()));
    let collector = tokio::spawn(collect_blobs(replica.clone(), options.blobs.clone()));
    let prefetcher = tokio::spawn(fetch_missing(
        replica.clone(),
        handle.clone(),
        options.role == Role::Relay,
        metrics_for_traffic.clone(),
    ));
    let sampler = tokio::spawn(fieldsync_api::sample_health(
        metrics_for_traffic.clone(),
        live.clone(),
    ));
    let mirror = options.mirror.map(|config| {
        let state = Arc::new(fieldsync_mirror::MirrorState::default());
        let report_state = state.clone();
        live.reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(("mirror", Arc::new(move |head| report_state.report(head))));
        let nudge = handle.clone();
        let mut mirror_stop = stop_rx.clone();
        tokio::spawn(fieldsync_mirror::run(
            replica.clone(),
            config,
            state,
            Arc::new(move || nudge.try_local_change()),
            async move {
                let _ = mirror_stop.changed().await;
            },
        ))
    });
    let traffic = {
        let (stats, metrics) = (handle.stats.clone(), metrics_for_traffic);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            loop {
                tick.tick().await;
                let copy = |to: &std::sync::atomic::AtomicU64,
                            from: &std::sync::atomic::AtomicU64| {
                    to.store(from.load(Ordering::Relaxed), Ordering::Relaxed)
                };
                copy(&metrics.frames_sent, &stats.frames_sent);
                copy(&metrics.bytes_sent, &stats.bytes_sent);
                copy(&metrics.frames_received, &stats.frames_received);
                copy(&metrics.bytes_received, &stats.bytes_received);
                copy(&metrics.blobs_fetched, &stats.blobs_fetched);
                copy(&metrics.blobs_corrupt, &stats.blobs_corrupt);
                copy(&metrics.blob_bytes_received, &stats.blob_bytes_received);
                copy(&metrics.blobs_in_flight, &stats.blobs_in_flight);
                copy(&metrics.blob_bytes_sent, &stats.blob_bytes_sent);
            }
        })
    };

    // The network stopping by itself (it could not listen…) stops the daemon too.
    let ended = tokio::select! {
        () = shutdown => None,
        result = &mut net => Some(result),
    };
    print(json!({ "event": "stopping" }));
    let _ = stop_tx.send(true);
    let result = match ended {
        Some(result) => result,
        None => net.await,
    };
    let _ = api.await;
    if let Some(mirror) = mirror {
        let _ = mirror.await;
    }
    reporter.abort();
    watcher.abort();
    collector.abort();
    prefetcher.abort();
    sampler.abort();
    traffic.abort();
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(CliError::runtime(e.to_string())),
        Err(e) => Err(CliError::runtime(e.to_string())),
    }
}

/// Removes, every `gc_interval_secs`, the blobs no live entity references that are older
/// than `gc_grace_secs`; prints `blobs_collected` when it removed some.
async fn collect_blobs(replica: Arc<Replica>, config: crate::config::Blobs) {
    let grace = std::time::Duration::from_secs(config.gc_grace_secs);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(
        config.gc_interval_secs.max(1),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let r = replica.clone();
        match tokio::task::spawn_blocking(move || r.collect_blobs(grace)).await {
            Ok(Ok(removed)) if !removed.is_empty() => print(json!({
                "event": "blobs_collected",
                "removed": removed.len(),
                "hashes": removed.iter().map(ToString::to_string).collect::<Vec<_>>(),
            })),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("collecting unreferenced blobs failed: {e}"),
            Err(e) => tracing::warn!("collecting unreferenced blobs failed: {e}"),
        }
    }
}

/// How often the files to fetch without being asked are looked for (when the feed moved)…
const FETCH_SWEEP: std::time::Duration = std::time::Duration::from_secs(2);
/// …and how long a file no peer sent waits before it is asked for again.
const FETCH_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Fetches, one at a time, the files this node should hold without being asked: on a relay
/// every file a live entity references (so devices can fetch them while the device that
/// attached them is offline), on a device those of `prefetch` collections. Prints
/// `blob_fetched` for each.
async fn fetch_missing(
    replica: Arc<Replica>,
    handle: fieldsync_net::Handle,
    relay: bool,
    metrics: Arc<Metrics>,
) {
    let mut tick = tokio::time::interval(FETCH_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seen_seq = None;
    let mut seen_syncs = 0;
    let mut retry: std::collections::BTreeMap<fieldsync::blobs::Hash, tokio::time::Instant> =
        Default::default();
    loop {
        tick.tick().await;
        // A peer just synced: it may hold what no peer sent before (the device that
        // attached a file, back after going away mid-transfer). Ask again at once.
        let syncs = metrics.sync_completed.load(Ordering::Relaxed);
        if syncs != seen_syncs {
            seen_syncs = syncs;
            retry.clear();
            seen_seq = None;
        }
        let now = tokio::time::Instant::now();
        let seq = replica.feed_seq();
        if seen_seq == Some(seq) && !retry.values().any(|t| *t <= now) {
            continue;
        }
        seen_seq = Some(seq);
        let r = replica.clone();
        let missing = match tokio::task::spawn_blocking(move || r.missing_blobs(relay)).await {
            Ok(Ok(m)) => m,
            _ => continue,
        };
        // Only files still missing are remembered (bounded by what entities reference).
        retry.retain(|h, _| missing.contains(h));
        for hash in missing {
            if retry.get(&hash).is_some_and(|t| *t > now) {
                continue;
            }
            match handle.fetch_blob(hash).await {
                Ok(bytes) => {
                    retry.remove(&hash);
                    print(
                        json!({ "event": "blob_fetched", "hash": hash.to_string(), "bytes": bytes }),
                    );
                }
                Err(e) => {
                    tracing::debug!(%hash, %e, "file not fetched yet");
                    // No peer connected yet (a restart): ask again soon, not in 30 s.
                    let wait = match e {
                        fieldsync_net::FetchError::NoPeer => FETCH_SWEEP,
                        _ => FETCH_RETRY,
                    };
                    retry.insert(hash, tokio::time::Instant::now() + wait);
                }
            }
        }
    }
}

fn peer_entry<'a>(
    peers: &'a mut serde_json::Map<String, serde_json::Value>,
    peer: &libp2p::PeerId,
) -> &'a mut serde_json::Value {
    peers.entry(peer.to_string()).or_insert_with(|| json!({ "connected": false, "admitted": false, "completed": false, "done": 0, "total": 0, "acked_upto": 0 }))
}

/// Turns a network notice into a stdout line, metrics, peer status and an SSE event.
fn report(live: &Live, metrics: &Metrics, notice: Notice) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut peers = live.peers.lock().unwrap_or_else(|p| p.into_inner());
    let event = match notice {
        Notice::Listening(addr) => json!({ "event": "listening", "addr": addr.to_string() }),
        Notice::PeerConnected(peer) => {
            metrics.sync_sessions.fetch_add(1, Ordering::Relaxed);
            let p = peer_entry(&mut peers, &peer);
            p["connected"] = json!(true);
            p["completed"] = json!(false);
            json!({ "event": "peer_connected", "peer": peer.to_string() })
        }
        Notice::PeerDisconnected(peer) => {
            // Members stay listed (their checkpoint matters to `pending_to_relay`); a peer
            // that never proved itself leaves at once, so strangers cannot grow the table.
            let key = peer.to_string();
            if peers.get(&key).is_some_and(|p| p["admitted"] == true) {
                peer_entry(&mut peers, &peer)["connected"] = json!(false);
            } else {
                peers.remove(&key);
            }
            json!({ "event": "peer_disconnected", "peer": key })
        }
        Notice::Sync(Event::PeerAdmitted { peer }) => {
            peer_entry(&mut peers, &peer)["admitted"] = json!(true);
            json!({ "event": "peer_admitted", "peer": peer.to_string() })
        }
        Notice::Sync(Event::SyncStarted { peer, role, total }) => {
            let p = peer_entry(&mut peers, &peer);
            p["role"] = json!(match role {
                Role::Relay => "relay",
                Role::Device => "device",
            });
            p["total"] = json!(total);
            p["done"] = json!(0);
            json!({ "event": "sync_started", "peer": peer.to_string(), "total": total })
        }
        Notice::Sync(Event::SyncProgress { peer, done, total }) => {
            let p = peer_entry(&mut peers, &peer);
            p["done"] = json!(done);
            p["total"] = json!(total);
            drop(peers);
            live.publish(&json!({ "event": "sync_progress", "peer": peer.to_string(), "done": done, "total": total }));
            return;
        }
        Notice::Sync(Event::SyncCompleted { peer }) => {
            metrics.sync_completed.fetch_add(1, Ordering::Relaxed);
            let p = peer_entry(&mut peers, &peer);
            p["completed"] = json!(true);
            p["last_sync_ms"] = json!(now);
            json!({ "event": "sync_completed", "peer": peer.to_string() })
        }
        Notice::Sync(Event::Acknowledged { peer, upto }) => {
            peer_entry(&mut peers, &peer)["acked_upto"] = json!(upto);
            drop(peers);
            live.publish(
                &json!({ "event": "acknowledged", "peer": peer.to_string(), "upto": upto }),
            );
            return;
        }
        Notice::Sync(Event::StorageFailed { reason }) => {
            json!({ "event": "storage_failed", "reason": reason })
        }
        Notice::Sync(Event::SessionFailed { peer, reason }) => {
            metrics.sync_failed.fetch_add(1, Ordering::Relaxed);
            json!({ "event": "sync_failed", "peer": peer.to_string(), "reason": reason })
        }
        Notice::Sync(Event::PeerRefused { peer, reason }) => {
            drop(peers);
            live.refuse(&peer.to_string(), &reason, now);
            metrics
                .peers_connected
                .store(live.connected(), Ordering::Relaxed);
            let event =
                json!({ "event": "peer_refused", "peer": peer.to_string(), "reason": reason });
            print(event.clone());
            live.publish(&event);
            return;
        }
        Notice::Sync(Event::WritesRefused { peer, reasons }) => {
            json!({ "event": "writes_refused", "peer": peer.to_string(), "reasons": reasons })
        }
        // This node was refused: say why (status shows it as `membership` too).
        Notice::Sync(Event::Refused {
            peer,
            state,
            reason,
        }) => {
            json!({ "event": "refused", "peer": peer.to_string(), "state": state, "reason": reason })
        }
    };
    drop(peers);
    metrics
        .peers_connected
        .store(live.connected(), Ordering::Relaxed);
    print(event.clone());
    live.publish(&event);
}

/// Conflicts remembered with their state, so each opening, settling and resolution is
/// announced once; beyond this many the memory starts afresh.
const MAX_KNOWN_CONFLICTS: usize = 100_000;

/// Publishes an `entity_changed` event for every entity the local feed moves past
/// (local writes and merged sync data alike), also with no subscriber, so one that
/// reconnects with `Last-Event-ID` gets what happened meanwhile. While someone subscribes,
/// also for each conflict of a changed entity that is new or changed state:
/// `conflict_opened` (a `manual` field now has several values), `conflict_settled` (a rule
/// chose among concurrent values; `value` is its choice) or `conflict_resolved` (a person
/// chose). (Deriving conflicts costs a document read per change: not done for nobody.)
async fn watch_feed(replica: Arc<Replica>, live: Arc<Live>) {
    let mut seen = replica.feed_seq();
    let mut known: std::collections::HashMap<String, fieldsync::core::ConflictState> = {
        let r = replica.clone();
        let all = tokio::task::spawn_blocking(move || r.conflicts(true))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        all.into_iter()
            .take(MAX_KNOWN_CONFLICTS)
            .map(|c| (c.id.to_string(), c.state))
            .collect()
    };
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        tick.tick().await;
        if replica.feed_seq() == seen {
            continue;
        }
        let r = replica.clone();
        let after = seen;
        let watching = live.events.receiver_count() > 0;
        let found = tokio::task::spawn_blocking(move || {
            let changes = r.changes_since(after, 10_000)?;
            let conflicts = changes
                .iter()
                .map(|(_, _, id)| {
                    if watching {
                        r.conflicts_of(*id).unwrap_or_default()
                    } else {
                        Default::default()
                    }
                })
                .collect::<Vec<_>>();
            Ok::<_, fieldsync::Error>((changes, conflicts))
        });
        let Ok(Ok((changes, conflicts))) = found.await else {
            continue;
        };
        for ((seq, collection, id), (entity_conflicts, view)) in changes.into_iter().zip(conflicts)
        {
            live.publish(&json!({ "event": "entity_changed", "collection": collection, "id": id.to_string(), "seq": seq }));
            seen = seen.max(seq);
            for c in entity_conflicts {
                if known.get(&c.id.to_string()) == Some(&c.state) {
                    continue;
                }
                if known.len() >= MAX_KNOWN_CONFLICTS {
                    known.clear();
                }
                known.insert(c.id.to_string(), c.state);
                let mut event = serde_json::to_value(&c).unwrap_or_default();
                event["event"] = json!(match c.state {
                    fieldsync::core::ConflictState::Open => "conflict_opened",
                    fieldsync::core::ConflictState::Auto => "conflict_settled",
                    fieldsync::core::ConflictState::Resolved => "conflict_resolved",
                });
                if c.state == fieldsync::core::ConflictState::Auto {
                    event["value"] = view.get(&c.field).cloned().unwrap_or_default();
                }
                live.publish(&event);
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM: what the binary stops its node on.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
