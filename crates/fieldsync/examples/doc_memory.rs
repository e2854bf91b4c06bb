//! Calibrates `Entity::memory_estimate`: holds N freshly created 10-field entities (and the
//! same after 5 updates each) in memory and compares the RSS growth per document with the
//! estimate. Run: `cargo run --release -p fieldsync --example doc_memory [N [U]]` (one
//! figure per process is the fairer measurement: freed memory is not returned at once).

use fieldsync::core::{Entity, EntityId, Patch, Schema, Workspace, WorkspaceId, Writer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let schema = Schema::from_toml("[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\"] }\nprogress = { rule = \"max\" }\ntags = { rule = \"set\" }\n").expect("schema");
    let key = libp2p_identity::ed25519::Keypair::generate();
    let ws = Workspace {
        id: WorkspaceId(uuid::Uuid::now_v7()),
        schema,
        authority: key.public(),
    };
    let peer = libp2p_identity::PublicKey::from(key.public()).to_peer_id();
    let coll = ws.schema.collection("tasks").expect("tasks");
    let updates_list: Vec<usize> = match std::env::args().nth(2).and_then(|a| a.parse().ok()) {
        Some(u) => vec![u],
        None => vec![0, 5],
    };
    for updates in updates_list {
        let before = rss();
        let mut held = Vec::with_capacity(n);
        let mut estimate = 0;
        for i in 0..n {
            let w = Writer {
                peer,
                user: "bench",
                now_ms: 1,
                authority_key: None,
                delegation: None,
            };
            let json = format!(
                r#"{{"title":"Task {i}","status":"open","progress":{},"tags":["t{}"],"site":"Site {}","assignee":"user{}","priority":{},"notes":"call before","customer":"Customer {}","due":"2026-12-01"}}"#,
                i % 100,
                i % 7,
                i % 50,
                i % 20,
                i % 5,
                i % 1000
            );
            let patch = Patch::parse(coll, &json).expect("patch");
            let mut e = Entity::create(
                &ws,
                EntityId(uuid::Uuid::now_v7()),
                "tasks",
                &w,
                &patch,
                &mut || fieldsync::ProposalId(uuid::Uuid::now_v7()),
            )
            .expect("create");
            for u in 0..updates {
                let p = Patch::parse(
                    coll,
                    &format!(r#"{{"progress":{},"notes":"update {u}"}}"#, 100 + u),
                )
                .expect("patch");
                e.update(&ws, &w, &p, &mut || {
                    fieldsync::ProposalId(uuid::Uuid::now_v7())
                })
                .expect("update");
            }
            let _ = e.save();
            estimate += e.memory_estimate();
            held.push(e);
        }
        let grown = rss().saturating_sub(before);
        println!(
            "{updates} updates: measured {} B/doc, estimate {} B/doc",
            grown / n,
            estimate / n
        );
        drop(held);
    }
}
