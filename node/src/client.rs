//! Where the CLI's data commands go. Each command is written once (`data.rs`) as calls to
//! the HTTP API; a [`Client`] carries them either to the daemon that holds the data
//! directory (its listener, with the directory's token) or, when none runs, to the same
//! routes served in this process on the opened store. Both answer alike: the same JSON,
//! the same errors, the same exit codes.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, Method, Request};
use serde_json::Value;

use crate::cli::{CliError, Result};

/// A plain call's time limit (daemon only: in process nothing waits on a network).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Files and bundles can be large: their transfers get longer.
pub(crate) const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);

/// Pieces an upload is read in, in process; at most `UPLOAD_PIECES_QUEUED` wait at once.
const UPLOAD_PIECE: usize = 256 << 10;
const UPLOAD_PIECES_QUEUED: usize = 4;

pub(crate) struct Client {
    target: Target,
}

enum Target {
    Daemon {
        api: String,
        token: Option<String>,
    },
    InProcess {
        runtime: tokio::runtime::Runtime,
        routes: axum::Router,
    },
}

/// What a request carries.
pub(crate) enum Body {
    Empty,
    Json(String),
    /// Bytes streamed from a reader (a file), never whole in memory.
    Stream {
        from: Box<dyn Read + Send>,
        len: u64,
        mime: String,
    },
}

/// An answer: its status, headers and a reader of its body.
pub(crate) struct Answer<'a> {
    pub status: u16,
    pub headers: HeaderMap,
    body: Box<dyn Read + 'a>,
}

impl Client {
    /// The daemon whose API is at `api` (`http://host:port`); `dir`'s token goes with
    /// every call (the CLI runs as the data directory's owner, so it may read it).
    pub fn daemon(api: String, dir: &Path) -> Client {
        let token = fieldsync_api::auth::read_token(dir).ok().flatten();
        Client {
            target: Target::Daemon { api, token },
        }
    }

    /// The API served in this process on `replica`, which no daemon holds.
    pub fn in_process(dir: &Path, replica: fieldsync::Replica) -> Result<Client> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))?;
        let state = fieldsync_api::AppState {
            replica: Arc::new(replica),
            // Nothing to wake: no sync engine runs here.
            on_change: Arc::new(|| {}),
            metrics: Arc::default(),
            live: Arc::new(fieldsync_api::Live::new()),
            access: Arc::new(fieldsync_api::auth::Access::new(dir, false, Vec::new())),
            fetch_blob: None,
        };
        Ok(Client {
            target: Target::InProcess {
                runtime,
                routes: fieldsync_api::in_process(state),
            },
        })
    }

    /// Whether a daemon (and so a network) answers these calls.
    pub fn is_daemon(&self) -> bool {
        matches!(self.target, Target::Daemon { .. })
    }

    /// Sends one request; `path` starts at `/v1/…` and is already percent-encoded.
    pub fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
        timeout: Duration,
    ) -> Result<Answer<'_>> {
        let built = |uri: String| {
            let mut request = Request::builder().method(method.clone()).uri(uri);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            match &body {
                Body::Empty => request,
                Body::Json(_) => request.header("content-type", "application/json"),
                Body::Stream { len, mime, .. } => request
                    .header("content-type", mime.as_str())
                    .header("content-length", len.to_string()),
            }
        };
        let invalid =
            |e: axum::http::Error| CliError::invalid(format!("bad request to {path}: {e}"));
        match &self.target {
            Target::Daemon { api, token } => {
                let mut request = built(format!("{api}{path}"));
                if let Some(token) = token {
                    request = request.header("authorization", format!("Bearer {token}"));
                }
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(timeout))
                    .build()
                    .into();
                let sent = match body {
                    Body::Empty => agent.run(request.body(()).map_err(invalid)?),
                    Body::Json(text) => agent.run(request.body(text).map_err(invalid)?),
                    Body::Stream { from, .. } => agent.run(
                        request
                            .body(ureq::SendBody::from_owned_reader(from))
                            .map_err(invalid)?,
                    ),
                };
                let response = sent.map_err(|e| {
                    CliError::runtime(format!("the daemon's API at {api} did not answer: {e}"))
                })?;
                let (parts, body) = response.into_parts();
                Ok(Answer {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: Box::new(body.into_with_config().limit(u64::MAX).reader()),
                })
            }
            Target::InProcess { runtime, routes } => {
                let request = built(path.to_owned());
                let body = match body {
                    Body::Empty => axum::body::Body::empty(),
                    Body::Json(text) => axum::body::Body::from(text),
                    Body::Stream { from, .. } => axum::body::Body::from_stream(pieces(from)),
                };
                let request = request.body(body).map_err(invalid)?;
                let response = runtime
                    .block_on(tower::ServiceExt::oneshot(routes.clone(), request))
                    .unwrap_or_else(|never| match never {});
                let (parts, body) = response.into_parts();
                Ok(Answer {
                    status: parts.status.as_u16(),
                    headers: parts.headers,
                    body: Box::new(BodyReader {
                        runtime,
                        stream: body.into_data_stream(),
                        piece: bytes::Bytes::new(),
                    }),
                })
            }
        }
    }

    /// A call whose answer is JSON; the API's errors as the CLI's (exit codes included).
    pub fn call(&self, method: Method, path: &str, body: Body) -> Result<Value> {
        self.call_with(method, path, &[], body)
    }

    /// [`Client::call`] with headers (an operation id as `Idempotency-Key`).
    pub fn call_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Result<Value> {
        self.send(method, path, headers, body, CALL_TIMEOUT)?.json()
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        self.call(Method::GET, path, Body::Empty)
    }

    pub fn post(&self, path: &str, body: Body) -> Result<Value> {
        self.call(Method::POST, path, body)
    }
}

impl<'a> Answer<'a> {
    /// The body as JSON if the status is a success, else the API's error.
    pub fn json(mut self) -> Result<Value> {
        let mut text = String::new();
        self.body
            .read_to_string(&mut text)
            .map_err(|e| CliError::runtime(format!("reading the API's answer: {e}")))?;
        if !(200..300).contains(&self.status) {
            return Err(api_error(self.status, &text));
        }
        serde_json::from_str(&text)
            .map_err(|e| CliError::runtime(format!("the API answered {e}: {text:.200}")))
    }

    /// The body to read if the status is a success, else the API's error.
    pub fn into_reader(self) -> Result<Box<dyn Read + 'a>> {
        if (200..300).contains(&self.status) {
            Ok(self.body)
        } else {
            Err(self
                .json()
                .err()
                .unwrap_or_else(|| CliError::runtime("request failed")))
        }
    }

    /// A numeric header (0 if absent).
    pub fn header_u64(&self, name: &str) -> u64 {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// An API error answer as the CLI's error, by the error's `kind` (else its status): refused
/// input, what only the authority may do, an id taken by something else, a file over a
/// limit exit 2; not found exits 3.
fn api_error(status: u16, text: &str) -> CliError {
    let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let message = value["error"]
        .as_str()
        .unwrap_or("request failed")
        .to_owned();
    match (value["kind"].as_str(), status) {
        (Some("invalid"), _) | (None, 400 | 403 | 409 | 413 | 507) => CliError::invalid(message),
        (Some("not_found"), _) | (None, 404) => CliError::not_found(message),
        _ => CliError::runtime(message),
    }
}

/// Percent-encodes a path segment or query value.
pub(crate) fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An upload's bytes as a stream for the in-process routes: a thread reads the file in
/// pieces into a bounded queue, so a large file never sits whole in memory.
fn pieces(
    mut from: Box<dyn Read + Send>,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_PIECES_QUEUED);
    std::thread::spawn(move || loop {
        let mut piece = vec![0u8; UPLOAD_PIECE];
        let next = match from.read(&mut piece) {
            Ok(0) => return,
            Ok(n) => {
                piece.truncate(n);
                Ok(bytes::Bytes::from(piece))
            }
            Err(e) => Err(e),
        };
        let failed = next.is_err();
        // The receiver gone means the request ended (refused): stop reading.
        if tx.blocking_send(next).is_err() || failed {
            return;
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) })
}

/// Reads an in-process answer's body, driving the runtime piece by piece.
struct BodyReader<'a> {
    runtime: &'a tokio::runtime::Runtime,
    stream: axum::body::BodyDataStream,
    piece: bytes::Bytes,
}

impl Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() {
            match self
                .runtime
                .block_on(futures::StreamExt::next(&mut self.stream))
            {
                None => return Ok(0),
                Some(Ok(piece)) => self.piece = piece,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}
