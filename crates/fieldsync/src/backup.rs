//! The authority key survives its disk: `authority export` seals the authority's identity
//! key and workspace (id, first schema) into a passphrase-encrypted file; `init --restore`
//! makes a new authority node from it, which then gets the data back from relays and
//! devices by syncing (everything it signed is in their documents).

use fieldsync_core::workspace::Invite;
use fieldsync_store::Secret;
use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};

use crate::replica::{Replica, META_WORKSPACE};
use crate::Error;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorityBackup {
    version: u32,
    /// The ed25519 keypair (64 bytes), hex.
    key: String,
    /// The workspace as stored at init (id, authority key, first schema), JSON.
    workspace: serde_json::Value,
    name: String,
}

impl Replica {
    /// The authority's key and workspace, encrypted with `secret` (authority only).
    pub fn export_authority(&self, secret: &Secret) -> Result<Vec<u8>, Error> {
        if !self.authority {
            return Err(Error::AuthorityOnly("export the authority key"));
        }
        let ws = self
            .store
            .meta(META_WORKSPACE)?
            .ok_or_else(|| Error::CorruptMeta("workspace is missing".into()))?;
        let workspace =
            serde_json::from_slice(&ws).map_err(|e| Error::CorruptMeta(e.to_string()))?;
        let backup = AuthorityBackup {
            version: 1,
            key: hex::encode(self.key.to_bytes()),
            workspace,
            name: self.name.clone(),
        };
        let plain = serde_json::to_vec(&backup).map_err(|e| Error::CorruptMeta(e.to_string()))?;
        Ok(fieldsync_store::seal_file(&plain, secret)?)
    }

    /// A new authority node in `dir` from a backup made by [`Self::export_authority`]
    /// (opened with `backup_secret`); its own store is encrypted with `store_secret` if
    /// given. It starts empty and fills up when it syncs or imports bundles.
    pub fn init_restore(
        dir: &std::path::Path,
        backup: &[u8],
        backup_secret: &Secret,
        store_secret: Option<&Secret>,
    ) -> Result<Self, Error> {
        let plain = fieldsync_store::open_sealed_file(backup, backup_secret)?;
        let bad = |why: String| {
            Error::Core(fieldsync_core::Error::Invite(format!(
                "the authority backup is not valid: {why}"
            )))
        };
        let b: AuthorityBackup = serde_json::from_slice(&plain).map_err(|e| bad(e.to_string()))?;
        if b.version != 1 {
            return Err(bad(format!("version {} is not known here", b.version)));
        }
        let mut key_bytes = hex::decode(&b.key).map_err(|_| bad("the key is not hex".into()))?;
        let key =
            ed25519::Keypair::try_from_bytes(&mut key_bytes).map_err(|e| bad(e.to_string()))?;
        let ws_bytes = serde_json::to_vec(&b.workspace).map_err(|e| bad(e.to_string()))?;
        let ws = Invite::decode(&ws_bytes)?;
        if ws.authority != key.public() {
            return Err(bad("its key is not the workspace's authority key".into()));
        }
        Self::ensure_free(dir)?;
        let store = Self::new_store(dir, store_secret)?;
        Self::init_on(store, dir, ws, key, &b.name, true)
    }
}
