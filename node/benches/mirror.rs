//! PostgreSQL mirror benchmark with the real `fieldsync relay` process (release build) and
//! a throwaway PostgreSQL server on 127.0.0.1: a relay holding `BENCH_MIRROR_ENTITIES`
//! (100,000) imported tasks starts with `--postgres` while a new device does its first
//! sync from it. Reported: mirror throughput (rows/s until the lag is 0), the largest lag
//! seen (feed entries not yet in PostgreSQL, sampled every 50 ms), and the device's
//! first-sync time beside it.
//!
//! Run: `cargo bench -p fieldsync-node --bench mirror`. Needs PostgreSQL's server binaries
//! (Debian's postgresql package, or `PG_BIN`). Lines starting `report: ` are rows for
//! `scripts/bench-report`.

// The node tests' helpers: running `fieldsync` commands and daemons, and PostgreSQL (they
// unwrap: a step that fails ends the run).
#[allow(clippy::unwrap_used)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{bin, postgres, Daemon, LOCAL, SCHEMA};

/// Runs a command that must succeed; its stdout.
fn cli(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = bin().arg("--data").arg(dir).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "fieldsync {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_MIRROR_ENTITIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let pg = postgres::Postgres::start();
    let tmp = tempfile::tempdir()?;
    let schema = tmp.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA)?;
    let relay = tmp.path().join("relay");
    cli(
        &relay,
        &[
            "init",
            "--schema",
            schema.to_str().unwrap_or_default(),
            "--name",
            "relay",
        ],
    )?;
    let invite = tmp.path().join("invite.json");
    std::fs::write(&invite, cli(&relay, &["invite"])?)?;
    let device = tmp.path().join("device");
    cli(
        &device,
        &[
            "init",
            "--join",
            invite.to_str().unwrap_or_default(),
            "--name",
            "device",
        ],
    )?;
    let lines: String = (0..n).map(|i| format!("{{\"title\":\"task {i}\",\"status\":\"open\",\"progress\":{},\"tags\":[\"t{}\"],\"notes\":\"note {i}\"}}\n", i % 100, i % 7)).collect();
    let file = tmp.path().join("tasks.jsonl");
    std::fs::write(&file, lines)?;
    eprintln!("importing {n} tasks into the relay…");
    cli(
        &relay,
        &["import", "tasks", file.to_str().unwrap_or_default()],
    )?;

    let url = pg.url();
    let mut relay_daemon = Daemon::start(
        &relay,
        &[&["relay", "--postgres", &url][..], LOCAL].concat(),
    );
    let started = Instant::now();
    let api = relay_daemon.api();
    let addr = relay_daemon.addr();
    let mut device_daemon =
        Daemon::start(&device, &[&["run", "--relay", &addr][..], LOCAL].concat());

    let (mut max_lag, mut mirrored_at, mut synced_at) = (0u64, None, None);
    while mirrored_at.is_none() || synced_at.is_none() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "not done within 15 minutes"
        );
        while let Ok(event) = device_daemon.events.try_recv() {
            if event["event"] == "sync_completed" {
                synced_at.get_or_insert(started.elapsed());
            }
            device_daemon.seen.push(event);
        }
        if mirrored_at.is_none() {
            let st: Value = ureq::get(format!("{api}/v1/status"))
                .call()?
                .body_mut()
                .read_json()?;
            let lag = st["mirror"]["lag"].as_u64().unwrap_or(u64::MAX);
            max_lag = max_lag.max(lag.min(n as u64 + 1_000));
            if st["mirror"]["connected"] == true
                && lag == 0
                && st["mirror"]["rows_mirrored"].as_u64().unwrap_or(0) >= n as u64
            {
                mirrored_at = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mirrored, synced) = (
        mirrored_at.unwrap_or_default(),
        synced_at.unwrap_or_default(),
    );
    let rows: u64 = pg.sql("SELECT count(*) FROM tasks").parse()?;
    anyhow::ensure!(rows == n as u64, "{rows} rows for {n} tasks");
    let rate = n as f64 / mirrored.as_secs_f64();
    println!("mirror of {n} tasks: {:.2} s ({rate:.0} rows/s), largest lag {max_lag} entries; the device's first sync meanwhile took {:.2} s", mirrored.as_secs_f64(), synced.as_secs_f64());
    println!("report: | PostgreSQL mirror, {n} entities during a first sync | {rate:.0} rows/s, {:.1} s; largest lag {max_lag}; first sync meanwhile {:.1} s | (no target) | — |", mirrored.as_secs_f64(), synced.as_secs_f64());
    Ok(())
}
