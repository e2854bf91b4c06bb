//! A node's change times never go backwards along what it has seen: a write made after
//! merging a change from a node whose clock runs ahead is timed after it, so it wins over
//! writes concurrent with both (`lww`) — also on the second of two writes in a row, when
//! the entity reuses the time it read for the first.

use fieldsync_core::{Entity, EntityId, Patch, ProposalId, Schema, Workspace, WorkspaceId, Writer};
use libp2p_identity::ed25519;

fn writer(key: &ed25519::Keypair, now_ms: i64) -> Writer<'static> {
    Writer {
        peer: libp2p_identity::PublicKey::from(key.public()).to_peer_id(),
        user: "u",
        now_ms,
        authority_key: None,
        delegation: None,
    }
}

#[test]
fn a_write_after_seeing_a_later_clock_is_timed_after_it() {
    let ws = Workspace {
        id: WorkspaceId(uuid::Uuid::from_u128(1)),
        schema: Schema::from_toml("[collections.tasks]\n").unwrap(),
        authority: ed25519::Keypair::generate().public(),
    };
    let coll = ws.schema.collection("tasks").unwrap();
    let patch = |json: &str| Patch::parse(coll, json).unwrap();
    let (ahead, behind, other) = (
        ed25519::Keypair::generate(),
        ed25519::Keypair::generate(),
        ed25519::Keypair::generate(),
    );
    let id = EntityId(uuid::Uuid::from_u128(7));
    let mut base = Entity::create(
        &ws,
        id,
        "tasks",
        &writer(&behind, 5),
        &patch(r#"{"title":"t"}"#),
        &mut || ProposalId(uuid::Uuid::nil()),
    )
    .unwrap();
    let base_bytes = base.save();
    let fork = || Entity::load(id, &base_bytes, &[]).unwrap();

    // `behind` (clock at 10) writes once: its entity now holds the time it read.
    let mut b = fork();
    b.update(
        &ws,
        &writer(&behind, 10),
        &patch(r#"{"site":"b1"}"#),
        &mut || ProposalId(uuid::Uuid::nil()),
    )
    .unwrap();
    // `ahead` (clock at 1,000) writes; `behind` merges that, then writes `title` again.
    let mut a = fork();
    a.update(
        &ws,
        &writer(&ahead, 1_000),
        &patch(r#"{"site":"a"}"#),
        &mut || ProposalId(uuid::Uuid::nil()),
    )
    .unwrap();
    b.merge_bytes(&a.save_incremental()).unwrap();
    b.update(
        &ws,
        &writer(&behind, 11),
        &patch(r#"{"title":"from behind"}"#),
        &mut || ProposalId(uuid::Uuid::nil()),
    )
    .unwrap();
    // `other` (clock at 500) wrote `title` concurrently with both.
    let mut c = fork();
    c.update(
        &ws,
        &writer(&other, 500),
        &patch(r#"{"title":"from other"}"#),
        &mut || ProposalId(uuid::Uuid::nil()),
    )
    .unwrap();
    b.merge_bytes(&c.save_incremental()).unwrap();
    let view = b.view(&ws).unwrap();
    assert_eq!(
        view["title"], "from behind",
        "the write that saw time 1,000 is later than 500: {view:?}"
    );
}
