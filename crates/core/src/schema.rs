//! The workspace schema: collections, their fields and each field's merge rule.
//!
//! Written in TOML. Version 1 is fixed at `init`; the authority publishes later versions
//! (see [`crate::schema_version`]) and every node adopts the newest it holds. What a new
//! version may change is decided by [`Schema::evolve`].

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::Error;

/// How concurrent writes to one field merge. Semantics in ARCHITECTURE.md.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rule {
    /// The later write wins: among concurrent values, the one whose change has the latest
    /// time (ties: Automerge's order). `by_actor` (schema `order = "actor"`) keeps
    /// Automerge's own order instead: op counter, then actor id.
    Lww { by_actor: bool },
    /// The highest value in `order` wins among concurrent values.
    Rank { order: Vec<String> },
    /// Largest concurrent number wins.
    Max,
    /// Smallest concurrent number wins.
    Min,
    /// Increments add up.
    Counter,
    /// Add-wins set of scalars.
    Set,
    /// Add-wins set of file references `{hash, size, mime, name}` (see
    /// [`crate::attachment`]); the bytes live in each node's blob store.
    Attachments,
    /// Character-level merge of a string.
    Text,
    /// Only values signed by the workspace authority count; other writes are proposals.
    Authority,
    /// Concurrent values open a conflict until a write that has seen them all.
    Manual,
}

impl Rule {
    /// The static name of a rule named `s` (`lww` for an unknown name).
    pub fn name_of(s: &str) -> &'static str {
        [
            "lww",
            "rank",
            "max",
            "min",
            "counter",
            "set",
            "attachments",
            "text",
            "authority",
            "manual",
        ]
        .into_iter()
        .find(|r| *r == s)
        .unwrap_or("lww")
    }

    /// The rule's name as written in the schema.
    pub fn name(&self) -> &'static str {
        match self {
            Rule::Lww { .. } => "lww",
            Rule::Rank { .. } => "rank",
            Rule::Max => "max",
            Rule::Min => "min",
            Rule::Counter => "counter",
            Rule::Set => "set",
            Rule::Attachments => "attachments",
            Rule::Text => "text",
            Rule::Authority => "authority",
            Rule::Manual => "manual",
        }
    }
}

/// What a delete does against a concurrent update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDelete {
    /// The entity stays deleted (default).
    #[default]
    DeleteWins,
    /// A concurrent update revives the entity.
    UpdateWins,
}

/// One declared field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldSpec {
    pub rule: Rule,
    /// For `authority` fields: the authority confirms valid proposals on receipt.
    pub auto_accept: bool,
    /// Shown in the view while the field has no value (read time: nothing is written).
    pub default: Option<serde_json::Value>,
    /// The field's name in earlier versions: values stored under it read as this field's
    /// (see [`crate::schema_version`]).
    pub renamed_from: Option<String>,
}

/// What a device member may see and write of a collection (relays and admins see all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Every entity.
    #[default]
    All,
    /// Entities whose owner field (the collection's `owner`) holds the member's user name.
    Own,
    /// Nothing.
    None,
}

impl std::str::FromStr for Access {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Access::All),
            "own" => Ok(Access::Own),
            "none" => Ok(Access::None),
            other => Err(format!("access {other:?} is not one of all, own, none")),
        }
    }
}

/// One collection of entities.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Collection {
    pub on_delete: OnDelete,
    pub fields: BTreeMap<String, FieldSpec>,
    /// The field naming the user an entity belongs to (for [`Access::Own`]).
    pub owner: Option<String>,
    /// What device members get unless their membership says otherwise.
    pub access: Access,
    /// What syncs first on (re)connect: collections with a higher `priority` are offered
    /// ahead of the rest (0, the default, is feed order).
    pub priority: u8,
    /// Devices fetch the files of this collection's `attachments` fields as soon as they
    /// see the references, not only when asked (relays always do).
    pub prefetch: bool,
}

impl Collection {
    /// The rule of `field`; undeclared fields are `lww`.
    pub fn rule(&self, field: &str) -> &Rule {
        static LWW: Rule = Rule::Lww { by_actor: false };
        self.fields.get(field).map(|f| &f.rule).unwrap_or(&LWW)
    }
}

/// The parsed schema plus the exact text it came from (which travels in invites).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema {
    pub collections: BTreeMap<String, Collection>,
    /// Data migrations, in the order they apply (see [`crate::migration`]).
    pub migrations: Vec<crate::migration::Migration>,
    source: String,
    /// 1 for the schema given at `init`; the authority numbers each later one.
    version: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    #[serde(default)]
    collections: BTreeMap<String, RawCollection>,
    #[serde(default)]
    migrations: Vec<crate::migration::RawMigration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollection {
    #[serde(default)]
    on_delete: OnDelete,
    #[serde(default)]
    fields: BTreeMap<String, RawField>,
    owner: Option<String>,
    #[serde(default)]
    access: Access,
    #[serde(default)]
    priority: u8,
    #[serde(default)]
    prefetch: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    rule: String,
    order: Option<RawOrder>,
    #[serde(default)]
    auto_accept: bool,
    default: Option<toml::Value>,
    renamed_from: Option<String>,
}

/// `order`: the ranks of a `rank` field, or `"actor"` for an `lww` field.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawOrder {
    Ranks(Vec<String>),
    Named(String),
}

/// Collection and field names: letters, digits, `_` and `-`, not starting with `_`
/// (reserved keys start with `_`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Schema {
    /// Parses and checks a schema written in TOML.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let raw: RawSchema = toml::from_str(text).map_err(|e| Error::Schema(e.to_string()))?;
        if raw.collections.is_empty() {
            return Err(Error::Schema(
                "the schema declares no collection; add a [collections.NAME] table".into(),
            ));
        }
        let mut collections = BTreeMap::new();
        for (cname, rc) in raw.collections {
            if !valid_name(&cname) {
                return Err(Error::Schema(format!(
                    "collection name {cname:?} must use letters, digits, '_' or '-' and not start with '_'"
                )));
            }
            let mut fields = BTreeMap::new();
            for (fname, rf) in rc.fields {
                if !valid_name(&fname) {
                    return Err(Error::Schema(format!(
                        "field name {cname}.{fname:?} must use letters, digits, '_' or '-' and not start with '_'"
                    )));
                }
                let rule = match (rf.rule.as_str(), rf.order) {
                    ("lww", Some(RawOrder::Named(o))) if o == "actor" => Rule::Lww { by_actor: true },
                    ("lww", Some(_)) => {
                        return Err(Error::Schema(format!(
                            "{cname}.{fname}: rule \"lww\" takes `order = \"actor\"` (Automerge's order) or no order (the later write wins)"
                        )))
                    }
                    ("rank", Some(RawOrder::Ranks(order))) => {
                        let mut seen = std::collections::BTreeSet::new();
                        if order.is_empty() || !order.iter().all(|v| seen.insert(v.clone())) {
                            return Err(Error::Schema(format!(
                                "{cname}.{fname}: `order` must list distinct values, lowest rank first"
                            )));
                        }
                        Rule::Rank { order }
                    }
                    ("rank", Some(RawOrder::Named(_)) | None) => {
                        return Err(Error::Schema(format!(
                            "{cname}.{fname}: rule \"rank\" needs `order = [lowest, …, highest]`"
                        )))
                    }
                    (other, Some(_)) => {
                        return Err(Error::Schema(format!(
                            "{cname}.{fname}: `order` only applies to rule \"rank\", not {other:?}"
                        )))
                    }
                    ("lww", None) => Rule::Lww { by_actor: false },
                    ("max", None) => Rule::Max,
                    ("min", None) => Rule::Min,
                    ("counter", None) => Rule::Counter,
                    ("set", None) => Rule::Set,
                    ("attachments", None) => Rule::Attachments,
                    ("text", None) => Rule::Text,
                    ("authority", None) => Rule::Authority,
                    ("manual", None) => Rule::Manual,
                    (other, None) => {
                        return Err(Error::Schema(format!(
                            "{cname}.{fname}: unknown rule {other:?}; expected one of lww, rank, max, min, counter, set, attachments, text, authority, manual"
                        )))
                    }
                };
                if rf.auto_accept && rule != Rule::Authority {
                    return Err(Error::Schema(format!(
                        "{cname}.{fname}: `auto_accept` only applies to rule \"authority\""
                    )));
                }
                let default = match rf.default {
                    None => None,
                    Some(v) => {
                        let json = serde_json::to_value(&v)
                            .map_err(|e| Error::Schema(format!("{cname}.{fname}: default: {e}")))?;
                        let coll = Collection {
                            fields: BTreeMap::from([(
                                fname.clone(),
                                FieldSpec {
                                    rule: rule.clone(),
                                    auto_accept: false,
                                    default: None,
                                    renamed_from: None,
                                },
                            )]),
                            ..Default::default()
                        };
                        let fits = matches!(
                            rule,
                            Rule::Lww { .. }
                                | Rule::Rank { .. }
                                | Rule::Max
                                | Rule::Min
                                | Rule::Manual
                        ) && !json.is_null()
                            && crate::patch::Patch::from_json(
                                &coll,
                                &serde_json::json!({ fname.clone(): json.clone() }),
                            )
                            .is_ok();
                        if !fits {
                            return Err(Error::Schema(format!(
                                "{cname}.{fname}: default {json} does not fit rule {:?}; defaults apply to lww, rank, max, min and manual fields and must be a value the rule accepts",
                                rule.name()
                            )));
                        }
                        Some(json)
                    }
                };
                if let Some(old) = &rf.renamed_from {
                    if !valid_name(old) || *old == fname {
                        return Err(Error::Schema(format!("{cname}.{fname}: renamed_from {old:?} must be another valid field name")));
                    }
                    if !matches!(
                        rule,
                        Rule::Lww { .. } | Rule::Rank { .. } | Rule::Max | Rule::Min | Rule::Manual
                    ) {
                        return Err(Error::Schema(format!(
                            "{cname}.{fname}: renamed_from applies to lww, rank, max, min and manual fields; a {} keeps its data in a container that values under another name cannot join",
                            rule.name()
                        )));
                    }
                }
                fields.insert(
                    fname,
                    FieldSpec {
                        rule,
                        auto_accept: rf.auto_accept,
                        default,
                        renamed_from: rf.renamed_from,
                    },
                );
            }
            if let Some(owner) = &rc.owner {
                if !valid_name(owner) {
                    return Err(Error::Schema(format!(
                        "{cname}: owner field {owner:?} must use letters, digits, '_' or '-'"
                    )));
                }
                if fields
                    .get(owner)
                    .is_some_and(|f: &FieldSpec| !matches!(f.rule, Rule::Lww { .. }))
                {
                    return Err(Error::Schema(format!(
                        "{cname}: owner field {owner:?} must use rule \"lww\""
                    )));
                }
            }
            if rc.access == Access::Own && rc.owner.is_none() {
                return Err(Error::Schema(format!(
                    "{cname}: access \"own\" needs `owner = \"<field naming the user>\"`"
                )));
            }
            for (fname, spec) in &fields {
                let Some(old) = &spec.renamed_from else {
                    continue;
                };
                if fields.contains_key(old) {
                    return Err(Error::Schema(format!("{cname}.{fname}: renamed_from {old:?} is still declared; remove the old declaration")));
                }
                if let Some(other) = fields
                    .iter()
                    .find(|(n, f)| *n != fname && f.renamed_from.as_deref() == Some(old.as_str()))
                {
                    return Err(Error::Schema(format!(
                        "{cname}: {fname} and {} are both renamed from {old:?}",
                        other.0
                    )));
                }
            }
            collections.insert(
                cname,
                Collection {
                    on_delete: rc.on_delete,
                    fields,
                    owner: rc.owner,
                    access: rc.access,
                    priority: rc.priority,
                    prefetch: rc.prefetch,
                },
            );
        }
        let migrations = crate::migration::parse(raw.migrations, &collections)?;
        collections.insert(
            crate::membership::MEMBERS.to_owned(),
            crate::membership::members_collection(),
        );
        collections.insert(
            crate::schema_version::SCHEMAS.to_owned(),
            crate::schema_version::schemas_collection(),
        );
        collections.insert(
            crate::purge::PURGES.to_owned(),
            crate::purge::purges_collection(),
        );
        Ok(Schema {
            collections,
            migrations,
            source: text.to_owned(),
            version: 1,
        })
    }

    /// This schema's version (1: the one given at `init`).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The same schema numbered `version`.
    pub fn with_version(mut self, version: u64) -> Self {
        self.version = version.max(1);
        self
    }

    /// The TOML text this schema was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether any collection declares a `priority` (then sync reads those ahead).
    pub fn has_priorities(&self) -> bool {
        self.collections.values().any(|c| c.priority > 0)
    }

    /// The named collection, or [`Error::UnknownCollection`].
    pub fn collection(&self, name: &str) -> Result<&Collection, Error> {
        self.collections
            .get(name)
            .ok_or_else(|| Error::UnknownCollection {
                name: name.to_owned(),
                known: self
                    .collections
                    .keys()
                    .filter(|k| !k.starts_with('_'))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[collections.tasks]
on_delete = "delete_wins"
[collections.tasks.fields]
status   = { rule = "rank", order = ["open", "in_progress", "completed"] }
progress = { rule = "max" }
tags     = { rule = "set" }
notes    = { rule = "text" }
photos   = { rule = "attachments" }
[collections.inventory.fields]
stock    = { rule = "counter" }
[collections.receipts]
prefetch = true
[collections.receipts.fields]
scans    = { rule = "attachments" }
[collections.payments.fields]
amount   = { rule = "authority" }
status   = { rule = "authority", auto_accept = true }
[collections.shifts]
on_delete = "update_wins"
[collections.shifts.fields]
start    = { rule = "manual" }
"#;

    #[test]
    fn parses_the_documented_example() {
        let s = Schema::from_toml(EXAMPLE).unwrap();
        assert_eq!(
            s.collections.len(),
            8,
            "five declared plus the built-in _members, _schemas and _purges"
        );
        let tasks = s.collection("tasks").unwrap();
        assert_eq!(tasks.rule("status").name(), "rank");
        assert_eq!(tasks.rule("undeclared"), &Rule::Lww { by_actor: false });
        assert_eq!(tasks.rule("photos"), &Rule::Attachments);
        assert!(s.collection("payments").unwrap().fields["status"].auto_accept);
        assert!(s.collection("receipts").unwrap().prefetch);
        assert!(!tasks.prefetch);
        assert_eq!(
            s.collection("shifts").unwrap().on_delete,
            OnDelete::UpdateWins
        );
        assert!(matches!(
            s.collection("nope"),
            Err(Error::UnknownCollection { .. })
        ));
    }

    #[test]
    fn rejects_bad_schemas_with_a_reason() {
        for (bad, needle) in [
            ("[collections.t.fields]\nx = { rule = \"rank\" }", "needs `order"),
            ("[collections.t.fields]\nx = { rule = \"bogus\" }", "unknown rule"),
            ("[collections.t.fields]\nx = { rule = \"max\", order = [\"a\"] }", "only applies"),
            ("[collections.t.fields]\n_x = { rule = \"max\" }", "must use letters"),
            ("[collections.t.fields]\nx = { rule = \"max\", auto_accept = true }", "auto_accept"),
            ("[collections.t]\non_delete = \"sometimes\"", "unknown variant"),
            ("", "no collection"),
            ("[collections.t.fields]\nx = { rule = \"rank\", order = [\"a\", \"a\"] }", "distinct"),
            ("[collections.t.fields]\nx = { rule = \"lww\", order = \"time\" }", "order = \"actor\""),
            ("[collections.t.fields]\nx = { rule = \"rank\", order = \"actor\" }", "needs `order"),
            ("[collections.t]\naccess = \"own\"", "needs `owner"),
            ("[collections.t]\naccess = \"some\"", "unknown variant"),
            ("[collections.t]\nowner = \"who\"\n[collections.t.fields]\nwho = { rule = \"set\" }", "must use rule"),
            ("[collections.t.fields]\nx = { rule = \"max\", default = \"high\" }", "does not fit"),
            ("[collections.t.fields]\nx = { rule = \"counter\", default = 1 }", "does not fit"),
            ("[collections.t.fields]\nx = { rule = \"attachments\", default = [] }", "does not fit"),
            ("[collections.t.fields]\nx = { rule = \"attachments\", order = [\"a\"] }", "only applies"),
        ] {
            let err = Schema::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?} gave {err:?}");
        }
    }
}
