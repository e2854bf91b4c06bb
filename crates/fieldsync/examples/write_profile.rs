//! Where a single acknowledged write spends its CPU: 8 ten-field tasks, then `N` updates
//! of one field, on one thread; or (`import N`) a bulk import of `N` tasks. Run under
//! callgrind (instructions, not seconds):
//! `valgrind --tool=callgrind target/release/examples/write_profile 2000`.

use fieldsync::Replica;

const SCHEMA: &str = r#"
[collections.tasks.fields]
status   = { rule = "rank", order = ["open", "in_progress", "completed"] }
progress = { rule = "max" }
tags     = { rule = "set" }
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let import = args.first().is_some_and(|a| a == "import");
    if import {
        args.remove(0);
    }
    let n: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(2000);
    let tmp = tempfile::tempdir()?;
    let replica = Replica::init_authority(&tmp.path().join("n"), SCHEMA, "profile")?;
    if import {
        let lines: String = (0..n)
            .map(|i| format!("{{\"title\":\"Task {i}\",\"status\":\"open\",\"progress\":{},\"tags\":[\"t{}\"],\"site\":\"Site {}\",\"assignee\":\"user{}\"}}\n", i % 100, i % 7, i % 50, i % 20))
            .collect();
        replica.bulk_import("tasks", &lines, &mut |_, _| {})?;
        eprintln!("{n} imported");
        return Ok(());
    }
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
