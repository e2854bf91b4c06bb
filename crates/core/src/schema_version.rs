//! Schema versions after the first, and what a new version may change.
//!
//! Version 1 is the schema given at `init` (it travels in invites). Each later version is
//! an entity of the built-in collection `_schemas` whose only field `record` is an authority
//! field: its confirmed value (signed by the authority, see [`crate::authority`]) is a
//! [`SchemaRecord`] holding the version number and the TOML text. So a new version syncs
//! like any data — through relays, devices and bundles — and nobody but the authority can
//! publish one. Every node adopts the newest valid version it holds; the view stays a pure
//! function of (document, schema version).
//!
//! [`Schema::evolve`] is the change table (README "Schema reference"): the authority
//! refuses to publish a version whose merge would not converge with data written under the
//! old one, or would silently drop it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{EntityId, WorkspaceId};
use crate::schema::{Collection, FieldSpec, Rule, Schema};

/// The built-in collection holding schema versions 2 and later.
pub const SCHEMAS: &str = "_schemas";
/// The authority field of a schema entity.
pub const RECORD: &str = "record";
/// Schema texts larger than this are refused before parsing.
pub const MAX_SCHEMA_BYTES: usize = 256 << 10;

/// The `_schemas` collection's schema.
pub(crate) fn schemas_collection() -> Collection {
    let fields = BTreeMap::from([(
        RECORD.to_owned(),
        FieldSpec {
            rule: Rule::Authority,
            auto_accept: false,
            default: None,
            renamed_from: None,
        },
    )]);
    Collection {
        fields,
        ..Default::default()
    }
}

/// The entity holding schema `version` of workspace `ws`: the same id on every node, so
/// two publications of one version meet in one entity.
pub fn schema_entity_id(ws: WorkspaceId, version: u64) -> EntityId {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"fieldsync/schema/v1\0");
    h.update(ws.as_bytes());
    h.update(version.to_be_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    EntityId(uuid::Builder::from_custom_bytes(bytes).into_uuid())
}

/// The confirmed value of a schema entity's `record`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRecord {
    pub version: u64,
    /// The schema's TOML text.
    pub schema: String,
    /// When the authority published it (ms since the Unix epoch).
    pub published_ms: i64,
}

impl SchemaRecord {
    /// The schema this record holds, if it is valid under entity `id` of workspace `ws`
    /// (a record counts only under its own version's entity id).
    pub fn schema(&self, ws: WorkspaceId, id: EntityId) -> Result<Schema, crate::Error> {
        if self.version < 2 || schema_entity_id(ws, self.version) != id {
            return Err(crate::Error::Schema(format!(
                "schema record for version {} is under the wrong entity",
                self.version
            )));
        }
        if self.schema.len() > MAX_SCHEMA_BYTES {
            return Err(crate::Error::Schema(format!(
                "{} bytes is over the {MAX_SCHEMA_BYTES}-byte limit",
                self.schema.len()
            )));
        }
        Ok(Schema::from_toml(&self.schema)?.with_version(self.version))
    }
}

/// One difference between two schema versions, and whether it may be published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SchemaChange {
    /// `collection` or `collection.field`.
    pub path: String,
    /// What changes, in words.
    pub change: String,
    pub allowed: bool,
    /// Why it is refused (absent when allowed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Every difference from one schema to the next (`schema diff`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Evolution {
    pub from_version: u64,
    pub changes: Vec<SchemaChange>,
}

impl Evolution {
    /// Whether every change may be published.
    pub fn allowed(&self) -> bool {
        self.changes.iter().all(|c| c.allowed)
    }

    /// The refused changes, one line each ("path: change: reason").
    pub fn refusals(&self) -> Vec<String> {
        self.changes
            .iter()
            .filter(|c| !c.allowed)
            .map(|c| {
                format!(
                    "{}: {}: {}",
                    c.path,
                    c.change,
                    c.reason.as_deref().unwrap_or("refused")
                )
            })
            .collect()
    }
}

fn rule_text(rule: &Rule) -> String {
    match rule {
        Rule::Rank { order } => format!("rank {order:?}"),
        Rule::Lww { by_actor: true } => "lww (order = \"actor\")".into(),
        other => other.name().into(),
    }
}

/// Whether data written under `old` reads the same, or gains meaning, under `new`; the
/// reason if not.
fn rule_change(old: &Rule, new: &Rule) -> Result<(), String> {
    use Rule::*;
    let scalar = |r: &Rule| matches!(r, Lww { .. } | Rank { .. } | Max | Min | Manual);
    match (old, new) {
        (Rank { order: a }, Rank { order: b }) => {
            if b.len() >= a.len() && b[..a.len()] == a[..] {
                Ok(())
            } else {
                Err(format!(
                    "a rank order may only grow at its end ({a:?} must stay the start of the new order): removing or reordering values changes which stored value wins, and a removed value would vanish from views"
                ))
            }
        }
        // An undeclared or lww field gets a rule: its stored values are plain values that
        // every scalar rule reads.
        (Lww { .. }, r) if scalar(r) => Ok(()),
        (Manual, Lww { .. }) => Ok(()),
        (Authority, _) | (_, Authority) => Err(
            "a field cannot become authority-controlled or stop being one: values written before are plain values no signature covers (they would vanish from views, or every device's value would count as confirmed), and signed values would turn into plain ones; declare a new authority field and have the authority set it".into(),
        ),
        (Counter, _) | (_, Counter) => Err(
            "a counter keeps increments that add up; any other rule reads only the last value, so existing increments would be dropped (and the other way round, plain values are not increments)".into(),
        ),
        (Attachments, _) | (_, Attachments) => Err("an attachments field is stored as a set of file references; another rule would not read it as the same data, and plain values are not references".into()),
        (Set, _) | (_, Set) => Err("a set is stored as a list of elements; another rule would not read it as the same data".into()),
        (Text, _) | (_, Text) => Err("text is stored character by character; another rule would not read it as the same data".into()),
        (a, b) => Err(format!(
            "{} and {} settle concurrent values differently and views already shown would change; only giving an lww field a rule is allowed",
            a.name(),
            b.name()
        )),
    }
}

impl Schema {
    /// Every difference from this schema to `next`, each allowed or refused with a reason:
    /// the change table of the README's schema reference.
    pub fn evolve(&self, next: &Schema) -> Evolution {
        let mut changes = Vec::new();
        let mut push = |path: String, change: String, refused: Option<String>| {
            changes.push(SchemaChange {
                path,
                change,
                allowed: refused.is_none(),
                reason: refused,
            });
        };
        for (cname, old) in self.collections.iter().filter(|(c, _)| !c.starts_with('_')) {
            let Some(new) = next.collections.get(cname) else {
                push(
                    cname.clone(),
                    "collection removed".into(),
                    Some(
                        "its entities would no longer be readable or syncable; keep the collection"
                            .into(),
                    ),
                );
                continue;
            };
            if old.on_delete != new.on_delete {
                push(
                    cname.clone(),
                    format!("on_delete {:?} → {:?}", old.on_delete, new.on_delete),
                    Some(
                        "entities deleted concurrently with an update would come back or disappear"
                            .into(),
                    ),
                );
            }
            if old.owner != new.owner || old.access != new.access {
                // Allowed: who sees an entity is read from the schema in use each time it is
                // offered, and adoption offers every entity of the collection again. A device
                // that loses access keeps the copies it holds but receives no more changes to
                // them, and its writes to them are refused (README: partitions).
                push(
                    cname.clone(),
                    format!("partitions recomputed: owner {:?} / access {:?} → owner {:?} / access {:?}", old.owner, old.access, new.owner, new.access),
                    None,
                );
            }
            if old.prefetch != new.prefetch {
                // Allowed: only when devices fetch files changes, not what any view shows.
                push(
                    cname.clone(),
                    format!("prefetch {} → {}", old.prefetch, new.prefetch),
                    None,
                );
            }
            // Renames: the new field reads the old name's values under its own rule.
            let renames: BTreeMap<&str, (&String, &FieldSpec)> = new
                .fields
                .iter()
                .filter_map(|(n, f)| Some((f.renamed_from.as_deref()?, (n, f))))
                .collect();
            for (old_name, (fname, nf)) in &renames {
                let path = format!("{cname}.{fname}");
                let old_rule = old
                    .fields
                    .get(*old_name)
                    .map(|f| f.rule.clone())
                    .unwrap_or(Rule::Lww { by_actor: false });
                let into_rule = old
                    .fields
                    .get(fname.as_str())
                    .map(|f| f.rule.clone())
                    .unwrap_or_else(|| nf.rule.clone());
                let mut refused = rule_change(&old_rule, &nf.rule)
                    .err()
                    .filter(|_| old_rule != nf.rule);
                if refused.is_none() && into_rule != nf.rule {
                    refused = rule_change(&into_rule, &nf.rule).err();
                }
                push(
                    path,
                    format!(
                        "renamed from {old_name} ({} → {})",
                        rule_text(&old_rule),
                        rule_text(&nf.rule)
                    ),
                    refused,
                );
            }
            for (fname, of) in &old.fields {
                let path = format!("{cname}.{fname}");
                if renames.contains_key(fname.as_str()) {
                    continue; // reported as the rename
                }
                match new.fields.get(fname) {
                    None if matches!(of.rule, Rule::Lww { by_actor: false }) => {
                        push(path, "declaration removed (stays lww)".into(), None)
                    }
                    None => push(
                        path,
                        format!("declaration removed ({} → lww)", rule_text(&of.rule)),
                        rule_change(&of.rule, &Rule::Lww { by_actor: false }).err(),
                    ),
                    Some(nf) => {
                        if of.rule != nf.rule {
                            push(
                                path.clone(),
                                format!("rule {} → {}", rule_text(&of.rule), rule_text(&nf.rule)),
                                rule_change(&of.rule, &nf.rule).err(),
                            );
                        }
                        if of.default != nf.default {
                            push(
                                path.clone(),
                                format!("default {:?} → {:?}", of.default, nf.default),
                                None,
                            );
                        }
                        if of.auto_accept != nf.auto_accept {
                            push(
                                path.clone(),
                                format!("auto_accept {} → {}", of.auto_accept, nf.auto_accept),
                                None,
                            );
                        }
                        if of.renamed_from.is_some() && nf.renamed_from.is_none() {
                            push(
                                path,
                                format!("renamed_from {:?} dropped", of.renamed_from.as_deref().unwrap_or_default()),
                                Some("devices on older versions may still write the old name; keep renamed_from so their values stay readable".into()),
                            );
                        }
                    }
                }
            }
            for (fname, nf) in new
                .fields
                .iter()
                .filter(|(f, nf)| !old.fields.contains_key(*f) && nf.renamed_from.is_none())
            {
                let path = format!("{cname}.{fname}");
                let mut what = format!("field added ({})", rule_text(&nf.rule));
                if let Some(d) = &nf.default {
                    what.push_str(&format!(", default {d}"));
                }
                // Allowed for every rule: until now the name was undeclared, and devices on
                // older versions keep writing plain values there (README: mixed versions).
                push(path, what, None);
            }
        }
        for cname in next
            .collections
            .keys()
            .filter(|c| !c.starts_with('_') && !self.collections.contains_key(*c))
        {
            push(cname.clone(), "collection added".into(), None);
        }
        // Published migrations stay, unchanged and in order: entities that arrive later (a
        // device offline since an older version) still need them.
        for (i, m) in self.migrations.iter().enumerate() {
            let path = format!("migrations.{}", m.id);
            match next.migrations.get(i) {
                Some(n) if n == m => {}
                Some(n) if n.id == m.id => push(path, "migration changed".into(), Some("a published migration may already be applied on some nodes; declare a new migration with a new id instead".into())),
                _ => push(path, "migration removed or moved".into(), Some("entities that arrive later still need every published migration, in the order published; keep it and add new ones at the end".into())),
            }
        }
        for m in next.migrations.iter().skip(self.migrations.len()) {
            if self.migrations.iter().any(|o| o.id == m.id) {
                continue;
            }
            push(
                format!("migrations.{}", m.id),
                format!(
                    "migration added ({} on {}: {})",
                    m.kind_name(),
                    m.collection,
                    m.targets().join(", ")
                ),
                None,
            );
        }
        Evolution {
            from_version: self.version(),
            changes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"
[collections.tasks.fields]
status = { rule = "rank", order = ["open", "in_progress", "completed"] }
stock  = { rule = "counter" }
notes  = { rule = "text" }
"#;

    fn evolve(next: &str) -> Evolution {
        Schema::from_toml(V1)
            .unwrap()
            .evolve(&Schema::from_toml(next).unwrap())
    }

    #[test]
    fn allowed_changes_pass() {
        let e = evolve(
            r#"
[collections.tasks.fields]
status   = { rule = "rank", order = ["open", "in_progress", "completed", "on_hold"] }
stock    = { rule = "counter" }
notes    = { rule = "text" }
priority = { rule = "max", default = 0 }
[collections.projects.fields]
name = { rule = "lww" }
"#,
        );
        assert!(e.allowed(), "{:?}", e.refusals());
        assert_eq!(e.changes.len(), 3, "{:?}", e.changes);
    }

    #[test]
    fn refused_changes_say_why() {
        for (next, needle) in [
            ("[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"completed\"] }\nstock = { rule = \"counter\" }\nnotes = { rule = \"text\" }", "only grow at its end"),
            ("[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\"] }\nstock = { rule = \"lww\" }\nnotes = { rule = \"text\" }", "increments would be dropped"),
            ("[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\"] }\nnotes = { rule = \"text\" }", "increments would be dropped"),
            ("[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"in_progress\", \"completed\"] }\nstock = { rule = \"counter\" }\nnotes = { rule = \"max\" }", "character by character"),
            ("[collections.other.fields]\nx = { rule = \"lww\" }", "collection removed"),
        ] {
            let e = evolve(next);
            assert!(!e.allowed(), "{next} was allowed");
            let why = e.refusals().join("\n");
            assert!(why.contains(needle), "{next}: {why}");
        }
    }

    #[test]
    fn renames_partitions_and_migrations_follow_the_table() {
        let base = "[collections.tasks]\nowner = \"who\"\n[collections.tasks.fields]\nstatus = { rule = \"rank\", order = [\"open\", \"done\"] }\nstock = { rule = \"counter\" }\n";
        let old = Schema::from_toml(base).unwrap();
        let next = |extra: &str| old.evolve(&Schema::from_toml(&format!("{base}{extra}")).unwrap());
        // An undeclared (lww) `title` renamed to a declared `label`.
        let e = next("label = { rule = \"lww\", renamed_from = \"title\" }\n");
        assert!(e.allowed(), "{:?}", e.refusals());
        assert!(
            e.changes
                .iter()
                .any(|c| c.path == "tasks.label" && c.change.starts_with("renamed from title")),
            "{:?}",
            e.changes
        );
        // Partitions may change.
        let e = old.evolve(
            &Schema::from_toml(
                &base.replace("owner = \"who\"", "owner = \"who\"\naccess = \"own\""),
            )
            .unwrap(),
        );
        assert!(
            e.allowed() && e.changes[0].change.starts_with("partitions recomputed"),
            "{:?}",
            e.changes
        );
        // A rename across rules the table refuses is refused.
        let renamed_rank = Schema::from_toml("[collections.tasks]\nowner = \"who\"\n[collections.tasks.fields]\nstate = { rule = \"max\", renamed_from = \"status\" }\nstock = { rule = \"counter\" }\n");
        let e = old.evolve(&renamed_rank.unwrap());
        assert!(
            !e.allowed() && e.refusals().join(" ").contains("renamed from status"),
            "{:?}",
            e.changes
        );
        // Migrations: added at the end is allowed; a published one stays as it was.
        let m1 = "[[migrations]]\nid = \"a\"\ncollection = \"tasks\"\nkind = \"backfill\"\nfield = \"status\"\nvalue = \"open\"\n";
        let m2 = "[[migrations]]\nid = \"b\"\ncollection = \"tasks\"\nkind = \"copy\"\nfrom = \"status\"\nfield = \"label\"\n";
        let with = |m: &str| Schema::from_toml(&format!("{base}{m}")).unwrap();
        assert!(old.evolve(&with(m1)).allowed());
        assert!(with(m1).evolve(&with(&format!("{m1}{m2}"))).allowed());
        assert!(with(&format!("{m1}{m2}"))
            .evolve(&with(m2))
            .refusals()
            .join(" ")
            .contains("in the order published"));
        assert!(with(m1)
            .evolve(&with(&m1.replace("\"open\"", "\"done\"")))
            .refusals()
            .join(" ")
            .contains("new id"));
        // Authority stays refused, with the way out in the reason.
        assert!(next("").changes.is_empty());
        let auth =
            Schema::from_toml(&base.replace("rule = \"counter\"", "rule = \"authority\"")).unwrap();
        assert!(old
            .evolve(&auth)
            .refusals()
            .join(" ")
            .contains("declare a new authority field"));
    }

    #[test]
    fn a_record_counts_only_under_its_own_entity() {
        let ws = WorkspaceId(uuid::Uuid::from_u128(7));
        let r = SchemaRecord {
            version: 2,
            schema: V1.into(),
            published_ms: 0,
        };
        assert_eq!(r.schema(ws, schema_entity_id(ws, 2)).unwrap().version(), 2);
        assert!(r.schema(ws, schema_entity_id(ws, 3)).is_err());
        let one = SchemaRecord { version: 1, ..r };
        assert!(
            one.schema(ws, schema_entity_id(ws, 1)).is_err(),
            "version 1 comes from init only"
        );
    }
}
