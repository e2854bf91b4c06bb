//! An installer photographs a finished job: the photo goes into the node's blob store,
//! then its reference onto the job. A reference to a file the node does not hold is
//! refused, one that came from another node is kept as it is, and blobs no live job
//! references are collected after the grace period, never while referenced.

use std::time::Duration;

use fieldsync::blobs::Hash;
use fieldsync::{Error, Replica};
use serde_json::{json, Value};

const SCHEMA: &str = r#"
[collections.jobs.fields]
photos = { rule = "attachments" }
tags   = { rule = "set" }
"#;

fn photo(replica: &Replica, bytes: &[u8], name: &str) -> Value {
    let stored = replica
        .blobs()
        .expect("blob store")
        .write_from(&mut &bytes[..], Some(bytes.len() as u64))
        .expect("store the photo");
    json!({ "hash": stored.hash.to_string(), "size": stored.size, "mime": "image/jpeg", "name": name })
}

fn photos(replica: &Replica, id: fieldsync::EntityId) -> Vec<Value> {
    let view = replica.get("jobs", id).expect("job");
    view.get("photos")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_stored_photo_is_attached_and_shown_in_the_view_and_status() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").expect("init");
    let job = hq
        .put("jobs", None, r#"{"title": "Fit boiler"}"#)
        .expect("job");
    let reference = photo(&hq, &[7u8; 5000], "boiler.jpg");
    let attached = hq
        .attach("jobs", job, "photos", &reference)
        .expect("attach");
    assert_eq!(attached.to_json(), reference);
    assert_eq!(photos(&hq, job), vec![reference.clone()]);
    // The same photo again is the same reference; another photo joins it.
    hq.attach("jobs", job, "photos", &reference).expect("again");
    let second = photo(&hq, b"another", "meter.jpg");
    hq.attach("jobs", job, "photos", &second).expect("second");
    assert_eq!(photos(&hq, job).len(), 2);
    let status = hq.status().expect("status");
    assert_eq!((status.blobs.count, status.blobs.bytes), (2, 5007));
}

#[test]
fn a_reference_to_a_file_not_held_here_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").expect("init");
    let job = hq
        .put("jobs", None, r#"{"title": "Fit boiler"}"#)
        .expect("job");
    let missing = json!({ "hash": Hash::of(b"never stored").to_string(), "size": 12, "mime": "image/png", "name": "x.png" });
    let err = hq
        .attach("jobs", job, "photos", &missing)
        .expect_err("refused");
    assert!(matches!(err, Error::BlobMissing { .. }), "{err}");
    assert_eq!(err.kind(), fieldsync::ErrorKind::Invalid);
    // The plain write path checks it too, on creation and on update.
    let patch = json!({ "photos": { "$add": [missing.clone()] } }).to_string();
    assert!(matches!(
        hq.put("jobs", Some(job), &patch),
        Err(Error::BlobMissing { .. })
    ));
    let create = json!({ "photos": [missing] }).to_string();
    assert!(matches!(
        hq.put("jobs", None, &create),
        Err(Error::BlobMissing { .. })
    ));
    // A size that is not the blob's is refused.
    let mut wrong = photo(&hq, b"twelve bytes", "y.jpg");
    wrong["size"] = json!(13);
    assert!(matches!(
        hq.attach("jobs", job, "photos", &wrong),
        Err(Error::BlobSizeMismatch {
            claimed: 13,
            actual: 12,
            ..
        })
    ));
    assert!(photos(&hq, job).is_empty());
    // Only attachments fields take attachments; only existing entities get them.
    let ok = photo(&hq, b"fine", "z.jpg");
    assert!(matches!(
        hq.attach("jobs", job, "tags", &ok),
        Err(Error::NotAttachments { .. })
    ));
    let nobody = fieldsync::EntityId(uuid::Uuid::now_v7());
    let err = hq
        .attach("jobs", nobody, "photos", &ok)
        .expect_err("no such job");
    assert_eq!(err.kind(), fieldsync::ErrorKind::NotFound);
    let mut bad = ok.clone();
    bad["hash"] = json!("not-a-hash");
    assert_eq!(
        hq.attach("jobs", job, "photos", &bad)
            .expect_err("bad")
            .kind(),
        fieldsync::ErrorKind::Invalid
    );
}

#[test]
fn references_from_another_node_are_kept_without_their_bytes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").expect("init");
    let device = Replica::init_join(&tmp.path().join("dev"), &hq.invite(), "ana").expect("join");
    let job = hq
        .put("jobs", None, r#"{"title": "Fit boiler"}"#)
        .expect("job");
    let from_hq = photo(&hq, b"taken at the office", "office.jpg");
    hq.attach("jobs", job, "photos", &from_hq).expect("attach");
    let bundle = hq.export_bundle(None, &mut |_, _| {}).expect("export");
    device
        .import_bundle(&bundle.bytes, &mut |_, _| {})
        .expect("import");
    assert_eq!(photos(&device, job), vec![from_hq.clone()]);
    assert_eq!(device.status().expect("status").blobs.count, 0);
    // The device writes beside it, even listing the reference it has no bytes for.
    let own = photo(&device, b"taken on site", "site.jpg");
    let patch = json!({ "photos": [from_hq, own], "tags": ["done"] }).to_string();
    device
        .put("jobs", Some(job), &patch)
        .expect("write beside a foreign reference");
    assert_eq!(photos(&device, job).len(), 2);
}

#[test]
fn unreferenced_blobs_go_after_the_grace_period_and_referenced_ones_stay() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").expect("init");
    let kept_job = hq.put("jobs", None, r#"{"title": "kept"}"#).expect("job");
    let gone_job = hq
        .put("jobs", None, r#"{"title": "deleted"}"#)
        .expect("job");
    let kept = photo(&hq, b"kept photo", "kept.jpg");
    let gone = photo(&hq, b"photo of a deleted job", "gone.jpg");
    let loose = photo(&hq, b"uploaded, never attached", "loose.jpg");
    hq.attach("jobs", kept_job, "photos", &kept)
        .expect("attach kept");
    hq.attach("jobs", gone_job, "photos", &gone)
        .expect("attach gone");
    // Within the grace period nothing goes, referenced or not.
    assert!(hq
        .collect_blobs(Duration::from_secs(3600))
        .expect("gc")
        .is_empty());
    hq.delete("jobs", gone_job).expect("delete");
    std::thread::sleep(Duration::from_millis(50));
    let mut removed: Vec<String> = hq
        .collect_blobs(Duration::from_millis(10))
        .expect("gc")
        .iter()
        .map(Hash::to_string)
        .collect();
    removed.sort();
    let mut expected = vec![
        gone["hash"].as_str().expect("h").to_owned(),
        loose["hash"].as_str().expect("h").to_owned(),
    ];
    expected.sort();
    assert_eq!(removed, expected);
    let store = hq.blobs().expect("store");
    assert!(store.contains(&kept["hash"].as_str().expect("h").parse().expect("hash")));
    assert_eq!(hq.status().expect("status").blobs.count, 1);
    // Referenced, it stays however old it is.
    std::thread::sleep(Duration::from_millis(50));
    assert!(hq.collect_blobs(Duration::ZERO).expect("gc").is_empty());
}

#[test]
fn an_encrypted_store_refuses_attachments_rather_than_keep_files_in_the_clear() {
    let tmp = tempfile::tempdir().expect("tmp");
    let secret = fieldsync::Secret::KeyFile(fieldsync::generate_key_file());
    let hq = Replica::init_authority_with(
        &tmp.path().join("hq"),
        SCHEMA,
        "hq",
        libp2p_identity::ed25519::Keypair::generate(),
        Some(&secret),
    )
    .expect("init");
    assert!(matches!(hq.blobs(), Err(Error::BlobsEncrypted)));
    assert_eq!(hq.status().expect("status").blobs.count, 0);
    assert!(!tmp.path().join("hq").join(fieldsync::BLOBS_DIR).exists());
}

#[test]
fn a_file_is_served_only_to_members_that_may_see_an_entity_referencing_it() {
    use fieldsync::core::membership::MemberRole;
    use fieldsync::core::Access;
    let tmp = tempfile::tempdir().expect("tmp");
    let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").expect("init");
    let member = |name: &str, access: Access| {
        let invite = hq
            .issue_invite(
                name,
                MemberRole::Device,
                [("jobs".to_owned(), access)].into(),
                3_600_000,
            )
            .expect("invite");
        let d = Replica::init_join(&tmp.path().join(name), &invite, name).expect("join");
        // Presenting the invite (here in a bundle) makes it a member.
        let bundle = d.export_bundle(None, &mut |_, _| {}).expect("export");
        hq.import_bundle(&bundle.bytes, &mut |_, _| {})
            .expect("import");
        d.peer_id()
    };
    let office = member("office", Access::All);
    let outsider = member("outsider", Access::None);
    let job = hq
        .put("jobs", None, r#"{"title": "Fit boiler"}"#)
        .expect("job");
    let attached = photo(&hq, b"the boiler, fitted", "boiler.jpg");
    hq.attach("jobs", job, "photos", &attached).expect("attach");
    let loose: Hash = photo(&hq, b"never attached", "loose.jpg")["hash"]
        .as_str()
        .expect("hash")
        .parse()
        .expect("hash");
    let hash: Hash = attached["hash"]
        .as_str()
        .expect("hash")
        .parse()
        .expect("hash");
    assert!(hq.may_serve_blob(&office, &hash).expect("check"));
    assert!(
        !hq.may_serve_blob(&outsider, &hash).expect("check"),
        "partition none"
    );
    assert!(
        !hq.may_serve_blob(&office, &loose).expect("check"),
        "no entity references it"
    );
    let stranger =
        libp2p_identity::PublicKey::from(libp2p_identity::ed25519::Keypair::generate().public())
            .to_peer_id();
    assert!(
        !hq.may_serve_blob(&stranger, &hash).expect("check"),
        "not a member"
    );
    // Once the job is deleted, nobody gets the file.
    hq.delete("jobs", job).expect("delete");
    assert!(!hq.may_serve_blob(&office, &hash).expect("check"));
}

#[test]
fn a_purge_erases_the_entitys_photos_at_once_but_not_one_another_job_shares() {
    let tmp = tempfile::tempdir().expect("tmp");
    let hq = Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").expect("init");
    let (erased, other) = (
        hq.put("jobs", None, r#"{"title": "Maria's kitchen"}"#)
            .expect("job"),
        hq.put("jobs", None, r#"{"title": "Shared van"}"#)
            .expect("job"),
    );
    let own = photo(&hq, b"Marker-Photo-Of-Maria-Perez-1234", "maria.jpg");
    let shared = photo(&hq, b"a photo of the van both jobs used", "van.jpg");
    hq.attach("jobs", erased, "photos", &own).expect("attach");
    hq.attach("jobs", erased, "photos", &shared)
        .expect("attach");
    hq.attach("jobs", other, "photos", &shared).expect("attach");
    let held = |r: &Value| {
        let hash: Hash = r["hash"].as_str().expect("hash").parse().expect("hash");
        hq.blobs().expect("blobs").path(&hash).is_file()
    };
    assert!(held(&own) && held(&shared));
    hq.purge("jobs", erased).expect("purge");
    assert!(!held(&own), "the purged job's photo is still on disk");
    assert!(held(&shared), "a photo another job references was removed");
    assert_eq!(photos(&hq, other), vec![shared]);
}

/// What a browser tab keeps in IndexedDB, as the replica sees it.
#[derive(Default)]
struct Held(std::sync::Mutex<std::collections::HashMap<Hash, u64>>);

impl fieldsync::HeldBlobs for Held {
    fn pin(&self, hash: &Hash) -> Option<u64> {
        self.0.lock().expect("held").get(hash).copied()
    }
}

/// A node that keeps its files outside a blob store on disk (a browser tab) writes a
/// reference only to a file its `HeldBlobs` holds, with that size; nothing else changes.
#[test]
fn a_node_with_held_blobs_references_only_what_it_holds() {
    let held = std::sync::Arc::new(Held::default());
    let hq = Replica::init_authority_on(
        std::sync::Arc::new(fieldsync_store::MemoryStore::new()),
        std::path::Path::new("tab"),
        SCHEMA,
        "tab",
        libp2p_identity::ed25519::Keypair::generate(),
    )
    .expect("init")
    .with_held_blobs(held.clone());
    let job = hq.put("jobs", None, "{}").expect("job");
    let bytes = b"a photo in IndexedDB";
    let hash = Hash::of(bytes);
    let reference = json!({ "hash": hash.to_string(), "size": bytes.len(), "mime": "image/jpeg", "name": "p.jpg" });
    assert!(matches!(
        hq.attach("jobs", job, "photos", &reference),
        Err(Error::BlobMissing { .. })
    ));
    held.0
        .lock()
        .expect("held")
        .insert(hash, bytes.len() as u64);
    let wrong =
        json!({ "hash": hash.to_string(), "size": 3, "mime": "image/jpeg", "name": "p.jpg" });
    assert!(matches!(
        hq.attach("jobs", job, "photos", &wrong),
        Err(Error::BlobSizeMismatch { actual: 20, .. })
    ));
    assert!(matches!(
        hq.check_attach_target("jobs", job, "tags"),
        Err(Error::NotAttachments { .. })
    ));
    hq.attach("jobs", job, "photos", &reference)
        .expect("attach");
    assert_eq!(photos(&hq, job), vec![reference]);
    assert!(
        !std::path::Path::new("tab").exists(),
        "no blob store on disk was made"
    );
}
