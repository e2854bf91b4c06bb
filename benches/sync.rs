//! Sync benchmark on the simulator with the network at zero latency and memory stores (so
//! it measures the engine and Automerge without the disk; `--bench network` measures the
//! real thing over libp2p and sled): first sync of 10,000 and 100,000 entities from the
//! relay to a new device, and reconnect after 10 changed entities among 10,000 and among
//! 100,000.
//!
//! Run: `cargo bench -p fieldsync-tests --bench sync` (env `BENCH_SIZES=10000,100000`).

use std::time::Instant;

use fieldsync_tests::sim::{Faults, Network, NodeId};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Figures {
    seconds: f64,
    frames: u64,
    bytes: u64,
}

/// With `PERF_CTL=FIFO` (and `perf record --control fifo:FIFO -D -1`), perf records only
/// while a first sync runs: see docs/performance.md.
fn perf_ctl(cmd: &str) {
    if let Ok(fifo) = std::env::var("PERF_CTL") {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .open(fifo)
            .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{cmd}\n").as_bytes()));
    }
}

fn measure(net: &mut Network, start: impl FnOnce(&mut Network)) -> Figures {
    let before = net.traffic;
    let t = Instant::now();
    start(net);
    net.run_until_quiescent();
    Figures {
        seconds: t.elapsed().as_secs_f64(),
        frames: net.traffic.frames - before.frames,
        bytes: net.traffic.bytes - before.bytes,
    }
}

fn scenario(n: usize) -> (Figures, Figures) {
    let mut net = Network::new(1, Faults::none());
    let relay = net.add_relay("relay");
    let device: NodeId = net.add_device("device");
    let lines: String = (0..n)
        .map(|i| fieldsync_tests::ten_field_task(i) + "\n")
        .collect();
    net.replica(relay)
        .bulk_import("tasks", &lines, &mut |_, _| {})
        .expect("import");
    perf_ctl("enable");
    let first = measure(&mut net, |net| net.connect(device, relay));
    perf_ctl("disable");
    assert_eq!(net.views(device, "tasks").len(), n, "first sync incomplete");

    net.isolate(device);
    net.run_until_quiescent();
    let ids: Vec<_> = net
        .views(relay, "tasks")
        .iter()
        .take(10)
        .map(|v| v["_id"].as_str().unwrap().parse().unwrap())
        .collect();
    for id in ids {
        net.put(relay, "tasks", Some(id), r#"{"status":"completed"}"#);
    }
    let reconnect = measure(&mut net, |net| net.heal_all());
    (first, reconnect)
}

fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000]);
    println!("| benchmark | time | frames | bytes | target |");
    println!("|---|---|---|---|---|");
    let mut reconnects = Vec::new();
    for n in sizes {
        let (first, reconnect) = scenario(n);
        let target = match n {
            10_000 => "≤ 0.7 s",
            100_000 => "≤ 7 s",
            _ => "",
        };
        println!(
            "| first sync, {n} entities relay → new device | {:.2} s | {} | {} | {target} |",
            first.seconds, first.frames, first.bytes
        );
        println!(
            "| reconnect, 10 changed among {n} | {:.1} ms | {} | {} | ≤ 20 KB, ≤ 100 ms |",
            reconnect.seconds * 1000.0,
            reconnect.frames,
            reconnect.bytes
        );
        reconnects.push((n, reconnect));
    }
    if let [(small, a), .., (large, b)] = reconnects.as_slice() {
        println!(
            "| reconnect cost ratio, {large} vs {small} | {:.2}× time | | {:.2}× bytes | ≤ 1.2× |",
            b.seconds / a.seconds,
            b.bytes as f64 / a.bytes as f64
        );
    }
}
