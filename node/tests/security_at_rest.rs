//! Issue 16 through real `fieldsync` processes: `init --encrypt` (passphrase and key file)
//! and every later command and daemon opening the store the same way, `purge` through a
//! running daemon reaching a device over the network, and `authority export` /
//! `init --restore`.

mod support;

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use support::{bin, eventually, Daemon, LOCAL, SCHEMA};

fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.env_remove("FIELDSYNC_PASSPHRASE")
        .env_remove("FIELDSYNC_KEY_FILE")
        .env_remove("FIELDSYNC_BACKUP_PASSPHRASE");
    for (k, v) in env {
        c.env(k, v);
    }
    c.arg("--data")
        .arg(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run fieldsync")
}

fn ok(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = run(dir, args, env);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn fails(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = run(dir, args, env);
    assert!(!out.status.success(), "{args:?} succeeded");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            files_contain(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[test]
fn an_encrypted_node_needs_its_passphrase_or_key_file_for_every_command_and_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let schema = tmp.path().join("schema.toml");
    std::fs::write(&schema, SCHEMA).unwrap();
    let hq = tmp.path().join("hq");
    let pass = [("FIELDSYNC_PASSPHRASE", "correct horse battery")];
    let (code, err) = fails(
        &hq,
        &["init", "--schema", schema.to_str().unwrap(), "--encrypt"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("FIELDSYNC_PASSPHRASE") && err.contains("--key-file"),
        "{err}"
    );
    let (_, err) = fails(
        &hq,
        &["init", "--schema", schema.to_str().unwrap(), "--encrypt"],
        &[("FIELDSYNC_PASSPHRASE", "short")],
    );
    assert!(err.contains("at least 8"), "{err}");
    let init = ok(
        &hq,
        &[
            "init",
            "--schema",
            schema.to_str().unwrap(),
            "--encrypt",
            "--name",
            "hq",
        ],
        &pass,
    );
    assert_eq!(init["encrypted"], true);
    let marker = "Marker-Process-Encrypted-8086";
    let id = ok(
        &hq,
        &[
            "put",
            "tasks",
            &format!(r#"{{"title": "{marker}", "status": "open"}}"#),
        ],
        &pass,
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!files_contain(&hq, marker.as_bytes()));
    let (code, err) = fails(&hq, &["get", "tasks", &id], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("encrypted with a passphrase") && err.contains("FIELDSYNC_PASSPHRASE"),
        "{err}"
    );
    let (code, err) = fails(
        &hq,
        &["status"],
        &[("FIELDSYNC_PASSPHRASE", "wrong horse battery")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("does not open this store"), "{err}");
    assert_eq!(ok(&hq, &["get", "tasks", &id], &pass)["title"], marker);

    // A device with a key file it gets at init; its daemon opens with the same flag.
    let invite = tmp.path().join("invite.json");
    std::fs::write(&invite, run(&hq, &["invite"], &pass).stdout).unwrap();
    let dev = tmp.path().join("dev");
    let key = tmp.path().join("dev.key");
    let init = ok(
        &dev,
        &[
            "init",
            "--join",
            invite.to_str().unwrap(),
            "--encrypt",
            "--key-file",
            key.to_str().unwrap(),
            "--name",
            "dev",
        ],
        &[],
    );
    assert_eq!(init["encrypted"], true);
    #[cfg(unix)]
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions())
            & 0o777,
        0o600
    );
    let (_, err) = fails(&dev, &["status"], &[]);
    assert!(err.contains("--key-file"), "{err}");
    let relay_args = [&["relay"], LOCAL].concat();
    let mut relay = Daemon::start_env(&hq, &relay_args, &pass);
    let addr = relay.addr();
    relay.wait_for("api");
    let mut d = Daemon::start_env(
        &dev,
        &[
            &["run", "--relay", &addr, "--key-file", key.to_str().unwrap()],
            LOCAL,
        ]
        .concat(),
        &[],
    );
    d.wait_for("api");
    // Through the daemon's API, the CLI needs no key.
    eventually("the task reaches the encrypted device", || {
        run(&dev, &["get", "tasks", &id], &[]).status.success()
    });
    // Purge through the relay's daemon: the device drops it too, and its files hold no trace.
    let purged = ok(&hq, &["purge", "tasks", &id], &[]);
    assert_eq!(purged["purged"], true);
    eventually("the purge reaches the device", || {
        run(&dev, &["get", "tasks", &id], &[]).status.code() == Some(3)
    });
    d.stop();
    relay.stop();
    assert!(!files_contain(&hq, marker.as_bytes()) && !files_contain(&dev, marker.as_bytes()));
    let purges = run(
        &dev,
        &["list", "_purges", "--key-file", key.to_str().unwrap()],
        &[],
    );
    assert!(
        String::from_utf8_lossy(&purges.stdout).contains(&id),
        "the purge record is kept as the tombstone"
    );

    // The authority key survives: export, lose the disk, restore.
    let backup = tmp.path().join("authority.backup");
    let (_, err) = fails(
        &hq,
        &["authority", "export", backup.to_str().unwrap()],
        &pass,
    );
    assert!(err.contains("FIELDSYNC_BACKUP_PASSPHRASE"), "{err}");
    let both = [pass[0], ("FIELDSYNC_BACKUP_PASSPHRASE", "office safe 2026")];
    ok(
        &hq,
        &["authority", "export", backup.to_str().unwrap()],
        &both,
    );
    let peer = ok(&hq, &["status"], &pass)["peer_id"].clone();
    std::fs::remove_dir_all(&hq).unwrap();
    let (_, err) = fails(
        &hq,
        &["init", "--restore", backup.to_str().unwrap()],
        &[("FIELDSYNC_BACKUP_PASSPHRASE", "office safe 2025")],
    );
    assert!(err.contains("does not open"), "{err}");
    let restored = ok(
        &hq,
        &["init", "--restore", backup.to_str().unwrap()],
        &[("FIELDSYNC_BACKUP_PASSPHRASE", "office safe 2026")],
    );
    assert_eq!(
        (restored["authority"].clone(), restored["peer_id"].clone()),
        (Value::Bool(true), peer)
    );
    assert!(
        run(&hq, &["invite"], &[]).status.success(),
        "the restored authority signs invites"
    );
}
