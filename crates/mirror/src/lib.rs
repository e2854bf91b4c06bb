//! fieldsync-mirror: a relay's store, mirrored into PostgreSQL, and back-office writes
//! taken from an outbox table.
//!
//! **Out.** Each collection gets a table (see [`table_ddl`]): `id`, a typed column per
//! declared field where the rule fixes a type, the whole `view` as jsonb, `deleted`,
//! `heads`, `feed_seq` and `updated_at`. Rows are upserted from the relay's changes feed,
//! and the mirror's position (`fieldsync_mirror`) moves in the same transaction, so a crash
//! of either side neither loses nor applies a change twice: the mirror resumes from the
//! position it committed. Re-applying a row is harmless anyway (an upsert of a view).
//!
//! **In.** Back-office code inserts into `fieldsync_outbox`; the relay takes pending rows
//! with `FOR UPDATE SKIP LOCKED` (several relays may share one database), applies each as
//! a write of this node through the normal rules — with an operation id (`op_id`, or
//! `outbox-<seq>`), so a row applied again after a crash, or by a second relay, has one
//! effect — and records the outcome in the row, in the same transaction. A trigger's
//! `NOTIFY` wakes the relay at once; without it the relay still polls every second.
//!
//! Connection loss and PostgreSQL restarts are met with backoff and a retry of the whole
//! batch; nothing is skipped. A schema version adopted while the mirror runs adds its
//! tables and columns before the next batch.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldsync::core::purge::{PurgeRecord, PURGES, RECORD};
use fieldsync::core::schema::{Collection, Rule};
use fieldsync::{ErrorKind, Replica};
use serde_json::{json, Value};
use tokio_postgres::{Client, NoTls};

/// Feed entries per mirror transaction.
pub const MIRROR_BATCH: usize = 500;
/// Outbox rows per transaction.
pub const OUTBOX_BATCH: i64 = 50;
/// How often the outbox is polled when no `NOTIFY` arrives.
const OUTBOX_POLL: Duration = Duration::from_secs(1);
/// How often the store's feed head is checked for changes to mirror.
const FEED_POLL: Duration = Duration::from_millis(100);
/// While catching up, the lag is logged this often.
const LAG_LOG_EVERY: Duration = Duration::from_secs(5);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Which database, and table names.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// A libpq-style URL or key=value string, e.g. `postgres://user@127.0.0.1:5432/office`.
    pub url: String,
    /// Table per collection, where it is not the collection's own name.
    pub tables: BTreeMap<String, String>,
}

/// What the mirror reports (in `/v1/status`, `/metrics` and the log).
#[derive(Debug, Default)]
pub struct MirrorState {
    /// The feed position committed in PostgreSQL.
    pub mirrored_seq: AtomicU64,
    pub connected: AtomicBool,
    pub rows_mirrored: AtomicU64,
    pub outbox_applied: AtomicU64,
    pub outbox_failed: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl MirrorState {
    /// The status object: position, lag behind the store's feed head, connection.
    pub fn report(&self, feed_head: u64) -> Value {
        let mirrored = self.mirrored_seq.load(Ordering::Relaxed);
        json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "mirrored_seq": mirrored,
            "feed_seq": feed_head,
            "lag": feed_head.saturating_sub(mirrored),
            "rows_mirrored": self.rows_mirrored.load(Ordering::Relaxed),
            "outbox_applied": self.outbox_applied.load(Ordering::Relaxed),
            "outbox_failed": self.outbox_failed.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().map(|e| e.clone()).unwrap_or_default(),
        })
    }
}

/// A mirror failure: the batch is rolled back and retried after a backoff.
#[derive(Debug)]
pub struct MirrorError(String);

impl std::fmt::Display for MirrorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MirrorError {}

impl From<tokio_postgres::Error> for MirrorError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's message (e.g. "relation … does not exist") is in the source.
        match e.as_db_error() {
            Some(db) => MirrorError(format!("postgres: {}", db.message())),
            None => MirrorError(format!("postgres: {e}")),
        }
    }
}

impl From<fieldsync::core::Error> for MirrorError {
    fn from(e: fieldsync::core::Error) -> Self {
        MirrorError(format!("schema: {e}"))
    }
}

impl From<fieldsync::Error> for MirrorError {
    fn from(e: fieldsync::Error) -> Self {
        MirrorError(format!("store: {e}"))
    }
}

/// Quotes an SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The columns every mirror table has; a field with one of these names gets `<name>_field`.
const FIXED_COLUMNS: [&str; 6] = ["id", "view", "deleted", "heads", "feed_seq", "updated_at"];

/// One typed column taken from the view.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// SQL type: text, numeric or jsonb.
    pub sql_type: &'static str,
    /// The SQL expression that takes it from the view (parameter `$2`, jsonb).
    pub from_view: String,
}

/// The typed columns of a collection's table: rank and text → text; max, min and
/// counter → numeric; set, lww and manual → jsonb; authority → the confirmed value as
/// jsonb plus `<field>_pending` jsonb. A value that does not have the column's type (not
/// possible through the rules, but an old value may) is NULL there and stays in `view`.
pub fn columns(collection: &Collection) -> Vec<Column> {
    let mut taken: BTreeSet<String> = FIXED_COLUMNS.iter().map(|c| (*c).to_owned()).collect();
    let mut unique = |wanted: String| {
        let mut name = wanted;
        while taken.contains(&name) {
            name.push_str("_field");
        }
        taken.insert(name.clone());
        name
    };
    let mut out = Vec::new();
    for (field, spec) in &collection.fields {
        let path = format!("$2::jsonb -> {}", literal(field));
        let typed = |kind: &str, cast: &str| {
            format!(
                "CASE WHEN jsonb_typeof({path}) = '{kind}' THEN ($2::jsonb ->> {}){cast} END",
                literal(field)
            )
        };
        let (sql_type, from_view) = match spec.rule {
            Rule::Rank { .. } | Rule::Text => ("text", typed("string", "")),
            Rule::Max | Rule::Min | Rule::Counter => ("numeric", typed("number", "::numeric")),
            // (lww, manual, set, authority, and any rule added later)
            _ => ("jsonb", path.clone()),
        };
        out.push(Column {
            name: unique(field.clone()),
            sql_type,
            from_view,
        });
        if spec.rule == Rule::Authority {
            out.push(Column {
                name: unique(format!("{field}_pending")),
                sql_type: "jsonb",
                from_view: format!("$2::jsonb -> '_pending' -> {}", literal(field)),
            });
        }
    }
    out
}

/// An SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `CREATE TABLE IF NOT EXISTS` for a collection's table, then for each typed column
/// `ADD COLUMN IF NOT EXISTS` and, when the column is new to the table (`existing` lacks
/// it), an `UPDATE` that fills it from each row's `view` — so a table made under an older
/// schema gains columns, filled, and never loses any.
pub fn table_ddl(table: &str, collection: &Collection, existing: &BTreeSet<String>) -> Vec<String> {
    let t = ident(table);
    let mut out = vec![format!(
        "CREATE TABLE IF NOT EXISTS {t} (id uuid PRIMARY KEY, view jsonb NOT NULL, deleted boolean NOT NULL DEFAULT false, \
         heads text NOT NULL, feed_seq bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())"
    )];
    for c in columns(collection) {
        out.push(format!(
            "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {} {}",
            ident(&c.name),
            c.sql_type
        ));
        if !existing.is_empty() && !existing.contains(&c.name) {
            out.push(format!(
                "UPDATE {t} SET {} = {}",
                ident(&c.name),
                c.from_view.replace("$2::jsonb", "view")
            ));
        }
    }
    out
}

/// The upsert of one row: `$1` id, `$2` view (jsonb), `$3` deleted, `$4` heads, `$5`
/// feed seq. A row that already has these heads and this view is left alone (a new schema
/// version changes views without changing heads).
pub fn upsert_sql(table: &str, collection: &Collection) -> String {
    let t = ident(table);
    let cols = columns(collection);
    let names: Vec<String> = cols.iter().map(|c| ident(&c.name)).collect();
    let values: Vec<&str> = cols.iter().map(|c| c.from_view.as_str()).collect();
    let mut insert_cols = vec![
        "id".to_owned(),
        "view".into(),
        "deleted".into(),
        "heads".into(),
        "feed_seq".into(),
        "updated_at".into(),
    ];
    insert_cols.extend(names.iter().cloned());
    let mut insert_values = vec![
        "$1".to_owned(),
        "$2::jsonb".into(),
        "$3".into(),
        "$4".into(),
        "$5".into(),
        "now()".into(),
    ];
    insert_values.extend(values.iter().map(|v| (*v).to_owned()));
    let updates: Vec<String> = insert_cols
        .iter()
        .skip(1)
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    format!(
        "INSERT INTO {t} ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET {} WHERE {t}.heads IS DISTINCT FROM EXCLUDED.heads OR {t}.view IS DISTINCT FROM EXCLUDED.view",
        insert_cols.join(", "),
        insert_values.join(", "),
        updates.join(", ")
    )
}

/// The tables, checkpoint and outbox the mirror needs (idempotent).
const SETUP_SQL: &str = r#"
CREATE TABLE IF NOT EXISTS fieldsync_mirror (
    relay text PRIMARY KEY,
    feed_seq bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS fieldsync_outbox (
    seq bigserial PRIMARY KEY,
    action text NOT NULL DEFAULT 'put' CHECK (action IN ('put', 'delete', 'accept', 'reject')),
    collection text,
    entity_id uuid,
    patch jsonb,
    proposal_id uuid,
    op_id text,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'applied', 'failed')),
    error text,
    result_id uuid,
    applied_by text,
    created_at timestamptz NOT NULL DEFAULT now(),
    applied_at timestamptz
);
CREATE TABLE IF NOT EXISTS fieldsync_proposals (
    id uuid PRIMARY KEY,
    collection text NOT NULL,
    entity_id uuid NOT NULL,
    field text NOT NULL,
    value jsonb,
    peer text NOT NULL,
    "user" text NOT NULL,
    time_ms bigint NOT NULL,
    op_id text
);
CREATE INDEX IF NOT EXISTS fieldsync_proposals_entity ON fieldsync_proposals (entity_id);
CREATE INDEX IF NOT EXISTS fieldsync_outbox_pending ON fieldsync_outbox (seq) WHERE status = 'pending';
CREATE OR REPLACE FUNCTION fieldsync_outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('fieldsync_outbox', NEW.seq::text);
    RETURN NEW;
END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS fieldsync_outbox_notify ON fieldsync_outbox;
CREATE TRIGGER fieldsync_outbox_notify AFTER INSERT ON fieldsync_outbox
    FOR EACH ROW EXECUTE FUNCTION fieldsync_outbox_notify();
"#;

/// The table name of each collection of the replica's schema: as configured, else the
/// collection's name (built-in ones, such as the member list `_members` and the schema
/// versions `_schemas`, go to `fieldsync_members`, `fieldsync_schemas`).
fn tables(replica: &Replica, config: &MirrorConfig) -> BTreeMap<String, String> {
    let default = |c: &str| match c {
        fieldsync::core::membership::MEMBERS => "fieldsync_members".to_owned(),
        c if c.starts_with('_') => format!("fieldsync{c}"),
        c => c.to_owned(),
    };
    replica
        .workspace()
        .schema
        .collections
        .keys()
        .map(|c| {
            (
                c.clone(),
                config.tables.get(c).cloned().unwrap_or_else(|| default(c)),
            )
        })
        .collect()
}

/// Creates (or extends) every table. Serialised across relays by an advisory lock: two
/// relays starting at once would otherwise race on `CREATE TABLE IF NOT EXISTS`.
pub async fn setup(
    client: &mut Client,
    replica: &Replica,
    config: &MirrorConfig,
) -> Result<(), MirrorError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7346199)", &[])
        .await?;
    tx.batch_execute(SETUP_SQL).await?;
    for (collection, table) in tables(replica, config) {
        let ws = replica.workspace();
        let spec = ws.schema.collection(&collection)?;
        let existing: BTreeSet<String> = tx
            .query("SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1", &[&table])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for ddl in table_ddl(&table, spec, &existing) {
            tx.batch_execute(&ddl).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Runs a blocking store call off the async threads.
async fn blocking<T: Send + 'static>(
    replica: &Arc<Replica>,
    f: impl FnOnce(&Replica) -> Result<T, fieldsync::Error> + Send + 'static,
) -> Result<T, MirrorError> {
    let replica = replica.clone();
    tokio::task::spawn_blocking(move || f(&replica))
        .await
        .map_err(|e| MirrorError(format!("store task: {e}")))?
        .map_err(Into::into)
}

/// Mirrors one batch of the feed after the committed position. Returns how many entries
/// it mirrored (0: caught up).
pub async fn mirror_batch(
    client: &mut Client,
    replica: &Arc<Replica>,
    config: &MirrorConfig,
    state: &MirrorState,
) -> Result<usize, MirrorError> {
    let relay = replica.peer_id().to_string();
    let tables = tables(replica, config);
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO fieldsync_mirror (relay) VALUES ($1) ON CONFLICT (relay) DO NOTHING",
        &[&relay],
    )
    .await?;
    // Locked, so a `mirror rebuild` (which resets it) waits for this batch, and the batch
    // continues from whatever was committed last — by this process or one before it.
    let since: i64 = tx
        .query_one(
            "SELECT feed_seq FROM fieldsync_mirror WHERE relay = $1 FOR UPDATE",
            &[&relay],
        )
        .await?
        .get(0);
    let since = u64::try_from(since).unwrap_or(0);
    let changes = blocking(replica, move |r| r.changes(since, MIRROR_BATCH)).await?;
    let Some(last) = changes.last().map(|c| c.seq) else {
        tx.commit().await?;
        state.mirrored_seq.store(since, Ordering::Relaxed);
        return Ok(0);
    };
    let mut statements = BTreeMap::new();
    let mut rows = Vec::with_capacity(changes.len());
    for change in &changes {
        let Some(table) = tables.get(&change.collection) else {
            return Err(MirrorError(format!(
                "entity {} is in collection {:?}, which the schema lacks",
                change.id, change.collection
            )));
        };
        if !statements.contains_key(table) {
            let ws = replica.workspace();
            let spec = ws.schema.collection(&change.collection)?;
            statements.insert(table.clone(), tx.prepare(&upsert_sql(table, spec)).await?);
        }
        let view = Value::Object(change.view.clone());
        let seq = i64::try_from(change.seq).unwrap_or(i64::MAX);
        let id = uuid::Uuid::from_bytes(*change.id.as_bytes());
        rows.push((
            statements[table].clone(),
            id,
            view,
            change.deleted,
            change.heads.join(","),
            seq,
        ));
    }
    // Sent together: tokio-postgres pipelines concurrent queries on one connection, so the
    // batch costs about one round trip instead of one per row.
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let params: Vec<[Param<'_>; 5]> = rows
        .iter()
        .map(|(_, id, view, deleted, heads, seq)| [id as Param<'_>, view, deleted, heads, seq])
        .collect();
    futures::future::try_join_all(
        rows.iter()
            .zip(&params)
            .map(|((statement, ..), params)| tx.execute(statement, params)),
    )
    .await?;
    // Purged entities leave the mirror too: the relay dropped them whole, so their rows
    // (and proposals) must not outlive them in the office's database.
    let mut purged = Vec::new();
    for change in changes.iter().filter(|c| c.collection == PURGES) {
        let Some(text) = change.view.get(RECORD).and_then(Value::as_str) else {
            continue; // a tombstone of the record entity itself
        };
        match PurgeRecord::parse(text) {
            Ok(record) => purged.push(record),
            // The relay stores only records it verified; one it cannot read is reported.
            Err(e) => {
                tracing::warn!(entity = %change.id, "a purge record the mirror cannot read: {e}")
            }
        }
    }
    for record in &purged {
        if let Some(table) = tables.get(&record.collection) {
            let id = uuid::Uuid::from_bytes(*record.entity.as_bytes());
            tx.execute(
                &format!("DELETE FROM {} WHERE id = $1", ident(table)),
                &[&id],
            )
            .await?;
        }
    }
    // The pending proposals of the entities in this batch, as they are now (so the office
    // can accept or reject them through the outbox by id); a purged entity has none left.
    let entities: Vec<uuid::Uuid> = changes
        .iter()
        .map(|c| c.id)
        .chain(purged.iter().map(|r| r.entity))
        .map(|id| uuid::Uuid::from_bytes(*id.as_bytes()))
        .collect();
    let wanted: BTreeSet<uuid::Uuid> = entities.iter().copied().collect();
    let proposals = blocking(replica, |r| r.pending_proposals()).await?;
    tx.execute(
        "DELETE FROM fieldsync_proposals WHERE entity_id = ANY($1)",
        &[&entities],
    )
    .await?;
    let insert = tx
        .prepare("INSERT INTO fieldsync_proposals (id, collection, entity_id, field, value, peer, \"user\", time_ms, op_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING")
        .await?;
    for p in proposals {
        let entity = uuid::Uuid::from_bytes(*p.entity.as_bytes());
        if !wanted.contains(&entity) {
            continue;
        }
        let id = uuid::Uuid::parse_str(&p.id.to_string())
            .map_err(|e| MirrorError(format!("proposal id {}: {e}", p.id)))?;
        let r = &p.record;
        tx.execute(
            &insert,
            &[
                &id,
                &p.collection,
                &entity,
                &r.field,
                &r.value,
                &r.peer,
                &r.user,
                &r.time_ms,
                &r.op,
            ],
        )
        .await?;
    }
    let last_i64 = i64::try_from(last).unwrap_or(i64::MAX);
    tx.execute(
        "UPDATE fieldsync_mirror SET feed_seq = $2, updated_at = now() WHERE relay = $1",
        &[&relay, &last_i64],
    )
    .await?;
    tx.commit().await?;
    state.mirrored_seq.store(last, Ordering::Relaxed);
    state
        .rows_mirrored
        .fetch_add(changes.len() as u64, Ordering::Relaxed);
    Ok(changes.len())
}

/// One outbox row's outcome: applied (with the entity it wrote) or failed (with why).
enum Outcome {
    Applied(Option<uuid::Uuid>),
    Failed(String),
}

/// A pending row of `fieldsync_outbox`.
struct OutboxRow {
    seq: i64,
    action: String,
    collection: Option<String>,
    entity: Option<uuid::Uuid>,
    patch: Option<String>,
    proposal: Option<uuid::Uuid>,
    op_id: Option<String>,
}

/// Applies one outbox row through the replica. Bad input (an unknown collection, a patch
/// that does not fit the schema, an unknown proposal…) fails the row; a store failure
/// fails the batch, which is retried.
fn apply_row(r: &Replica, row: OutboxRow) -> Result<Outcome, fieldsync::Error> {
    let OutboxRow {
        seq,
        action,
        collection,
        entity,
        patch,
        proposal,
        op_id,
    } = row;
    let action = action.as_str();
    let op_text = op_id.unwrap_or_else(|| format!("outbox-{seq}"));
    let op: fieldsync::OpId = match op_text.parse() {
        Ok(op) => op,
        Err(e) => return Ok(Outcome::Failed(format!("op_id: {e}"))),
    };
    let entity = entity.map(|u| fieldsync::EntityId::from_bytes(*u.as_bytes()));
    let result = match action {
        "put" | "delete" => {
            let Some(collection) = collection else {
                return Ok(Outcome::Failed(format!("{action} needs a collection")));
            };
            if action == "put" {
                let Some(patch) = patch else {
                    return Ok(Outcome::Failed("put needs a patch".into()));
                };
                r.put_op(&collection, entity, &patch, Some(&op))
                    .map(|(id, _)| Some(id))
            } else {
                let Some(id) = entity else {
                    return Ok(Outcome::Failed("delete needs an entity_id".into()));
                };
                r.delete_op(&collection, id, Some(&op)).map(|_| Some(id))
            }
        }
        "accept" | "reject" => {
            let Some(proposal) = proposal else {
                return Ok(Outcome::Failed(format!("{action} needs a proposal_id")));
            };
            let pid: fieldsync::ProposalId = match proposal.to_string().parse() {
                Ok(p) => p,
                Err(e) => return Ok(Outcome::Failed(format!("proposal_id: {e}"))),
            };
            if action == "accept" {
                r.accept(pid)
            } else {
                r.reject(pid)
            }
            .map(Some)
        }
        other => return Ok(Outcome::Failed(format!("unknown action {other:?}"))),
    };
    match result {
        Ok(id) => Ok(Outcome::Applied(
            id.map(|id| uuid::Uuid::from_bytes(*id.as_bytes())),
        )),
        Err(e)
            if matches!(e.kind(), ErrorKind::Invalid | ErrorKind::NotFound)
                || matches!(
                    e,
                    fieldsync::Error::AuthorityOnly(_) | fieldsync::Error::Refused(_)
                ) =>
        {
            Ok(Outcome::Failed(e.to_string()))
        }
        Err(e) => Err(e),
    }
}

/// Applies one batch of pending outbox rows. Returns how many it took.
pub async fn drain_outbox(
    client: &mut Client,
    replica: &Arc<Replica>,
    state: &MirrorState,
    on_change: &(dyn Fn() + Send + Sync),
) -> Result<usize, MirrorError> {
    let relay = replica.peer_id().to_string();
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT seq, action, collection, entity_id, patch::text, proposal_id, op_id FROM fieldsync_outbox \
             WHERE status = 'pending' ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&OUTBOX_BATCH],
        )
        .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    for row in &rows {
        let seq: i64 = row.get(0);
        let pending = OutboxRow {
            seq,
            action: row.get(1),
            collection: row.get(2),
            entity: row.get(3),
            patch: row.get(4),
            proposal: row.get(5),
            op_id: row.get(6),
        };
        let outcome = blocking(replica, move |r| apply_row(r, pending)).await?;
        match outcome {
            Outcome::Applied(id) => {
                tx.execute("UPDATE fieldsync_outbox SET status = 'applied', error = NULL, result_id = $2, applied_by = $3, applied_at = now() WHERE seq = $1", &[&seq, &id, &relay]).await?;
                state.outbox_applied.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed(error) => {
                tracing::warn!(seq, %error, "outbox row failed");
                tx.execute("UPDATE fieldsync_outbox SET status = 'failed', error = $2, applied_by = $3, applied_at = now() WHERE seq = $1", &[&seq, &error, &relay]).await?;
                state.outbox_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    tx.commit().await?;
    on_change();
    Ok(rows.len())
}

/// Empties every mirror table and resets this relay's position, in one transaction: the
/// running (or next) mirror re-creates every row from the store.
pub async fn rebuild(
    client: &mut Client,
    replica: &Replica,
    config: &MirrorConfig,
) -> Result<usize, MirrorError> {
    setup(client, replica, config).await?;
    let tx = client.transaction().await?;
    let relay = replica.peer_id().to_string();
    tx.execute(
        "INSERT INTO fieldsync_mirror (relay) VALUES ($1) ON CONFLICT (relay) DO NOTHING",
        &[&relay],
    )
    .await?;
    tx.execute(
        "SELECT feed_seq FROM fieldsync_mirror WHERE relay = $1 FOR UPDATE",
        &[&relay],
    )
    .await?;
    let tables = tables(replica, config);
    for table in tables.values() {
        tx.batch_execute(&format!("TRUNCATE {}", ident(table)))
            .await?;
    }
    tx.execute(
        "UPDATE fieldsync_mirror SET feed_seq = 0, updated_at = now() WHERE relay = $1",
        &[&relay],
    )
    .await?;
    tx.commit().await?;
    Ok(tables.len())
}

/// Connects; the connection's messages (notifications) drive `wake`.
pub async fn connect(
    url: &str,
    wake: Option<Arc<tokio::sync::Notify>>,
) -> Result<Client, MirrorError> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        use futures::StreamExt as _;
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    if let Some(w) = &wake {
                        w.notify_one();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "postgres connection closed");
                    break;
                }
            }
        }
    });
    Ok(client)
}

/// Mirrors and drains until `shutdown` resolves, reconnecting with backoff after any
/// failure (nothing is skipped: the failed batch is retried).
pub async fn run(
    replica: Arc<Replica>,
    config: MirrorConfig,
    state: Arc<MirrorState>,
    on_change: Arc<dyn Fn() + Send + Sync>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(250);
    loop {
        let session = session(&replica, &config, &state, on_change.as_ref(), &mut backoff);
        tokio::select! {
            _ = &mut shutdown => return,
            result = session => {
                state.connected.store(false, Ordering::Relaxed);
                let error = result.err().map(|e| e.to_string()).unwrap_or_else(|| "session ended".into());
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "postgres mirror: retrying");
                if let Ok(mut e) = state.last_error.lock() {
                    *e = Some(error);
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connected session: set up, then mirror and drain as things happen.
async fn session(
    replica: &Arc<Replica>,
    config: &MirrorConfig,
    state: &MirrorState,
    on_change: &(dyn Fn() + Send + Sync),
    backoff: &mut Duration,
) -> Result<(), MirrorError> {
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut client = connect(&config.url, Some(wake.clone())).await?;
    setup(&mut client, replica, config).await?;
    client.batch_execute("LISTEN fieldsync_outbox").await?;
    state.connected.store(true, Ordering::Relaxed);
    if let Ok(mut e) = state.last_error.lock() {
        *e = None;
    }
    tracing::info!("postgres mirror connected");
    let mut last_outbox = tokio::time::Instant::now() - OUTBOX_POLL;
    let mut last_log = tokio::time::Instant::now();
    let mut schema = replica.workspace();
    loop {
        // A newly adopted schema version may add collections and fields: tables and
        // columns first (adopting rewrites every view, so its rows follow in the feed).
        if !Arc::ptr_eq(&schema, &replica.workspace()) {
            schema = replica.workspace();
            setup(&mut client, replica, config).await?;
            tracing::info!("postgres mirror: tables follow the new schema version");
        }
        let mut busy = mirror_batch(&mut client, replica, config, state).await? > 0;
        *backoff = Duration::from_millis(250);
        if busy && last_log.elapsed() >= LAG_LOG_EVERY {
            let (mirrored, head) = (
                state.mirrored_seq.load(Ordering::Relaxed),
                replica.feed_seq(),
            );
            tracing::info!(
                mirrored,
                head,
                lag = head.saturating_sub(mirrored),
                "postgres mirror catching up"
            );
            last_log = tokio::time::Instant::now();
        }
        if last_outbox.elapsed() >= OUTBOX_POLL {
            busy |= drain_outbox(&mut client, replica, state, on_change).await? > 0;
            last_outbox = tokio::time::Instant::now();
        }
        if busy {
            continue;
        }
        let mirrored = state.mirrored_seq.load(Ordering::Relaxed);
        // Wait for a change to mirror, an outbox notification, or the outbox poll.
        let deadline = last_outbox + OUTBOX_POLL;
        loop {
            tokio::select! {
                _ = wake.notified() => { last_outbox = tokio::time::Instant::now() - OUTBOX_POLL; break; }
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tokio::time::sleep(FEED_POLL) => {
                    if replica.feed_seq() != mirrored { break; }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collection(toml: &str) -> Collection {
        let schema = fieldsync::core::schema::Schema::from_toml(toml).expect("schema");
        schema.collection("things").expect("things").clone()
    }

    #[test]
    fn columns_follow_the_rules_and_never_take_a_fixed_column() {
        let c = collection(
            r#"
            [collections.things.fields]
            status = { rule = "rank", order = ["a", "b"] }
            count = { rule = "counter" }
            amount = { rule = "authority" }
            view = { rule = "lww" }
            amount_pending = { rule = "max" }
            "#,
        );
        let cols: Vec<(String, &str)> = columns(&c)
            .into_iter()
            .map(|c| (c.name, c.sql_type))
            .collect();
        assert_eq!(
            cols,
            vec![
                ("amount".into(), "jsonb"),
                ("amount_pending".into(), "jsonb"),
                ("amount_pending_field".into(), "numeric"),
                ("count".into(), "numeric"),
                ("status".into(), "text"),
                ("view_field".into(), "jsonb"),
            ]
        );
        let sql = upsert_sql("my \"things\"", &c);
        assert!(sql.starts_with(r#"INSERT INTO "my ""things""" (id, view, deleted, heads, feed_seq, updated_at, "amount""#), "{sql}");
        assert!(
            sql.contains(r#""view_field" = EXCLUDED."view_field""#),
            "{sql}"
        );
        assert!(table_ddl("t", &c, &BTreeSet::new())
            .iter()
            .any(|d| d == r#"ALTER TABLE "t" ADD COLUMN IF NOT EXISTS "count" numeric"#));
        // A column new to an existing table is filled from the views.
        let existing: BTreeSet<String> = ["id", "view", "status"]
            .iter()
            .map(|c| (*c).to_owned())
            .collect();
        let ddl = table_ddl("t", &c, &existing);
        assert!(
            ddl.iter().any(|d| d.starts_with(
                r#"UPDATE "t" SET "count" = CASE WHEN jsonb_typeof(view -> 'count')"#
            )),
            "{ddl:?}"
        );
        assert!(
            !ddl.iter()
                .any(|d| d.starts_with(r#"UPDATE "t" SET "status""#)),
            "{ddl:?}"
        );
    }
}
