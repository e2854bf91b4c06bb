//! The workspace a node belongs to: its id, schema and authority key; and the invite that
//! carries them to a joining device.

use libp2p_identity::ed25519;
use serde::{Deserialize, Serialize};

use crate::ids::{PeerId, WorkspaceId};
use crate::schema::Schema;
use crate::Error;

/// Everything a node needs to read and check a workspace's documents.
#[derive(Clone, Debug)]
pub struct Workspace {
    pub id: WorkspaceId,
    pub schema: Schema,
    /// The authority's public key: only values signed with it show as confirmed.
    pub authority: ed25519::PublicKey,
}

impl Workspace {
    /// The authority's peer id.
    pub fn authority_peer(&self) -> PeerId {
        libp2p_identity::PublicKey::from(self.authority.clone()).to_peer_id()
    }
}

/// The JSON an authority hands to a device so it can join (`fieldsync invite`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invite {
    /// `"fieldsync-invite/2"` (`/1`, without a token: a workspace copy an older node kept).
    pub format: String,
    pub workspace: WorkspaceId,
    /// The schema's TOML text.
    pub schema: String,
    /// The schema's version (absent: 1). The signed record of a later version travels in
    /// `_schemas`; this number only labels the text until that record arrives.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub schema_version: u64,
    /// The authority's ed25519 public key, hex.
    pub authority_public_key: String,
    pub authority_peer_id: String,
    /// The membership this invite grants (one device, until it expires). Absent in the
    /// copy a node keeps of its own workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<crate::membership::InviteToken>,
    /// The secret half of the token's one-time key, hex (32 bytes). It never leaves the
    /// device that joins: its `Hello` carries a proof made with it, not the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,
}

/// An invite token and the one-time key that proves who holds it.
pub struct HeldInvite {
    pub token: crate::membership::InviteToken,
    pub secret: ed25519::Keypair,
}

impl std::fmt::Debug for HeldInvite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("HeldInvite")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl HeldInvite {
    /// The key from its stored secret bytes (32), checked against the token.
    pub fn new(token: crate::membership::InviteToken, secret: &[u8]) -> Result<Self, String> {
        let mut bytes = secret.to_vec();
        let secret: ed25519::Keypair = ed25519::SecretKey::try_from_bytes(&mut bytes)
            .map_err(|e| format!("token_secret: {e}"))?
            .into();
        if hex::encode(secret.public().to_bytes()) != token.key {
            return Err("token_secret is not the secret of the token's key".into());
        }
        Ok(HeldInvite { token, secret })
    }

    /// The secret's 32 bytes, to store.
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.secret.secret().as_ref().to_vec()
    }

    /// The credential `peer` presents with it.
    pub fn credential(&self, peer: &crate::PeerId) -> crate::membership::Credential {
        crate::membership::Credential::Invite {
            token: self.token.clone(),
            proof: crate::membership::invite_proof(&self.token, &self.secret, peer),
        }
    }
}

fn one() -> u64 {
    1
}

fn is_one(v: &u64) -> bool {
    *v == 1
}

/// The `format` tag of invites this version writes and reads.
pub const INVITE_FORMAT: &str = "fieldsync-invite/2";
/// The format before invite tokens had a one-time key: read only without a token (the
/// copy of its workspace an older node kept).
const INVITE_FORMAT_1: &str = "fieldsync-invite/1";
/// Invites larger than this are refused before parsing.
pub const MAX_INVITE_BYTES: usize = 1 << 20;

impl Invite {
    /// The invite for `workspace`.
    pub fn new(workspace: &Workspace) -> Self {
        Invite {
            format: INVITE_FORMAT.into(),
            workspace: workspace.id,
            schema: workspace.schema.source().to_owned(),
            schema_version: workspace.schema.version(),
            authority_public_key: hex::encode(workspace.authority.to_bytes()),
            authority_peer_id: workspace.authority_peer().to_string(),
            token: None,
            token_secret: None,
        }
    }

    /// Parses and checks an invite; the workspace it describes.
    pub fn decode(bytes: &[u8]) -> Result<Workspace, Error> {
        Self::decode_with_token(bytes).map(|(ws, _)| ws)
    }

    /// Parses and checks an invite: the workspace, and the membership token if it has one
    /// (its signature is checked here, its expiry when it is used).
    pub fn decode_with_token(bytes: &[u8]) -> Result<(Workspace, Option<HeldInvite>), Error> {
        if bytes.len() > MAX_INVITE_BYTES {
            return Err(Error::Invite(format!(
                "{} bytes is over the {MAX_INVITE_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let invite: Invite =
            serde_json::from_slice(bytes).map_err(|e| Error::Invite(e.to_string()))?;
        if invite.format == INVITE_FORMAT_1 && invite.token.is_some() {
            return Err(Error::Invite(format!("this invite ({INVITE_FORMAT_1}) was made by an older fieldsync and can be copied by any peer it is shown to; ask for a new invite")));
        }
        if invite.format != INVITE_FORMAT && invite.format != INVITE_FORMAT_1 {
            return Err(Error::Invite(format!(
                "format {:?} is not {INVITE_FORMAT:?}",
                invite.format
            )));
        }
        let key_bytes = hex::decode(&invite.authority_public_key)
            .map_err(|e| Error::Invite(format!("authority_public_key: {e}")))?;
        let authority = ed25519::PublicKey::try_from_bytes(&key_bytes)
            .map_err(|e| Error::Invite(format!("authority_public_key: {e}")))?;
        let workspace = Workspace {
            id: invite.workspace,
            schema: Schema::from_toml(&invite.schema)?.with_version(invite.schema_version),
            authority,
        };
        if workspace.authority_peer().to_string() != invite.authority_peer_id {
            return Err(Error::Invite(
                "authority_peer_id does not match authority_public_key".into(),
            ));
        }
        let held = match (invite.token, invite.token_secret) {
            (None, None) => None,
            (Some(token), Some(secret)) => {
                token
                    .verify(&workspace.authority, workspace.id, i64::MIN)
                    .map_err(Error::Invite)?;
                token.grant.check(&workspace.schema)?;
                let secret = hex::decode(&secret)
                    .map_err(|e| Error::Invite(format!("token_secret: {e}")))?;
                Some(HeldInvite::new(token, &secret).map_err(Error::Invite)?)
            }
            (Some(_), None) => {
                return Err(Error::Invite(
                    "the invite's token has no token_secret".into(),
                ))
            }
            (None, Some(_)) => return Err(Error::Invite("token_secret without a token".into())),
        };
        Ok((workspace, held))
    }
}
