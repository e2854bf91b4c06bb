//! Scenario: schema version 2 declares migrations (copy a legacy value into a counter, a
//! set and a text; backfill a `max` field; split a name); 2–4 replicas of one entity apply
//! them in any order and at any time relative to other edits (version-1 edits that never
//! migrate, version-2 edits that migrate first), exchanging changes in between. Every
//! replica converges, and the result is that of one application: each migration's change
//! is in the document once, the counter holds the copied amount once plus every increment,
//! the text holds the copied text once ("rich-text", never "rich-textrich-text"), the set
//! and the split hold one copy, and a person's write wins over a concurrent backfill.

use fieldsync_core::{Entity, EntityId, Patch, PeerId, Schema, Workspace, WorkspaceId, Writer};
use libp2p_identity::ed25519;
use proptest::prelude::*;
use serde_json::{json, Value as Json};
use uuid::Uuid;

const V1: &str = r#"
[collections.items.fields]
stock    = { rule = "counter" }
tags     = { rule = "set" }
notes    = { rule = "text" }
progress = { rule = "max" }
"#;

const MIGRATIONS: &str = r#"
[[migrations]]
id = "stock2-from-legacy"
collection = "items"
kind = "copy"
from = "legacy_stock"
field = "stock2"

[[migrations]]
id = "tags-from-legacy"
collection = "items"
kind = "copy"
from = "legacy_tag"
field = "tags"

[[migrations]]
id = "notes-from-legacy"
collection = "items"
kind = "copy"
from = "legacy_note"
field = "notes"

[[migrations]]
id = "progress-5"
collection = "items"
kind = "backfill"
field = "progress"
value = 5

[[migrations]]
id = "split-name"
collection = "items"
kind = "split"
from = "name"
into = ["first", "last"]
separator = " "
"#;

const IDS: [&str; 5] = [
    "stock2-from-legacy",
    "tags-from-legacy",
    "notes-from-legacy",
    "progress-5",
    "split-name",
];

fn v2() -> String {
    format!("{}stock2   = {{ rule = \"counter\" }}\n{MIGRATIONS}", V1)
}

fn keypair(seed: u8) -> ed25519::Keypair {
    ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([seed; 32]).expect("32 bytes"))
}

fn peer(seed: u8) -> PeerId {
    libp2p_identity::PublicKey::from(keypair(seed).public()).to_peer_id()
}

fn workspace(schema: &str, version: u64) -> Workspace {
    Workspace {
        id: WorkspaceId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001)),
        schema: Schema::from_toml(schema)
            .expect("schema")
            .with_version(version),
        authority: keypair(200).public(),
    }
}

fn writer(seed: u8, now_ms: i64) -> Writer<'static> {
    Writer {
        peer: peer(seed),
        user: "u",
        now_ms,
        authority_key: None,
        delegation: None,
    }
}

fn id() -> EntityId {
    EntityId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_e001))
}

fn patch(ws: &Workspace, json: Json) -> Patch {
    Patch::from_json(ws.schema.collection("items").expect("items"), &json).expect("patch")
}

/// The entity as version 1 created it: legacy values the migrations read.
fn base(ws1: &Workspace) -> Vec<u8> {
    let p = patch(
        ws1,
        json!({"legacy_stock": 10, "legacy_tag": "red", "legacy_note": "rich-text", "name": "Ada Lovelace"}),
    );
    let mut e = Entity::create(
        ws1,
        id(),
        "items",
        &writer(1, 1_000),
        &p,
        &mut || unreachable!(),
    )
    .expect("create");
    e.save()
}

fn load(bytes: &[u8]) -> Entity {
    Entity::load(id(), bytes, &[]).expect("load")
}

#[derive(Clone, Debug)]
enum Action {
    /// Replica i applies the pending migrations (it met the entity under version 2).
    Migrate(usize),
    /// A version-2 write on replica i: `stock2` += n (migrations run first).
    Inc(usize, i64),
    /// Version-1 writes on replica i (no migration): a tag, a note appended, a progress.
    Tag(usize, u8),
    Note(usize, u8),
    Progress(usize, u8),
    /// Replica j takes in replica i's document.
    Sync(usize, usize),
}

fn action(n: usize) -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (0..n).prop_map(Action::Migrate),
        2 => (0..n, 1..5i64).prop_map(|(i, k)| Action::Inc(i, k)),
        1 => (0..n, 0..200u8).prop_map(|(i, k)| Action::Tag(i, k)),
        1 => (0..n, 0..200u8).prop_map(|(i, k)| Action::Note(i, k)),
        1 => (0..n, 0..5u8).prop_map(|(i, k)| Action::Progress(i, k)),
        3 => (0..n, 0..n).prop_map(|(i, j)| Action::Sync(i, j)),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Action>)> {
    (2..=4usize).prop_flat_map(|n| (Just(n), proptest::collection::vec(action(n), 1..24)))
}

fn migrate_changes(e: &mut Entity, ws: &Workspace, id: &str) -> usize {
    e.history(ws)
        .iter()
        .filter(|h| h.kind == "migrate" && h.op.as_deref() == Some(id))
        .count()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn n_replicas_applying_a_migration_equal_one_application((n, actions) in scenario()) {
        let (ws1, ws2) = (workspace(V1, 1), workspace(&v2(), 2));
        let bytes = base(&ws1);
        let mut replicas: Vec<Entity> = (0..n).map(|_| load(&bytes)).collect();
        let mut now = 2_000;
        let (mut incs, mut tags, mut notes, mut progress) = (0i64, Vec::new(), Vec::new(), Vec::new());
        let mut migrated_anywhere = false;
        for a in &actions {
            now += 10;
            match a.clone() {
                Action::Migrate(i) => {
                    replicas[i].migrate(&ws2).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    migrated_anywhere = true;
                }
                Action::Inc(i, k) => {
                    replicas[i].update(&ws2, &writer(i as u8 + 10, now), &patch(&ws2, json!({"stock2": {"$inc": k}})), &mut || unreachable!()).unwrap();
                    incs += k;
                    migrated_anywhere = true;
                }
                Action::Tag(i, k) => {
                    let tag = format!("t{k}");
                    replicas[i].update(&ws1, &writer(i as u8 + 10, now), &patch(&ws1, json!({"tags": {"$add": [tag.clone()]}})), &mut || unreachable!()).unwrap();
                    tags.push(tag);
                }
                Action::Note(i, k) => {
                    let mark = format!(" n{k}.{now}");
                    let current = replicas[i].view(&ws1).unwrap().get("notes").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
                    replicas[i].update(&ws1, &writer(i as u8 + 10, now), &patch(&ws1, json!({"notes": format!("{current}{mark}")})), &mut || unreachable!()).unwrap();
                    notes.push(mark);
                }
                Action::Progress(i, k) => {
                    replicas[i].update(&ws1, &writer(i as u8 + 10, now), &patch(&ws1, json!({"progress": k})), &mut || unreachable!()).unwrap();
                    progress.push(json!(k));
                }
                Action::Sync(i, j) => {
                    let theirs = replicas[i].save();
                    replicas[j].merge_bytes(&theirs).unwrap();
                }
            }
        }
        // Everyone takes in everyone.
        let all: Vec<Vec<u8>> = replicas.iter_mut().map(|r| r.save()).collect();
        for r in replicas.iter_mut() {
            for b in &all {
                r.merge_bytes(b).unwrap();
            }
        }
        let heads = replicas[0].heads();
        let view = replicas[0].view(&ws2).unwrap();
        for r in replicas.iter_mut() {
            prop_assert_eq!(r.heads(), heads.clone());
            prop_assert_eq!(r.view(&ws2).unwrap(), view.clone());
        }
        let r0 = &mut replicas[0];
        // Each migration's change is in the document at most once, and once if applied.
        for mid in IDS {
            let count = migrate_changes(r0, &ws2, mid);
            prop_assert!(count <= 1, "migration {} has {} changes; view {:?}", mid, count, view);
            prop_assert_eq!(count == 1, r0.migrated(mid), "marker of {}", mid);
        }
        prop_assert_eq!(r0.migrated("split-name"), migrated_anywhere);
        // Counter: the copied 10 once, plus every increment.
        if migrated_anywhere {
            prop_assert_eq!(view.get("stock2"), Some(&json!(10 + incs)), "{:?}", view);
            prop_assert_eq!((view.get("first"), view.get("last")), (Some(&json!("Ada")), Some(&json!("Lovelace"))));
        } else {
            prop_assert!(!view.contains_key("stock2"));
        }
        // Text: the copied text at most once, every appended note exactly once.
        let text = view.get("notes").and_then(|v| v.as_str()).unwrap_or_default();
        prop_assert!(text.matches("rich-text").count() <= 1, "doubled text {:?}", text);
        prop_assert_eq!(text.matches("rich-text").count() == 1, r0.migrated("notes-from-legacy"));
        for mark in &notes {
            prop_assert_eq!(text.matches(mark.as_str()).count(), 1, "note {:?} in {:?}", mark, text);
        }
        // Set: every tag added, "red" only from the migration.
        let set: Vec<String> = view.get("tags").and_then(|v| v.as_array()).map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect()).unwrap_or_default();
        for t in &tags {
            prop_assert!(set.contains(t), "tag {} lost: {:?}", t, set);
        }
        prop_assert_eq!(set.contains(&"red".to_owned()), r0.migrated("tags-from-legacy"));
        prop_assert_eq!(set.len(), tags.iter().collect::<std::collections::BTreeSet<_>>().len() + usize::from(r0.migrated("tags-from-legacy")));
        // Backfill: a person's progress (all below 5) wins over the concurrent backfill.
        match (progress.is_empty(), view.get("progress")) {
            (true, p) => prop_assert_eq!(p.cloned(), r0.migrated("progress-5").then(|| json!(5))),
            (false, Some(p)) => prop_assert!(progress.contains(p), "progress {} is not a person's value {:?}", p, progress),
            (false, None) => prop_assert!(false, "progress lost"),
        }
    }
}

#[test]
fn a_split_computed_from_a_newer_source_wins_and_the_stale_one_stays_hidden() {
    let (ws1, ws2) = (workspace(V1, 1), workspace(&v2(), 2));
    let bytes = base(&ws1);
    let (mut a, mut b) = (load(&bytes), load(&bytes));
    // A migrates the old name; B, not having seen that, renames the person, then migrates.
    assert_eq!(a.migrate(&ws2).unwrap(), 5);
    b.update(
        &ws1,
        &writer(2, 5_000),
        &patch(&ws1, json!({"name": "Grace Hopper"})),
        &mut || unreachable!(),
    )
    .unwrap();
    assert_eq!(b.migrate(&ws2).unwrap(), 5);
    assert_eq!(b.view(&ws2).unwrap()["first"], "Grace");
    let (sa, sb) = (a.save(), b.save());
    a.merge_bytes(&sb).unwrap();
    b.merge_bytes(&sa).unwrap();
    assert_eq!(a.heads(), b.heads());
    let v = a.view(&ws2).unwrap();
    assert_eq!(
        (v["first"].clone(), v["last"].clone()),
        (json!("Grace"), json!("Hopper")),
        "{v:?}"
    );
    assert_eq!(v, b.view(&ws2).unwrap());
    // Two split changes (different sources), one view; the four source-free ones are shared.
    assert_eq!(migrate_changes(&mut a, &ws2, "split-name"), 2);
    assert_eq!(migrate_changes(&mut a, &ws2, "notes-from-legacy"), 1);
    assert_eq!(v["notes"], "rich-text");
    assert_eq!(v["stock2"], 10);
    // The two splits' values are settled by the rule, never an open conflict.
    assert!(
        a.conflicts(&ws2)
            .iter()
            .all(|c| c.state == fieldsync_core::ConflictState::Auto),
        "{:?}",
        a.conflicts(&ws2)
    );
    assert!(!v.contains_key("_conflicts"));
}

#[test]
fn writing_the_same_copy_without_a_migration_doubles_the_text() {
    // What the deterministic change prevents: two nodes each writing the copy as their own
    // change into the same (empty) text.
    let ws1 = workspace(V1, 1);
    let bytes = base(&ws1);
    let (mut a, mut b) = (load(&bytes), load(&bytes));
    for (e, seed) in [(&mut a, 2), (&mut b, 3)] {
        e.update(
            &ws1,
            &writer(seed, 5_000),
            &patch(&ws1, json!({"notes": "rich-text"})),
            &mut || unreachable!(),
        )
        .unwrap();
    }
    a.merge_bytes(&b.save()).unwrap();
    assert_eq!(a.view(&ws1).unwrap()["notes"], "rich-textrich-text");
}

#[test]
fn migrations_are_checked_when_the_schema_is_read() {
    for (bad, needle) in [
        ("[[migrations]]\nid = \"m\"\ncollection = \"nope\"\nkind = \"backfill\"\nfield = \"x\"\nvalue = 1", "not declared"),
        ("[[migrations]]\nid = \"m\"\ncollection = \"items\"\nkind = \"backfill\"\nfield = \"progress\"\nvalue = \"high\"", "does not fit"),
        ("[[migrations]]\nid = \"m\"\ncollection = \"items\"\nkind = \"backfill\"\nfield = \"progress\"", "needs `value`"),
        ("[[migrations]]\nid = \"m\"\ncollection = \"items\"\nkind = \"copy\"\nfrom = \"tags\"\nfield = \"x\"", "cannot be a source"),
        ("[[migrations]]\nid = \"m\"\ncollection = \"items\"\nkind = \"split\"\nfrom = \"name\"\ninto = [\"a\"]\nseparator = \" \"", "2 to 16"),
        ("[[migrations]]\nid = \"m\"\ncollection = \"items\"\nkind = \"merge\"", "unknown kind"),
        ("[[migrations]]\nid = \"m\"\ncollection = \"items\"\nkind = \"backfill\"\nfield = \"x\"\nvalue = 1\n[[migrations]]\nid = \"m\"\ncollection = \"items\"\nkind = \"backfill\"\nfield = \"y\"\nvalue = 1", "declared twice"),
        ("[[migrations]]\nid = \"bad id\"\ncollection = \"items\"\nkind = \"backfill\"\nfield = \"x\"\nvalue = 1", "must be 1–64"),
    ] {
        let err = Schema::from_toml(&format!("{V1}{bad}")).unwrap_err().to_string();
        assert!(err.contains(needle), "{bad}: {err}");
    }
    let s = Schema::from_toml(&v2()).unwrap();
    assert_eq!(
        s.migrations
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        IDS
    );
}
