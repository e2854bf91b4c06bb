//! Fuzz targets for every decoder of untrusted bytes, driven by proptest so they run on
//! stable in the normal test suite: sync frames, bundles, invites and received documents.
//! Inputs are random bytes and mutations (flips, truncations, splices) of valid encodings.
//! Each decoder must return `Ok` or `Err` — never panic, never allocate past its limits.
//!
//! CI runs `FIELDSYNC_FUZZ_CASES` (default 256) cases per target; a longer run:
//! `FIELDSYNC_FUZZ_CASES=200000 cargo test --release -p fieldsync-core --test fuzz_decoders`.

use fieldsync_core::bundle::{
    Bundle, BundleEncoder, BundleEntity, BundleHeader, Limits as BundleLimits,
};
use fieldsync_core::membership::{Grant, InviteToken, MemberRole};
use fieldsync_core::protocol::{Frame, Limits, OfferEntry, PageRange, Payload, Role};
use fieldsync_core::{Entity, EntityId, Invite, Patch, Schema, Workspace, WorkspaceId, Writer};
use libp2p_identity::ed25519;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FIELDSYNC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

const SCHEMA: &str = "[collections.tasks]\nowner = \"assignee\"\n[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"done\"] }\n[collections.payments.fields]\namount = { rule = \"authority\" }\n";

fn workspace(key: &ed25519::Keypair) -> Workspace {
    Workspace {
        id: WorkspaceId(uuid::Uuid::from_u128(5)),
        schema: Schema::from_toml(SCHEMA).unwrap(),
        authority: key.public(),
    }
}

fn key() -> ed25519::Keypair {
    ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([9u8; 32]).unwrap())
}

/// A valid document: a task with a few fields, and one confirmed payment amount.
fn valid_doc() -> Vec<u8> {
    let k = key();
    let ws = workspace(&k);
    let peer = libp2p_identity::PublicKey::from(k.public()).to_peer_id();
    let w = Writer {
        peer,
        user: "hq",
        now_ms: 1_700_000_000_000,
        authority_key: Some(&k),
        delegation: None,
    };
    let coll = ws.schema.collection("payments").unwrap();
    let patch = Patch::parse(coll, r#"{"amount": 50, "note": "cash"}"#).unwrap();
    let mut e = Entity::create(
        &ws,
        EntityId(uuid::Uuid::from_u128(1)),
        "payments",
        &w,
        &patch,
        &mut || fieldsync_core::ProposalId(uuid::Uuid::from_u128(2)),
    )
    .unwrap();
    e.save()
}

fn valid_frames() -> Vec<Vec<u8>> {
    let id = EntityId(uuid::Uuid::from_u128(3));
    let page = PageRange { from: 4, upto: 9 };
    vec![
        Frame::Hello {
            version: 2,
            credential: None,
        }
        .encode(),
        Frame::Welcome {
            workspace: WorkspaceId(uuid::Uuid::from_u128(5)),
            role: Role::Device,
            limits: Limits::default(),
            feed_seq: 9,
            resume_from: 2,
            name: Some("ana".into()),
        }
        .encode(),
        Frame::Offer {
            page,
            entries: vec![OfferEntry {
                id,
                heads: vec![[1; 32], [2; 32]],
            }],
        }
        .encode(),
        Frame::Data {
            page,
            payloads: vec![Payload {
                id,
                collection: "tasks".into(),
                full: true,
                chunks: vec![serde_bytes::ByteBuf::from(valid_doc())],
            }],
            skipped: vec![id],
        }
        .encode(),
        Frame::Ack { upto: 9 }.encode(),
    ]
}

fn valid_bundle() -> Vec<u8> {
    let k = key();
    let from = libp2p_identity::PublicKey::from(k.public())
        .to_peer_id()
        .to_string();
    let header = BundleHeader {
        workspace: WorkspaceId(uuid::Uuid::from_u128(5)),
        from,
        since: 0,
        upto: 1,
        acks: Default::default(),
        credential: None,
    };
    let mut enc = BundleEncoder::new(&header);
    enc.push(&BundleEntity {
        id: EntityId(uuid::Uuid::from_u128(1)),
        collection: "payments".into(),
        doc: valid_doc(),
    });
    let mut out = enc.take_written();
    out.extend(enc.finish(&k));
    out
}

fn valid_purge() -> Vec<u8> {
    let r = fieldsync_core::purge::PurgeRecord::sign(
        &key(),
        WorkspaceId(uuid::Uuid::from_u128(5)),
        "tasks",
        EntityId(uuid::Uuid::from_u128(1)),
        7,
    );
    r.to_text().into_bytes()
}

fn valid_invite() -> Vec<u8> {
    let k = key();
    let ws = workspace(&k);
    let grant = Grant {
        user: "ana".into(),
        role: MemberRole::Device,
        partitions: Default::default(),
    };
    let holder = ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([3u8; 32]).unwrap());
    let token = InviteToken::sign(
        &k,
        uuid::Uuid::from_u128(8),
        ws.id,
        grant,
        i64::MAX,
        &holder.public(),
    );
    let secret = Some(hex::encode(holder.secret().as_ref()));
    serde_json::to_vec(&Invite {
        token: Some(token),
        token_secret: secret,
        ..Invite::new(&ws)
    })
    .unwrap()
}

/// Random bytes, or a valid encoding with a few bytes flipped, cut short, or spliced.
fn mutated(valid: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (
            0..n,
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
        )
            .prop_map({
                let valid = valid.clone();
                move |(i, flips)| {
                    let mut v = valid[i].clone();
                    for (at, b) in flips {
                        if !v.is_empty() {
                            let j = at.index(v.len());
                            v[j] ^= b | 1;
                        }
                    }
                    v
                }
            }),
        (0..n, any::<prop::sample::Index>()).prop_map({
            let valid = valid.clone();
            move |(i, cut)| {
                let v = &valid[i];
                v[..cut.index(v.len() + 1)].to_vec()
            }
        }),
        (
            0..n,
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..64)
        )
            .prop_map(move |(i, at, junk)| {
                let mut v = valid[i].clone();
                let j = at.index(v.len() + 1);
                v.splice(j..j, junk);
                v
            }),
    ]
}

/// Recomputes an Automerge chunk's checksum (the first 4 bytes of SHA-256 over type,
/// length and contents), so mutated documents get past it into the parser proper.
fn with_fixed_checksum(mut doc: Vec<u8>) -> Vec<u8> {
    use sha2::Digest;
    if doc.len() < 10 || doc[..4] != [0x85, 0x6f, 0x4a, 0x83] {
        return doc;
    }
    let (mut len, mut shift, mut at) = (0usize, 0, 9);
    while at < doc.len() && shift < 63 {
        len |= ((doc[at] & 0x7f) as usize) << shift;
        shift += 7;
        at += 1;
        if doc[at - 1] & 0x80 == 0 {
            break;
        }
    }
    let end = at.saturating_add(len).min(doc.len());
    let digest = sha2::Sha256::digest(&doc[8..end]);
    doc[4..8].copy_from_slice(&digest[..4]);
    doc
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn frames(bytes in mutated(valid_frames())) {
        let _ = Frame::decode(&bytes, 1 << 20);
    }

    #[test]
    fn purge_records(bytes in mutated(vec![valid_purge()])) {
        if let Ok(text) = std::str::from_utf8(&bytes) {
            if let Ok(r) = fieldsync_core::purge::PurgeRecord::parse(text) {
                let k = key();
                let _ = r.verify(WorkspaceId(uuid::Uuid::from_u128(5)), &k.public(), r.entity, |_| true);
            }
        }
    }

    #[test]
    fn bundles(bytes in mutated(vec![valid_bundle()])) {
        let _ = Bundle::decode(&bytes, BundleLimits::default());
    }

    #[test]
    fn invites(bytes in mutated(vec![valid_invite()])) {
        // Whatever decodes must still verify against the key it names, or be refused.
        if let Ok((ws, Some(held))) = Invite::decode_with_token(&bytes) {
            prop_assert!(held.token.verify(&ws.authority, ws.id, i64::MIN).is_ok());
            let peer = ws.authority_peer();
            let fieldsync_core::membership::Credential::Invite { token, proof } = held.credential(&peer) else { unreachable!() };
            prop_assert!(token.verify_proof(&peer, &proof).is_ok(), "a decoded secret matches its token");
        }
    }

    #[test]
    fn received_documents(bytes in mutated(vec![valid_doc()])) {
        let ws = workspace(&key());
        if let Ok(e) = Entity::load(EntityId(uuid::Uuid::from_u128(1)), &bytes, &[]) {
            // A document that loads must also derive, check and report without panicking.
            let _ = e.derive(&ws);
            let _ = e.integrity(&ws);
            let _ = e.owner(&ws);
        }
        let _ = Entity::load_received(EntityId(uuid::Uuid::from_u128(1)), &bytes);
    }

    #[test]
    fn received_documents_past_the_checksum(bytes in mutated(vec![valid_doc()]).prop_map(with_fixed_checksum)) {
        let ws = workspace(&key());
        if let Ok(e) = Entity::load(EntityId(uuid::Uuid::from_u128(1)), &bytes, &[]) {
            let _ = e.derive(&ws);
            let _ = e.integrity(&ws);
        }
    }
}

/// Inputs the fuzz targets once crashed on, kept as regression tests.
#[test]
fn past_crashes_are_errors() {
    // Automerge 0.12 panicked in a column decoder (hexane: truncated number) on this
    // document, whose checksum is valid; found by `received_documents_past_the_checksum`.
    let doc = include_bytes!("fuzz_regressions/document_column_eof.bin");
    assert!(Entity::load(EntityId(uuid::Uuid::from_u128(1)), doc, &[]).is_err());
    assert!(Entity::load_received(EntityId(uuid::Uuid::from_u128(1)), doc).is_err());
    let mut e = Entity::load(EntityId(uuid::Uuid::from_u128(1)), &valid_doc(), &[]).unwrap();
    // Merged into an existing document it must not panic either (it may merge nothing).
    let _ = e.merge_bytes(doc);
}

#[test]
fn the_valid_inputs_decode() {
    for f in valid_frames() {
        Frame::decode(&f, 1 << 20).unwrap();
    }
    Bundle::decode(&valid_bundle(), BundleLimits::default()).unwrap();
    assert!(Invite::decode_with_token(&valid_invite())
        .unwrap()
        .1
        .is_some());
    Entity::load(EntityId(uuid::Uuid::from_u128(1)), &valid_doc(), &[]).unwrap();
    assert_eq!(
        with_fixed_checksum(valid_doc()),
        valid_doc(),
        "the checksum fix reproduces a valid document's"
    );
}
