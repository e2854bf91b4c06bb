//! LAN pair: two devices in network namespaces this test creates, joined by a veth pair,
//! discover each other with `--mdns` and sync with no relay. mDNS runs only inside these
//! namespaces, never on the host's interfaces. Where namespaces cannot be created (not
//! root, no `ip`), the test says so and skips.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SCHEMA: &str = include_str!("../../examples/schema.toml");

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Two namespaces joined by a veth pair; removed on drop.
struct Lan {
    a: String,
    b: String,
}

impl Lan {
    fn create() -> Option<Lan> {
        let tag = std::process::id() % 100_000;
        let lan = Lan {
            a: format!("fsa{tag}"),
            b: format!("fsb{tag}"),
        };
        let (va, vb) = (format!("fva{tag}"), format!("fvb{tag}"));
        let ok = ip(&["netns", "add", &lan.a])
            && ip(&["netns", "add", &lan.b])
            && ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])
            && ip(&["link", "set", &va, "netns", &lan.a])
            && ip(&["link", "set", &vb, "netns", &lan.b])
            && ip(&["-n", &lan.a, "addr", "add", "10.231.0.1/24", "dev", &va])
            && ip(&["-n", &lan.b, "addr", "add", "10.231.0.2/24", "dev", &vb])
            && ip(&["-n", &lan.a, "link", "set", &va, "up", "multicast", "on"])
            && ip(&["-n", &lan.b, "link", "set", &vb, "up", "multicast", "on"])
            && ip(&["-n", &lan.a, "link", "set", "lo", "up"])
            && ip(&["-n", &lan.b, "link", "set", "lo", "up"]);
        ok.then_some(lan)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.a]);
        ip(&["netns", "del", &self.b]);
    }
}

fn in_ns(ns: &str, dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        ns,
        env!("CARGO_BIN_EXE_fieldsync"),
        "--data",
    ])
    .arg(dir)
    .args(args)
    .env_remove("FIELDSYNC_DATA");
    c
}

fn run_ok(mut c: Command) -> Value {
    let out = c.output().expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(ns: &str, dir: &Path, listen: &str) -> Daemon {
    // The daemon's log goes beside its data, to be shown if the test fails.
    let log = std::fs::File::create(dir.with_extension("log")).expect("log");
    let mut child = in_ns(
        ns,
        dir,
        &["run", "--mdns", "--listen", listen, "--api", "127.0.0.1:0"],
    )
    .env("RUST_LOG", "fieldsync_net=debug,libp2p_mdns=debug")
    .stdout(Stdio::piped())
    .stderr(log)
    .spawn()
    .expect("spawn daemon");
    // Wait until the API serves, so CLI commands go through the daemon.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("daemon announces its API");
        if line.contains("\"api\"") {
            break;
        }
    }
    std::thread::spawn(move || for _ in rx {});
    Daemon(child)
}

#[test]
fn two_devices_on_a_lan_find_each_other_with_mdns_and_sync_without_a_relay() {
    let Some(lan) = Lan::create() else {
        eprintln!(
            "SKIPPED lan_mdns: cannot create network namespaces here (needs root and iproute2)"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let schema = tmp.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let (hq, a, b) = (
        tmp.path().join("hq"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    run_ok(in_ns(
        &lan.a,
        &hq,
        &["init", "--schema", schema.to_str().unwrap()],
    ));
    // One invite per device: an invite admits one device only.
    for (ns, dir, name) in [(&lan.a, &a, "a"), (&lan.b, &b, "b")] {
        let invite = tmp.path().join(format!("invite-{name}.json"));
        let out = in_ns(&lan.a, &hq, &["invite"]).output().unwrap();
        std::fs::write(&invite, out.stdout).unwrap();
        run_ok(in_ns(
            ns,
            dir,
            &["init", "--join", invite.to_str().unwrap(), "--name", name],
        ));
    }

    let _da = start(&lan.a, &a, "/ip4/10.231.0.1/tcp/0");
    let _db = start(&lan.b, &b, "/ip4/10.231.0.2/tcp/0");
    let id = run_ok(in_ns(
        &lan.a,
        &a,
        &["put", "tasks", r#"{"title":"found over the LAN"}"#],
    ))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let logs = || {
        [&a, &b]
            .iter()
            .map(|d| {
                format!(
                    "--- {} ---\n{}",
                    d.display(),
                    std::fs::read_to_string(d.with_extension("log")).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = in_ns(&lan.b, &b, &["get", "tasks", &id]).output().unwrap();
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["title"], "found over the LAN");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "device b never received the task over mDNS; daemon logs:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And back the other way.
    run_ok(in_ns(
        &lan.b,
        &b,
        &["put", "tasks", &id, r#"{"status":"completed"}"#],
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    while run_ok(in_ns(&lan.a, &a, &["get", "tasks", &id]))["status"] != "completed" {
        assert!(
            Instant::now() < deadline,
            "device a never received the update; daemon logs:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
