//! The engine at the frame level: strangers, wrong versions, malformed, oversized and
//! replayed frames end the session with a reason or change nothing, and nothing stored is
//! lost.

use std::sync::Arc;

use fieldsync::core::protocol::{Frame, Limits, Role};
use fieldsync::sync::{Config, Event, Input};
use fieldsync::sync_host::Inline as Engine;
use fieldsync::Replica;
use fieldsync_tests::SCHEMA;

struct Pair {
    _tmp: tempfile::TempDir,
    a: Engine,
    b: Engine,
}

fn engines(same_workspace: bool) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let a = Arc::new(Replica::init_authority(&tmp.path().join("a"), SCHEMA, "a").unwrap());
    let b = if same_workspace {
        Arc::new(Replica::init_join(&tmp.path().join("b"), &a.invite(), "b").unwrap())
    } else {
        Arc::new(Replica::init_authority(&tmp.path().join("b"), SCHEMA, "b").unwrap())
    };
    let cfg = Config::default()
        .with_role(Role::Device)
        .with_limits(Limits {
            max_frame: 64 << 10,
            ..Default::default()
        });
    Pair {
        a: Engine::new(a, cfg.clone()).unwrap(),
        b: Engine::new(b, cfg).unwrap(),
        _tmp: tmp,
    }
}

/// Shuttles frames both ways until none are left; returns every frame a sent to b.
fn run(p: &mut Pair) -> Vec<Vec<u8>> {
    let (pa, pb) = (p.a.replica().peer_id(), p.b.replica().peer_id());
    let mut a_to_b = Vec::new();
    loop {
        let mut moved = false;
        while let Some((_, bytes)) = p.a.poll_transmit() {
            a_to_b.push(bytes.clone());
            p.b.handle(Input::Frame(pa, bytes)).unwrap();
            moved = true;
        }
        while let Some((_, bytes)) = p.b.poll_transmit() {
            p.a.handle(Input::Frame(pb, bytes)).unwrap();
            moved = true;
        }
        if !moved {
            return a_to_b;
        }
    }
}

fn connect(p: &mut Pair) {
    let (pa, pb) = (p.a.replica().peer_id(), p.b.replica().peer_id());
    p.a.handle(Input::Dialed(pb)).unwrap();
    p.b.handle(Input::Connected(pa)).unwrap();
}

fn events(e: &mut Engine) -> Vec<Event> {
    std::iter::from_fn(|| e.poll_event()).collect()
}

fn failure(events: &[Event]) -> Option<String> {
    events.iter().find_map(|e| match e {
        Event::SessionFailed { reason, .. } => Some(reason.clone()),
        _ => None,
    })
}

#[test]
fn another_workspace_is_refused_on_both_sides_before_any_data() {
    let mut p = engines(false);
    p.a.replica()
        .put("tasks", None, r#"{"title":"secret"}"#)
        .unwrap();
    connect(&mut p);
    run(&mut p);
    let (ea, eb) = (events(&mut p.a), events(&mut p.b));
    assert!(failure(&ea).unwrap().contains("workspace"), "{ea:?}");
    assert!(failure(&eb).unwrap().contains("workspace"), "{eb:?}");
    assert_eq!(
        p.b.replica().status().unwrap().feed_seq,
        0,
        "data crossed to a stranger"
    );
}

#[test]
fn a_wrong_version_is_refused_with_a_reason() {
    let mut p = engines(true);
    let pa = p.a.replica().peer_id();
    p.b.handle(Input::Connected(pa)).unwrap();
    let hello = Frame::Hello {
        version: 99,
        credential: None,
    };
    p.b.handle(Input::Frame(pa, hello.encode())).unwrap();
    let reason = failure(&events(&mut p.b)).unwrap();
    assert!(reason.contains("version 99"), "{reason}");
    let goodbye = std::iter::from_fn(|| p.b.poll_transmit()).last().unwrap().1;
    assert!(matches!(
        Frame::decode(&goodbye, 1 << 20).unwrap(),
        Frame::Goodbye { .. }
    ));
}

#[test]
fn malformed_truncated_and_oversized_frames_end_the_session_and_lose_nothing() {
    for bad in [
        b"\xff\xfe not cbor".to_vec(),
        Frame::Ack { upto: 3 }.encode()[..2].to_vec(),
        vec![0u8; 70 << 10],
    ] {
        let mut p = engines(true);
        let id =
            p.b.replica()
                .put("tasks", None, r#"{"title":"mine"}"#)
                .unwrap();
        connect(&mut p);
        run(&mut p);
        events(&mut p.b);
        let before = p.b.replica().status().unwrap().feed_seq;
        let pa = p.a.replica().peer_id();
        p.b.handle(Input::Frame(pa, bad)).unwrap();
        let reason = failure(&events(&mut p.b)).expect("session ends");
        assert!(
            reason.contains("malformed") || reason.contains("limit"),
            "{reason}"
        );
        assert_eq!(
            p.b.engine
                .security()
                .protocol_violations
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "counted"
        );
        assert_eq!(p.b.replica().status().unwrap().feed_seq, before);
        assert_eq!(p.b.replica().get("tasks", id).unwrap()["title"], "mine");
        assert!(p.b.engine.peers().is_empty(), "the session is gone");
    }
}

#[test]
fn replayed_and_duplicated_frames_change_nothing() {
    let mut p = engines(true);
    for i in 0..20 {
        p.a.replica()
            .put("tasks", None, &format!(r#"{{"title":"t{i}"}}"#))
            .unwrap();
    }
    connect(&mut p);
    let sent = run(&mut p);
    assert_eq!(p.b.replica().status().unwrap().entities["tasks"], 20);
    let views = |e: &Engine| {
        let mut v = Vec::new();
        e.replica()
            .list("tasks", &[], true, &mut |x| {
                v.push(x);
                true
            })
            .unwrap();
        v
    };
    let before = (views(&p.b), p.b.replica().status().unwrap().feed_seq);
    // Every frame again, in reverse order, twice.
    let pa = p.a.replica().peer_id();
    for bytes in sent.iter().rev().chain(sent.iter()) {
        p.b.handle(Input::Frame(pa, bytes.clone())).unwrap();
    }
    run(&mut p);
    assert!(failure(&events(&mut p.b)).is_none());
    assert_eq!(
        (views(&p.b), p.b.replica().status().unwrap().feed_seq),
        before
    );
    assert!(
        p.b.engine
            .security()
            .frames_ignored
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "replays are counted"
    );
}

fn count(r: &Replica, collection: &str) -> u64 {
    let counts = r.status().unwrap().entities;
    counts.get(collection).and_then(|v| v.as_u64()).unwrap_or(0)
}

#[test]
fn collections_with_a_priority_come_first_on_a_short_connection() {
    for prioritised in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let schema = if prioritised {
            SCHEMA.replace(
                "[collections.payments]\n",
                "[collections.payments]\npriority = 10\n",
            )
        } else {
            SCHEMA.to_owned()
        };
        assert_eq!(prioritised, schema.contains("priority = 10"));
        let hq = Arc::new(Replica::init_authority(&tmp.path().join("hq"), &schema, "hq").unwrap());
        let dev =
            Arc::new(Replica::init_join(&tmp.path().join("dev"), &hq.invite(), "dev").unwrap());
        for i in 0..300 {
            hq.put("tasks", None, &fieldsync_tests::ten_field_task(i))
                .unwrap();
        }
        for amount in [10, 20, 30] {
            hq.put("payments", None, &format!(r#"{{"amount": {amount}}}"#))
                .unwrap();
        }
        let cfg = Config::default().with_limits(Limits {
            page_entities: 50,
            window: 1,
            ..Default::default()
        });
        let mut p = Pair {
            a: Engine::new(hq, cfg.clone().with_role(Role::Relay)).unwrap(),
            b: Engine::new(dev.clone(), cfg).unwrap(),
            _tmp: tmp,
        };
        let (pa, pb) = (p.a.replica().peer_id(), p.b.replica().peer_id());
        p.b.handle(Input::Dialed(pa)).unwrap();
        p.a.handle(Input::Connected(pb)).unwrap();
        // One frame at a time from hq; the connection drops right after the first page
        // the device applied.
        let mut sent = 0;
        while count(&dev, "tasks") + count(&dev, "payments") == 0 {
            while let Some((_, bytes)) = p.b.poll_transmit() {
                p.a.handle(Input::Frame(pb, bytes)).unwrap();
            }
            let (_, bytes) = p.a.poll_transmit().expect("hq has more to send");
            p.b.handle(Input::Frame(pa, bytes)).unwrap();
            sent += 1;
            assert!(sent < 20, "no page arrived");
        }
        let (tasks, payments) = (count(&dev, "tasks"), count(&dev, "payments"));
        assert!(tasks <= 50, "one page at most: {tasks} tasks");
        if prioritised {
            assert_eq!(payments, 3, "the payments came with the first page");
        } else {
            assert_eq!(
                (tasks, payments),
                (50, 0),
                "feed order: the oldest tasks first"
            );
        }
    }
}
