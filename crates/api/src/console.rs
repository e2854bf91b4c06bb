//! `/console`: the office console, a single-page app whose built files (`console/dist/`)
//! are embedded in the binary (see `build.rs`), so it works offline on the office LAN.
//!
//! The files hold no data and are the same for everyone, so they need no token; the page
//! asks for the token and sends it with every API call. Hashed files under `assets/` are
//! cached for good; `index.html` is revalidated, so a new binary's console shows at once.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

include!(concat!(env!("OUT_DIR"), "/console_assets.rs"));

/// What the console's pages may load: only this origin (no CDN, no inline script).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "webmanifest" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn asset(path: &str) -> Option<&'static [u8]> {
    ASSETS
        .binary_search_by(|(p, _)| (*p).cmp(path))
        .ok()
        .map(|i| ASSETS[i].1)
}

fn serve(path: &str, bytes: &'static [u8]) -> Response {
    let mut res = (StatusCode::OK, bytes).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    let cache = if path.starts_with("assets/") {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

fn not_built() -> Response {
    let body = serde_json::json!({ "error": "this binary was built without the console (console/dist is empty: run `npm ci && npm run build` in console/)" });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

/// `/` and `/console`: to the console's page.
pub(crate) async fn redirect() -> Redirect {
    Redirect::to("/console/")
}

/// `/console/`: the page.
pub(crate) async fn index() -> Response {
    asset("index.html").map_or_else(not_built, |b| serve("index.html", b))
}

/// `/console/{*path}`: a file, or the page for any path without an extension (the app's
/// own routes); 404 JSON for a missing file.
pub(crate) async fn file(Path(path): Path<String>) -> Response {
    if let Some(bytes) = asset(&path) {
        return serve(&path, bytes);
    }
    let last = path.rsplit('/').next().unwrap_or("");
    if !last.contains('.') {
        return index().await;
    }
    let body = serde_json::json!({ "error": format!("no console file {path}") });
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

/// How many files the console has (0: built without it).
pub fn files() -> usize {
    ASSETS.len()
}
