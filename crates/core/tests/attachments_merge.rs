//! Attachments on two devices while apart: photos added on both survive the merge, a
//! remove keeps the photo added concurrently, references are checked before any write,
//! and a bare hash removes every reference to those bytes.

use fieldsync_core::{Entity, EntityId, Patch, ProposalId, Schema, Workspace, WorkspaceId, Writer};
use libp2p_identity::ed25519;
use serde_json::{json, Value as Json};

const SCHEMA: &str = r#"
[collections.jobs.fields]
photos = { rule = "attachments" }
"#;

fn keypair(seed: u8) -> ed25519::Keypair {
    ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes(&mut [seed; 32]).expect("key"))
}

fn writer(k: &ed25519::Keypair, now_ms: i64) -> Writer<'static> {
    Writer {
        peer: libp2p_identity::PublicKey::from(k.public()).to_peer_id(),
        user: "u",
        now_ms,
        authority_key: None,
        delegation: None,
    }
}

fn reference(byte: char, name: &str) -> Json {
    json!({ "hash": byte.to_string().repeat(64), "size": 1000 + name.len(), "mime": "image/jpeg", "name": name })
}

struct Pair {
    ws: Workspace,
    a: Entity,
    b: Entity,
    ka: ed25519::Keypair,
    kb: ed25519::Keypair,
}

impl Pair {
    /// One job created on device a and copied to device b.
    fn new(initial: Json) -> Pair {
        let ws = Workspace {
            id: WorkspaceId(uuid::Uuid::from_u128(7)),
            schema: Schema::from_toml(SCHEMA).expect("schema"),
            authority: keypair(200).public(),
        };
        let (ka, kb) = (keypair(1), keypair(2));
        let coll = ws.schema.collection("jobs").expect("jobs");
        let patch = Patch::from_json(coll, &initial).expect("patch");
        let mut a = Entity::create(
            &ws,
            EntityId(uuid::Uuid::from_u128(42)),
            "jobs",
            &writer(&ka, 1),
            &patch,
            &mut || ProposalId(uuid::Uuid::nil()),
        )
        .expect("create");
        let b = Entity::load_received(a.id(), &a.save()).expect("copy");
        Pair { ws, a, b, ka, kb }
    }

    fn write(&mut self, on_a: bool, patch: Json, now_ms: i64) {
        let coll = self.ws.schema.collection("jobs").expect("jobs");
        let patch = Patch::from_json(coll, &patch).expect("patch");
        let (e, k) = if on_a {
            (&mut self.a, &self.ka)
        } else {
            (&mut self.b, &self.kb)
        };
        e.update(&self.ws, &writer(k, now_ms), &patch, &mut || {
            ProposalId(uuid::Uuid::nil())
        })
        .expect("update");
    }

    /// Both ways; returns the views, which must be equal.
    fn merge(&mut self) -> Json {
        let (sa, sb) = (self.a.save(), self.b.save());
        self.a.merge_bytes(&sb).expect("merge into a");
        self.b.merge_bytes(&sa).expect("merge into b");
        let va = self.a.view(&self.ws).expect("view a");
        let vb = self.b.view(&self.ws).expect("view b");
        assert_eq!(va, vb, "replicas with the same changes show the same view");
        va.get("photos").cloned().unwrap_or(Json::Null)
    }
}

fn names(photos: &Json) -> Vec<String> {
    let mut n: Vec<String> = photos
        .as_array()
        .expect("photos is an array")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_owned())
        .collect();
    n.sort();
    n
}

#[test]
fn concurrent_adds_on_two_replicas_both_survive_the_merge() {
    let mut p = Pair::new(json!({ "photos": [reference('0', "before.jpg")] }));
    p.write(
        true,
        json!({ "photos": { "$add": [reference('a', "a-side.jpg")] } }),
        10,
    );
    p.write(
        false,
        json!({ "photos": { "$add": [reference('b', "b-side.jpg")] } }),
        10,
    );
    let photos = p.merge();
    assert_eq!(names(&photos), ["a-side.jpg", "b-side.jpg", "before.jpg"]);
    // The view lists each reference as the object that was written.
    let a_side = photos
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["name"] == "a-side.jpg")
        .expect("a-side");
    assert_eq!(a_side, &reference('a', "a-side.jpg"));
}

#[test]
fn an_add_concurrent_with_a_remove_survives_and_a_hash_removes_its_references() {
    let mut p =
        Pair::new(json!({ "photos": [reference('0', "old.jpg"), reference('1', "one.jpg")] }));
    // a removes old.jpg by its hash; b, apart, adds old.jpg again (another name) and new.jpg.
    p.write(
        true,
        json!({ "photos": { "$remove": ["0".repeat(64)] } }),
        10,
    );
    p.write(false, json!({ "photos": { "$add": [reference('0', "old again.jpg"), reference('2', "new.jpg")] } }), 10);
    assert_eq!(names(&p.merge()), ["new.jpg", "old again.jpg", "one.jpg"]);
    // A remove that has seen everything takes all references to the hash, and a whole
    // reference removes just itself.
    p.write(
        true,
        json!({ "photos": { "$remove": ["0".repeat(64), reference('1', "one.jpg")] } }),
        20,
    );
    assert_eq!(names(&p.merge()), ["new.jpg"]);
    // The same bytes added twice under the same name are one reference.
    p.write(
        false,
        json!({ "photos": { "$add": [reference('2', "new.jpg")] } }),
        30,
    );
    p.write(
        true,
        json!({ "photos": { "$add": [reference('2', "new.jpg")] } }),
        30,
    );
    assert_eq!(names(&p.merge()), ["new.jpg"]);
}

#[test]
fn bad_references_are_refused_before_anything_is_written() {
    let ws = Schema::from_toml(SCHEMA).expect("schema");
    let jobs = ws.collection("jobs").expect("jobs");
    for (patch, needle) in [
        (
            json!({ "photos": { "$add": [{ "hash": "xyz", "size": 1, "mime": "a/b", "name": "n" }] } }),
            "64 lowercase hex",
        ),
        (
            json!({ "photos": { "$add": [{ "hash": "a".repeat(64), "size": -3, "mime": "a/b", "name": "n" }] } }),
            "whole number",
        ),
        (
            json!({ "photos": { "$add": ["a".repeat(64)] } }),
            "is an object",
        ),
        (json!({ "photos": "a photo" }), "an array of references"),
        (json!({ "photos": null }), "cannot be removed"),
        (json!({ "photos": { "$inc": 1 } }), "does not take $inc"),
        (
            json!({ "photos": { "$remove": ["nope"] } }),
            "not an attachment hash",
        ),
    ] {
        let err = Patch::from_json(jobs, &patch)
            .expect_err("refused")
            .to_string();
        assert!(err.contains(needle), "{patch} gave {err:?}");
    }
}
