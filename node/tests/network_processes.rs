//! Real processes on 127.0.0.1: a relay and devices running `fieldsync relay` / `fieldsync
//! run`, driven through the CLI (which goes through each daemon's HTTP API) — offline edits
//! merge after a restart, devices keep syncing directly while the relay is down, a late
//! device catches up, and every node ends with identical views.

mod support;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

#[test]
fn devices_sync_through_the_relay_and_merge_offline_edits_after_a_restart() {
    let s = site(2);
    let (_relay, raddr) = start_relay(&s.relay);
    let a = start_device(&s.devices[0], &raddr, &[]);
    let b = start_device(&s.devices[1], &raddr, &[]);

    // Live: a write on one device reaches the other through the relay.
    let task = cli(
        &s.devices[0],
        &[
            "put",
            "tasks",
            r#"{"title":"Fit boiler","status":"open","tags":["gas"]}"#,
        ],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the task reaches device1", || {
        bin()
            .arg("--data")
            .arg(&s.devices[1])
            .args(["get", "tasks", &task])
            .output()
            .unwrap()
            .status
            .success()
    });

    // Device1 goes offline; both edit; device1 comes back and everything merges.
    b.stop();
    cli(
        &s.devices[1],
        &[
            "put",
            "tasks",
            &task,
            r#"{"status":"completed","tags":{"$add":["done"]}}"#,
        ],
    );
    cli(
        &s.devices[0],
        &[
            "put",
            "tasks",
            &task,
            r#"{"status":"in_progress","title":"Fit boiler, 2nd floor"}"#,
        ],
    );
    let _b = start_device(&s.devices[1], &raddr, &[]);
    eventually("the offline edits merge everywhere", || {
        [&s.relay, &s.devices[0], &s.devices[1]].iter().all(|d| {
            let v = cli(d, &["get", "tasks", &task]);
            v["status"] == "completed"
                && v["title"] == "Fit boiler, 2nd floor"
                && v["tags"] == serde_json::json!(["done", "gas"])
        })
    });
    assert_same_lists(&[&s.relay, &s.devices[0], &s.devices[1]], "tasks");
    drop(a);
}

#[test]
fn devices_keep_syncing_directly_while_the_relay_is_down_and_a_late_device_catches_up() {
    let s = site(3);
    let (relay, raddr) = start_relay(&s.relay);
    let mut a = start_device(&s.devices[0], &raddr, &[]);
    let a_addr = a.addr();
    let mut b = start_device(&s.devices[1], &raddr, &["--peer", &a_addr]);
    for i in 0..50 {
        cli(
            &s.devices[0],
            &[
                "put",
                "inventory",
                &format!(r#"{{"item":"part {i}","stock":{i}}}"#),
            ],
        );
    }
    eventually("50 items on device1", || {
        list(&s.devices[1], "inventory").len() == 50
    });

    // The relay goes down; the devices still sync with each other.
    relay.stop();
    let item = cli(
        &s.devices[1],
        &["put", "inventory", r#"{"item":"valve","stock":7}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("a direct write reaches device0", || {
        bin()
            .arg("--data")
            .arg(&s.devices[0])
            .args(["get", "inventory", &item])
            .output()
            .unwrap()
            .status
            .success()
    });

    // The relay returns, and a device started long after catches up with everything.
    let (_relay, raddr) = start_relay(&s.relay);
    // The devices redial the relay's old address; point a new device at the new one.
    let mut c = start_device(&s.devices[2], &raddr, &["--peer", &a_addr]);
    c.wait_for("peer_connected");
    eventually("device2 catches up", || {
        list(&s.devices[2], "inventory").len() == 51
    });
    eventually("the relay has everything", || {
        list(&s.relay, "inventory").len() == 51
    });

    // Views are identical through the CLI and through the HTTP API.
    let reference = list(&s.devices[0], "inventory");
    for d in [&s.devices[1], &s.devices[2], &s.relay] {
        assert_eq!(list(d, "inventory"), reference);
    }
    let api = c.api();
    let via_http: Value = ureq::get(format!(
        "{api}/v1/collections/inventory?include_deleted=true"
    ))
    .call()
    .unwrap()
    .body_mut()
    .read_json()
    .unwrap();
    assert_eq!(
        via_http,
        serde_json::json!({ "items": reference, "next": null })
    );
    let _ = b.wait_for("api");
}

#[test]
fn sync_status_events_and_metrics_of_a_running_device() {
    let s = site(1);
    let (_relay, raddr) = start_relay(&s.relay);
    let mut dev = start_device(&s.devices[0], &raddr, &[]);
    let api = dev.api();
    dev.wait_for("sync_completed");

    // An SSE subscriber sees the entity change a CLI write makes.
    let (tx, rx) = mpsc::channel();
    let events_url = format!("{api}/v1/events");
    std::thread::spawn(move || {
        let Ok(mut resp) = ureq::get(&events_url).call() else {
            return;
        };
        let reader = BufReader::new(resp.body_mut().as_reader());
        for line in reader.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let id = cli(&s.devices[0], &["put", "tasks", r#"{"title":"watched"}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("an entity_changed event");
        if line.contains("entity_changed") && line.contains(&id) {
            break;
        }
    }

    // `fieldsync sync` returns once the relay has acknowledged everything.
    let status = cli(&s.devices[0], &["sync", "--timeout", "30"]);
    assert_eq!(status["pending_to_relay"], 0, "{status}");
    let peers = status["peers"].as_object().expect("peers");
    assert_eq!(peers.len(), 1);
    let relay_peer = peers.values().next().unwrap();
    assert_eq!(
        (
            relay_peer["role"].as_str(),
            relay_peer["connected"].as_bool(),
            relay_peer["completed"].as_bool()
        ),
        (Some("relay"), Some(true), Some(true))
    );
    assert!(cli(&s.relay, &["get", "tasks", &id])["title"] == "watched");

    let metrics = ureq::get(format!("{api}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(
        metrics.contains("fieldsync_sync_completed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fieldsync_peers_connected 1"), "{metrics}");
    assert!(metrics.contains("fieldsync_frames_sent_total"), "{metrics}");
}

#[test]
fn a_device_is_reachable_through_a_relay_circuit() {
    // Device b knows device a only by a's circuit address on the relay (as when a is behind
    // NAT); they still get a direct sync session with each other.
    let s = site(2);
    let (_relay, raddr) = start_relay(&s.relay);
    let mut a = start_device(&s.devices[0], &raddr, &[]);
    let a_peer = a.wait_for("api")["peer_id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + WAIT;
    let circuit = loop {
        let v = a
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a listens through the relay");
        a.seen.push(v.clone());
        if v["event"] == "listening"
            && v["addr"]
                .as_str()
                .is_some_and(|x| x.contains("p2p-circuit"))
        {
            break v["addr"].as_str().unwrap().to_owned();
        }
    };
    let mut b = Daemon::start(
        &s.devices[1],
        &[&["run", "--peer", &circuit], LOCAL].concat(),
    );
    b.wait_for("api");
    eventually("b has a session with a", || {
        cli(&s.devices[1], &["status"])["peers"][&a_peer]["connected"] == true
    });
    let id = cli(
        &s.devices[0],
        &["put", "tasks", r#"{"title":"via the circuit"}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the task reaches b", || {
        bin()
            .arg("--data")
            .arg(&s.devices[1])
            .args(["get", "tasks", &id])
            .output()
            .unwrap()
            .status
            .success()
    });
}

#[test]
fn members_partitions_and_revocation_with_running_daemons() {
    let s = site(0);
    let (mut relay, raddr) = start_relay(&s.relay);
    let relay_api = relay.api();
    cli(
        &s.relay,
        &["put", "tasks", r#"{"title":"for ana","assignee":"ana"}"#],
    );
    cli(
        &s.relay,
        &["put", "tasks", r#"{"title":"for bo","assignee":"bo"}"#],
    );
    // Invites through the running relay's API: ana sees only her tasks.
    let join = |name: &str, args: &[&str]| {
        let out = bin()
            .arg("--data")
            .arg(&s.relay)
            .arg("invite")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let invite = s.tmp.path().join(format!("{name}.json"));
        std::fs::write(&invite, out.stdout).unwrap();
        let dir = s.tmp.path().join(name);
        cli(
            &dir,
            &["init", "--join", invite.to_str().unwrap(), "--name", name],
        );
        dir
    };
    let ana = join("ana", &["--user", "ana", "--partition", "tasks=own"]);
    let bad = bin()
        .arg("--data")
        .arg(&s.relay)
        .args(["invite", "--partition", "tasks=some"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a bad partition is refused");
    let mut dev = start_device(&ana, &raddr, &[]);
    dev.wait_for("sync_completed");
    eventually("ana has her task", || list(&ana, "tasks").len() == 1);
    assert_eq!(list(&ana, "tasks")[0]["title"], "for ana");
    let members = cli(&s.relay, &["members"]);
    assert_eq!(
        (
            members["user"].as_str(),
            members["role"].as_str(),
            members["revoked"].as_bool()
        ),
        (Some("ana"), Some("device"), Some(false)),
        "{members}"
    );

    // A stranger (the workspace without an invite) is refused, logged and counted.
    let stranger = s.tmp.path().join("stranger");
    let mut bare: Value =
        serde_json::from_slice(&std::fs::read(s.tmp.path().join("ana.json")).unwrap()).unwrap();
    bare.as_object_mut().unwrap().remove("token");
    bare.as_object_mut().unwrap().remove("token_secret");
    std::fs::write(s.tmp.path().join("bare.json"), bare.to_string()).unwrap();
    cli(
        &stranger,
        &[
            "init",
            "--join",
            s.tmp.path().join("bare.json").to_str().unwrap(),
            "--name",
            "stranger",
        ],
    );
    let _stranger = start_device(&stranger, &raddr, &[]);
    assert!(relay.wait_for("peer_refused")["reason"]
        .as_str()
        .unwrap()
        .contains("not a member"));
    let metrics = || {
        ureq::get(format!("{relay_api}/metrics"))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap()
    };
    eventually("the refusal is counted", || {
        metrics().contains("fieldsync_sessions_refused_total 1")
    });
    assert!(metrics().contains("fieldsync_peers_banned_total 1"));
    assert!(list(&stranger, "tasks").is_empty());

    // Revoked through the running relay: ana's session ends and she gets nothing new.
    let ana_peer = members["peer"].as_str().unwrap().to_owned();
    assert_eq!(cli(&s.relay, &["revoke", &ana_peer])["revoked"], true);
    let reason = relay.wait_for_next("peer_refused")["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("revoked"), "{reason}");
    cli(
        &s.relay,
        &[
            "put",
            "tasks",
            r#"{"title":"after revocation","assignee":"ana"}"#,
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        list(&ana, "tasks").len(),
        1,
        "a revoked device kept receiving"
    );
    dev.stop();
}

#[test]
fn a_delegated_second_relay_serves_the_office_while_the_authority_is_down() {
    let s = site(0);
    // The second relay joins with a relay invite and keeps connected to the authority.
    let invite_to = |role: &str, name: &str| {
        let file = s.tmp.path().join(format!("{name}.json"));
        let invite = stdout_of(&s.relay, &["invite", "--user", name, "--role", role]);
        std::fs::write(&file, invite).unwrap();
        file
    };
    let office = s.tmp.path().join("office");
    let office_invite = invite_to("relay", "office");
    let ana_invite = invite_to("device", "ana"); // issued before hq goes down
    cli(
        &office,
        &[
            "init",
            "--join",
            office_invite.to_str().unwrap(),
            "--name",
            "office",
        ],
    );
    let (hq, haddr) = start_relay(&s.relay);
    let mut second = Daemon::start(&office, &[&["relay", "--peer", &haddr], LOCAL].concat());
    let oaddr = second.addr();
    second.wait_for("api");
    let office_peer = cli(&office, &["status"])["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("hq knows the office as a member", || {
        try_stdout(&s.relay, &["members"]).is_some_and(|m| m.contains(&office_peer))
    });
    assert!(
        try_stdout(&office, &["proposals"]).is_none(),
        "a relay settles nothing by itself"
    );
    let delegated = cli(&s.relay, &["delegate", &office_peer]);
    assert_eq!(delegated["delegate"], true, "{delegated}");
    eventually("the office holds its delegation", || {
        try_stdout(&office, &["proposals"]).is_some()
    });
    hq.stop(); // the authority's machine is down for the day

    let ana = s.tmp.path().join("ana");
    cli(
        &ana,
        &[
            "init",
            "--join",
            ana_invite.to_str().unwrap(),
            "--name",
            "ana",
        ],
    );
    let mut dev = start_device(&ana, &oaddr, &[]);
    dev.wait_for("sync_completed");
    let payment = cli(
        &ana,
        &["put", "payments", r#"{"amount": 120, "collector": "ana"}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut pending = Vec::new();
    eventually("the office sees ana's proposal", || {
        pending = try_stdout(&office, &["proposals"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|p| p["entity"] == payment.as_str())
            .collect();
        !pending.is_empty()
    });
    let pid = pending[0]["id"].as_str().unwrap().to_owned();
    cli(&office, &["accept", &pid]);
    eventually("ana's payment is confirmed by the office", || {
        try_stdout(&ana, &["proposals", "--mine"]).is_some_and(|p| p.trim().is_empty())
    });
    assert_eq!(cli(&ana, &["get", "payments", &payment])["amount"], 120);

    // The authority comes back: it takes the office's work as its own.
    // (It listens on a new port, so it is the one to dial.)
    let mut hq = Daemon::start(&s.relay, &[&["relay", "--peer", &oaddr], LOCAL].concat());
    hq.wait_for("api");
    eventually("hq has the confirmed payment and ana as a member", || {
        let confirmed = try_stdout(&s.relay, &["get", "payments", &payment])
            .and_then(|v| serde_json::from_str::<Value>(&v).ok())
            .is_some_and(|v| v["amount"] == 120 && v.get("_pending").is_none());
        let members = try_stdout(&s.relay, &["members"]).unwrap_or_default();
        confirmed
            && members
                .lines()
                .any(|l| l.contains("\"kind\":\"member\"") && l.contains("\"user\":\"ana\""))
    });
    assert!(
        !try_stdout(&s.relay, &["members"])
            .unwrap_or_default()
            .contains("\"kind\":\"invite\""),
        "ana's invite counts as used at hq"
    );
    dev.stop();
    second.stop();
    hq.stop();
}
