//! Many devices through one relay whose document cache holds only a few documents: every
//! device creates entities and edits shared ones, and all of them converge to the same
//! entities and values. (The `scale` benchmark runs the same with 50 × 1,000 and measures it.)

use std::sync::Arc;
use std::time::Duration;

use fieldsync::core::protocol::Role;
use fieldsync::{MemoryOptions, Replica};
use fieldsync_tests::live::LiveNode;
use fieldsync_tests::load::{run, Spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_converge_through_a_relay_with_a_tiny_cache() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // About three documents' worth: the relay loads most documents on demand.
    let hq = Replica::init_authority(&tmp.path().join("relay"), fieldsync_tests::SCHEMA, "relay")?
        .with_doc_cache_bytes(32 << 10);
    let lines: String = (0..4)
        .map(|i| fieldsync_tests::ten_field_task(i) + "\n")
        .collect();
    hq.bulk_import("tasks", &lines, &mut |_, _| {})?;
    let mut shared: Vec<fieldsync::EntityId> = Vec::new();
    hq.list("tasks", &[], false, &mut |v| {
        shared.extend(
            v["_id"]
                .as_str()
                .and_then(|s| s.parse::<fieldsync::EntityId>().ok()),
        );
        true
    })?;

    let relay = LiveNode::start("relay", Arc::new(hq), Role::Relay, &[]).await?;
    let spec = Spec {
        devices: 50,
        owned: 5,
        edits: 2,
        memory: MemoryOptions {
            doc_cache_bytes: 64 << 10,
            store_cache_bytes: 1 << 20,
        },
        timeout: Duration::from_secs(300),
    };
    let outcome = match run(
        tmp.path(),
        &mut || Ok(relay.replica.invite()),
        &relay.addr,
        &shared,
        &spec,
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(e) => anyhow::bail!(
            "{e:#}\nthe relay: {}; its shared entities: {}",
            relay.describe(),
            fieldsync_tests::load::shared_report(&relay.replica, &shared)
        ),
    };
    assert_eq!(outcome.entities, 4 + 50 * 5);
    assert_eq!(relay.replica.status()?.entities["tasks"], 4 + 50 * 5);
    let (_, bytes) = relay.replica.doc_cache_usage();
    assert!(
        bytes <= 32 << 10,
        "the relay's cache holds {bytes} bytes, over its bound"
    );
    relay.stop().await;
    Ok(())
}
