//! Scenario: 2–4 replicas edit one entity concurrently from a common base, then take in each other's changes in random orders, with duplicates and in groups; every copy converges to the same view, and each merge rule keeps its promise.
//!
//! What is checked, against a plain model of what each replica did:
//! - convergence: every replica and every fresh copy ends with the same heads, `view` and
//!   `conflicts`, whatever the delivery order (single changes, incremental saves, whole saves,
//!   concatenations, duplicates, changes arriving before their dependencies);
//! - rank: the highest-ranked concurrent value; max / min: the largest / smallest;
//!   counter: base plus every increment; set: add-wins per element; lww: one of the concurrent
//!   values; manual: `_conflicts` lists exactly the distinct concurrent values, and `resolve`
//!   on one copy settles the conflict everywhere it is merged;
//! - authority: device writes only ever appear under `_pending`; confirmations forged with
//!   raw Automerge (wrong key, tampered value, wrong seq key, junk signature, plain root value)
//!   never appear as the confirmed value; an `accept` by the authority shows the proposal's
//!   value everywhere and settles it and older proposals;
//! - delete: `delete_wins` keeps a delete concurrent with an update, `update_wins` revives.
//!
//! The model follows Automerge in one respect: writing a register the scalar value it already
//! holds (or removing an absent field, or writing unchanged text) is no write, so it does not
//! compete with concurrent writes. Set adds and `update_wins` updates always are writes.

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};
use fieldsync_core::authority::{seq_key, Confirmation};
use fieldsync_core::{
    Conflict, ConflictState, Entity, EntityId, Error, Patch, PeerId, Proposal, ProposalId, Schema,
    Workspace, WorkspaceId, Writer,
};
use libp2p_identity::ed25519;
use proptest::prelude::*;
use serde_json::{json, Map, Value as Json};
use uuid::Uuid;

const SCHEMA: &str = r#"
[collections.items.fields]
status   = { rule = "rank", order = ["open", "in_progress", "completed"] }
progress = { rule = "max" }
low      = { rule = "min" }
stock    = { rule = "counter" }
tags     = { rule = "set" }
notes    = { rule = "text" }
start    = { rule = "manual" }
amount   = { rule = "authority" }

[collections.shifts]
on_delete = "update_wins"
[collections.shifts.fields]
status   = { rule = "rank", order = ["open", "in_progress", "completed"] }
progress = { rule = "max" }
low      = { rule = "min" }
stock    = { rule = "counter" }
tags     = { rule = "set" }
notes    = { rule = "text" }
start    = { rule = "manual" }
amount   = { rule = "authority" }
"#;

const ORDER: [&str; 3] = ["open", "in_progress", "completed"];
/// Fields holding one value per write, where concurrent writes leave several values.
/// `title` is undeclared, so lww.
const REGISTERS: [(&str, &str); 5] = [
    ("status", "rank"),
    ("progress", "max"),
    ("low", "min"),
    ("title", "lww"),
    ("start", "manual"),
];
/// The value every forged confirmation carries; no honest write uses it.
const FORGED: i64 = 666_666;

fn status_val(i: u8) -> Json {
    json!(ORDER[usize::from(i) % ORDER.len()])
}
/// `n / 2`: integers and halves, so max/min compare ints with floats.
fn half(n: i8) -> Json {
    if n % 2 == 0 {
        json!(n / 2)
    } else {
        json!(f64::from(n) / 2.0)
    }
}
fn title_val(i: u8) -> Json {
    [
        json!("x"),
        json!("y"),
        json!(3),
        json!({"k": 1, "a": [true]}),
        json!([1, "z"]),
    ][usize::from(i) % 5]
        .clone()
}
fn start_val(i: u8) -> Json {
    [json!("08:00"), json!("09:00"), json!("10:00"), json!(9)][usize::from(i) % 4].clone()
}
fn amount_val(i: u8) -> Json {
    // The object's keys are deliberately not in sorted order.
    [
        json!(10),
        json!(20),
        json!(35),
        json!(2.5),
        json!({"n": 5, "cur": "EUR"}),
    ][usize::from(i) % 5]
        .clone()
}
const ALPHABET: usize = 5;
fn elem(i: u8) -> Json {
    [json!("a"), json!("b"), json!("c"), json!(7), json!(true)][usize::from(i) % ALPHABET].clone()
}
/// The set element's canonical key (for these elements: their JSON text).
fn ekey(i: u8) -> String {
    elem(i).to_string()
}

// ---------------------------------------------------------------------------------------------
// Generated input

#[derive(Clone, Debug)]
enum Edit {
    Status(Option<u8>),
    Progress(Option<i8>),
    Low(Option<i8>),
    Stock(i8),
    /// "Set the counter to n": the increment from the value this replica sees.
    StockSet(i8),
    Add(Vec<u8>),
    Remove(Vec<u8>),
    /// Replace the set's membership with exactly these.
    Tags(Vec<u8>),
    Notes(String),
    Title(Option<u8>),
    Start(Option<u8>),
    Amount(Option<u8>),
}

impl Edit {
    fn field(&self) -> &'static str {
        match self {
            Edit::Status(_) => "status",
            Edit::Progress(_) => "progress",
            Edit::Low(_) => "low",
            Edit::Stock(_) | Edit::StockSet(_) => "stock",
            Edit::Add(_) | Edit::Remove(_) | Edit::Tags(_) => "tags",
            Edit::Notes(_) => "notes",
            Edit::Title(_) => "title",
            Edit::Start(_) => "start",
            Edit::Amount(_) => "amount",
        }
    }

    /// The value written for a register field (None: the field is removed).
    fn register_value(&self) -> Option<Json> {
        match self {
            Edit::Status(o) => o.map(status_val),
            Edit::Progress(o) | Edit::Low(o) => o.map(half),
            Edit::Title(o) => o.map(title_val),
            Edit::Start(o) => o.map(start_val),
            _ => None,
        }
    }

    /// The patch JSON for this edit.
    fn patch_value(&self) -> Json {
        let elems = |v: &[u8]| Json::Array(v.iter().map(|i| elem(*i)).collect());
        match self {
            Edit::Status(_)
            | Edit::Progress(_)
            | Edit::Low(_)
            | Edit::Title(_)
            | Edit::Start(_) => self.register_value().unwrap_or(Json::Null),
            Edit::Stock(n) => json!({"$inc": n}),
            Edit::StockSet(n) => json!(n),
            Edit::Add(v) => json!({"$add": elems(v)}),
            Edit::Remove(v) => json!({"$remove": elems(v)}),
            Edit::Tags(v) => elems(v),
            Edit::Notes(s) => json!(s),
            Edit::Amount(o) => o.map(amount_val).unwrap_or(Json::Null),
        }
    }
}

#[derive(Clone, Debug)]
enum Step {
    Update { edits: Vec<Edit>, time: i64 },
    Delete { time: i64 },
}

#[derive(Clone, Debug)]
struct Base {
    status: Option<u8>,
    progress: Option<i8>,
    low: Option<i8>,
    stock: i8,
    tags: Vec<u8>,
    notes: String,
    title: Option<u8>,
    start: Option<u8>,
    /// The creator is a device, so this becomes a proposal.
    amount: Option<u8>,
}

/// How one target receives everyone's changes.
#[derive(Clone, Debug)]
struct Plan {
    /// Per replica: 0 = each change on its own, 1 = its whole save, 2 = its incremental save.
    forms: Vec<u8>,
    /// Sort keys giving the delivery order.
    keys: Vec<u16>,
    /// Items delivered a second time.
    dups: Vec<u16>,
}

#[derive(Clone, Debug)]
struct Case {
    update_wins: bool,
    base: Base,
    replicas: Vec<Vec<Step>>,
    /// Replica 0 holds the authority key.
    authority_replica: bool,
    plans: Vec<Plan>,
    accept_pick: u8,
    resolve_to: u8,
}

fn elems() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..ALPHABET as u8, 0..3)
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        prop::option::weighted(0.85, 0u8..3).prop_map(Edit::Status),
        prop::option::weighted(0.85, -9i8..=9).prop_map(Edit::Progress),
        prop::option::weighted(0.85, -9i8..=9).prop_map(Edit::Low),
        (-5i8..=5).prop_map(Edit::Stock),
        (-30i8..=30).prop_map(Edit::StockSet),
        elems().prop_map(Edit::Add),
        elems().prop_map(Edit::Remove),
        elems().prop_map(Edit::Tags),
        "[a-z]{0,4}".prop_map(Edit::Notes),
        prop::option::weighted(0.85, 0u8..5).prop_map(Edit::Title),
        prop::option::weighted(0.85, 0u8..4).prop_map(Edit::Start),
        prop::option::weighted(0.85, 0u8..5).prop_map(Edit::Amount),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (prop::collection::vec(edit(), 1..4), any::<i64>()).prop_map(|(edits, time)| Step::Update { edits, time }),
        1 => any::<i64>().prop_map(|time| Step::Delete { time }),
    ]
}

fn base() -> impl Strategy<Value = Base> {
    (
        (
            prop::option::of(0u8..3),
            prop::option::of(-9i8..=9),
            prop::option::of(-9i8..=9),
            -20i8..=20,
        ),
        (
            elems(),
            "[a-z]{0,3}",
            prop::option::of(0u8..5),
            prop::option::of(0u8..4),
            prop::option::of(0u8..5),
        ),
    )
        .prop_map(
            |((status, progress, low, stock), (tags, notes, title, start, amount))| Base {
                status,
                progress,
                low,
                stock,
                tags,
                notes,
                title,
                start,
                amount,
            },
        )
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        prop::collection::vec(0u8..3, 4),
        prop::collection::vec(any::<u16>(), 1..48),
        prop::collection::vec(any::<u16>(), 0..6),
    )
        .prop_map(|(forms, keys, dups)| Plan { forms, keys, dups })
}

/// Plans for: up to 4 replicas, then 3 fresh copies.
const PLANS: usize = 7;

prop_compose! {
    fn case()(
        update_wins in any::<bool>(),
        base in base(),
        replicas in prop::collection::vec(prop::collection::vec(step(), 0..7), 2..=4),
        authority_replica in any::<bool>(),
        plans in prop::collection::vec(plan(), PLANS),
        accept_pick in any::<u8>(),
        resolve_to in 0u8..4,
    ) -> Case {
        Case { update_wins, base, replicas, authority_replica, plans, accept_pick, resolve_to }
    }
}

// ---------------------------------------------------------------------------------------------
// The model

/// What one replica did before any merge.
#[derive(Clone, Debug, Default)]
struct Model {
    /// Register fields: the last value written (None: removed).
    regs: BTreeMap<&'static str, Option<Json>>,
    notes: Option<String>,
    inc: i64,
    /// Set element key → whether the last op on it was an add.
    tags: BTreeMap<String, bool>,
    proposals: Vec<(ProposalId, Json)>,
    /// On the authority replica: the last value written to `amount` (may be null).
    confirmed: Option<Json>,
    deleted_local: bool,
    any_delete: bool,
    /// The last write of the tombstone (`update_wins` writes `false` on every update).
    last_tombstone: Option<bool>,
}

/// The state every replica starts from.
#[derive(Clone, Debug)]
struct BaseState {
    regs: BTreeMap<&'static str, Option<Json>>,
    stock: i64,
    tags: BTreeSet<String>,
    notes: String,
    proposal: Option<(ProposalId, Json)>,
}

impl Model {
    fn has_tag(&self, key: &str, base: &BaseState) -> bool {
        self.tags
            .get(key)
            .copied()
            .unwrap_or_else(|| base.tags.contains(key))
    }

    fn apply(
        &mut self,
        edit: &Edit,
        base: &BaseState,
        authority: bool,
        proposal: Option<ProposalId>,
    ) {
        match edit {
            Edit::Status(_)
            | Edit::Progress(_)
            | Edit::Low(_)
            | Edit::Title(_)
            | Edit::Start(_) => {
                let f = edit.field();
                let new = edit.register_value();
                let local = self
                    .regs
                    .get(f)
                    .cloned()
                    .unwrap_or_else(|| base.regs[f].clone());
                // Automerge drops a put of the scalar already there (and removing an absent
                // field is a no-op): such a write is no write, so it does not compete.
                let unchanged = match (&new, &local) {
                    (Some(n), Some(l)) => n == l && !n.is_object() && !n.is_array(),
                    (None, None) => true,
                    _ => false,
                };
                if !unchanged {
                    self.regs.insert(f, new);
                }
            }
            Edit::Stock(n) => self.inc += i64::from(*n),
            Edit::StockSet(n) => self.inc = i64::from(*n) - base.stock,
            Edit::Add(v) => {
                for i in v {
                    self.tags.insert(ekey(*i), true);
                }
            }
            Edit::Remove(v) => {
                for i in v {
                    self.tags.insert(ekey(*i), false);
                }
            }
            Edit::Tags(v) => {
                let wanted: BTreeSet<String> = v.iter().map(|i| ekey(*i)).collect();
                for i in 0..ALPHABET as u8 {
                    let k = ekey(i);
                    if wanted.contains(&k) {
                        self.tags.insert(k, true);
                    } else if self.has_tag(&k, base) {
                        self.tags.insert(k, false);
                    }
                }
            }
            Edit::Notes(s) => {
                // Writing the text already there changes nothing.
                if self.notes.as_deref().unwrap_or(&base.notes) != s {
                    self.notes = Some(s.clone());
                }
            }
            Edit::Amount(o) => {
                let v = o.map(amount_val).unwrap_or(Json::Null);
                if authority {
                    self.confirmed = Some(v);
                } else if let Some(id) = proposal {
                    self.proposals.push((id, v));
                }
            }
        }
    }
}

/// What the merge of `models` (each concurrent with the others) must show.
#[derive(Clone, Debug)]
struct Expected {
    /// Per register field: the distinct concurrent values.
    regs: BTreeMap<&'static str, Vec<Json>>,
    stock: i64,
    tags: BTreeSet<String>,
    /// The text, when it is determined (at most one writer).
    notes: Option<String>,
    amount: Option<Json>,
    /// Pending proposals, by id.
    proposals: Vec<(ProposalId, Json)>,
    deleted: bool,
}

fn distinct(vals: impl IntoIterator<Item = Json>) -> Vec<Json> {
    let mut out: Vec<Json> = Vec::new();
    for v in vals {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

fn same_set(a: &[Json], b: &[Json]) -> bool {
    let (a, b) = (distinct(a.iter().cloned()), distinct(b.iter().cloned()));
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

fn expect(base: &BaseState, models: &[&Model], update_wins: bool) -> Expected {
    let mut regs = BTreeMap::new();
    for (f, _) in REGISTERS {
        let writers: Vec<&Option<Json>> = models.iter().filter_map(|m| m.regs.get(f)).collect();
        let vals = if writers.is_empty() {
            base.regs[f].clone().into_iter().collect()
        } else {
            // Each writer's write replaced the base value; removals leave nothing.
            distinct(writers.into_iter().flatten().cloned())
        };
        regs.insert(f, vals);
    }
    let tags = (0..ALPHABET as u8)
        .map(ekey)
        .filter(|k| {
            let last: Vec<bool> = models
                .iter()
                .filter_map(|m| m.tags.get(k).copied())
                .collect();
            last.contains(&true) || (base.tags.contains(k) && !last.contains(&false))
        })
        .collect();
    let note_writers: Vec<&String> = models.iter().filter_map(|m| m.notes.as_ref()).collect();
    let notes = match note_writers.as_slice() {
        [] => Some(base.notes.clone()),
        [one] => Some((*one).clone()),
        _ => None,
    };
    let confirmed = models.iter().find_map(|m| m.confirmed.clone());
    let mut proposals: Vec<(ProposalId, Json)> = models
        .iter()
        .flat_map(|m| m.proposals.iter().cloned())
        .collect();
    // A direct authority write settles the proposals the authority had seen: the base's.
    if confirmed.is_none() {
        proposals.extend(base.proposal.clone());
    }
    proposals.sort_by_key(|(id, _)| *id);
    // A proposal equal to the confirmed value is settled by it.
    if let Some(c) = &confirmed {
        proposals.retain(|(_, v)| v != c);
    }
    let deleted = if update_wins {
        let lasts: Vec<bool> = models.iter().filter_map(|m| m.last_tombstone).collect();
        !lasts.is_empty() && lasts.iter().all(|d| *d)
    } else {
        models.iter().any(|m| m.any_delete)
    };
    Expected {
        regs,
        stock: base.stock + models.iter().map(|m| m.inc).sum::<i64>(),
        tags,
        notes,
        amount: confirmed.filter(|v| !v.is_null()),
        proposals,
        deleted,
    }
}

fn num(v: &Json) -> f64 {
    v.as_f64().expect("a number")
}

/// Checks one copy's view, conflicts and proposals against `exp`.
fn check(
    ctx: &str,
    v: &Map<String, Json>,
    conflicts: &[Conflict],
    proposals: &[Proposal],
    exp: &Expected,
) -> Result<(), TestCaseError> {
    let regs = &exp.regs;
    // rank: the highest-ranked concurrent value.
    let rank = |j: &Json| ORDER.iter().position(|o| j == o);
    prop_assert_eq!(
        v.get("status"),
        regs["status"].iter().max_by_key(|j| rank(j)),
        "{}: rank",
        ctx
    );
    // max / min.
    prop_assert_eq!(
        v.get("progress"),
        regs["progress"]
            .iter()
            .max_by(|a, b| num(a).total_cmp(&num(b))),
        "{}: max",
        ctx
    );
    prop_assert_eq!(
        v.get("low"),
        regs["low"].iter().min_by(|a, b| num(a).total_cmp(&num(b))),
        "{}: min",
        ctx
    );
    // lww and manual show one of the concurrent values.
    for f in ["title", "start"] {
        match v.get(f) {
            None => prop_assert!(
                regs[f].is_empty(),
                "{}: {} missing, expected one of {:?}",
                ctx,
                f,
                regs[f]
            ),
            Some(x) => prop_assert!(
                regs[f].contains(x),
                "{}: {} = {} not among {:?}",
                ctx,
                f,
                x,
                regs[f]
            ),
        }
    }
    // Conflicts: exactly the register fields with several distinct values, listing them all.
    for (f, rule) in REGISTERS {
        let found: Vec<&Conflict> = conflicts.iter().filter(|c| c.field == f).collect();
        if regs[f].len() >= 2 {
            prop_assert_eq!(found.len(), 1, "{}: one conflict on {}", ctx, f);
            let c = found[0];
            prop_assert!(
                same_set(&c.values, &regs[f]),
                "{}: conflict on {} lists {:?}, expected {:?}",
                ctx,
                f,
                c.values,
                regs[f]
            );
            prop_assert_eq!(
                c.values.len(),
                regs[f].len(),
                "{}: conflict values on {} are distinct",
                ctx,
                f
            );
            prop_assert_eq!(c.rule, rule);
            let state = if f == "start" {
                ConflictState::Open
            } else {
                ConflictState::Auto
            };
            prop_assert_eq!(c.state, state);
        } else {
            prop_assert!(
                found.is_empty(),
                "{}: unexpected conflict on {}: {:?}",
                ctx,
                f,
                found
            );
        }
    }
    prop_assert!(
        conflicts
            .iter()
            .all(|c| REGISTERS.iter().any(|(f, _)| *f == c.field)),
        "{}: merging fields never conflict: {:?}",
        ctx,
        conflicts
    );
    // `_conflicts` in the view: the open (manual) ones only.
    if regs["start"].len() >= 2 {
        let open = v.get("_conflicts").and_then(Json::as_object);
        prop_assert!(
            open.is_some_and(|o| o.len() == 1),
            "{}: _conflicts should hold only start: {:?}",
            ctx,
            v.get("_conflicts")
        );
        let listed = open
            .and_then(|o| o.get("start"))
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        prop_assert!(
            same_set(&listed, &regs["start"]),
            "{}: _conflicts.start {:?}, expected {:?}",
            ctx,
            listed,
            regs["start"]
        );
    } else {
        prop_assert!(
            v.get("_conflicts").is_none(),
            "{}: no open conflict expected: {:?}",
            ctx,
            v.get("_conflicts")
        );
    }
    // counter.
    // Declared fields never written are absent from the view: a counter never written reads 0.
    prop_assert_eq!(
        v.get("stock").cloned().unwrap_or(json!(0)),
        json!(exp.stock),
        "{}: counter",
        ctx
    );
    // set: add-wins.
    let tags: BTreeSet<String> = v
        .get("tags")
        .and_then(Json::as_array)
        .map(|a| a.iter().map(Json::to_string).collect())
        .unwrap_or_default();
    prop_assert_eq!(&tags, &exp.tags, "{}: set", ctx);
    // text.
    // An empty text is absent from the view.
    prop_assert!(
        v.get("notes")
            .is_none_or(|n| n.as_str().is_some_and(|t| !t.is_empty())),
        "{}: notes is text",
        ctx
    );
    let notes = Some(v.get("notes").and_then(Json::as_str).unwrap_or(""));
    if let Some(n) = &exp.notes {
        prop_assert_eq!(notes, Some(n.as_str()), "{}: text with one writer", ctx);
    }
    // authority: only the authority's own signed values show confirmed.
    prop_assert_ne!(
        v.get("amount"),
        Some(&json!(FORGED)),
        "{}: forged confirmation shows",
        ctx
    );
    prop_assert_eq!(
        v.get("amount"),
        exp.amount.as_ref(),
        "{}: confirmed amount",
        ctx
    );
    let pending = exp
        .proposals
        .last()
        .map(|(_, val)| json!({ "amount": val }));
    prop_assert_eq!(v.get("_pending"), pending.as_ref(), "{}: _pending", ctx);
    let ids: Vec<ProposalId> = proposals.iter().map(|p| p.id).collect();
    let want: Vec<ProposalId> = exp.proposals.iter().map(|(id, _)| *id).collect();
    prop_assert_eq!(ids, want, "{}: pending proposals", ctx);
    // delete.
    prop_assert_eq!(
        v.get("_deleted"),
        exp.deleted.then_some(&Json::Bool(true)),
        "{}: _deleted",
        ctx
    );
    // Nothing else.
    let allowed = [
        "status",
        "progress",
        "low",
        "stock",
        "tags",
        "notes",
        "title",
        "start",
        "amount",
        "_conflicts",
        "_pending",
        "_deleted",
        "_id",
        "_collection",
    ];
    prop_assert!(
        v.keys().all(|k| allowed.contains(&k.as_str())),
        "{}: unexpected keys in {:?}",
        ctx,
        v
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Setup

fn keypair(seed: u8) -> ed25519::Keypair {
    ed25519::Keypair::from(ed25519::SecretKey::try_from_bytes([seed; 32]).expect("32 bytes"))
}

fn peer_of(kp: &ed25519::Keypair) -> PeerId {
    libp2p_identity::PublicKey::from(kp.public()).to_peer_id()
}

fn entity_id() -> EntityId {
    EntityId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_e001))
}

fn workspace(authority: &ed25519::Keypair) -> Workspace {
    Workspace {
        id: WorkspaceId(Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001)),
        schema: Schema::from_toml(SCHEMA).expect("schema"),
        authority: authority.public(),
    }
}

/// Proposal ids ordered by (counter, tag): distinct across replicas, deterministic.
fn proposal_id(counter: u64, tag: u8) -> ProposalId {
    ProposalId(Uuid::from_u128(
        (u128::from(counter) << 8) | u128::from(tag),
    ))
}

fn fail(ctx: &str, e: Error) -> TestCaseError {
    TestCaseError::fail(format!("{ctx}: {e}"))
}

/// Creates the base entity; its bytes and state.
fn create_base(
    ws: &Workspace,
    coll: &str,
    b: &Base,
) -> Result<(Vec<u8>, BaseState), TestCaseError> {
    let mut patch = Map::new();
    let mut regs = BTreeMap::new();
    let registers = [
        ("status", b.status.map(status_val)),
        ("progress", b.progress.map(half)),
        ("low", b.low.map(half)),
        ("title", b.title.map(title_val)),
        ("start", b.start.map(start_val)),
    ];
    for (f, v) in registers {
        if let Some(v) = &v {
            patch.insert(f.into(), v.clone());
        }
        regs.insert(f, v);
    }
    patch.insert("stock".into(), json!(b.stock));
    patch.insert(
        "tags".into(),
        Json::Array(b.tags.iter().map(|i| elem(*i)).collect()),
    );
    patch.insert("notes".into(), json!(b.notes));
    if let Some(a) = b.amount {
        patch.insert("amount".into(), amount_val(a));
    }
    let patch = Patch::from_json(
        ws.schema.collection(coll).expect("collection"),
        &Json::Object(patch),
    )
    .map_err(|e| fail("base patch", e))?;
    let creator = keypair(0xC0);
    let w = Writer {
        peer: peer_of(&creator),
        user: "creator",
        now_ms: 1,
        authority_key: None,
        delegation: None,
    };
    let mut issued = Vec::new();
    let mut next = || {
        let id = proposal_id(0, 0xF0);
        issued.push(id);
        id
    };
    let mut e = Entity::create(ws, entity_id(), coll, &w, &patch, &mut next)
        .map_err(|e| fail("create", e))?;
    let proposal = b.amount.map(|a| (issued[0], amount_val(a)));
    let state = BaseState {
        regs,
        stock: i64::from(b.stock),
        tags: b.tags.iter().map(|i| ekey(*i)).collect(),
        notes: b.notes.clone(),
        proposal,
    };
    Ok((e.save(), state))
}

struct Replica {
    kp: ed25519::Keypair,
    user: String,
    authority: bool,
    tag: u8,
    counter: u64,
    entity: Entity,
    model: Model,
    /// Each successful step's change, in order.
    steps: Vec<Vec<u8>>,
    incr: Vec<u8>,
    whole: Vec<u8>,
}

/// Runs one replica's steps against its entity and its model.
fn run_steps(
    rep: &mut Replica,
    steps: &[Step],
    ws: &Workspace,
    auth_kp: &ed25519::Keypair,
    coll: &str,
    base: &BaseState,
    update_wins: bool,
) -> Result<(), TestCaseError> {
    let peer = peer_of(&rep.kp);
    let collection = ws.schema.collection(coll).expect("collection");
    for (n, step) in steps.iter().enumerate() {
        let ctx = format!("{} step {n} {step:?}", rep.user);
        let time = match step {
            Step::Update { time, .. } | Step::Delete { time } => *time,
        };
        let w = Writer {
            peer,
            user: &rep.user,
            now_ms: time,
            authority_key: rep.authority.then_some(auth_kp),
            delegation: None,
        };
        let ok = match step {
            Step::Delete { .. } => {
                let res = rep.entity.delete(ws, &w);
                if rep.model.deleted_local {
                    prop_assert!(
                        matches!(res, Err(Error::Deleted(_))),
                        "{}: deleting twice gave {:?}",
                        ctx,
                        res
                    );
                    false
                } else {
                    res.map_err(|e| fail(&ctx, e))?;
                    rep.model.deleted_local = true;
                    rep.model.any_delete = true;
                    rep.model.last_tombstone = Some(true);
                    true
                }
            }
            Step::Update { edits, .. } => {
                // One edit per field: the last one generated.
                let mut by_field: BTreeMap<&str, &Edit> = BTreeMap::new();
                for e in edits {
                    by_field.insert(e.field(), e);
                }
                let json = Json::Object(
                    by_field
                        .iter()
                        .map(|(f, e)| ((*f).to_owned(), e.patch_value()))
                        .collect(),
                );
                let patch =
                    Patch::parse(collection, &json.to_string()).map_err(|e| fail(&ctx, e))?;
                let mut issued = Vec::new();
                let res = {
                    let (counter, tag) = (&mut rep.counter, rep.tag);
                    let mut next = || {
                        *counter += 1;
                        let id = proposal_id(*counter, tag);
                        issued.push(id);
                        id
                    };
                    rep.entity.update(ws, &w, &patch, &mut next)
                };
                if rep.model.deleted_local && !update_wins {
                    prop_assert!(
                        matches!(res, Err(Error::Deleted(_))),
                        "{}: update of a deleted entity gave {:?}",
                        ctx,
                        res
                    );
                    prop_assert!(issued.is_empty());
                    false
                } else {
                    res.map_err(|e| fail(&ctx, e))?;
                    // A device's amount is a proposal unless it changes nothing: null with
                    // nothing confirmed, or a value it already has pending.
                    let device_amount = !rep.authority
                        && by_field.get("amount").is_some_and(|e| {
                            let Edit::Amount(o) = e else { return false };
                            let v = o.map(amount_val).unwrap_or(Json::Null);
                            !v.is_null() && !rep.model.proposals.iter().any(|(_, p)| *p == v)
                        });
                    prop_assert_eq!(
                        issued.len(),
                        usize::from(device_amount),
                        "{}: proposal ids drawn",
                        ctx
                    );
                    for e in by_field.values() {
                        rep.model
                            .apply(e, base, rep.authority, issued.first().copied());
                    }
                    if update_wins {
                        rep.model.deleted_local = false;
                        rep.model.last_tombstone = Some(false);
                    }
                    true
                }
            }
        };
        let chunk = rep.entity.save_incremental();
        if ok {
            if !chunk.is_empty() {
                rep.steps.push(chunk);
            }
        } else {
            prop_assert!(chunk.is_empty(), "{}: a refused write left a change", ctx);
        }
    }
    rep.incr = rep.steps.concat();
    rep.whole = rep.entity.save();
    Ok(())
}

/// Raw Automerge: a device that writes fake confirmations of `amount` on top of `bytes`.
fn forge(bytes: &[u8], forger: &ed25519::Keypair, ws: &Workspace) -> Vec<u8> {
    let mut doc = AutoCommit::load(bytes)
        .expect("load")
        .with_actor(ActorId::from(peer_of(forger).to_bytes()));
    let heads = doc.get_heads();
    let auth = match doc.get(ROOT, "_auth").expect("get") {
        Some((Value::Object(ObjType::Map), o)) => o,
        _ => doc.put_object(ROOT, "_auth", ObjType::Map).expect("put"),
    };
    let per: ObjId = match doc.get(&auth, "amount").expect("get") {
        Some((Value::Object(ObjType::Map), o)) => o,
        _ => doc.put_object(&auth, "amount", ObjType::Map).expect("put"),
    };
    // The genuine records the forger has seen.
    let mut genuine: Vec<Confirmation> = Vec::new();
    for k in doc.keys(&per).collect::<Vec<_>>() {
        if let Ok(Some((Value::Scalar(s), _))) = doc.get(&per, k.as_str()) {
            if let ScalarValue::Str(t) = s.as_ref() {
                genuine.extend(serde_json::from_str::<Confirmation>(t).ok());
            }
        }
    }
    genuine.sort_by_key(|c| c.seq);
    let top = genuine.last().map(|c| c.seq).unwrap_or(0);
    let mut put = |seq: u64, c: &Confirmation| {
        doc.put(&per, seq_key(seq), serde_json::to_string(c).expect("json"))
            .expect("put");
    };
    // 1. Signed with the forger's key, at the next seqs and far ahead.
    for seq in [top + 1, top + 2, top + 1000] {
        put(
            seq,
            &Confirmation::sign(
                forger,
                ws.id,
                entity_id(),
                "amount",
                seq,
                json!(FORGED),
                None,
            ),
        );
    }
    // 2. Junk signature.
    put(
        top + 3,
        &Confirmation {
            seq: top + 3,
            value: json!(FORGED),
            accepts: None,
            sig: "00".repeat(64),
            by: None,
        },
    );
    if let Some(c) = genuine.last() {
        // 3. A genuine record with its value changed, moved to a fresh seq.
        let mut t = c.clone();
        t.value = json!(FORGED);
        t.seq = top + 4;
        put(top + 4, &t);
        // 4. A genuine record replayed unchanged under a higher key.
        put(top + 5, c);
    }
    // 5. The value written straight at the field.
    doc.put(ROOT, "amount", FORGED).expect("put");
    doc.commit();
    doc.save_after(&heads)
}

/// The byte chunks one target receives, in delivery order.
fn deliveries(plan: &Plan, reps: &[Replica], forged: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut pool: Vec<Vec<u8>> = Vec::new();
    for (r, rep) in reps.iter().enumerate() {
        match plan.forms[r] % 3 {
            0 => pool.extend(rep.steps.iter().cloned()),
            1 => pool.push(rep.whole.clone()),
            _ => pool.push(rep.incr.clone()),
        }
    }
    pool.extend(forged.iter().cloned());
    pool.retain(|c| !c.is_empty());
    if !pool.is_empty() {
        for d in &plan.dups {
            let again = pool[usize::from(*d) % pool.len()].clone();
            pool.push(again);
        }
    }
    let mut order: Vec<usize> = (0..pool.len()).collect();
    order.sort_by_key(|&i| (plan.keys[i % plan.keys.len()], i));
    order.into_iter().map(|i| pool[i].clone()).collect()
}

fn state_of(e: &mut Entity, ws: &Workspace) -> Result<fieldsync_core::Derived, TestCaseError> {
    e.derive(ws).map_err(|err| fail("derive", err))
}

/// All targets agree on heads, view, conflicts and proposals, which match `exp`.
fn check_all(
    stage: &str,
    targets: &mut [(String, Entity)],
    ws: &Workspace,
    exp: &Expected,
) -> Result<Map<String, Json>, TestCaseError> {
    let (first_name, first) = &mut targets[0];
    let first_name = first_name.clone();
    let heads = first.heads();
    let fieldsync_core::Derived {
        view,
        conflicts,
        proposals,
        ..
    } = state_of(first, ws)?;
    check(
        &format!("{stage} {first_name}"),
        &view,
        &conflicts,
        &proposals,
        exp,
    )?;
    for (name, e) in targets.iter_mut().skip(1) {
        prop_assert_eq!(
            e.heads(),
            heads.clone(),
            "{} {}: heads differ from {}",
            stage,
            name,
            first_name
        );
        let fieldsync_core::Derived {
            view: v,
            conflicts: c,
            proposals: p,
            ..
        } = state_of(e, ws)?;
        prop_assert_eq!(
            &v,
            &view,
            "{} {}: view differs from {}",
            stage,
            name,
            first_name
        );
        prop_assert_eq!(
            &c,
            &conflicts,
            "{} {}: conflicts differ from {}",
            stage,
            name,
            first_name
        );
        prop_assert_eq!(
            &p,
            &proposals,
            "{} {}: proposals differ from {}",
            stage,
            name,
            first_name
        );
    }
    Ok(view)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The properties

fn run(case: Case) -> Result<(), TestCaseError> {
    let auth_kp = keypair(0xA0);
    let ws = workspace(&auth_kp);
    let coll = if case.update_wins { "shifts" } else { "items" };
    let (base_bytes, base) = create_base(&ws, coll, &case.base)?;
    let id = entity_id();
    let load = || Entity::load(id, &base_bytes, &[]).map_err(|e| fail("load base", e));

    // Concurrent edits: every replica starts from the base and sees nobody else.
    let mut reps: Vec<Replica> = Vec::new();
    for (i, steps) in case.replicas.iter().enumerate() {
        let authority = i == 0 && case.authority_replica;
        let mut rep = Replica {
            kp: if authority {
                auth_kp.clone()
            } else {
                keypair(1 + i as u8)
            },
            user: format!("replica{i}"),
            authority,
            tag: 1 + i as u8,
            counter: 0,
            entity: load()?,
            model: Model::default(),
            steps: vec![],
            incr: vec![],
            whole: vec![],
        };
        prop_assert!(
            rep.entity.save_incremental().is_empty(),
            "a loaded entity has nothing new"
        );
        run_steps(
            &mut rep,
            steps,
            &ws,
            &auth_kp,
            coll,
            &base,
            case.update_wins,
        )?;
        // Alone, a replica shows its own writes under the same rules.
        let own = expect(&base, &[&rep.model], case.update_wins);
        let fieldsync_core::Derived {
            view: v,
            conflicts: c,
            proposals: p,
            ..
        } = state_of(&mut rep.entity, &ws)?;
        check(&format!("{} alone", rep.user), &v, &c, &p, &own)?;
        reps.push(rep);
    }

    // Forgers: one on the base, one on top of the authority's confirmations.
    let mut forged = vec![forge(&base_bytes, &keypair(0xE1), &ws)];
    if case.authority_replica {
        forged.push(forge(&reps[0].whole, &keypair(0xE2), &ws));
    }

    let models: Vec<&Model> = reps.iter().map(|r| &r.model).collect();
    let exp = expect(&base, &models, case.update_wins);

    // Every replica takes in everyone's changes; fresh copies of the base too.
    let plans: Vec<Vec<Vec<u8>>> = case
        .plans
        .iter()
        .map(|p| deliveries(p, &reps, &forged))
        .collect();
    let mut targets: Vec<(String, Entity)> = Vec::new();
    for (i, plan) in plans.iter().enumerate().skip(4) {
        let mut e = load()?;
        for chunk in plan {
            e.merge_bytes(chunk).map_err(|err| fail("merge", err))?;
        }
        targets.push((format!("copy{i}"), e));
    }
    // Grouped: all whole saves and forgeries as one blob.
    let mut blob: Vec<u8> = Vec::new();
    let shift = usize::from(case.plans[0].keys[0]) % reps.len();
    for r in 0..reps.len() {
        blob.extend(&reps[(r + shift) % reps.len()].whole);
    }
    forged.iter().rev().for_each(|f| blob.extend(f));
    let mut grouped = load()?;
    prop_assert!(
        grouped
            .merge_bytes(&blob)
            .map_err(|e| fail("merge blob", e))?,
        "the blob brings changes"
    );
    targets.push(("grouped".into(), grouped));
    // Loaded: the base snapshot plus every incremental save, as storage would.
    let mut appended: Vec<Vec<u8>> = reps.iter().map(|r| r.incr.clone()).collect();
    appended.extend(forged.iter().cloned());
    targets.push((
        "loaded".into(),
        Entity::load(id, &base_bytes, &appended).map_err(|e| fail("load with changes", e))?,
    ));
    for (i, rep) in reps.into_iter().enumerate() {
        let mut e = rep.entity;
        for chunk in &plans[i] {
            e.merge_bytes(chunk).map_err(|err| fail("merge", err))?;
        }
        targets.push((rep.user, e));
    }

    let view = check_all("merged", &mut targets, &ws, &exp)?;

    // Settling, on the first copy: the authority accepts one proposal, a person resolves start.
    let mut exp2 = exp.clone();
    let (_, settler) = &mut targets[0];
    settler.save_incremental();
    if !exp.proposals.is_empty() {
        let (pick, value) =
            exp.proposals[usize::from(case.accept_pick) % exp.proposals.len()].clone();
        let w = Writer {
            peer: peer_of(&auth_kp),
            user: "office",
            now_ms: 2,
            authority_key: Some(&auth_kp),
            delegation: None,
        };
        let device = Writer {
            authority_key: None,
            delegation: None,
            ..w.clone()
        };
        prop_assert!(
            matches!(
                settler.accept(&ws, &device, pick, "accept"),
                Err(Error::NotAuthority)
            ),
            "a device cannot accept"
        );
        settler
            .accept(&ws, &w, pick, "accept")
            .map_err(|e| fail("accept", e))?;
        exp2.amount = Some(value.clone()).filter(|v| !v.is_null());
        // Settled: the accepted one, older ones, and any equal to the confirmed value.
        exp2.proposals.retain(|(id, v)| *id > pick && *v != value);
    }
    let start_conflict = settler
        .conflicts(&ws)
        .into_iter()
        .find(|c| c.field == "start");
    prop_assert_eq!(start_conflict.is_some(), exp.regs["start"].len() >= 2);
    if let Some(c) = start_conflict {
        let to = start_val(case.resolve_to);
        let resolver = keypair(0xD0);
        let w = Writer {
            peer: peer_of(&resolver),
            user: "resolver",
            now_ms: 3,
            authority_key: None,
            delegation: None,
        };
        let res = settler.resolve(&ws, &w, &c.id, &to);
        if exp.deleted && !case.update_wins {
            prop_assert!(
                matches!(res, Err(Error::Deleted(_))),
                "resolving on a deleted delete_wins entity gave {:?}",
                res
            );
        } else {
            res.map_err(|e| fail("resolve", e))?;
            prop_assert!(
                matches!(
                    settler.resolve(&ws, &w, &c.id, &to),
                    Err(Error::NotFound(_))
                ),
                "a resolved conflict is gone"
            );
            exp2.regs.insert("start", vec![to]);
            // Resolving writes the entity, which revives an update_wins one.
            exp2.deleted = false;
        }
    }
    let delta = settler.save_incremental();
    if delta.is_empty() {
        prop_assert_eq!(&view, &targets[0].1.view(&ws).map_err(|e| fail("view", e))?);
        return Ok(());
    }
    for (name, e) in targets.iter_mut().skip(1) {
        prop_assert!(
            e.merge_bytes(&delta)
                .map_err(|err| fail("merge delta", err))?,
            "{}: the settlement is new",
            name
        );
        prop_assert!(
            !e.merge_bytes(&delta)
                .map_err(|err| fail("merge delta", err))?,
            "{}: merging twice changes nothing",
            name
        );
    }
    check_all("settled", &mut targets, &ws, &exp2)?;
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Random concurrent edits on 2–4 replicas, merged in random orders with duplicates:
    /// identical views everywhere, and every rule's promise holds.
    #[test]
    fn replicas_converge_and_rules_keep_their_promises(case in case()) {
        run(case)?;
    }

    /// A delete concurrent with updates: `delete_wins` stays deleted, `update_wins` revives;
    /// an update that has seen the delete is refused (`delete_wins`) or revives (`update_wins`).
    #[test]
    fn delete_against_concurrent_update(
        update_wins in any::<bool>(),
        before_delete in prop::collection::vec(prop::collection::vec(edit(), 1..3), 0..3),
        other in prop::collection::vec(prop::collection::vec(edit(), 1..3), 1..3),
        deleter_first in any::<bool>(),
        dup in any::<bool>(),
    ) {
        let auth_kp = keypair(0xA0);
        let ws = workspace(&auth_kp);
        let coll = if update_wins { "shifts" } else { "items" };
        let base = Base { status: None, progress: None, low: None, stock: 0, tags: vec![], notes: String::new(), title: None, start: None, amount: None };
        let (base_bytes, state) = create_base(&ws, coll, &base)?;
        let id = entity_id();
        let mk = |i: u8| Replica {
            kp: keypair(i), user: format!("r{i}"), authority: false, tag: i, counter: 0,
            entity: Entity::load(id, &base_bytes, &[]).expect("load"),
            model: Model::default(), steps: vec![], incr: vec![], whole: vec![],
        };
        let mut a_steps: Vec<Step> = before_delete.into_iter().map(|edits| Step::Update { edits, time: 5 }).collect();
        a_steps.push(Step::Delete { time: 6 });
        let b_steps: Vec<Step> = other.into_iter().map(|edits| Step::Update { edits, time: 5 }).collect();
        let mut a = mk(1);
        let mut b = mk(2);
        run_steps(&mut a, &a_steps, &ws, &auth_kp, coll, &state, update_wins)?;
        run_steps(&mut b, &b_steps, &ws, &auth_kp, coll, &state, update_wins)?;

        let mut merged = Entity::load(id, &base_bytes, &[]).map_err(|e| fail("load", e))?;
        let mut order = vec![&a.incr, &b.incr];
        if !deleter_first { order.reverse(); }
        if dup { order.push(order[0]); }
        for chunk in order { merged.merge_bytes(chunk).map_err(|e| fail("merge", e))?; }
        let v = merged.view(&ws).map_err(|e| fail("view", e))?;
        let want_deleted = !update_wins;
        prop_assert_eq!(v.get("_deleted"), want_deleted.then_some(&Json::Bool(true)), "concurrent delete and update ({})", coll);
        let exp = expect(&state, &[&a.model, &b.model], update_wins);
        prop_assert_eq!(exp.deleted, want_deleted);
        let (c, p) = (merged.conflicts(&ws), merged.proposals(&ws));
        check("delete vs update", &v, &c, &p, &exp)?;

        // An update that has seen only the delete.
        let mut after = Entity::load(id, &base_bytes, &[a.incr.clone()]).map_err(|e| fail("load", e))?;
        let w = Writer { peer: peer_of(&keypair(3)), user: "r3", now_ms: 7, authority_key: None, delegation: None };
        let patch = Patch::parse(ws.schema.collection(coll).expect("collection"), r#"{"title":"late"}"#).map_err(|e| fail("patch", e))?;
        let res = after.update(&ws, &w, &patch, &mut || proposal_id(1, 3));
        if update_wins {
            res.map_err(|e| fail("update after delete", e))?;
            let late = after.save_incremental();
            merged.merge_bytes(&late).map_err(|e| fail("merge", e))?;
            let v = merged.view(&ws).map_err(|e| fail("view", e))?;
            prop_assert_eq!(v.get("_deleted"), None, "update_wins: an update after the delete revives");
        } else {
            prop_assert!(matches!(res, Err(Error::Deleted(_))), "delete_wins: an update after the delete is refused: {:?}", res);
        }
    }
}

fn set_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        elems().prop_map(Edit::Add),
        elems().prop_map(Edit::Remove),
        elems().prop_map(Edit::Tags)
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Add-wins, including re-adding an element the adder already has: an element added on
    /// one replica and removed concurrently on another stays.
    #[test]
    fn set_add_wins_against_concurrent_remove(
        update_wins in any::<bool>(),
        base_tags in elems(),
        x in 0u8..ALPHABET as u8,
        a_before in prop::collection::vec(set_edit(), 0..3),
        b_before in prop::collection::vec(set_edit(), 0..3),
        a_first in any::<bool>(),
    ) {
        let auth_kp = keypair(0xA0);
        let ws = workspace(&auth_kp);
        let coll = if update_wins { "shifts" } else { "items" };
        let base = Base { status: None, progress: None, low: None, stock: 0, tags: base_tags, notes: String::new(), title: None, start: None, amount: None };
        let (base_bytes, state) = create_base(&ws, coll, &base)?;
        let id = entity_id();
        let mut reps = Vec::new();
        for (i, (mut before, last)) in [(a_before, Edit::Add(vec![x])), (b_before, Edit::Remove(vec![x]))].into_iter().enumerate() {
            before.push(last);
            let steps: Vec<Step> = before.into_iter().map(|e| Step::Update { edits: vec![e], time: 9 }).collect();
            let mut rep = Replica {
                kp: keypair(1 + i as u8), user: format!("r{i}"), authority: false, tag: 1 + i as u8, counter: 0,
                entity: Entity::load(id, &base_bytes, &[]).map_err(|e| fail("load", e))?,
                model: Model::default(), steps: vec![], incr: vec![], whole: vec![],
            };
            run_steps(&mut rep, &steps, &ws, &auth_kp, coll, &state, update_wins)?;
            reps.push(rep);
        }
        let mut merged = Entity::load(id, &base_bytes, &[]).map_err(|e| fail("load", e))?;
        let order = if a_first { [0, 1] } else { [1, 0] };
        for r in order {
            merged.merge_bytes(&reps[r].incr).map_err(|e| fail("merge", e))?;
        }
        let v = merged.view(&ws).map_err(|e| fail("view", e))?;
        let tags = v.get("tags").and_then(Json::as_array).cloned().unwrap_or_default();
        prop_assert!(tags.contains(&elem(x)), "{} added on one replica and removed on the other must stay: {:?}", elem(x), tags);
        let exp = expect(&state, &[&reps[0].model, &reps[1].model], update_wins);
        check("add vs remove", &v, &merged.conflicts(&ws), &merged.proposals(&ws), &exp)?;
    }
}
