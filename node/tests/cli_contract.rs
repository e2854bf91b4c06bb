//! The CLI contract: two nodes driven only through `fieldsync` processes — JSON out, exit
//! codes 0/1/2/3, bad input refused whole with a message naming the problem.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value as Json;

const SCHEMA: &str = include_str!("../../examples/schema.toml");

struct Node {
    dir: PathBuf,
}

fn fieldsync(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fieldsync"))
        .arg("--data")
        .arg(dir)
        .args(args)
        .env_remove("FIELDSYNC_DATA")
        .output()
        .expect("run fieldsync")
}

impl Node {
    fn run(&self, args: &[&str]) -> Output {
        fieldsync(&self.dir, args)
    }

    /// Runs a command that must succeed; its stdout as one JSON value.
    fn ok(&self, args: &[&str]) -> Json {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs a command that must succeed; its stdout as JSON Lines.
    fn lines(&self, args: &[&str]) -> Vec<Json> {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }

    /// Runs a command that must fail with `code`, naming `needle` on stderr.
    fn fails(&self, args: &[&str], code: i32, needle: &str) {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: stderr {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr:?}"
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed to stdout on failure"
        );
    }

    fn feed_seq(&self) -> u64 {
        self.ok(&["status"])["feed_seq"].as_u64().expect("feed_seq")
    }
}

/// An authority (`hq`) and a device (`ana`) in one workspace.
fn pair(tmp: &Path) -> (Node, Node) {
    let schema = tmp.join("schema.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let hq = Node {
        dir: tmp.join("hq"),
    };
    let init = hq.ok(&["init", "--schema", schema.to_str().unwrap(), "--name", "hq"]);
    assert_eq!(init["authority"], true);
    let invite = tmp.join("invite.json");
    // The signed member record names the user; the device's own --name does not.
    let out = hq.run(&["invite", "--user", "ana-m"]);
    assert!(out.status.success());
    std::fs::write(&invite, &out.stdout).unwrap();
    let ana = Node {
        dir: tmp.join("ana"),
    };
    let joined = ana.ok(&["init", "--join", invite.to_str().unwrap(), "--name", "ana"]);
    assert_eq!(joined["authority"], false);
    assert_eq!(joined["workspace"], init["workspace"]);
    (hq, ana)
}

fn sync(from: &Node, to: &Node, file: &Path) {
    let to_peer = to.ok(&["status"])["peer_id"].as_str().unwrap().to_owned();
    from.ok(&[
        "bundle",
        "export",
        file.to_str().unwrap(),
        "--since",
        &to_peer,
    ]);
    to.ok(&["bundle", "import", file.to_str().unwrap()]);
}

#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, ana) = pair(tmp.path());
    let id = hq.ok(&["put", "tasks", r#"{"title":"a","tags":["x"]}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stock = hq.ok(&["put", "inventory", r#"{"stock":9007199254740991}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = hq.feed_seq();
    let cases: &[(&[&str], &str)] = &[
        (&["put", "nope", "{}"], "unknown collection \"nope\""),
        (&["put", "tasks", "{\"title\":"], "malformed JSON"),
        (&["put", "tasks", "[1,2]"], "JSON object"),
        (
            &["put", "tasks", r#"{"status":"done"}"#],
            "field \"status\"",
        ),
        (
            &["put", "tasks", r#"{"progress":"half"}"#],
            "field \"progress\"",
        ),
        (
            &["put", "tasks", r#"{"tags":{"$inc":1}}"#],
            "does not take $inc",
        ),
        (
            &["put", "inventory", r#"{"stock":{"$add":[1]}}"#],
            "does not take $add",
        ),
        (
            &["put", "inventory", r#"{"stock":"ten"}"#],
            "field \"stock\"",
        ),
        (
            &["put", "tasks", &id, r#"{"title":"ok","progress":"bad"}"#],
            "field \"progress\"",
        ),
        (
            &["put", "tasks", "not-a-uuid", "{}"],
            "entity id \"not-a-uuid\"",
        ),
        (&["get", "tasks", "xyz"], "entity id"),
        (&["list", "tasks", "--where", "novalue"], "FIELD=VALUE"),
        (&["resolve", "zz", "1"], "conflict id"),
        (&["frobnicate"], "unrecognized subcommand"),
        // Arithmetic refuses rather than wraps.
        (
            &["put", "inventory", &stock, r#"{"stock":{"$inc":1}}"#],
            "field \"stock\": adding 1",
        ),
        (
            &["put", "inventory", r#"{"stock":9223372036854775807}"#],
            "field \"stock\"",
        ),
        (
            &["put", "tasks", &id, r#"{"progress":1e300}"#],
            "field \"progress\"",
        ),
    ];
    for (args, needle) in cases {
        hq.fails(args, 2, needle);
    }
    assert_eq!(hq.feed_seq(), before, "a refused command wrote something");
    assert_eq!(hq.ok(&["get", "tasks", &id])["title"], "a");
    assert_eq!(
        hq.ok(&["get", "inventory", &stock])["stock"],
        9007199254740991i64
    );
    let hq_peer = hq.ok(&["status"])["peer_id"].as_str().unwrap().to_owned();
    ana.fails(
        &["revoke", &hq_peer],
        2,
        "only the workspace authority can revoke members",
    );
}

#[test]
fn missing_things_exit_3() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, _) = pair(tmp.path());
    let absent = "01234567-89ab-7def-8123-456789abcdef";
    hq.fails(&["get", "tasks", absent], 3, "no entity");
    hq.fails(&["delete", "tasks", absent], 3, "no entity");
    hq.fails(&["history", "tasks", absent], 3, "no entity");
    hq.fails(&["resolve", "0123456789abcdef", "1"], 3, "conflict");
    hq.fails(&["accept", absent], 3, "proposal");
    let id = hq.ok(&["put", "tasks", r#"{"title":"a"}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    hq.fails(&["get", "payments", &id], 3, "no entity");
    hq.ok(&["delete", "tasks", &id]);
    hq.fails(&["put", "tasks", &id, r#"{"title":"b"}"#], 3, "deleted");
    assert_eq!(hq.ok(&["get", "tasks", &id])["_deleted"], true);
    assert!(hq.lines(&["list", "tasks"]).is_empty());
    assert_eq!(hq.lines(&["list", "tasks", "--include-deleted"]).len(), 1);
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = Node {
        dir: tmp.path().join("none"),
    };
    nowhere.fails(&["status"], 2, "no fieldsync node");
    nowhere.fails(
        &["init", "--schema", "/nonexistent/schema.toml"],
        2,
        "cannot read",
    );
    let bad_schema = tmp.path().join("bad.toml");
    std::fs::write(
        &bad_schema,
        "[collections.t.fields]\nx = { rule = \"sometimes\" }",
    )
    .unwrap();
    nowhere.fails(
        &["init", "--schema", bad_schema.to_str().unwrap()],
        2,
        "unknown rule",
    );
    let (hq, ana) = pair(tmp.path());
    hq.fails(
        &["init", "--schema", bad_schema.to_str().unwrap()],
        2,
        "already holds",
    );
    ana.fails(&["proposals"], 2, "authority");
    ana.fails(&["invite"], 2, "authority");
    let garbage = tmp.path().join("garbage.json");
    std::fs::write(&garbage, "{\"format\": 1}").unwrap();
    Node {
        dir: tmp.path().join("x"),
    }
    .fails(
        &["init", "--join", garbage.to_str().unwrap()],
        2,
        "invalid invite",
    );
}

#[test]
fn bad_and_foreign_bundles_are_refused_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, ana) = pair(tmp.path());
    for i in 0..5 {
        ana.ok(&["put", "tasks", &format!(r#"{{"title":"t{i}"}}"#)]);
    }
    let bundle = tmp.path().join("b.fsb");
    ana.ok(&["bundle", "export", bundle.to_str().unwrap()]);
    let bytes = std::fs::read(&bundle).unwrap();
    let before = hq.feed_seq();

    let truncated = tmp.path().join("truncated.fsb");
    std::fs::write(&truncated, &bytes[..bytes.len() - 10]).unwrap();
    hq.fails(
        &["bundle", "import", truncated.to_str().unwrap()],
        2,
        "truncated",
    );
    let mut flipped = bytes.clone();
    let mid = bytes.len() / 2;
    flipped[mid] ^= 0x55;
    let corrupt = tmp.path().join("corrupt.fsb");
    std::fs::write(&corrupt, &flipped).unwrap();
    hq.fails(
        &["bundle", "import", corrupt.to_str().unwrap()],
        2,
        "invalid bundle",
    );
    let text = tmp.path().join("text.fsb");
    std::fs::write(&text, "hello").unwrap();
    hq.fails(
        &["bundle", "import", text.to_str().unwrap()],
        2,
        "not a fieldsync bundle",
    );

    // Another workspace with the same schema.
    let schema = tmp.path().join("schema.toml");
    let other = Node {
        dir: tmp.path().join("other"),
    };
    other.ok(&["init", "--schema", schema.to_str().unwrap()]);
    other.fails(
        &["bundle", "import", bundle.to_str().unwrap()],
        2,
        "from workspace",
    );
    assert!(other.lines(&["list", "tasks"]).is_empty());

    assert_eq!(hq.feed_seq(), before, "a refused bundle was partly applied");
    let summary = hq.ok(&["bundle", "import", bundle.to_str().unwrap()]);
    assert_eq!(summary["created"], 5);
    let again = hq.ok(&["bundle", "import", bundle.to_str().unwrap()]);
    assert_eq!(
        (again["created"].as_u64(), again["unchanged"].as_u64()),
        (Some(0), Some(5))
    );
}

#[test]
fn offline_edits_merge_by_bundle_with_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, ana) = pair(tmp.path());
    let b = tmp.path().join("b.fsb");
    let task = hq.ok(&[
        "put",
        "tasks",
        r#"{"title":"Fit boiler","status":"open","tags":["boiler"],"progress":10}"#,
    ])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stock = hq.ok(&["put", "inventory", r#"{"name":"valve","stock":10}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shift = hq.ok(&["put", "shifts", r#"{"start":"08:00"}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // hq exports only for members it knows: ana's first bundle (carrying her invite) introduces her.
    let unknown = hq.run(&[
        "bundle",
        "export",
        b.to_str().unwrap(),
        "--since",
        ana.ok(&["status"])["peer_id"].as_str().unwrap(),
    ]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("import a bundle from it first"));
    sync(&ana, &hq, &b);
    sync(&hq, &ana, &b);

    // Apart: ana completes the task, hq retitles it and sets it in progress.
    ana.ok(&[
        "put",
        "tasks",
        &task,
        r#"{"status":"completed","tags":{"$add":["urgent"]},"progress":100}"#,
    ]);
    hq.ok(&["put", "tasks", &task, r#"{"status":"in_progress","title":"Fit new boiler","tags":{"$add":["gas"]},"progress":60}"#]);
    ana.ok(&["put", "inventory", &stock, r#"{"stock":{"$inc":-3}}"#]);
    hq.ok(&["put", "inventory", &stock, r#"{"stock":{"$inc":5}}"#]);
    ana.ok(&["put", "shifts", &shift, r#"{"start":"09:00"}"#]);
    hq.ok(&["put", "shifts", &shift, r#"{"start":"10:00"}"#]);
    let payment = ana.ok(&[
        "put",
        "payments",
        r#"{"amount":50,"status":"collected","payer":"Bakker"}"#,
    ])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let view = ana.ok(&["get", "payments", &payment]);
    assert!(
        view.get("amount").is_none(),
        "a device's authority write showed as confirmed: {view}"
    );
    assert_eq!(view["_pending"]["amount"], 50);

    sync(&ana, &hq, &b);
    sync(&hq, &ana, &b);
    for node in [&hq, &ana] {
        let t = node.ok(&["get", "tasks", &task]);
        assert_eq!(t["status"], "completed");
        assert_eq!(t["title"], "Fit new boiler");
        assert_eq!(t["progress"], 100);
        assert_eq!(t["tags"], serde_json::json!(["boiler", "gas", "urgent"]));
        assert_eq!(node.ok(&["get", "inventory", &stock])["stock"], 12);
        let s = node.ok(&["get", "shifts", &shift]);
        let mut alternatives: Vec<String> = s["_conflicts"]["start"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        alternatives.sort();
        assert_eq!(alternatives, ["09:00", "10:00"]);
    }
    assert_eq!(
        hq.ok(&["get", "tasks", &task]),
        ana.ok(&["get", "tasks", &task])
    );

    // The manual conflict is open on both; resolving it on the device closes it everywhere.
    let open = ana.lines(&["conflicts"]);
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0]["rule"].as_str(), open[0]["state"].as_str()),
        (Some("manual"), Some("open"))
    );
    assert_eq!(
        hq.lines(&["conflicts"]),
        open,
        "conflict ids differ between nodes"
    );
    assert!(hq
        .lines(&["conflicts", "--all"])
        .iter()
        .any(|c| c["rule"] == "rank" && c["state"] == "auto"));
    ana.ok(&["resolve", open[0]["id"].as_str().unwrap(), "\"09:30\""]);
    sync(&ana, &hq, &b);
    assert!(hq.lines(&["conflicts"]).is_empty());
    assert_eq!(hq.ok(&["get", "shifts", &shift])["start"], "09:30");

    // The authority confirms the payment; the device sees it confirmed, and its later write
    // to the confirmed field stays a proposal.
    let proposals = hq.lines(&["proposals"]);
    assert_eq!(proposals.len(), 2, "{proposals:?}");
    for p in &proposals {
        hq.ok(&["accept", p["id"].as_str().unwrap()]);
    }
    assert!(hq.lines(&["proposals"]).is_empty());
    sync(&hq, &ana, &b);
    let view = ana.ok(&["get", "payments", &payment]);
    assert_eq!(
        (view["amount"].as_i64(), view["status"].as_str()),
        (Some(50), Some("collected"))
    );
    assert!(view.get("_pending").is_none(), "{view}");
    ana.ok(&["put", "payments", &payment, r#"{"amount":5}"#]);
    let view = ana.ok(&["get", "payments", &payment]);
    assert_eq!(
        (view["amount"].as_i64(), view["_pending"]["amount"].as_i64()),
        (Some(50), Some(5))
    );
    sync(&ana, &hq, &b);
    let id = hq.lines(&["proposals"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    hq.ok(&["reject", &id]);
    sync(&hq, &ana, &b);
    let view = ana.ok(&["get", "payments", &payment]);
    assert_eq!(view["amount"], 50);
    assert!(view.get("_pending").is_none());

    // History records device, the user of its signed member record, fields, and each
    // field's value before and after.
    let history = hq.lines(&["history", "tasks", &task]);
    assert_eq!(history.len(), 3, "{history:?}");
    let by_ana = history.iter().find(|h| {
        h["user"] == "ana-m" && h["fields"].as_array().unwrap().contains(&"status".into())
    });
    assert!(by_ana.is_some(), "{history:?}");
    let status = by_ana.unwrap()["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["field"] == "status")
        .cloned()
        .unwrap();
    assert_ne!(status["before"], status["after"], "{status}");
}

#[test]
fn auto_accept_confirms_on_receipt_and_since_sends_only_news() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, ana) = pair(tmp.path());
    let b = tmp.path().join("b.fsb");
    let order = ana.ok(&["put", "orders", r#"{"status":"served","table":4}"#])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..20 {
        ana.ok(&["put", "tasks", &format!(r#"{{"title":"t{i}"}}"#)]);
    }
    sync(&ana, &hq, &b);
    assert_eq!(hq.ok(&["get", "orders", &order])["status"], "served");
    assert!(hq.lines(&["proposals"]).is_empty());
    sync(&hq, &ana, &b);
    assert_eq!(ana.ok(&["get", "orders", &order])["status"], "served");

    // Once both sides have acknowledged each other, one new change travels alone.
    sync(&ana, &hq, &b);
    sync(&hq, &ana, &b);
    ana.ok(&["put", "tasks", r#"{"title":"late"}"#]);
    let hq_peer = hq.ok(&["status"])["peer_id"].as_str().unwrap().to_owned();
    let out = ana.ok(&["bundle", "export", b.to_str().unwrap(), "--since", &hq_peer]);
    assert_eq!(out["entities"], 1, "{out}");
    hq.ok(&["bundle", "import", b.to_str().unwrap()]);
    assert_eq!(
        hq.lines(&["list", "tasks", "--where", "title=late"]).len(),
        1
    );
}

#[test]
fn bulk_import_and_export_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (hq, _) = pair(tmp.path());
    let file = tmp.path().join("tasks.jsonl");
    let lines: String = (0..300)
        .map(|i| {
            format!(
                "{{\"title\":\"t{i}\",\"status\":\"open\",\"tags\":[\"n{}\"]}}\n",
                i % 3
            )
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    assert_eq!(
        hq.ok(&["import", "tasks", file.to_str().unwrap()])["imported"],
        300
    );
    assert_eq!(
        hq.lines(&["list", "tasks", "--where", "tags=n1"]).len(),
        100
    );
    assert_eq!(
        hq.lines(&["list", "tasks", "--where", "tags=n1", "--where", "title=t4"])
            .len(),
        1
    );
    let out = hq.run(&["export", "tasks"]);
    assert!(out.status.success());
    let exported = tmp.path().join("exported.jsonl");
    std::fs::write(&exported, &out.stdout).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 300);
    // Re-importing the export updates the same entities: still 300.
    let before = hq.feed_seq();
    hq.ok(&["import", "tasks", exported.to_str().unwrap()]);
    assert_eq!(hq.lines(&["list", "tasks"]).len(), 300);
    assert!(hq.feed_seq() >= before);

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"title\":\"ok\"}\n{\"status\":\"nope\"}\n").unwrap();
    hq.fails(&["import", "tasks", bad.to_str().unwrap()], 2, "line 2");
    assert_eq!(
        hq.lines(&["list", "tasks"]).len(),
        300,
        "a refused import wrote something"
    );
}
