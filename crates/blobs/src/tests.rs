use std::io::Read;
use std::time::{Duration, SystemTime};

use super::*;

fn store(config: Config) -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = BlobStore::open(dir.path(), config).expect("open");
    (dir, store)
}

/// Bytes that differ at every position (so a range off by one shows).
fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn write_all(store: &BlobStore, data: &[u8], piece: usize) -> Result<Stored> {
    let mut w = store.writer(None)?;
    for chunk in data.chunks(piece.max(1)) {
        w.write(chunk)?;
    }
    w.finish()
}

#[test]
fn a_blob_is_named_by_its_blake3_hash_and_reads_back() {
    let (_d, s) = store(Config::default());
    let data = bytes(300_000);
    let stored = write_all(&s, &data, 4096).expect("write");
    assert_eq!(
        stored.hash.to_string(),
        blake3::hash(&data).to_hex().as_str()
    );
    assert_eq!((stored.size, stored.existed), (300_000, false));
    let mut back = Vec::new();
    s.open_blob(&stored.hash)
        .expect("open")
        .0
        .read_to_end(&mut back)
        .expect("read");
    assert_eq!(back, data);
    assert!(s.verify(&stored.hash).expect("verify"));
    assert_eq!((s.count(), s.bytes()), (1, 300_000));
}

#[test]
fn the_same_bytes_are_stored_once() {
    let (_d, s) = store(Config::default());
    let data = bytes(10_000);
    let first = write_all(&s, &data, 1000).expect("first");
    let second = write_all(&s, &data, 333).expect("second");
    assert_eq!(first.hash, second.hash);
    assert!(!first.existed && second.existed);
    assert_eq!((s.count(), s.bytes()), (1, 10_000));
    assert_eq!(s.list().expect("list").len(), 1);
    write_all(&s, b"other", 2).expect("other");
    assert_eq!((s.count(), s.bytes()), (2, 10_005));
}

#[test]
fn a_truncated_or_corrupt_write_never_becomes_a_blob() {
    let (d, s) = store(Config::default());
    let data = bytes(50_000);
    let expected = Hash::of(&data);
    // Truncated: the bytes stop short of what the hash promised.
    let mut w = s.writer(None).expect("writer");
    w.write(&data[..40_000]).expect("write");
    match w.finish_expecting(&expected) {
        Err(Error::HashMismatch { expected: e, .. }) => assert_eq!(e, expected),
        other => panic!("truncated write: {other:?}"),
    }
    // Corrupt: one flipped byte.
    let mut bad = data.clone();
    bad[12_345] ^= 1;
    let mut w = s.writer(None).expect("writer");
    w.write(&bad).expect("write");
    assert!(matches!(
        w.finish_expecting(&expected),
        Err(Error::HashMismatch { .. })
    ));
    // Abandoned midway (a dropped upload, a crash of the writer).
    let mut w = s.writer(None).expect("writer");
    w.write(&data[..100]).expect("write");
    drop(w);
    assert!(!s.contains(&expected));
    assert_eq!((s.count(), s.bytes()), (0, 0));
    assert!(s.list().expect("list").is_empty());
    let leftovers = std::fs::read_dir(d.path().join(TMP_DIR))
        .expect("tmp")
        .count();
    assert_eq!(leftovers, 0, "temporary files are removed");
    // The whole, right bytes do become the blob.
    let mut w = s.writer(Some(data.len() as u64)).expect("writer");
    w.write(&data).expect("write");
    assert_eq!(
        w.finish_expecting(&expected).expect("finish").hash,
        expected
    );
    assert_eq!(s.count(), 1);
}

#[test]
fn a_temporary_file_left_by_a_crash_is_cleared_on_open_and_never_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = BlobStore::open(dir.path(), Config::default()).expect("open");
    let stored = write_all(&s, b"kept", 4).expect("write");
    // A writer killed before its rename leaves its partial file.
    let partial = dir.path().join(TMP_DIR).join("999-0.partial");
    std::fs::write(&partial, b"half of someth").expect("partial");
    // And a file under a blob's name that is not a hash is not a blob either.
    std::fs::write(dir.path().join("ab").with_extension("x"), b"junk").expect("junk");
    drop(s);
    let s = BlobStore::open(dir.path(), Config::default()).expect("reopen");
    assert!(!partial.exists());
    let listed: Vec<Hash> = s.list().expect("list").iter().map(|b| b.hash).collect();
    assert_eq!(listed, vec![stored.hash]);
    assert_eq!(
        (s.count(), s.bytes()),
        (1, 4),
        "usage is counted from disk on open"
    );
}

#[test]
fn a_blob_over_the_size_limit_is_refused_and_not_kept() {
    let (_d, s) = store(Config::default().with_max_blob_bytes(1000));
    // Known in advance: refused at once.
    assert!(matches!(
        s.writer(Some(1001)),
        Err(Error::TooLarge { limit: 1000 })
    ));
    // Found while streaming: refused when the limit is crossed.
    let mut w = s.writer(None).expect("writer");
    w.write(&bytes(600)).expect("first piece");
    let err = w.write(&bytes(600)).expect_err("over the limit");
    assert!(matches!(err, Error::TooLarge { limit: 1000 }), "{err:?}");
    assert!(err.to_string().contains("max_blob_bytes"), "{err}");
    assert!(w.finish().is_err(), "a refused writer stores nothing");
    assert_eq!(s.count(), 0);
    // Exactly the limit is fine.
    assert_eq!(
        write_all(&s, &bytes(1000), 100).expect("at the limit").size,
        1000
    );
}

/// A blob's tree (made when it is first served) counts against the quota from the start:
/// a quota of exactly the file and its tree takes it, one byte less does not.
#[test]
fn the_quota_counts_each_blobs_tree_too() {
    let data = bytes(100_000);
    let need = 100_000 + tree_size(100_000);
    assert!(tree_size(100_000) > 6000, "about 6 % of the file");
    let (_d, s) = store(Config::default().with_quota_bytes(need - 1));
    assert!(matches!(
        write_all(&s, &data, 4096),
        Err(Error::QuotaExceeded { .. })
    ));
    assert!(matches!(
        s.writer(Some(100_000)),
        Err(Error::QuotaExceeded { .. })
    ));
    let (_d, s) = store(Config::default().with_quota_bytes(need));
    let stored = write_all(&s, &data, 4096).expect("the file and its tree fit");
    // Serving makes the tree; its size is what was counted.
    let (_, outboard, _) = s.open_with_outboard(&stored.hash).expect("served");
    assert_eq!(outboard.metadata().expect("tree").len(), tree_size(100_000));
    // Reopened, the store counts the same.
    let (dir, s) = (_d, s);
    drop(s);
    let s = BlobStore::open(dir.path(), Config::default().with_quota_bytes(need)).expect("reopen");
    assert!(matches!(
        s.writer(Some(1)),
        Err(Error::QuotaExceeded { .. })
    ));
}

#[test]
fn the_quota_counts_stored_and_in_flight_bytes() {
    let (_d, s) = store(Config::default().with_quota_bytes(10_000));
    write_all(&s, &bytes(6000), 1000).expect("first");
    // A second writer that would go over is refused, with what is used and needed.
    let mut w = s.writer(None).expect("writer");
    w.write(&[1u8; 3000]).expect("fits");
    let err = w.write(&[1u8; 3000]).expect_err("over the quota");
    match &err {
        Error::QuotaExceeded { quota, used, .. } => {
            assert_eq!((*quota, *used), (10_000, 6000 + tree_size(6000)))
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("quota_bytes"), "{err}");
    drop(w);
    // Two writers in flight share the room left.
    let mut a = s.writer(None).expect("a");
    let mut b = s.writer(None).expect("b");
    a.write(&[2u8; 3000]).expect("a fits");
    assert!(matches!(
        b.write(&[3u8; 2000]),
        Err(Error::QuotaExceeded { .. })
    ));
    a.finish().expect("a stored");
    assert_eq!(s.bytes(), 9000);
    // Removing frees room.
    let first = s.list().expect("list")[0].hash;
    assert!(s.remove(&first).expect("remove"));
    assert!(!s.remove(&first).expect("second remove"));
    write_all(&s, &[4u8; 1000], 500).expect("room again");
    // Known in advance: refused before any byte is sent.
    assert!(matches!(
        s.writer(Some(9000)),
        Err(Error::QuotaExceeded { .. })
    ));
}

#[test]
fn ranges_read_exactly_the_bytes_asked_and_bad_ones_are_refused() {
    let (_d, s) = store(Config::default());
    let data = bytes(100_000);
    let hash = write_all(&s, &data, 8192).expect("write").hash;
    for (start, end) in [
        (0, 1),
        (0, 100_000),
        (99_999, 100_000),
        (4095, 70_001),
        (50, 50),
    ] {
        let mut got = Vec::new();
        s.read_range(&hash, start..end)
            .expect("range")
            .read_to_end(&mut got)
            .expect("read");
        assert_eq!(got, data[start as usize..end as usize], "{start}..{end}");
    }
    assert!(matches!(
        s.read_range(&hash, 10..100_001),
        Err(Error::BadRange { size: 100_000, .. })
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 20..10;
    assert!(matches!(
        s.read_range(&hash, backwards),
        Err(Error::BadRange { .. })
    ));
    let missing = Hash::of(b"not here");
    assert!(matches!(
        s.read_range(&missing, 0..1),
        Err(Error::NotFound(h)) if h == missing
    ));
}

#[test]
fn hashes_parse_from_64_hex_characters_only() {
    let h = Hash::of(b"x");
    assert_eq!(h.to_string().parse::<Hash>().expect("round trip"), h);
    assert_eq!(
        h.to_string().to_uppercase().parse::<Hash>().expect("upper"),
        h
    );
    for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65)] {
        assert!(
            matches!(bad.parse::<Hash>(), Err(Error::InvalidHash(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn unreferenced_old_blobs_are_removed_and_kept_or_pinned_ones_stay() {
    let (_d, s) = store(Config::default());
    let kept = write_all(&s, b"referenced", 3).expect("kept").hash;
    let old = write_all(&s, b"nobody uses me", 3).expect("old").hash;
    let pinned = write_all(&s, b"about to be attached", 3)
        .expect("pinned")
        .hash;
    // Partial transfers: one of a file still wanted, one of a file nobody wants any more.
    let wanted_partial = Hash::of(b"still wanted");
    let stale_partial = Hash::of(b"nobody wants this any more");
    for h in [wanted_partial, stale_partial] {
        let mut w = s.resume_writer(&h, 100, 0).expect("partial");
        w.write(b"half").expect("write");
    }
    let cutoff = SystemTime::now() + Duration::from_secs(1);
    // Nothing is older than a cutoff in the past.
    let past = SystemTime::now() - Duration::from_secs(3600);
    assert!(s
        .remove_unreferenced(&|_| false, past)
        .expect("gc")
        .is_empty());
    std::thread::sleep(Duration::from_millis(1100));
    s.pin(&pinned).expect("pin");
    let removed = s
        .remove_unreferenced(&|h| *h == kept || *h == wanted_partial, cutoff)
        .expect("gc");
    assert_eq!(removed, vec![old]);
    assert!(s.contains(&kept) && s.contains(&pinned) && !s.contains(&old));
    assert_eq!(
        s.partial_len(&wanted_partial),
        4,
        "a wanted transfer keeps its bytes"
    );
    assert_eq!(s.partial_len(&stale_partial), 0, "an unwanted one goes");
    assert_eq!(s.count(), 2);
    assert!(matches!(s.pin(&old), Err(Error::NotFound(_))));
}

#[test]
fn the_io_write_trait_streams_through_the_limits() {
    let (_d, s) = store(Config::default().with_max_blob_bytes(10_000));
    let mut w = s.writer(None).expect("writer");
    let n = std::io::copy(&mut &bytes(9000)[..], &mut w).expect("copy");
    assert_eq!(n, 9000);
    assert_eq!(w.finish().expect("finish").size, 9000);
    let mut w = s.writer(None).expect("writer");
    let err = std::io::copy(&mut &bytes(20_000)[..], &mut w).expect_err("too large");
    assert!(err.to_string().contains("max_blob_bytes"), "{err}");
}

#[test]
fn an_interrupted_transfer_resumes_where_it_stopped_even_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = bytes(200_000);
    let hash = Hash::of(&data);
    {
        let s = BlobStore::open(dir.path(), Config::default()).expect("open");
        assert_eq!(s.partial_len(&hash), 0);
        let mut w = s.resume_writer(&hash, 200_000, 0).expect("writer");
        w.write(&data[..70_000]).expect("first part");
        drop(w); // the connection dropped
        assert_eq!(s.partial_len(&hash), 70_000);
        assert!(
            !s.contains(&hash) && s.count() == 0,
            "a partial is not a blob"
        );
    }
    // After a restart of this node, the rest continues from byte 70,000.
    let s = BlobStore::open(dir.path(), Config::default()).expect("reopen");
    assert_eq!(s.partial_len(&hash), 70_000, "partials survive a restart");
    assert!(matches!(
        s.resume_writer(&hash, 200_000, 10),
        Err(Error::BadRange { .. })
    ));
    let mut w = s.resume_writer(&hash, 200_000, 70_000).expect("resume");
    assert_eq!(w.written(), 70_000);
    w.write(&data[70_000..]).expect("rest");
    let stored = w.finish_expecting(&hash).expect("whole and right");
    assert_eq!((stored.hash, stored.size), (hash, 200_000));
    assert_eq!(s.partial_len(&hash), 0);
    assert!(s.verify(&hash).expect("verify"));
    assert_eq!((s.count(), s.bytes()), (1, 200_000));
}

#[test]
fn a_resumed_transfer_with_wrong_bytes_is_thrown_away_partial_and_all() {
    let (_d, s) = store(Config::default());
    let data = bytes(50_000);
    let hash = Hash::of(&data);
    let mut w = s.resume_writer(&hash, 50_000, 0).expect("writer");
    let mut bad = data[..20_000].to_vec();
    bad[5] ^= 1;
    w.write(&bad).expect("tampered part");
    drop(w);
    let mut w = s.resume_writer(&hash, 50_000, 20_000).expect("resume");
    w.write(&data[20_000..]).expect("rest");
    assert!(matches!(
        w.finish_expecting(&hash),
        Err(Error::HashMismatch { .. })
    ));
    assert_eq!(
        s.partial_len(&hash),
        0,
        "the bad partial is not resumed from again"
    );
    assert!(!s.contains(&hash));
    assert_eq!(s.count(), 0);
}

/// What a receiver gets of `[start, len)`: the slice with its tree, then the decoder's
/// verified bytes, or the decoder's error.
fn serve_and_verify(s: &BlobStore, hash: &Hash, start: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let (file, outboard, _) = s.open_with_outboard(hash).expect("served");
    let mut slice = Vec::new();
    bao::encode::SliceExtractor::new_outboard(file, outboard, start, len)
        .read_to_end(&mut slice)
        .expect("slice");
    let root = bao::Hash::from(*hash.as_bytes());
    let mut out = Vec::new();
    bao::decode::SliceDecoder::new(&slice[..], &root, start, len)
        .read_to_end(&mut out)
        .map(|_| out)
}

#[test]
fn a_blob_is_served_with_its_tree_and_every_slice_verifies() {
    let (dir, s) = store(Config::default());
    let data = bytes(300_000);
    let stored = write_all(&s, &data, 4096).expect("write");
    for (start, len) in [
        (0, 300_000),
        (1_000, 5_000),
        (299_999, 1),
        (123_456, 176_544),
    ] {
        let got = serve_and_verify(&s, &stored.hash, start, len).expect("verifies");
        assert_eq!(got, data[start as usize..(start + len) as usize]);
    }
    assert!(
        dir.path()
            .join("outboard")
            .join(stored.hash.to_string())
            .is_file(),
        "the tree is kept"
    );
    // Removed with the blob.
    s.remove(&stored.hash).expect("remove");
    assert!(!dir
        .path()
        .join("outboard")
        .join(stored.hash.to_string())
        .exists());
}

#[test]
fn bytes_changed_after_the_tree_was_made_fail_at_their_chunk_and_a_damaged_file_is_not_served() {
    let (_d, s) = store(Config::default());
    let data = bytes(300_000);
    let stored = write_all(&s, &data, 4096).expect("write");
    s.open_with_outboard(&stored.hash).expect("tree made");
    let mut bad = data.clone();
    bad[200_000] ^= 1;
    std::fs::write(s.path(&stored.hash), &bad).expect("tamper");
    // A slice before the changed chunk still verifies; one across it does not.
    assert!(serve_and_verify(&s, &stored.hash, 0, 150_000).is_ok());
    let e = serve_and_verify(&s, &stored.hash, 0, 300_000).expect_err("caught");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    // Without its tree, the damaged file is found out when the tree is made: never served.
    std::fs::remove_file(_d.path().join("outboard").join(stored.hash.to_string())).expect("rm");
    assert!(matches!(
        s.open_with_outboard(&stored.hash),
        Err(Error::HashMismatch { .. })
    ));
}

/// A file several flush windows long is flushed in the background as it is written, and
/// stored whole (resumed halfway too).
#[test]
fn a_large_file_is_flushed_as_it_is_written_and_stored_whole() {
    let (_d, s) = store(Config::default());
    let data = bytes(3 * FLUSH_EVERY as usize + 12_345);
    let stored = write_all(&s, &data, 64 << 10).expect("stored");
    assert_eq!(stored.hash, Hash::of(&data));
    let mut back = Vec::new();
    s.read_range(&stored.hash, 0..data.len() as u64)
        .expect("read")
        .read_to_end(&mut back)
        .expect("read");
    assert!(back == data, "the stored bytes differ");
    // Resumed from the middle of a window.
    let (_d, s) = store(Config::default());
    let hash = Hash::of(&data);
    let half = FLUSH_EVERY + 7;
    let mut w = s
        .resume_writer(&hash, data.len() as u64, 0)
        .expect("writer");
    w.write(&data[..half as usize]).expect("first half");
    drop(w);
    let mut w = s
        .resume_writer(&hash, data.len() as u64, half)
        .expect("resume");
    for piece in data[half as usize..].chunks(1 << 20) {
        w.write(piece).expect("rest");
    }
    assert_eq!(
        w.finish_expecting(&hash).expect("stored").size,
        data.len() as u64
    );
}
