//! Lists and feeds at any size, through a running node's HTTP API and the CLI: paged lists
//! with a cursor, the changes feed an app mirrors from, SSE that resumes with
//! `Last-Event-ID`, and query parameters that are checked rather than ignored.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Instant;

use serde_json::{json, Value};
use support::*;

/// GET `url`: (status, JSON body).
fn get(url: &str) -> (u16, Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent.get(url).call().expect("the API answers");
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_json()
        .expect("a JSON body");
    (status, body)
}

/// A relay (the authority) with `n` imported tasks, running; its API address.
fn node_with_tasks(n: usize) -> (Site, Daemon, String) {
    let s = site(0);
    let lines: String = (0..n)
        .map(|i| {
            format!(
                "{}\n",
                json!({ "title": format!("task {i:05}"), "status": "open" })
            )
        })
        .collect();
    let file = s.tmp.path().join("tasks.jsonl");
    std::fs::write(&file, lines).unwrap();
    let out = bin()
        .arg("--data")
        .arg(&s.relay)
        .args(["import", "tasks"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (mut relay, _) = start_relay(&s.relay);
    let api = relay.api();
    (s, relay, api)
}

#[test]
fn lists_page_with_a_cursor_and_the_cli_streams_every_page() {
    let (s, _relay, api) = node_with_tasks(2_345);

    // Pages of 1,000: every entity exactly once, in id order, and the last page says so.
    let (mut ids, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let url = match &cursor {
            Some(c) => format!("{api}/v1/collections/tasks?limit=1000&cursor={c}"),
            None => format!("{api}/v1/collections/tasks?limit=1000"),
        };
        let (status, page) = get(&url);
        assert_eq!(status, 200, "{page}");
        pages += 1;
        let items = page["items"].as_array().expect("items");
        ids.extend(items.iter().map(|v| v["_id"].as_str().unwrap().to_owned()));
        match page["next"].as_str() {
            Some(next) => {
                assert_eq!(items.len(), 1000, "only the last page is short");
                cursor = Some(next.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(ids.len(), 2_345);
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no entity on two pages");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "id order");

    // Without a limit, a page holds 100.
    let (_, first) = get(&format!("{api}/v1/collections/tasks"));
    assert_eq!(first["items"].as_array().unwrap().len(), 100);
    assert_eq!(first["next"].as_str(), Some(ids[99].as_str()));

    // The CLI goes through the daemon and prints every entity, whatever the page size.
    let listed = list(&s.relay, "tasks");
    assert_eq!(
        listed
            .iter()
            .map(|v| v["_id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>(),
        ids
    );
}

#[test]
fn filters_may_contain_commas_and_bad_parameters_are_named() {
    let (s, _relay, api) = node_with_tasks(3);
    cli(
        &s.relay,
        &[
            "put",
            "tasks",
            r#"{"title":"Fit boiler, 2nd floor","status":"open"}"#,
        ],
    );
    cli(
        &s.relay,
        &[
            "put",
            "tasks",
            r#"{"title":"Fit boiler","status":"completed"}"#,
        ],
    );

    // Through the daemon: one filter per --where, commas and all.
    let found = list_where(&s, &["--where", "title=Fit boiler, 2nd floor"]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["title"], "Fit boiler, 2nd floor");
    let both = list_where(
        &s,
        &["--where", "title=Fit boiler", "--where", "status=completed"],
    );
    assert_eq!(both.len(), 1, "{both:?}");
    let (_, page) = get(&format!(
        "{api}/v1/collections/tasks?where=title%3DFit%20boiler%2C%202nd%20floor"
    ));
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");

    for (query, names) in [
        ("/v1/collections/tasks?limt=10", "limt"),
        ("/v1/collections/tasks?limit=0", "limit"),
        ("/v1/collections/tasks?limit=1001", "limit"),
        ("/v1/collections/tasks?limit=ten", "limit"),
        ("/v1/collections/tasks?cursor=nope", "cursor"),
        (
            "/v1/collections/tasks?include_deleted=maybe",
            "include_deleted",
        ),
        ("/v1/changes?since=-1", "since"),
        ("/v1/changes?limit=5000", "limit"),
        ("/v1/changes?from=3", "from"),
        ("/v1/status?verbose=true", "verbose"),
        ("/v1/conflicts?al=true", "al"),
    ] {
        let (status, body) = get(&format!("{api}{query}"));
        assert_eq!(status, 400, "{query}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(names),
            "{query}: the error names {names}: {error}"
        );
    }
}

fn list_where(s: &Site, filters: &[&str]) -> Vec<Value> {
    let out = bin()
        .arg("--data")
        .arg(&s.relay)
        .args([&["list", "tasks"], filters].concat())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_changes_feed_mirrors_the_store_incrementally() {
    let (s, _relay, api) = node_with_tasks(250);

    // A mirror reads the feed page by page from 0 until it reaches the head.
    let mut mirror = std::collections::BTreeMap::<String, Value>::new();
    let mut since = 0;
    let follow = |mirror: &mut std::collections::BTreeMap<String, Value>, since: &mut u64| loop {
        let (status, page) = get(&format!("{api}/v1/changes?since={since}&limit=100"));
        assert_eq!(status, 200, "{page}");
        for c in page["changes"].as_array().unwrap() {
            let id = c["id"].as_str().unwrap().to_owned();
            if c["deleted"] == true {
                assert!(c.get("view").is_none(), "a tombstone has no view: {c}");
                mirror.remove(&id);
            } else {
                assert_eq!(c["collection"], "tasks");
                mirror.insert(id, c["view"].clone());
            }
        }
        assert!(page["next"].as_u64().unwrap() >= *since);
        *since = page["next"].as_u64().unwrap();
        if since == &page["head"].as_u64().unwrap() {
            return;
        }
    };
    follow(&mut mirror, &mut since);
    assert_eq!(mirror.len(), 250);

    // Changes after the mirror's position: an update, a new entity and a delete.
    let ids: Vec<String> = mirror.keys().cloned().collect();
    cli(
        &s.relay,
        &["put", "tasks", &ids[7], r#"{"status":"completed"}"#],
    );
    let new = cli(&s.relay, &["put", "tasks", r#"{"title":"late"}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    cli(&s.relay, &["delete", "tasks", &ids[9]]);
    let before = since;
    let (_, page) = get(&format!("{api}/v1/changes?since={before}"));
    let changed: Vec<&str> = page["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        changed,
        vec![ids[7].as_str(), new.as_str(), ids[9].as_str()],
        "each changed entity once, in order"
    );
    follow(&mut mirror, &mut since);
    assert_eq!(mirror.len(), 250);
    assert_eq!(mirror[&ids[7]]["status"], "completed");
    assert!(!mirror.contains_key(&ids[9]));
    assert_eq!(mirror[&new]["title"], "late");

    // The mirror equals a full list of live entities.
    let listed: std::collections::BTreeMap<String, Value> = list_where(&s, &[])
        .into_iter()
        .map(|v| (v["_id"].as_str().unwrap().to_owned(), v))
        .collect();
    assert_eq!(
        mirror.keys().collect::<Vec<_>>(),
        listed.keys().collect::<Vec<_>>()
    );
    for (id, view) in &listed {
        assert_eq!(&mirror[id], view, "{id}");
    }
}

/// Reads SSE from `url` (with `Last-Event-ID` if given) on a thread: (id, data) per event.
fn subscribe(
    url: String,
    last_event_id: Option<String>,
) -> mpsc::Receiver<(Option<String>, Value)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let request = ureq::get(&url);
        let request = match &last_event_id {
            Some(id) => request.header("last-event-id", id),
            None => request,
        };
        let Ok(mut response) = request.call() else {
            return;
        };
        let mut id = None;
        for line in BufReader::new(response.body_mut().as_reader())
            .lines()
            .map_while(Result::ok)
        {
            if let Some(v) = line
                .strip_prefix("id: ")
                .or_else(|| line.strip_prefix("id:"))
            {
                id = Some(v.trim().to_owned());
            } else if let Some(data) = line
                .strip_prefix("data: ")
                .or_else(|| line.strip_prefix("data:"))
            {
                let Ok(value) = serde_json::from_str(data.trim()) else {
                    continue;
                };
                if tx.send((id.take(), value)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Events from `rx` until `done` holds for the list so far.
fn events_until(
    rx: &mpsc::Receiver<(Option<String>, Value)>,
    what: &str,
    done: impl Fn(&[(Option<String>, Value)]) -> bool,
) -> Vec<(Option<String>, Value)> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    while !done(&seen) {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(e) => seen.push(e),
            Err(_) => panic!("no {what} within {WAIT:?}; saw {seen:?}"),
        }
    }
    seen
}

fn changed(events: &[(Option<String>, Value)], id: &str) -> bool {
    events
        .iter()
        .any(|(_, e)| e["event"] == "entity_changed" && e["id"] == id)
}

#[test]
fn events_resume_from_the_last_event_id() {
    let (s, _relay, api) = node_with_tasks(1);
    let url = format!("{api}/v1/events");
    let live = subscribe(url.clone(), None);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let first = cli(&s.relay, &["put", "tasks", r#"{"title":"first"}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let seen = events_until(&live, "the first change", |e| changed(e, &first));
    let (last_id, _) = seen
        .iter()
        .rev()
        .find(|(_, e)| e["id"] == first.as_str())
        .cloned()
        .unwrap();
    let last_id = last_id.expect("events carry ids");
    drop(live);

    // Two writes while this subscriber is away; it resumes and gets both, then live ones.
    let missed: Vec<String> = ["second", "third"]
        .iter()
        .map(|t| {
            cli(
                &s.relay,
                &["put", "tasks", &format!(r#"{{"title":"{t}"}}"#)],
            )["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(600)); // the feed watcher publishes every 200 ms
    let resumed = subscribe(url.clone(), Some(last_id.clone()));
    let got = events_until(&resumed, "the missed changes", |e| {
        missed.iter().all(|id| changed(e, id))
    });
    assert!(
        !changed(&got, &first),
        "nothing at or before Last-Event-ID is sent again: {got:?}"
    );
    assert!(
        got.iter().all(|(_, e)| e["event"] != "events_missed"),
        "{got:?}"
    );
    let ids: Vec<&String> = got.iter().filter_map(|(id, _)| id.as_ref()).collect();
    assert!(ids.windows(2).all(|w| w[0] != w[1]), "{ids:?}");
    let fourth = cli(&s.relay, &["put", "tasks", r#"{"title":"fourth"}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    events_until(&resumed, "a live change after the replay", |e| {
        changed(e, &fourth)
    });

    // An id this run never gave (an earlier run of the daemon, or garbage) says events were missed.
    for stale in ["1-1", "garbage"] {
        let rx = subscribe(url.clone(), Some(stale.into()));
        let got = events_until(&rx, "events_missed", |e| !e.is_empty());
        assert_eq!(got[0].1["event"], "events_missed", "{stale}: {got:?}");
    }
}
