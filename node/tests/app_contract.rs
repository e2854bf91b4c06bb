//! The app contract with running daemons on 127.0.0.1, driven through `fieldsync` and the
//! HTTP API: a refused or revoked device says why (an event, `status`, a warning on every
//! write), conflicts are events, and the rough edges a new user hits are smooth — a port in
//! use fails clearly, `--where` values may hold commas, large patches come from a file or
//! stdin, logs carry no colour codes off a terminal, bundles work while a daemon runs, and
//! `members` shows names, last seen and pending invites, which can be cancelled.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{bin, eventually, LOCAL, SCHEMA, WAIT};

/// A daemon (stderr in `stderr.log` of its data dir), once its API serves.
fn daemon(dir: &Path, args: &[&str]) -> support::Daemon {
    support::Daemon::start_logged(dir, args, "warn")
}

fn run(dir: &Path, args: &[&str]) -> Output {
    bin()
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .expect("run fieldsync")
}

/// A command that must succeed: its stdout as JSON Lines.
fn lines(dir: &Path, args: &[&str]) -> Vec<Value> {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// A command that must succeed and print one JSON value.
fn cli(dir: &Path, args: &[&str]) -> Value {
    let mut all = lines(dir, args);
    assert_eq!(all.len(), 1, "{args:?} printed {all:?}");
    all.remove(0)
}

/// A command that must fail with `code`, saying `needle` on stderr.
fn fails(dir: &Path, args: &[&str], code: i32, needle: &str) {
    let out = run(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?} in {stderr:?}"
    );
}

fn get_json(url: &str) -> Value {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_json()
        .expect("JSON")
}

/// A workspace whose authority is `hq`; `join` adds devices.
struct Site {
    tmp: tempfile::TempDir,
    hq: PathBuf,
}

impl Site {
    fn new() -> Site {
        let tmp = tempfile::tempdir().unwrap();
        let schema = tmp.path().join("schema.toml");
        std::fs::write(&schema, SCHEMA).unwrap();
        let hq = tmp.path().join("hq");
        cli(
            &hq,
            &["init", "--schema", schema.to_str().unwrap(), "--name", "hq"],
        );
        Site { tmp, hq }
    }

    /// An invite file from the authority (through its daemon if one runs).
    fn invite(&self, file: &str, args: &[&str]) -> PathBuf {
        let out = run(&self.hq, &[&["invite"], args].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = self.tmp.path().join(file);
        std::fs::write(&path, out.stdout).unwrap();
        path
    }

    fn join(&self, name: &str, invite: &Path) -> PathBuf {
        let dir = self.tmp.path().join(name);
        cli(
            &dir,
            &["init", "--join", invite.to_str().unwrap(), "--name", name],
        );
        dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// Follows `/v1/events`; each SSE data line as JSON.
fn subscribe(api: &str) -> mpsc::Receiver<Value> {
    let (tx, rx) = mpsc::channel();
    let url = format!("{api}/v1/events");
    std::thread::spawn(move || {
        let Ok(mut resp) = ureq::get(&url).call() else {
            return;
        };
        for line in BufReader::new(resp.body_mut().as_reader())
            .lines()
            .map_while(Result::ok)
        {
            if let Some(v) = line
                .strip_prefix("data:")
                .and_then(|d| serde_json::from_str::<Value>(d.trim()).ok())
            {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    // Give the subscription a moment to be in place before anything happens.
    std::thread::sleep(Duration::from_millis(500));
    rx
}

fn next_event(
    rx: &mpsc::Receiver<Value>,
    seen: &mut Vec<Value>,
    matches: impl Fn(&Value) -> bool,
) -> Value {
    if let Some(v) = seen.iter().find(|v| matches(v)) {
        return v.clone();
    }
    let deadline = Instant::now() + WAIT;
    while let Ok(v) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push(v.clone());
        if matches(&v) {
            return v;
        }
    }
    panic!("no matching SSE event within {WAIT:?}; saw {seen:?}");
}

#[test]
fn a_device_presenting_an_invite_another_device_used_is_refused_and_says_why() {
    let site = Site::new();
    let mut hq = daemon(&site.hq, &[&["relay"], LOCAL].concat());
    let raddr = hq.addr();
    let invite = site.invite("ana.json", &["--user", "ana"]);
    let ana = site.join("ana", &invite);
    let mut a = daemon(&ana, &[&["run", "--relay", &raddr], LOCAL].concat());
    a.wait_for("sync_completed");
    assert_eq!(
        cli(&ana, &["status"])["membership"],
        json!({ "state": "active", "reason": null })
    );

    cli(&site.hq, &["put", "tasks", r#"{"title":"office only"}"#]);

    // Another device (another key) joins with the same invite file: the authority refuses it.
    let copy = site.join("copy", &invite);
    let mut c = daemon(&copy, &[&["run", "--relay", &raddr], LOCAL].concat());
    let refused = c.wait_for("refused");
    assert_eq!(refused["state"], "refused", "{refused}");
    assert!(
        refused["reason"].as_str().unwrap().contains("already used"),
        "{refused}"
    );
    let hq_peer = cli(&site.hq, &["status"])["peer_id"].clone();
    assert_eq!(refused["peer"], hq_peer);
    assert!(hq.wait_for("peer_refused")["reason"]
        .as_str()
        .unwrap()
        .contains("already used"));
    let members = lines(&site.hq, &["members"]);
    assert_eq!(
        members.iter().filter(|m| m["kind"] == "member").count(),
        1,
        "the copy became a member: {members:?}"
    );
    assert!(
        lines(&copy, &["list", "tasks"]).is_empty(),
        "data reached the refused device"
    );
    // Nor does a bundle from it get in (through the authority's running daemon).
    let from_copy = site.path("copy.fsb");
    cli(&copy, &["bundle", "export", from_copy.to_str().unwrap()]);
    fails(
        &site.hq,
        &["bundle", "import", from_copy.to_str().unwrap()],
        2,
        "already used",
    );
    assert_eq!(
        lines(&site.hq, &["members"])
            .iter()
            .filter(|m| m["kind"] == "member")
            .count(),
        1
    );

    // status, through the CLI and HTTP, says why.
    let status = cli(&copy, &["status"]);
    assert_eq!(status["membership"]["state"], "refused", "{status}");
    assert!(
        status["membership"]["reason"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{status}"
    );
    let api = c.api();
    assert_eq!(
        get_json(&format!("{api}/v1/status"))["membership"],
        status["membership"]
    );

    // A write still lands locally, with a warning that it will not sync.
    let out = run(&copy, &["put", "tasks", r#"{"title":"offline anyway"}"#]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning:")
            && stderr.contains("will not sync")
            && stderr.contains("refused"),
        "{stderr}"
    );
    let written: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        written.get("warning").is_none(),
        "the warning belongs on stderr: {written}"
    );
    let id = written["id"].as_str().unwrap().to_owned();
    assert_eq!(
        cli(&copy, &["get", "tasks", &id])["title"],
        "offline anyway"
    );
    let mut res = ureq::post(format!("{api}/v1/collections/tasks"))
        .header("content-type", "application/json")
        .header("authorization", support::bearer(&copy))
        .send(r#"{"title":"via http"}"#)
        .unwrap();
    let body: Value = res.body_mut().read_json().unwrap();
    assert!(
        body["warning"].as_str().unwrap().contains("will not sync"),
        "{body}"
    );
    // An admitted device's writes carry no warning.
    let out = run(&ana, &["put", "tasks", r#"{"title":"fine"}"#]);
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("warning"));

    // Without the daemon, status still says why.
    c.stop();
    assert_eq!(cli(&copy, &["status"])["membership"]["state"], "refused");
    drop(a);
}

#[test]
fn a_revoked_device_says_so_and_warns_on_writes() {
    let site = Site::new();
    let mut hq = daemon(&site.hq, &[&["relay"], LOCAL].concat());
    let raddr = hq.addr();
    let ana = site.join("ana", &site.invite("ana.json", &["--user", "ana"]));
    let mut a = daemon(&ana, &[&["run", "--relay", &raddr], LOCAL].concat());
    a.wait_for("sync_completed");
    let peer = cli(&ana, &["status"])["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(cli(&site.hq, &["revoke", &peer])["revoked"], true);
    let refused = a.wait_for("refused");
    assert_eq!(refused["state"], "revoked", "{refused}");
    assert!(
        refused["reason"].as_str().unwrap().contains("revoked"),
        "{refused}"
    );
    let status = cli(&ana, &["status"]);
    assert_eq!(status["membership"]["state"], "revoked", "{status}");
    let out = run(&ana, &["put", "tasks", r#"{"title":"after revocation"}"#]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revoked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = hq.api();
}

#[test]
fn conflicts_that_open_and_that_a_rule_settles_are_events_and_bundles_work_through_a_daemon() {
    let site = Site::new();
    let ana = site.join("ana", &site.invite("ana.json", &[]));
    let b = site.path("b.fsb");
    let b = b.to_str().unwrap();
    // Offline, by bundle: both hold a task and a shift, then edit them apart.
    cli(&ana, &["bundle", "export", b]);
    cli(&site.hq, &["bundle", "import", b]);
    let task = cli(
        &site.hq,
        &["put", "tasks", r#"{"title":"Fit boiler","status":"open"}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shift = cli(&site.hq, &["put", "shifts", r#"{"start":"08:00"}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ana_peer = cli(&ana, &["status"])["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    cli(&site.hq, &["bundle", "export", b, "--since", &ana_peer]);
    cli(&ana, &["bundle", "import", b]);
    cli(&ana, &["put", "tasks", &task, r#"{"status":"completed"}"#]);
    cli(&ana, &["put", "shifts", &shift, r#"{"start":"09:00"}"#]);
    cli(
        &site.hq,
        &["put", "tasks", &task, r#"{"status":"in_progress"}"#],
    );
    cli(&site.hq, &["put", "shifts", &shift, r#"{"start":"10:00"}"#]);

    // Ana's daemon runs; the office's bundle is imported through it while subscribers watch.
    let mut a = daemon(&ana, &[&["run"], LOCAL].concat());
    let api = a.api();
    let events = subscribe(&api);
    let export = cli(&site.hq, &["bundle", "export", b, "--since", &ana_peer]);
    let summary = cli(&ana, &["bundle", "import", b]);
    assert_eq!(summary["entities"], export["entities"], "{summary}");
    let mut seen = vec![];
    let opened = next_event(&events, &mut seen, |e| e["event"] == "conflict_opened");
    assert_eq!(
        (
            opened["entity"].as_str(),
            opened["field"].as_str(),
            opened["rule"].as_str()
        ),
        (Some(shift.as_str()), Some("start"), Some("manual")),
        "{opened}"
    );
    let mut values: Vec<&str> = opened["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    values.sort();
    assert_eq!(values, ["09:00", "10:00"]);
    let settled = next_event(&events, &mut seen, |e| e["event"] == "conflict_settled");
    assert_eq!(
        (
            settled["entity"].as_str(),
            settled["field"].as_str(),
            settled["rule"].as_str()
        ),
        (Some(task.as_str()), Some("status"), Some("rank")),
        "{settled}"
    );
    assert_eq!(settled["value"], "completed");

    // Resolving the manual conflict is an event too; the settled one is not announced again.
    let conflict = opened["id"].as_str().unwrap().to_owned();
    cli(&ana, &["resolve", &conflict, "\"09:30\""]);
    let resolved = next_event(&events, &mut seen, |e| e["event"] == "conflict_resolved");
    assert_eq!(resolved["id"], conflict.as_str());
    let before = seen
        .iter()
        .filter(|e| e["event"] == "entity_changed")
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0);
    cli(
        &ana,
        &[
            "put",
            "tasks",
            &task,
            r#"{"title":"Fit boiler, 2nd floor"}"#,
        ],
    );
    next_event(&events, &mut seen, |e| {
        e["event"] == "entity_changed"
            && e["id"] == task.as_str()
            && e["seq"].as_u64() > Some(before)
    });
    assert_eq!(
        seen.iter()
            .filter(|e| e["event"] == "conflict_settled")
            .count(),
        1,
        "{seen:?}"
    );

    // Export through the daemon too: the office takes ana's resolution from it.
    let hq_peer = cli(&site.hq, &["status"])["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let export = cli(&ana, &["bundle", "export", b, "--since", &hq_peer]);
    assert!(export["entities"].as_u64().unwrap() >= 2, "{export}");
    assert!(!site.path("b.partial").exists());
    cli(&site.hq, &["bundle", "import", b]);
    assert_eq!(cli(&site.hq, &["get", "shifts", &shift])["start"], "09:30");
    assert_eq!(
        cli(&site.hq, &["get", "tasks", &task])["title"],
        "Fit boiler, 2nd floor"
    );

    // A bad bundle through the daemon is refused whole, with the CLI's exit code.
    std::fs::write(site.path("junk.fsb"), "hello").unwrap();
    fails(
        &ana,
        &["bundle", "import", site.path("junk.fsb").to_str().unwrap()],
        2,
        "not a fieldsync bundle",
    );
    drop(a);
}

/// A free port on 127.0.0.1 (the OS picks; the probe lets go at once).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a daemon that must exit by itself within `WAIT`: its exit code and stderr.
fn must_exit(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let mut child = bin()
        .arg("--data")
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status.code(), stderr);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?} kept running on a port in use");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_second_node_on_a_port_in_use_fails_with_address_in_use_and_logs_have_no_colours() {
    let site = Site::new();
    let other = Site::new();
    let (p2p, api) = (free_port(), free_port());
    let listen = format!("/ip4/127.0.0.1/tcp/{p2p}");
    let api_addr = format!("127.0.0.1:{api}");
    // RUST_LOG=info so the first daemon logs; its stderr is a file, not a terminal.
    let mut first = support::Daemon::start_logged(
        &site.hq,
        &["relay", "--listen", &listen, "--api", &api_addr],
        "info",
    );
    first.addr();

    let (code, stderr) = must_exit(
        &other.hq,
        &["relay", "--listen", &listen, "--api", "127.0.0.1:0"],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("address in use") && stderr.contains(&listen),
        "{stderr}"
    );
    let (code, stderr) = must_exit(
        &other.hq,
        &[
            "relay",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            &api_addr,
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("address in use") && stderr.contains(&api_addr),
        "{stderr}"
    );
    // The first one still serves.
    assert_eq!(
        get_json(&format!("http://{api_addr}/v1/status"))["authority"],
        true
    );

    first.stop();
    let log = std::fs::read_to_string(site.hq.join("stderr.log")).unwrap();
    assert!(
        log.contains("INFO"),
        "the daemon logged nothing at info: {log:?}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log file: {log:?}"
    );
}

#[test]
fn where_values_with_commas_and_large_patches_from_a_file_or_stdin_work_with_and_without_a_daemon()
{
    let site = Site::new();
    let big_title = "x".repeat(3 << 20); // over axum's 2 MiB default body limit
    let patch_file = site.path("patch.json");
    std::fs::write(
        &patch_file,
        json!({ "title": big_title, "status": "open" }).to_string(),
    )
    .unwrap();
    let put_stdin = |dir: &Path, args: &[&str], input: &str| -> Value {
        let mut child = bin()
            .arg("--data")
            .arg(dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let check = |dir: &Path, tag: &str| {
        // Values with commas, alone and with another filter.
        cli(
            dir,
            &[
                "put",
                "tasks",
                &json!({ "title": format!("{tag}: Fit boiler, 2nd floor"), "status": "open" })
                    .to_string(),
            ],
        );
        cli(
            dir,
            &[
                "put",
                "tasks",
                &json!({ "title": format!("{tag}: Fit boiler"), "status": "open" }).to_string(),
            ],
        );
        let title = format!("title={tag}: Fit boiler, 2nd floor");
        assert_eq!(
            lines(dir, &["list", "tasks", "--where", &title]).len(),
            1,
            "{tag}"
        );
        assert_eq!(
            lines(
                dir,
                &["list", "tasks", "--where", &title, "--where", "status=open"]
            )
            .len(),
            1,
            "{tag}"
        );
        assert_eq!(
            lines(dir, &["list", "tasks", "--where", &format!("{title}\\x")]).len(),
            0,
            "{tag}"
        );

        // A 3 MiB patch from a file, and from stdin (`-` and `--file -`), new and updating.
        let id = cli(
            dir,
            &["put", "tasks", "--file", patch_file.to_str().unwrap()],
        )["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            cli(dir, &["get", "tasks", &id])["title"]
                .as_str()
                .map(str::len),
            Some(3 << 20),
            "{tag}"
        );
        let from_stdin = put_stdin(
            dir,
            &["put", "tasks", "-"],
            &json!({ "title": format!("{tag}: piped") }).to_string(),
        );
        let piped = from_stdin["id"].as_str().unwrap().to_owned();
        assert_eq!(
            cli(dir, &["get", "tasks", &piped])["title"],
            format!("{tag}: piped")
        );
        put_stdin(
            dir,
            &["put", "tasks", &piped, "--file", "-"],
            r#"{"status":"completed"}"#,
        );
        put_stdin(dir, &["put", "tasks", &id, "-"], r#"{"progress":40}"#);
        assert_eq!(cli(dir, &["get", "tasks", &piped])["status"], "completed");
        assert_eq!(cli(dir, &["get", "tasks", &id])["progress"], 40);
        fails(
            dir,
            &["put", "tasks", "{}", "--file", patch_file.to_str().unwrap()],
            2,
            "not both",
        );
        fails(
            dir,
            &["put", "tasks", "--file", "/nonexistent/patch.json"],
            2,
            "cannot read",
        );
        fails(dir, &["put", "tasks"], 2, "needs a patch");
    };
    check(&site.hq, "offline");
    let d = daemon(&site.hq, &[&["run"], LOCAL].concat());
    check(&site.hq, "daemon");
    // A patch over the limit is refused before it is sent.
    std::fs::write(
        &patch_file,
        json!({ "title": "y".repeat(9 << 20) }).to_string(),
    )
    .unwrap();
    fails(
        &site.hq,
        &["put", "tasks", "--file", patch_file.to_str().unwrap()],
        2,
        "8 MiB limit",
    );
    drop(d);
}

#[test]
fn members_show_names_last_seen_and_pending_invites_which_can_be_cancelled() {
    let site = Site::new();
    let mut hq = daemon(&site.hq, &[&["relay"], LOCAL].concat());
    let raddr = hq.addr();
    let api = hq.api();
    let ana = site.join("ana", &site.invite("ana.json", &["--user", "ana"]));
    let spare = site.invite("spare.json", &["--user", "bo", "--valid-hours", "2"]);
    let spare_id = serde_json::from_slice::<Value>(&std::fs::read(&spare).unwrap()).unwrap()
        ["token"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut a = daemon(&ana, &[&["run", "--relay", &raddr], LOCAL].concat());
    a.wait_for("sync_completed");

    let ana_peer = cli(&ana, &["status"])["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut members = vec![];
    eventually("ana is a member with her name", || {
        members = lines(&site.hq, &["members"]);
        members
            .iter()
            .any(|m| m["kind"] == "member" && m["peer"] == ana_peer.as_str() && m["name"] == "ana")
    });
    let member = members.iter().find(|m| m["kind"] == "member").unwrap();
    assert_eq!(
        (member["user"].as_str(), member["revoked"].as_bool()),
        (Some("ana"), Some(false)),
        "{member}"
    );
    assert!(
        member["last_seen_ms"].as_i64().unwrap() > 1_700_000_000_000,
        "{member}"
    );
    let invites: Vec<&Value> = members.iter().filter(|m| m["kind"] == "invite").collect();
    assert_eq!(
        invites.len(),
        1,
        "only the unused invite is pending: {members:?}"
    );
    assert_eq!(
        (invites[0]["id"].as_str(), invites[0]["user"].as_str()),
        (Some(spare_id.as_str()), Some("bo"))
    );
    assert!(invites[0]["expires_ms"].as_i64() > invites[0]["issued_ms"].as_i64());
    // The HTTP API lists the same.
    let http_members = get_json(&format!("{api}/v1/members"));
    assert_eq!(http_members[0]["name"], "ana");
    assert_eq!(
        get_json(&format!("{api}/v1/invites"))[0]["id"],
        spare_id.as_str()
    );

    // Cancelling: a used invite cannot be; the unused one is, and then admits nobody.
    let used = serde_json::from_slice::<Value>(&std::fs::read(site.path("ana.json")).unwrap())
        .unwrap()["token"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    fails(&site.hq, &["invite", "cancel", &used], 2, "already used");
    fails(&site.hq, &["invite", "cancel", "not-an-id"], 2, "invite id");
    fails(
        &site.hq,
        &["invite", "cancel", "01234567-89ab-7def-8123-456789abcdef"],
        3,
        "invite",
    );
    fails(&ana, &["invite", "cancel", &spare_id], 2, "authority");
    assert_eq!(
        cli(&site.hq, &["invite", "cancel", &spare_id]),
        json!({ "invite": spare_id, "cancelled": true })
    );
    assert!(lines(&site.hq, &["members"])
        .iter()
        .all(|m| m["kind"] != "invite"));
    assert_eq!(get_json(&format!("{api}/v1/invites")), json!([]));
    let bo = site.join("bo", &spare);
    let mut b = daemon(&bo, &[&["run", "--relay", &raddr], LOCAL].concat());
    let refused = b.wait_for("refused");
    assert!(
        refused["reason"].as_str().unwrap().contains("cancelled"),
        "{refused}"
    );
    assert_eq!(cli(&bo, &["status"])["membership"]["state"], "refused");

    // Without a daemon too.
    hq.stop();
    let offline = lines(&site.hq, &["members"]);
    assert_eq!(offline.iter().filter(|m| m["kind"] == "member").count(), 1);
    assert_eq!(offline[0]["name"], "ana");
    drop(a);
}
