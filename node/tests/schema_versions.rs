//! Real processes on 127.0.0.1: the relay (the authority) publishes schema version 2 with
//! `fieldsync schema push` while a device is offline on version 1 — `priority` gets a `max`
//! rule and a backfill migration, the task status order gains "on_hold" and `title` is
//! renamed `label`; the device writes old- and new-style
//! values offline, comes back, adopts version 2, and every view is identical with no write
//! lost. A change the table refuses exits 2 with its reason, through the daemon too.

mod support;

use serde_json::Value;
use support::*;

/// Version 2: `priority` (max, backfilled with 1 by a migration), "on_hold" appended to the
/// status order, and `title` renamed `label`.
fn v2() -> String {
    let fields = "status   = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\", \"on_hold\"] }\npriority = { rule = \"max\" }\nlabel    = { rule = \"lww\", renamed_from = \"title\" }";
    SCHEMA.replace(r#"status   = { rule = "rank", order = ["open", "in_progress", "completed"] }"#, fields)
        + "\n[[migrations]]\nid = \"tasks-priority-1\"\ncollection = \"tasks\"\nkind = \"backfill\"\nfield = \"priority\"\nvalue = 1\n"
}

/// How many changes of migration `id` an entity's history holds on node `dir`.
fn migrate_changes(dir: &std::path::Path, task: &str, id: &str) -> usize {
    let out = bin()
        .arg("--data")
        .arg(dir)
        .args(["history", "tasks", task])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|h| h["kind"] == "migrate" && h["op"] == id)
        .count()
}

fn fails(dir: &std::path::Path, args: &[&str]) -> (i32, String) {
    let out = bin().arg("--data").arg(dir).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_device_offline_on_version_1_converges_after_the_relay_pushes_version_2() {
    let s = site(2);
    let v2_file = s.tmp.path().join("v2.toml");
    std::fs::write(&v2_file, v2()).unwrap();
    let bad_file = s.tmp.path().join("bad.toml");
    std::fs::write(
        &bad_file,
        v2().replace(
            r#"stock    = { rule = "counter" }"#,
            r#"stock    = { rule = "lww" }"#,
        ),
    )
    .unwrap();
    let (v2_path, bad_path) = (v2_file.to_str().unwrap(), bad_file.to_str().unwrap());

    let (_relay, raddr) = start_relay(&s.relay);
    let online = start_device(&s.devices[0], &raddr, &[]);
    let task = cli(
        &s.devices[0],
        &["put", "tasks", r#"{"title":"Fit boiler","status":"open"}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The couch device (not running) syncs once, then stays offline on version 1.
    let couch = start_device(&s.devices[1], &raddr, &[]);
    eventually("the task reaches the couch device", || {
        bin()
            .arg("--data")
            .arg(&s.devices[1])
            .args(["get", "tasks", &task])
            .output()
            .unwrap()
            .status
            .success()
    });
    couch.stop();

    // diff says what would change; push publishes through the relay's daemon.
    let diff = cli(&s.relay, &["schema", "diff", v2_path]);
    assert_eq!(diff["allowed"], true, "{diff}");
    assert_eq!(diff["to_version"], 2);
    let bad = cli(&s.relay, &["schema", "diff", bad_path]);
    assert_eq!(bad["allowed"], false, "{bad}");
    let (code, err) = fails(&s.relay, &["schema", "push", bad_path]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("inventory.stock") && err.contains("increments would be dropped"),
        "{err}"
    );
    let (code, err) = fails(&s.devices[0], &["schema", "push", v2_path]);
    assert_eq!(code, 2, "only the authority publishes: {err}");
    assert_eq!(cli(&s.relay, &["schema", "push", v2_path])["version"], 2);
    assert_eq!(cli(&s.relay, &["status"])["schema_version"], 2);
    eventually("the online device adopts version 2", || {
        cli(&s.devices[0], &["status"])["schema_version"] == 2
    });
    cli(
        &s.devices[0],
        &[
            "put",
            "tasks",
            &task,
            r#"{"status":"on_hold","priority":3}"#,
        ],
    );

    // Offline on version 1 (no daemon: the CLI works on the store directly).
    assert_eq!(cli(&s.devices[1], &["status"])["schema_version"], 1);
    cli(
        &s.devices[1],
        &[
            "put",
            "tasks",
            &task,
            r#"{"status":"in_progress","priority":7,"title":"Fit boiler, 2nd floor"}"#,
        ],
    );
    let other = cli(
        &s.devices[1],
        &["put", "tasks", r#"{"title":"Bleed radiators"}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let _couch = start_device(&s.devices[1], &raddr, &[]);
    eventually("every node on version 2 with the same views", || {
        let views: Vec<Vec<Value>> = [&s.relay, &s.devices[0], &s.devices[1]]
            .iter()
            .map(|d| list(d, "tasks"))
            .collect();
        [&s.relay, &s.devices[0], &s.devices[1]]
            .iter()
            .all(|d| cli(d, &["status"])["schema_version"] == 2)
            && views.iter().all(|v| *v == views[0])
            && views[0].len() == 2
    });
    let v = cli(&s.relay, &["get", "tasks", &task]);
    assert_eq!(
        (
            v["status"].clone(),
            v["priority"].clone(),
            v["label"].clone()
        ),
        (
            Value::from("on_hold"),
            Value::from(7),
            Value::from("Fit boiler, 2nd floor")
        ),
        "{v}"
    );
    assert!(v.get("title").is_none(), "the old name reads as label: {v}");
    // The task the couch device made under version 1 was migrated by whoever met it first.
    let o = cli(&s.relay, &["get", "tasks", &other]);
    assert_eq!(
        (o["priority"].clone(), o["label"].clone()),
        (Value::from(1), Value::from("Bleed radiators")),
        "{o}"
    );
    // Every node met both tasks under version 2 and migrated them: one change each.
    for d in [&s.relay, &s.devices[0], &s.devices[1]] {
        eventually("every migration change reached every node", || {
            [&task, &other]
                .iter()
                .all(|t| migrate_changes(d, t, "tasks-priority-1") == 1)
        });
    }
    let shown = cli(&s.devices[1], &["schema", "show"]);
    assert_eq!(
        (shown["version"].clone(), shown["current"].clone()),
        (Value::from(2), Value::Bool(true))
    );
    assert!(shown["schema"].as_str().unwrap().contains("on_hold"));
    assert_eq!(
        cli(&s.devices[1], &["schema", "show", "--version", "1"])["current"],
        false
    );
    assert_eq!(
        fails(&s.devices[1], &["schema", "show", "--version", "9"]).0,
        3
    );
    drop(online);
}
