//! Shared helpers for fieldsync's cross-crate tests and examples.

pub mod floors;
pub mod live;
pub mod load;
pub mod sim;

/// Prints a benchmark's row for `scripts/bench-report`: the figure beside its target, and
/// whether it meets it (`None`: a figure with no target).
pub fn report(metric: &str, figure: &str, target: &str, meets: Option<bool>) {
    let m = match meets {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "—",
    };
    println!("report: | {metric} | {figure} | {target} | {m} |");
}

use std::path::Path;

use fieldsync::Replica;

/// The schema the examples and tests use (`examples/schema.toml`).
pub const SCHEMA: &str = include_str!("../../examples/schema.toml");

/// An authority and `devices` joined devices (each already known to the authority as a
/// member) in fresh directories under `root`.
pub fn workspace(
    root: &Path,
    devices: &[&str],
) -> Result<(Replica, Vec<Replica>), fieldsync::Error> {
    let hq = Replica::init_authority(&root.join("hq"), SCHEMA, "hq")?;

    let devices = devices
        .iter()
        .map(|name| {
            let device = Replica::init_join(&root.join(name), &hq.invite(), name)?;
            // Its first bundle carries its invite: the authority makes it a member, and
            // from then on exports for it (only what it may see).
            exchange(&device, &hq)?;
            Ok(device)
        })
        .collect::<Result<Vec<_>, fieldsync::Error>>()?;
    Ok((hq, devices))
}

/// Brings `to` up to date with `from` through a bundle, as two offline sites would.
pub fn exchange(from: &Replica, to: &Replica) -> Result<(), fieldsync::Error> {
    let bundle = from.export_bundle(Some(to.peer_id()), &mut |_, _| {})?;
    to.import_bundle(&bundle.bytes, &mut |_, _| {})?;
    Ok(())
}

/// A task with ten fields, as the benchmarks use (values vary with `i`).
pub fn ten_field_task(i: usize) -> String {
    format!(
        r#"{{"title":"Task {i}","status":"open","progress":{},"tags":["t{}"],"site":"Site {}","assignee":"user{}","priority":{},"notes":"call before","customer":"Customer {}","due":"2026-12-{:02}"}}"#,
        i % 100,
        i % 7,
        i % 50,
        i % 20,
        i % 5,
        i % 1000,
        i % 28 + 1
    )
}
