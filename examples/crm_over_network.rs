//! CRM seed scenario over the real network: an installer completes a task offline while a
//! colleague retitles it and sets it in progress; when the installer reconnects to the relay,
//! every device shows it completed, with the colleague's title and both sets of tags.
//!
//! Run: `cargo run --example crm_over_network`

use fieldsync::core::protocol::Role;
use fieldsync_tests::live::{replicas, until, LiveNode};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hq, devices) = replicas(tmp.path(), &["installer", "planner"])?;
    let relay = LiveNode::start("relay", hq, Role::Relay, &[]).await?;
    let dial = [relay.addr.clone()];
    let installer = LiveNode::start("installer", devices[0].clone(), Role::Device, &dial).await?;
    let planner = LiveNode::start("planner", devices[1].clone(), Role::Device, &dial).await?;

    let task = planner
        .put(
            "tasks",
            None,
            r#"{"title":"Fit boiler","status":"open","tags":["boiler"]}"#,
        )
        .await?;
    until("the installer has the task", || {
        installer.replica.get("tasks", task).is_ok()
    })
    .await?;

    let offline = installer.stop().await;
    offline.put(
        "tasks",
        Some(task),
        r#"{"status":"completed","progress":100,"tags":{"$add":["photo-taken"]}}"#,
    )?;
    planner
        .put(
            "tasks",
            Some(task),
            r#"{"status":"in_progress","title":"Fit boiler (2nd floor)","tags":{"$add":["gas"]}}"#,
        )
        .await?;
    println!(
        "installer (offline): {}",
        serde_json::Value::Object(offline.get("tasks", task)?)
    );
    println!(
        "planner  (online):   {}",
        serde_json::Value::Object(planner.replica.get("tasks", task)?)
    );

    let installer = LiveNode::start("installer", offline, Role::Device, &dial).await?;
    let done = |v: &fieldsync::View| {
        v["status"] == "completed"
            && v["title"] == "Fit boiler (2nd floor)"
            && v["tags"].as_array().is_some_and(|t| t.len() == 3)
    };
    until("the merge everywhere", || {
        [&relay, &installer, &planner]
            .iter()
            .all(|n| n.replica.get("tasks", task).is_ok_and(|v| done(&v)))
    })
    .await?;
    println!(
        "merged everywhere:   {}",
        serde_json::Value::Object(relay.replica.get("tasks", task)?)
    );
    Ok(())
}
