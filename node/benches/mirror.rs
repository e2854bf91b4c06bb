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

#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod postgres;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

fn fieldsync(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fieldsync"));
    c.env_remove("FIELDSYNC_DATA").env("RUST_LOG", "warn").arg("--data").arg(dir);
    c
}

fn cli(dir: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = fieldsync(dir).args(args).stderr(Stdio::piped()).output()?;
    anyhow::ensure!(out.status.success(), "fieldsync {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(out.stdout)
}

/// A daemon whose JSON events arrive on a channel; killed on drop.
struct Daemon(Child, mpsc::Receiver<Value>);

impl Daemon {
    fn start(dir: &Path, args: &[&str]) -> anyhow::Result<Daemon> {
        let mut child = fieldsync(dir).args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Daemon(child, rx))
    }

    fn wait_for(&self, event: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.1.recv_timeout(deadline.saturating_duration_since(Instant::now())).map_err(|_| anyhow::anyhow!("no {event} event"))?;
            if v["event"] == event {
                return Ok(v);
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_MIRROR_ENTITIES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let pg = postgres::Postgres::start();
    let tmp = tempfile::tempdir()?;
    let schema = tmp.path().join("schema.toml");
    std::fs::write(&schema, include_str!("../../examples/schema.toml"))?;
    let relay = tmp.path().join("relay");
    cli(&relay, &["init", "--schema", schema.to_str().unwrap_or_default(), "--name", "relay"])?;
    let invite = tmp.path().join("invite.json");
    std::fs::write(&invite, cli(&relay, &["invite"])?)?;
    let device = tmp.path().join("device");
    cli(&device, &["init", "--join", invite.to_str().unwrap_or_default(), "--name", "device"])?;
    let lines: String = (0..n).map(|i| format!("{{\"title\":\"task {i}\",\"status\":\"open\",\"progress\":{},\"tags\":[\"t{}\"],\"notes\":\"note {i}\"}}\n", i % 100, i % 7)).collect();
    let file = tmp.path().join("tasks.jsonl");
    std::fs::write(&file, lines)?;
    eprintln!("importing {n} tasks into the relay…");
    cli(&relay, &["import", "tasks", file.to_str().unwrap_or_default()])?;

    let local = ["--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"];
    let url = pg.url();
    let relay_daemon = Daemon::start(&relay, &[&["relay", "--postgres", &url][..], &local].concat())?;
    let started = Instant::now();
    // (The daemon prints `api` before `listening`.)
    let api = format!("http://{}", relay_daemon.wait_for("api", Duration::from_secs(60))?["addr"].as_str().unwrap_or_default());
    let addr = relay_daemon.wait_for("listening", Duration::from_secs(60))?["addr"].as_str().unwrap_or_default().to_owned();
    let device_daemon = Daemon::start(&device, &[&["run", "--relay", &addr][..], &local].concat())?;

    let (mut max_lag, mut mirrored_at, mut synced_at) = (0u64, None, None);
    while mirrored_at.is_none() || synced_at.is_none() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(900), "not done within 15 minutes");
        if synced_at.is_none() && device_daemon.wait_for("sync_completed", Duration::from_millis(1)).is_ok() {
            synced_at = Some(started.elapsed());
        }
        if mirrored_at.is_none() {
            let st: Value = ureq::get(format!("{api}/v1/status")).call()?.body_mut().read_json()?;
            let lag = st["mirror"]["lag"].as_u64().unwrap_or(u64::MAX);
            max_lag = max_lag.max(lag.min(n as u64 + 1_000));
            if st["mirror"]["connected"] == true && lag == 0 && st["mirror"]["rows_mirrored"].as_u64().unwrap_or(0) >= n as u64 {
                mirrored_at = Some(started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mirrored, synced) = (mirrored_at.unwrap_or_default(), synced_at.unwrap_or_default());
    let rows: u64 = pg.sql("SELECT count(*) FROM tasks").parse()?;
    anyhow::ensure!(rows == n as u64, "{rows} rows for {n} tasks");
    let rate = n as f64 / mirrored.as_secs_f64();
    println!("mirror of {n} tasks: {:.2} s ({rate:.0} rows/s), largest lag {max_lag} entries; the device's first sync meanwhile took {:.2} s", mirrored.as_secs_f64(), synced.as_secs_f64());
    println!("report: | PostgreSQL mirror, {n} entities during a first sync | {rate:.0} rows/s, {:.1} s; largest lag {max_lag}; first sync meanwhile {:.1} s | (no target) | — |", mirrored.as_secs_f64(), synced.as_secs_f64());
    Ok(())
}
