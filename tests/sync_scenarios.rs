//! Seed-app scenarios through the real sync engine and real stores on the simulated network:
//! devices work apart, reconnect through the relay, and every node ends with the same views.

use fieldsync::sync::Event;
use fieldsync_tests::sim::{Faults, Network, NodeId};
use serde_json::json;

/// A relay and `n` devices, each connected to the relay.
fn star(seed: u64, faults: Faults, n: usize) -> (Network, NodeId, Vec<NodeId>) {
    let mut net = Network::new(seed, faults);
    let relay = net.add_relay("relay");
    let devices: Vec<NodeId> = (0..n)
        .map(|i| net.add_device(&format!("device{i}")))
        .collect();
    for d in &devices {
        net.connect(*d, relay);
    }
    net.run_until_quiescent();
    (net, relay, devices)
}

fn assert_converged(net: &Network, nodes: &[NodeId], collection: &str) {
    let reference = net.views(nodes[0], collection);
    for n in &nodes[1..] {
        assert_eq!(
            net.views(*n, collection),
            reference,
            "seed {}: {} differs from {} in {collection}",
            net.seed,
            net.name(*n),
            net.name(nodes[0])
        );
    }
}

#[test]
fn crm_task_completed_offline_wins_and_keeps_the_other_title() {
    // CRM: a task completed offline on one device while another edits its title and sets it
    // in progress → completed everywhere, with the other device's title; sets merged.
    let (mut net, relay, d) = star(1, Faults::hostile(), 2);
    let task = net.put(
        d[0],
        "tasks",
        None,
        r#"{"title":"Fit boiler","status":"open","tags":["boiler"]}"#,
    );
    net.run_until_quiescent();
    net.isolate(d[0]);
    net.isolate(d[1]);
    net.put(
        d[0],
        "tasks",
        Some(task),
        r#"{"status":"completed","tags":{"$add":["done"]}}"#,
    );
    net.put(
        d[1],
        "tasks",
        Some(task),
        r#"{"status":"in_progress","title":"Fit boiler, 2nd floor","tags":{"$add":["gas"]}}"#,
    );
    net.heal_all();
    net.run_until_quiescent();
    for n in [relay, d[0], d[1]] {
        let v = net.view(n, "tasks", task).expect("task everywhere");
        assert_eq!(v["status"], "completed", "{}", net.name(n));
        assert_eq!(v["title"], "Fit boiler, 2nd floor");
        assert_eq!(v["tags"], json!(["boiler", "done", "gas"]));
    }
    assert_converged(&net, &[relay, d[0], d[1]], "tasks");
}

#[test]
fn payment_recorded_offline_is_confirmed_by_the_relay_everywhere() {
    // Payments: a device records a payment offline (pending), the relay confirms it, every
    // device shows it confirmed; a device's later write to a confirmed field stays a proposal.
    let (mut net, relay, d) = star(2, Faults::hostile(), 3);
    net.isolate(d[0]);
    let payment = net.put(
        d[0],
        "payments",
        None,
        r#"{"amount":120,"status":"collected","payer":"Bakker"}"#,
    );
    assert_eq!(
        net.view(d[0], "payments", payment).unwrap()["_pending"]["amount"],
        120
    );
    net.heal_all();
    net.run_until_quiescent();
    let proposals = net.replica(relay).proposals().unwrap();
    assert_eq!(proposals.len(), 2);
    net.write(relay, |r| {
        for p in &proposals {
            r.accept(p.id).unwrap();
        }
    });
    net.run_until_quiescent();
    for n in &d {
        let v = net.view(*n, "payments", payment).unwrap();
        assert_eq!(
            (v["amount"].as_i64(), v["status"].as_str()),
            (Some(120), Some("collected")),
            "{}",
            net.name(*n)
        );
        assert!(v.get("_pending").is_none());
    }
    net.put(d[1], "payments", Some(payment), r#"{"amount":1}"#);
    net.run_until_quiescent();
    for n in [relay, d[0], d[1], d[2]] {
        let v = net.view(n, "payments", payment).unwrap();
        assert_eq!(
            (v["amount"].as_i64(), v["_pending"]["amount"].as_i64()),
            (Some(120), Some(1)),
            "{}",
            net.name(n)
        );
    }
}

#[test]
fn inventory_adjustments_on_several_devices_sum() {
    // Inventory: concurrent stock adjustments on several devices sum correctly.
    let (mut net, relay, d) = star(3, Faults::hostile(), 4);
    let item = net.put(relay, "inventory", None, r#"{"item":"valve","stock":100}"#);
    net.run_until_quiescent();
    for n in &d {
        net.isolate(*n);
    }
    let mut expected = 100;
    for (i, n) in d.iter().enumerate() {
        for k in 0..3 {
            let delta = (i as i64 + 1) * if k % 2 == 0 { -2 } else { 5 };
            expected += delta;
            net.put(
                *n,
                "inventory",
                Some(item),
                &format!(r#"{{"stock":{{"$inc":{delta}}}}}"#),
            );
        }
    }
    net.heal_all();
    net.run_until_quiescent();
    for n in std::iter::once(relay).chain(d.iter().copied()) {
        assert_eq!(
            net.view(n, "inventory", item).unwrap()["stock"],
            expected,
            "{}",
            net.name(n)
        );
    }
}

#[test]
fn schedule_overlap_opens_one_conflict_everywhere_and_one_resolve_closes_it() {
    // Schedule: concurrent edits of a manual field open one conflict on every node;
    // resolving it on one device closes it everywhere.
    let (mut net, relay, d) = star(4, Faults::hostile(), 3);
    let shift = net.put(relay, "shifts", None, r#"{"start":"08:00","who":"ana"}"#);
    net.run_until_quiescent();
    net.isolate(d[0]);
    net.isolate(d[1]);
    net.put(d[0], "shifts", Some(shift), r#"{"start":"09:00"}"#);
    net.put(d[1], "shifts", Some(shift), r#"{"start":"10:00"}"#);
    net.heal_all();
    net.run_until_quiescent();
    let conflicts: Vec<_> = [relay, d[0], d[1], d[2]]
        .iter()
        .map(|n| net.replica(*n).conflicts(false).unwrap())
        .collect();
    assert_eq!(conflicts[0].len(), 1);
    assert!(
        conflicts.iter().all(|c| *c == conflicts[0]),
        "every node lists the same conflict"
    );
    let id = conflicts[0][0].id.clone();
    net.write(d[2], |r| r.resolve(&id, "\"09:30\"").unwrap());
    net.run_until_quiescent();
    for n in [relay, d[0], d[1], d[2]] {
        assert!(
            net.replica(n).conflicts(false).unwrap().is_empty(),
            "{} still has it",
            net.name(n)
        );
        assert_eq!(net.view(n, "shifts", shift).unwrap()["start"], "09:30");
    }
}

#[test]
fn update_against_delete_under_both_policies_and_offline_creates() {
    // A delete concurrent with an update: tasks (delete_wins) stay deleted, shifts
    // (update_wins) revive; entities created on two devices offline all arrive everywhere.
    let (mut net, relay, d) = star(5, Faults::hostile(), 2);
    let task = net.put(relay, "tasks", None, r#"{"title":"t"}"#);
    let shift = net.put(relay, "shifts", None, r#"{"start":"08:00"}"#);
    net.run_until_quiescent();
    net.isolate(d[0]);
    net.isolate(d[1]);
    net.write(d[0], |r| {
        r.delete("tasks", task).unwrap();
        r.delete("shifts", shift).unwrap();
    });
    net.put(d[1], "tasks", Some(task), r#"{"title":"edited"}"#);
    net.put(d[1], "shifts", Some(shift), r#"{"start":"11:00"}"#);
    let a = net.put(d[0], "tasks", None, r#"{"title":"from device0"}"#);
    let b = net.put(d[1], "tasks", None, r#"{"title":"from device1"}"#);
    net.heal_all();
    net.run_until_quiescent();
    for n in [relay, d[0], d[1]] {
        assert_eq!(
            net.view(n, "tasks", task).unwrap()["_deleted"],
            true,
            "{}",
            net.name(n)
        );
        let s = net.view(n, "shifts", shift).unwrap();
        assert!(s.get("_deleted").is_none(), "update_wins revives: {s:?}");
        assert_eq!(s["start"], "11:00");
        assert!(net.view(n, "tasks", a).is_some() && net.view(n, "tasks", b).is_some());
    }
    assert_converged(&net, &[relay, d[0], d[1]], "tasks");
    assert_converged(&net, &[relay, d[0], d[1]], "shifts");
}

#[test]
fn a_device_offline_for_10000_changes_catches_up_from_its_checkpoint() {
    // A device offline while others make 10,000 changes rejoins and catches up from its
    // checkpoint: only the changed entities travel, not everything stored.
    let (mut net, relay, d) = star(6, Faults::none(), 2);
    let lines: String = (0..2000)
        .map(|i| format!("{{\"title\":\"old {i}\"}}\n"))
        .collect();
    net.write(relay, |r| {
        r.bulk_import("tasks", &lines, &mut |_, _| {}).unwrap()
    });
    net.run_until_quiescent();
    assert_eq!(net.views(d[0], "tasks").len(), 2000);

    net.isolate(d[0]);
    let jsonl: String = (0..10_000)
        .map(|i| format!("{{\"title\":\"new {i}\",\"status\":\"open\"}}\n"))
        .collect();
    net.write(d[1], |r| {
        r.bulk_import("tasks", &jsonl, &mut |_, _| {}).unwrap()
    });
    net.run_until_quiescent();
    let before = net.traffic;
    net.heal_all();
    net.run_until_quiescent();
    let catch_up = net.traffic.bytes - before.bytes;
    assert_eq!(net.views(d[0], "tasks").len(), 12_000);
    assert_converged(&net, &[relay, d[0], d[1]], "tasks");
    let started = net.events(d[0]).iter().rev().find_map(|e| match e {
        Event::SyncStarted { peer, total, .. } if *peer == net.replica(relay).peer_id() => {
            Some(*total)
        }
        _ => None,
    });
    // The relay's feed holds 12,000 entries; the device resumed after the first 2,000.
    assert_eq!(
        started,
        Some(10_000),
        "catch-up did not start from the checkpoint"
    );
    println!("catch-up of 10,000 new entities: {catch_up} bytes");
}

#[test]
fn a_crash_mid_sync_resumes_where_it_stopped_and_loses_nothing() {
    // Crash mid-sync on either side; the sync resumes from the checkpoint and nothing
    // acknowledged is lost.
    for crash_relay in [false, true] {
        let mut net =
            Network::new(7, Faults::none()).with_limits(fieldsync::core::protocol::Limits {
                page_entities: 50,
                ..Default::default()
            });
        let relay = net.add_relay("relay");
        let device = net.add_device("device");
        let lines: String = (0..1000)
            .map(|i| format!("{{\"title\":\"t{i}\"}}\n"))
            .collect();
        net.write(relay, |r| {
            r.bulk_import("tasks", &lines, &mut |_, _| {}).unwrap()
        });
        net.connect(device, relay);
        net.run_steps(40);
        let partial = net.views(device, "tasks").len();
        assert!(
            partial > 0 && partial < 1000,
            "the crash must hit mid-sync ({partial} synced)"
        );
        let victim = if crash_relay { relay } else { device };
        net.crash(victim);
        net.restart(victim);
        net.run_until_quiescent();
        assert_eq!(net.views(device, "tasks").len(), 1000);
        assert_converged(&net, &[relay, device], "tasks");
        let totals: Vec<u64> = net
            .events(device)
            .iter()
            .filter_map(|e| match e {
                Event::SyncStarted { total, .. } => Some(*total),
                _ => None,
            })
            .collect();
        let resumed = *totals.last().unwrap();
        assert!(
            resumed < 1000 && resumed + partial as u64 >= 1000,
            "resumed with {resumed} to go after {partial} synced (crash relay: {crash_relay})"
        );
    }
}
