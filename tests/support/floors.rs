//! The floors benchmarks print beside their figures, measured in the same run: what
//! Automerge alone does with the same documents, with no IO.

use std::time::Instant;

use automerge::transaction::Transactable as _;
use automerge::{AutoCommit, ObjType, ROOT};

/// A flat JSON object (strings, integers, arrays of strings — the benchmarks' tasks) as a
/// plain Automerge document with one change.
pub fn automerge_doc(json: &str) -> AutoCommit {
    let mut doc = AutoCommit::new();
    let object: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    for (k, v) in object.as_object().into_iter().flatten() {
        let _ = match v {
            serde_json::Value::String(s) => doc.put(ROOT, k, s.as_str()),
            serde_json::Value::Number(n) => doc.put(ROOT, k, n.as_i64().unwrap_or(0)),
            serde_json::Value::Array(items) => match doc.put_object(ROOT, k, ObjType::List) {
                Ok(list) => items.iter().enumerate().try_for_each(|(j, item)| {
                    doc.insert(&list, j, item.as_str().unwrap_or_default())
                }),
                Err(e) => Err(e),
            },
            _ => Ok(()),
        };
    }
    doc.commit();
    doc
}

/// The first-sync floor: seconds to `save()` and `load()` each of `docs`, one core.
pub fn save_load_seconds(docs: Vec<AutoCommit>) -> Result<f64, automerge::AutomergeError> {
    let t = Instant::now();
    for mut doc in docs {
        let bytes = doc.save();
        std::hint::black_box(AutoCommit::load(&bytes)?);
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The bulk-import floor: documents per second Automerge creates and saves from `json(i)`
/// for `i` in `0..n`, on `threads` threads.
pub fn creation_rate(n: usize, threads: usize, json: impl Fn(usize) -> String + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for first in 0..threads {
            let json = &json;
            s.spawn(move || {
                for i in (first..n).step_by(threads) {
                    std::hint::black_box(automerge_doc(&json(i)).save());
                }
            });
        }
    });
    n as f64 / start.elapsed().as_secs_f64()
}

/// Task `i` of the benchmarks: a 10-field task as JSON (strings, integers, a one-tag set).
pub fn ten_fields(i: usize) -> String {
    format!(
        r#"{{"title":"Task {i}","status":"open","progress":{p},"tags":["t{t}"],"site":"Site {s}","assignee":"user{u}","priority":{pr},"notes_short":"call before","customer":"Customer {c}","due":"2026-12-{d:02}"}}"#,
        p = i % 100,
        t = i % 7,
        s = i % 50,
        u = i % 20,
        pr = i % 5,
        c = i % 1000,
        d = i % 28 + 1
    )
}
