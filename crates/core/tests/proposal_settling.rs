//! Payments: an office accepting a newer proposal also settles an older one that reaches it
//! only afterwards — it never reappears as pending.

use fieldsync_core::{Entity, EntityId, Patch, ProposalId, Schema, Workspace, WorkspaceId, Writer};
use libp2p_identity::ed25519;

fn peer(k: &ed25519::Keypair) -> fieldsync_core::PeerId {
    libp2p_identity::PublicKey::from(k.public()).to_peer_id()
}

#[test]
fn an_older_proposal_arriving_after_a_newer_acceptance_stays_settled() {
    let office = ed25519::Keypair::generate();
    let schema =
        Schema::from_toml("[collections.payments.fields]\namount = { rule = \"authority\" }")
            .unwrap();
    let ws = Workspace {
        id: WorkspaceId(uuid::Uuid::from_u128(1)),
        schema,
        authority: office.public(),
    };
    let coll = ws.schema.collection("payments").unwrap();
    let (d1, d2) = (ed25519::Keypair::generate(), ed25519::Keypair::generate());
    let id = EntityId(uuid::Uuid::from_u128(9));
    let w_office = Writer {
        peer: peer(&office),
        user: "office",
        now_ms: 1,
        authority_key: Some(&office),
        delegation: None,
    };
    let mut base = Entity::create(
        &ws,
        id,
        "payments",
        &w_office,
        &Patch::parse(coll, "{}").unwrap(),
        &mut || ProposalId(uuid::Uuid::nil()),
    )
    .unwrap();
    let base = base.save();

    let propose = |k: &ed25519::Keypair, amount: u32, pid: u128| {
        let mut e = Entity::load(id, &base, &[]).unwrap();
        let w = Writer {
            peer: peer(k),
            user: "dev",
            now_ms: 2,
            authority_key: None,
            delegation: None,
        };
        e.update(
            &ws,
            &w,
            &Patch::parse(coll, &format!("{{\"amount\":{amount}}}")).unwrap(),
            &mut || ProposalId(uuid::Uuid::from_u128(pid)),
        )
        .unwrap();
        e.save_incremental()
    };
    let older = propose(&d1, 1, 100);
    let newer = propose(&d2, 2, 200);

    let mut hq = Entity::load(id, &base, &[]).unwrap();
    hq.merge_bytes(&newer).unwrap();
    hq.accept(
        &ws,
        &w_office,
        ProposalId(uuid::Uuid::from_u128(200)),
        "accept",
    )
    .unwrap();
    hq.merge_bytes(&older).unwrap();
    let d = hq.derive(&ws).unwrap();
    assert_eq!(d.view["amount"], 2);
    assert!(d.view.get("_pending").is_none(), "{:?}", d.view);
    assert!(d.proposals.is_empty(), "{:?}", d.proposals);

    // Without the acceptance, both are pending and the newest shows.
    let mut dev = Entity::load(id, &base, &[]).unwrap();
    dev.merge_bytes(&older).unwrap();
    dev.merge_bytes(&newer).unwrap();
    let d = dev.derive(&ws).unwrap();
    assert_eq!(d.proposals.len(), 2);
    assert_eq!(d.view["_pending"]["amount"], 2);
    assert!(d.view.get("amount").is_none());
}
