//! Hostile peers over real libp2p connections on 127.0.0.1: a stranger and a flooding
//! member are refused, counted, banned for a while, and honest data stays intact.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fieldsync::core::protocol::Role;
use fieldsync::Replica;
use fieldsync_tests::live::{until, LiveNode};
use fieldsync_tests::SCHEMA;

fn count(r: &Replica) -> u64 {
    r.status()
        .ok()
        .and_then(|s| s.entities.get("tasks").and_then(|v| v.as_u64()))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_and_a_flooding_member_are_refused_banned_and_counted() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hq = Arc::new(Replica::init_authority(
        &tmp.path().join("hq"),
        SCHEMA,
        "hq",
    )?);
    for i in 0..300 {
        hq.put("tasks", None, &format!(r#"{{"title":"t{i}"}}"#))?;
    }
    // The relay takes at most 2 frames a second from a peer (bursts of 4): a sync session
    // sends more than that at once, so here any session is a flood.
    let relay = LiveNode::start_with("relay", hq.clone(), Role::Relay, &[], |c| {
        c.max_frames_per_sec = 2;
        c.ban = Duration::from_secs(600);
    })
    .await?;
    let security = relay.handle.stats.security.clone();
    let dial = [relay.addr.clone()];

    // A stranger: knows the workspace, has no invite.
    let bare = {
        let mut v: serde_json::Value = serde_json::from_slice(&hq.invite())?;
        v.as_object_mut()
            .map(|o| (o.remove("token"), o.remove("token_secret")));
        serde_json::to_vec(&v)?
    };
    let stranger = Arc::new(Replica::init_join(
        &tmp.path().join("stranger"),
        &bare,
        "stranger",
    )?);
    let s = LiveNode::start("stranger", stranger.clone(), Role::Device, &dial).await?;
    until("the stranger is refused and banned", || {
        security.sessions_refused.load(Ordering::Relaxed) >= 1
            && security.peers_banned.load(Ordering::Relaxed) >= 1
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&stranger), 0, "entity data reached a stranger");
    s.stop().await;

    // A member whose device sends more than 2 frames a second.
    let flooder = Arc::new(Replica::init_join(
        &tmp.path().join("flooder"),
        &hq.invite(),
        "flooder",
    )?);
    for i in 0..400 {
        flooder.put("tasks", None, &format!(r#"{{"title":"f{i}"}}"#))?;
    }
    let f = LiveNode::start_with("flooder", flooder.clone(), Role::Device, &dial, |c| {
        c.max_backoff = Duration::from_millis(500);
        c.max_frames_per_sec = 1_000_000;
    })
    .await?;
    until("the flood is cut off", || {
        security.floods.load(Ordering::Relaxed) >= 1
    })
    .await?;
    until("the flooder is banned too", || {
        security.peers_banned.load(Ordering::Relaxed) >= 2
    })
    .await?;
    let at_ban = count(&hq);
    // Banned: its redials are refused, so nothing more arrives from it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&hq), at_ban, "a banned peer kept syncing");
    assert!(at_ban >= 300, "the relay's own data is intact");
    // What the relay holds is whole and readable.
    let mut n = 0;
    hq.list("tasks", &[], false, &mut |v| {
        assert!(v["title"].is_string());
        n += 1;
        true
    })?;
    assert_eq!(n as u64, at_ban);
    f.stop().await;
    relay.stop().await;
    Ok(())
}
