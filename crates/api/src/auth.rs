//! Who may use the API: the bearer token (`fieldsync api-token`) and the CORS allow-list.
//!
//! The rules, in the order they are applied to a request:
//! 1. A CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
//!    answered here: 204 with the CORS headers for an origin on the allow-list
//!    (`[api] cors_origins`), 403 for any other (the list is empty by default: CORS off).
//! 2. The console's own files (`/console/…`, and `/`, which sends there) need no token: they
//!    are the same for everyone and hold no data; the page asks for the token itself.
//! 3. Anything that may change data (every method but GET and HEAD) needs
//!    `Authorization: Bearer TOKEN`; so does every route when the API listens on a
//!    non-loopback address, or `[api] require_token = true`. Without it, or with another
//!    token: 401, `{"error": …}`, with `WWW-Authenticate: Bearer`. A request that carries an
//!    `Authorization` header is always checked: a wrong token gets nothing, even a read.
//! 4. Answers to a request from an allowed origin carry `Access-Control-Allow-Origin`.
//!
//! The token lives in the data directory (`api-token`, mode 0600). The daemon re-reads it
//! when the file changes, so `fieldsync api-token --rotate` takes effect at once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::AppState;

/// The token's file in the data directory.
pub const TOKEN_FILE: &str = "api-token";

/// Request headers a page from an allowed origin may send.
const CORS_ALLOW_HEADERS: &str =
    "authorization, content-type, idempotency-key, last-event-id, range";
/// Response headers such a page may read.
const CORS_EXPOSE_HEADERS: &str = "idempotent-replayed, fieldsync-entities, fieldsync-since, fieldsync-upto, content-range, accept-ranges, etag";
const CORS_ALLOW_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

/// Whether every route needs the token: when asked to, or when the API listens on an
/// address other machines can reach (anything but loopback).
pub fn token_required_everywhere(listen: &std::net::SocketAddr, require_token: bool) -> bool {
    require_token || !listen.ip().is_loopback()
}

/// The token stored in `dir`, if there is one.
pub fn read_token(dir: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(dir.join(TOKEN_FILE)) {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The token stored in `dir`, created first if there is none; `true` if it was created.
pub fn ensure_token(dir: &Path) -> std::io::Result<(String, bool)> {
    match read_token(dir)? {
        Some(token) => Ok((token, false)),
        None => Ok((write_new_token(dir)?, true)),
    }
}

/// Replaces the token in `dir` with a new one; the old one stops working at once.
pub fn rotate_token(dir: &Path) -> std::io::Result<String> {
    write_new_token(dir)
}

/// 32 random bytes from the OS-seeded CSPRNG, hex: 64 characters.
fn new_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Writes a new token beside the file (created 0600), then renames it over the file: a
/// reader never sees half a token, and the file never has wider permissions.
fn write_new_token(dir: &Path) -> std::io::Result<String> {
    let token = new_token();
    let tmp = dir.join(format!("{TOKEN_FILE}.new"));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(format!("{token}\n").as_bytes())?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(TOKEN_FILE))?;
    Ok(token)
}

/// The access rules of one API listener.
#[derive(Debug)]
pub struct Access {
    token_path: PathBuf,
    /// The token as last read, with the file's identity then (re-read when it changes).
    cached: Mutex<Option<(FileStamp, String)>>,
    /// Every route needs the token (not only writes).
    pub everywhere: bool,
    /// Origins (`scheme://host[:port]`) whose pages may call the API.
    pub cors_origins: Vec<String>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            #[cfg(unix)]
            inode: std::os::unix::fs::MetadataExt::ino(meta),
        }
    }
}

impl Access {
    /// Rules for a node whose data directory is `dir`.
    pub fn new(dir: &Path, everywhere: bool, cors_origins: Vec<String>) -> Self {
        Access {
            token_path: dir.join(TOKEN_FILE),
            cached: Mutex::new(None),
            everywhere,
            cors_origins,
        }
    }

    /// The token in force now (none if the file is gone: then nothing that needs one passes).
    fn token(&self) -> Option<String> {
        let meta = std::fs::metadata(&self.token_path).ok()?;
        let stamp = FileStamp::of(&meta);
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, token)) = cached.as_ref() {
            if *s == stamp {
                return Some(token.clone());
            }
        }
        let token = std::fs::read_to_string(&self.token_path)
            .ok()?
            .trim()
            .to_owned();
        if token.is_empty() {
            return None;
        }
        *cached = Some((stamp, token.clone()));
        Some(token)
    }

    /// Whether `headers` carry the token in force.
    fn authorised(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let Some(given) = headers.get(header::AUTHORIZATION) else {
            return Err("this request needs `Authorization: Bearer TOKEN` (`fieldsync api-token` on the node prints the token)");
        };
        let given = given.to_str().unwrap_or("");
        let Some((scheme, given)) = given.split_once(' ') else {
            return Err("the Authorization header must be `Bearer TOKEN`");
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err("the Authorization header must be `Bearer TOKEN`");
        }
        let Some(token) = self.token() else {
            return Err("this node has no API token yet: run `fieldsync api-token` on it");
        };
        if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err("wrong API token (`fieldsync api-token` on the node prints the one in force)")
        }
    }

    fn origin_allowed(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o == origin)
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an `[api] cors_origins` entry: `scheme://host[:port]`, nothing after.
pub fn check_origin(origin: &str) -> Result<(), String> {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', ' ', '*']) => Ok(()),
        _ => Err(format!("cors_origins: {origin:?} is not an origin such as \"https://office.example.com\" or \"http://localhost:5173\" (scheme, host and port only; no wildcard)")),
    }
}

/// Whether a path is one of the console's files (served to anyone).
fn is_console_path(path: &str) -> bool {
    path == "/" || path == "/console" || path.starts_with("/console/")
}

fn unauthorised(message: &str) -> Response {
    let mut res = (StatusCode::UNAUTHORIZED, Json(json!({ "error": message }))).into_response();
    res.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"fieldsync\""),
    );
    res
}

/// The token rule (2 and 3 above).
pub(crate) async fn require_token(
    State(s): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    // A token given is always checked: a wrong one gets nothing, not even what an open
    // read would show (so a page can tell a wrong token at once).
    let given = request.headers().contains_key(header::AUTHORIZATION);
    if is_console_path(request.uri().path()) || (safe && !s.access.everywhere && !given) {
        return next.run(request).await;
    }
    match s.access.authorised(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(message) => {
            s.metrics.http_unauthorised.fetch_add(1, Ordering::Relaxed);
            unauthorised(message)
        }
    }
}

/// The CORS rules (1 and 4 above).
pub(crate) async fn cors(State(s): State<AppState>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_owned);
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let allowed = s.access.origin_allowed(&origin);
    if preflight {
        if !allowed {
            let mut res = (StatusCode::FORBIDDEN, Json(json!({ "error": format!("origin {origin} is not allowed to call this API (add it to [api] cors_origins in the node's config)") }))).into_response();
            res.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("origin"));
            return res;
        }
        let mut res = StatusCode::NO_CONTENT.into_response();
        let h = res.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(CORS_ALLOW_METHODS),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(CORS_ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("origin"));
        return res;
    }
    let mut res = next.run(request).await;
    let h = res.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("origin"));
    if allowed {
        if let Ok(v) = HeaderValue::from_str(&origin) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        }
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSE_HEADERS),
        );
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_loopback_listener_needs_the_token_everywhere() {
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().expect("addr");
        for loopback in ["127.0.0.1:7070", "127.0.0.2:7070", "[::1]:7070"] {
            assert!(
                !token_required_everywhere(&addr(loopback), false),
                "{loopback}"
            );
            assert!(
                token_required_everywhere(&addr(loopback), true),
                "{loopback} with require_token"
            );
        }
        for open in [
            "0.0.0.0:7070",
            "192.168.1.20:7070",
            "10.0.0.1:80",
            "[::]:7070",
            "[fe80::1]:7070",
        ] {
            assert!(token_required_everywhere(&addr(open), false), "{open}");
        }
    }

    #[test]
    fn tokens_are_created_once_kept_private_and_rotated() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(read_token(dir.path()).expect("read"), None);
        let (token, created) = ensure_token(dir.path()).expect("create");
        assert!(created);
        assert_eq!(token.len(), 64);
        assert_eq!(
            ensure_token(dir.path()).expect("again"),
            (token.clone(), false)
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let access = Access::new(dir.path(), false, vec![]);
        let bearer = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
            );
            h
        };
        assert!(access.authorised(&bearer(&token)).is_ok());
        assert!(access.authorised(&HeaderMap::new()).is_err());
        let rotated = rotate_token(dir.path()).expect("rotate");
        assert_ne!(rotated, token);
        assert!(
            access.authorised(&bearer(&token)).is_err(),
            "the old token still works after rotation"
        );
        assert!(access.authorised(&bearer(&rotated)).is_ok());
        assert!(access.authorised(&bearer(&rotated[..63])).is_err());
    }

    #[test]
    fn origins_are_scheme_host_and_port() {
        assert!(check_origin("https://office.example.com").is_ok());
        assert!(check_origin("http://localhost:5173").is_ok());
        for bad in [
            "*",
            "office.example.com",
            "https://office.example.com/",
            "https://*.example.com",
            "ftp://x",
            "https://",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
    }
}
