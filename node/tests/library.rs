//! The node as a library: `fieldsync_node::run` with the caller's own shutdown future, the
//! way a program that embeds a node starts one. The nodes run in this test's process; the
//! CLI (a separate process, as users run it) talks to them through their APIs.

mod support;

use std::path::Path;

use fieldsync::core::protocol::Role;
use fieldsync_node::{NodeConfig, Options};
use support::{cli, eventually, site, try_stdout};

/// A free TCP port on 127.0.0.1 (the relay's listen address must be known to dial it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn node(dir: &Path, role: Role, listen: &str, dial: &[&str]) -> NodeConfig {
    let addrs = |list: &[&str]| list.iter().map(|a| a.parse().expect("multiaddr")).collect();
    NodeConfig {
        dir: dir.to_owned(),
        key_file: None,
        options: Options {
            role,
            listen: addrs(&[listen]),
            dial: addrs(dial),
            relays: if role == Role::Device {
                addrs(dial)
            } else {
                vec![]
            },
            mdns: false,
            open_relay: false,
            api: "127.0.0.1:0".parse().expect("address"),
            memory: fieldsync::MemoryOptions::default(),
            net: Default::default(),
            mirror: None,
            api_access: Default::default(),
            blobs: Default::default(),
        },
    }
}

#[test]
fn nodes_run_in_process_sync_and_stop_cleanly_on_their_shutdown_future() {
    let site = site(1);
    let device = &site.devices[0];
    let relay_addr = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (stop_relay, relay_stop) = tokio::sync::oneshot::channel::<()>();
    let (stop_device, device_stop) = tokio::sync::oneshot::channel::<()>();
    let relay = runtime.spawn(fieldsync_node::run(
        node(&site.relay, Role::Relay, &relay_addr, &[]),
        async {
            let _ = relay_stop.await;
        },
    ));
    let device_node = runtime.spawn(fieldsync_node::run(
        node(device, Role::Device, "/ip4/127.0.0.1/tcp/0", &[&relay_addr]),
        async {
            let _ = device_stop.await;
        },
    ));
    // (No CLI command before the nodes hold their stores: it would open the store itself.)
    for dir in [&site.relay, device] {
        eventually("the node serves its API", || {
            dir.join(fieldsync_node::daemon::DAEMON_FILE).exists()
        });
    }
    assert!(
        !relay.is_finished() && !device_node.is_finished(),
        "a node stopped early"
    );

    // The CLI's write goes through the device node's API, and syncs to the relay.
    let written = cli(
        device,
        &["put", "tasks", r#"{"title":"written in process"}"#],
    );
    let id = written["id"].as_str().expect("id").to_owned();
    eventually("the relay holds the device's task", || {
        try_stdout(&site.relay, &["get", "tasks", &id]).is_some()
    });

    stop_device.send(()).expect("device running");
    stop_relay.send(()).expect("relay running");
    for (name, task) in [("device", device_node), ("relay", relay)] {
        let result = runtime
            .block_on(async { tokio::time::timeout(support::WAIT, task).await })
            .unwrap_or_else(|_| panic!("{name} did not stop on its shutdown future"))
            .expect("node task");
        assert!(result.is_ok(), "{name} stopped with {:?}", result.err());
    }
    for dir in [&site.relay, device] {
        assert!(
            !dir.join(fieldsync_node::daemon::DAEMON_FILE).exists(),
            "a stopped node leaves no daemon.json"
        );
    }
    // Stopped, the nodes released their stores: the CLI opens them itself.
    let view = cli(&site.relay, &["get", "tasks", &id]);
    assert_eq!(view["title"], "written in process");
}
