//! Identifiers are types, never bare strings or integers in a signature.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// Defines a UUID-backed id newtype with `Display`/`FromStr`.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// The 16 raw bytes, big-endian, so byte order equals creation order for UUID v7.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
            /// Rebuilds the id from its 16 raw bytes.
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(bytes))
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }
        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// One entity (= one Automerge document). UUID v7 when fieldsync generates it.
    EntityId
);
uuid_id!(
    /// One workspace (tenant). Every bundle, frame and invite names it.
    WorkspaceId
);
uuid_id!(
    /// A pending proposal to an `authority` field. UUID v7, so ids sort by creation time.
    ProposalId
);

/// A node's identity: the libp2p peer id derived from its ed25519 key.
pub type PeerId = libp2p_identity::PeerId;

/// A position in a node's local changes feed. Strictly increasing per node.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seq({})", self.0)
    }
}

/// A conflict, named by a hash of the entity, the field and the concurrent operations, so
/// every replica holding the same changes gives the same conflict the same id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ConflictId(String);

impl ConflictId {
    pub(crate) fn derive(entity: EntityId, field: &str, op_ids: &[String]) -> Self {
        use sha2::Digest;
        let mut sorted: Vec<&String> = op_ids.iter().collect();
        sorted.sort();
        let mut h = sha2::Sha256::new();
        h.update(entity.as_bytes());
        h.update(field.as_bytes());
        for op in sorted {
            h.update([0u8]);
            h.update(op.as_bytes());
        }
        Self(hex::encode(&h.finalize()[..8]))
    }
    /// The id as text (16 hex digits).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConflictId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for ConflictId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConflictId({})", self.0)
    }
}
impl FromStr for ConflictId {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err("a conflict id is 16 hex digits, as printed by `fieldsync conflicts`")
        }
    }
}

/// An app's operation id: the same id applied again, on any node, has exactly one effect.
/// 1 to 128 printable ASCII characters (an `Idempotency-Key`, a UUID, `payment-42-try`…).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct OpId(String);

impl OpId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The entity an op id creates when the app names no entity: the same op id gives the
    /// same entity on every node, so a retried creation lands on the first one.
    pub fn entity(&self, ws: WorkspaceId) -> EntityId {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"fieldsync/op-entity/v1\0");
        h.update(ws.as_bytes());
        h.update(self.0.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&h.finalize()[..16]);
        // A custom (version 8, RFC 9562) UUID: derived, not random and not time-ordered.
        EntityId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpId({})", self.0)
    }
}
impl FromStr for OpId {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(s.to_owned()))
        } else {
            Err("an operation id is 1 to 128 printable ASCII characters without spaces")
        }
    }
}
