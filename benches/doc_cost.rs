//! What one 10-field task costs in Automerge, fieldsync's document beside a plain one: the
//! floor the benchmarks print (a plain document's `save()` + `load()`), loading a fieldsync
//! entity's document as a device does on receipt, deriving its view, and creating it. Run:
//! `cargo bench -p fieldsync-tests --bench doc_cost` for times on one core (env `BENCH_DOCS`,
//! default 10,000; `BENCH_STEP` runs one step: `plain`, `load`, `derive` or `create`, e.g. under
//! `valgrind --tool=callgrind` for instruction counts).

use std::time::Instant;

use fieldsync::core::{Entity, EntityId, Patch, Schema, Workspace, WorkspaceId, Writer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCHEMA: &str = "[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\"] }\nprogress = { rule = \"max\" }\ntags = { rule = \"set\" }\n";

/// Microseconds per item of `f` over `n` items.
fn per_item(n: usize, f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::var("BENCH_DOCS")
        .ok()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let step = std::env::var("BENCH_STEP").ok();
    let runs = |s: &str| step.as_deref().is_none_or(|x| x == s);
    let key = libp2p_identity::ed25519::Keypair::generate();
    let ws = Workspace {
        id: WorkspaceId(uuid::Uuid::now_v7()),
        schema: Schema::from_toml(SCHEMA)?,
        authority: key.public(),
    };
    let peer = libp2p_identity::PublicKey::from(key.public()).to_peer_id();
    let coll = ws.schema.collection("tasks")?;
    let writer = Writer {
        peer,
        user: "bench",
        now_ms: 1,
        authority_key: None,
        delegation: None,
    };
    let json: Vec<String> = (0..n).map(fieldsync_tests::floors::ten_fields).collect();
    let patches = json
        .iter()
        .map(|j| Patch::parse(coll, j))
        .collect::<Result<Vec<_>, _>>()?;
    let ids: Vec<EntityId> = (0..n)
        .map(|i| EntityId(uuid::Uuid::from_u128(i as u128 + 1)))
        .collect();
    let create = |i: usize| {
        Entity::create(&ws, ids[i], "tasks", &writer, &patches[i], &mut || {
            fieldsync::ProposalId(uuid::Uuid::now_v7())
        })
    };
    if runs("plain") {
        let docs: Vec<_> = json
            .iter()
            .map(|j| fieldsync_tests::floors::automerge_doc(j))
            .collect();
        let bytes: usize = docs.iter().map(|d| d.clone().save().len()).sum();
        let us = per_item(n, || {
            for mut d in docs {
                let saved = d.save();
                std::hint::black_box(automerge::AutoCommit::load(&saved).expect("load"));
            }
        });
        println!(
            "plain Automerge document, save + load (the floor): {us:.1} µs, {} bytes",
            bytes / n
        );
    }
    let saved: Vec<Vec<u8>> = (0..n)
        .map(|i| create(i).map(|mut e| e.save()))
        .collect::<Result<_, _>>()?;
    if runs("load") {
        let bytes: usize = saved.iter().map(Vec::len).sum();
        let us = per_item(n, || {
            for (i, d) in saved.iter().enumerate() {
                std::hint::black_box(Entity::load(ids[i], d, &[]).expect("load"));
            }
        });
        println!(
            "fieldsync document, verified load (a device receiving it): {us:.1} µs, {} bytes",
            bytes / n
        );
    }
    if runs("derive") {
        let loaded = saved
            .iter()
            .enumerate()
            .map(|(i, d)| Entity::load(ids[i], d, &[]))
            .collect::<Result<Vec<_>, _>>()?;
        let us = per_item(n, || {
            for e in &loaded {
                std::hint::black_box(e.derive(&ws).expect("derive"));
            }
        });
        println!("fieldsync document, derive view/conflicts/proposals: {us:.1} µs");
    }
    if runs("create") {
        let us = per_item(n, || {
            for i in 0..n {
                std::hint::black_box(create(i).expect("create"));
            }
        });
        println!("fieldsync document, create from a patch: {us:.1} µs");
    }
    Ok(())
}
