//! What the node's process tests share: running `fieldsync` commands and daemons on
//! 127.0.0.1, following their JSON Lines, and a relay with invited devices.
// Each test file uses its own part of this.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SCHEMA: &str = include_str!("../../../examples/schema.toml");
pub const WAIT: Duration = Duration::from_secs(30);

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fieldsync"));
    c.env_remove("FIELDSYNC_DATA").env("RUST_LOG", "warn");
    c
}

/// Runs `fieldsync --data DIR ARGS…` to the end.
fn run_in(dir: &Path, args: &[&str]) -> std::process::Output {
    bin()
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .expect("run fieldsync")
}

/// `fieldsync --data DIR ARGS…`'s standard output; the command must succeed.
pub fn stdout_of(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = run_in(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Its standard output if the command succeeded, else `None`.
pub fn try_stdout(dir: &Path, args: &[&str]) -> Option<String> {
    let out = run_in(dir, args);
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn cli(dir: &Path, args: &[&str]) -> Value {
    let stdout = stdout_of(dir, args);
    let text = String::from_utf8_lossy(&stdout);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    if lines.len() == 1 {
        lines.into_iter().next().expect("one")
    } else {
        Value::Array(lines)
    }
}

/// The node's API token (`fieldsync api-token`): writes through the HTTP API need it.
pub fn token(dir: &Path) -> String {
    cli(dir, &["api-token"])["token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// `Authorization: Bearer …` for the node in `dir`.
pub fn bearer(dir: &Path) -> String {
    format!("Bearer {}", token(dir))
}

pub fn list(dir: &Path, collection: &str) -> Vec<Value> {
    match cli(dir, &["list", collection, "--include-deleted"]) {
        Value::Array(items) => items,
        one => vec![one],
    }
}

/// A running daemon; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub events: mpsc::Receiver<Value>,
    pub seen: Vec<Value>,
}

impl Daemon {
    pub fn start(dir: &Path, args: &[&str]) -> Daemon {
        Self::spawn(
            bin()
                .arg("--data")
                .arg(dir)
                .args(args)
                .stderr(Stdio::null()),
        )
    }

    /// Like [`Self::start`] with `RUST_LOG=log` and stderr in `stderr.log` of the data
    /// directory; returns once its API serves.
    pub fn start_logged(dir: &Path, args: &[&str], log: &str) -> Daemon {
        let log_file = std::fs::File::create(dir.join("stderr.log")).expect("stderr log");
        let mut d = Self::spawn(
            bin()
                .env("RUST_LOG", log)
                .arg("--data")
                .arg(dir)
                .args(args)
                .stderr(log_file),
        );
        d.wait_for("api");
        d
    }

    /// Like [`Self::start`] with these environment variables (and no inherited secrets).
    pub fn start_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut c = bin();
        c.env_remove("FIELDSYNC_PASSPHRASE")
            .env_remove("FIELDSYNC_KEY_FILE");
        for (k, v) in env {
            c.env(k, v);
        }
        Self::spawn(c.arg("--data").arg(dir).args(args).stderr(Stdio::null()))
    }

    fn spawn(command: &mut Command) -> Daemon {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn daemon");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        Daemon {
            child,
            events,
            seen: vec![],
        }
    }

    /// Waits for an event of this kind; returns it.
    pub fn wait_for(&mut self, event: &str) -> Value {
        self.wait_until(&format!("{event} event"), |v| v["event"] == event)
    }

    /// Waits for an event `check` accepts (one seen before counts); returns it.
    pub fn wait_until(&mut self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| check(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + WAIT;
        while let Ok(v) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(v.clone());
            if check(&v) {
                return v;
            }
        }
        panic!("no {what} within {WAIT:?}; saw {:?}", self.seen);
    }

    /// Waits for an event of this kind that it has not returned before.
    pub fn wait_for_next(&mut self, event: &str) -> Value {
        let seen = self.seen.iter().filter(|v| v["event"] == event).count();
        let deadline = Instant::now() + WAIT;
        while let Ok(v) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(v.clone());
            if v["event"] == event
                && self.seen.iter().filter(|v| v["event"] == event).count() > seen
            {
                return v;
            }
        }
        panic!("no new {event} event within {WAIT:?}; saw {:?}", self.seen);
    }

    /// The first TCP address it listens on.
    pub fn addr(&mut self) -> String {
        self.wait_for("listening")["addr"]
            .as_str()
            .expect("addr")
            .to_owned()
    }

    pub fn api(&mut self) -> String {
        format!(
            "http://{}",
            self.wait_for("api")["addr"].as_str().expect("api")
        )
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("daemon did not stop on SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that every node in `dirs` lists the same `collection` (deleted ones too).
pub fn assert_same_lists(dirs: &[&Path], collection: &str) {
    let views: Vec<Vec<Value>> = dirs.iter().map(|d| list(d, collection)).collect();
    assert!(
        views.iter().all(|v| *v == views[0]),
        "views differ: {views:?}"
    );
}

/// Polls until `check` holds.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for: {what}");
}

pub struct Site {
    pub tmp: tempfile::TempDir,
    pub relay: PathBuf,
    pub devices: Vec<PathBuf>,
}

pub fn site(devices: usize) -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let schema = tmp.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let relay = tmp.path().join("relay");
    cli(
        &relay,
        &[
            "init",
            "--schema",
            schema.to_str().unwrap(),
            "--name",
            "relay",
        ],
    );
    let devices = (0..devices)
        .map(|i| {
            // One invite per device: an invite admits one device only.
            let invite = tmp.path().join(format!("invite{i}.json"));
            let out = bin()
                .arg("--data")
                .arg(&relay)
                .arg("invite")
                .output()
                .unwrap();
            std::fs::write(&invite, out.stdout).unwrap();
            let d = tmp.path().join(format!("device{i}"));
            cli(
                &d,
                &[
                    "init",
                    "--join",
                    invite.to_str().unwrap(),
                    "--name",
                    &format!("device{i}"),
                ],
            );
            d
        })
        .collect();
    Site {
        tmp,
        relay,
        devices,
    }
}

pub const LOCAL: &[&str] = &["--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0"];

pub fn start_relay(dir: &Path) -> (Daemon, String) {
    let mut relay = Daemon::start(dir, &[&["relay"], LOCAL].concat());
    let addr = relay.addr();
    relay.wait_for("api");
    (relay, addr)
}

/// Starts a device daemon and waits until its API serves (so CLI commands go through it).
pub fn start_device(dir: &Path, relay: &str, extra: &[&str]) -> Daemon {
    let mut d = Daemon::start(dir, &[&["run", "--relay", relay], LOCAL, extra].concat());
    d.wait_for("api");
    d
}

pub mod postgres;
