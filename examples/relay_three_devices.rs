//! Relay deployment: an always-on relay (the workspace authority) and three devices that
//! only know the relay. Each device writes, one goes offline and keeps working, and after it
//! reconnects all four nodes hold the same data.
//!
//! Run: `cargo run --example relay_three_devices`

use fieldsync::core::protocol::Role;
use fieldsync_tests::live::{replicas, until, LiveNode};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hq, devices) = replicas(tmp.path(), &["ana", "ben", "cas"])?;
    let relay = LiveNode::start("relay", hq, Role::Relay, &[]).await?;
    let dial = [relay.addr.clone()];
    let mut nodes = Vec::new();
    for (name, r) in ["ana", "ben", "cas"].iter().zip(&devices) {
        nodes.push(LiveNode::start(name, r.clone(), Role::Device, &dial).await?);
    }
    println!("relay at {}; three devices connected", relay.addr);

    let stock = nodes[0]
        .put("inventory", None, r#"{"item":"valve","stock":50}"#)
        .await?;
    until("the item reaches every device", || {
        nodes
            .iter()
            .all(|n| n.replica.get("inventory", stock).is_ok())
    })
    .await?;

    // Cas goes offline and keeps working; the others keep syncing through the relay.
    let cas = nodes.pop().expect("cas").stop().await;
    cas.put("inventory", Some(stock), r#"{"stock":{"$inc":-5}}"#)?;
    nodes[0]
        .put("inventory", Some(stock), r#"{"stock":{"$inc":-2}}"#)
        .await?;
    nodes[1]
        .put("inventory", Some(stock), r#"{"stock":{"$inc":10}}"#)
        .await?;
    println!("cas is offline and took 5; ana took 2; ben added 10");

    let cas = LiveNode::start("cas", cas, Role::Device, &dial).await?;
    nodes.push(cas);
    until("everyone agrees on 53", || {
        relay
            .replica
            .get("inventory", stock)
            .is_ok_and(|v| v["stock"] == 53)
            && nodes.iter().all(|n| {
                n.replica
                    .get("inventory", stock)
                    .is_ok_and(|v| v["stock"] == 53)
            })
    })
    .await?;
    for n in std::iter::once(&relay).chain(&nodes) {
        println!(
            "  {:<6} stock = {}",
            n.name,
            n.replica.get("inventory", stock)?["stock"]
        );
    }
    println!("all four nodes agree.");
    Ok(())
}
