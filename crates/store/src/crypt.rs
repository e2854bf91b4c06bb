//! Encryption at rest: a [`Kv`] that encrypts every value and every key part that could
//! reveal content, over another [`Kv`] (sled's tree).
//!
//! - **Values** (documents, change chunks, views, index entries, entity records, metadata):
//!   XChaCha20-Poly1305 with a random 24-byte nonce; the stored key is the associated data,
//!   so a value moved to another key does not decrypt.
//! - **Keys**: entity ids (random UUIDs or hashes) and feed seqs stay as they are, so scans
//!   keep their order. Collection names (views), index names and index keys (conflict and
//!   proposal ids) and metadata names (which name peers and invites) are encrypted
//!   deterministically — the nonce is a keyed BLAKE2b hash of the plaintext — so equal
//!   names give equal stored keys and lookups work, and the key can be decrypted back.
//! - **Visible** to someone with the files but not the key: how many entities there are,
//!   their ids (a UUID v7 shows its creation time), how many collections and how many
//!   entities each has (not their names), sizes of values, how many change chunks each
//!   document has, the feed's length and order, how many index and metadata entries there
//!   are; and the header below.
//!
//! The header (key [`HEADER_KEY`], not encrypted) holds what opening needs: how the key is
//! derived (Argon2id from a passphrase with its salt and costs, or a key file), and a check
//! value (a keyed hash of a constant) that tells a wrong key from a corrupt store.

use argon2::{Algorithm, Argon2, Params, Version};
use blake2::digest::consts::U32;
use blake2::digest::Mac;
use blake2::Blake2bMac;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

use crate::{Error, Kv, KvPair, KvWrite};

/// Where the header lives: outside every prefix of the layout.
pub const HEADER_KEY: &[u8] = b"K";
const HEADER_MAGIC: &[u8; 4] = b"FSK1";
const HEADER_LEN: usize = 4 + 1 + 12 + 16 + 32;
const NONCE: usize = 24;
const TAG: usize = 16;
/// Key files shorter than this are refused (they would be guessable).
pub const MIN_KEY_FILE_BYTES: usize = 16;
/// Largest key file read (a key file is a secret, not a document).
pub const MAX_KEY_FILE_BYTES: usize = 4096;

/// How a store's key is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// A passphrase, stretched with Argon2id.
    Passphrase,
    /// The contents of a key file (at least [`MIN_KEY_FILE_BYTES`] of secret).
    KeyFile,
}

impl KeyKind {
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Passphrase => "a passphrase",
            KeyKind::KeyFile => "a key file",
        }
    }
}

/// The secret a store is opened with.
pub enum Secret {
    Passphrase(String),
    KeyFile(Vec<u8>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({})", self.kind().name())
    }
}

impl Secret {
    pub fn kind(&self) -> KeyKind {
        match self {
            Secret::Passphrase(_) => KeyKind::Passphrase,
            Secret::KeyFile(_) => KeyKind::KeyFile,
        }
    }
}

/// Asked for the secret when the store turns out to be encrypted; the `Err` is the
/// sentence shown to the user (what is missing).
pub type KeyProvider<'a> = &'a mut dyn FnMut(KeyKind) -> Result<Secret, String>;

/// The unencrypted header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub kind: KeyKind,
    /// Argon2id memory (KiB), passes and lanes (unused for key files).
    pub m_kib: u32,
    pub t: u32,
    pub p: u32,
    pub salt: [u8; 16],
    pub check: [u8; 32],
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = HEADER_MAGIC.to_vec();
        out.push(match self.kind {
            KeyKind::Passphrase => 1,
            KeyKind::KeyFile => 2,
        });
        out.extend_from_slice(&self.m_kib.to_be_bytes());
        out.extend_from_slice(&self.t.to_be_bytes());
        out.extend_from_slice(&self.p.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.check);
        out
    }

    /// Decodes a stored header; never panics on any input.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let corrupt = |why: &str| Error::Corrupt(format!("encryption header: {why}"));
        if b.len() != HEADER_LEN || &b[..4] != HEADER_MAGIC {
            return Err(corrupt("unknown format"));
        }
        let kind = match b[4] {
            1 => KeyKind::Passphrase,
            2 => KeyKind::KeyFile,
            _ => return Err(corrupt("unknown key kind")),
        };
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let (m_kib, t, p) = (u32_at(5), u32_at(9), u32_at(13));
        // Costs a hostile file could set to exhaust memory or time are refused.
        if kind == KeyKind::Passphrase
            && (!(8..=(4 << 20)).contains(&m_kib)
                || !(1..=64).contains(&t)
                || !(1..=16).contains(&p))
        {
            return Err(corrupt("Argon2id costs out of range"));
        }
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&b[17..33]);
        let mut check = [0u8; 32];
        check.copy_from_slice(&b[33..65]);
        Ok(Header {
            kind,
            m_kib,
            t,
            p,
            salt,
            check,
        })
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // Keys given here are 16 to 64 bytes: always a valid BLAKE2b key length.
    let mut m = <Blake2bMac<U32> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("BLAKE2b takes keys of 1 to 64 bytes"));
    for p in parts {
        Mac::update(&mut m, &(p.len() as u64).to_be_bytes());
        Mac::update(&mut m, p);
    }
    m.finalize().into_bytes().into()
}

const CHECK_TEXT: &[u8] = b"fieldsync/store-key-check/v1";

/// The cipher keys of one store.
pub(crate) struct Keys {
    values: XChaCha20Poly1305,
    names: XChaCha20Poly1305,
    name_nonce: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

/// The 32-byte master key from the secret and the header's salt and costs.
fn master(secret: &Secret, h: &Header) -> Result<[u8; 32], Error> {
    let mut out = [0u8; 32];
    match secret {
        Secret::Passphrase(p) => {
            let params = Params::new(h.m_kib, h.t, h.p, Some(32))
                .map_err(|e| Error::Corrupt(format!("encryption header: {e}")))?;
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password_into(p.as_bytes(), &h.salt, &mut out)
                .map_err(|e| Error::Corrupt(format!("key derivation: {e}")))?;
        }
        Secret::KeyFile(bytes) => {
            let bytes = key_file_secret(bytes)?;
            out = mac(&h.salt, &[b"fieldsync/key-file/v1", bytes]);
        }
    }
    Ok(out)
}

/// The secret part of a key file: its bytes without one trailing line ending (an editor's
/// newline; other bytes, whitespace included, are secret), 16 to 4,096 bytes.
fn key_file_secret(bytes: &[u8]) -> Result<&[u8], Error> {
    let secret = bytes
        .strip_suffix(b"\n")
        .map(|b| b.strip_suffix(b"\r").unwrap_or(b))
        .unwrap_or(bytes);
    if secret.len() < MIN_KEY_FILE_BYTES || secret.len() > MAX_KEY_FILE_BYTES {
        return Err(Error::WrongKey(format!(
            "the key file holds {} bytes of secret; it must hold {MIN_KEY_FILE_BYTES} to {MAX_KEY_FILE_BYTES} (e.g. `head -c 32 /dev/urandom > FILE`)",
            secret.len()
        )));
    }
    Ok(secret)
}

impl Keys {
    fn from_master(m: &[u8; 32]) -> (Self, [u8; 32]) {
        let sub = |label: &[u8]| mac(m, &[b"fieldsync/store/v1", label]);
        let check = mac(&sub(b"check"), &[CHECK_TEXT]);
        let keys = Keys {
            values: XChaCha20Poly1305::new((&sub(b"values")).into()),
            names: XChaCha20Poly1305::new((&sub(b"names")).into()),
            name_nonce: sub(b"name-nonce"),
        };
        (keys, check)
    }

    /// A new header and keys for `secret` (a fresh salt).
    pub(crate) fn create(secret: &Secret) -> Result<(Self, Header), Error> {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let (m_kib, t, p) = (
            Params::DEFAULT_M_COST,
            Params::DEFAULT_T_COST,
            Params::DEFAULT_P_COST,
        );
        let mut h = Header {
            kind: secret.kind(),
            m_kib,
            t,
            p,
            salt,
            check: [0; 32],
        };
        let (keys, check) = Keys::from_master(&master(secret, &h)?);
        h.check = check;
        Ok((keys, h))
    }

    /// The keys for `secret` if it is the one the header was made with.
    pub(crate) fn open(secret: &Secret, h: &Header) -> Result<Self, Error> {
        if secret.kind() != h.kind {
            return Err(Error::WrongKey(format!(
                "this store is encrypted with {}, and {} was given",
                h.kind.name(),
                secret.kind().name()
            )));
        }
        let (keys, check) = Keys::from_master(&master(secret, h)?);
        if check != h.check {
            return Err(Error::WrongKey(format!(
                "{} does not open this store",
                h.kind.name()
            )));
        }
        Ok(keys)
    }

    fn seal(&self, value: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let ct = self
            .values
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: value, aad })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE + ct.len());
        out.extend_from_slice(&nonce);
        out.extend(ct);
        out
    }

    fn open_value(&self, stored: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
        if stored.len() < NONCE + TAG {
            return Err(Error::Corrupt("encrypted value is too short".into()));
        }
        let (nonce, ct) = stored.split_at(NONCE);
        self.values
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| {
                Error::Corrupt(
                    "an encrypted value does not decrypt (tampered, or moved to another key)"
                        .into(),
                )
            })
    }

    /// Deterministic encryption of a key part: equal plaintexts, equal results.
    fn seal_name(&self, name: &[u8]) -> Vec<u8> {
        let n = mac(&self.name_nonce, &[name]);
        let ct = self
            .names
            .encrypt(XNonce::from_slice(&n[..NONCE]), name)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(NONCE + ct.len());
        out.extend_from_slice(&n[..NONCE]);
        out.extend(ct);
        out
    }

    fn open_name(&self, stored: &[u8]) -> Result<Vec<u8>, Error> {
        if stored.len() < NONCE + TAG {
            return Err(Error::Corrupt("encrypted key is too short".into()));
        }
        let (nonce, ct) = stored.split_at(NONCE);
        self.names
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| Error::Corrupt("an encrypted key does not decrypt".into()))
    }
}

/// A new key file's contents: 32 random bytes, as hex text with a newline.
pub fn generate_key_file() -> Vec<u8> {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let mut out: Vec<u8> = key
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    out.push(b'\n');
    out
}

const SEALED_MAGIC: &[u8; 8] = b"FSSEAL\0\x01";
const SEALED_AAD: &[u8] = b"fieldsync/sealed-file/v1";
/// Largest sealed file opened.
pub const MAX_SEALED_BYTES: usize = 1 << 20;

/// Encrypts `plain` into a self-contained file (e.g. an authority backup) under `secret`:
/// magic, the same header as a store's (salt, Argon2id costs, key check), then the AEAD
/// ciphertext.
pub fn seal_file(plain: &[u8], secret: &Secret) -> Result<Vec<u8>, Error> {
    let (keys, header) = Keys::create(secret)?;
    let mut out = SEALED_MAGIC.to_vec();
    out.extend(header.encode());
    out.extend(keys.seal(plain, SEALED_AAD));
    Ok(out)
}

/// Decrypts a file made by [`seal_file`]: a wrong secret is [`Error::WrongKey`].
pub fn open_sealed_file(bytes: &[u8], secret: &Secret) -> Result<Vec<u8>, Error> {
    if bytes.len() > MAX_SEALED_BYTES {
        return Err(Error::Corrupt(format!(
            "a sealed file of {} bytes is over the {MAX_SEALED_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let body = bytes
        .strip_prefix(SEALED_MAGIC.as_slice())
        .ok_or_else(|| Error::Corrupt("not a fieldsync sealed file (bad magic bytes)".into()))?;
    if body.len() < HEADER_LEN {
        return Err(Error::Corrupt("sealed file is cut short".into()));
    }
    let header = Header::decode(&body[..HEADER_LEN])?;
    let keys = Keys::open(secret, &header)?;
    keys.open_value(&body[HEADER_LEN..], SEALED_AAD)
}

/// A [`Kv`] whose values and content-bearing key parts are encrypted; see the module docs.
#[derive(Debug)]
pub struct EncryptedKv<K: Kv> {
    pub(crate) inner: K,
    keys: Keys,
}

/// Reads the header of `kv`, if it has one.
pub(crate) fn header_of(kv: &dyn Kv) -> Result<Option<Header>, Error> {
    kv.get(HEADER_KEY)?.map(|b| Header::decode(&b)).transpose()
}

impl<K: Kv> EncryptedKv<K> {
    /// Encrypts `inner`, which must be empty, with `secret`: writes the header.
    pub fn create(inner: K, secret: &Secret) -> Result<Self, Error> {
        if inner.last_key(b"")?.is_some() {
            return Err(Error::Corrupt(
                "encryption can only be set up on an empty store".into(),
            ));
        }
        let (keys, header) = Keys::create(secret)?;
        inner.apply(vec![(HEADER_KEY.to_vec(), Some(header.encode()))])?;
        inner.flush()?;
        Ok(EncryptedKv { inner, keys })
    }

    /// Opens `inner`, encrypted with `secret`.
    pub fn open(inner: K, header: &Header, secret: &Secret) -> Result<Self, Error> {
        let keys = Keys::open(secret, header)?;
        Ok(EncryptedKv { inner, keys })
    }

    /// The stored form of a layout key.
    fn seal_key(&self, plain: &[u8]) -> Vec<u8> {
        match plain.first() {
            Some(&p @ (b'v' | b'x')) => {
                let Some(zero) = plain[1..].iter().position(|b| *b == 0).map(|i| i + 1) else {
                    // A bare prefix (a scan over every collection): nothing to hide.
                    return plain.to_vec();
                };
                let name = self.keys.seal_name(&plain[1..zero]);
                let rest = &plain[zero + 1..];
                let mut out = Vec::with_capacity(3 + name.len() + rest.len() + NONCE + TAG);
                out.push(p);
                out.extend_from_slice(&(name.len() as u16).to_be_bytes());
                out.extend(name);
                if p == b'x' && !rest.is_empty() {
                    out.extend(self.keys.seal_name(rest));
                } else {
                    out.extend_from_slice(rest);
                }
                out
            }
            Some(b'm') if plain.len() > 1 => {
                let mut out = vec![b'm'];
                out.extend(self.keys.seal_name(&plain[1..]));
                out
            }
            _ => plain.to_vec(),
        }
    }

    /// The layout key back from its stored form.
    fn open_key(&self, stored: &[u8]) -> Result<Vec<u8>, Error> {
        match stored.first() {
            Some(&p @ (b'v' | b'x')) if stored.len() > 1 => {
                if stored.len() < 3 {
                    return Err(Error::Corrupt("encrypted key is too short".into()));
                }
                let len = u16::from_be_bytes([stored[1], stored[2]]) as usize;
                let end = 3 + len;
                if stored.len() < end {
                    return Err(Error::Corrupt("encrypted key is cut short".into()));
                }
                let mut out = vec![p];
                out.extend(self.keys.open_name(&stored[3..end])?);
                out.push(0);
                let rest = &stored[end..];
                if p == b'x' && !rest.is_empty() {
                    out.extend(self.keys.open_name(rest)?);
                } else {
                    out.extend_from_slice(rest);
                }
                Ok(out)
            }
            Some(b'm') if stored.len() > 1 => {
                let mut out = vec![b'm'];
                out.extend(self.keys.open_name(&stored[1..])?);
                Ok(out)
            }
            _ => Ok(stored.to_vec()),
        }
    }
}

impl<K: Kv> Kv for EncryptedKv<K> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let stored = self.seal_key(key);
        self.inner
            .get(&stored)?
            .map(|v| self.keys.open_value(&v, &stored))
            .transpose()
    }

    fn scan(
        &self,
        start: &[u8],
        limit: usize,
        keep: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<KvPair>, Error> {
        // Deterministic encryption keeps a group (one collection's views, one index, the
        // metadata) together but not in plaintext order, except for the ids after a
        // collection name. Index and metadata scans read their whole group, decrypt it
        // and order it as the plaintext store would.
        let sorted_group = match start.first() {
            Some(b'm') => Some(b"m".to_vec()),
            Some(b'x') if start[1..].contains(&0) => {
                let zero = start[1..]
                    .iter()
                    .position(|b| *b == 0)
                    .map(|i| i + 1)
                    .unwrap_or(start.len());
                Some(self.seal_key(&start[..=zero]))
            }
            _ => None,
        };
        if let Some(group) = sorted_group {
            let mut all = Vec::new();
            for (k, v) in self.inner.scan(&group, usize::MAX, &mut |k| {
                k.starts_with(&group) && k != HEADER_KEY
            })? {
                let plain = self.open_key(&k)?;
                if plain.as_slice() >= start {
                    all.push((plain, k, v));
                }
            }
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out = Vec::new();
            for (plain, k, v) in all {
                if out.len() >= limit || !keep(&plain) {
                    break;
                }
                out.push((plain, self.keys.open_value(&v, &k)?));
            }
            return Ok(out);
        }
        let mut failed = None;
        // Keys of one collection share their encrypted prefix: decrypt it once.
        let mut last: Option<(Vec<u8>, Vec<u8>)> = None;
        let mut plain_keys = Vec::new();
        let found = self.inner.scan(&self.seal_key(start), limit, &mut |k| {
            let plain = match (&last, k.first()) {
                (Some((sp, pp)), Some(b'v')) if k.len() >= sp.len() && k.starts_with(sp) => {
                    let mut p = pp.clone();
                    p.extend_from_slice(&k[sp.len()..]);
                    Ok(p)
                }
                _ => self.open_key(k),
            };
            match plain {
                Ok(p) => {
                    if k.first() == Some(&b'v') && k.len() >= 3 {
                        let end = (3 + u16::from_be_bytes([k[1], k[2]]) as usize).min(k.len());
                        let name_end = p
                            .iter()
                            .skip(1)
                            .position(|b| *b == 0)
                            .map(|i| i + 2)
                            .unwrap_or(p.len());
                        last = Some((k[..end].to_vec(), p[..name_end].to_vec()));
                    }
                    let keep_it = keep(&p);
                    if keep_it {
                        plain_keys.push(p);
                    }
                    keep_it
                }
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        found
            .into_iter()
            .zip(plain_keys)
            .map(|((k, v), plain)| Ok((plain, self.keys.open_value(&v, &k)?)))
            .collect()
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        // Only the feed (keys in clear) is asked for its last key.
        self.inner
            .last_key(&self.seal_key(prefix))?
            .map(|k| self.open_key(&k))
            .transpose()
    }

    fn apply(&self, batch: Vec<KvWrite>) -> Result<(), Error> {
        let sealed = batch
            .into_iter()
            .map(|(k, v)| {
                let stored = self.seal_key(&k);
                let v = v.map(|v| self.keys.seal(&v, &stored));
                (stored, v)
            })
            .collect();
        self.inner.apply(sealed)
    }

    fn flush(&self) -> Result<(), Error> {
        self.inner.flush()
    }

    fn encrypted(&self) -> bool {
        true
    }

    fn rewrite(&self, drop_key: &[u8]) -> Result<(), Error> {
        self.inner.rewrite(&self.seal_key(drop_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemKv;

    fn kv() -> EncryptedKv<MemKv> {
        EncryptedKv::create(MemKv::default(), &Secret::KeyFile(vec![7; 32])).unwrap()
    }

    #[test]
    fn keys_round_trip_and_scans_keep_plaintext_semantics() {
        let e = kv();
        let id = |n: u8| [n; 16];
        let mut writes = vec![];
        for (coll, n) in [("tasks", 3u8), ("tasks", 1), ("payments", 2)] {
            let mut k = b"v".to_vec();
            k.extend_from_slice(coll.as_bytes());
            k.push(0);
            k.extend_from_slice(&id(n));
            writes.push((k, Some(vec![n])));
        }
        writes.push((b"xconflict\0zz".to_vec(), Some(b"1".to_vec())));
        writes.push((b"xconflict\0aa".to_vec(), Some(b"2".to_vec())));
        writes.push((b"mckin/p2".to_vec(), Some(b"a".to_vec())));
        writes.push((b"mckin/p1".to_vec(), Some(b"b".to_vec())));
        writes.push((b"mseen/p1".to_vec(), Some(b"c".to_vec())));
        e.apply(writes).unwrap();
        // Nothing readable underneath.
        let raw = e.inner.scan(b"", usize::MAX, &mut |_| true).unwrap();
        for (k, v) in &raw {
            for needle in [&b"tasks"[..], b"conflict", b"ckin", b"zz"] {
                assert!(
                    !k.windows(needle.len()).any(|w| w == needle),
                    "key {k:?} shows {needle:?}"
                );
                assert!(!v.windows(needle.len()).any(|w| w == needle));
            }
        }
        let prefix = b"vtasks\0".to_vec();
        let views = e
            .scan(&prefix, 10, &mut |k| k.starts_with(&prefix))
            .unwrap();
        assert_eq!(
            views.iter().map(|(_, v)| v[0]).collect::<Vec<_>>(),
            vec![1, 3],
            "ids in order"
        );
        let mut after = prefix.clone();
        after.extend_from_slice(&id(1));
        after.push(0);
        assert_eq!(
            e.scan(&after, 10, &mut |k| k.starts_with(&prefix))
                .unwrap()
                .len(),
            1
        );
        let idx = e
            .scan(b"xconflict\0", usize::MAX, &mut |k| {
                k.starts_with(b"xconflict\0")
            })
            .unwrap();
        assert_eq!(
            idx.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            vec![b"xconflict\0aa".to_vec(), b"xconflict\0zz".to_vec()]
        );
        let ck = e
            .scan(b"mckin/", usize::MAX, &mut |k| k.starts_with(b"mckin/"))
            .unwrap();
        assert_eq!(
            ck,
            vec![
                (b"mckin/p1".to_vec(), b"b".to_vec()),
                (b"mckin/p2".to_vec(), b"a".to_vec())
            ]
        );
        assert_eq!(e.get(b"mseen/p1").unwrap(), Some(b"c".to_vec()));
        assert_eq!(e.get(b"xconflict\0aa").unwrap(), Some(b"2".to_vec()));
        let all_views = e
            .scan(b"v", usize::MAX, &mut |k| k.first() == Some(&b'v'))
            .unwrap();
        assert_eq!(all_views.len(), 3);
        assert!(all_views
            .iter()
            .all(|(k, _)| k.starts_with(b"vtasks\0") || k.starts_with(b"vpayments\0")));
    }

    #[test]
    fn a_wrong_or_missing_key_is_named_and_a_moved_value_does_not_decrypt() {
        let e = kv();
        e.apply(vec![
            (b"mone".to_vec(), Some(b"1".to_vec())),
            (b"mtwo".to_vec(), Some(b"2".to_vec())),
        ])
        .unwrap();
        let header = header_of(&e.inner).unwrap().unwrap();
        let inner = e.inner.clone();
        let wrong =
            EncryptedKv::open(inner.clone(), &header, &Secret::KeyFile(vec![8; 32])).unwrap_err();
        assert!(wrong.to_string().contains("does not open"), "{wrong}");
        let kind =
            EncryptedKv::open(inner.clone(), &header, &Secret::Passphrase("x".into())).unwrap_err();
        assert!(
            kind.to_string().contains("encrypted with a key file"),
            "{kind}"
        );
        let short = EncryptedKv::open(
            inner.clone(),
            &header,
            &Secret::KeyFile(b"short\n".to_vec()),
        )
        .unwrap_err();
        assert!(short.to_string().contains("bytes of secret"), "{short}");
        let right = EncryptedKv::open(
            inner.clone(),
            &header,
            &Secret::KeyFile([vec![7; 32], b"\n".to_vec()].concat()),
        )
        .unwrap();
        assert_eq!(right.get(b"mone").unwrap(), Some(b"1".to_vec()));
        // Swap the two stored values: each fails its key's check instead of reading as the other.
        let raw = inner
            .scan(b"m", usize::MAX, &mut |k| k.first() == Some(&b'm'))
            .unwrap();
        inner
            .apply(vec![
                (raw[0].0.clone(), Some(raw[1].1.clone())),
                (raw[1].0.clone(), Some(raw[0].1.clone())),
            ])
            .unwrap();
        assert!(right.get(b"mone").is_err());
    }

    #[test]
    fn sealed_files_open_only_with_their_passphrase_and_refuse_any_change() {
        let pass = Secret::Passphrase("backup pass".into());
        let sealed = seal_file(b"the authority key", &pass).unwrap();
        assert_eq!(
            open_sealed_file(&sealed, &pass).unwrap(),
            b"the authority key"
        );
        assert!(matches!(
            open_sealed_file(&sealed, &Secret::Passphrase("backup pasS".into())),
            Err(Error::WrongKey(_))
        ));
        for at in [0, 9, 20, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(open_sealed_file(&bad, &pass).is_err(), "flip at {at}");
        }
        for cut in [0, 8, 40, sealed.len() - 1] {
            assert!(
                open_sealed_file(&sealed[..cut], &pass).is_err(),
                "cut at {cut}"
            );
        }
        assert_eq!(generate_key_file().len(), 65);
    }

    #[test]
    fn passphrases_go_through_argon2id() {
        let pass = Secret::Passphrase("correct horse".into());
        let (_, h) = Keys::create(&pass).unwrap();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        assert!(Keys::open(&pass, &h).is_ok());
        assert!(Keys::open(&Secret::Passphrase("correct horsf".into()), &h).is_err());
        let mut hostile = h.clone();
        hostile.m_kib = u32::MAX;
        assert!(
            Header::decode(&hostile.encode()).is_err(),
            "costs from the file are bounded"
        );
    }
}
