//! A photo attached on one device reaches others on demand, over the file protocol beside
//! sync, with real processes on 127.0.0.1: another device asks the relay, which fetches it
//! from the device that took it and passes it on; a device whose partitions hide the job is
//! refused; bytes tampered with on the way are detected, counted and never stored.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use fieldsync::blobs::Hash;
use support::{bin, cli, eventually, start_device, start_relay};

const SCHEMA: &str = r#"
[collections.jobs.fields]
photos = { rule = "attachments" }
"#;

fn run(dir: &Path, args: &[&str]) -> Output {
    bin()
        .arg("--data")
        .arg(dir)
        .args(args)
        .output()
        .expect("run fieldsync")
}

/// A workspace with `schema`, its authority (the relay) in `tmp/relay`.
fn authority(tmp: &Path, schema: &str) -> PathBuf {
    let file = tmp.join("schema.toml");
    std::fs::write(&file, schema).expect("schema");
    let dir = tmp.join("relay");
    cli(
        &dir,
        &[
            "init",
            "--schema",
            file.to_str().expect("path"),
            "--name",
            "relay",
        ],
    );
    dir
}

/// Where the node in `dir` keeps the bytes of file `hash` received so far.
fn partial_of(dir: &Path, hash: &str) -> PathBuf {
    dir.join("blobs")
        .join("partial")
        .join(format!("{hash}.partial"))
}

/// A new job on `dir` with `bytes` (written to `file`) attached as its photo: (job, hash).
fn job_with_photo(dir: &Path, file: &Path, bytes: &[u8]) -> (String, String) {
    let job = cli(dir, &["put", "jobs", "{}"])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    std::fs::write(file, bytes).expect("photo");
    let o = run(
        dir,
        &[
            "attach",
            "jobs",
            &job,
            "photos",
            file.to_str().expect("path"),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (job, Hash::of(bytes).to_string())
}

fn join(tmp: &Path, relay: &Path, name: &str, partition: &[&str]) -> PathBuf {
    let invite = tmp.join(format!("{name}.invite"));
    let out = bin()
        .arg("--data")
        .arg(relay)
        .arg("invite")
        .args(partition)
        .output()
        .expect("invite");
    assert!(out.status.success());
    std::fs::write(&invite, out.stdout).expect("invite file");
    let dir = tmp.join(name);
    cli(
        &dir,
        &[
            "init",
            "--join",
            invite.to_str().expect("path"),
            "--name",
            name,
        ],
    );
    dir
}

fn fetched(dir: &Path, hash: &str, out: &Path) -> Output {
    run(
        dir,
        &["blob", "get", hash, "--out", out.to_str().expect("path")],
    )
}

fn metric(dir: &Path, name: &str) -> u64 {
    let api = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(dir.join("daemon.json")).expect("daemon.json"),
    )
    .expect("json")["api"]
        .as_str()
        .expect("api")
        .to_owned();
    let text = ureq::get(format!("{api}/metrics"))
        .call()
        .expect("metrics")
        .body_mut()
        .read_to_string()
        .expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn a_photo_is_fetched_on_demand_within_partitions_and_verified() {
    let tmp = tempfile::tempdir().expect("tmp");
    let relay_dir = authority(tmp.path(), SCHEMA);
    let camera = join(tmp.path(), &relay_dir, "camera", &[]);
    let office = join(tmp.path(), &relay_dir, "office", &[]);
    let inspector = join(tmp.path(), &relay_dir, "inspector", &[]);
    let outsider = join(
        tmp.path(),
        &relay_dir,
        "outsider",
        &["--partition", "jobs=none"],
    );

    let (_relay, addr) = start_relay(&relay_dir);
    let mut cam = start_device(&camera, &addr, &[]);
    cam.wait_for("sync_completed");

    // Taken on the camera device: the job and its reference sync, the file stays there.
    let job = cli(&camera, &["put", "jobs", r#"{"site": "Elm St"}"#])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let bytes: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let photo = tmp.path().join("boiler.jpg");
    std::fs::write(&photo, &bytes).expect("photo");
    let attached = run(
        &camera,
        &[
            "attach",
            "jobs",
            &job,
            "photos",
            photo.to_str().expect("path"),
        ],
    );
    assert!(
        attached.status.success(),
        "{}",
        String::from_utf8_lossy(&attached.stderr)
    );
    let hash = Hash::of(&bytes).to_string();
    eventually("the relay has the job's reference", || {
        let o = run(&relay_dir, &["get", "jobs", &job]);
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(&hash)
    });

    // The office asks the relay for the file, which the relay fetches from the camera
    // (verified, stored; unasked, or when asked if it has not yet) and passes it on.
    let mut off = start_device(&office, &addr, &[]);
    off.wait_for("sync_completed");
    eventually("the office has the job", || {
        run(&office, &["get", "jobs", &job]).status.success()
    });
    // An earlier transfer to the office was cut after 1 MB (its bytes are kept in
    // blobs/partial/): this one resumes there and receives only the rest.
    let partial = office.join("blobs").join("partial");
    std::fs::create_dir_all(&partial).expect("partial dir");
    std::fs::write(partial.join(format!("{hash}.partial")), &bytes[..1_000_000]).expect("partial");
    let copy = tmp.path().join("office-copy.jpg");
    let o = fetched(&office, &hash, &copy);
    assert!(
        o.status.success(),
        "office fetch: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&copy).expect("copy"), bytes);
    assert_eq!(cli(&office, &["status"])["blobs"]["count"], 1);
    assert_eq!(
        cli(&relay_dir, &["status"])["blobs"]["count"],
        1,
        "the relay kept a copy"
    );
    eventually("the fetches are counted", || {
        // (The relay may also have fetched it unasked: relays keep every file.)
        metric(&relay_dir, "fieldsync_blobs_fetched_total") >= 1
            && metric(&office, "fieldsync_blobs_fetched_total") == 1
    });
    assert_eq!(
        metric(&office, "fieldsync_blob_bytes_received_total"),
        bytes.len() as u64 - 1_000_000,
        "the resumed transfer sent only what was missing"
    );
    assert!(!partial.join(format!("{hash}.partial")).exists());
    let relay_copy = tmp.path().join("relay-copy.jpg");
    let o = fetched(&relay_dir, &hash, &relay_copy);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&relay_copy).expect("copy"), bytes);

    // A device whose partitions hide jobs is refused by the relay: exit 3, nothing stored.
    let mut out = start_device(&outsider, &addr, &[]);
    out.wait_for("sync_completed");
    let o = fetched(&outsider, &hash, &tmp.path().join("outsider.jpg"));
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(cli(&outsider, &["status"])["blobs"]["count"], 0);

    // Bytes tampered with on the relay's disk (a hostile or broken peer) are detected by
    // the asking device and dropped; once the relay holds the right bytes, it works.
    let stored = relay_dir.join("blobs").join(&hash[..2]).join(&hash);
    let mut bad = bytes.clone();
    bad[1_234_567] ^= 0x40;
    std::fs::write(&stored, &bad).expect("tamper");
    let mut insp = start_device(&inspector, &addr, &[]);
    insp.wait_for("sync_completed");
    eventually("the inspector has the job", || {
        run(&inspector, &["get", "jobs", &job]).status.success()
    });
    let o = fetched(&inspector, &hash, &tmp.path().join("inspector.jpg"));
    assert_eq!(
        o.status.code(),
        Some(3),
        "tampered bytes must not be served as the file"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("hash"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(cli(&inspector, &["status"])["blobs"]["count"], 0);
    // (The daemon copies the network's counters to /metrics twice a second.)
    eventually("the tampered transfer is counted", || {
        metric(&inspector, "fieldsync_blob_transfers_corrupt_total") == 1
    });
    // Caught as it streamed, at the tampered 1 KiB chunk: the chunks before it were
    // verified and kept, so the next try resumes there.
    let kept = std::fs::metadata(partial_of(&inspector, &hash))
        .expect("the verified bytes before the tampered chunk are kept")
        .len();
    assert_eq!(
        kept,
        1_234_567 / 1024 * 1024,
        "kept up to the tampered chunk"
    );
    std::fs::write(&stored, &bytes).expect("repair");
    let o = fetched(&inspector, &hash, &tmp.path().join("inspector.jpg"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(tmp.path().join("inspector.jpg")).expect("copy"),
        bytes
    );
}

const PREFETCH_SCHEMA: &str = r#"
[collections.jobs.fields]
photos = { rule = "attachments" }
[collections.receipts]
prefetch = true
[collections.receipts.fields]
scans = { rule = "attachments" }
"#;

#[test]
fn the_relay_keeps_every_file_and_prefetch_collections_arrive_unasked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let relay_dir = authority(tmp.path(), PREFETCH_SCHEMA);
    let camera = join(tmp.path(), &relay_dir, "camera", &[]);
    let office = join(tmp.path(), &relay_dir, "office", &[]);
    let (mut relay, addr) = start_relay(&relay_dir);
    let mut cam = start_device(&camera, &addr, &[]);
    cam.wait_for("sync_completed");
    let mut off = start_device(&office, &addr, &[]);
    off.wait_for("sync_completed");

    let attach = |collection: &str, field: &str, name: &str, seed: u8| -> (String, Vec<u8>) {
        let id = cli(&camera, &["put", collection, "{}"])["id"]
            .as_str()
            .expect("id")
            .to_owned();
        let bytes: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8 ^ seed).collect();
        let file = tmp.path().join(name);
        std::fs::write(&file, &bytes).expect("file");
        let o = run(
            &camera,
            &[
                "attach",
                collection,
                &id,
                field,
                file.to_str().expect("path"),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (Hash::of(&bytes).to_string(), bytes)
    };
    let (photo, photo_bytes) = attach("jobs", "photos", "meter.jpg", 1);
    let (scan, _) = attach("receipts", "scans", "receipt.pdf", 2);

    // The relay fetches both as soon as it sees the references, unasked.
    for hash in [&photo, &scan] {
        relay.wait_until(&format!("blob_fetched {hash}"), |v| {
            v["event"] == "blob_fetched" && v["hash"] == hash.as_str()
        });
    }
    assert_eq!(cli(&relay_dir, &["status"])["blobs"]["count"], 2);
    // The office prefetches the receipt's scan (a prefetch collection), not the photo.
    off.wait_until("the scan prefetched", |v| {
        v["event"] == "blob_fetched" && v["hash"] == scan.as_str()
    });
    let status = cli(&office, &["status"]);
    assert_eq!(status["blobs"]["count"], 1, "{status}");
    // (In flight while it moved; /metrics and status follow within half a second.)
    eventually("no transfer in flight any more", || {
        cli(&office, &["status"])["blobs"]["transfers_in_flight"] == 0
    });
    assert!(!off.seen.iter().any(|v| v["hash"] == photo.as_str()));

    // The camera goes offline; the office still gets the photo, from the relay's copy.
    drop(cam);
    let copy = tmp.path().join("office-meter.jpg");
    let o = fetched(&office, &photo, &copy);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&copy).expect("copy"), photo_bytes);
}

/// Starts a relay with a config file, on `listen`; returns it and its address.
fn relay_on(dir: &Path, config: &Path, listen: &str) -> (support::Daemon, String) {
    let mut d = support::Daemon::start(
        dir,
        &[
            "relay",
            "--config",
            config.to_str().expect("path"),
            "--listen",
            listen,
            "--api",
            "127.0.0.1:0",
        ],
    );
    let addr = d.addr();
    d.wait_for("api");
    (d, addr)
}

#[test]
fn a_20_mb_photo_taken_offline_reaches_the_relay_across_a_relay_crash_and_is_released_after_delete()
{
    let tmp = tempfile::tempdir().expect("tmp");
    let relay_dir = authority(tmp.path(), SCHEMA);
    let camera = join(tmp.path(), &relay_dir, "camera", &[]);
    let office = join(tmp.path(), &relay_dir, "office", &[]);
    let outsider = join(
        tmp.path(),
        &relay_dir,
        "outsider",
        &["--partition", "jobs=none"],
    );
    // Files are sent at 4 MB/s, so the transfer is still running when the relay is killed.
    let gc = "[blobs]\ngc_grace_secs = 2\ngc_interval_secs = 1\n";
    let slow = tmp.path().join("camera.toml");
    std::fs::write(&slow, format!("{gc}send_bytes_per_sec = 4000000\n")).expect("config");
    let relay_config = tmp.path().join("relay.toml");
    std::fs::write(&relay_config, gc).expect("config");

    // Offline: no daemon runs on the camera; the photo goes into its own store.
    let bytes: Vec<u8> = (0..20_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let (job, hash) = job_with_photo(&camera, &tmp.path().join("finished-job.jpg"), &bytes);

    // Online: the relay sees the reference and pulls the photo from the camera.
    let (mut relay, addr) = relay_on(&relay_dir, &relay_config, "/ip4/127.0.0.1/tcp/0");
    let listen = addr.split("/p2p/").next().expect("address").to_owned();
    let mut cam = start_device(&camera, &addr, &["--config", slow.to_str().expect("path")]);
    let partial = partial_of(&relay_dir, &hash);
    eventually("the relay holds part of the photo", || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > 4_000_000)
    });
    // The relay is killed mid-transfer and restarted on the same address.
    relay.child.kill().expect("kill -9");
    let _ = relay.child.wait();
    drop(relay);
    let kept = std::fs::metadata(&partial)
        .expect("the partial survives")
        .len();
    assert!(kept > 4_000_000 && kept < 20_000_000, "{kept}");
    let (mut relay, _) = relay_on(&relay_dir, &relay_config, &listen);
    relay.wait_until("the photo fetched after the restart", |v| {
        v["event"] == "blob_fetched" && v["hash"] == hash.as_str()
    });
    let relay_copy = tmp.path().join("relay-copy.jpg");
    let o = fetched(&relay_dir, &hash, &relay_copy);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        Hash::of(&std::fs::read(&relay_copy).expect("copy")).to_string(),
        hash
    );
    // It resumed: the camera sent well under twice the photo (its counter reaches /metrics
    // within half a second).
    eventually("the camera's count of bytes sent is up to date", || {
        metric(&camera, "fieldsync_blob_bytes_sent_total") >= 20_000_000
    });
    let sent = metric(&camera, "fieldsync_blob_bytes_sent_total");
    eprintln!("the relay resumed at byte {kept}; the camera sent {sent} bytes in all for 20000000");
    assert!(
        (20_000_000..30_000_000).contains(&sent),
        "the camera sent {sent} bytes for a 20 MB photo"
    );

    // The office fetches it on demand; the outsider's partitions hide the job.
    let _off = start_device(&office, &addr, &[]);
    eventually("the office has the job", || {
        run(&office, &["get", "jobs", &job]).status.success()
    });
    let copy = tmp.path().join("office-copy.jpg");
    let o = fetched(&office, &hash, &copy);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&copy).expect("copy"), bytes);
    let _out = start_device(&outsider, &addr, &[]);
    eventually("the outsider is connected", || {
        cli(&outsider, &["status"])["peers"]
            .as_object()
            .is_some_and(|p| p.values().any(|v| v["connected"] == true))
    });
    let o = fetched(&outsider, &hash, &tmp.path().join("outsider.jpg"));
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Deleting the job releases the photo after the grace period, on the relay and the
    // camera alike.
    cli(&camera, &["delete", "jobs", &job]);
    relay.wait_until("the relay releases the photo", |v| {
        v["event"] == "blobs_collected"
            && v["hashes"]
                .as_array()
                .is_some_and(|h| h.iter().any(|x| x == hash.as_str()))
    });
    cam.wait_until("the camera releases the photo", |v| {
        v["event"] == "blobs_collected"
            && v["hashes"]
                .as_array()
                .is_some_and(|h| h.iter().any(|x| x == hash.as_str()))
    });
    assert_eq!(cli(&relay_dir, &["status"])["blobs"]["count"], 0);
}

/// The relay asks again for a file as soon as a peer has synced, not after its 30 s retry:
/// a device that went away in the middle of sending a photo is asked for the rest as soon
/// as it is back.
#[test]
fn a_device_that_went_away_mid_transfer_is_asked_for_the_rest_as_soon_as_it_is_back() {
    let tmp = tempfile::tempdir().expect("tmp");
    let relay_dir = authority(tmp.path(), SCHEMA);
    let camera = join(tmp.path(), &relay_dir, "camera", &[]);
    // Slow at first, so the camera can go away while it sends.
    let slow = tmp.path().join("slow.toml");
    std::fs::write(&slow, "[blobs]\nsend_bytes_per_sec = 250000\n").expect("config");
    let (mut relay, addr) = start_relay(&relay_dir);
    let mut cam = start_device(&camera, &addr, &["--config", slow.to_str().expect("path")]);
    cam.wait_for("sync_completed");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    let (_, hash) = job_with_photo(&camera, &tmp.path().join("meter.jpg"), &bytes);
    let partial = partial_of(&relay_dir, &hash);
    eventually("the relay holds part of the photo", || {
        std::fs::metadata(&partial).is_ok_and(|m| m.len() > 0)
    });
    drop(cam);

    // Back (and no longer slow): the relay asks at once, well before its 30 s retry.
    let back = std::time::Instant::now();
    let _cam = start_device(&camera, &addr, &[]);
    relay.wait_until(&format!("blob_fetched {hash}"), |v| {
        v["event"] == "blob_fetched" && v["hash"] == hash.as_str()
    });
    let waited = back.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(15),
        "the relay waited {waited:?} to ask the camera again"
    );
    assert_eq!(cli(&relay_dir, &["status"])["blobs"]["count"], 1);
}
