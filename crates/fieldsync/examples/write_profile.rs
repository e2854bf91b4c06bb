//! Where a single acknowledged write spends its CPU: 8 ten-field tasks, then `N` updates
//! of one field, on one thread. Run under callgrind (instructions, not seconds):
//! `valgrind --tool=callgrind target/release/examples/write_profile 2000`.

use fieldsync::Replica;

const SCHEMA: &str = r#"
[collections.tasks.fields]
status   = { rule = "rank", order = ["open", "in_progress", "completed"] }
progress = { rule = "max" }
tags     = { rule = "set" }
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(2000);
    let tmp = tempfile::tempdir()?;
    let replica = Replica::init_authority(&tmp.path().join("n"), SCHEMA, "profile")?;
    let ids: Vec<_> = (0..8)
        .map(|i| {
            replica.put(
                "tasks",
                None,
                &format!(r#"{{"title":"Task {i}","status":"open","progress":0,"tags":["t{i}"],"site":"Site {i}","assignee":"user{i}","priority":1,"notes_short":"call before","customer":"Customer {i}","due":"2026-12-01"}}"#),
            )
        })
        .collect::<Result<_, _>>()?;
    for i in 0..n {
        replica.put(
            "tasks",
            Some(ids[i % 8]),
            &format!(r#"{{"progress":{}}}"#, i % 100),
        )?;
    }
    eprintln!("{n} writes");
    Ok(())
}
