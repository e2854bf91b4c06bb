//! Sync benchmark over libp2p on 127.0.0.1 with sled on both ends: first sync relay → new
//! device, reconnect after 10 changed entities, and live latency device → relay → device.
//!
//! Run: `cargo bench -p fieldsync-tests --bench network` (env `BENCH_SIZES=10000,100000`,
//! `BENCH_LIVE_WRITES=200`). Each first sync is printed beside its Automerge floor, measured
//! in the same run: `save()` and `load()` of each of the same documents with Automerge
//! alone, on one core, with no IO — what any Automerge-based sync must at least do.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync::core::protocol::Role;
use fieldsync::Replica;
use fieldsync_tests::floors;
use fieldsync_tests::live::{until, LiveNode};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn count(r: &Replica) -> u64 {
    r.status()
        .ok()
        .and_then(|s| s.entities.get("tasks").and_then(|v| v.as_u64()))
        .unwrap_or(0)
}

fn received(n: &LiveNode) -> u64 {
    n.handle.stats.bytes_received.load(Ordering::Relaxed)
}

/// A row for scripts/bench-report.
fn report(metric: &str, figure: &str, target: &str, meets: bool) {
    fieldsync_tests::report(metric, figure, target, Some(meets));
}

/// Seconds to `save()` and `load()` `n` of the same tasks with Automerge alone.
fn automerge_floor(n: usize) -> anyhow::Result<f64> {
    let docs = (0..n)
        .map(|i| floors::automerge_doc(&fieldsync_tests::ten_field_task(i)))
        .collect();
    Ok(floors::save_load_seconds(docs)?)
}

async fn sizes(n: usize) -> anyhow::Result<(f64, f64)> {
    let tmp = tempfile::tempdir()?;
    let hq = Arc::new(Replica::init_authority(
        &tmp.path().join("relay"),
        fieldsync_tests::SCHEMA,
        "relay",
    )?);
    let device = Arc::new(Replica::init_join(
        &tmp.path().join("device"),
        &hq.invite(),
        "device",
    )?);
    let lines: String = (0..n)
        .map(|i| fieldsync_tests::ten_field_task(i) + "\n")
        .collect();
    hq.bulk_import("tasks", &lines, &mut |_, _| {})?;
    let relay = LiveNode::start("relay", hq, Role::Relay, &[]).await?;
    let dial = [relay.addr.clone()];

    let t = Instant::now();
    let node = LiveNode::start("device", device, Role::Device, &dial).await?;
    // Counting scans every view: only once the feed could hold them all (cheap to read).
    until("first sync", || {
        node.replica.feed_seq() >= n as u64 && count(&node.replica) == n as u64
    })
    .await?;
    let first = t.elapsed();
    let first_bytes = received(&node);
    let floor = automerge_floor(n)?;
    let ratio = first.as_secs_f64() / floor;
    println!(
        "| first sync, {n} entities relay → new device | {:.2} s (Automerge floor {floor:.2} s, {ratio:.1}×) | {:.1} MB | ≤ 2.0× floor |",
        first.as_secs_f64(),
        first_bytes as f64 / 1e6,
    );
    report(
        &format!("first sync, {n} entities relay → new device (libp2p)"),
        &format!(
            "{:.2} s, {:.1} MB; Automerge save+load floor {floor:.2} s: {ratio:.1}×",
            first.as_secs_f64(),
            first_bytes as f64 / 1e6
        ),
        "≤ 2.0× the floor",
        ratio <= 2.0,
    );

    // Reconnect after 10 changes made while the device was away.
    let device = node.stop().await;
    let mut ids = Vec::new();
    relay.replica.list("tasks", &[], false, &mut |v| {
        ids.extend(
            v["_id"]
                .as_str()
                .and_then(|s| s.parse::<fieldsync::EntityId>().ok()),
        );
        ids.len() < 10
    })?;
    for id in &ids {
        relay
            .put("tasks", Some(*id), r#"{"status":"completed"}"#)
            .await?;
    }
    let seq = relay.replica.status()?.feed_seq;
    let t = Instant::now();
    let node = LiveNode::start("device", device, Role::Device, &dial).await?;
    // Polled every millisecond: `until` polls every 50 ms, coarser than the figure.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ids.iter().all(|id| {
        node.replica
            .get("tasks", *id)
            .is_ok_and(|v| v["status"] == "completed")
    }) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reconnect did not finish in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let reconnect = t.elapsed();
    println!(
        "| reconnect, 10 changed among {n} (relay feed at {seq}) | {:.1} ms | {:.1} KB | ≤ 20 ms, ≤ 4 KB |",
        reconnect.as_secs_f64() * 1000.0,
        received(&node) as f64 / 1e3
    );
    let kb = received(&node) as f64 / 1e3;
    report(
        &format!("reconnect, 10 changed among {n} (libp2p)"),
        &format!("{:.1} ms, {kb:.1} KB", reconnect.as_secs_f64() * 1000.0),
        "≤ 20 ms, ≤ 4 KB",
        reconnect.as_secs_f64() <= 0.02 && kb <= 4.0,
    );
    node.stop().await;
    relay.stop().await;
    Ok((reconnect.as_secs_f64(), kb))
}

async fn live(writes: usize) -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hq, devices) = fieldsync_tests::live::replicas(tmp.path(), &["a", "b"])?;
    let relay = LiveNode::start("relay", hq, Role::Relay, &[]).await?;
    let dial = [relay.addr.clone()];
    let a = LiveNode::start("a", devices[0].clone(), Role::Device, &dial).await?;
    let b = LiveNode::start("b", devices[1].clone(), Role::Device, &dial).await?;
    let warm = a.put("tasks", None, r#"{"title":"warm-up"}"#).await?;
    until("warm-up", || b.replica.get("tasks", warm).is_ok()).await?;
    let mut samples = Vec::with_capacity(writes);
    for i in 0..writes {
        let t = Instant::now();
        let id = a
            .put("tasks", None, &format!(r#"{{"title":"live {i}"}}"#))
            .await?;
        while b.replica.get("tasks", id).is_err() {
            tokio::time::sleep(Duration::from_micros(200)).await;
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "write {i} never arrived"
            );
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
    println!("| live latency device → relay → device, {writes} writes (incl. the durable local write) | p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms | | p50 ≤ 5 ms, p99 ≤ 10 ms |", p(0.5), p(0.9), p(0.99));
    report(
        &format!("live latency device → relay → device, {writes} writes"),
        &format!(
            "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
            p(0.5),
            p(0.9),
            p(0.99)
        ),
        "p50 ≤ 5 ms, p99 ≤ 10 ms",
        p(0.5) <= 5.0 && p(0.99) <= 10.0,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sizes_env: Vec<usize> = std::env::var("BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000]);
    let writes: usize = std::env::var("BENCH_LIVE_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    println!(
        "| benchmark (libp2p on 127.0.0.1, sled both ends) | time | received by device | target |"
    );
    println!("|---|---|---|---|");
    let mut reconnects = Vec::new();
    for n in sizes_env {
        reconnects.push((n, sizes(n).await?));
    }
    if let [(small, (ta, ba)), .., (large, (tb, bb))] = reconnects.as_slice() {
        report(
            &format!("reconnect cost, 10 changed among {large} vs among {small}"),
            &format!(
                "{:.2}× time ({:.0} vs {:.0} ms), {:.2}× bytes",
                tb / ta,
                tb * 1000.0,
                ta * 1000.0,
                bb / ba
            ),
            "≈ same: ≤ 1.2× bytes, both ≤ 100 ms",
            bb / ba <= 1.2 && *ta <= 0.1 && *tb <= 0.1,
        );
    }
    live(writes).await
}
