//! Authority fields: proposals from devices, values signed by the workspace authority, and
//! settling one by the other (see `crate::authority` for the signature).
//!
//! A device's write to an authority field is a proposal, unless it would change nothing:
//! a value equal to the confirmed one, or equal to a pending proposal of the same device,
//! writes no proposal (retries and re-sent forms make no noise).

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use libp2p_identity::ed25519;
use serde_json::Value as Json;

use super::json::scalar_str;
use super::layout::{K_AUTH, K_PROP};
use super::{Entity, ProposalRecord, Writer};
use crate::authority::{seq_key, Confirmation};
use crate::ids::{OpId, ProposalId};
use crate::patch::FieldOp;
use crate::schema::Rule;
use crate::workspace::Workspace;
use crate::Error;

impl Entity {
    pub(super) fn write_authority(
        &mut self,
        ws: &Workspace,
        w: &Writer<'_>,
        field: &str,
        op: &FieldOp,
        op_id: Option<&OpId>,
        new_proposal: &mut dyn FnMut() -> ProposalId,
    ) -> Result<(), Error> {
        let value = match op {
            FieldOp::Set(v) => v.clone(),
            FieldOp::Remove => Json::Null,
            other => {
                return Err(Error::Patch(format!(
                    "field {field:?} (rule authority) does not take {other:?}"
                )))
            }
        };
        if let Some(key) = w.authority_key {
            self.confirm(ws, key, w.delegation.as_ref(), field, value, None)
                .map_err(Error::automerge)?;
            return self.settle_proposals(field, None).map_err(Error::automerge);
        }
        let confirmed = self.confirmed(ws, field).map(|c| c.value);
        let peer = w.peer.to_string();
        let repeated = self
            .proposal_records()
            .iter()
            .any(|(_, r)| r.field == field && r.value == value && r.peer == peer);
        if confirmed.as_ref() == Some(&value)
            || (confirmed.is_none() && value.is_null())
            || repeated
        {
            return Ok(());
        }
        let record = ProposalRecord {
            field: field.to_owned(),
            value,
            peer,
            user: w.user.to_owned(),
            time_ms: w.now_ms,
            op: op_id.map(|o| o.to_string()),
        };
        let prop = match self.prop_map() {
            Some(p) => p,
            None => self
                .doc
                .put_object(ROOT, K_PROP, ObjType::Map)
                .map_err(Error::automerge)?,
        };
        let text = serde_json::to_string(&record).map_err(|e| Error::Document(e.to_string()))?;
        self.doc
            .put(&prop, new_proposal().to_string(), text)
            .map_err(Error::automerge)
    }

    /// On the authority: confirms proposal `id`, settling it and older proposals for the
    /// same field.
    pub fn accept(
        &mut self,
        ws: &Workspace,
        w: &Writer<'_>,
        id: ProposalId,
        kind: &str,
    ) -> Result<(), Error> {
        let key = w.authority_key.ok_or(Error::NotAuthority)?;
        let proposal = self.proposal(id)?;
        self.set_writer(w);
        let field = proposal.field.clone();
        // Proposals equal to the value confirmed until now were settled by it (the view
        // hides them): they stay settled when this acceptance changes the value.
        let settled_value = self.confirmed(ws, &field).map(|c| c.value);
        let res = (|| -> Result<(), automerge::AutomergeError> {
            self.confirm(
                ws,
                key,
                w.delegation.as_ref(),
                &field,
                proposal.value.clone(),
                Some(id),
            )?;
            self.settle_proposals(&field, Some(id))?;
            match &settled_value {
                Some(value) => self.settle_equal(&field, value),
                None => Ok(()),
            }
        })();
        if let Err(e) = res {
            self.doc.rollback();
            return Err(Error::automerge(e));
        }
        self.commit(w, kind, vec![field], None);
        Ok(())
    }

    /// On the authority: drops proposal `id` without confirming it.
    pub fn reject(&mut self, w: &Writer<'_>, id: ProposalId) -> Result<(), Error> {
        if w.authority_key.is_none() {
            return Err(Error::NotAuthority);
        }
        let proposal = self.proposal(id)?;
        self.set_writer(w);
        let prop = self
            .prop_map()
            .ok_or_else(|| Error::NotFound(format!("proposal {id}")))?;
        self.doc
            .delete(&prop, id.to_string())
            .map_err(Error::automerge)?;
        self.commit(w, "reject", vec![proposal.field], None);
        Ok(())
    }

    fn proposal(&self, id: ProposalId) -> Result<ProposalRecord, Error> {
        self.proposal_records()
            .into_iter()
            .find(|(pid, _)| *pid == id)
            .map(|(_, r)| r)
            .ok_or_else(|| Error::NotFound(format!("proposal {id} (already settled?)")))
    }

    fn confirm(
        &mut self,
        ws: &Workspace,
        key: &ed25519::Keypair,
        delegation: Option<&Confirmation>,
        field: &str,
        value: Json,
        accepts: Option<ProposalId>,
    ) -> Result<(), automerge::AutomergeError> {
        let seq = self
            .confirmations(ws, field)
            .last()
            .map(|c| c.seq)
            .unwrap_or(0)
            + 1;
        let record = Confirmation {
            by: delegation.cloned().map(Box::new),
            ..Confirmation::sign(key, ws.id, self.id, field, seq, value, accepts)
        };
        let auth = match self.doc.get(ROOT, K_AUTH)? {
            Some((Value::Object(ObjType::Map), id)) => id,
            _ => self.doc.put_object(ROOT, K_AUTH, ObjType::Map)?,
        };
        let per_field = match self.doc.get(&auth, field)? {
            Some((Value::Object(ObjType::Map), id)) => id,
            _ => self.doc.put_object(&auth, field, ObjType::Map)?,
        };
        let text = serde_json::to_string(&record).unwrap_or_default();
        self.doc.put(&per_field, seq_key(seq), text)?;
        Ok(())
    }

    /// Deletes the pending proposals for `field` that are settled: all of them for a
    /// direct authority write, those up to `upto` for an acceptance.
    fn settle_proposals(
        &mut self,
        field: &str,
        upto: Option<ProposalId>,
    ) -> Result<(), automerge::AutomergeError> {
        let Some(prop) = self.prop_map() else {
            return Ok(());
        };
        for (pid, record) in self.proposal_records() {
            if record.field == field && upto.is_none_or(|u| pid <= u) {
                self.doc.delete(&prop, pid.to_string())?;
            }
        }
        Ok(())
    }

    /// Drops the proposals on `field` whose value is `value`.
    fn settle_equal(&mut self, field: &str, value: &Json) -> Result<(), automerge::AutomergeError> {
        let Some(prop) = self.prop_map() else {
            return Ok(());
        };
        for (pid, record) in self.proposal_records() {
            if record.field == field && record.value == *value {
                self.doc.delete(&prop, pid.to_string())?;
            }
        }
        Ok(())
    }

    fn prop_map(&self) -> Option<ObjId> {
        match self.doc.get(ROOT, K_PROP) {
            Ok(Some((Value::Object(ObjType::Map), id))) => Some(id),
            _ => None,
        }
    }

    /// Every stored proposal record, by id.
    pub(super) fn proposal_records(&self) -> Vec<(ProposalId, ProposalRecord)> {
        let mut out = Vec::new();
        for (v, obj) in self.doc.get_all(ROOT, K_PROP).unwrap_or_default() {
            if !matches!(v, Value::Object(ObjType::Map)) {
                continue;
            }
            for key in self.doc.keys(&obj) {
                let Ok(pid) = key.parse::<ProposalId>() else {
                    continue;
                };
                if let Some(text) = scalar_str(&self.doc, &obj, &key) {
                    if let Ok(record) = serde_json::from_str::<ProposalRecord>(&text) {
                        out.push((pid, record));
                    }
                }
            }
        }
        out.sort_by_key(|(pid, _)| *pid);
        out.dedup_by_key(|(pid, _)| *pid);
        out
    }

    /// Valid confirmations of `field`, by ascending seq. Records whose signature does not
    /// verify, or that sit under a key other than their seq, are ignored.
    pub(super) fn confirmations(&self, ws: &Workspace, field: &str) -> Vec<Confirmation> {
        let mut out: Vec<Confirmation> = Vec::new();
        for (v, auth) in self.doc.get_all(ROOT, K_AUTH).unwrap_or_default() {
            if !matches!(v, Value::Object(ObjType::Map)) {
                continue;
            }
            for (v, per_field) in self.doc.get_all(&auth, field).unwrap_or_default() {
                if !matches!(v, Value::Object(ObjType::Map)) {
                    continue;
                }
                for key in self.doc.keys(&per_field) {
                    for (v, _) in self
                        .doc
                        .get_all(&per_field, key.as_str())
                        .unwrap_or_default()
                    {
                        let Value::Scalar(s) = v else { continue };
                        let ScalarValue::Str(text) = s.as_ref() else {
                            continue;
                        };
                        let Ok(c) = serde_json::from_str::<Confirmation>(text) else {
                            continue;
                        };
                        if seq_key(c.seq) == key && c.verify(&ws.authority, ws.id, self.id, field) {
                            out.push(c);
                        }
                    }
                }
            }
        }
        out.sort_by(|a, b| a.seq.cmp(&b.seq).then_with(|| a.sig.cmp(&b.sig)));
        out
    }

    /// The newest valid confirmation of an authority `field`.
    pub fn confirmed(&self, ws: &Workspace, field: &str) -> Option<Confirmation> {
        self.confirmations(ws, field).pop()
    }

    /// Fields with proposals the authority confirms on receipt (`auto_accept = true`):
    /// the newest pending proposal per such field.
    pub fn auto_acceptable(&self, ws: &Workspace) -> Vec<ProposalId> {
        let Ok(coll) = self.schema_collection(ws) else {
            return vec![];
        };
        let Ok(derived) = self.derive(ws) else {
            return vec![];
        };
        let mut newest: std::collections::BTreeMap<String, ProposalId> =
            std::collections::BTreeMap::new();
        for p in derived.proposals {
            if coll
                .fields
                .get(&p.record.field)
                .is_some_and(|f| f.auto_accept && f.rule == Rule::Authority)
            {
                newest.insert(p.record.field, p.id);
            }
        }
        newest.into_values().collect()
    }
}
