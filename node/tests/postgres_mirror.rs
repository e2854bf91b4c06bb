//! The relay's PostgreSQL mirror against a real PostgreSQL server on 127.0.0.1: devices
//! write offline and the rows appear with typed values; outbox rows written by back-office
//! SQL reach a device as confirmed values, and a bad one fails alone; a relay killed with
//! SIGKILL mid-mirror and a crashed PostgreSQL leave every row equal to the relay's view,
//! none missing, none twice.

mod support;

use std::collections::BTreeMap;

use serde_json::{json, Value};
use support::postgres::Postgres;
use support::*;

/// Starts a relay that mirrors into `pg`.
fn start_mirroring_relay(dir: &std::path::Path, pg: &Postgres) -> (Daemon, String) {
    let mut relay = Daemon::start(dir, &[&["relay", "--postgres", &pg.url()], LOCAL].concat());
    let addr = relay.addr();
    relay.wait_for("api");
    (relay, addr)
}

fn status(dir: &std::path::Path) -> Value {
    cli(dir, &["status"])
}

/// Waits until the relay's mirror has caught up with its feed.
fn caught_up(dir: &std::path::Path) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = status(dir);
        if s["mirror"]["connected"] == true
            && s["mirror"]["lag"] == 0
            && s["mirror"]["mirrored_seq"] == s["feed_seq"]
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror did not catch up: {}",
            s["mirror"]
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The relay's live views of a collection by id.
fn views(dir: &std::path::Path, collection: &str) -> BTreeMap<String, Value> {
    let out = bin()
        .arg("--data")
        .arg(dir)
        .args(["list", collection])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["_id"].as_str().unwrap().to_owned(), v))
        .collect()
}

#[test]
fn offline_writes_arrive_as_typed_rows_and_outbox_rows_come_back_as_confirmed_values() {
    let pg = Postgres::start();
    let s = site(1);
    let device = &s.devices[0];

    // Offline on the device: a task, stock, a payment (a proposal until the office confirms).
    let task = cli(device, &["put", "tasks", r#"{"title":"Fit boiler","status":"in_progress","progress":40,"tags":["gas","urgent"],"notes":"2nd floor"}"#])["id"].as_str().unwrap().to_owned();
    let stock = cli(device, &["put", "inventory", r#"{"stock":{"$inc":7}}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let payment = cli(
        device,
        &["put", "payments", r#"{"amount":250,"status":"collected"}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (_relay, raddr) = start_mirroring_relay(&s.relay, &pg);
    let _device = start_device(device, &raddr, &[]);
    eventually("the payment reaches the relay", || {
        bin()
            .arg("--data")
            .arg(&s.relay)
            .args(["get", "payments", &payment])
            .output()
            .unwrap()
            .status
            .success()
    });
    caught_up(&s.relay);

    let rows = pg.rows(&format!("SELECT status, progress, tags, notes, deleted, view->>'title' AS title FROM tasks WHERE id = '{task}'"));
    assert_eq!(
        rows,
        vec![
            json!({ "status": "in_progress", "progress": 40, "tags": ["gas", "urgent"], "notes": "2nd floor", "deleted": false, "title": "Fit boiler" })
        ]
    );
    let types = pg.rows("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'tasks' AND column_name IN ('status', 'progress', 'tags', 'notes') ORDER BY column_name");
    assert_eq!(
        types,
        vec![
            json!({ "column_name": "notes", "data_type": "text" }),
            json!({ "column_name": "progress", "data_type": "numeric" }),
            json!({ "column_name": "status", "data_type": "text" }),
            json!({ "column_name": "tags", "data_type": "jsonb" }),
        ]
    );
    assert_eq!(
        pg.sql(&format!("SELECT stock FROM inventory WHERE id = '{stock}'")),
        "7"
    );
    // Authority fields: the confirmed value (none yet) and what is pending.
    let pending = pg.rows(&format!(
        "SELECT amount, amount_pending, status_pending FROM payments WHERE id = '{payment}'"
    ));
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["amount"], Value::Null);
    assert!(
        pending[0]["amount_pending"].to_string().contains("250"),
        "{pending:?}"
    );

    // The device's proposals are listed by id; the office accepts the amount in SQL.
    let proposed = pg.rows(&format!(
        "SELECT field, value FROM fieldsync_proposals WHERE entity_id = '{payment}' ORDER BY field"
    ));
    assert_eq!(
        proposed,
        vec![
            json!({ "field": "amount", "value": 250 }),
            json!({ "field": "status", "value": "collected" })
        ]
    );
    pg.sql(&format!("INSERT INTO fieldsync_outbox (action, proposal_id) SELECT 'accept', id FROM fieldsync_proposals WHERE entity_id = '{payment}' AND field = 'amount'"));
    eventually("the accepted amount reaches the device", || {
        cli(device, &["get", "payments", &payment])["amount"] == 250
    });
    eventually("the accepted proposal leaves the table", || {
        pg.sql(&format!(
            "SELECT string_agg(field, ',') FROM fieldsync_proposals WHERE entity_id = '{payment}'"
        )) == "status"
    });

    // The accounting system confirms the status with a write; the device sees it confirmed.
    pg.sql(&format!(r#"INSERT INTO fieldsync_outbox (collection, entity_id, patch) VALUES ('payments', '{payment}', '{{"status":"confirmed"}}')"#));
    eventually("the confirmation reaches the device", || {
        let v = cli(device, &["get", "payments", &payment]);
        v["status"] == "confirmed" && v["amount"] == 250
    });
    let row = pg.rows("SELECT status, error, result_id::text AS result_id, applied_by FROM fieldsync_outbox ORDER BY seq");
    assert!(row.iter().all(|r| r["status"] == "applied"), "{row:?}");
    assert_eq!(row[1]["result_id"], payment.as_str());
    eventually("the mirror shows the confirmed value", || {
        pg.sql(&format!("SELECT amount::text || ' ' || (status #>> '{{}}') FROM payments WHERE id = '{payment}'")) == "250 confirmed"
    });

    // A bad outbox row fails with the reason, and nothing else changes.
    caught_up(&s.relay);
    let before = pg.rows("SELECT id, view FROM tasks ORDER BY id");
    let feed_before = status(&s.relay)["feed_seq"].clone();
    pg.sql(&format!(r#"INSERT INTO fieldsync_outbox (collection, entity_id, patch) VALUES ('tasks', '{task}', '{{"progress":"lots"}}')"#));
    pg.sql(r#"INSERT INTO fieldsync_outbox (collection, patch) VALUES ('no_such_collection', '{"x":1}')"#);
    eventually("the bad rows are marked failed", || {
        pg.sql("SELECT count(*) FROM fieldsync_outbox WHERE status = 'failed'") == "2"
    });
    let failed = pg.rows(
        "SELECT collection, error FROM fieldsync_outbox WHERE status = 'failed' ORDER BY seq",
    );
    assert!(
        failed[0]["error"].as_str().unwrap().contains("progress"),
        "{failed:?}"
    );
    assert!(
        failed[1]["error"]
            .as_str()
            .unwrap()
            .contains("no_such_collection"),
        "{failed:?}"
    );
    assert_eq!(
        status(&s.relay)["feed_seq"],
        feed_before,
        "a failed row writes nothing"
    );
    assert_eq!(pg.rows("SELECT id, view FROM tasks ORDER BY id"), before);
    assert_eq!(cli(device, &["get", "tasks", &task])["progress"], 40);

    let metrics = ureq::get(format!("http://{}/metrics", _relay_api(&s.relay)))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(metrics.contains("fieldsync_mirror_lag 0"), "{metrics}");
    assert!(
        metrics.contains("fieldsync_mirror_outbox_failed 2"),
        "{metrics}"
    );
}

/// The API address in a running daemon's `daemon.json`.
fn _relay_api(dir: &std::path::Path) -> String {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("daemon.json")).unwrap()).unwrap();
    v["api"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned()
}

#[test]
fn a_relay_killed_mid_mirror_and_a_crashed_postgres_lose_and_duplicate_nothing() {
    let pg = Postgres::start();
    let s = site(0);
    let lines: String = (0..6_000)
        .map(|i| {
            format!(
                "{}\n",
                json!({ "title": format!("task {i}"), "status": "open", "progress": i % 100 })
            )
        })
        .collect();
    let file = s.tmp.path().join("tasks.jsonl");
    std::fs::write(&file, lines).unwrap();
    cli(&s.relay, &["import", "tasks", file.to_str().unwrap()]);

    // Kill the relay while it is mirroring (some rows written, not all).
    let (mut relay, _) = start_mirroring_relay(&s.relay, &pg);
    let api = relay.api();
    let mut seen_partial = false;
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        let st: Value = ureq::get(format!("{api}/v1/status"))
            .call()
            .unwrap()
            .body_mut()
            .read_json()
            .unwrap();
        let (mirrored, head) = (
            st["mirror"]["mirrored_seq"].as_u64().unwrap_or(0),
            st["feed_seq"].as_u64().unwrap(),
        );
        if mirrored > 0 {
            seen_partial = mirrored < head;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    relay.child.kill().unwrap(); // SIGKILL
    relay.child.wait().unwrap();
    assert!(
        seen_partial,
        "the relay was killed before it had mirrored everything"
    );
    let partial: u64 = pg.sql("SELECT count(*) FROM tasks").parse().unwrap();
    assert!(partial < 6_000, "{partial} rows");

    // PostgreSQL crashes too; meanwhile the relay's store changes offline.
    pg.crash_restart();
    let ids: Vec<String> = views(&s.relay, "tasks").into_keys().collect();
    cli(
        &s.relay,
        &["put", "tasks", &ids[0], r#"{"status":"completed"}"#],
    );
    cli(&s.relay, &["delete", "tasks", &ids[1]]);

    let (relay, _) = start_mirroring_relay(&s.relay, &pg);
    caught_up(&s.relay);
    // A PostgreSQL crash while the relay runs: it reconnects and mirrors what came meanwhile.
    pg.crash_restart();
    let late = cli(
        &s.relay,
        &["put", "tasks", r#"{"title":"after the crash"}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    caught_up(&s.relay);

    let rows: BTreeMap<String, Value> = pg
        .rows("SELECT id::text AS id, view, deleted FROM tasks")
        .into_iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r))
        .collect();
    assert_eq!(
        pg.sql("SELECT count(*) FROM tasks"),
        "6001",
        "one row per entity, the deleted one included"
    );
    assert_eq!(rows[&ids[1]]["deleted"], true);
    let live = views(&s.relay, "tasks");
    assert_eq!(live.len(), 6_000);
    for (id, view) in &live {
        let row = rows.get(id).unwrap_or_else(|| panic!("no row for {id}"));
        assert_eq!(&row["view"], view, "{id}");
        assert_eq!(row["deleted"], false, "{id}");
    }
    assert_eq!(rows[&ids[0]]["view"]["status"], "completed");
    assert_eq!(rows[&late]["view"]["title"], "after the crash");

    // `mirror rebuild` empties the tables; the relay writes every row again.
    relay.stop();
    pg.sql(&format!(
        "UPDATE tasks SET view = '{{}}' WHERE id = '{}'",
        ids[2]
    ));
    assert_eq!(
        cli(&s.relay, &["mirror", "rebuild", "--postgres", &pg.url()])["rebuilt"],
        8,
        "five collections, the member list, the schema versions and the purges"
    );
    assert_eq!(pg.sql("SELECT count(*) FROM tasks"), "0");
    let (_relay, _) = start_mirroring_relay(&s.relay, &pg);
    caught_up(&s.relay);
    assert_eq!(pg.sql("SELECT count(*) FROM tasks"), "6001");
    assert_eq!(
        pg.rows(&format!("SELECT view FROM tasks WHERE id = '{}'", ids[2]))[0]["view"],
        live[&ids[2]]
    );
}

#[test]
fn two_relays_share_one_database_and_each_outbox_row_counts_once() {
    let pg = Postgres::start();
    let s = site(1);
    // A second relay, a member of the workspace, peering with the first.
    let invite = s.tmp.path().join("relay2.json");
    let out = bin()
        .arg("--data")
        .arg(&s.relay)
        .args(["invite", "--role", "relay", "--user", "relay2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(&invite, out.stdout).unwrap();
    let relay2 = s.tmp.path().join("relay2");
    cli(
        &relay2,
        &[
            "init",
            "--join",
            invite.to_str().unwrap(),
            "--name",
            "relay2",
        ],
    );

    let (_r1, addr1) = start_mirroring_relay(&s.relay, &pg);
    let mut r2 = Daemon::start(
        &relay2,
        &[&["relay", "--postgres", &pg.url(), "--peer", &addr1], LOCAL].concat(),
    );
    r2.wait_for("api");
    let _device = start_device(&s.devices[0], &addr1, &[]);
    let stock = cli(
        &s.devices[0],
        &["put", "inventory", r#"{"stock":{"$inc":100}}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually("the stock reaches the second relay", || {
        bin()
            .arg("--data")
            .arg(&relay2)
            .args(["get", "inventory", &stock])
            .output()
            .unwrap()
            .status
            .success()
    });

    // Twenty increments from the office, drained by whichever relay takes each row first.
    for _ in 0..20 {
        pg.sql(&format!(r#"INSERT INTO fieldsync_outbox (collection, entity_id, patch) VALUES ('inventory', '{stock}', '{{"stock":{{"$inc":1}}}}')"#));
    }
    eventually("every outbox row is applied", || {
        pg.sql("SELECT count(*) FROM fieldsync_outbox WHERE status = 'applied'") == "20"
    });
    eventually("both relays and the device agree on 120", || {
        [&s.relay, &relay2, &s.devices[0]]
            .iter()
            .all(|d| cli(d, &["get", "inventory", &stock])["stock"] == 120)
    });
    caught_up(&s.relay);
    caught_up(&relay2);
    assert_eq!(
        pg.sql(&format!("SELECT stock FROM inventory WHERE id = '{stock}'")),
        "120"
    );
    assert_eq!(
        pg.sql("SELECT count(*) FROM fieldsync_mirror"),
        "2",
        "one position per relay"
    );
    let by = pg.sql("SELECT string_agg(DISTINCT applied_by, ',') FROM fieldsync_outbox");
    eprintln!("outbox rows applied by: {by}");

    // A row applied again (as after a relay crash between its write and its commit) is
    // the same op id: it counts once.
    for _ in 0..2 {
        pg.sql(&format!(r#"INSERT INTO fieldsync_outbox (collection, entity_id, patch, op_id) VALUES ('inventory', '{stock}', '{{"stock":{{"$inc":5}}}}', 'office-restock-17')"#));
    }
    eventually("both rows are applied", || {
        pg.sql("SELECT count(*) FROM fieldsync_outbox WHERE status = 'applied'") == "22"
    });
    eventually("the restock counts once everywhere", || {
        [&s.relay, &relay2, &s.devices[0]]
            .iter()
            .all(|d| cli(d, &["get", "inventory", &stock])["stock"] == 125)
    });
    caught_up(&s.relay);
    assert_eq!(
        pg.sql(&format!("SELECT stock FROM inventory WHERE id = '{stock}'")),
        "125"
    );
}

#[test]
fn a_schema_version_adopted_while_mirroring_adds_its_columns() {
    let pg = Postgres::start();
    let s = site(0);
    let (_relay, _) = start_mirroring_relay(&s.relay, &pg);
    let before = cli(
        &s.relay,
        &["put", "tasks", r#"{"title":"before","priority":2}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    caught_up(&s.relay);
    assert_eq!(pg.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'tasks' AND column_name = 'priority'"), "0");

    let v2 = SCHEMA.replace(
        r#"progress = { rule = "max" }"#,
        "progress = { rule = \"max\" }\npriority = { rule = \"max\" }",
    );
    let file = s.tmp.path().join("v2.toml");
    std::fs::write(&file, v2).unwrap();
    cli(&s.relay, &["schema", "push", file.to_str().unwrap()]);
    let after = cli(
        &s.relay,
        &["put", "tasks", r#"{"title":"after","priority":5}"#],
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    caught_up(&s.relay);
    eventually("the priority column is filled", || {
        pg.sql(&format!("SELECT priority FROM tasks WHERE id = '{after}'")) == "5"
    });
    assert_eq!(pg.sql("SELECT data_type FROM information_schema.columns WHERE table_name = 'tasks' AND column_name = 'priority'"), "numeric");
    // The value written before the version (a plain value then) is read under the new rule.
    assert_eq!(
        pg.sql(&format!("SELECT priority FROM tasks WHERE id = '{before}'")),
        "2"
    );
}

#[test]
fn a_purged_entity_leaves_the_mirror() {
    let pg = Postgres::start();
    let s = site(0);
    let (_relay, _) = start_mirroring_relay(&s.relay, &pg);
    let put = |collection: &str, patch: &str| {
        cli(&s.relay, &["put", collection, patch])["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let doomed = put("tasks", r#"{"title":"a customer's home address"}"#);
    let kept = put("tasks", r#"{"title":"kept"}"#);
    caught_up(&s.relay);
    let rows = |id: &str| pg.sql(&format!("SELECT count(*) FROM tasks WHERE id = '{id}'"));
    assert_eq!((rows(&doomed), rows(&kept)), ("1".into(), "1".into()));

    cli(&s.relay, &["purge", "tasks", &doomed]);
    caught_up(&s.relay);
    eventually("the purged row is gone", || rows(&doomed) == "0");
    assert_eq!(rows(&kept), "1", "only the purged entity's row goes");
    assert_eq!(
        pg.sql(&format!(
            "SELECT count(*) FROM fieldsync_purges WHERE view->>'record' LIKE '%{doomed}%'"
        )),
        "1",
        "the purge record itself is mirrored (ids only)"
    );
}
