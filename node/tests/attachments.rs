//! An installer attaches photos to a job, with real `fieldsync` processes on 127.0.0.1: on
//! the data directory (no daemon), then through a running daemon (CLI and HTTP: streaming
//! upload with the size limit, download with `Range`, attach by reference), and the daemon
//! collects files that no live job references once the grace period is over.

mod support;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use fieldsync::blobs::Hash;
use serde_json::{json, Value};
use support::{bearer, bin, cli, Daemon, LOCAL};

const SCHEMA: &str = r#"
[collections.jobs.fields]
photos = { rule = "attachments" }
status = { rule = "rank", order = ["open", "done"] }
"#;

/// Bytes that differ at every position, so a wrong range shows.
fn photo_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

struct Node {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Node {
    fn new() -> Node {
        let tmp = tempfile::tempdir().expect("tmp");
        let schema = tmp.path().join("schema.toml");
        std::fs::write(&schema, SCHEMA).expect("schema");
        let dir = tmp.path().join("node");
        cli(
            &dir,
            &[
                "init",
                "--schema",
                schema.to_str().expect("path"),
                "--name",
                "hq",
            ],
        );
        Node { _tmp: tmp, dir }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.parent().expect("parent").join(name);
        std::fs::write(&path, bytes).expect("write file");
        path
    }

    fn job(&self) -> String {
        cli(&self.dir, &["put", "jobs", r#"{"status": "open"}"#])["id"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    fn run(&self, args: &[&str]) -> Output {
        bin()
            .arg("--data")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run fieldsync")
    }

    fn photos(&self, job: &str) -> Vec<Value> {
        cli(&self.dir, &["get", "jobs", job])["photos"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn blobs(&self) -> Value {
        cli(&self.dir, &["status"])["blobs"].clone()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn reference_of(o: &Output) -> Value {
    assert!(o.status.success(), "attach failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("the reference as JSON")
}

#[test]
fn attach_and_blob_get_on_the_data_directory() {
    let node = Node::new();
    let job = node.job();
    let bytes = photo_bytes(3 << 20, 1);
    let file = node.file("boiler.jpg", &bytes);
    let reference = reference_of(&node.run(&[
        "attach",
        "jobs",
        &job,
        "photos",
        file.to_str().expect("path"),
    ]));
    assert_eq!(
        reference,
        json!({ "hash": Hash::of(&bytes).to_string(), "size": 3 << 20, "mime": "image/jpeg", "name": "boiler.jpg" })
    );
    assert_eq!(node.photos(&job), vec![reference.clone()]);
    assert_eq!(node.blobs()["count"], 1);
    assert_eq!(node.blobs()["bytes"], 3 << 20);
    let hash = reference["hash"].as_str().expect("hash");

    // The file comes back whole, to a file or to standard output.
    let out = node.dir.parent().expect("parent").join("copy.jpg");
    let got = cli(
        &node.dir,
        &["blob", "get", hash, "--out", out.to_str().expect("path")],
    );
    assert_eq!(got["bytes"], 3 << 20);
    assert_eq!(std::fs::read(&out).expect("copy"), bytes);
    let piped = node.run(&["blob", "get", hash]);
    assert!(piped.status.success(), "{}", stderr(&piped));
    assert_eq!(piped.stdout, bytes);

    // A file that is not here exits 3, saying that fetching from peers is not built.
    let missing = Hash::of(b"taken on another device").to_string();
    let o = node.run(&["blob", "get", &missing]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not in this node's blob store"),
        "{}",
        stderr(&o)
    );

    // Refusals, each with its exit code, and nothing stored or written.
    let small = node.file("note.txt", b"a short note");
    let small = small.to_str().expect("path");
    for (args, code, needle) in [
        (
            vec!["attach", "jobs", &job, "status", small],
            2,
            "not attachments",
        ),
        (
            vec![
                "attach",
                "jobs",
                "01234567-89ab-7def-8123-456789abcdef",
                "photos",
                small,
            ],
            3,
            "no entity",
        ),
        (
            vec!["attach", "jobs", &job, "photos", small, "--mime", "text"],
            2,
            "media type",
        ),
        (
            vec!["attach", "jobs", &job, "photos", "/nonexistent/file.jpg"],
            2,
            "cannot read",
        ),
        (
            vec!["attach", "nope", &job, "photos", small],
            2,
            "unknown collection",
        ),
    ] {
        let o = node.run(&args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    // Over the size limit of the config file: refused, not kept.
    let config = node.file("small.toml", b"[blobs]\nmax_blob_bytes = 1000\n");
    let big = node.file("big.jpg", &photo_bytes(2000, 2));
    let o = node.run(&[
        "attach",
        "jobs",
        &job,
        "photos",
        big.to_str().expect("path"),
        "--config",
        config.to_str().expect("path"),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("max_blob_bytes"), "{}", stderr(&o));
    assert_eq!(node.blobs()["count"], 1);
    assert_eq!(node.photos(&job).len(), 1);

    // A plain put with a reference to a file not held here is refused too.
    let bad = json!({ "photos": { "$add": [{ "hash": missing, "size": 3, "mime": "image/png", "name": "x.png" }] } });
    let o = node.run(&["put", "jobs", &job, &bad.to_string()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not in this node's blob store"),
        "{}",
        stderr(&o)
    );
    // With --mime, and the same bytes under another name: stored once, two references.
    let again = node.file("same.bin", &bytes);
    let r2 = reference_of(&node.run(&[
        "attach",
        "jobs",
        &job,
        "photos",
        again.to_str().expect("path"),
        "--mime",
        "image/heic",
        "--name",
        "same photo",
    ]));
    assert_eq!(
        (r2["hash"].as_str(), r2["mime"].as_str()),
        (Some(hash), Some("image/heic"))
    );
    assert_eq!(node.photos(&job).len(), 2);
    assert_eq!(node.blobs()["count"], 1);
}

/// One HTTP answer.
struct Answer {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut response = response.expect("the API answers");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .expect("body"),
    }
}

fn get(url: &str, range: Option<&str>) -> Answer {
    let mut request = agent().get(url);
    if let Some(r) = range {
        request = request.header("range", r);
    }
    answer(request.call())
}

fn post(url: &str, token: Option<&str>, content_type: &str, body: &[u8]) -> Answer {
    let mut request = agent().post(url).header("content-type", content_type);
    if let Some(t) = token {
        request = request.header("authorization", t);
    }
    answer(request.send(body))
}

/// A body of unknown length (sent chunked): the size limit must hold without Content-Length.
fn post_chunked(url: &str, token: &str, body: Vec<u8>) -> Answer {
    let reader = std::io::Cursor::new(body);
    answer(
        agent()
            .post(url)
            .header("authorization", token)
            .header("content-type", "image/jpeg")
            .send(ureq::SendBody::from_owned_reader(reader)),
    )
}

fn start(node: &Node, config: &str) -> (Daemon, String) {
    let config = node.file("daemon.toml", config.as_bytes());
    let mut d = Daemon::start(
        &node.dir,
        &[&["run", "--config", config.to_str().expect("path")], LOCAL].concat(),
    );
    let api = d.api();
    (d, api)
}

#[test]
fn upload_download_with_ranges_and_attach_through_a_daemon() {
    let node = Node::new();
    let job = node.job();
    let (_daemon, api) = start(&node, "[blobs]\nmax_blob_bytes = 4194304\n");
    let token = bearer(&node.dir);

    // Uploading changes data: it needs the token.
    let bytes = photo_bytes(3 << 20, 3);
    // (A small body: it is refused before it is read, and a large unread body could
    // meet a reset connection before the client reads the answer.)
    let refused = post(
        &format!("{api}/v1/blobs?name=x.jpg"),
        None,
        "image/jpeg",
        &bytes[..1000],
    );
    assert_eq!(refused.status, 401);
    assert_eq!(node.blobs()["count"], 0);

    // Streamed in, answered with the reference.
    let up = post(
        &format!("{api}/v1/blobs?name=meter.jpg"),
        Some(&token),
        "image/jpeg",
        &bytes,
    );
    assert_eq!(up.status, 201, "{}", String::from_utf8_lossy(&up.body));
    let reference = up.json();
    let hash = Hash::of(&bytes).to_string();
    assert_eq!(
        reference,
        json!({ "hash": hash, "size": 3 << 20, "mime": "image/jpeg", "name": "meter.jpg" })
    );

    // Over the limit, with Content-Length and without it (chunked): 413, nothing kept.
    let big = photo_bytes(5 << 20, 4);
    let over = post(&format!("{api}/v1/blobs"), Some(&token), "image/jpeg", &big);
    assert_eq!(over.status, 413, "{}", String::from_utf8_lossy(&over.body));
    assert!(over.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("max_blob_bytes")));
    let over = post_chunked(&format!("{api}/v1/blobs"), &token, big);
    assert_eq!(over.status, 413, "{}", String::from_utf8_lossy(&over.body));
    // Bigger than the 8 MiB JSON limit is fine where the blob limit allows it: see the
    // size above (3 MiB passes, the JSON limit does not apply); a bad media type is 400.
    let bad_mime = post(&format!("{api}/v1/blobs"), Some(&token), "not a type", b"x");
    assert_eq!(bad_mime.status, 400);
    assert_eq!(node.blobs()["count"], 1);

    // Download: whole, one range, a suffix, an open end; bad ranges 416; unknown 404.
    let whole = get(&format!("{api}/v1/blobs/{hash}"), None);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, bytes);
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    let total = bytes.len();
    for (range, from, to) in [
        ("bytes=0-0", 0, 0),
        ("bytes=1000-1999", 1000, 1999),
        ("bytes=-10", total - 10, total - 1),
        (&format!("bytes={}-", total - 5)[..], total - 5, total - 1),
        ("bytes=3145000-99999999", 3_145_000, total - 1),
    ] {
        let part = get(&format!("{api}/v1/blobs/{hash}"), Some(range));
        assert_eq!(part.status, 206, "{range}");
        assert_eq!(part.body, bytes[from..=to], "{range}");
        assert_eq!(
            part.header("content-range"),
            Some(&format!("bytes {from}-{to}/{total}")[..]),
            "{range}"
        );
    }
    for range in [
        &format!("bytes={total}-")[..],
        "bytes=5-2",
        "lines=1-2",
        "bytes=0-1,5-9",
    ] {
        let bad = get(&format!("{api}/v1/blobs/{hash}"), Some(range));
        assert_eq!(
            bad.status,
            416,
            "{range}: {}",
            String::from_utf8_lossy(&bad.body)
        );
        assert_eq!(
            bad.header("content-range"),
            Some(&format!("bytes */{total}")[..])
        );
    }
    let unknown = get(&format!("{api}/v1/blobs/{}", Hash::of(b"elsewhere")), None);
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"]
        .as_str()
        .is_some_and(|e| e.contains("no connected peer")));
    assert_eq!(get(&format!("{api}/v1/blobs/not-a-hash"), None).status, 400);

    // Attach the uploaded file by its reference; the view lists it.
    let attach_url = format!("{api}/v1/collections/jobs/{job}/attachments/photos");
    let attached = post(
        &attach_url,
        Some(&token),
        "application/json",
        reference.to_string().as_bytes(),
    );
    assert_eq!(
        attached.status,
        200,
        "{}",
        String::from_utf8_lossy(&attached.body)
    );
    assert_eq!(attached.json(), reference);
    assert_eq!(node.photos(&job), vec![reference.clone()]);
    // A reference to a file not uploaded here, or with a wrong size, is refused.
    let mut wrong = reference.clone();
    wrong["size"] = json!(12);
    let refused = post(
        &attach_url,
        Some(&token),
        "application/json",
        wrong.to_string().as_bytes(),
    );
    assert_eq!(
        refused.status,
        400,
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    wrong["hash"] = json!(Hash::of(b"elsewhere").to_string());
    let refused = post(
        &attach_url,
        Some(&token),
        "application/json",
        wrong.to_string().as_bytes(),
    );
    assert_eq!(refused.status, 400);
    assert_eq!(node.photos(&job).len(), 1);

    // The CLI goes through the daemon the same way.
    let second = photo_bytes(200_000, 5);
    let file = node.file("receipt.pdf", &second);
    let r = reference_of(&node.run(&[
        "attach",
        "jobs",
        &job,
        "photos",
        file.to_str().expect("path"),
    ]));
    assert_eq!(r["hash"], Hash::of(&second).to_string());
    assert_eq!(r["mime"], "application/pdf");
    assert_eq!(node.photos(&job).len(), 2);
    let piped = node.run(&["blob", "get", r["hash"].as_str().expect("hash")]);
    assert!(piped.status.success(), "{}", stderr(&piped));
    assert_eq!(piped.stdout, second);
    let o = node.run(&["blob", "get", &Hash::of(b"elsewhere").to_string()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = node.run(&[
        "attach",
        "jobs",
        &job,
        "photos",
        big_file(&node).to_str().expect("path"),
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "over the daemon's limit: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("max_blob_bytes"), "{}", stderr(&o));

    // Status and metrics count the store.
    let blobs = node.blobs();
    assert_eq!(
        (blobs["count"].as_u64(), blobs["bytes"].as_u64()),
        (Some(2), Some((3 << 20) + 200_000))
    );
    let metrics = String::from_utf8(get(&format!("{api}/metrics"), None).body).expect("text");
    assert!(metrics.contains("\nfieldsync_blobs 2\n"), "{metrics}");
    assert!(metrics.contains(&format!("\nfieldsync_blob_bytes {}\n", (3 << 20) + 200_000)));
}

fn big_file(node: &Node) -> PathBuf {
    node.file("too-big.jpg", &photo_bytes(5 << 20, 6))
}

/// Waits for the daemon to report a collection that removed `hash`.
fn collected(daemon: &mut Daemon, hash: &str) {
    daemon.wait_until(&format!("blobs_collected with {hash}"), |v| {
        v["event"] == "blobs_collected"
            && v["hashes"]
                .as_array()
                .is_some_and(|h| h.iter().any(|x| x == hash))
    });
}

fn blob_present(api: &str, hash: &str) -> bool {
    get(&format!("{api}/v1/blobs/{hash}"), Some("bytes=0-0")).status == 206
}

#[test]
fn unreferenced_files_are_collected_after_the_grace_period_never_referenced_ones() {
    let node = Node::new();
    let (kept_job, gone_job) = (node.job(), node.job());
    let attach = |job: &str, name: &str, seed: u8| -> String {
        let file = node.file(name, &photo_bytes(50_000, seed));
        reference_of(&node.run(&[
            "attach",
            "jobs",
            job,
            "photos",
            file.to_str().expect("path"),
        ]))["hash"]
            .as_str()
            .expect("hash")
            .to_owned()
    };
    let kept = attach(&kept_job, "kept.jpg", 7);
    let gone = attach(&gone_job, "gone.jpg", 8);
    let (mut daemon, api) = start(&node, "[blobs]\ngc_grace_secs = 2\ngc_interval_secs = 1\n");
    let token = bearer(&node.dir);
    // Uploaded but never attached: kept for the grace period, then collected.
    let loose_bytes = photo_bytes(1000, 9);
    let loose = post(
        &format!("{api}/v1/blobs?name=loose.jpg"),
        Some(&token),
        "image/jpeg",
        &loose_bytes,
    )
    .json()["hash"]
        .as_str()
        .expect("hash")
        .to_owned();
    let uploaded = Instant::now();
    collected(&mut daemon, &loose);
    assert!(
        uploaded.elapsed() >= Duration::from_millis(1500),
        "collected within the grace period"
    );
    assert!(!blob_present(&api, &loose));
    // A deleted job's photo goes; the live job's stays, however old it is.
    cli(&node.dir, &["delete", "jobs", &gone_job]);
    collected(&mut daemon, &gone);
    assert!(!blob_present(&api, &gone));
    std::thread::sleep(Duration::from_secs(3));
    assert!(blob_present(&api, &kept));
    assert_eq!(node.blobs()["count"], 1);
    assert!(daemon
        .seen
        .iter()
        .filter(|v| v["event"] == "blobs_collected")
        .all(|v| !v["hashes"]
            .as_array()
            .expect("hashes")
            .iter()
            .any(|h| h == kept.as_str())));
}

/// Sends the head of an upload that promises `promised` bytes and only `sent` of them.
fn partial_upload(api: &str, token: &str, promised: usize, sent: usize) -> std::net::TcpStream {
    use std::io::Write as _;
    let addr = api.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the API");
    write!(
        s,
        "POST /v1/blobs?name=cut.jpg HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\nContent-Type: image/jpeg\r\nContent-Length: {promised}\r\n\r\n"
    )
    .expect("head");
    s.write_all(&photo_bytes(sent, 10))
        .expect("part of the body");
    s.flush().expect("flush");
    s
}

fn tmp_files(node: &Node) -> usize {
    std::fs::read_dir(node.dir.join("blobs").join("tmp"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn an_upload_cut_short_or_killed_midway_never_becomes_a_file() {
    let node = Node::new();
    let (mut daemon, api) = start(&node, "");
    let token = bearer(&node.dir);
    // The client goes away after 1 MB of a promised 4 MB: nothing is kept, not even the
    // temporary file.
    let cut = partial_upload(&api, &token, 4 << 20, 1 << 20);
    std::thread::sleep(Duration::from_millis(300));
    drop(cut);
    support::eventually("the cut upload's temporary file is removed", || {
        tmp_files(&node) == 0
    });
    assert_eq!(node.blobs()["count"], 0);
    // The daemon is killed (SIGKILL) while an upload is half in: after a restart there is
    // no blob, and the half-written temporary file is gone.
    let _half = partial_upload(&api, &token, 4 << 20, 2 << 20);
    support::eventually("the upload is being written", || tmp_files(&node) == 1);
    daemon.child.kill().expect("kill -9");
    let _ = daemon.child.wait();
    drop(daemon);
    let (_daemon, api) = start(&node, "");
    assert_eq!(node.blobs()["count"], 0);
    assert_eq!(
        tmp_files(&node),
        0,
        "leftovers are cleared when the store opens"
    );
    // And a whole upload after that works.
    let bytes = photo_bytes(10_000, 11);
    let up = post(
        &format!("{api}/v1/blobs?name=ok.jpg"),
        Some(&token),
        "image/jpeg",
        &bytes,
    );
    assert_eq!(up.status, 201);
    assert_eq!(node.blobs()["count"], 1);
}
