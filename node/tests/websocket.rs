//! Relays and devices over WebSocket, the transport a browser tab can use: plain `/ws`, and
//! `/tls/ws` (wss) with a certificate from the config file — here a self-signed one that
//! the devices are told to trust. Real processes on 127.0.0.1; the same sync stream, noise
//! and membership as on TCP.

mod support;

use std::path::Path;
use std::process::Stdio;

use support::*;

/// Starts a relay listening only on `listen` (with a config file if given); its address
/// on that transport, with `/p2p/<id>`.
fn relay_on(dir: &Path, listen: &str, config: Option<&Path>) -> (Daemon, String) {
    let mut args = vec!["relay", "--listen", listen, "--api", "127.0.0.1:0"];
    if let Some(c) = config {
        args.extend(["--config", c.to_str().unwrap()]);
    }
    let mut relay = Daemon::start(dir, &args);
    let addr = relay.addr();
    relay.wait_for("api");
    (relay, addr)
}

fn device_via(dir: &Path, relay: &str, config: Option<&Path>) -> Daemon {
    let mut args = vec!["run", "--relay", relay];
    args.extend(LOCAL);
    if let Some(c) = config {
        args.extend(["--config", c.to_str().unwrap()]);
    }
    let mut d = Daemon::start(dir, &args);
    d.wait_for("api");
    d
}

/// A task written on the first device reaches the second and the relay, and all three
/// show the same view.
fn a_write_travels(s: &Site) {
    let id = cli(
        &s.devices[0],
        &[
            "put",
            "tasks",
            r#"{"title":"Check the pump","status":"open","tags":["ws"]}"#,
        ],
    )["id"]
        .as_str()
        .expect("id")
        .to_owned();
    cli(
        &s.devices[1],
        &["put", "tasks", &id, r#"{"status":"completed"}"#],
    );
    eventually("the task reaches everyone, completed", || {
        [&s.relay, &s.devices[0], &s.devices[1]].iter().all(|d| {
            let out = bin()
                .arg("--data")
                .arg(d)
                .args(["get", "tasks", &id])
                .output()
                .unwrap();
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|v| v["status"] == "completed" && v["title"] == "Check the pump")
        })
    });
    assert_same_lists(&[&s.relay, &s.devices[0], &s.devices[1]], "tasks");
}

#[test]
fn devices_sync_through_a_relay_that_listens_on_websocket() {
    let s = site(2);
    let (_relay, raddr) = relay_on(&s.relay, "/ip4/127.0.0.1/tcp/0/ws", None);
    assert!(raddr.contains("/ws/p2p/"), "{raddr}");
    let _a = device_via(&s.devices[0], &raddr, None);
    let _b = device_via(&s.devices[1], &raddr, None);
    a_write_travels(&s);
}

#[test]
fn devices_sync_over_secure_websocket_with_a_trusted_self_signed_certificate() {
    let s = site(2);
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let dir = s.tmp.path();
    std::fs::write(dir.join("relay.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("relay.key"), cert.key_pair.serialize_pem()).unwrap();
    let relay_config = dir.join("relay.toml");
    std::fs::write(
        &relay_config,
        format!(
            "[net]\ntls_cert = {:?}\ntls_key = {:?}\n",
            dir.join("relay.crt"),
            dir.join("relay.key")
        ),
    )
    .unwrap();
    let device_config = dir.join("device.toml");
    std::fs::write(
        &device_config,
        format!("[net]\ntls_trust = [{:?}]\n", dir.join("relay.crt")),
    )
    .unwrap();

    let (_relay, raddr) = relay_on(&s.relay, "/ip4/127.0.0.1/tcp/0/tls/ws", Some(&relay_config));
    assert!(raddr.contains("/tls/ws/p2p/"), "{raddr}");
    let _a = device_via(&s.devices[0], &raddr, Some(&device_config));
    let _b = device_via(&s.devices[1], &raddr, Some(&device_config));
    a_write_travels(&s);
}

/// Runs a daemon that must fail at start; its exit code and stderr.
fn fails_to_start(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = bin()
        .arg("--data")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn secure_websocket_settings_that_cannot_work_are_refused_at_start() {
    let s = site(0);
    let dir = s.tmp.path();
    let secure = [
        "relay",
        "--listen",
        "/ip4/127.0.0.1/tcp/0/tls/ws",
        "--api",
        "127.0.0.1:0",
    ];

    let (code, err) = fails_to_start(&s.relay, &secure);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a certificate"), "{err}");

    // A secure listener with this `[net]` section in its config file.
    let with_net = |name: &str, net: String| {
        let config = dir.join(name);
        std::fs::write(&config, format!("[net]\n{net}")).unwrap();
        fails_to_start(
            &s.relay,
            &[&secure[..], &["--config", config.to_str().unwrap()]].concat(),
        )
    };
    let (code, err) = with_net("half.toml", format!("tls_cert = {:?}\n", dir.join("x.crt")));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tls_cert and tls_key go together"), "{err}");

    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let (code, err) = with_net(
        "bad.toml",
        format!("tls_cert = {not_pem:?}\ntls_key = {not_pem:?}\n"),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not.pem"), "names the file: {err}");
}
