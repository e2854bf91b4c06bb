//! Many devices through one relay: each device creates entities of its own and edits a few
//! shared ones; then every device must hold the same entities with the same values. Used by
//! the CI test `tests/many_devices.rs` (small) and the `scale` benchmark (50 × 1,000).

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync::core::protocol::Role;
use fieldsync::{EntityId, MemoryOptions, Replica};

use crate::live::LiveNode;

/// The load to run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub devices: usize,
    /// Entities each device creates.
    pub owned: usize,
    /// Shared entities each device edits.
    pub edits: usize,
    /// Cache sizes of every device.
    pub memory: MemoryOptions,
    /// Give up (an error) when not converged by then.
    pub timeout: Duration,
}

/// What happened.
#[derive(Debug)]
pub struct Outcome {
    /// From the first device write until every device holds everything.
    pub converged: Duration,
    /// Entities on every device at the end.
    pub entities: usize,
}

/// The edit device `d` makes to a shared entity: the highest progress and the union of tags
/// win on every node.
fn edit(d: usize) -> String {
    format!(r#"{{"progress":{},"tags":{{"$add":["d{d}"]}}}}"#, d + 1)
}

fn count(r: &Replica) -> usize {
    r.status()
        .ok()
        .and_then(|s| s.entities.get("tasks").and_then(|v| v.as_u64()))
        .unwrap_or(0) as usize
}

/// A digest of every view of `tasks` on `r`.
fn digest(r: &Replica) -> anyhow::Result<u64> {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    r.list("tasks", &[], true, &mut |v| {
        serde_json::to_string(&v).unwrap_or_default().hash(&mut h);
        true
    })?;
    Ok(h.finish())
}

/// Runs `spec` against the relay at `relay_addr`, which holds the entities `shared` and
/// nothing else; `invite` gives one invite per device (an invite admits one device). Device
/// data goes under `root`.
pub async fn run(
    root: &Path,
    invite: &mut dyn FnMut() -> anyhow::Result<Vec<u8>>,
    relay_addr: &str,
    shared: &[EntityId],
    spec: &Spec,
) -> anyhow::Result<Outcome> {
    let deadline = Instant::now() + spec.timeout;
    let mut nodes = Vec::with_capacity(spec.devices);
    for d in 0..spec.devices {
        let dir = root.join(format!("device{d}"));
        drop(Replica::init_join(&dir, &invite()?, &format!("device{d}"))?);
        let replica = Arc::new(reopen(&dir, spec.memory).await?);
        nodes.push(
            LiveNode::start(
                &format!("device{d}"),
                replica,
                Role::Device,
                &[relay_addr.to_owned()],
            )
            .await?,
        );
    }
    wait(deadline, "every device has the shared entities", || {
        nodes.iter().all(|n| count(&n.replica) == shared.len())
    })
    .await?;

    let start = Instant::now();
    let mut writers = Vec::new();
    for (d, node) in nodes.iter().enumerate() {
        let replica = node.replica.clone();
        let handle = node.handle.clone();
        let (owned, edits) = (spec.owned, spec.edits);
        let shared = shared.to_vec();
        writers.push(tokio::spawn(async move {
            let done = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                let lines: String = (0..owned)
                    .map(|i| crate::ten_field_task(shared.len() + d * owned + i) + "\n")
                    .collect();
                replica.bulk_import("tasks", &lines, &mut |_, _| {})?;
                for k in 0..edits.min(shared.len()) {
                    replica.put("tasks", Some(shared[(d + k) % shared.len()]), &edit(d))?;
                }
                Ok(())
            })
            .await;
            handle.local_change().await;
            done?
        }));
    }
    for w in writers {
        w.await??;
    }

    let total = shared.len() + spec.devices * spec.owned;
    loop {
        wait(deadline, "every device holds every entity", || {
            nodes
                .iter()
                .all(|n| n.replica.feed_seq() >= total as u64 && count(&n.replica) == total)
        })
        .await?;
        if converged(&nodes, shared, spec)? {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "devices hold {total} entities each but differ (timed out after {:?}): {}",
            spec.timeout,
            differences(&nodes, shared, spec)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let converged = start.elapsed();
    for n in nodes {
        n.stop().await;
    }
    Ok(Outcome {
        converged,
        entities: total,
    })
}

/// The tags and highest progress every node must end with on shared entity `s`.
fn expected(s: usize, shared: &[EntityId], spec: &Spec) -> (BTreeSet<String>, Option<u64>) {
    let edits = spec.edits.min(shared.len());
    // Devices d with (d + k) % len == s for some k < edits edited entity s.
    let editors: Vec<usize> = (0..spec.devices)
        .filter(|d| (0..edits).any(|k| (d + k) % shared.len() == s))
        .collect();
    let tags = editors.iter().map(|d| format!("d{d}")).collect();
    (tags, editors.iter().map(|&d| d as u64 + 1).max())
}

/// The device tags and progress a node holds on a shared entity.
fn shared_state(r: &Replica, id: EntityId) -> anyhow::Result<(BTreeSet<String>, Option<u64>)> {
    let v = r.get("tasks", id)?;
    let tags = v["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_str())
        .filter(|t| t.starts_with('d'))
        .map(str::to_owned)
        .collect();
    Ok((tags, v["progress"].as_u64()))
}

/// The device tags and progress `r` holds on each shared entity.
pub fn shared_report(r: &Replica, shared: &[EntityId]) -> String {
    let states: Vec<String> = shared
        .iter()
        .enumerate()
        .map(|(s, id)| match shared_state(r, *id) {
            Ok((tags, p)) => format!("{s}: {tags:?} progress {p:?}"),
            Err(e) => format!("{s}: {e}"),
        })
        .collect();
    states.join("; ")
}

/// What each device lacks of the shared edits (for the error when they never converge).
fn differences(nodes: &[LiveNode], shared: &[EntityId], spec: &Spec) -> String {
    let mut out = Vec::new();
    for (s, id) in shared.iter().enumerate() {
        let (tags, progress) = expected(s, shared, spec);
        for n in nodes {
            match shared_state(&n.replica, *id) {
                Ok((have, p)) if have == tags && (progress.is_none() || p == progress) => {}
                Ok((have, p)) => out.push(format!(
                    "{} on shared {s}: lacks tags {:?}, progress {p:?} (want {progress:?})",
                    n.describe(),
                    tags.difference(&have).collect::<Vec<_>>()
                )),
                Err(e) => out.push(format!("{} on shared {s}: {e}", n.name)),
            }
        }
    }
    if out.is_empty() {
        out.push("the shared entities agree; other views differ".into());
    }
    out.join("; ")
}

/// Whether every device has the expected shared values and the same views overall.
fn converged(nodes: &[LiveNode], shared: &[EntityId], spec: &Spec) -> anyhow::Result<bool> {
    for (s, id) in shared.iter().enumerate() {
        let (tags, progress) = expected(s, shared, spec);
        for n in nodes {
            let (have, p) = shared_state(&n.replica, *id)?;
            if have != tags || (progress.is_some() && p != progress) {
                return Ok(false);
            }
        }
    }
    let first = digest(&nodes[0].replica)?;
    for n in &nodes[1..] {
        if digest(&n.replica)? != first {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Opens `dir` again with `memory` (sled lets go of a dropped store's lock a moment later).
async fn reopen(dir: &Path, memory: MemoryOptions) -> anyhow::Result<Replica> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Replica::open_with(dir, memory) {
            Err(e) if e.to_string().contains("in use") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return Ok(other?),
        }
    }
}

async fn wait(
    deadline: Instant,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    while !check() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
