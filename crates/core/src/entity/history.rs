//! The audit trail: every change in causal order, who made it, and each field's value
//! before and after.

use serde::Serialize;
use serde_json::Value as Json;

use super::{ChangeNote, Entity, View};
use crate::ids::PeerId;
use crate::workspace::Workspace;

/// Per-field values are computed for at most this many of the newest changes (each needs
/// the document as of that change).
const MAX_DIFFED_CHANGES: usize = 1000;

/// One field's value before and after a change (`null`: absent).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FieldChange {
    pub field: String,
    pub before: Json,
    pub after: Json,
}

/// One change in an entity's history.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HistoryEntry {
    pub change: String,
    pub device: String,
    /// The user the change's note names; the replica replaces it with the user of the
    /// device's signed member record where it knows one.
    pub user: String,
    pub time_ms: i64,
    pub kind: String,
    pub fields: Vec<String>,
    /// The view's value of each touched field before and after the change.
    pub changes: Vec<FieldChange>,
    /// The app's operation id, for writes that carried one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
}

impl Entity {
    /// Every change, in causal order. The creation content shared by every node that
    /// creates the entity identically (`init`) is shown as part of the `create` change(s)
    /// that name who created it.
    pub fn history(&mut self, ws: &Workspace) -> Vec<HistoryEntry> {
        let changes = self.doc.get_changes(&[]);
        let diff_from = changes.len().saturating_sub(MAX_DIFFED_CHANGES);
        let mut out = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            let note: Option<ChangeNote> = c.message().and_then(|m| serde_json::from_str(m).ok());
            let (user, kind, fields, op) = note
                .map(|n| (n.user, n.kind, n.fields, n.op))
                .unwrap_or_default();
            if kind == "init" {
                continue;
            }
            let device = PeerId::from_bytes(c.actor_id().to_bytes())
                .map(|p| p.to_string())
                .unwrap_or_else(|_| c.actor_id().to_hex_string());
            let changes = if i >= diff_from {
                let before = if kind == "create" {
                    View::new()
                } else {
                    self.view_at(ws, c.deps())
                };
                let after = self.view_at(ws, &[c.hash()]);
                fields
                    .iter()
                    .map(|f| FieldChange {
                        field: f.clone(),
                        before: before.get(f).cloned().unwrap_or(Json::Null),
                        after: after.get(f).cloned().unwrap_or(Json::Null),
                    })
                    .collect()
            } else {
                vec![]
            };
            out.push(HistoryEntry {
                change: c.hash().to_string(),
                device,
                user,
                time_ms: c.timestamp(),
                kind,
                fields,
                changes,
                op,
            });
        }
        out
    }

    /// The view as of `heads` (empty before the entity existed).
    fn view_at(&mut self, ws: &Workspace, heads: &[automerge::ChangeHash]) -> View {
        if heads.is_empty() {
            return View::new();
        }
        let Ok(doc) = self.doc.fork_at(heads) else {
            return View::new();
        };
        let then = Entity {
            id: self.id,
            collection: super::layout::read_collection(&doc),
            doc,
            persisted: vec![],
            seen_ms: 0,
            seen_heads: vec![],
            resolve_record: None,
            rederive: Default::default(),
        };
        then.view(ws).unwrap_or_default()
    }
}
