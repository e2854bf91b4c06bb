//! Fuzz targets for the store's decoders of bytes an attacker may have written: the
//! encryption header (read before any key is known) and sealed files (authority backups).
//! Random bytes and mutations of valid encodings must give `Ok` or `Err`, never a panic,
//! and never an accepted change to a sealed file. `FIELDSYNC_FUZZ_CASES` sets the cases.

use fieldsync_store::{open_sealed_file, seal_file, KeyHeader, Secret};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FIELDSYNC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn secret() -> Secret {
    Secret::KeyFile(vec![9; 32])
}

fn mutated(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let v2 = valid.clone();
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8).prop_map(
            move |flips| {
                let mut v = valid.clone();
                for (at, b) in flips {
                    let j = at.index(v.len());
                    v[j] ^= b | 1;
                }
                v
            }
        ),
        any::<prop::sample::Index>().prop_map(move |cut| v2[..cut.index(v2.len())].to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn headers(bytes in mutated(b"FSK1\x02\0\0\0\0\0\0\0\0\0\0\0\0aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb".to_vec())) {
        if let Ok(h) = KeyHeader::decode(&bytes) {
            prop_assert_eq!(KeyHeader::decode(&h.encode()).ok(), Some(h));
        }
    }

    #[test]
    fn sealed_files(bytes in mutated(seal_file(b"backup", &secret()).unwrap())) {
        // Any change to a valid file is refused; only the file itself opens.
        if let Ok(plain) = open_sealed_file(&bytes, &secret()) {
            prop_assert_eq!(plain, b"backup".to_vec());
        }
    }
}
