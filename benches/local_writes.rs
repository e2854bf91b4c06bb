//! Local write benchmark: acknowledged (durable) single-entity writes per second with
//! concurrent writers sharing flushes, and the bulk-import rate.
//!
//! Run: `cargo bench -p fieldsync-tests --bench local_writes` (env `BENCH_ENTITIES` sets the bulk
//! size, default 100000; `BENCH_SECONDS` the length of each write run, default 3). Each
//! figure is measured on a plain store and on one encrypted at rest (`init --encrypt`,
//! here with a key file so key derivation is not timed). The bulk import is printed beside
//! its floor from the same run: Automerge alone creating and saving the same documents on
//! two threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fieldsync::Replica;
use fieldsync_tests::floors::ten_fields;

// The allocator the `fieldsync` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCHEMA: &str = r#"
[collections.tasks.fields]
status   = { rule = "rank", order = ["open", "in_progress", "completed"] }
progress = { rule = "max" }
tags     = { rule = "set" }
"#;

fn new_replica(dir: &std::path::Path, encrypted: bool) -> Replica {
    let secret = encrypted.then(|| fieldsync::Secret::KeyFile(vec![42; 32]));
    Replica::init_authority_with(
        &dir.join("n"),
        SCHEMA,
        "bench",
        libp2p_identity::ed25519::Keypair::generate(),
        secret.as_ref(),
    )
    .expect("init")
}

fn writes_per_second(writers: usize, seconds: f64, encrypted: bool) -> (f64, u64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let replica = new_replica(tmp.path(), encrypted);
    let done = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    std::thread::scope(|s| {
        for w in 0..writers {
            let (replica, done) = (&replica, &done);
            s.spawn(move || {
                // Each writer creates one entity, then keeps updating a small rotating set.
                let mut ids = Vec::new();
                let mut i = 0usize;
                while Instant::now() < deadline {
                    let target = if ids.len() < 8 {
                        None
                    } else {
                        Some(ids[i % ids.len()])
                    };
                    let patch = if target.is_none() {
                        ten_fields(w * 1_000_000 + i)
                    } else {
                        format!(r#"{{"progress":{}}}"#, i % 100)
                    };
                    let id = replica.put("tasks", target, &patch).expect("put");
                    if target.is_none() {
                        ids.push(id);
                    }
                    i += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    let n = done.load(Ordering::Relaxed);
    let (commits, flushes) = replica.commit_stats();
    eprintln!("  {writers} writers: {commits} commits shared {flushes} flushes");
    (n as f64 / start.elapsed().as_secs_f64(), n)
}

fn bulk_import(n: usize, encrypted: bool) -> (f64, f64) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let replica = new_replica(tmp.path(), encrypted);
    let text: String = (0..n).map(|i| ten_fields(i) + "\n").collect();
    let start = Instant::now();
    let imported = replica
        .bulk_import("tasks", &text, &mut |_, _| {})
        .expect("import");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(imported, n);
    (n as f64 / secs, secs)
}

/// The floor of a bulk import, in the same run: documents per second that Automerge alone
/// creates and saves (the same ten fields, one change each), on two threads as the import
/// has two cores.
fn creation_floor(n: usize) -> f64 {
    fieldsync_tests::floors::creation_rate(n, 2, ten_fields)
}

/// A first sync from a file: a new device (joined from `invite`) takes in every entity of
/// the authority's bundle — the store side of a first sync (decode, check, merge, commit).
fn first_sync(authority: &Replica, bundle: &[u8], encrypted: bool) -> f64 {
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = encrypted.then(|| fieldsync::Secret::KeyFile(vec![42; 32]));
    let device = Replica::init_join_with(
        &tmp.path().join("d"),
        &authority.invite(),
        "dev",
        libp2p_identity::ed25519::Keypair::generate(),
        secret.as_ref(),
    )
    .expect("join");
    let start = Instant::now();
    device
        .import_bundle(bundle, &mut |_, _| {})
        .expect("import bundle");
    start.elapsed().as_secs_f64()
}

fn main() {
    let seconds: f64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3.0);
    let entities: usize = std::env::var("BENCH_ENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    // `cargo bench` passes --bench; ignore arguments.
    println!("| benchmark | result | target |");
    println!("|---|---|---|");
    for encrypted in [false, true] {
        let store = if encrypted { ", encrypted store" } else { "" };
        for writers in [1, 16, 64] {
            let (rate, n) = writes_per_second(writers, seconds, encrypted);
            println!("| acknowledged single-entity writes, {writers} writers{store} | {rate:.0} writes/s ({n} in {seconds}s) | ≥ 5,000/s |");
            // Rows for scripts/bench-report: the target is for concurrent writers (shared flushes).
            let meets = if writers != 16 {
                "—"
            } else if rate >= 10_000.0 {
                "yes"
            } else {
                "**no**"
            };
            println!("report: | local acknowledged (durable) writes, {writers} writer(s){store} | {rate:.0} writes/s | {} | {meets} |", if writers == 16 { "≥ 10,000/s" } else { "" });
        }
        let (rate, secs) = bulk_import(entities, encrypted);
        let floor = creation_floor(entities);
        println!("| bulk import, {entities} 10-field entities{store} | {rate:.0} entities/s ({secs:.2} s); two-core Automerge creation floor {floor:.0}/s: {:.2}× | ≥ the floor |", rate / floor);
        println!("report: | bulk import, {entities} 10-field entities{store} | {rate:.0} entities/s ({secs:.2} s); two-core Automerge creation floor {floor:.0}/s: {:.2}× | ≥ the floor | {} |", rate / floor, if rate >= floor { "yes" } else { "**no**" });
    }
    // The same bundle into a plain and an encrypted new device.
    let tmp = tempfile::tempdir().expect("tempdir");
    let authority = new_replica(tmp.path(), false);
    let text: String = (0..entities).map(|i| ten_fields(i) + "\n").collect();
    authority
        .bulk_import("tasks", &text, &mut |_, _| {})
        .expect("import");
    let bundle = authority
        .export_bundle(None, &mut |_, _| {})
        .expect("export")
        .bytes;
    for encrypted in [false, true] {
        let store = if encrypted { ", encrypted store" } else { "" };
        let secs = first_sync(&authority, &bundle, encrypted);
        println!("| first sync from a bundle, {entities} entities → new device{store} | {secs:.2} s ({:.0} entities/s) | |", entities as f64 / secs);
    }
}
