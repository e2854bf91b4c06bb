//! Crash safety: a writer process with concurrent writers is killed with SIGKILL at random
//! moments, many times; every write it acknowledged must be there when the store reopens.
//!
//! The test binary re-runs itself as the writer (env `FIELDSYNC_CRASH_WRITER=DIR`), which
//! prints `ACK <entity> <value>` only after `put` returned, i.e. after the write was durable.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldsync::{EntityId, Replica};
use rand::{Rng, SeedableRng};

const WRITER_ENV: &str = "FIELDSYNC_CRASH_WRITER";

/// Not a test on its own: the body of the writer process.
#[test]
fn crash_writer_child() {
    let Ok(dir) = std::env::var(WRITER_ENV) else {
        return;
    };
    let replica = Replica::open(dir.as_ref()).expect("open store");
    let stdout = std::sync::Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for t in 0..4 {
            let (replica, stdout) = (&replica, &stdout);
            s.spawn(move || {
                let mut existing: Option<EntityId> = None;
                for i in 0u64.. {
                    // Alternate creating entities and updating the last one (appends + compaction).
                    let value = format!("w{t}-{i}");
                    let patch = format!(r#"{{"title":"{value}","tags":{{"$add":["{value}"]}}}}"#);
                    let id = replica
                        .put("tasks", existing.filter(|_| i % 3 != 0), &patch)
                        .expect("put");
                    existing = Some(id);
                    use std::io::Write;
                    let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = writeln!(out, "ACK {id} {value}");
                    let _ = out.flush();
                }
            });
        }
    });
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if std::env::var(WRITER_ENV).is_ok() {
        return;
    }
    let rounds: usize = std::env::var("FIELDSYNC_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("FIELDSYNC_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    Replica::init_authority(&dir, fieldsync_tests::SCHEMA, "crash").unwrap();
    // entity -> every value acknowledged for it (the last one must be the title; all must be tags).
    let mut acked: HashMap<EntityId, Vec<String>> = HashMap::new();
    let mut total = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(1024);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for the first acknowledgement, then kill at a random moment after it.
        let kill_after = Duration::from_millis(rng.random_range(5..250));
        let mut lines = Vec::new();
        let started = Instant::now();
        let mut first: Option<Instant> = None;
        while first.is_none_or(|f| f.elapsed() < kill_after)
            && started.elapsed() < Duration::from_secs(30)
        {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(2)) {
                first.get_or_insert_with(Instant::now);
                lines.push(line);
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        assert!(
            !lines.is_empty(),
            "round {round}: the writer acknowledged nothing"
        );
        for line in &lines {
            let mut parts = line.split(' ');
            // A line cut by the kill is not an acknowledgement.
            let (Some("ACK"), Some(id), Some(value), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let Ok(id) = id.parse::<EntityId>() else {
                continue;
            };
            acked.entry(id).or_default().push(value.to_owned());
            total += 1;
        }

        let replica = Replica::open(&dir)
            .unwrap_or_else(|e| panic!("round {round}: store does not reopen: {e}"));
        for (id, values) in &acked {
            let view = replica
                .get("tasks", *id)
                .unwrap_or_else(|e| panic!("round {round}: acknowledged entity {id} lost: {e}"));
            let tags: Vec<&str> = view["tags"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .collect();
            for v in values {
                assert!(
                    tags.contains(&v.as_str()),
                    "round {round}: acknowledged tag {v} of {id} lost"
                );
            }
        }
        drop(replica);
    }
    // Written to the stderr handle, not with eprintln!, so the test harness does not capture it.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "crash test: {rounds} SIGKILL rounds (seed {seed}), {total} acknowledged writes on {} entities, all present", acked.len());
}
