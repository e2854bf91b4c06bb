//! Attachments benchmark with real `fieldsync` processes (release build) on 127.0.0.1: a
//! relay and two devices. Device A attaches a `BENCH_BLOB_MB` (500) MB file of
//! pseudo-random bytes (`fieldsync attach`, through its daemon); the relay pulls it from A
//! (relays fetch every referenced file); then B downloads it through its daemon
//! (`GET /v1/blobs/{hash}`: B fetches it from the relay first).
//!
//! Reported: each process's peak RSS (VmHWM), the transfer times, and the live latency
//! A → relay → B of a small entity written on A every 50 ms during each transfer, beside a
//! baseline without a transfer from the same run. The relay's and B's copies must hash to
//! the reference's BLAKE3 hash, else the benchmark fails.
//!
//! Run: `cargo bench --locked -p fieldsync-node --bench blobs`. `BENCH_BLOB_SLOW=MS`
//! lists the writes slower than MS with when they came; `BENCH_BLOB_DIR` puts the nodes'
//! data in another directory (e.g. `/dev/shm`). `BENCH_BLOB_WRITES` (200)
//! sets the baseline's writes, `BENCH_BLOB_SEND_CAP` every node's `send_bytes_per_sec`
//! (default 0: no cap). Lines starting `report: ` are rows for `scripts/bench-report`.

// The node tests' helpers: running `fieldsync` commands and daemons (they unwrap: a step
// that fails ends the run, and dropping its daemons kills them).
#[allow(clippy::unwrap_used)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fieldsync::blobs::Hash;
use serde_json::Value;
use support::{bearer, bin, cli, Daemon, LOCAL};

const SCHEMA: &str = r#"
[collections.jobs.fields]
photos = { rule = "attachments" }
[collections.notes.fields]
n = { rule = "max" }
"#;
const WRITE_EVERY: Duration = Duration::from_millis(50);
// Bounded: an idle node (~80 MB) plus queues of 64 KiB pieces, whatever the file's size;
// a copy of the file in memory would not fit.
const PEAK_TARGET_MB: f64 = 200.0;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

fn proc_status_mb(pid: u32, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A running daemon (killed on drop) and its API.
struct Node {
    dir: PathBuf,
    daemon: Daemon,
    api: String,
}

impl Node {
    fn start(dir: &Path, args: &[&str]) -> Node {
        let mut daemon = Daemon::start(dir, &[args, LOCAL].concat());
        let api = daemon.api();
        Node {
            dir: dir.to_owned(),
            daemon,
            api,
        }
    }

    /// (VmRSS now, VmHWM) in MB.
    fn rss(&self) -> (f64, f64) {
        let pid = self.daemon.child.id();
        (proc_status_mb(pid, "VmRSS:"), proc_status_mb(pid, "VmHWM:"))
    }

    /// Where its store keeps the blob `hash`.
    fn blob(&self, hash: &str) -> PathBuf {
        self.dir.join("blobs").join(&hash[..2]).join(hash)
    }
}

/// A child process killed on drop, so an error or a timeout leaves nothing running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `child` to exit within `timeout`; its stdout (which went to `out`).
fn finish(mut child: Killed, out: &Path, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait()? {
            ensure!(status.success(), "exit status {status}");
            return Ok(std::fs::read_to_string(out)?);
        }
        ensure!(Instant::now() < deadline, "not done within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// When a write on A started, ms until B served it, ms of that A's HTTP write took.
type Sample = (Instant, f64, f64);

/// Writes a small entity on A every 50 ms (at most `max`) while `busy()` holds, and times
/// until B serves it.
fn live(
    a: &Node,
    b: &Node,
    token: &str,
    max: u64,
    mut busy: impl FnMut() -> bool,
) -> anyhow::Result<Vec<Sample>> {
    let http = agent(Duration::from_secs(10));
    let mut samples = Vec::new();
    while (samples.len() as u64) < max && busy() {
        let t = Instant::now();
        let mut created = http
            .post(format!("{}/v1/collections/notes", a.api))
            .header("authorization", token)
            .send(format!(r#"{{"n":{}}}"#, samples.len()))?;
        ensure!(
            created.status().is_success(),
            "write on A: {}",
            created.status()
        );
        let write = t.elapsed().as_secs_f64() * 1000.0;
        let id = created.body_mut().read_json::<Value>()?["id"]
            .as_str()
            .context("id")?
            .to_owned();
        let url = format!("{}/v1/collections/notes/{id}", b.api);
        while http.get(&url).call()?.status() != 200 {
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "write {id} never reached B"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        samples.push((t, t.elapsed().as_secs_f64() * 1000.0, write));
        std::thread::sleep(WRITE_EVERY.saturating_sub(t.elapsed()));
    }
    Ok(samples)
}

/// p50 and p99 of the latencies (and p50 of the writes on A) of the samples whose write
/// started within `window` (all: `None`), and how many there are.
struct Latency {
    p50: f64,
    p99: f64,
    write_p50: f64,
    /// From A's write acknowledged until B serves it: the sync part alone.
    sync_p50: f64,
    sync_p99: f64,
    n: usize,
}

fn latency(samples: &[Sample], window: Option<(Instant, Instant)>) -> Latency {
    let within: Vec<&Sample> = samples
        .iter()
        .filter(|(t, ..)| window.is_none_or(|(start, end)| (start..end).contains(t)))
        .collect();
    // BENCH_BLOB_SLOW=MS: when in the window the writes slower than MS came (to tell a
    // steady cost from stalls at one moment, e.g. the file's final flush).
    if let (Some(slow), Some(first)) = (
        std::env::var("BENCH_BLOB_SLOW")
            .ok()
            .and_then(|v| v.parse::<f64>().ok()),
        within.first(),
    ) {
        let start = window.map_or(first.0, |(s, _)| s);
        for s in within.iter().filter(|s| s.1 > slow) {
            println!(
                "slow write: {:.1} ms at {:.2} s into the window (A's write {:.1} ms)",
                s.1,
                (s.0 - start).as_secs_f64(),
                s.2
            );
        }
    }
    let p = |q: f64, pick: fn(&Sample) -> f64| {
        let mut ms: Vec<f64> = within.iter().map(|s| pick(s)).collect();
        ms.sort_by(f64::total_cmp);
        ms.get(((ms.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Latency {
        p50: p(0.5, |s| s.1),
        p99: p(0.99, |s| s.1),
        write_p50: p(0.5, |s| s.2),
        sync_p50: p(0.5, |s| s.1 - s.2),
        sync_p99: p(0.99, |s| s.1 - s.2),
        n: within.len(),
    }
}

/// `size` pseudo-random bytes (xorshift: incompressible, unlike zeros).
fn random_bytes(size: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes = Vec::with_capacity(size + 8);
    while bytes.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(size);
    bytes
}

fn main() -> anyhow::Result<()> {
    let mb = env_num("BENCH_BLOB_MB", 500);
    let size = mb * 1_000_000;
    let baseline_writes = env_num("BENCH_BLOB_WRITES", 200);
    // At least 1 MB/s, or the transfer counts as stalled.
    let timeout = Duration::from_secs(60 + mb);

    // BENCH_BLOB_DIR: where the three nodes keep their data (e.g. /dev/shm, to take the
    // one disk they share here out of the figures).
    let tmp = match std::env::var("BENCH_BLOB_DIR") {
        Ok(dir) => tempfile::tempdir_in(dir)?,
        Err(_) => tempfile::tempdir()?,
    };
    let path = |name: &str| tmp.path().join(name);
    std::fs::write(path("schema.toml"), SCHEMA)?;
    // The default per-file limit (256 MiB) is below the file's size.
    std::fs::write(
        path("node.toml"),
        format!(
            "[blobs]\nmax_blob_bytes = {}\nsend_bytes_per_sec = {}\n",
            size + (1 << 20),
            env_num("BENCH_BLOB_SEND_CAP", 0)
        ),
    )?;
    let config = path("node.toml").display().to_string();
    let relay_dir = path("relay");
    cli(
        &relay_dir,
        &[
            "init",
            "--schema",
            &path("schema.toml").display().to_string(),
            "--name",
            "relay",
        ],
    );
    for name in ["a", "b"] {
        let invite = path(&format!("{name}.invite"));
        std::fs::write(&invite, support::stdout_of(&relay_dir, &["invite"]))?;
        cli(
            &path(name),
            &[
                "init",
                "--join",
                &invite.display().to_string(),
                "--name",
                name,
            ],
        );
    }
    let mut relay = Node::start(&relay_dir, &["relay", "--config", &config]);
    let addr = relay.daemon.addr();
    let device =
        |name: &str| Node::start(&path(name), &["run", "--relay", &addr, "--config", &config]);
    let (mut a, mut b) = (device("a"), device("b"));
    a.daemon.wait_for("sync_completed");
    b.daemon.wait_for("sync_completed");
    let token = bearer(&a.dir);
    let job = cli(&a.dir, &["put", "jobs", "{}"])["id"]
        .as_str()
        .context("job id")?
        .to_owned();

    let file = path("site-survey.bin");
    let expected = {
        let bytes = random_bytes(size as usize);
        std::fs::write(&file, &bytes)?;
        Hash::of(&bytes).to_string()
    };

    // Baseline: no transfer (after a few warm-up writes).
    live(&a, &b, &token, 5, || true)?;
    let baseline = live(&a, &b, &token, baseline_writes, || true)?;
    let base = latency(&baseline, None);
    let idle = [relay.rss().0, a.rss().0, b.rss().0];

    // A's upload into its own store (streamed through its daemon's API).
    let t = Instant::now();
    let out = path("attach.json");
    let child = Killed(
        bin()
            .args([
                "--data",
                &a.dir.display().to_string(),
                "attach",
                "jobs",
                &job,
                "photos",
            ])
            .arg(&file)
            .stdout(std::fs::File::create(&out)?)
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let reference: Value = serde_json::from_str(&finish(child, &out, timeout).context("attach")?)?;
    let upload = t.elapsed().as_secs_f64();
    let hash = reference["hash"].as_str().context("hash")?.to_owned();
    ensure!(
        hash == expected,
        "the reference's hash {hash} is not the file's {expected}"
    );
    let a_after_upload = a.rss().1;

    // The relay pulls the file from A: from its partial copy appearing to the whole one.
    let (partial, whole) = (
        relay_dir
            .join("blobs/partial")
            .join(format!("{hash}.partial")),
        relay.blob(&hash),
    );
    let watcher = std::thread::spawn(move || -> anyhow::Result<(Instant, Instant)> {
        let (deadline, mut start) = (Instant::now() + timeout, None);
        while !whole.exists() {
            ensure!(
                Instant::now() < deadline,
                "the relay did not get the file within {timeout:?}"
            );
            if start.is_none() && partial.exists() {
                start = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let end = Instant::now();
        Ok((start.unwrap_or(end), end))
    });
    let max_writes = timeout.as_millis() as u64 / WRITE_EVERY.as_millis() as u64;
    let pulling = live(&a, &b, &token, max_writes, || !watcher.is_finished())?;
    let pull_window = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    relay
        .daemon
        .wait_until("blob_fetched", |v| v["event"] == "blob_fetched")["bytes"]
        .as_u64()
        .filter(|&n| n == size)
        .context("the relay's blob_fetched size")?;
    let pull = latency(&pulling, Some(pull_window));
    let pull_secs = (pull_window.1 - pull_window.0).as_secs_f64();

    // B downloads it through its daemon, which fetches it from the relay first.
    let url = format!("{}/v1/blobs/{hash}", b.api);
    let http = agent(timeout);
    let t0 = Instant::now();
    let download = std::thread::spawn(move || -> anyhow::Result<(u64, Instant)> {
        let mut response = http.get(&url).call()?;
        ensure!(response.status() == 200, "GET {url}: {}", response.status());
        let mut body = response.body_mut().with_config().limit(u64::MAX).reader();
        let n = std::io::copy(&mut body, &mut std::io::sink())?;
        Ok((n, Instant::now()))
    });
    let fetching = live(&a, &b, &token, max_writes, || !download.is_finished())?;
    let (got, end) = download
        .join()
        .map_err(|_| anyhow::anyhow!("download panicked"))??;
    ensure!(got == size, "B's download has {got} bytes, not {size}");
    let fetch = latency(&fetching, Some((t0, end)));
    let fetch_secs = (end - t0).as_secs_f64();

    let peaks = [relay.rss().1, a.rss().1, b.rss().1];
    // Whether B also reached A directly (then not every write went through the relay).
    let peers: Vec<Value> = cli(&b.dir, &["status"])["peers"]
        .as_object()
        .map(|p| {
            p.values()
                .filter(|v| v["connected"] == true)
                .map(|v| v["role"].clone())
                .collect()
        })
        .unwrap_or_default();

    // The copies must be the file: hashed here, not trusted from the nodes.
    for (name, node) in [("relay", &relay), ("B", &b)] {
        let bytes = std::fs::read(node.blob(&hash)).with_context(|| format!("{name}'s copy"))?;
        ensure!(
            Hash::of(&bytes).to_string() == hash,
            "{name}'s copy does not hash to {hash}"
        );
    }
    println!("copies on the relay and B hash to {hash}; B's connected peers: {peers:?}");

    println!("upload into A's store (`fieldsync attach` through its daemon): {upload:.1} s; relay pull {pull_secs:.1} s; B's download {fetch_secs:.1} s");
    println!("RSS MB idle → peak: relay {:.0} → {:.0}, A {:.0} → {:.0} (after its upload {a_after_upload:.0}), B {:.0} → {:.0}", idle[0], peaks[0], idle[1], peaks[1], idle[2], peaks[2]);
    let bounded = format!("bounded: ≤ {PEAK_TARGET_MB:.0} MB while moving {mb} MB");
    for (who, idle, peak) in [
        ("relay (pulling from A, serving B)", idle[0], peaks[0]),
        (
            "device A (upload by attach, serving the relay)",
            idle[1],
            peaks[1],
        ),
        ("device B (fetching through the relay)", idle[2], peaks[2]),
    ] {
        fieldsync_tests::report(
            &format!("{who}: peak RSS (VmHWM) moving a {mb} MB file"),
            &format!("{peak:.0} MB (idle {idle:.0} MB)"),
            &bounded,
            Some(peak <= PEAK_TARGET_MB),
        );
    }
    let rate = |secs: f64| mb as f64 / secs;
    fieldsync_tests::report(
        &format!("{mb} MB file: A → relay (relay's pull), relay → B (B's GET)"),
        &format!("{pull_secs:.1} s ({:.0} MB/s), {fetch_secs:.1} s ({:.0} MB/s); attach on A {upload:.1} s", rate(pull_secs), rate(fetch_secs)),
        "reported (no target)",
        None,
    );
    let ms = |l: &Latency| format!("p50 {:.1} ms, p99 {:.1} ms ({} writes)", l.p50, l.p99, l.n);
    println!(
        "of which A's HTTP write (p50): baseline {:.1} ms, during the pull {:.1} ms, during B's fetch {:.1} ms",
        base.write_p50, pull.write_p50, fetch.write_p50
    );
    for (during, l) in [
        ("the relay pulls it from A", &pull),
        ("B fetches it from the relay", &fetch),
    ] {
        fieldsync_tests::report(
            &format!("sync part of it (A's write acknowledged → B serves it) while {during}"),
            &format!(
                "p50 {:.1} ms, p99 {:.1} ms; baseline p50 {:.1} ms, p99 {:.1} ms",
                l.sync_p50, l.sync_p99, base.sync_p50, base.sync_p99
            ),
            "unaffected: p99 ≤ 1.5× baseline p99",
            Some(l.sync_p99 <= 1.5 * base.sync_p99),
        );
        fieldsync_tests::report(
            &format!("live latency A → relay → B, a write every 50 ms while {during}"),
            &format!("{}; baseline {}", ms(l), ms(&base)),
            "p50 ≤ 5 ms, p99 ≤ 10 ms",
            Some(l.p50 <= 5.0 && l.p99 <= 10.0),
        );
    }
    Ok(())
}
