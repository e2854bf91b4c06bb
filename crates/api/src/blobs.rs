//! Attachments over HTTP: streaming upload into the node's blob store, streaming download
//! with `Range`, and attaching a stored file to an entity's `attachments` field.
//!
//! - `POST /v1/blobs?name=NAME`: the request body (Content-Type: the file's media type) is
//!   streamed into the blob store through a bounded channel — never held whole — and
//!   checked against `[blobs] max_blob_bytes` (413) and `quota_bytes` (507) as it arrives
//!   (at once when Content-Length says so). 201 with the reference `{hash, size, mime,
//!   name}`; the 8 MiB limit of JSON bodies does not apply here.
//! - `GET /v1/blobs/{hash}`: the bytes, streamed from the file; `Range: bytes=A-B` (one
//!   range) answers 206 with `Content-Range`, an unsatisfiable or malformed range 416. A
//!   blob not held here is first fetched from the connected peers (the daemon's network,
//!   `fieldsync-net`'s file protocol), verified, then served; 404 if none sent it.
//! - `POST /v1/collections/{collection}/{id}/attachments/{field}` with a reference: adds it
//!   to the field once the blob is here (as `fieldsync attach`); the same as a PATCH with
//!   `{"FIELD": {"$add": [reference]}}`, which checks the blob in the same way.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fieldsync_blobs::{Hash, Stored};
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::{blocking, parse, ApiError, AppState};

/// Chunks in flight between the request and the blob writer: the upload waits for the
/// disk instead of piling up in memory.
const UPLOAD_QUEUE: usize = 8;

/// How long a download waits for a file fetched from peers.
const FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Bytes read from the file per piece of a download.
const DOWNLOAD_CHUNK: usize = 64 << 10;

/// After a refusal (over a limit), this much more of the body is read and dropped, so the
/// client, still sending, reads the answer instead of a reset connection; past it the
/// connection closes.
const DRAIN_BYTES: u64 = 64 << 20;

/// What the upload task is sent.
enum Piece {
    Bytes(axum::body::Bytes),
    /// The body ended normally: store the blob (without it, nothing is kept).
    End,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UploadQuery {
    /// The name the reference shows (default: empty).
    #[serde(default)]
    name: Option<String>,
}

/// `POST /v1/blobs`: see the module docs.
pub(crate) async fn upload(
    State(s): State<AppState>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let store = blocking(&s, |r| r.blobs()).await?;
    let mime = headers
        .get(header::CONTENT_TYPE)
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Content-Type must be printable ASCII".into(),
                )
            })
        })
        .transpose()?
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let name = q.name.unwrap_or_default();
    let size = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // The reference is checked (all but its hash) before any byte is stored.
    let probe =
        json!({ "hash": "0".repeat(64), "size": size.unwrap_or(0), "mime": mime, "name": name });
    fieldsync::core::attachment::Reference::from_json("upload", &probe)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(UPLOAD_QUEUE);
    let writer = tokio::task::spawn_blocking(move || -> Result<Stored, fieldsync_blobs::Error> {
        let mut w = store.writer(size)?;
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Bytes(bytes) => w.write(&bytes)?,
                Piece::End => return w.finish(),
            }
        }
        // The request ended early (the client went away): `w` is dropped, nothing kept.
        Err(fieldsync_blobs::Error::Io {
            path: "upload".into(),
            source: std::io::Error::other("the upload ended before its body did"),
        })
    });
    let mut stream = body.into_data_stream();
    let mut broken = None;
    while let Some(frame) = stream.next().await {
        match frame {
            // A send fails only when the writer stopped (over a limit): its error answers.
            Ok(bytes) => {
                if tx.send(Piece::Bytes(bytes)).await.is_err() {
                    let mut drained = 0u64;
                    while drained < DRAIN_BYTES {
                        match stream.next().await {
                            Some(Ok(b)) => drained += b.len() as u64,
                            _ => break,
                        }
                    }
                    break;
                }
            }
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        }
    }
    if broken.is_none() {
        let _ = tx.send(Piece::End).await;
    }
    drop(tx);
    let stored = writer
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(why) = broken {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the upload was cut short ({why}); nothing was stored"),
        ));
    }
    let stored = stored.map_err(|e| {
        s.metrics
            .http_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ApiError::from(fieldsync::Error::from(e))
    })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "hash": stored.hash.to_string(), "size": stored.size, "mime": mime, "name": name })),
    )
        .into_response())
}

/// `GET /v1/blobs/{hash}`: see the module docs.
pub(crate) async fn download(
    State(s): State<AppState>,
    Path(hash): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hash: Hash = parse("blob hash", &hash)?;
    let store = blocking(&s, |r| r.blobs()).await?;
    let mut file = match tokio::fs::File::open(store.path(&hash)).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Not here: ask the connected peers (the daemon's network), then serve it.
            let why = match &s.fetch_blob {
                // In process (the CLI with no daemon): no network here.
                None => "no daemon runs on this data directory to fetch it from other nodes: start `fieldsync run`".to_owned(),
                Some(fetch) => match tokio::time::timeout(FETCH_WAIT, fetch(hash)).await {
                    Ok(Ok(_)) => String::new(),
                    Ok(Err(why)) => why,
                    Err(_) => format!("fetching it took over {} s", FETCH_WAIT.as_secs()),
                },
            };
            match tokio::fs::File::open(store.path(&hash)).await {
                Ok(f) if why.is_empty() => f,
                _ => {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("blob {hash} is not in this node's blob store, and no connected peer sent it ({why})"),
                    ))
                }
            }
        }
        Err(e) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                e.to_string(),
            ))
        }
    };
    let size = file
        .metadata()
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .len();
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(v) => match one_range(v, size) {
            Some(r) => Some(r),
            None => {
                let mut res = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!(
                        "range {:?} is not one satisfiable byte range of this {size}-byte blob (bytes=START-END, bytes=START- or bytes=-SUFFIX)",
                        String::from_utf8_lossy(v.as_bytes())
                    ),
                )
                .into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    res.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Ok(res);
            }
        },
    };
    let (status, start, len) = match &range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, *a, b - a + 1),
        None => (StatusCode::OK, 0, size),
    };
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    // Streamed in pieces from the file: memory stays bounded whatever the blob's size.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(len),
        DOWNLOAD_CHUNK,
    ));
    let mut res = (status, body).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{hash}\"")) {
        h.insert(header::ETAG, etag);
    }
    if let Some((a, b)) = range {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(res)
}

/// The one byte range `value` asks of a `size`-byte blob (inclusive), or `None` when it is
/// malformed, unsatisfiable or several ranges.
fn one_range(value: &HeaderValue, size: u64) -> Option<(u64, u64)> {
    let text = value.to_str().ok()?;
    let ranges = http_range_header::parse_range_header(text)
        .ok()?
        .validate(size)
        .ok()?;
    match ranges.as_slice() {
        [r] if size > 0 && r.start() <= r.end() && *r.start() < size => {
            Some((*r.start(), *r.end()))
        }
        _ => None,
    }
}

/// `POST /v1/collections/{collection}/{id}/attachments/{field}`: adds the reference in
/// the body to the field; answers the checked reference.
pub(crate) async fn attach(
    State(s): State<AppState>,
    Path((collection, id, field)): Path<(String, String, String)>,
    body: String,
) -> Result<Json<Value>, ApiError> {
    let id: fieldsync::EntityId = parse("entity id", &id)?;
    let reference: Value = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("expected a reference {{\"hash\", \"size\", \"mime\", \"name\"}}: {e}"),
        )
    })?;
    let attached = blocking(&s, move |r| r.attach(&collection, id, &field, &reference)).await?;
    (s.on_change)();
    Ok(Json(attached.to_json()))
}
