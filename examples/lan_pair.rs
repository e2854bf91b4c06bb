//! LAN pair: two devices sync directly with each other over libp2p (TCP, noise, yamux) on
//! 127.0.0.1 — no relay. (On a real LAN, `fieldsync run --mdns` finds the peer by itself;
//! mDNS is opt-in and is exercised in network namespaces by `node/tests/lan_mdns.rs`.)
//!
//! Run: `cargo run --example lan_pair`

use fieldsync::core::protocol::Role;
use fieldsync_tests::live::{replicas, until, LiveNode};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (_hq, devices) = replicas(tmp.path(), &["till", "kitchen"])?;
    let till = LiveNode::start("till", devices[0].clone(), Role::Device, &[]).await?;
    let kitchen = LiveNode::start(
        "kitchen",
        devices[1].clone(),
        Role::Device,
        std::slice::from_ref(&till.addr),
    )
    .await?;
    println!("till listens on {}\nkitchen dials it directly", till.addr);

    let order = till
        .put(
            "orders",
            None,
            r#"{"table":4,"items":["soup","bread"],"note":"no onions"}"#,
        )
        .await?;
    until("the order reaches the kitchen", || {
        kitchen.replica.get("orders", order).is_ok()
    })
    .await?;
    println!(
        "kitchen sees: {}",
        serde_json::Value::Object(kitchen.replica.get("orders", order)?)
    );

    kitchen
        .put(
            "orders",
            Some(order),
            r#"{"note":"no onions, extra bread"}"#,
        )
        .await?;
    until("the edit comes back", || {
        till.replica
            .get("orders", order)
            .is_ok_and(|v| v["note"] == "no onions, extra bread")
    })
    .await?;
    println!(
        "till sees:    {}",
        serde_json::Value::Object(till.replica.get("orders", order)?)
    );
    assert_eq!(
        till.replica.get("orders", order)?,
        kitchen.replica.get("orders", order)?
    );
    println!("both devices show the same order.");
    Ok(())
}
