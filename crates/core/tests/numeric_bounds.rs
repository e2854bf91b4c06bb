//! Stock levels at the edges: a counter write that would leave ±(2^53 − 1) is refused with an
//! error naming the field and leaves the entity as it was; any write that fits gives the
//! exact value (compared against i128 arithmetic). `max`/`min` refuse numbers beyond it too.

use fieldsync_core::{Entity, EntityId, Patch, ProposalId, Schema, Workspace, WorkspaceId, Writer};
use libp2p_identity::ed25519;
use proptest::prelude::*;

const SAFE: i128 = 9_007_199_254_740_991;

const SCHEMA: &str = "[collections.items.fields]\nstock = { rule = \"counter\" }\nprogress = { rule = \"max\" }\nlowest = { rule = \"min\" }\n";

fn near_bounds() -> impl Strategy<Value = i64> {
    const S: i64 = SAFE as i64;
    prop_oneof![
        Just(S),
        Just(-S),
        Just(0),
        (S - 3)..=(S + 3),
        (-S - 3)..=(-S + 3),
        -3i64..=3,
        Just(i64::MAX),
        Just(i64::MIN),
        -S..=S
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn counter_writes_near_the_bounds_are_exact_or_refused(start in near_bounds(), inc in near_bounds(), target in near_bounds()) {
        let key = ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([3u8; 32]).unwrap());
        let ws = Workspace { id: WorkspaceId(uuid::Uuid::from_u128(1)), schema: Schema::from_toml(SCHEMA).unwrap(), authority: key.public() };
        let coll = ws.schema.collection("items").unwrap();
        let peer = libp2p_identity::PublicKey::from(key.public()).to_peer_id();
        let w = Writer { peer, user: "hq", now_ms: 1, authority_key: Some(&key), delegation: None };
        let mut pid = || ProposalId(uuid::Uuid::nil());
        // A start beyond the bounds is refused when parsed; the entity then starts at 0.
        let parsed = Patch::parse(coll, &format!(r#"{{"stock":{start}}}"#));
        prop_assert_eq!(parsed.is_ok(), i128::from(start).abs() <= SAFE);
        let start = if parsed.is_ok() { start } else { 0 };
        let mut e = Entity::create(&ws, EntityId(uuid::Uuid::from_u128(7)), "items", &w, &Patch::parse(coll, &format!(r#"{{"stock":{start}}}"#)).unwrap(), &mut pid).unwrap();
        prop_assert_eq!(e.view(&ws).unwrap()["stock"].as_i64(), Some(start));

        // $inc: refused when parsed (increment out of range) or when applied (sum out of range).
        let exact = i128::from(start) + i128::from(inc);
        let result = Patch::parse(coll, &format!(r#"{{"stock":{{"$inc":{inc}}}}}"#)).and_then(|p| e.update(&ws, &w, &p, &mut pid));
        let now = if i128::from(inc).abs() <= SAFE && exact.abs() <= SAFE {
            prop_assert!(result.is_ok(), "{:?}", result);
            exact as i64
        } else {
            let err = result.unwrap_err().to_string();
            prop_assert!(err.contains("\"stock\""), "{}", err);
            start
        };
        prop_assert_eq!(e.view(&ws).unwrap()["stock"].as_i64(), Some(now));

        // "set to target" is an increment of target - now: refused if that does not fit.
        let result = Patch::parse(coll, &format!(r#"{{"stock":{target}}}"#)).and_then(|p| e.update(&ws, &w, &p, &mut pid));
        let expected = if i128::from(target).abs() <= SAFE {
            prop_assert!(result.is_ok(), "{:?}", result);
            target
        } else {
            prop_assert!(result.unwrap_err().to_string().contains("\"stock\""));
            now
        };
        prop_assert_eq!(e.view(&ws).unwrap()["stock"].as_i64(), Some(expected));
    }

    #[test]
    fn max_and_min_take_exactly_the_numbers_within_2_pow_53(n in prop_oneof![any::<i64>(), (-9_007_199_254_740_993i64)..=-9_007_199_254_740_990, 9_007_199_254_740_990i64..=9_007_199_254_740_993]) {
        let key = ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([3u8; 32]).unwrap());
        let ws = Workspace { id: WorkspaceId(uuid::Uuid::from_u128(1)), schema: Schema::from_toml(SCHEMA).unwrap(), authority: key.public() };
        let coll = ws.schema.collection("items").unwrap();
        for field in ["progress", "lowest"] {
            let parsed = Patch::parse(coll, &format!(r#"{{"{field}":{n}}}"#));
            if n.unsigned_abs() <= 9_007_199_254_740_991 {
                prop_assert!(parsed.is_ok());
            } else {
                let needle = format!("{field:?}");
                prop_assert!(parsed.unwrap_err().to_string().contains(&needle));
            }
        }
    }
}
