//! Schema evolution: the authority publishes version 2 (a `priority` field with a `max` rule,
//! "on_hold" appended to the task status order); a device offline since version 1 keeps
//! writing old- and new-style values; after it syncs and adopts version 2, every view is
//! identical and no write is lost. A change the table refuses is refused with its reason.

use fieldsync_tests::sim::{Faults, Network};
use fieldsync_tests::SCHEMA;
use serde_json::json;

fn v2() -> String {
    let with_projects =
        format!("{SCHEMA}\n[collections.projects.fields]\nname = {{ rule = \"lww\" }}\n");
    with_projects.replace(
        r#"status   = { rule = "rank", order = ["open", "in_progress", "completed"] }"#,
        "status   = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\", \"on_hold\"] }\npriority = { rule = \"max\" }\nsite     = { rule = \"lww\", default = \"unassigned\" }",
    )
}

#[test]
fn a_device_offline_since_version_1_loses_nothing_and_converges_after_adopting_version_2() {
    let mut net = Network::new(15, Faults::hostile());
    let relay = net.add_relay("relay");
    let fresh = net.add_device("fresh");
    let couch = net.add_device("couch");
    net.connect(fresh, relay);
    net.connect(couch, relay);
    net.run_until_quiescent();
    let task = net.put(
        fresh,
        "tasks",
        None,
        r#"{"title":"Fit boiler","status":"open"}"#,
    );
    net.run_until_quiescent();

    // The couch device goes offline on version 1; the authority publishes version 2.
    net.isolate(couch);
    let pushed = net
        .write(relay, |r| r.push_schema(&v2()))
        .expect("version 2 is allowed");
    assert_eq!(pushed.version, 2);
    net.run_until_quiescent();
    assert_eq!(
        net.replica(fresh).schema_version(),
        2,
        "an online device adopts version 2 on arrival"
    );
    assert_eq!(net.replica(couch).schema_version(), 1);
    assert_eq!(
        net.view(fresh, "tasks", task).unwrap()["site"],
        "unassigned",
        "a read-time default of version 2"
    );

    // Version 2 writes on the online side; old- and new-style writes on the couch device.
    net.put(
        fresh,
        "tasks",
        Some(task),
        r#"{"status":"on_hold","priority":3}"#,
    );
    net.put(
        couch,
        "tasks",
        Some(task),
        r#"{"status":"in_progress","priority":7,"title":"Fit boiler, 2nd floor"}"#,
    );
    let project = net.put(fresh, "projects", None, r#"{"name":"Boiler season"}"#);
    let couch_only = net.put(
        couch,
        "tasks",
        None,
        r#"{"title":"Bleed radiators","priority":1,"status":"completed"}"#,
    );
    // On version 1, "on_hold" is not a status the couch device can write: that is its own
    // schema's check, not a refusal of the device for being old.
    assert!(net
        .write(couch, |r| r.put(
            "tasks",
            Some(couch_only),
            r#"{"status":"on_hold"}"#
        ))
        .is_err());
    // A field unknown to version 1 is lww there, and kept.
    assert_eq!(net.view(couch, "tasks", task).unwrap()["priority"], 7);

    net.heal_all();
    net.run_until_quiescent();
    for n in [relay, fresh, couch] {
        assert_eq!(
            net.replica(n).schema_version(),
            2,
            "{} adopted version 2",
            net.name(n)
        );
        assert_eq!(net.replica(n).views_schema_version().unwrap(), 2);
    }
    let reference = net.views(relay, "tasks");
    for n in [fresh, couch] {
        assert_eq!(
            net.views(n, "tasks"),
            reference,
            "{} sees what the relay sees",
            net.name(n)
        );
    }
    let v = net.view(couch, "tasks", task).unwrap();
    assert_eq!(v["priority"], 7, "max of 3 and 7 under version 2: {v:?}");
    assert_eq!(
        v["status"], "on_hold",
        "on_hold ranks above in_progress: {v:?}"
    );
    assert_eq!(v["title"], "Fit boiler, 2nd floor");
    assert_eq!(
        net.view(couch, "projects", project)
            .expect("a collection added in version 2 reaches the couch device")["name"],
        "Boiler season"
    );
    let w = net
        .view(relay, "tasks", couch_only)
        .expect("the couch device's new task reached the relay");
    assert_eq!(
        (w["priority"].clone(), w["status"].clone()),
        (serde_json::json!(1), serde_json::json!("completed"))
    );

    // A refused change is refused with its reason, and nothing is published.
    let refused = v2().replace(
        r#"stock    = { rule = "counter" }"#,
        r#"stock    = { rule = "lww" }"#,
    );
    let err = net
        .write(relay, |r| r.push_schema(&refused))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("inventory.stock") && err.contains("increments would be dropped"),
        "{err}"
    );
    let shrunk = v2().replace(r#", "on_hold"]"#, "]");
    let err = net
        .write(relay, |r| r.push_schema(&shrunk))
        .unwrap_err()
        .to_string();
    assert!(err.contains("only grow at its end"), "{err}");
    assert_eq!(net.replica(relay).schema_version(), 2);
    let diff = net.replica(relay).diff_schema(&refused).unwrap();
    assert!(!diff.allowed);
}

#[test]
fn only_the_authority_publishes_and_a_restart_keeps_the_adopted_version() {
    let mut net = Network::new(16, Faults::none());
    let relay = net.add_relay("relay");
    let device = net.add_device("device");
    net.connect(device, relay);
    net.run_until_quiescent();
    let err = net
        .write(device, |r| r.push_schema(&v2()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("authority"), "{err}");
    net.write(relay, |r| r.push_schema(&v2())).unwrap();
    net.run_until_quiescent();
    net.crash(device);
    net.restart(device);
    assert_eq!(net.replica(device).schema_version(), 2);
    let versions = net.replica(device).schema_versions().unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version, v.current))
            .collect::<Vec<_>>(),
        vec![(1, false), (2, true)]
    );
    assert!(net.replica(device).schema_info(Some(3)).is_err());
}

#[test]
fn a_bundle_carries_a_new_version_and_the_collection_it_adds() {
    let root = tempfile::tempdir().unwrap();
    let (hq, devices) = fieldsync_tests::workspace(root.path(), &["ana"]).unwrap();
    let ana = &devices[0];
    let task = ana
        .put("tasks", None, r#"{"status":"open","priority":2}"#)
        .unwrap();
    fieldsync_tests::exchange(ana, &hq).unwrap();
    hq.push_schema(&v2()).unwrap();
    let project = hq
        .put("projects", None, r#"{"name":"Boiler season"}"#)
        .unwrap();
    hq.put("tasks", Some(task), r#"{"priority":1}"#).unwrap();
    assert!(
        ana.put("projects", None, "{}").is_err(),
        "version 1 has no projects"
    );
    fieldsync_tests::exchange(&hq, ana).unwrap();
    assert_eq!(ana.schema_version(), 2);
    assert_eq!(
        ana.get("projects", project).unwrap()["name"],
        "Boiler season"
    );
    assert_eq!(
        ana.get("tasks", task).unwrap(),
        hq.get("tasks", task).unwrap()
    );
    assert_eq!(ana.status().unwrap().schema_version, 2);
}

/// Version 2 with data migrations and a rename: `title` is now `label`, `priority` (max) is
/// backfilled with 1, and `contact` is split into `first_name` and `last_name`.
fn v2_migrations() -> String {
    let fields = "status   = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\"] }\npriority = { rule = \"max\" }\nlabel    = { rule = \"lww\", renamed_from = \"title\" }";
    format!(
        "{}\n{}",
        SCHEMA.replace(
            r#"status   = { rule = "rank", order = ["open", "in_progress", "completed"] }"#,
            fields
        ),
        r#"
[[migrations]]
id = "tasks-priority-1"
collection = "tasks"
kind = "backfill"
field = "priority"
value = 1

[[migrations]]
id = "tasks-split-contact"
collection = "tasks"
kind = "split"
from = "contact"
into = ["first_name", "last_name"]
separator = " "
"#
    )
}

fn migrate_changes(
    net: &Network,
    n: fieldsync_tests::sim::NodeId,
    task: fieldsync::EntityId,
    id: &str,
) -> usize {
    net.replica(n)
        .history("tasks", task)
        .unwrap()
        .iter()
        .filter(|h| h.kind == "migrate" && h.op.as_deref() == Some(id))
        .count()
}

#[test]
fn migrations_and_a_rename_reach_a_device_offline_since_version_1_once() {
    let mut net = Network::new(17, Faults::hostile());
    let relay = net.add_relay("relay");
    let fresh = net.add_device("fresh");
    let couch = net.add_device("couch");
    net.connect(fresh, relay);
    net.connect(couch, relay);
    net.run_until_quiescent();
    let task = net.put(
        fresh,
        "tasks",
        None,
        r#"{"title":"Fit boiler","contact":"Ada Lovelace"}"#,
    );
    net.run_until_quiescent();

    net.isolate(couch);
    let pushed = net
        .write(relay, |r| r.push_schema(&v2_migrations()))
        .expect("migrations and a rename are allowed");
    assert!(
        pushed
            .evolution
            .changes
            .iter()
            .any(|c| c.change.starts_with("renamed from title")),
        "{:?}",
        pushed.evolution
    );
    net.run_until_quiescent();
    let v = net.view(fresh, "tasks", task).unwrap();
    assert_eq!(
        (
            v["label"].clone(),
            v["priority"].clone(),
            v["first_name"].clone(),
            v["last_name"].clone()
        ),
        (
            json!("Fit boiler"),
            json!(1),
            json!("Ada"),
            json!("Lovelace")
        ),
        "{v:?}"
    );
    assert!(
        !v.contains_key("title"),
        "the old name reads as the new one: {v:?}"
    );
    // Relay and device each met the entity under version 2 and migrated it: one change each.
    assert_eq!(migrate_changes(&net, fresh, task, "tasks-priority-1"), 1);
    assert_eq!(migrate_changes(&net, relay, task, "tasks-split-contact"), 1);

    // Version 2 writes online; the couch device writes the old name and a new task.
    net.put(fresh, "tasks", Some(task), r#"{"priority":3}"#);
    net.put(
        couch,
        "tasks",
        Some(task),
        r#"{"title":"Fit boiler, 2nd floor","priority":7}"#,
    );
    let old_style = net.put(
        couch,
        "tasks",
        None,
        r#"{"title":"Bleed radiators","contact":"Grace Hopper"}"#,
    );

    net.heal_all();
    net.run_until_quiescent();
    let reference = net.views(relay, "tasks");
    for n in [fresh, couch] {
        assert_eq!(net.replica(n).schema_version(), 2);
        assert_eq!(
            net.views(n, "tasks"),
            reference,
            "{} sees what the relay sees",
            net.name(n)
        );
    }
    let v = net.view(couch, "tasks", task).unwrap();
    assert_eq!(
        v["label"], "Fit boiler, 2nd floor",
        "an old-name write lands in the renamed field: {v:?}"
    );
    assert_eq!(
        v["priority"], 7,
        "max of the people's 3 and 7; the backfill yields: {v:?}"
    );
    let w = net.view(relay, "tasks", old_style).unwrap();
    assert_eq!(
        (
            w["label"].clone(),
            w["priority"].clone(),
            w["first_name"].clone()
        ),
        (json!("Bleed radiators"), json!(1), json!("Grace")),
        "{w:?}"
    );
    for n in [relay, fresh, couch] {
        for (id, mid) in [
            (task, "tasks-priority-1"),
            (old_style, "tasks-priority-1"),
            (old_style, "tasks-split-contact"),
        ] {
            assert_eq!(
                migrate_changes(&net, n, id, mid),
                1,
                "{mid} on {id} at {}",
                net.name(n)
            );
        }
        assert!(net.replica(n).status().unwrap().schema_recompute.is_none());
    }

    // A published migration cannot be changed or dropped.
    let changed = v2_migrations().replace("value = 1", "value = 2")
        + "\n[collections.projects.fields]\nname = { rule = \"lww\" }\n";
    let err = net
        .write(relay, |r| r.push_schema(&changed))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("migrations.tasks-priority-1") && err.contains("new id"),
        "{err}"
    );
    let dropped = v2_migrations()
        .split("[[migrations]]")
        .next()
        .unwrap()
        .to_owned();
    let err = net
        .write(relay, |r| r.push_schema(&dropped))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("still need every published migration"),
        "{err}"
    );
}

#[test]
fn a_background_recompute_keeps_lists_and_gets_on_the_new_version_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let (hq, _) = fieldsync_tests::workspace(root.path(), &[]).unwrap();
    let jsonl: String = (0..1500)
        .map(|i| format!("{{\"title\":\"task {i}\",\"contact\":\"Ada Lovelace\"}}\n"))
        .collect();
    hq.bulk_import("tasks", &jsonl, &mut |_, _| {}).unwrap();
    let hq = std::sync::Arc::new(hq);
    hq.start_background_recompute();
    let pushed = hq.push_schema(&v2_migrations()).unwrap();
    assert_eq!(pushed.version, 2);
    // Whether or not the worker got to them yet, every read shows version 2's views.
    let check = |hq: &fieldsync::Replica| {
        let mut n = 0;
        hq.list("tasks", &["priority=1".into()], false, &mut |v| {
            assert_eq!(
                (
                    v["label"].as_str().map(|l| l.starts_with("task ")),
                    v["first_name"].as_str()
                ),
                (Some(true), Some("Ada")),
                "{v:?}"
            );
            assert!(!v.contains_key("title"), "{v:?}");
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 1500, "every task is listed with its migrated priority");
        if let Some(p) = hq.status().unwrap().schema_recompute {
            assert!(p.version == 2 && p.done <= p.total, "{p:?}");
        }
    };
    check(&hq);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // The views' version is stored a moment before the progress is cleared: wait for both.
    while hq.views_schema_version().unwrap() < 2 || hq.status().unwrap().schema_recompute.is_some()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the background recompute did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    check(&hq);
    assert!(hq.status().unwrap().schema_recompute.is_none());
}
