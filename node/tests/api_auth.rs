//! Who may use a daemon's HTTP API, at the HTTP level against a real relay on 127.0.0.1:
//! every write route answers 401 JSON without the token or with a wrong one (and writes
//! nothing); with `[api] require_token = true` every route does (as it is on a non-loopback
//! listener: that rule is unit-tested in fieldsync-api, since tests bind 127.0.0.1 only);
//! a wrong token gets nothing, even a read; CORS preflights are honoured only for the
//! allowed origins; `fieldsync api-token` keeps the token private and rotates it under a
//! running daemon; the console's embedded files are served without a token.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{cli, site, token, Daemon, LOCAL};

const ENTITY: &str = "01234567-89ab-7def-8123-456789abcdef";

/// One answer: status, headers (lower-case names), body text.
struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request; `read_body: false` for streams that do not end (`/v1/events`).
fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    read_body: bool,
) -> Answer {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .allow_non_standard_methods(true)
        .build()
        .into();
    let mut request = ureq::http::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = match body {
        Some(b) => agent.run(
            request
                .header("content-type", "application/json")
                .body(b.to_owned())
                .expect("request"),
        ),
        None => agent.run(request.body(()).expect("request")),
    };
    let mut response = response.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = if read_body || status != 200 {
        response.body_mut().read_to_string().unwrap_or_default()
    } else {
        String::new()
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// Every route that may change data, with a body where it takes one.
fn write_routes(peer: &str) -> Vec<(&'static str, String, Option<&'static str>)> {
    vec![
        (
            "POST",
            "/v1/collections/tasks".into(),
            Some(r#"{"title":"sneaky"}"#),
        ),
        (
            "PATCH",
            format!("/v1/collections/tasks/{ENTITY}"),
            Some(r#"{"title":"sneaky"}"#),
        ),
        (
            "PUT",
            format!("/v1/collections/tasks/{ENTITY}"),
            Some(r#"{"title":"sneaky"}"#),
        ),
        ("DELETE", format!("/v1/collections/tasks/{ENTITY}"), None),
        (
            "POST",
            "/v1/conflicts/0123456789abcdef/resolve".into(),
            Some(r#""09:00""#),
        ),
        (
            "POST",
            "/v1/proposals/accept".into(),
            Some(r#"{"ids":["01234567-89ab-7def-8123-456789abcdef"]}"#),
        ),
        (
            "POST",
            "/v1/proposals/reject".into(),
            Some(r#"{"ids":["01234567-89ab-7def-8123-456789abcdef"]}"#),
        ),
        ("POST", format!("/v1/proposals/{ENTITY}/accept"), None),
        ("POST", format!("/v1/proposals/{ENTITY}/reject"), None),
        ("POST", "/v1/sync".into(), None),
        (
            "POST",
            "/v1/schema".into(),
            Some("[collections.x.fields]\n"),
        ),
        (
            "POST",
            "/v1/schema/diff".into(),
            Some("[collections.x.fields]\n"),
        ),
        ("POST", format!("/v1/members/{peer}/revoke"), None),
        ("POST", "/v1/invites".into(), Some(r#"{"user":"mallory"}"#)),
        ("POST", format!("/v1/invites/{ENTITY}/cancel"), None),
        ("POST", "/v1/bundle".into(), Some("not a bundle")),
        ("POST", "/v1/blobs?name=x.jpg".into(), Some("not a photo")),
        (
            "POST",
            format!("/v1/collections/tasks/{ENTITY}/attachments/photos"),
            Some(
                r#"{"hash":"0000000000000000000000000000000000000000000000000000000000000000","size":1,"mime":"image/jpeg","name":"x.jpg"}"#,
            ),
        ),
    ]
}

/// Every read route (with an id where it takes one).
fn read_routes(peer: &str, task: &str) -> Vec<String> {
    vec![
        "/v1/status".into(),
        "/v1/collections/tasks".into(),
        format!("/v1/collections/tasks/{task}"),
        format!("/v1/collections/tasks/{task}/history"),
        "/v1/conflicts".into(),
        "/v1/proposals".into(),
        "/v1/members".into(),
        format!("/v1/members/{peer}"),
        "/v1/devices".into(),
        "/v1/health".into(),
        "/v1/invites".into(),
        "/v1/schema".into(),
        "/v1/changes".into(),
        "/v1/bundle".into(),
        "/metrics".into(),
    ]
}

/// The peer id of the site's first device, made a member by importing its bundle.
fn member(s: &support::Site) -> String {
    let bundle = s.tmp.path().join("join.fsb");
    cli(
        &s.devices[0],
        &["bundle", "export", bundle.to_str().expect("path")],
    );
    cli(
        &s.relay,
        &["bundle", "import", bundle.to_str().expect("path")],
    );
    cli(&s.devices[0], &["status"])["peer_id"]
        .as_str()
        .expect("peer")
        .to_owned()
}

fn assert_401(a: &Answer, what: &str) {
    assert_eq!(a.status, 401, "{what}: {}", a.body);
    assert!(
        a.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("token") || e.contains("Bearer")),
        "{what}: {}",
        a.body
    );
    assert_eq!(
        a.header("www-authenticate"),
        Some("Bearer realm=\"fieldsync\""),
        "{what}"
    );
    assert!(
        a.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}"
    );
}

fn relay_with_config(dir: &Path, config: &str) -> (Daemon, String, Value) {
    let file = dir.parent().expect("parent").join("config.toml");
    std::fs::write(&file, config).expect("config");
    let mut relay = Daemon::start(
        dir,
        &[&["relay", "--config", file.to_str().expect("path")], LOCAL].concat(),
    );
    let event = relay.wait_for("api");
    (
        relay,
        format!("http://{}", event["addr"].as_str().expect("addr")),
        event,
    )
}

#[test]
fn every_write_route_needs_the_token_and_a_wrong_token_gets_nothing() {
    let s = site(1);
    let peer = member(&s);
    let (_relay, api, event) = relay_with_config(&s.relay, "");
    assert_eq!(event["token_required"], "writes", "{event}");
    assert_eq!(event["console"], format!("{api}/console/"));
    let token = token(&s.relay);
    let bearer = format!("Bearer {token}");
    let head = |api: &str| {
        send("GET", &format!("{api}/v1/status"), &[], None, true).json()["feed_seq"]
            .as_u64()
            .expect("feed_seq")
    };
    let before = head(&api);

    for (method, path, body) in write_routes(&peer) {
        let url = format!("{api}{path}");
        assert_401(
            &send(method, &url, &[], body, true),
            &format!("{method} {path} without a token"),
        );
        assert_401(
            &send(
                method,
                &url,
                &[("authorization", "Bearer nottheone")],
                body,
                true,
            ),
            &format!("{method} {path} with a wrong token"),
        );
        assert_401(
            &send(
                method,
                &url,
                &[("authorization", &format!("Basic {token}"))],
                body,
                true,
            ),
            &format!("{method} {path} with another scheme"),
        );
    }
    assert_eq!(head(&api), before, "a refused write changed something");
    assert_eq!(
        send("GET", &format!("{api}/v1/invites"), &[], None, true).json(),
        serde_json::json!([]),
        "a refused invite was issued"
    );

    // Reads on a loopback listener need no token; a wrong one gets nothing, even there.
    let task = {
        let a = send(
            "POST",
            &format!("{api}/v1/collections/tasks"),
            &[("authorization", &bearer)],
            Some(r#"{"title":"with the token"}"#),
            true,
        );
        assert_eq!(a.status, 201, "{}", a.body);
        a.json()["id"].as_str().expect("id").to_owned()
    };
    for path in read_routes(&peer, &task) {
        let url = format!("{api}{path}");
        assert_eq!(
            send("GET", &url, &[], None, true).status,
            200,
            "GET {path} without a token on loopback"
        );
        assert_eq!(
            send("GET", &url, &[("authorization", &bearer)], None, true).status,
            200,
            "GET {path} with the token"
        );
        assert_401(
            &send(
                "GET",
                &url,
                &[("authorization", "Bearer nottheone")],
                None,
                true,
            ),
            &format!("GET {path} with a wrong token"),
        );
    }
    // The CLI through the daemon sends the token by itself.
    assert!(cli(&s.relay, &["put", "tasks", r#"{"title":"by the cli"}"#])["id"].is_string());
    let metrics = send("GET", &format!("{api}/metrics"), &[], None, true).body;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fieldsync_http_unauthorised_total "))
        .expect("counter")
        .parse()
        .expect("number");
    assert!(refused >= 3 * 16, "{refused}");
}

#[test]
fn with_require_token_every_route_needs_it_but_the_console_files_do_not() {
    let s = site(1);
    let peer = member(&s);
    let (_relay, api, event) = relay_with_config(&s.relay, "[api]\nrequire_token = true\n");
    assert_eq!(event["token_required"], "all", "{event}");
    let bearer = format!("Bearer {}", token(&s.relay));
    let task = cli(&s.relay, &["put", "tasks", r#"{"title":"a"}"#])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    for path in read_routes(&peer, &task)
        .into_iter()
        .chain(["/v1/events".to_owned()])
    {
        let url = format!("{api}{path}");
        let stream = path != "/v1/events";
        assert_401(
            &send("GET", &url, &[], None, stream),
            &format!("GET {path} without a token"),
        );
        let head = send("HEAD", &url, &[], None, false);
        assert_eq!(
            (head.status, head.header("www-authenticate")),
            (401, Some("Bearer realm=\"fieldsync\"")),
            "HEAD {path}"
        );
        assert_eq!(
            send("GET", &url, &[("authorization", &bearer)], None, stream).status,
            200,
            "GET {path} with the token"
        );
    }
    // Unknown routes too (nothing to learn about the API without the token).
    assert_401(
        &send("GET", &format!("{api}/v1/nope"), &[], None, true),
        "an unknown route",
    );
    // The CLI through the daemon still works: it reads the token from the data directory.
    assert_eq!(cli(&s.relay, &["get", "tasks", &task])["title"], "a");
    assert_eq!(cli(&s.relay, &["status"])["authority"], true);

    // The console's files are the same for everyone and hold no data.
    let page = send("GET", &format!("{api}/console/"), &[], None, true);
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'none'")));
    assert!(page.body.contains("<div id=\"app\">"), "{}", page.body);
    let script = page
        .body
        .split("src=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a script in the page")
        .to_owned();
    assert!(script.starts_with("/console/assets/"), "{script}");
    let js = send("GET", &format!("{api}{script}"), &[], None, true);
    assert_eq!(
        (js.status, js.header("content-type")),
        (200, Some("text/javascript; charset=utf-8"))
    );
    assert_eq!(
        js.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    for route in ["/console", "/", "/console/devices"] {
        let a = send("GET", &format!("{api}{route}"), &[], None, true);
        assert_eq!(a.status, 200, "{route}: {}", a.body);
        assert!(a.body.contains("<div id=\"app\">"), "{route}");
    }
    let missing = send(
        "GET",
        &format!("{api}/console/assets/nope.js"),
        &[],
        None,
        true,
    );
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"].is_string());
}

#[test]
fn cors_preflights_are_honoured_only_for_allowed_origins() {
    let s = site(0);
    let allowed = "http://office.example:8080";
    let (_relay, api, _) = relay_with_config(
        &s.relay,
        &format!("[api]\ncors_origins = [\"{allowed}\"]\n"),
    );
    let url = format!("{api}/v1/collections/tasks");
    let preflight = |origin: &str| {
        send(
            "OPTIONS",
            &url,
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type",
                ),
            ],
            None,
            true,
        )
    };

    let ok = preflight(allowed);
    assert_eq!(ok.status, 204, "{}", ok.body);
    assert_eq!(ok.header("access-control-allow-origin"), Some(allowed));
    assert!(ok
        .header("access-control-allow-headers")
        .is_some_and(|h| h.contains("authorization") && h.contains("content-type")));
    assert!(ok
        .header("access-control-allow-methods")
        .is_some_and(|h| h.contains("POST") && h.contains("DELETE")));
    assert!(ok
        .header("vary")
        .is_some_and(|v| v.to_lowercase().contains("origin")));
    for other in [
        "http://evil.example",
        "http://office.example:8081",
        "https://office.example:8080",
        "null",
    ] {
        let no = preflight(other);
        assert_eq!(no.status, 403, "{other}: {}", no.body);
        assert!(
            no.header("access-control-allow-origin").is_none(),
            "{other}"
        );
        assert!(
            no.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("cors_origins")),
            "{other}"
        );
    }
    // Answers to an allowed origin say so (also a 401, so its page can read the error)…
    let read = send("GET", &url, &[("origin", allowed)], None, true);
    assert_eq!(
        (read.status, read.header("access-control-allow-origin")),
        (200, Some(allowed))
    );
    let refused = send("POST", &url, &[("origin", allowed)], Some("{}"), true);
    assert_eq!(
        (
            refused.status,
            refused.header("access-control-allow-origin")
        ),
        (401, Some(allowed))
    );
    // …and to any other do not: its page cannot read them.
    let other = send(
        "GET",
        &url,
        &[("origin", "http://evil.example")],
        None,
        true,
    );
    assert_eq!(other.status, 200);
    assert!(other.header("access-control-allow-origin").is_none());

    // By default CORS is off: no origin's preflight passes.
    let s2 = site(0);
    let (_default, api2, _) = relay_with_config(&s2.relay, "");
    let a = send(
        "OPTIONS",
        &format!("{api2}/v1/status"),
        &[
            ("origin", allowed),
            ("access-control-request-method", "GET"),
        ],
        None,
        true,
    );
    assert_eq!(a.status, 403);
    assert!(a.header("access-control-allow-origin").is_none());
}

#[test]
fn api_token_is_private_and_rotates_under_a_running_daemon() {
    let s = site(0);
    let first = cli(&s.relay, &["api-token"]);
    assert_eq!(
        (first["created"].as_bool(), first["rotated"].as_bool()),
        (Some(true), Some(false)),
        "{first}"
    );
    let again = cli(&s.relay, &["api-token"]);
    assert_eq!(
        (again["token"].clone(), again["created"].as_bool()),
        (first["token"].clone(), Some(false))
    );
    let file = Path::new(first["file"].as_str().expect("file"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(file)
                .expect("token file")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    let (_relay, api, _) = relay_with_config(&s.relay, "");
    let write = |token: &str| {
        send(
            "POST",
            &format!("{api}/v1/collections/tasks"),
            &[("authorization", &format!("Bearer {token}"))],
            Some(r#"{"title":"t"}"#),
            true,
        )
        .status
    };
    let old = first["token"].as_str().expect("token").to_owned();
    assert_eq!(write(&old), 201);
    let rotated = cli(&s.relay, &["api-token", "--rotate"]);
    assert_eq!(rotated["rotated"], true);
    let new = rotated["token"].as_str().expect("token").to_owned();
    assert_ne!(new, old);
    assert_eq!(write(&old), 401, "the old token still works after --rotate");
    assert_eq!(write(&new), 201, "the new token does not work yet");
    assert_eq!(cli(&s.relay, &["api-token"])["token"], new.as_str());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(file)
                .expect("token file")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
    // No node, no token.
    let out = support::bin()
        .arg("--data")
        .arg(s.tmp.path().join("nowhere"))
        .arg("api-token")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.tmp.path().join("nowhere").exists());
}
