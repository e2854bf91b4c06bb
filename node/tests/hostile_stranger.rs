//! A stranger built from the project's own code (libp2p with the sync protocol's framing and
//! `Frame` codec) against a real `fieldsync relay` on 127.0.0.1: it learns nothing but the
//! refusal (the only frame it receives is a `Goodbye` with the reason, also for an oversized
//! frame), is gone from `/v1/status` and the peers gauge within a second, and its circuit
//! relay reservation is refused and counted — while a member device's reservation is granted.

mod support;

use std::time::{Duration, Instant};

use fieldsync::core::protocol::{Frame, VERSION};
use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{noise, relay, tcp, yamux, Multiaddr, PeerId, StreamProtocol};
use serde_json::Value;
use support::{bin, Daemon, SCHEMA, WAIT};

#[derive(NetworkBehaviour)]
struct Stranger {
    stream: libp2p_stream::Behaviour,
    relay_client: relay::client::Behaviour,
}

fn stranger() -> libp2p::Swarm<Stranger> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .expect("tcp")
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .expect("relay client")
        .with_behaviour(|_, relay_client| Stranger {
            stream: libp2p_stream::Behaviour::new(),
            relay_client,
        })
        .expect("behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build()
}

/// Drives the swarm until `done` says stop (returns its value), or panics after `WAIT`.
async fn drive<T>(
    swarm: &mut libp2p::Swarm<Stranger>,
    what: &str,
    mut done: impl FnMut(&SwarmEvent<StrangerEvent>) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, swarm.select_next_some())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
        if let Some(v) = done(&event) {
            return v;
        }
    }
}

/// Every frame the relay sends on the stream until it closes it.
async fn frames_until_closed(stream: &mut libp2p::Stream) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        let mut len = [0u8; 4];
        if stream.read_exact(&mut len).await.is_err() {
            return frames;
        }
        let mut bytes = vec![0u8; u32::from_be_bytes(len) as usize];
        stream.read_exact(&mut bytes).await.expect("a whole frame");
        frames.push(Frame::decode(&bytes, 16 << 20).expect("a valid frame"));
    }
}

fn metric(api: &str, name: &str) -> u64 {
    let text = ureq::get(format!("{api}/metrics"))
        .call()
        .expect("metrics")
        .body_mut()
        .read_to_string()
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

fn status(api: &str) -> Value {
    ureq::get(format!("{api}/v1/status"))
        .call()
        .expect("status")
        .body_mut()
        .read_json()
        .expect("json")
}

/// Connects a stranger, opens the sync stream, sends `first` raw bytes, and returns every
/// frame it gets back and the stranger's peer id.
async fn try_session(
    relay_addr: &Multiaddr,
    relay_peer: PeerId,
    first: Vec<u8>,
) -> (Vec<Frame>, PeerId, libp2p::Swarm<Stranger>) {
    let mut s = stranger();
    let me = *s.local_peer_id();
    s.dial(relay_addr.clone()).expect("dial");
    drive(&mut s, "the connection", |e| {
        matches!(e, SwarmEvent::ConnectionEstablished { .. }).then_some(())
    })
    .await;
    let mut control = s.behaviour().stream.new_control();
    let open = tokio::spawn(async move {
        let mut stream = control
            .open_stream(relay_peer, StreamProtocol::new("/fieldsync/sync/1"))
            .await
            .expect("open the sync stream");
        stream.write_all(&first).await.expect("write");
        stream.flush().await.expect("flush");
        tokio::time::timeout(WAIT, frames_until_closed(&mut stream))
            .await
            .expect("the relay closes the stream")
    });
    // Keep the swarm polled while the stream task talks.
    tokio::pin!(open);
    let mut closed = false;
    let frames = loop {
        tokio::select! {
            e = s.select_next_some() => closed |= matches!(e, SwarmEvent::ConnectionClosed { .. }),
            frames = &mut open => break frames.expect("stream task"),
        }
    };
    // The relay closes the connection of a peer it refused (after the Goodbye is written).
    if !closed {
        drive(&mut s, "the relay to close the connection", |e| {
            matches!(e, SwarmEvent::ConnectionClosed { .. }).then_some(())
        })
        .await;
    }
    (frames, me, s)
}

fn framed(frame: &Frame) -> Vec<u8> {
    let bytes = frame.encode();
    let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
    out.extend(bytes);
    out
}

#[test]
fn a_stranger_learns_nothing_but_the_refusal_and_leaves_no_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let schema = tmp.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let relay_dir = tmp.path().join("relay");
    assert!(bin()
        .arg("--data")
        .arg(&relay_dir)
        .args([
            "init",
            "--schema",
            schema.to_str().unwrap(),
            "--name",
            "relay"
        ])
        .output()
        .unwrap()
        .status
        .success());
    let invite = tmp.path().join("invite.json");
    std::fs::write(
        &invite,
        bin()
            .arg("--data")
            .arg(&relay_dir)
            .arg("invite")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let device_dir = tmp.path().join("device");
    assert!(bin()
        .arg("--data")
        .arg(&device_dir)
        .args([
            "init",
            "--join",
            invite.to_str().unwrap(),
            "--name",
            "device"
        ])
        .output()
        .unwrap()
        .status
        .success());

    let mut relay = Daemon::start(
        &relay_dir,
        &[
            "relay",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ],
    );
    let addr: Multiaddr = relay.wait_for("listening")["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let api = format!("http://{}", relay.wait_for("api")["addr"].as_str().unwrap());
    let relay_peer = match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => p,
        _ => panic!("no peer id in {addr}"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();

    // 1. A Hello with no credential: the only answer is a Goodbye saying why.
    let (frames, stranger_peer, _s) = rt.block_on(try_session(
        &addr,
        relay_peer,
        framed(&Frame::Hello {
            version: VERSION,
            credential: None,
        }),
    ));
    match frames.as_slice() {
        [Frame::Goodbye { reason, .. }] => assert!(reason.contains("not a member"), "{reason}"),
        other => panic!("the stranger got more (or less) than the refusal: {other:?}"),
    }
    // …its connection was closed by the relay (`try_session` waits for that), and within a second it is gone from the status and the gauge, listed as refused.
    let refused_at = Instant::now();
    loop {
        let st = status(&api);
        let gone = st["peers"].get(stranger_peer.to_string()).is_none()
            && metric(&api, "fieldsync_peers_connected") == 0;
        let listed = st["refused_peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["peer"] == stranger_peer.to_string());
        if gone && listed {
            break;
        }
        assert!(
            refused_at.elapsed() < Duration::from_secs(1),
            "the refused stranger is still in the status: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // 2. An oversized frame (length prefix over the limit) is refused with the reason too.
    let (frames, _, _s) = rt.block_on(try_session(
        &addr,
        relay_peer,
        u32::MAX.to_be_bytes().to_vec(),
    ));
    match frames.as_slice() {
        [Frame::Goodbye { reason, .. }] => assert!(reason.contains("limit"), "{reason}"),
        other => panic!("an oversized frame got {other:?}"),
    }

    // …and so is a first frame announced larger than any Hello (1 MiB, under the frame
    // limit): the relay refuses on the length prefix, before reading any of the body. Only
    // the prefix is sent: the relay closes the connection after its Goodbye, and closing a
    // TCP socket with unread bytes in it resets the connection, which can discard the
    // Goodbye before the stranger reads it.
    let big = (1u32 << 20).to_be_bytes().to_vec();
    let (frames, _, _s) = rt.block_on(try_session(&addr, relay_peer, big));
    match frames.as_slice() {
        [Frame::Goodbye { reason, .. }] => assert!(reason.contains("first frame"), "{reason}"),
        other => panic!("a large first frame got {other:?}"),
    }

    // 3. A stranger's circuit reservation is refused and counted…
    let refused_before = metric(&api, "fieldsync_relay_refused_total");
    let mut s = stranger();
    s.listen_on(addr.clone().with(libp2p::multiaddr::Protocol::P2pCircuit))
        .unwrap();
    let outcome = rt.block_on(drive(&mut s, "the reservation's outcome", |e| match e {
        SwarmEvent::ListenerClosed { reason: Err(e), .. } => Some(Err(e.to_string())),
        SwarmEvent::ListenerClosed { reason: Ok(()), .. } => Some(Err("closed".into())),
        SwarmEvent::NewListenAddr { address, .. } => Some(Ok(address.clone())),
        _ => None,
    }));
    assert!(
        outcome.is_err(),
        "a stranger got a reservation: {outcome:?}"
    );
    assert!(
        metric(&api, "fieldsync_relay_refused_total") > refused_before,
        "the refusal is counted: {outcome:?}"
    );

    // …while a member device's is granted (it listens through the relay).
    let mut device = Daemon::start(
        &device_dir,
        &[
            "run",
            "--relay",
            &addr.to_string(),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
        ],
    );
    let circuit = device.wait_until("a relayed address", |v| {
        v["event"] == "listening"
            && v["addr"]
                .as_str()
                .is_some_and(|a| a.contains("p2p-circuit"))
    });
    assert!(
        circuit["addr"]
            .as_str()
            .unwrap()
            .contains(&relay_peer.to_string()),
        "{circuit}"
    );

    // The relay's API refuses an overflowing increment with 400 naming the field, as JSON.
    let auth = support::bearer(&relay_dir);
    let created: Value = ureq::post(format!("{api}/v1/collections/inventory"))
        .header("authorization", &auth)
        .send(r#"{"stock":9007199254740991}"#)
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    let url = format!(
        "{api}/v1/collections/inventory/{}",
        created["id"].as_str().unwrap()
    );
    let resp = ureq::patch(&url)
        .header("authorization", &auth)
        .config()
        .http_status_as_error(false)
        .build()
        .send(r#"{"stock":{"$inc":1}}"#)
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.into_body().read_json().unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("\"stock\""),
        "{body}"
    );
    let view: Value = ureq::get(&url)
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap();
    assert_eq!(view["stock"], 9007199254740991i64);
}
