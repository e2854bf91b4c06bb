//! The main job, end to end on the embedded store: an office (the workspace authority) and
//! two field devices work apart, then merge by exchanging bundle files — no conflict code.
//!
//! Run: `cargo run --example offline_merge` (add `-- DIR` to keep the data directories).

use anyhow::Result;
use fieldsync::Replica;
use fieldsync_tests::{exchange, workspace};

fn show(label: &str, node: &Replica, collection: &str, id: fieldsync::EntityId) -> Result<()> {
    println!(
        "  {label:<6} {}",
        serde_json::Value::Object(node.get(collection, id)?)
    );
    Ok(())
}

fn main() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_owned());
    let (hq, devices) = workspace(&root, &["ana", "ben"])?;
    let (ana, ben) = (&devices[0], &devices[1]);
    println!(
        "workspace {} — authority {}, devices ana and ben\n",
        hq.workspace().id,
        hq.peer_id()
    );

    // The office plans the work and hands it out.
    let task = hq.put(
        "tasks",
        None,
        r#"{"title":"Fit boiler","status":"open","tags":["boiler"],"progress":0}"#,
    )?;
    let stock = hq.put("inventory", None, r#"{"item":"valve","stock":10}"#)?;
    let shift = hq.put("shifts", None, r#"{"start":"08:00","who":"ana"}"#)?;
    exchange(&hq, ana)?;
    exchange(&hq, ben)?;
    println!("1. everyone has the plan; now the network goes away.\n");

    // Apart, each does their job.
    ana.put(
        "tasks",
        Some(task),
        r#"{"status":"completed","progress":100,"tags":{"$add":["done-by-ana"]}}"#,
    )?;
    ana.put("inventory", Some(stock), r#"{"stock":{"$inc":-2}}"#)?;
    ana.put("shifts", Some(shift), r#"{"start":"09:00"}"#)?;
    let payment = ana.put(
        "payments",
        None,
        r#"{"amount":120,"status":"collected","customer":"Bakker"}"#,
    )?;
    ben.put("tasks", Some(task), r#"{"status":"in_progress","title":"Fit boiler (2nd floor)","tags":{"$add":["gas"]},"progress":40}"#)?;
    ben.put("inventory", Some(stock), r#"{"stock":{"$inc":-3}}"#)?;
    hq.put("shifts", Some(shift), r#"{"start":"10:00"}"#)?;
    hq.put("inventory", Some(stock), r#"{"stock":{"$inc":20}}"#)?;
    println!("2. offline edits:");
    show("ana", ana, "tasks", task)?;
    show("ben", ben, "tasks", task)?;
    show("ana", ana, "payments", payment)?;
    println!();

    // Bundles travel (USB stick, email, a later connection) in any order.
    for _ in 0..2 {
        exchange(ana, &hq)?;
        exchange(ben, &hq)?;
        exchange(&hq, ana)?;
        exchange(&hq, ben)?;
    }
    println!("3. merged — completed wins, ben's title kept, tags and stock add up:");
    for (label, node) in [("hq", &hq), ("ana", ana), ("ben", ben)] {
        show(label, node, "tasks", task)?;
    }
    show("hq", &hq, "inventory", stock)?;
    println!("   the payment is a proposal until the office confirms it:");
    show("hq", &hq, "payments", payment)?;
    for p in hq.proposals()? {
        hq.accept(p.id)?;
    }
    println!("   the shift times clashed; that one needs a person:");
    for c in hq.conflicts(false)? {
        println!(
            "  conflict {} on {}.{}: {:?}",
            c.id, c.collection, c.field, c.values
        );
        hq.resolve(&c.id, "\"09:30\"")?;
    }
    exchange(&hq, ana)?;
    exchange(&hq, ben)?;
    println!("\n4. after the office confirmed the payment and settled the shift:");
    show("ana", ana, "payments", payment)?;
    show("ben", ben, "shifts", shift)?;
    assert_eq!(ana.get("tasks", task)?, ben.get("tasks", task)?);
    assert_eq!(hq.get("shifts", shift)?, ana.get("shifts", shift)?);
    println!("\nall three nodes show identical views.");
    Ok(())
}
