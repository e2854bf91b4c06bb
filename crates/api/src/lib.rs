//! fieldsync-api: the local HTTP API of a node (see `docs/openapi.yaml`).
//!
//! Entity CRUD and lists take the same patch language and return the same views as the CLI.
//! Store calls block (they wait for durability), so they run on tokio's blocking pool.
//! Every write nudges the sync engine through the `on_change` callback.
//! Access (the bearer token, CORS) is in [`auth`]; the office console at `/console` in
//! [`console`]; attachments' files (streaming upload and download) in `blobs`.

pub mod auth;
mod blobs;
pub mod console;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fieldsync::{ErrorKind, Replica};
use serde::Deserialize;
use serde_json::{json, Value};

/// Counters exported at `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub http_requests: AtomicU64,
    pub http_errors: AtomicU64,
    /// Requests refused for a missing or wrong API token (401).
    pub http_unauthorised: AtomicU64,
    pub sync_sessions: AtomicU64,
    pub sync_completed: AtomicU64,
    pub sync_failed: AtomicU64,
    pub peers_connected: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub bytes_received: AtomicU64,
    /// What the sync engine and network refused (shared with them).
    pub security: Arc<fieldsync::sync::SecurityStats>,
    /// Attachment files fetched from peers, and fetches dropped because the bytes did not
    /// hash to what was asked (copied from the network's counters).
    pub blobs_fetched: AtomicU64,
    pub blobs_corrupt: AtomicU64,
    /// Fetches of attachment files from peers running now.
    pub blobs_in_flight: AtomicU64,
    /// Bytes of attachment files received from peers, and sent to them.
    pub blob_bytes_received: AtomicU64,
    pub blob_bytes_sent: AtomicU64,
}

/// Fetches an attachment's file from connected peers into the blob store (the daemon's
/// network); `Err` says why not.
pub type FetchBlob = Arc<
    dyn Fn(fieldsync::blobs::Hash) -> futures::future::BoxFuture<'static, Result<u64, String>>
        + Send
        + Sync,
>;

/// Refused peers remembered for `/v1/status` (`refused_peers`), newest last.
pub const RECENT_REFUSED: usize = 16;

/// Events kept for `/v1/events` subscribers that reconnect with `Last-Event-ID`: at most
/// this many…
pub const RECENT_EVENTS: usize = 4096;
/// …and at most this many bytes of event text.
pub const RECENT_EVENT_BYTES: usize = 1 << 20;

/// What a running daemon knows beyond the store: its peers and an event stream.
pub struct Live {
    /// Per peer with a session now, or admitted once (members and the authority, so bounded
    /// by the member list): `{"connected", "admitted", "completed", "done", "total",
    /// "acked_upto", "last_sync_ms", "role"}`. A refused peer leaves at once.
    pub peers: std::sync::Mutex<serde_json::Map<String, Value>>,
    /// The last [`RECENT_REFUSED`] refused peers: `{"peer", "reason", "at_ms"}`.
    pub refused: std::sync::Mutex<std::collections::VecDeque<Value>>,
    /// Events for `/v1/events` (numbered JSON text); bounded, a slow subscriber is told it
    /// missed events.
    pub events: tokio::sync::broadcast::Sender<SentEvent>,
    /// The newest events, for subscribers that resume; bounded by count and bytes.
    recent: std::sync::Mutex<RecentEvents>,
    /// Event ids are `<epoch>-<n>`: a resume id from an earlier run of the daemon (another
    /// epoch) cannot be mistaken for one of this run.
    epoch: u64,
    /// Other parts of the daemon that report (the PostgreSQL mirror): name → a function of
    /// the feed head giving a JSON object, shown in `/v1/status` under the name and in
    /// `/metrics` as `fieldsync_<name>_<key>` for each numeric or boolean key.
    pub reports: std::sync::Mutex<Vec<(&'static str, Report)>>,
    /// Samples of the counters for `/v1/health`, oldest first; bounded by [`HEALTH_SAMPLES`].
    pub health: std::sync::Mutex<std::collections::VecDeque<Value>>,
}

/// How often [`sample_health`] samples the counters…
pub const HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// …and how many samples `/v1/health` keeps: 6 hours' worth (about 300 KiB).
pub const HEALTH_SAMPLES: usize = 6 * 360;

/// See [`Live::reports`].
pub type Report = Arc<dyn Fn(u64) -> Value + Send + Sync>;

/// One published event: its number in this run and its JSON text.
#[derive(Debug, Clone)]
pub struct SentEvent {
    pub n: u64,
    pub text: Arc<str>,
}

#[derive(Debug, Default)]
struct RecentEvents {
    events: std::collections::VecDeque<SentEvent>,
    bytes: usize,
    next: u64,
}

/// Where a subscriber starts.
enum Resume {
    /// Only events from now on.
    Live,
    /// The events after number `n` of this run are still kept: replay them.
    After(u64),
    /// Some events after the given id are gone (too old, or an earlier run): say so.
    Missed,
}

impl Live {
    pub fn new() -> Self {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Live {
            peers: std::sync::Mutex::new(serde_json::Map::new()),
            refused: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(
                RECENT_REFUSED,
            )),
            events: tokio::sync::broadcast::channel(1024).0,
            recent: std::sync::Mutex::new(RecentEvents {
                next: 1,
                ..Default::default()
            }),
            epoch,
            reports: std::sync::Mutex::new(Vec::new()),
            health: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(
                HEALTH_SAMPLES,
            )),
        }
    }

    /// Notes a refused peer: it leaves `peers` and joins the bounded list of recent refusals.
    pub fn refuse(&self, peer: &str, reason: &str, at_ms: u64) {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.retain(|r| r["peer"] != peer);
        if refused.len() >= RECENT_REFUSED {
            refused.pop_front();
        }
        refused.push_back(json!({ "peer": peer, "reason": reason, "at_ms": at_ms }));
    }

    /// Peers with a sync session now.
    pub fn connected(&self) -> u64 {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| p["connected"] == true)
            .count() as u64
    }

    /// Publishes an event to `/v1/events` subscribers, and keeps it for those that resume.
    pub fn publish(&self, event: &Value) {
        let text: Arc<str> = event.to_string().into();
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let sent = SentEvent {
            n: recent.next,
            text,
        };
        recent.next += 1;
        recent.bytes += sent.text.len();
        recent.events.push_back(sent.clone());
        while recent.events.len() > RECENT_EVENTS || recent.bytes > RECENT_EVENT_BYTES {
            let Some(old) = recent.events.pop_front() else {
                break;
            };
            recent.bytes -= old.text.len();
        }
        // Sent under the lock, so subscribers see events in number order.
        let _ = self.events.send(sent);
    }

    /// The SSE id of event `n`.
    fn event_id(&self, n: u64) -> String {
        format!("{}-{n}", self.epoch)
    }

    /// Where a subscriber with this `Last-Event-ID` resumes.
    fn resume_from(&self, last_event_id: Option<&str>) -> Resume {
        let Some(id) = last_event_id else {
            return Resume::Live;
        };
        let Some((epoch, n)) = id
            .split_once('-')
            .and_then(|(e, n)| Some((e.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
        else {
            return Resume::Missed;
        };
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = recent.events.front().map_or(recent.next, |e| e.n);
        if epoch == self.epoch && n < recent.next && n + 1 >= oldest {
            Resume::After(n)
        } else {
            Resume::Missed
        }
    }

    /// Subscribes, and returns the kept events after `n` (none for `None`): subscribing
    /// under the lock means no event falls between the replay and the live stream.
    fn subscribe_after(
        &self,
        n: Option<u64>,
    ) -> (Vec<SentEvent>, tokio::sync::broadcast::Receiver<SentEvent>) {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.events.subscribe();
        let replay = match n {
            Some(n) => recent.events.iter().filter(|e| e.n > n).cloned().collect(),
            None => Vec::new(),
        };
        (replay, rx)
    }
}

impl std::fmt::Debug for Live {
    // (The report functions have nothing to show.)
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("peers", &self.peers)
            .field("refused", &self.refused)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Default for Live {
    fn default() -> Self {
        Self::new()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub replica: Arc<Replica>,
    /// Called after every successful write (wakes the sync engine).
    pub on_change: Arc<dyn Fn() + Send + Sync>,
    pub metrics: Arc<Metrics>,
    pub live: Arc<Live>,
    /// The token and CORS rules of this listener.
    pub access: Arc<auth::Access>,
    /// Fetches a file this node lacks from its peers (none: only the local store).
    pub fetch_blob: Option<FetchBlob>,
}

impl std::fmt::Debug for AppState {
    // (Debug shows the replica and metrics; the callback has nothing to show.)
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("replica", &self.replica)
            .field("metrics", &self.metrics)
            .finish()
    }
}

/// An API error: HTTP status from the error kind, JSON body `{"error": message, "kind": …}`: 400 bad
/// input, 403 what only the authority may do or the member's partitions refuse, 404 no
/// such entity, collection, conflict, proposal or member, 409 the entity id belongs to
/// another collection or the op id to another write, 500 a failure here. The body's `kind`
/// says what the status cannot always: `invalid` (the request was wrong: an unknown
/// collection is one, though it answers 404), `not_found` or `failed`; the CLI's exit
/// codes follow it.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, message: String) -> Self {
        ApiError {
            status,
            message,
            kind: kind_of(status),
        }
    }
}

/// An error's `kind` as its status tells it.
fn kind_of(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        s if s.is_client_error() || s == StatusCode::INSUFFICIENT_STORAGE => "invalid",
        _ => "failed",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.message, "kind": self.kind })),
        )
            .into_response()
    }
}

impl From<fieldsync::Error> for ApiError {
    fn from(e: fieldsync::Error) -> Self {
        use fieldsync::core::Error as C;
        use fieldsync::Error as E;
        let status = match &e {
            E::AuthorityOnly(_) | E::Core(C::NotAuthority) | E::Refused(_) => StatusCode::FORBIDDEN,
            E::Core(C::UnknownCollection { .. }) => StatusCode::NOT_FOUND,
            // The id, or the op id, is taken by something else: not bad input as such.
            E::WrongCollection { .. } | E::Core(C::OpReused(_)) => StatusCode::CONFLICT,
            E::Blob(fieldsync::blobs::Error::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            E::Blob(fieldsync::blobs::Error::QuotaExceeded { .. }) => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            _ => match e.kind() {
                ErrorKind::Invalid => StatusCode::BAD_REQUEST,
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        let mut error = ApiError::new(status, e.to_string());
        if let E::Core(C::UnknownCollection { .. }) = e {
            error.kind = "invalid";
        }
        error
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

/// Runs a blocking replica call on the blocking pool.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Replica) -> Result<T, fieldsync::Error> + Send + 'static,
) -> Result<T, ApiError> {
    state.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    let replica = state.replica.clone();
    let result = tokio::task::spawn_blocking(move || f(&replica))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if result.is_err() {
        state.metrics.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    Ok(result?)
}

fn parse<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, ApiError>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{what} {text:?} is not valid: {e}"),
        )
    })
}

/// Largest request body (a patch, a value, a list of ids): 8 MiB, as `fieldsync put`.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// Largest bundle `POST /v1/bundle` takes: 256 MiB (larger ones: stop the daemon and
/// import on the data directory).
pub const MAX_BUNDLE_BYTES: usize = 256 << 20;

/// The API for a listener: its routes behind the token and CORS rules of `state.access`.
pub fn router(state: AppState) -> Router {
    routes()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::cors,
        ))
        .with_state(state)
}

/// The same routes with no listener's rules, for a caller in this process that holds the
/// data directory itself: the CLI when no daemon runs on it.
pub fn in_process(state: AppState) -> Router {
    routes().with_state(state)
}

fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/collections/{collection}", get(list).post(create))
        .route(
            "/v1/collections/{collection}/{id}",
            get(read).patch(update).put(update).delete(remove),
        )
        .route("/v1/collections/{collection}/{id}/history", get(history))
        .route("/v1/collections/{collection}/{id}/purge", post(purge))
        .route(
            "/v1/collections/{collection}/{id}/attachments/{field}",
            post(blobs::attach),
        )
        // The body streams into the blob store, which applies its own size limit.
        .route(
            "/v1/blobs",
            post(blobs::upload).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/v1/blobs/{hash}", get(blobs::download))
        .route("/v1/conflicts", get(conflicts))
        .route("/v1/conflicts/{id}/resolve", post(resolve))
        .route("/v1/proposals", get(proposals))
        .route("/v1/proposals/accept", post(accept_many))
        .route("/v1/proposals/reject", post(reject_many))
        .route("/v1/proposals/{id}/accept", post(accept))
        .route("/v1/proposals/{id}/reject", post(reject))
        .route("/v1/sync", post(sync_now))
        .route("/v1/schema", get(schema_show).post(schema_push))
        .route("/v1/schema/diff", post(schema_diff))
        .route("/v1/members", get(members))
        .route("/v1/members/{peer}", get(member))
        .route("/v1/devices", get(devices))
        .route("/v1/health", get(health))
        .route("/v1/members/{peer}/revoke", post(revoke))
        .route(
            "/v1/members/{peer}/delegate",
            post(delegate).delete(withdraw_delegation),
        )
        .route("/v1/invites", get(pending_invites).post(invite))
        .route("/v1/invites/{id}/cancel", post(cancel_invite))
        .route(
            "/v1/bundle",
            get(bundle_export)
                .post(bundle_import)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_BUNDLE_BYTES)),
        )
        .route("/v1/events", get(events))
        .route("/v1/changes", get(changes))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn(check_query_params))
        // The console's files (after the query check: a page URL may carry anything).
        .route("/", get(console::redirect))
        .route("/console", get(console::redirect))
        .route("/console/", get(console::index))
        .route("/console/{*path}", get(console::file))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(json_errors))
}

/// Unknown routes: 404 with the JSON error body, like every other error.
async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
}

/// Makes every error response `{"error": "..."}` JSON: axum's own answers (405, extractor
/// rejections such as a bad query value, invalid UTF-8 or a body over the limit — 413) come
/// as plain text, and keep their status and headers (`Allow` on 405).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Error texts are short; a longer one is cut rather than buffered without bound.
    let text = match axum::body::to_bytes(body, 16 << 10).await {
        Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = json!({ "error": text, "kind": kind_of(status) }).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn status(State(s): State<AppState>) -> ApiResult {
    let st = blocking(&s, |r| r.status()).await?;
    let mut v = serde_json::to_value(st).unwrap_or(Value::Null);
    let peers = s.live.peers.lock().map(|p| p.clone()).unwrap_or_default();
    // Local changes a relay (or, with none, any peer) has not acknowledged yet.
    let acked = peers
        .values()
        .filter(|p| p["role"] == "relay" || peers.values().all(|q| q["role"] != "relay"))
        .filter_map(|p| p["acked_upto"].as_u64())
        .max()
        .unwrap_or(0);
    let pending = blocking(&s, move |r| r.pending_after(acked)).await?;
    v["pending_to_relay"] = json!(pending);
    v["blobs"]["transfers_in_flight"] = json!(s.metrics.blobs_in_flight.load(Ordering::Relaxed));
    v["peers"] = Value::Object(peers);
    v["refused_peers"] = Value::Array(
        s.live
            .refused
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default(),
    );
    let head = s.replica.feed_seq();
    for (name, report) in s.live.reports.lock().map(|r| r.clone()).unwrap_or_default() {
        v[name] = report(head);
    }
    Ok(Json(v))
}

async fn sync_now(State(s): State<AppState>) -> ApiResult {
    (s.on_change)();
    status(State(s)).await
}

/// `/v1/events`: Server-Sent Events, each with an id. A client that reconnects with
/// `Last-Event-ID` first gets what it missed, if the daemon still keeps it; otherwise (too
/// old, a restarted daemon, or a subscriber too slow to keep up) an `events_missed` event
/// tells it to catch up from `/v1/changes`.
async fn events(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let live = s.live.clone();
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let (first, after) = match live.resume_from(last) {
        Resume::Live => (None, None),
        Resume::After(n) => (None, Some(n)),
        Resume::Missed => (
            Some(missed_event(
                "the events after the given Last-Event-ID are no longer kept",
            )),
            None,
        ),
    };
    let (replay, rx) = live.subscribe_after(after);
    let last_sent = replay.last().map(|e| e.n).or(after).unwrap_or(0);
    let event = {
        let live = live.clone();
        move |e: &SentEvent| Event::default().id(live.event_id(e.n)).data(&*e.text)
    };
    let head = futures::stream::iter(
        first
            .into_iter()
            .chain(replay.iter().map(&event))
            .map(Ok)
            .collect::<Vec<_>>(),
    );
    let tail = futures::stream::unfold(
        (rx, last_sent, event),
        |(mut rx, last_sent, event)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) if e.n <= last_sent => continue,
                    Ok(e) => {
                        let out = event(&e);
                        return Some((Ok(out), (rx, e.n, event)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(skipped)) => {
                        let out =
                            missed_event(&format!("this subscriber fell {skipped} events behind"));
                        return Some((Ok(out), (rx, last_sent, event)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    use futures::StreamExt as _;
    Sse::new(head.chain(tail)).keep_alive(KeepAlive::default())
}

/// Tells a subscriber that events were lost: it should read `/v1/changes` from the last
/// `seq` it saw.
fn missed_event(reason: &str) -> axum::response::sse::Event {
    axum::response::sse::Event::default().data(json!({ "event": "events_missed", "reason": reason, "catch_up": "/v1/changes?since=<last seq seen>" }).to_string())
}

/// Page sizes of lists and the changes feed: the default, and the most one page may hold.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 1000;
/// The most `where` filters one list takes.
pub const MAX_FILTERS: usize = 8;
/// Feed positions are JSON-safe integers.
const MAX_SEQ: u64 = (1 << 53) - 1;

/// The query parameters each route takes; any other is a 400 that names it (a typo such as
/// `?limt=10` would otherwise be silently ignored).
const QUERY_PARAMS: &[(&str, &[&str])] = &[
    (
        "/v1/collections/{collection}",
        &["where", "include_deleted", "limit", "cursor"],
    ),
    ("/v1/collections/{collection}/{id}", &["include_deleted"]),
    ("/v1/conflicts", &["all"]),
    ("/v1/proposals", &["mine"]),
    ("/v1/changes", &["since", "limit"]),
    ("/v1/bundle", &["since"]),
    ("/v1/blobs", &["name"]),
    ("/v1/schema", &["version"]),
];

async fn check_query_params(
    path: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let allowed = path
        .and_then(|p| {
            QUERY_PARAMS
                .iter()
                .find(|(route, _)| *route == p.as_str())
                .map(|(_, names)| *names)
        })
        .unwrap_or(&[]);
    let query = request.uri().query().unwrap_or("");
    for (name, _) in form_urlencoded::parse(query.as_bytes()) {
        if !allowed.contains(&name.as_ref()) {
            let takes = if allowed.is_empty() {
                "no query parameters".to_owned()
            } else {
                format!("only {}", allowed.join(", "))
            };
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown query parameter {name:?}: this route takes {takes}"),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// A page size: 1 to [`MAX_PAGE`].
fn page_size(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_PAGE);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit takes a whole number from 1 to {MAX_PAGE}, got {text:?}"),
        )),
    }
}

fn flag(name: &str, text: &str) -> Result<bool, ApiError> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{name} takes true or false, got {text:?}"),
        )),
    }
}

/// `GET /v1/collections/{collection}`: one page of views, `{"items": [...], "next": cursor
/// or null}`. Each `where=FIELD=VALUE` is one filter (repeat it for several; a value may
/// contain commas); `cursor` is a page's `next`.
async fn list(
    State(s): State<AppState>,
    Path(collection): Path<String>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> ApiResult {
    let (mut filters, mut include_deleted, mut limit, mut cursor) = (Vec::new(), false, None, None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "where" => filters.push(value.into_owned()),
            "include_deleted" => include_deleted = flag("include_deleted", &value)?,
            "limit" => limit = Some(value.into_owned()),
            "cursor" => cursor = Some(parse::<fieldsync::EntityId>("cursor", &value)?),
            _ => {}
        }
    }
    let limit = page_size(limit.as_deref())?;
    if filters.len() > MAX_FILTERS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "where: at most {MAX_FILTERS} filters, got {}",
                filters.len()
            ),
        ));
    }
    let (items, next) = blocking(&s, move |r| {
        let mut items = Vec::with_capacity(limit.min(DEFAULT_PAGE));
        let mut next = None;
        // One view past the page tells whether there is a next page.
        let mut last = None;
        r.list_after(
            &collection,
            &filters,
            include_deleted,
            cursor,
            &mut |id, view| {
                if items.len() == limit {
                    next = last;
                    return false;
                }
                last = Some(id);
                items.push(Value::Object(view));
                true
            },
        )?;
        Ok((items, next))
    })
    .await?;
    Ok(Json(
        json!({ "items": items, "next": next.map(|id: fieldsync::EntityId| id.to_string()) }),
    ))
}

#[derive(Deserialize)]
struct ChangesQuery {
    #[serde(default)]
    since: u64,
    limit: Option<String>,
}

/// `GET /v1/changes?since=SEQ&limit=N`: what changed after feed position `since`, oldest
/// first, each entity once with its view or as a tombstone. `next` is the `since` of the
/// following call; `head` the newest position now (caught up when `next == head`).
async fn changes(State(s): State<AppState>, Query(q): Query<ChangesQuery>) -> ApiResult {
    let limit = page_size(q.limit.as_deref())?;
    let since = q.since;
    if since > MAX_SEQ {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("since takes a feed position from 0 to {MAX_SEQ}, got {since}"),
        ));
    }
    let (changes, head) =
        blocking(&s, move |r| Ok((r.changes(since, limit)?, r.feed_seq()))).await?;
    let next = changes.last().map_or(since, |c| c.seq);
    let changes: Vec<Value> = changes
        .into_iter()
        .map(|c| match c.deleted {
            false => json!({ "seq": c.seq, "collection": c.collection, "id": c.id.to_string(), "view": c.view }),
            true => json!({ "seq": c.seq, "collection": c.collection, "id": c.id.to_string(), "deleted": true }),
        })
        .collect();
    Ok(Json(
        json!({ "changes": changes, "next": next, "head": head.max(next) }),
    ))
}

/// The `Idempotency-Key` header as an operation id, if the request carries one.
fn op_id(headers: &axum::http::HeaderMap) -> Result<Option<fieldsync::OpId>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let text = v.to_str().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "Idempotency-Key must be printable ASCII".into(),
        )
    })?;
    text.parse()
        .map(Some)
        .map_err(|e: &str| ApiError::new(StatusCode::BAD_REQUEST, format!("Idempotency-Key: {e}")))
}

/// A write's answer; a replayed operation answers as the first call did, marked with
/// `Idempotent-Replayed: true`.
fn written(status: StatusCode, body: Value, applied: fieldsync::Applied) -> Response {
    let mut res = (status, Json(body)).into_response();
    if applied == fieldsync::Applied::Already {
        res.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    res
}

/// Adds `warning` to a write's answer when this node will not sync (revoked or refused):
/// the write is kept locally.
fn with_warning(mut body: Value, warning: Option<String>) -> Value {
    if let Some(w) = warning {
        body["warning"] = json!(w);
    }
    body
}

async fn create(
    State(s): State<AppState>,
    Path(collection): Path<String>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Result<Response, ApiError> {
    let op = op_id(&headers)?;
    let ((id, applied), warning) = blocking(&s, move |r| {
        Ok((
            r.put_op(&collection, None, &body, op.as_ref())?,
            r.membership()?.warning(),
        ))
    })
    .await?;
    (s.on_change)();
    Ok(written(
        StatusCode::CREATED,
        with_warning(json!({ "id": id.to_string() }), warning),
        applied,
    ))
}

#[derive(Deserialize)]
struct ReadQuery {
    #[serde(default)]
    include_deleted: bool,
}

/// A deleted entity answers 404 unless `include_deleted=true` (then its view shows `_deleted`).
async fn read(
    State(s): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    Query(q): Query<ReadQuery>,
) -> ApiResult {
    let id: fieldsync::EntityId = parse("entity id", &id)?;
    let view = blocking(&s, move |r| r.get(&collection, id)).await?;
    if !q.include_deleted && view.get("_deleted").is_some_and(|d| d == true) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("entity {id} is deleted (include_deleted=true shows it)"),
        ));
    }
    Ok(Json(Value::Object(view)))
}

async fn update(
    State(s): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Result<Response, ApiError> {
    let id = parse("entity id", &id)?;
    let op = op_id(&headers)?;
    let ((id, applied), warning) = blocking(&s, move |r| {
        Ok((
            r.put_op(&collection, Some(id), &body, op.as_ref())?,
            r.membership()?.warning(),
        ))
    })
    .await?;
    (s.on_change)();
    Ok(written(
        StatusCode::OK,
        with_warning(json!({ "id": id.to_string() }), warning),
        applied,
    ))
}

async fn remove(
    State(s): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse("entity id", &id)?;
    let op = op_id(&headers)?;
    let applied = blocking(&s, move |r| r.delete_op(&collection, id, op.as_ref())).await?;
    (s.on_change)();
    Ok(written(
        StatusCode::OK,
        json!({ "id": id.to_string(), "deleted": true }),
        applied,
    ))
}

/// Erases an entity on every node (authority or admin): see `Replica::purge`.
async fn purge(
    State(s): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult {
    let id = parse("entity id", &id)?;
    let c = collection.clone();
    let record = blocking(&s, move |r| r.purge(&c, id)).await?;
    (s.on_change)();
    Ok(Json(
        json!({ "id": id.to_string(), "collection": collection, "purged": true, "by": record.by, "at_ms": record.at_ms }),
    ))
}

async fn history(
    State(s): State<AppState>,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult {
    let id = parse("entity id", &id)?;
    // Reading an id of another collection: there is no such entity here (404, not 409).
    let h = blocking(&s, move |r| r.history(&collection, id))
        .await
        .map_err(|e| match e.status {
            StatusCode::CONFLICT => ApiError::new(StatusCode::NOT_FOUND, e.message),
            _ => e,
        })?;
    Ok(Json(serde_json::to_value(h).unwrap_or(Value::Null)))
}

#[derive(Deserialize)]
struct ConflictsQuery {
    #[serde(default)]
    all: bool,
}

async fn conflicts(State(s): State<AppState>, Query(q): Query<ConflictsQuery>) -> ApiResult {
    let c = blocking(&s, move |r| r.conflicts(q.all)).await?;
    Ok(Json(serde_json::to_value(c).unwrap_or(Value::Null)))
}

async fn resolve(State(s): State<AppState>, Path(id): Path<String>, body: String) -> ApiResult {
    let conflict: fieldsync::ConflictId = parse("conflict id", &id)?;
    let entity = blocking(&s, move |r| r.resolve(&conflict, &body)).await?;
    (s.on_change)();
    Ok(Json(
        json!({ "conflict": id, "entity": entity.to_string(), "resolved": true }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProposalsQuery {
    /// Only this node's own pending proposals (works on any node).
    #[serde(default)]
    mine: bool,
}

async fn proposals(State(s): State<AppState>, Query(q): Query<ProposalsQuery>) -> ApiResult {
    let p = blocking(&s, move |r| {
        if q.mine {
            r.my_proposals()
        } else {
            r.proposals()
        }
    })
    .await?;
    Ok(Json(serde_json::to_value(p).unwrap_or(Value::Null)))
}

async fn accept(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let pid: fieldsync::ProposalId = parse("proposal id", &id)?;
    let entity = blocking(&s, move |r| r.accept(pid)).await?;
    (s.on_change)();
    Ok(Json(
        json!({ "proposal": id, "entity": entity.to_string(), "accepted": true }),
    ))
}

/// What the bulk `accept`/`reject` routes take.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProposalIds {
    ids: Vec<String>,
}

/// Settles several proposals; answers one result per id, in order (an id that fails does
/// not stop the others).
async fn settle_many(s: AppState, body: String, accept: bool) -> ApiResult {
    let req: ProposalIds = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"ids\": [proposal id, …]}}: {e}"),
        )
    })?;
    if req.ids.is_empty() || req.ids.len() > 1000 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "ids: give 1 to 1000 proposal ids".into(),
        ));
    }
    let ids = req
        .ids
        .iter()
        .map(|id| parse::<fieldsync::ProposalId>("proposal id", id))
        .collect::<Result<Vec<_>, _>>()?;
    let verb = if accept { "accepted" } else { "rejected" };
    let results = blocking(&s, move |r| {
        Ok(ids
            .into_iter()
            .map(|pid| match if accept { r.accept(pid) } else { r.reject(pid) } {
                Ok(entity) => json!({ "proposal": pid.to_string(), "entity": entity.to_string(), verb: true }),
                Err(e) => json!({ "proposal": pid.to_string(), verb: false, "error": e.to_string() }),
            })
            .collect::<Vec<_>>())
    })
    .await?;
    (s.on_change)();
    Ok(Json(Value::Array(results)))
}

async fn accept_many(State(s): State<AppState>, body: String) -> ApiResult {
    settle_many(s, body, true).await
}

async fn reject_many(State(s): State<AppState>, body: String) -> ApiResult {
    settle_many(s, body, false).await
}

/// What `GET /v1/schema` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaQuery {
    version: Option<u64>,
}

async fn schema_show(State(s): State<AppState>, Query(q): Query<SchemaQuery>) -> ApiResult {
    let info = blocking(&s, move |r| r.schema_info(q.version)).await?;
    Ok(Json(serde_json::to_value(info).unwrap_or(Value::Null)))
}

async fn schema_diff(State(s): State<AppState>, body: String) -> ApiResult {
    let diff = blocking(&s, move |r| r.diff_schema(&body)).await?;
    Ok(Json(serde_json::to_value(diff).unwrap_or(Value::Null)))
}

async fn schema_push(State(s): State<AppState>, body: String) -> ApiResult {
    let pushed = blocking(&s, move |r| r.push_schema(&body)).await?;
    // Wakes the sync engine: the new version goes out at once.
    (s.on_change)();
    Ok(Json(serde_json::to_value(pushed).unwrap_or(Value::Null)))
}

async fn members(State(s): State<AppState>) -> ApiResult {
    let m = blocking(&s, |r| r.member_infos()).await?;
    Ok(Json(serde_json::to_value(m).unwrap_or(Value::Null)))
}

async fn revoke(State(s): State<AppState>, Path(peer): Path<String>) -> ApiResult {
    let peer: fieldsync::PeerId = parse("peer id", &peer)?;
    let record = blocking(&s, move |r| r.revoke(&peer)).await?;
    // Wakes the sync engine: it ends the revoked peer's session at once.
    (s.on_change)();
    Ok(Json(serde_json::to_value(record).unwrap_or(Value::Null)))
}

async fn delegate(State(s): State<AppState>, Path(peer): Path<String>) -> ApiResult {
    set_delegation(s, peer, true).await
}

async fn withdraw_delegation(State(s): State<AppState>, Path(peer): Path<String>) -> ApiResult {
    set_delegation(s, peer, false).await
}

async fn set_delegation(s: AppState, peer: String, delegate: bool) -> ApiResult {
    let peer: fieldsync::PeerId = parse("peer id", &peer)?;
    let record = blocking(&s, move |r| r.delegate(&peer, delegate)).await?;
    (s.on_change)();
    Ok(Json(serde_json::to_value(record).unwrap_or(Value::Null)))
}

/// What `POST /v1/invites` takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteRequest {
    user: String,
    #[serde(default = "default_role")]
    role: fieldsync::core::membership::MemberRole,
    #[serde(default)]
    partitions: std::collections::BTreeMap<String, fieldsync::core::Access>,
    /// Seconds (an integer; `600.0` counts as one), at most [`MAX_VALID_SECS`].
    #[serde(default)]
    valid_secs: Option<serde_json::Number>,
}

/// Longest invite validity: 100 years.
const MAX_VALID_SECS: u64 = 3_153_600_000;

fn default_role() -> fieldsync::core::membership::MemberRole {
    fieldsync::core::membership::MemberRole::Device
}

fn valid_secs(n: Option<&serde_json::Number>) -> Result<u64, ApiError> {
    let Some(n) = n else { return Ok(7 * 24 * 3600) };
    let secs = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= MAX_VALID_SECS as f64)
            .map(|f| f as u64)
    });
    match secs {
        Some(s) if s <= MAX_VALID_SECS => Ok(s),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "valid_secs takes a whole number of seconds from 0 to {MAX_VALID_SECS}, got {n}"
            ),
        )),
    }
}

async fn invite(State(s): State<AppState>, body: String) -> ApiResult {
    let req: InviteRequest = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid invite request: {e}"),
        )
    })?;
    // Absent means the default; an explicit null is not a number of seconds.
    if body.contains("valid_secs") && req.valid_secs.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid invite request: valid_secs must be a number, not null".into(),
        ));
    }
    let ttl_ms = i64::try_from(valid_secs(req.valid_secs.as_ref())?.saturating_mul(1000))
        .unwrap_or(i64::MAX);
    let bytes = blocking(&s, move |r| {
        r.issue_invite(&req.user, req.role, req.partitions, ttl_ms)
    })
    .await?;
    Ok(Json(serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

async fn reject(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let pid: fieldsync::ProposalId = parse("proposal id", &id)?;
    let entity = blocking(&s, move |r| r.reject(pid)).await?;
    (s.on_change)();
    Ok(Json(
        json!({ "proposal": id, "entity": entity.to_string(), "rejected": true }),
    ))
}

async fn metrics(State(s): State<AppState>) -> Result<String, ApiError> {
    let st = blocking(&s, |r| Ok((r.status()?, r.commit_stats()))).await?;
    let (status, (commits, flushes)) = st;
    let m = &s.metrics;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    gauge(
        "fieldsync_http_requests_total",
        "HTTP API requests.",
        "counter",
        m.http_requests.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_http_errors_total",
        "HTTP API requests that failed.",
        "counter",
        m.http_errors.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_http_unauthorised_total",
        "HTTP API requests refused for a missing or wrong token (401).",
        "counter",
        m.http_unauthorised.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_sync_sessions_total",
        "Sync sessions started.",
        "counter",
        m.sync_sessions.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_sync_completed_total",
        "Catch-ups completed.",
        "counter",
        m.sync_completed.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_sync_failed_total",
        "Sync sessions that failed (rejected frames, wrong workspace…).",
        "counter",
        m.sync_failed.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_peers_connected",
        "Peers with a sync session.",
        "gauge",
        s.live.connected(),
    );
    gauge(
        "fieldsync_frames_sent_total",
        "Sync frames sent.",
        "counter",
        m.frames_sent.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_bytes_sent_total",
        "Sync bytes sent.",
        "counter",
        m.bytes_sent.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_frames_received_total",
        "Sync frames received.",
        "counter",
        m.frames_received.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_bytes_received_total",
        "Sync bytes received.",
        "counter",
        m.bytes_received.load(Ordering::Relaxed),
    );
    let sec = &m.security;
    gauge(
        "fieldsync_sessions_refused_total",
        "Sessions refused: not a member, revoked, wrong workspace, bad invite.",
        "counter",
        sec.sessions_refused.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_protocol_violations_total",
        "Sessions ended for malformed, oversized or out-of-order frames.",
        "counter",
        sec.protocol_violations.load(Ordering::Relaxed),
    );
    gauge("fieldsync_writes_refused_total", "Received entity writes refused (partitions, forged or removed authority values, member list).", "counter", sec.writes_refused.load(Ordering::Relaxed));
    gauge(
        "fieldsync_forged_refused_total",
        "Received writes refused for forging or removing authority-confirmed values.",
        "counter",
        sec.forged_refused.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_reads_refused_total",
        "Entities a peer asked for outside its partitions.",
        "counter",
        sec.reads_refused.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_peers_banned_total",
        "Peers disconnected and refused for a while.",
        "counter",
        sec.peers_banned.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_frames_ignored_total",
        "Replayed or duplicated sync frames, ignored.",
        "counter",
        sec.frames_ignored.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_frame_floods_total",
        "Sessions ended for sending frames too fast.",
        "counter",
        sec.floods.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_relay_refused_total",
        "Circuit relay reservations and circuits refused to peers that are not admitted members.",
        "counter",
        sec.relay_refused.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_feed_seq",
        "Head of the local changes feed.",
        "gauge",
        status.feed_seq,
    );
    gauge(
        "fieldsync_open_conflicts",
        "Open manual conflicts.",
        "gauge",
        status.open_conflicts as u64,
    );
    gauge(
        "fieldsync_blobs",
        "Attachment files in this node's blob store.",
        "gauge",
        status.blobs.count,
    );
    gauge(
        "fieldsync_blob_bytes",
        "Bytes of the attachment files in this node's blob store.",
        "gauge",
        status.blobs.bytes,
    );
    gauge(
        "fieldsync_blobs_fetched_total",
        "Attachment files fetched from peers and stored.",
        "counter",
        m.blobs_fetched.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_blob_transfers_corrupt_total",
        "Attachment files fetched from a peer whose bytes did not hash to what was asked (dropped, never stored).",
        "counter",
        m.blobs_corrupt.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_blob_bytes_received_total",
        "Bytes of attachment files received from peers (a resumed transfer counts only what it still needed).",
        "counter",
        m.blob_bytes_received.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_blob_bytes_sent_total",
        "Bytes of attachment files sent to peers.",
        "counter",
        m.blob_bytes_sent.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_blob_transfers_in_flight",
        "Attachment files being fetched from peers now.",
        "gauge",
        m.blobs_in_flight.load(Ordering::Relaxed),
    );
    gauge(
        "fieldsync_blob_quota_bytes",
        "The blob store's quota ([blobs] quota_bytes).",
        "gauge",
        status.blobs.quota_bytes,
    );
    gauge(
        "fieldsync_store_commits_total",
        "Store commits since start.",
        "counter",
        commits,
    );
    gauge(
        "fieldsync_store_flushes_total",
        "Store flushes since start (commits share them).",
        "counter",
        flushes,
    );
    for (name, report) in s.live.reports.lock().map(|r| r.clone()).unwrap_or_default() {
        let Value::Object(fields) = report(status.feed_seq) else {
            continue;
        };
        for (key, value) in fields {
            let value = match value {
                Value::Bool(b) => u64::from(b),
                Value::Number(n) => n.as_u64().unwrap_or(0),
                _ => continue,
            };
            gauge(
                &format!("fieldsync_{name}_{key}"),
                &format!("{name}: {key} (as in /v1/status)."),
                "gauge",
                value,
            );
        }
    }
    Ok(out)
}

/// Unused invites (authority; empty elsewhere).
async fn pending_invites(State(s): State<AppState>) -> ApiResult {
    let invites = blocking(&s, |r| r.pending_invites()).await?;
    let mut v = serde_json::to_value(invites).unwrap_or(Value::Null);
    for i in v.as_array_mut().into_iter().flatten() {
        if let Some(o) = i.as_object_mut() {
            o.remove("cancelled");
        }
    }
    Ok(Json(v))
}

async fn cancel_invite(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let id: uuid::Uuid = parse("invite id", &id)?;
    let invite = blocking(&s, move |r| r.cancel_invite(id)).await?;
    Ok(Json(
        json!({ "invite": invite.id.to_string(), "cancelled": true }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleQuery {
    /// Peer id of the node the bundle is for (only what it lacks and may see).
    #[serde(default)]
    since: Option<String>,
}

/// A bundle of this node's changes (`fieldsync bundle export` through a running daemon):
/// the bytes, with `Fieldsync-Entities`, `Fieldsync-Since` and `Fieldsync-Upto` headers.
async fn bundle_export(
    State(s): State<AppState>,
    Query(q): Query<BundleQuery>,
) -> Result<Response, ApiError> {
    let peer = q
        .since
        .as_deref()
        .map(|p| parse::<fieldsync::PeerId>("peer id", p))
        .transpose()?;
    let bundle = blocking(&s, move |r| r.export_bundle(peer, &mut |_, _| {})).await?;
    let mut res = (StatusCode::OK, bundle.bytes).into_response();
    let headers = res.headers_mut();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    for (name, value) in [
        ("fieldsync-entities", bundle.entities as u64),
        ("fieldsync-since", bundle.since),
        ("fieldsync-upto", bundle.upto),
    ] {
        headers.insert(name, axum::http::HeaderValue::from(value));
    }
    Ok(res)
}

/// Merges a bundle (`fieldsync bundle import` through a running daemon); at most
/// [`MAX_BUNDLE_BYTES`] (413 above).
async fn bundle_import(State(s): State<AppState>, body: axum::body::Bytes) -> ApiResult {
    let summary = blocking(&s, move |r| r.import_bundle(&body, &mut |_, _| {})).await?;
    (s.on_change)();
    Ok(Json(serde_json::to_value(summary).unwrap_or(Value::Null)))
}

/// The most feed entries counted for a device's `unacked` (more show as this many, with
/// `unacked_capped`).
pub const MAX_COUNTED: usize = 10_000;

/// What the console's devices page shows of each member: its member record, name and
/// last seen (as `/v1/members`), and what this daemon knows live — `online` (a session
/// now), `last_sync_ms` (its last completed catch-up in this run), `incoming` (its feed
/// entries not yet received here, while online), `unacked` (this node's feed entries it has
/// not acknowledged yet) and `refused` (`{reason, at_ms}` if this node refused it lately).
async fn device_rows(
    s: &AppState,
    only: Option<fieldsync::PeerId>,
) -> Result<Vec<Value>, ApiError> {
    let peers = s.live.peers.lock().map(|p| p.clone()).unwrap_or_default();
    let refused: Vec<Value> = s
        .live
        .refused
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default();
    blocking(s, move |r| {
        let me = r.peer_id().to_string();
        let only = only.map(|p| p.to_string());
        let mut rows = Vec::new();
        for info in r.member_infos()? {
            let peer = info.record.peer.clone();
            if only.as_ref().is_some_and(|o| *o != peer) {
                continue;
            }
            let mut row = serde_json::to_value(&info).unwrap_or_default();
            let live = peers.get(&peer);
            let online = live.is_some_and(|p| p["connected"] == true);
            let this_node = peer == me;
            row["this_node"] = json!(this_node);
            row["online"] = json!(online);
            row["last_sync_ms"] = live
                .and_then(|p| p.get("last_sync_ms"))
                .cloned()
                .unwrap_or(Value::Null);
            row["incoming"] = match (online, live) {
                (true, Some(p)) => json!(p["total"]
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(p["done"].as_u64().unwrap_or(0))),
                _ => Value::Null,
            };
            if this_node {
                row["unacked"] = Value::Null;
            } else {
                // This run's acknowledgement if newer, else the one kept from earlier runs.
                let (kept, _) = r.sync_checkpoints(&peer)?;
                let acked = live
                    .and_then(|p| p["acked_upto"].as_u64())
                    .unwrap_or(0)
                    .max(kept);
                let n = r.changes_since(acked, MAX_COUNTED + 1)?.len();
                row["unacked"] = json!(n.min(MAX_COUNTED));
                row["unacked_capped"] = json!(n > MAX_COUNTED);
                row["acked_upto"] = json!(acked);
            }
            row["refused"] = refused
                .iter()
                .find(|x| x["peer"] == peer.as_str())
                .map(|x| json!({ "reason": x["reason"], "at_ms": x["at_ms"] }))
                .unwrap_or(Value::Null);
            rows.push(row);
        }
        Ok(rows)
    })
    .await
}

/// `GET /v1/devices`: every member as the console's devices page shows it (see
/// [`device_rows`]), the peers refused lately that are not members, and this node's feed head.
async fn devices(State(s): State<AppState>) -> ApiResult {
    let rows = device_rows(&s, None).await?;
    let members: std::collections::HashSet<String> = rows
        .iter()
        .filter_map(|r| r["peer"].as_str().map(str::to_owned))
        .collect();
    let strangers: Vec<Value> = s
        .live
        .refused
        .lock()
        .map(|r| {
            r.iter()
                .filter(|x| !x["peer"].as_str().is_some_and(|p| members.contains(p)))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let feed_seq = s.replica.feed_seq();
    Ok(Json(
        json!({ "devices": rows, "refused": strangers, "feed_seq": feed_seq, "authority": s.replica.is_authority() }),
    ))
}

/// `GET /v1/members/{peer}`: one member as in `/v1/devices`; 404 if it is not a member.
async fn member(State(s): State<AppState>, Path(peer): Path<String>) -> ApiResult {
    let peer: fieldsync::PeerId = parse("peer id", &peer)?;
    let mut rows = device_rows(&s, Some(peer)).await?;
    match rows.pop() {
        Some(row) => Ok(Json(row)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no member {peer}"),
        )),
    }
}

/// One sample of the counters the health page draws (cumulative since the daemon started,
/// except `peers_connected`).
fn health_sample(m: &Metrics, live: &Live) -> Value {
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let sec = &m.security;
    json!({
        "at_ms": at_ms,
        "peers_connected": live.connected(),
        "sync_sessions": m.sync_sessions.load(Ordering::Relaxed),
        "sync_completed": m.sync_completed.load(Ordering::Relaxed),
        "sync_failed": m.sync_failed.load(Ordering::Relaxed),
        "sessions_refused": sec.sessions_refused.load(Ordering::Relaxed),
        "writes_refused": sec.writes_refused.load(Ordering::Relaxed),
        "bytes_sent": m.bytes_sent.load(Ordering::Relaxed),
        "bytes_received": m.bytes_received.load(Ordering::Relaxed),
        "http_requests": m.http_requests.load(Ordering::Relaxed),
        "http_errors": m.http_errors.load(Ordering::Relaxed),
        "http_unauthorised": m.http_unauthorised.load(Ordering::Relaxed),
    })
}

/// Samples the counters every [`HEALTH_INTERVAL`] into `live.health` (the newest
/// [`HEALTH_SAMPLES`] are kept) until the task is dropped: the health page's charts.
pub async fn sample_health(metrics: Arc<Metrics>, live: Arc<Live>) {
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tick.tick().await;
        let sample = health_sample(&metrics, &live);
        let mut ring = live.health.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() >= HEALTH_SAMPLES {
            ring.pop_front();
        }
        ring.push_back(sample);
    }
}

/// `GET /v1/health`: the kept samples, oldest first, then one taken now; the same counters
/// `/metrics` exports (cumulative since the daemon started: a chart draws the differences).
async fn health(State(s): State<AppState>) -> ApiResult {
    s.metrics.http_requests.fetch_add(1, Ordering::Relaxed);
    let mut samples: Vec<Value> = s
        .live
        .health
        .lock()
        .map(|r| r.iter().cloned().collect())
        .unwrap_or_default();
    samples.push(health_sample(&s.metrics, &s.live));
    Ok(Json(
        json!({ "interval_ms": HEALTH_INTERVAL.as_millis() as u64, "max_samples": HEALTH_SAMPLES, "samples": samples }),
    ))
}
