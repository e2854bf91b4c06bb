//! Apps retry: the same write sent again with the same operation id — on the same device,
//! on another device, or arriving through two paths — has exactly one effect; identical
//! creations on two devices merge as one; a device write equal to the confirmed value
//! makes no proposal. Includes the payment-collection seed scenario (../shared/seeds/004).

use fieldsync::{Applied, EntityId, OpId};
use fieldsync_tests::{exchange, workspace};
use serde_json::json;

fn op(s: &str) -> OpId {
    s.parse().unwrap()
}

#[test]
fn a_collector_s_retried_payment_is_one_proposal_and_never_returns_to_pending() {
    let tmp = tempfile::tempdir().unwrap();
    let (office, devices) = workspace(tmp.path(), &["collector"]).unwrap();
    let collector = &devices[0];
    let pay = r#"{"amount":250,"status":"collected","collector":"collector"}"#;

    // Offline: the request times out and the app sends it three more times.
    let (id, first) = collector
        .put_op("payments", None, pay, Some(&op("pay-7781")))
        .unwrap();
    assert_eq!(first, Applied::Now);
    for _ in 0..3 {
        let (again, applied) = collector
            .put_op("payments", None, pay, Some(&op("pay-7781")))
            .unwrap();
        assert_eq!(
            (again, applied),
            (id, Applied::Already),
            "a retry answers with the first call's entity"
        );
    }
    assert_eq!(
        collector.my_proposals().unwrap().len(),
        2,
        "one proposal per authority field: amount and status"
    );

    exchange(collector, &office).unwrap();
    let pending = office.proposals().unwrap();
    assert_eq!(
        pending.len(),
        2,
        "the office sees one proposal per field, not four: {pending:?}"
    );
    for p in &pending {
        office.accept(p.id).unwrap();
    }
    assert!(office.proposals().unwrap().is_empty());
    exchange(&office, collector).unwrap();
    let confirmed = collector.get("payments", id).unwrap();
    assert_eq!(confirmed["amount"], 250);
    assert!(confirmed.get("_pending").is_none(), "{confirmed:?}");

    // The collector's app retries once more after the confirmation, with and without the op id.
    collector
        .put_op("payments", None, pay, Some(&op("pay-7781")))
        .unwrap();
    collector
        .put(
            "payments",
            Some(id),
            r#"{"amount":250,"status":"collected"}"#,
        )
        .unwrap();
    let view = collector.get("payments", id).unwrap();
    assert!(
        view.get("_pending").is_none(),
        "equal to the confirmed value: no new proposal: {view:?}"
    );
    assert!(collector.my_proposals().unwrap().is_empty());
    exchange(collector, &office).unwrap();
    assert!(office.proposals().unwrap().is_empty());
    assert_eq!(office.get("payments", id).unwrap()["amount"], 250);
}

#[test]
fn a_retried_increment_counts_once_on_any_node_and_through_two_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = workspace(tmp.path(), &["a", "b"]).unwrap();
    let (a, b) = (&devices[0], &devices[1]);
    let item = EntityId(uuid::Uuid::now_v7());
    a.put("inventory", Some(item), r#"{"stock":10}"#).unwrap();
    exchange(a, &hq).unwrap();
    exchange(&hq, b).unwrap();

    // The app's request reaches device a, times out, and is retried on a and then on b.
    a.put_op(
        "inventory",
        Some(item),
        r#"{"stock":{"$inc":5}}"#,
        Some(&op("restock-1")),
    )
    .unwrap();
    a.put_op(
        "inventory",
        Some(item),
        r#"{"stock":{"$inc":5}}"#,
        Some(&op("restock-1")),
    )
    .unwrap();
    b.put_op(
        "inventory",
        Some(item),
        r#"{"stock":{"$inc":5}}"#,
        Some(&op("restock-1")),
    )
    .unwrap();
    // A different operation counts.
    b.put_op(
        "inventory",
        Some(item),
        r#"{"stock":{"$inc":-2}}"#,
        Some(&op("sale-9")),
    )
    .unwrap();
    // The changes travel through two paths: a → hq → b and b → a directly.
    exchange(a, &hq).unwrap();
    exchange(b, &hq).unwrap();
    exchange(&hq, a).unwrap();
    exchange(&hq, b).unwrap();
    exchange(b, a).unwrap();
    for r in [&hq, a, b] {
        assert_eq!(
            r.get("inventory", item).unwrap()["stock"],
            13,
            "10 + 5 once − 2"
        );
    }
    // Reusing an op id for a different write is refused, not skipped.
    let err = a
        .put_op(
            "inventory",
            Some(item),
            r#"{"stock":{"$inc":50}}"#,
            Some(&op("restock-1")),
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("already used for a different write"),
        "{err}"
    );
}

#[test]
fn identical_creations_and_imports_on_two_devices_merge_as_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = workspace(tmp.path(), &["a", "b"]).unwrap();
    let (a, b) = (&devices[0], &devices[1]);
    let id = EntityId(uuid::Uuid::now_v7());
    a.put("inventory", Some(id), r#"{"stock":25,"sku":"B-100"}"#)
        .unwrap();
    b.put("inventory", Some(id), r#"{"stock":25,"sku":"B-100"}"#)
        .unwrap();
    let imported = EntityId(uuid::Uuid::now_v7());
    let line = format!("{{\"_id\":\"{imported}\",\"stock\":7,\"sku\":\"C-7\"}}\n");
    a.bulk_import("inventory", &line, &mut |_, _| {}).unwrap();
    b.bulk_import("inventory", &line, &mut |_, _| {}).unwrap();
    // Different initial content is a real concurrent edit: counters add up.
    let differ = EntityId(uuid::Uuid::now_v7());
    a.put("inventory", Some(differ), r#"{"stock":1}"#).unwrap();
    b.put("inventory", Some(differ), r#"{"stock":2}"#).unwrap();
    for (from, to) in [(a, &hq), (b, &hq), (&hq, a), (&hq, b)] {
        exchange(from, to).unwrap();
    }
    for r in [&hq, a, b] {
        assert_eq!(r.get("inventory", id).unwrap()["stock"], 25, "not 50");
        assert_eq!(r.get("inventory", imported).unwrap()["stock"], 7, "not 14");
        assert_eq!(r.get("inventory", differ).unwrap()["stock"], 3);
    }
    let history = hq.history("inventory", id).unwrap();
    let creators: Vec<&str> = history
        .iter()
        .filter(|h| h.kind == "create")
        .map(|h| h.user.as_str())
        .collect();
    assert_eq!(
        creators.len(),
        2,
        "each creating device is on record: {history:?}"
    );
    let stock = history[0]
        .changes
        .iter()
        .find(|c| c.field == "stock")
        .expect("the creation shows the stock it set");
    assert_eq!(
        (stock.before.clone(), stock.after.clone()),
        (json!(null), json!(25))
    );
}

#[test]
fn the_later_of_two_offline_edits_wins_lww_whatever_the_actor_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = workspace(tmp.path(), &["a", "b"]).unwrap();
    let (a, b) = (&devices[0], &devices[1]);
    let id = EntityId(uuid::Uuid::now_v7());
    a.put(
        "tasks",
        Some(id),
        r#"{"title":"Fit boiler","assignee":"a"}"#,
    )
    .unwrap();
    exchange(a, &hq).unwrap();
    exchange(&hq, b).unwrap();
    // Two offline edits; whichever device writes second wins everywhere.
    for (first, second) in [(a, b), (b, a)] {
        first
            .put(
                "tasks",
                Some(id),
                &format!(r#"{{"title":"by {}"}}"#, first.peer_id()),
            )
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        second
            .put(
                "tasks",
                Some(id),
                &format!(r#"{{"title":"by {}"}}"#, second.peer_id()),
            )
            .unwrap();
        for (from, to) in [(a, &hq), (b, &hq), (&hq, a), (&hq, b)] {
            exchange(from, to).unwrap();
        }
        for r in [&hq, a, b] {
            assert_eq!(
                r.get("tasks", id).unwrap()["title"],
                json!(format!("by {}", second.peer_id()))
            );
        }
    }
}

#[test]
fn declared_fields_never_written_are_absent_from_the_view() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, _) = workspace(tmp.path(), &[]).unwrap();
    let id = hq.put("tasks", None, r#"{"title":"Survey"}"#).unwrap();
    let view = hq.get("tasks", id).unwrap();
    for field in ["tags", "notes", "progress", "status"] {
        assert!(
            view.get(field).is_none(),
            "{field} was never written: {view:?}"
        );
    }
    hq.put("tasks", Some(id), r#"{"tags":[]}"#).unwrap();
    assert_eq!(
        hq.get("tasks", id).unwrap()["tags"],
        json!([]),
        "written empty shows empty"
    );
}

#[test]
fn a_resolved_conflict_stays_on_record_with_its_alternatives_and_who_chose() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = workspace(tmp.path(), &["a", "b"]).unwrap();
    let (a, b) = (&devices[0], &devices[1]);
    let shift = EntityId(uuid::Uuid::now_v7());
    a.put("shifts", Some(shift), r#"{"who":"ana"}"#).unwrap();
    exchange(a, &hq).unwrap();
    exchange(&hq, b).unwrap();
    a.put("shifts", Some(shift), r#"{"start":"08:00"}"#)
        .unwrap();
    b.put("shifts", Some(shift), r#"{"start":"09:00"}"#)
        .unwrap();
    exchange(a, &hq).unwrap();
    exchange(b, &hq).unwrap();
    let open = hq.conflicts(false).unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    hq.resolve(&open[0].id, r#""08:30""#).unwrap();
    assert!(hq.conflicts(false).unwrap().is_empty());
    exchange(&hq, a).unwrap();
    for r in [&hq, a] {
        let all = r.conflicts(true).unwrap();
        let resolved: Vec<_> = all
            .iter()
            .filter(|c| c.state == fieldsync::core::ConflictState::Resolved)
            .collect();
        assert_eq!(resolved.len(), 1, "{all:?}");
        let res = resolved[0].resolution.as_ref().unwrap();
        assert_eq!(res.chosen, json!("08:30"));
        assert_eq!(res.user, "hq");
        let mut values = resolved[0].values.clone();
        values.sort_by_key(|v| v.to_string());
        assert_eq!(values, vec![json!("08:00"), json!("09:00")]);
        assert_eq!(r.get("shifts", shift).unwrap()["start"], "08:30");
    }
}
