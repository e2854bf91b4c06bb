//! Bundles: files that carry entity documents between nodes with no network.
//!
//! Layout: the 8-byte magic `FSBNDL\0\x02`, then frames of (u32 big-endian length, CBOR):
//! one [`BundleHeader`], one [`BundleEntity`] per entity, and one trailer with the entity
//! count, the SHA-256 over the header and every entity frame, and the exporting node's
//! ed25519 signature over that hash and count. The signer is the peer the header names
//! (`from`; an ed25519 peer id holds its public key), so a bundle relabelled as another
//! peer's, or changed in any byte, is refused. Decoding checks the magic, every length
//! against [`Limits`], the trailer and the signature before returning anything, so a bad
//! file is refused whole. Format 1 (unsigned, before signatures) is refused with a message
//! saying to export it again.

use std::collections::BTreeMap;

use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{EntityId, PeerId, WorkspaceId};
use crate::Error;

/// The first bytes of every bundle (format version 2: signed).
pub const MAGIC: &[u8; 8] = b"FSBNDL\0\x02";
/// Format version 1: unsigned bundles of earlier versions, refused.
const MAGIC_V1: &[u8; 8] = b"FSBNDL\0\x01";

/// Size limits a decoder enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest accepted bundle, in bytes.
    pub max_bundle_bytes: usize,
    /// Largest accepted frame (header, entity document, trailer).
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bundle_bytes: 4 << 30,
            max_frame_bytes: 64 << 20,
        }
    }
}

/// Who wrote a bundle and which part of its changes feed it covers.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BundleHeader {
    pub workspace: WorkspaceId,
    /// The exporting peer.
    pub from: String,
    /// The bundle holds every entity of the exporter's feed with seq in `(since, upto]`.
    pub since: u64,
    pub upto: u64,
    /// The exporter's checkpoints: for each peer, the feed seq of that peer it has fully
    /// applied. A receiver learns from this what it no longer needs to send.
    pub acks: BTreeMap<String, u64>,
    /// What the exporter presents as a member (as in a sync `Hello`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<crate::membership::Credential>,
}

/// One entity's whole document.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BundleEntity {
    pub id: EntityId,
    pub collection: String,
    #[serde(with = "serde_bytes")]
    pub doc: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct BundleTrailer {
    count: u64,
    #[serde(with = "serde_bytes")]
    sha256: Vec<u8>,
    /// ed25519 signature by the `from` peer over [`signed_bytes`].
    #[serde(with = "serde_bytes")]
    sig: Vec<u8>,
}

fn signed_bytes(sha256: &[u8], count: u64) -> Vec<u8> {
    let mut msg = b"fieldsync/bundle/v2\0".to_vec();
    msg.extend_from_slice(sha256);
    msg.extend_from_slice(&count.to_be_bytes());
    msg
}

/// The ed25519 key of a peer, read from its peer id (which embeds it).
pub fn peer_key(peer: &PeerId) -> Option<ed25519::PublicKey> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    libp2p_identity::PublicKey::try_decode_protobuf(mh.digest())
        .ok()?
        .try_into_ed25519()
        .ok()
}

/// A decoded bundle.
#[derive(Clone, Debug, PartialEq)]
pub struct Bundle {
    pub header: BundleHeader,
    pub entities: Vec<BundleEntity>,
}

/// Writes a bundle frame by frame into a byte buffer.
#[derive(Debug)]
pub struct BundleEncoder {
    out: Vec<u8>,
    hash: Sha256,
    count: u64,
}

fn push_frame<T: Serialize>(out: &mut Vec<u8>, item: &T) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    // Serialising plain data into a Vec cannot fail.
    let _ = ciborium::into_writer(item, &mut *out);
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    start
}

impl BundleEncoder {
    pub fn new(header: &BundleHeader) -> Self {
        let mut out = MAGIC.to_vec();
        let start = push_frame(&mut out, header);
        let mut hash = Sha256::new();
        hash.update(&out[start..]);
        BundleEncoder {
            out,
            hash,
            count: 0,
        }
    }

    pub fn push(&mut self, entity: &BundleEntity) {
        let start = push_frame(&mut self.out, entity);
        self.hash.update(&self.out[start..]);
        self.count += 1;
    }

    /// Bytes written so far that the caller may flush out (everything but the trailer).
    pub fn take_written(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The remaining bytes, trailer included, signed with `key` (the key of the peer the
    /// header names as `from`).
    pub fn finish(mut self, key: &ed25519::Keypair) -> Vec<u8> {
        let sha256 = self.hash.finalize().to_vec();
        let sig = key.sign(&signed_bytes(&sha256, self.count));
        let trailer = BundleTrailer {
            count: self.count,
            sha256,
            sig,
        };
        push_frame(&mut self.out, &trailer);
        self.out
    }
}

struct Frames<'a> {
    rest: &'a [u8],
    limits: Limits,
}

impl<'a> Frames<'a> {
    fn next(&mut self, what: &str) -> Result<&'a [u8], Error> {
        if self.rest.len() < 4 {
            return Err(Error::Bundle(format!(
                "truncated: the file ends before the {what}"
            )));
        }
        let len =
            u32::from_be_bytes([self.rest[0], self.rest[1], self.rest[2], self.rest[3]]) as usize;
        if len > self.limits.max_frame_bytes {
            return Err(Error::Bundle(format!(
                "{what} of {len} bytes is over the {}-byte frame limit",
                self.limits.max_frame_bytes
            )));
        }
        if self.rest.len() < 4 + len {
            return Err(Error::Bundle(format!("truncated: the {what} is cut short")));
        }
        let frame = &self.rest[..4 + len];
        self.rest = &self.rest[4 + len..];
        Ok(frame)
    }
}

fn decode_frame<T: for<'de> Deserialize<'de>>(frame: &[u8], what: &str) -> Result<T, Error> {
    ciborium::from_reader(&frame[4..])
        .map_err(|e| Error::Bundle(format!("{what} is not valid: {e}")))
}

impl Bundle {
    /// Decodes and checks a whole bundle.
    pub fn decode(bytes: &[u8], limits: Limits) -> Result<Self, Error> {
        if bytes.len() > limits.max_bundle_bytes {
            return Err(Error::Bundle(format!(
                "{} bytes is over the {}-byte bundle limit",
                bytes.len(),
                limits.max_bundle_bytes
            )));
        }
        if bytes.starts_with(MAGIC_V1) {
            return Err(Error::Bundle(
                "this bundle is in format 1, unsigned, written by an older fieldsync; bundles are now signed by the node that exports them: export it again with this version".into(),
            ));
        }
        let body = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| Error::Bundle("not a fieldsync bundle (bad magic bytes)".into()))?;
        let mut frames = Frames { rest: body, limits };
        let header_frame = frames.next("header")?;
        let header: BundleHeader = decode_frame(header_frame, "header")?;
        let mut entities = Vec::new();
        let mut hash = Sha256::new();
        hash.update(header_frame);
        loop {
            let frame = frames.next("trailer")?;
            if frames.rest.is_empty() {
                let trailer: BundleTrailer = decode_frame(frame, "trailer")?;
                let sha256 = hash.finalize();
                if trailer.count != entities.len() as u64 || trailer.sha256 != sha256.as_slice() {
                    return Err(Error::Bundle(
                        "corrupt: entity count or checksum does not match the trailer".into(),
                    ));
                }
                let key = header
                    .from
                    .parse::<PeerId>()
                    .ok()
                    .and_then(|p| peer_key(&p))
                    .ok_or_else(|| Error::Bundle(format!("its sender {:?} is not an ed25519 peer id, so its signature cannot be checked", header.from)))?;
                if !key.verify(&signed_bytes(&sha256, trailer.count), &trailer.sig) {
                    return Err(Error::Bundle(format!(
                        "the signature is not by {}, the peer it names as its sender: the file was changed or relabelled after export",
                        header.from
                    )));
                }
                return Ok(Bundle { header, entities });
            }
            hash.update(frame);
            entities.push(decode_frame(frame, "entity")?);
        }
    }

    /// Encodes a whole bundle, signed with `key` (that of the `from` peer).
    pub fn encode(&self, key: &ed25519::Keypair) -> Vec<u8> {
        let mut enc = BundleEncoder::new(&self.header);
        for e in &self.entities {
            enc.push(e);
        }
        let mut out = enc.take_written();
        out.extend(enc.finish(key));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ed25519::Keypair {
        ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([5u8; 32]).unwrap())
    }

    fn peer_of(k: &ed25519::Keypair) -> String {
        libp2p_identity::PublicKey::from(k.public())
            .to_peer_id()
            .to_string()
    }

    fn sample() -> Bundle {
        Bundle {
            header: BundleHeader {
                workspace: WorkspaceId(uuid::Uuid::from_u128(7)),
                from: peer_of(&key()),
                since: 0,
                upto: 2,
                acks: BTreeMap::from([("other".into(), 5)]),
                credential: None,
            },
            entities: vec![
                BundleEntity {
                    id: EntityId(uuid::Uuid::from_u128(1)),
                    collection: "tasks".into(),
                    doc: vec![1, 2, 3],
                },
                BundleEntity {
                    id: EntityId(uuid::Uuid::from_u128(2)),
                    collection: "tasks".into(),
                    doc: vec![4; 100],
                },
            ],
        }
    }

    #[test]
    fn round_trips() {
        let b = sample();
        assert_eq!(
            Bundle::decode(&b.encode(&key()), Limits::default()).unwrap(),
            b
        );
    }

    #[test]
    fn refuses_relabelled_resigned_and_unsigned_files() {
        let other = ed25519::Keypair::generate();
        // Relabelled: the header names another peer, the signature is still the exporter's.
        let mut relabelled = sample();
        relabelled.header.from = peer_of(&other);
        let err = Bundle::decode(&relabelled.encode(&key()), Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not by") && err.contains("relabelled"),
            "{err}"
        );
        // Signed by a key that is not the named sender's.
        let err = Bundle::decode(&sample().encode(&other), Limits::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not by"), "{err}");
        // A changed header (the acks) breaks the hash even with the signature left alone.
        let mut bytes = sample().encode(&key());
        let at = bytes.windows(5).position(|w| w == b"other").unwrap();
        bytes[at] = b'O';
        assert!(Bundle::decode(&bytes, Limits::default())
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        // Not a peer id: cannot be checked.
        let mut nameless = sample();
        nameless.header.from = "peer".into();
        assert!(Bundle::decode(&nameless.encode(&key()), Limits::default())
            .unwrap_err()
            .to_string()
            .contains("not an ed25519 peer id"));
        // Format 1 is refused with what to do.
        let mut v1 = sample().encode(&key());
        v1[7] = 1;
        assert!(Bundle::decode(&v1, Limits::default())
            .unwrap_err()
            .to_string()
            .contains("export it again"));
    }

    #[test]
    fn refuses_truncated_corrupt_and_oversized_files() {
        let bytes = sample().encode(&key());
        for cut in [0, 5, 8, 12, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                Bundle::decode(&bytes[..cut], Limits::default()).is_err(),
                "cut at {cut}"
            );
        }
        let mut flipped = bytes.clone();
        let at = bytes.len() - 60;
        flipped[at] ^= 0xff;
        assert!(Bundle::decode(&flipped, Limits::default()).is_err());
        let small = Limits {
            max_bundle_bytes: 1 << 20,
            max_frame_bytes: 50,
        };
        assert!(Bundle::decode(&bytes, small)
            .unwrap_err()
            .to_string()
            .contains("frame limit"));
        let tiny = Limits {
            max_bundle_bytes: 10,
            max_frame_bytes: 1 << 20,
        };
        assert!(Bundle::decode(&bytes, tiny)
            .unwrap_err()
            .to_string()
            .contains("bundle limit"));
    }
}
