//! What a receiver checks before and after merging another node's changes.

use std::collections::{BTreeMap, BTreeSet};

use automerge::{ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::layout::{K_AUTH, K_DELETED};
use super::Entity;
use crate::authority::{seq_key, Confirmation};
use crate::workspace::Workspace;

/// Authority records and other contents of a document, as [`Entity::integrity`] finds them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Integrity {
    /// Signatures of the valid confirmations present.
    pub confirmed: BTreeSet<String>,
    /// Of those, the ones a delegate signed: signature → (delegate peer, the seq of the
    /// member record that made it a delegate).
    pub delegated: BTreeMap<String, (String, u64)>,
    /// Authority records that do not verify (`field/seq`).
    pub forged: BTreeSet<String>,
    /// Non-reserved root fields (counted for `_members` entities only).
    pub plain_fields: usize,
    /// Pending proposal records (`_members` only).
    pub proposals: usize,
    /// Whether a tombstone was ever written (`_members` only).
    pub tombstone: bool,
}

impl Entity {
    /// Which authority records verify and which do not, and what else the document holds.
    pub fn integrity(&self, ws: &Workspace) -> Integrity {
        let mut out = Integrity::default();
        // Only the member list is checked for anything but authority records.
        if self.collection.as_deref() == Some(crate::membership::MEMBERS) {
            out.plain_fields = self
                .doc
                .map_range(ROOT, ..)
                .filter(|i| !i.key.starts_with('_'))
                .count();
            out.proposals = self.proposal_records().len();
            out.tombstone = self.doc.get(ROOT, K_DELETED).ok().flatten().is_some();
        }
        for (v, auth) in self.doc.get_all(ROOT, K_AUTH).unwrap_or_default() {
            if !matches!(v, Value::Object(ObjType::Map)) {
                out.forged.insert(K_AUTH.to_owned());
                continue;
            }
            for field in self.doc.keys(&auth) {
                for (v, per_field) in self.doc.get_all(&auth, field.as_str()).unwrap_or_default() {
                    if !matches!(v, Value::Object(ObjType::Map)) {
                        out.forged.insert(field.clone());
                        continue;
                    }
                    for key in self.doc.keys(&per_field) {
                        for (v, _) in self
                            .doc
                            .get_all(&per_field, key.as_str())
                            .unwrap_or_default()
                        {
                            let valid = match &v {
                                Value::Scalar(s) => match s.as_ref() {
                                    ScalarValue::Str(text) => serde_json::from_str::<Confirmation>(
                                        text,
                                    )
                                    .ok()
                                    .filter(|c| {
                                        seq_key(c.seq) == key
                                            && c.verify(&ws.authority, ws.id, self.id, &field)
                                    }),
                                    _ => None,
                                },
                                _ => None,
                            };
                            match valid {
                                Some(c) => {
                                    if let Some(d) = &c.by {
                                        let peer = c.signer(&ws.authority_peer()).to_string();
                                        out.delegated.insert(c.sig.clone(), (peer, d.seq));
                                    }
                                    out.confirmed.insert(c.sig)
                                }
                                None => out.forged.insert(format!("{field}/{key}")),
                            };
                        }
                    }
                }
            }
        }
        out
    }
}
