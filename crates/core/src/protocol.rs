//! The sync protocol's frames and their codec (CBOR, with size limits checked before
//! decoding). Layouts and the conversation are documented in `docs/protocol.md`.

use serde::{Deserialize, Serialize};

use crate::ids::{EntityId, WorkspaceId};
use crate::Error;

/// Protocol version this build speaks (2: admission before information — `hello` carries
/// only the proof, `welcome` the details).
pub const VERSION: u32 = 2;

/// Longest peer name a `Welcome` may carry, in characters (longer ones are cut).
pub const MAX_NAME_CHARS: usize = 64;

/// What kind of node is speaking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Device,
    Relay,
}

/// Limits a node announces and enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest frame accepted, in bytes.
    pub max_frame: u32,
    /// Most entities per page.
    pub page_entities: u32,
    /// Most pages offered and not yet acknowledged.
    pub window: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 16 << 20,
            page_entities: 512,
            window: 4,
        }
    }
}

/// A change hash (32 bytes).
pub type Head = [u8; 32];

/// One entity offered in a page: the sender's heads for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferEntry {
    pub id: EntityId,
    pub heads: Vec<Head>,
}

/// What the receiver needs of one offered entity: everything (`have` empty) or the changes
/// after the heads it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantEntry {
    pub id: EntityId,
    pub have: Vec<Head>,
}

/// One entity's document data: a compact document followed by change chunks (`full`), or
/// change chunks the receiver lacks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub id: EntityId,
    pub collection: String,
    pub full: bool,
    pub chunks: Vec<serde_bytes::ByteBuf>,
}

/// A page of the sender's changes feed: entries with seq in `(from, upto]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PageRange {
    pub from: u64,
    pub upto: u64,
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Frame {
    /// The sender's proof of membership, and nothing else: first frame each way. The node
    /// that dialed (or that talks to the authority) sends it at once; the other only after
    /// it admitted the peer's own `Hello`.
    Hello {
        version: u32,
        /// Proof that the sender is a member (absent for the authority, whose peer id is
        /// its proof).
        #[serde(default)]
        credential: Option<crate::membership::Credential>,
    },
    /// The sender's session details, sent only once it admitted the receiver.
    Welcome {
        workspace: WorkspaceId,
        role: Role,
        limits: Limits,
        /// The sender's feed head: how far there is to catch up.
        feed_seq: u64,
        /// The sender's checkpoint of the receiver's feed: serve from here.
        resume_from: u64,
        /// The name the sender's user gave it at `init` (at most [`MAX_NAME_CHARS`]
        /// characters; shown by `members`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// The session ends; why. `membership` is set when the sender refused the receiver's
    /// membership (revoked, not a member, invite used or expired), so the receiver can say
    /// so; other endings (a protocol error, a wrong workspace) leave it out.
    Goodbye {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        membership: Option<crate::membership::MembershipState>,
    },
    /// Entities of a feed page with their heads.
    Offer {
        page: PageRange,
        entries: Vec<OfferEntry>,
    },
    /// Which offered entities the receiver needs.
    Want {
        page: PageRange,
        wants: Vec<WantEntry>,
    },
    /// The data asked for by a `Want`, in one or more frames. `skipped` lists wanted
    /// entities the sender no longer has to give. A page is complete once every wanted
    /// entity arrived or was skipped, whatever the order of the frames.
    Data {
        page: PageRange,
        payloads: Vec<Payload>,
        skipped: Vec<EntityId>,
    },
    /// The receiver has durably applied the sender's feed up to `upto`.
    Ack { upto: u64 },
}

impl Frame {
    /// Encodes a frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Serialising plain data into a Vec cannot fail.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// Decodes a frame, refusing anything over `max_frame` bytes before parsing.
    pub fn decode(bytes: &[u8], max_frame: u32) -> Result<Self, Error> {
        if bytes.len() > max_frame as usize {
            return Err(Error::Protocol(format!(
                "frame of {} bytes is over the {max_frame}-byte limit",
                bytes.len()
            )));
        }
        ciborium::from_reader(bytes).map_err(|e| Error::Protocol(format!("malformed frame: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_bytes_are_refused() {
        let f = Frame::Data {
            skipped: vec![],
            page: PageRange { from: 1, upto: 9 },
            payloads: vec![Payload {
                id: EntityId(uuid::Uuid::from_u128(3)),
                collection: "t".into(),
                full: true,
                chunks: vec![serde_bytes::ByteBuf::from(vec![1, 2, 3])],
            }],
        };
        let bytes = f.encode();
        assert_eq!(Frame::decode(&bytes, 1 << 20).unwrap(), f);
        assert!(Frame::decode(&bytes, 4)
            .unwrap_err()
            .to_string()
            .contains("limit"));
        assert!(Frame::decode(&bytes[..bytes.len() - 2], 1 << 20).is_err());
        assert!(Frame::decode(b"\xff\x00garbage", 1 << 20).is_err());
    }
}
