//! Payments seed scenario over the real network: a collector records a payment with no
//! signal (pending); when it reaches the relay (the authority) the office confirms it and
//! every device shows it confirmed; a device's later change to the amount stays a proposal.
//!
//! Run: `cargo run --example payments_over_network`

use fieldsync::core::protocol::Role;
use fieldsync_tests::live::{replicas, until, LiveNode};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hq, devices) = replicas(tmp.path(), &["collector", "supervisor"])?;
    let relay = LiveNode::start("relay", hq, Role::Relay, &[]).await?;
    let dial = [relay.addr.clone()];
    let supervisor = LiveNode::start("supervisor", devices[1].clone(), Role::Device, &dial).await?;

    // No signal: the collector works offline.
    let collector = devices[0].clone();
    let payment = collector.put(
        "payments",
        None,
        r#"{"amount":250,"status":"collected","payer":"Jansen"}"#,
    )?;
    println!(
        "collector, offline: {}",
        serde_json::Value::Object(collector.get("payments", payment)?)
    );

    let collector = LiveNode::start("collector", collector, Role::Device, &dial).await?;
    until("the relay has the proposals", || {
        relay.replica.proposals().is_ok_and(|p| p.len() == 2)
    })
    .await?;
    for p in relay.replica.proposals()? {
        relay.replica.accept(p.id)?;
    }
    relay.handle.local_change().await;
    let confirmed = |v: &fieldsync::View| {
        v.get("amount").is_some_and(|a| a == 250) && v.get("_pending").is_none()
    };
    until("confirmed everywhere", || {
        [&collector, &supervisor].iter().all(|n| {
            n.replica
                .get("payments", payment)
                .is_ok_and(|v| confirmed(&v))
        })
    })
    .await?;
    println!(
        "supervisor sees:    {}",
        serde_json::Value::Object(supervisor.replica.get("payments", payment)?)
    );

    collector
        .put("payments", Some(payment), r#"{"amount":25}"#)
        .await?;
    until("the change reaches the relay as a proposal", || {
        relay.replica.proposals().is_ok_and(|p| p.len() == 1)
    })
    .await?;
    let v = relay.replica.get("payments", payment)?;
    assert_eq!(
        (v["amount"].as_i64(), v["_pending"]["amount"].as_i64()),
        (Some(250), Some(25))
    );
    println!("after a device edit: {}", serde_json::Value::Object(v));
    Ok(())
}
