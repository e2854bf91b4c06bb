//! Property: any interleaving, duplication and retry of the same operations (same op ids)
//! on 2–4 replicas gives identical views, equal to a model that applies each op id once.
//! Identical creations equal one creation; `lww` picks the latest change time.

use std::collections::{BTreeMap, BTreeSet};

use fieldsync_core::{
    Entity, EntityId, OpId, Patch, ProposalId, Schema, Workspace, WorkspaceId, Writer,
};
use libp2p_identity::ed25519;
use proptest::prelude::*;
use serde_json::{json, Value as Json};

const SCHEMA: &str = r#"
[collections.items.fields]
stock = { rule = "counter" }
tags  = { rule = "set" }
price = { rule = "authority" }
"#;

fn peer(k: &ed25519::Keypair) -> fieldsync_core::PeerId {
    libp2p_identity::PublicKey::from(k.public()).to_peer_id()
}

fn keypair(seed: u8) -> ed25519::Keypair {
    ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes(&mut [seed; 32]).unwrap())
}

fn ws(authority: &ed25519::Keypair) -> Workspace {
    Workspace {
        id: WorkspaceId(uuid::Uuid::from_u128(7)),
        schema: Schema::from_toml(SCHEMA).unwrap(),
        authority: authority.public(),
    }
}

/// One app operation, identified by its op id.
#[derive(Clone, Debug)]
enum Op {
    Inc(i8),
    Tag(u8),
    Price(u8),
}

impl Op {
    fn patch(&self) -> Json {
        match self {
            Op::Inc(n) => json!({ "stock": { "$inc": n } }),
            Op::Tag(t) => json!({ "tags": { "$add": [format!("t{t}")] } }),
            Op::Price(p) => json!({ "price": p }),
        }
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (-50i8..50).prop_map(Op::Inc),
        (0u8..4).prop_map(Op::Tag),
        (0u8..3).prop_map(Op::Price)
    ]
}

/// Replicas, and the ops with, for each, a list of (replica, times applied) deliveries.
type Plan = (usize, Vec<(Op, Vec<(usize, u8)>)>);

/// Ops, and for each a list of (replica, times applied) deliveries.
fn plan() -> impl Strategy<Value = Plan> {
    (2usize..=4).prop_flat_map(|n| {
        (
            Just(n),
            proptest::collection::vec(
                (op(), proptest::collection::vec((0..n, 1u8..=3), 1..4)),
                1..10,
            ),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(48), ..ProptestConfig::default() })]
    #[test]
    fn retried_and_duplicated_ops_count_once((n, ops) in plan(), order_seed in any::<u64>()) {
        let auth = keypair(200);
        let ws = ws(&auth);
        let id = EntityId(uuid::Uuid::from_u128(42));
        let coll = ws.schema.collection("items").unwrap();
        let keys: Vec<ed25519::Keypair> = (0..n as u8).map(|i| keypair(i + 1)).collect();
        let mut counter = 0u128;
        // Every replica creates the entity itself, identically: one creation.
        let mut reps: Vec<Entity> = keys.iter().map(|k| {
            let w = Writer { peer: peer(k), user: "u", now_ms: 1, authority_key: None, delegation: None };
            Entity::create(&ws, id, "items", &w, &Patch::parse(coll, r#"{"stock":100}"#).unwrap(), &mut || ProposalId(uuid::Uuid::nil())).unwrap()
        }).collect();
        for (i, (op, deliveries)) in ops.iter().enumerate() {
            let op_id: OpId = format!("op-{i}").parse().unwrap();
            let patch = Patch::from_json(coll, &op.patch()).unwrap();
            for (r, times) in deliveries {
                for t in 0..*times {
                    let w = Writer { peer: peer(&keys[*r]), user: "u", now_ms: 10 + i as i64 + i64::from(t), authority_key: None, delegation: None };
                    counter += 1;
                    let c = counter;
                    reps[*r].update_op(&ws, &w, &patch, Some(&op_id), &mut || ProposalId(uuid::Uuid::from_u128(c))).unwrap();
                }
            }
        }
        // Exchange everything, in a seeded order, twice over (duplicates included).
        let saved: Vec<Vec<u8>> = reps.iter_mut().map(|e| e.save()).collect();
        let mut order: Vec<usize> = (0..n).chain(0..n).collect();
        let mut s = order_seed;
        for i in (1..order.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            order.swap(i, (s >> 33) as usize % (i + 1));
        }
        for e in reps.iter_mut() {
            for from in &order {
                e.merge_bytes(&saved[*from]).unwrap();
            }
        }
        // The model: each op id once.
        let stock: i64 = 100 + ops.iter().map(|(o, _)| if let Op::Inc(d) = o { i64::from(*d) } else { 0 }).sum::<i64>();
        let tags: BTreeSet<String> = ops.iter().filter_map(|(o, _)| if let Op::Tag(t) = o { Some(format!("t{t}")) } else { None }).collect();
        let price_ops = ops.iter().filter(|(o, _)| matches!(o, Op::Price(_))).count();
        let views: Vec<_> = reps.iter().map(|e| e.derive(&ws).unwrap()).collect();
        for d in &views {
            prop_assert_eq!(&d.view, &views[0].view);
            prop_assert_eq!(d.view["stock"].clone(), json!(stock));
            let got: BTreeSet<String> = d.view.get("tags").and_then(Json::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default();
            prop_assert_eq!(&got, &tags);
            // At most one proposal per op id.
            let per_op: BTreeMap<Option<String>, usize> = d.proposals.iter().fold(BTreeMap::new(), |mut m, p| { *m.entry(p.record.op.clone()).or_default() += 1; m });
            prop_assert!(per_op.values().all(|c| *c == 1), "{:?}", d.proposals);
            prop_assert!(d.proposals.len() <= price_ops);
        }
    }
}

#[test]
fn identical_creations_are_one_change() {
    let auth = keypair(200);
    let ws = ws(&auth);
    let coll = ws.schema.collection("items").unwrap();
    let id = EntityId(uuid::Uuid::from_u128(9));
    let patch = Patch::parse(
        coll,
        r#"{"stock":25,"tags":["a","b","c"],"name":{"en":"Bolt","de":"Bolzen"}}"#,
    )
    .unwrap();
    let make = |seed: u8| {
        let w = Writer {
            peer: peer(&keypair(seed)),
            user: "u",
            now_ms: i64::from(seed) * 1000,
            authority_key: None,
            delegation: None,
        };
        Entity::create(&ws, id, "items", &w, &patch, &mut || {
            ProposalId(uuid::Uuid::nil())
        })
        .unwrap()
    };
    let (mut a, mut b) = (make(1), make(2));
    b.merge_bytes(&a.save()).unwrap();
    a.merge_bytes(&b.save()).unwrap();
    let view = a.view(&ws).unwrap();
    assert_eq!(view["stock"], 25);
    assert_eq!(view["tags"], json!(["a", "b", "c"]));
    assert_eq!(view, b.view(&ws).unwrap());
    assert!(
        a.conflicts(&ws).is_empty(),
        "one creation, so no concurrent values: {:?}",
        a.conflicts(&ws)
    );
}

#[test]
fn lww_picks_the_latest_change_time_among_concurrent_writes() {
    let auth = keypair(200);
    let ws = ws(&auth);
    let coll = ws.schema.collection("items").unwrap();
    let id = EntityId(uuid::Uuid::from_u128(10));
    let w0 = Writer {
        peer: peer(&keypair(9)),
        user: "u",
        now_ms: 1,
        authority_key: None,
        delegation: None,
    };
    let mut base = Entity::create(
        &ws,
        id,
        "items",
        &w0,
        &Patch::parse(coll, r#"{"name":"x"}"#).unwrap(),
        &mut || ProposalId(uuid::Uuid::nil()),
    )
    .unwrap();
    let base = base.save();
    for (ta, tb) in [(100, 200), (200, 100), (5_000, 4_999)] {
        let write = |seed: u8, t: i64, v: &str| {
            let mut e = Entity::load(id, &base, &[]).unwrap();
            let w = Writer {
                peer: peer(&keypair(seed)),
                user: "u",
                now_ms: t,
                authority_key: None,
                delegation: None,
            };
            e.update(
                &ws,
                &w,
                &Patch::parse(coll, &format!(r#"{{"name":"{v}"}}"#)).unwrap(),
                &mut || ProposalId(uuid::Uuid::nil()),
            )
            .unwrap();
            e.save_incremental()
        };
        let (ca, cb) = (write(1, ta, "a"), write(2, tb, "b"));
        let later = if ta > tb { "a" } else { "b" };
        for order in [[&ca, &cb], [&cb, &ca]] {
            let mut e = Entity::load(id, &base, &[]).unwrap();
            for c in order {
                e.merge_bytes(c).unwrap();
            }
            assert_eq!(e.view(&ws).unwrap()["name"], later, "times a={ta} b={tb}");
        }
    }
}
