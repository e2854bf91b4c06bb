use std::path::PathBuf;

/// What a caller should do about an error; the CLI maps it to its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad input or usage: fix the request (exit 2).
    Invalid,
    /// The thing asked for does not exist (exit 3).
    NotFound,
    /// Something failed at run time (exit 1).
    Runtime,
}

/// Errors of a replica.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A rule, patch, schema, bundle or invite problem from the core.
    #[error(transparent)]
    Core(#[from] fieldsync_core::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] fieldsync_store::Error),
    /// No node was initialised in this data directory.
    #[error("no fieldsync node in {0}; run `fieldsync init --schema FILE` or `fieldsync init --join INVITE` first")]
    NotInitialized(PathBuf),
    /// `init` on a directory that already holds a node.
    #[error("{0} already holds a fieldsync node; use another --data directory")]
    AlreadyInitialized(PathBuf),
    /// No entity with this id in this collection.
    #[error("no entity {id} in collection {collection:?}")]
    EntityNotFound {
        collection: String,
        id: fieldsync_core::EntityId,
    },
    /// The entity exists in another collection.
    #[error("entity {id} belongs to collection {actual:?}, not {asked:?}")]
    WrongCollection {
        id: fieldsync_core::EntityId,
        actual: String,
        asked: String,
    },
    /// A bundle written for another workspace.
    #[error("the bundle is from workspace {theirs}, this node is in workspace {ours}; nothing was imported")]
    ForeignWorkspace { theirs: String, ours: String },
    /// A line of a bulk-import file is not valid.
    #[error("line {line}: {message}; nothing was imported")]
    ImportLine { line: usize, message: String },
    /// A schema version the change table does not allow.
    #[error("schema change refused: {0}. Nothing was published; see README \"Schema reference\" for what may change")]
    SchemaRefused(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Refused by the workspace's membership rules (not a member, revoked, outside the
    /// member's partitions).
    #[error("refused: {0}")]
    Refused(String),
    /// Only the workspace authority may do this (revoke members…); names what was asked.
    #[error("only the workspace authority can {0}; this node is not the authority")]
    AuthorityOnly(&'static str),
    /// The blob store failed or refused (size limit, quota, corrupt bytes…).
    #[error(transparent)]
    Blob(#[from] fieldsync_blobs::Error),
    /// A local write references a file this node does not hold.
    #[error("attachment {hash} is not in this node's blob store: store the file first (`fieldsync attach`, or POST /v1/blobs), then reference it")]
    BlobMissing { hash: String },
    /// A reference's size is not its blob's.
    #[error("attachment {hash} has {actual} bytes here, but the reference says {claimed}")]
    BlobSizeMismatch {
        hash: String,
        claimed: u64,
        actual: u64,
    },
    /// Attachments on an encrypted store (not built yet).
    #[error("attachments are not available on an encrypted store yet: blob files would be kept unencrypted beside it")]
    BlobsEncrypted,
    /// Attaching to a field that is not an `attachments` field.
    #[error("field {field:?} of {collection:?} has rule {rule}, not attachments; declare it as {{ rule = \"attachments\" }} in the schema")]
    NotAttachments {
        collection: String,
        field: String,
        rule: &'static str,
    },
    /// Stored node metadata could not be read.
    #[error("stored node metadata is corrupt: {0}")]
    CorruptMeta(String),
    /// A storage task of the sync engine failed (the store, not the received data).
    #[error("storage failed during sync: {0}")]
    SyncStorage(String),
}

impl Error {
    /// What the caller should do about it.
    pub fn kind(&self) -> ErrorKind {
        use fieldsync_core::Error as C;
        match self {
            Error::Core(C::NotFound(_) | C::Deleted(_)) | Error::EntityNotFound { .. } => {
                ErrorKind::NotFound
            }
            Error::Store(
                fieldsync_store::Error::KeyNeeded(_) | fieldsync_store::Error::WrongKey(_),
            ) => ErrorKind::Invalid,
            Error::Blob(fieldsync_blobs::Error::NotFound(_)) => ErrorKind::NotFound,
            Error::Blob(fieldsync_blobs::Error::Io { .. }) => ErrorKind::Runtime,
            Error::Blob(_)
            | Error::BlobMissing { .. }
            | Error::BlobSizeMismatch { .. }
            | Error::BlobsEncrypted
            | Error::NotAttachments { .. } => ErrorKind::Invalid,
            Error::Core(C::Document(_))
            | Error::Store(_)
            | Error::File { .. }
            | Error::CorruptMeta(_)
            | Error::SyncStorage(_) => ErrorKind::Runtime,
            Error::Core(_)
            | Error::NotInitialized(_)
            | Error::AlreadyInitialized(_)
            | Error::WrongCollection { .. }
            | Error::ForeignWorkspace { .. }
            | Error::ImportLine { .. }
            | Error::Refused(_)
            | Error::SchemaRefused(_)
            | Error::AuthorityOnly(_) => ErrorKind::Invalid,
        }
    }

    pub(crate) fn file(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::File {
            path: path.to_owned(),
            source,
        }
    }
}
