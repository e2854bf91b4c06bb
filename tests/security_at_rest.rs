//! Data at rest and the trust of files (issue 16): stores encrypted with a passphrase or a
//! key file, bundles signed by the node that exported them, and erasure that leaves no byte
//! of a purged entity in any data directory and never lets it come back.

use std::path::Path;
use std::sync::Arc;

use fieldsync::core::bundle::{Bundle, Limits as BundleLimits};
use fieldsync::core::membership::MemberRole;
use fieldsync::core::protocol::Role;
use fieldsync::sync::{Config, Input};
use fieldsync::sync_host::Inline as Engine;
use fieldsync::{MemoryOptions, Replica, Secret};
use fieldsync_tests::{exchange, SCHEMA};

const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;

/// Whether any file under `dir` holds `needle`.
fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    let mut found = false;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found |= files_contain(&path, needle);
        } else if let Ok(bytes) = std::fs::read(&path) {
            found |= bytes.windows(needle.len()).any(|w| w == needle);
        }
    }
    found
}

fn key_file() -> Secret {
    Secret::KeyFile(b"0123456789abcdef0123456789abcdef".to_vec())
}

#[test]
fn an_encrypted_store_shows_no_content_and_opens_only_with_its_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hq");
    let marker = "Marker-Customer-Ana-Lopes-771";
    let id = {
        let hq = Replica::init_authority_with(
            &dir,
            SCHEMA,
            "hq",
            libp2p_identity::ed25519::Keypair::generate(),
            Some(&key_file()),
        )
        .unwrap();
        assert!(hq.status().unwrap().encrypted);
        let id = hq
            .put(
                "tasks",
                None,
                &format!(r#"{{"title": "{marker}", "status": "open"}}"#),
            )
            .unwrap();
        hq.put("tasks", Some(id), r#"{"status": "completed"}"#)
            .unwrap();
        id
    };
    assert!(
        !files_contain(&dir, marker.as_bytes()),
        "the task's title is readable in the data directory"
    );
    assert!(
        !files_contain(&dir, b"tasks"),
        "the collection name is readable in the data directory"
    );
    // No key, the wrong kind, the wrong key: each a clear error saying so, exit 2.
    let none = Replica::open(&dir).unwrap_err();
    assert!(
        none.to_string().contains("encrypted") && none.to_string().contains("a key file"),
        "{none}"
    );
    assert_eq!(none.kind(), fieldsync::ErrorKind::Invalid);
    let kind = Replica::open_with_key(&dir, MemoryOptions::default(), &mut |_| {
        Ok(Secret::Passphrase("hunter22".into()))
    })
    .unwrap_err();
    assert!(
        kind.to_string().contains("encrypted with a key file"),
        "{kind}"
    );
    let wrong = Replica::open_with_key(&dir, MemoryOptions::default(), &mut |_| {
        Ok(Secret::KeyFile(vec![1; 32]))
    })
    .unwrap_err();
    assert!(
        wrong.to_string().contains("does not open this store"),
        "{wrong}"
    );
    let hq =
        Replica::open_with_key(&dir, MemoryOptions::default(), &mut |_| Ok(key_file())).unwrap();
    let view = hq.get("tasks", id).unwrap();
    assert_eq!(
        (view["title"].as_str(), view["status"].as_str()),
        (Some(marker), Some("completed"))
    );
    assert_eq!(hq.history("tasks", id).unwrap().len(), 2);
}

#[test]
fn a_passphrase_store_syncs_like_any_other() {
    let tmp = tempfile::tempdir().unwrap();
    let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").unwrap();
    let pass = || Secret::Passphrase("correct horse battery".into());
    let dev_dir = tmp.path().join("ana");
    let dev = Replica::init_join_with(
        &dev_dir,
        &hq.invite(),
        "ana",
        libp2p_identity::ed25519::Keypair::generate(),
        Some(&pass()),
    )
    .unwrap();
    exchange(&dev, &hq).unwrap();
    let id = hq
        .put(
            "tasks",
            None,
            r#"{"title": "Marker-Boiler-9921", "status": "open"}"#,
        )
        .unwrap();
    exchange(&hq, &dev).unwrap();
    assert_eq!(dev.get("tasks", id).unwrap()["title"], "Marker-Boiler-9921");
    drop(dev);
    assert!(!files_contain(&dev_dir, b"Marker-Boiler-9921"));
    let dev = Replica::open_with_key(&dev_dir, MemoryOptions::default(), &mut |kind| {
        assert_eq!(kind, fieldsync::KeyKind::Passphrase);
        Ok(pass())
    })
    .unwrap();
    assert_eq!(dev.get("tasks", id).unwrap()["status"], "open");
}

#[test]
fn bundles_relabelled_as_another_members_or_tampered_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = fieldsync_tests::workspace(tmp.path(), &["ana", "bo"]).unwrap();
    let (ana, bo) = (&devices[0], &devices[1]);
    ana.put("tasks", None, r#"{"title": "from ana", "status": "open"}"#)
        .unwrap();
    let exported = ana.export_bundle(None, &mut |_, _| {}).unwrap();
    // Relabelled: the same entities under bo's name, re-signed with ana's key (all she has).
    let mut relabelled = Bundle::decode(&exported.bytes, BundleLimits::default()).unwrap();
    relabelled.header.from = bo.peer_id().to_string();
    relabelled.header.credential = bo.credential().unwrap();
    let ana_key = ana.keypair().try_into_ed25519().unwrap();
    let err = hq
        .import_bundle(&relabelled.encode(&ana_key), &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not by") && err.contains(&bo.peer_id().to_string()),
        "{err}"
    );
    // Tampered: one byte of an entity's document changed.
    let mut tampered = exported.bytes.clone();
    let at = tampered.len() - 200;
    tampered[at] ^= 0x01;
    assert!(hq.import_bundle(&tampered, &mut |_, _| {}).is_err());
    // Signed by a stranger's key under ana's name.
    let stranger = libp2p_identity::ed25519::Keypair::generate();
    let as_ana = Bundle::decode(&exported.bytes, BundleLimits::default()).unwrap();
    assert!(hq
        .import_bundle(&as_ana.encode(&stranger), &mut |_, _| {})
        .unwrap_err()
        .to_string()
        .contains("not by"));
    assert_eq!(
        hq.list_count("tasks"),
        0,
        "nothing of a refused bundle is applied"
    );
    // The honest bundle goes in.
    assert_eq!(
        hq.import_bundle(&exported.bytes, &mut |_, _| {})
            .unwrap()
            .created,
        1
    );
}

trait Count {
    fn list_count(&self, collection: &str) -> usize;
}

impl Count for Replica {
    fn list_count(&self, collection: &str) -> usize {
        let mut n = 0;
        self.list(collection, &[], false, &mut |_| {
            n += 1;
            true
        })
        .unwrap();
        n
    }
}

#[test]
fn a_purge_erases_an_entity_everywhere_and_it_never_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = fieldsync_tests::workspace(tmp.path(), &["ana"]).unwrap();
    let ana = &devices[0];
    let marker = "Marker-Erase-Me-Maria-Perez-5150";
    let id = ana
        .put(
            "tasks",
            None,
            &format!(r#"{{"title": "{marker}", "status": "open"}}"#),
        )
        .unwrap();
    ana.put(
        "tasks",
        Some(id),
        &format!(r#"{{"notes": "{marker} again"}}"#),
    )
    .unwrap();
    let keep = ana
        .put("tasks", None, r#"{"title": "Keep me", "status": "open"}"#)
        .unwrap();
    exchange(ana, &hq).unwrap();
    // A bundle made before the purge: an old file that must not bring the entity back.
    let old_bundle = ana.export_bundle(None, &mut |_, _| {}).unwrap();
    for name in ["hq", "ana"] {
        assert!(
            files_contain(&tmp.path().join(name), marker.as_bytes()),
            "{name} holds the marker before the purge (else this test proves nothing)"
        );
    }
    // A device may not purge.
    let refused = ana.purge("tasks", id).unwrap_err();
    assert!(
        refused.to_string().contains("authority or an admin"),
        "{refused}"
    );

    let record = hq.purge("tasks", id).unwrap();
    assert_eq!((record.entity, record.collection.as_str()), (id, "tasks"));
    assert!(hq.get("tasks", id).is_err() && hq.history("tasks", id).is_err());
    assert!(
        !files_contain(&tmp.path().join("hq"), marker.as_bytes()),
        "a byte of the purged entity is left in hq's files"
    );
    exchange(&hq, ana).unwrap();
    assert!(ana.is_purged(id).unwrap());
    assert!(ana.get("tasks", id).is_err());
    assert!(
        !files_contain(&tmp.path().join("ana"), marker.as_bytes()),
        "a byte of the purged entity is left in ana's files"
    );
    assert_eq!(ana.get("tasks", keep).unwrap()["title"], "Keep me");

    // Never again: an old bundle, a local write with its id, a re-import.
    let summary = hq.import_bundle(&old_bundle.bytes, &mut |_, _| {}).unwrap();
    assert_eq!(summary.purged, 1, "{summary:?}");
    assert!(hq.get("tasks", id).is_err());
    assert!(!files_contain(&tmp.path().join("hq"), marker.as_bytes()));
    let again = hq
        .put("tasks", Some(id), r#"{"title": "back"}"#)
        .unwrap_err();
    assert!(again.to_string().contains("was purged"), "{again}");
    let line = format!("{{\"_id\": \"{id}\", \"title\": \"back\"}}\n");
    assert!(hq
        .bulk_import("tasks", &line, &mut |_, _| {})
        .unwrap_err()
        .to_string()
        .contains("was purged"));
    // The record survives a restart, and is all that is left.
    drop(devices);
    let ana = Replica::open(&tmp.path().join("ana")).unwrap();
    assert_eq!(ana.purges().unwrap().len(), 1);
    assert_eq!(
        ana.import_bundle(&old_bundle.bytes, &mut |_, _| {})
            .unwrap()
            .purged,
        1
    );
    assert!(ana.get("tasks", id).is_err());
}

#[test]
fn an_admin_may_purge_and_a_purge_reaches_peers_over_sync() {
    let tmp = tempfile::tempdir().unwrap();
    let hq = Arc::new(Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").unwrap());
    let admin_invite = hq
        .issue_invite("office", MemberRole::Admin, Default::default(), WEEK_MS)
        .unwrap();
    let admin =
        Arc::new(Replica::init_join(&tmp.path().join("office"), &admin_invite, "office").unwrap());
    let dev = Arc::new(Replica::init_join(&tmp.path().join("ana"), &hq.invite(), "ana").unwrap());
    let mut engines = vec![
        Engine::new(hq.clone(), Config::default().with_role(Role::Relay)).unwrap(),
        Engine::new(admin.clone(), Config::default()).unwrap(),
        Engine::new(dev.clone(), Config::default()).unwrap(),
    ];
    let run = |engines: &mut Vec<Engine>| loop {
        let mut moved = false;
        for from in 0..engines.len() {
            while let Some((to, bytes)) = engines[from].poll_transmit() {
                let src = engines[from].replica().peer_id();
                if let Some(dst) =
                    (0..engines.len()).find(|&j| engines[j].replica().peer_id() == to)
                {
                    engines[dst].handle(Input::Frame(src, bytes)).unwrap();
                }
                moved = true;
            }
        }
        if !moved {
            return;
        }
    };
    for i in [1, 2] {
        let (pa, pb) = (
            engines[i].replica().peer_id(),
            engines[0].replica().peer_id(),
        );
        engines[i].handle(Input::Dialed(pb)).unwrap();
        engines[0].handle(Input::Connected(pa)).unwrap();
        run(&mut engines);
    }
    let marker = "Marker-Admin-Purge-3141";
    let id = dev
        .put(
            "tasks",
            None,
            &format!(r#"{{"title": "{marker}", "status": "open"}}"#),
        )
        .unwrap();
    engines[2].local_change().unwrap();
    run(&mut engines);
    assert_eq!(
        admin.get("tasks", id).unwrap()["title"],
        marker,
        "the task reached the admin through hq"
    );
    admin.purge("tasks", id).unwrap();
    engines[1].local_change().unwrap();
    run(&mut engines);
    for (name, r) in [("hq", &hq), ("office", &admin), ("ana", &dev)] {
        assert!(r.is_purged(id).unwrap(), "{name} has the purge");
        assert!(r.get("tasks", id).is_err(), "{name} still has the task");
        assert!(
            !files_contain(&tmp.path().join(name), marker.as_bytes()),
            "{name}'s files still hold the task"
        );
    }
}

#[test]
fn the_authority_key_survives_its_disk_through_an_encrypted_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = fieldsync_tests::workspace(tmp.path(), &["ana"]).unwrap();
    let ana = &devices[0];
    let pass = || Secret::Passphrase("office safe 2026".into());
    let backup = hq.export_authority(&pass()).unwrap();
    assert!(
        !backup
            .windows(hq.workspace().id.to_string().len())
            .any(|w| w == hq.workspace().id.to_string().as_bytes()),
        "the backup is not in clear"
    );
    assert!(
        ana.export_authority(&pass()).is_err(),
        "only the authority has the key"
    );
    let id = ana.put("payments", None, r#"{"amount": 50}"#).unwrap();
    let (ws, peer) = (hq.workspace().id, hq.peer_id());
    drop(hq);
    std::fs::remove_dir_all(tmp.path().join("hq")).unwrap(); // the disk dies

    let wrong = Replica::init_restore(
        &tmp.path().join("hq2"),
        &backup,
        &Secret::Passphrase("office safe 2025".into()),
        None,
    )
    .unwrap_err();
    assert!(wrong.to_string().contains("does not open"), "{wrong}");
    assert!(
        !tmp.path().join("hq2").exists(),
        "nothing is created on a wrong passphrase"
    );
    let hq2 = Replica::init_restore(&tmp.path().join("hq2"), &backup, &pass(), Some(&key_file()))
        .unwrap();
    assert_eq!(
        (hq2.workspace().id, hq2.peer_id(), hq2.is_authority()),
        (ws, peer, true)
    );
    // The devices bring the data (and the member list) back; the restored key confirms.
    exchange(ana, &hq2).unwrap();
    assert_eq!(hq2.members().unwrap().len(), 1);
    let proposal = hq2
        .proposals()
        .unwrap()
        .into_iter()
        .find(|p| p.entity == id)
        .expect("ana's payment is pending at the restored authority");
    assert_eq!(ana.my_proposals().unwrap().len(), 1);
    hq2.accept(proposal.id).unwrap();
    exchange(&hq2, ana).unwrap();
    assert!(
        ana.my_proposals().unwrap().is_empty(),
        "the restored authority's confirmation verifies on the device"
    );
    assert_eq!(ana.get("payments", id).unwrap()["amount"], 50);
}

#[test]
fn a_node_that_purged_an_entity_never_fetches_it_again_from_an_old_peer() {
    use fieldsync::core::protocol::Frame;
    let tmp = tempfile::tempdir().unwrap();
    let (hq, devices) = fieldsync_tests::workspace(tmp.path(), &["bo"]).unwrap();
    let bo = Arc::new(devices.into_iter().next().unwrap());
    let id = bo
        .put("tasks", None, r#"{"title": "Old copy", "status": "open"}"#)
        .unwrap();
    exchange(&bo, &hq).unwrap();
    hq.purge("tasks", id).unwrap();
    // bo was away: it still holds the task, edits it, and offers it when it reconnects.
    bo.put("tasks", Some(id), r#"{"status": "in_progress"}"#)
        .unwrap();
    let hq = Arc::new(hq);
    let mut hq_engine = Engine::new(hq.clone(), Config::default().with_role(Role::Relay)).unwrap();
    let mut bo_engine = Engine::new(bo.clone(), Config::default()).unwrap();
    let (ph, pb) = (hq.peer_id(), bo.peer_id());
    bo_engine.handle(Input::Dialed(ph)).unwrap();
    hq_engine.handle(Input::Connected(pb)).unwrap();
    let (mut wanted_by_hq, mut offered_by_bo) = (Vec::new(), Vec::new());
    loop {
        let mut moved = false;
        while let Some((_, bytes)) = bo_engine.poll_transmit() {
            if let Ok(Frame::Offer { entries, .. }) = Frame::decode(&bytes, 16 << 20) {
                offered_by_bo.extend(entries.into_iter().map(|e| e.id));
            }
            hq_engine.handle(Input::Frame(pb, bytes)).unwrap();
            moved = true;
        }
        while let Some((_, bytes)) = hq_engine.poll_transmit() {
            if let Ok(Frame::Want { wants, .. }) = Frame::decode(&bytes, 16 << 20) {
                wanted_by_hq.extend(wants.into_iter().map(|w| w.id));
            }
            bo_engine.handle(Input::Frame(ph, bytes)).unwrap();
            moved = true;
        }
        if !moved {
            break;
        }
    }
    assert!(
        offered_by_bo.contains(&id),
        "bo offered its copy: {offered_by_bo:?}"
    );
    assert!(
        !wanted_by_hq.contains(&id),
        "hq asked for the entity it purged: {wanted_by_hq:?}"
    );
    assert!(bo.is_purged(id).unwrap(), "the purge reached bo");
    assert!(bo.get("tasks", id).is_err());
    assert!(hq.get("tasks", id).is_err());
}
