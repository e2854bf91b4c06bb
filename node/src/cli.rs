//! Command-line interface: the contract other tools and tests drive.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use fieldsync::{EntityId, ErrorKind, PeerId, Replica};

use crate::client::Client;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value as Json};

/// fieldsync: offline-first replication of business entities between devices.
///
/// Output is JSON on stdout (one object, or JSON Lines for lists); messages and progress go
/// to stderr. Exit codes: 0 ok, 1 runtime error, 2 invalid input or usage, 3 not found.
#[derive(Debug, Parser)]
#[command(name = "fieldsync", version)]
pub struct Cli {
    /// Data directory of this node.
    #[arg(
        long,
        global = true,
        env = "FIELDSYNC_DATA",
        default_value = "./fieldsync-data"
    )]
    data: PathBuf,
    /// Key file of a store encrypted with `init --encrypt --key-file` (needed by every
    /// command that opens it). A store encrypted with a passphrase takes it from
    /// FIELDSYNC_PASSPHRASE, or asks at the terminal.
    #[arg(long, global = true, env = "FIELDSYNC_KEY_FILE", value_name = "FILE")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// Memory settings shared by `run` and `relay`.
#[derive(Debug, clap::Args)]
pub(crate) struct MemoryArgs {
    /// Documents kept in memory, in MiB (an LRU bounded by estimated bytes; others are
    /// loaded on demand). [default: 32]
    #[arg(long, value_name = "MIB")]
    cache_mb: Option<u64>,
    /// The store's page cache (sled), in MiB. [default: 32; relay: 8, as its first syncs
    /// stream the whole store once]
    #[arg(long, value_name = "MIB")]
    store_cache_mb: Option<u64>,
}

impl MemoryArgs {
    /// The options, with the config file's values where no flag was given.
    fn options(&self, cache_mb: u64, store_cache_mb: u64) -> fieldsync::MemoryOptions {
        fieldsync::MemoryOptions::from_mib(
            self.cache_mb.unwrap_or(cache_mb),
            self.store_cache_mb.unwrap_or(store_cache_mb),
        )
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a node: a new workspace (--schema, this node is its authority) or join one (--join).
    Init {
        /// Schema TOML file: creates a workspace with this node as its authority.
        #[arg(long, conflicts_with = "join", required_unless_present_any = ["join", "restore"])]
        schema: Option<PathBuf>,
        /// Invite file from `fieldsync invite`: joins that workspace as a device.
        #[arg(long)]
        join: Option<PathBuf>,
        /// An authority backup from `fieldsync authority export`: makes this node the
        /// workspace authority again (same key and workspace); it fills up by syncing.
        /// Its passphrase comes from FIELDSYNC_BACKUP_PASSPHRASE or the terminal.
        #[arg(long, value_name = "BACKUP", conflicts_with_all = ["schema", "join"])]
        restore: Option<PathBuf>,
        /// Encrypt the store at rest (XChaCha20-Poly1305): with --key-file FILE (created
        /// with a random key if missing), else with a passphrase (Argon2id) from
        /// FIELDSYNC_PASSPHRASE or asked at the terminal. Every later command and daemon
        /// needs the same key.
        #[arg(long)]
        encrypt: bool,
        /// Name of the user or device, recorded in every change's history.
        #[arg(long, env = "USER", default_value = "fieldsync")]
        name: String,
    },
    /// Erase an entity on every node (authority or admin): its document, history, view and
    /// index entries are dropped and no byte of them stays in the data directory; a signed
    /// purge record (in `_purges`, ids only) syncs to every node and keeps the entity from
    /// coming back from an old peer or bundle. Cannot be undone.
    Purge { collection: String, id: String },
    /// The authority's key: back it up so the workspace survives the authority's disk.
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Print a one-time invite (JSON) that lets one device join this workspace (authority only).
    ///
    /// The first device that presents it to the authority (directly, through a relay's
    /// circuit, or in a bundle) becomes a member with this user, role and partitions; until
    /// then other nodes honour it until it expires. `invite cancel ID` cancels an unused one.
    #[command(args_conflicts_with_subcommands = true)]
    Invite {
        #[command(subcommand)]
        action: Option<InviteAction>,
        /// The member's user name: entities whose owner field holds it are "own".
        #[arg(long, default_value = "device")]
        user: String,
        /// device (sees its partitions), relay or admin (see everything).
        #[arg(long, default_value = "device")]
        role: fieldsync::core::membership::MemberRole,
        /// COLLECTION=all|own|none: what the member sees and writes of a collection, instead
        /// of the schema's `access`. Repeatable.
        #[arg(long = "partition", value_name = "COLLECTION=ACCESS")]
        partitions: Vec<String>,
        /// Hours until the invite expires.
        #[arg(long, default_value_t = 168)]
        valid_hours: u64,
    },
    /// List the workspace's members and, on the authority, its pending invites (JSON Lines).
    ///
    /// Members: `{"kind": "member", peer, user, role, partitions, revoked, invite, delegate,
    /// name, last_seen_ms}` (delegate: present and true for a delegate, see `delegate`;
    /// name: what the device called itself; last_seen_ms: its last session with this node). Unused invites: `{"kind": "invite", id, user, role, partitions,
    /// issued_ms, expires_ms}`.
    Members,
    /// Print the token of this node's HTTP API and console, creating it if there is none.
    ///
    /// Prints `{"token", "file", "created", "rotated"}`. The token is kept in the data
    /// directory (`api-token`, readable by its owner only). Anything that changes data needs
    /// `Authorization: Bearer TOKEN`, and so does every route when the API listens on a
    /// non-loopback address or `[api] require_token` is set. A running daemon follows the
    /// file: a rotated token works at once and the old one stops working.
    ApiToken {
        /// Replace the token with a new one.
        #[arg(long)]
        rotate: bool,
    },
    /// Revoke a member (authority only): every node refuses it once it learns of this.
    Revoke {
        /// The member's peer id (see `fieldsync members`).
        peer_id: String,
    },
    /// Make a relay or admin member a delegate (authority only): it confirms proposals and
    /// binds invites with its own key, so a second relay can serve the office while this
    /// node is away. Prints the member record.
    ///
    /// `--withdraw` ends the delegation: nodes that know of it refuse the delegate's new
    /// confirmations; those they already hold stay. `revoke` ends it too.
    Delegate {
        /// The member's peer id (see `fieldsync members`).
        peer_id: String,
        /// Withdraw the delegation instead of granting it.
        #[arg(long)]
        withdraw: bool,
    },
    /// Create or update an entity: `put COLLECTION [ID] PATCH_JSON` (or `--file FILE`).
    ///
    /// PATCH_JSON is an object: plain values set fields, null removes one, {"$inc": n} adds
    /// to a counter, {"$add": [..]} / {"$remove": [..]} change a set. PATCH_JSON `-` reads
    /// it from standard input. Patches are limited to 8 MiB.
    Put {
        collection: String,
        /// ID of the entity to update (or create with this id); omit to create a new one.
        #[arg(value_name = "ID")]
        id_or_patch: Option<String>,
        /// The patch, a JSON object (`-`: read it from standard input).
        #[arg(value_name = "PATCH_JSON")]
        patch: Option<String>,
        /// Read the patch from FILE instead of PATCH_JSON (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// Operation id: the same write sent again with the same id (a retry, here or on
        /// another node) has exactly one effect. Without ID, it also names the entity.
        #[arg(long, value_name = "OP_ID")]
        op_id: Option<String>,
    },
    /// Print an entity's view.
    Get { collection: String, id: String },
    /// Attach a file to an entity's `attachments` field; prints its reference as JSON:
    /// `{"hash", "mime", "name", "size"}` (hash: BLAKE3, hex).
    ///
    /// The file is streamed into this node's blob store (hashed as it is read, flushed to
    /// disk, never held whole in memory), and only then is its reference added to FIELD.
    /// A progress bar shows on a terminal. With a daemon running on the data directory, the
    /// file is uploaded to it (POST /v1/blobs) and attached there. Other nodes sync the
    /// reference; a relay connected to this node fetches the file as soon as it sees the
    /// reference, and other nodes fetch it on demand (`blob get`, GET /v1/blobs/{hash}),
    /// from this node or through the relay. This node does not push it anywhere itself.
    Attach {
        collection: String,
        id: String,
        /// A field declared with `rule = "attachments"`.
        field: String,
        file: PathBuf,
        /// The file's media type. [default: from its extension (jpg, png, pdf…), else
        /// application/octet-stream]
        #[arg(long, value_name = "M")]
        mime: Option<String>,
        /// The name shown for it. [default: the file's name]
        #[arg(long)]
        name: Option<String>,
        /// TOML file whose [blobs] max_blob_bytes and quota_bytes apply when no daemon runs
        /// (a running daemon applies its own). [default: 256 MiB per file, 10 GiB in all]
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The files of attachments held in this node's blob store.
    #[command(subcommand)]
    Blob(BlobCommand),
    /// List a collection's views as JSON Lines.
    List {
        collection: String,
        /// Keep entities whose FIELD equals VALUE (or whose set FIELD contains it); VALUE may
        /// hold commas. Repeatable.
        #[arg(long = "where", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        /// Include deleted entities.
        #[arg(long)]
        include_deleted: bool,
    },
    /// Delete an entity (a tombstone that syncs like any write).
    Delete {
        collection: String,
        id: String,
        /// Operation id: a retried delete with the same id answers as the first did.
        #[arg(long, value_name = "OP_ID")]
        op_id: Option<String>,
    },
    /// Print an entity's history as JSON Lines (device, user, time, fields touched).
    History { collection: String, id: String },
    /// List open conflicts as JSON Lines.
    Conflicts {
        /// Also list conflicts settled by a rule.
        #[arg(long)]
        all: bool,
    },
    /// Settle a conflict by writing a value that has seen every alternative.
    Resolve {
        conflict_id: String,
        value_json: String,
    },
    /// List pending proposals to authority fields (authority or a delegate, or `--mine` anywhere).
    Proposals {
        /// Only this node's own proposals still waiting for the authority.
        #[arg(long)]
        mine: bool,
    },
    /// Confirm one or more proposals (authority or a delegate).
    Accept {
        #[arg(required = true, num_args = 1..)]
        proposal_ids: Vec<String>,
    },
    /// Reject one or more proposals (authority or a delegate).
    Reject {
        #[arg(required = true, num_args = 1..)]
        proposal_ids: Vec<String>,
    },
    /// Print the node's status (with a running daemon: also its peers, per-peer last sync,
    /// progress and how many local changes no relay has acknowledged yet).
    Status,
    /// Sync now, through the running daemon, with a progress bar; returns when every
    /// connected peer is caught up and the relay has acknowledged every local change.
    Sync {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// File-based sync for sites with no network (works while a daemon runs, through it).
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// The PostgreSQL mirror of a relay.
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Schema versions: show one, compare a new one, publish it (authority).
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Bulk-create entities from a JSON Lines file (an optional "_id" per line).
    Import { collection: String, file: PathBuf },
    /// Print a collection's live entities as JSON Lines (re-importable).
    Export { collection: String },
    /// Run this node as a device: sync with relays and peers, serve the local HTTP API.
    ///
    /// Prints JSON Lines on stdout as it goes (listening, api, peer_connected,
    /// sync_completed, sync_failed, refused: a peer refused this node, with the reason;
    /// blobs_collected: unreferenced attachment files removed, see `[blobs]`; blob_fetched:
    /// an attachment file fetched unasked, for a `prefetch` collection);
    /// stops on Ctrl-C or SIGTERM. A --listen or --api port in use fails with
    /// `address in use`.
    Run {
        /// A relay to keep connected to, e.g. /ip4/203.0.113.5/tcp/4001. Repeatable.
        #[arg(long = "relay", value_name = "MULTIADDR")]
        relays: Vec<libp2p::Multiaddr>,
        /// Another device to keep connected to. Repeatable.
        #[arg(long = "peer", value_name = "MULTIADDR")]
        peers: Vec<libp2p::Multiaddr>,
        /// Discover devices on the LAN with mDNS (off unless given).
        #[arg(long)]
        mdns: bool,
        /// Address to accept peers on. Repeatable: TCP, QUIC or WebSocket (…/tcp/PORT/ws).
        /// [default: /ip4/0.0.0.0/tcp/0]
        #[arg(long = "listen", value_name = "MULTIADDR")]
        listen: Vec<libp2p::Multiaddr>,
        /// Address of the local HTTP API (keep it on localhost). [default: 127.0.0.1:0]
        #[arg(long)]
        api: Option<std::net::SocketAddr>,
        #[command(flatten)]
        memory: MemoryArgs,
        /// TOML file with defaults for these options (see example.config.toml); flags win.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run this node as an always-on relay: serves catch-up and live sync to every device
    /// (and, on the authority or a delegate, confirms auto_accept proposals as they arrive),
    /// and fetches every attachment file a live entity references from the devices that
    /// have it.
    Relay {
        /// Address to accept devices on. Repeatable: TCP, QUIC, WebSocket for browsers
        /// (/ip4/0.0.0.0/tcp/8080/ws), secure WebSocket (…/tcp/443/tls/ws, with [net]
        /// tls_cert and tls_key in the config file).
        /// [default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1]
        #[arg(long = "listen", value_name = "MULTIADDR")]
        listen: Vec<libp2p::Multiaddr>,
        /// Another relay to keep connected to. Repeatable.
        #[arg(long = "peer", value_name = "MULTIADDR")]
        peers: Vec<libp2p::Multiaddr>,
        /// Serve circuit relay v2 to anyone, not only to admitted members (off by default:
        /// a workspace's relay relays its members only).
        #[arg(long)]
        open_relay: bool,
        /// Address of the local HTTP API (keep it on localhost). [default: 127.0.0.1:7070]
        #[arg(long)]
        api: Option<std::net::SocketAddr>,
        /// Mirror every collection into this PostgreSQL database and apply the writes of its
        /// `fieldsync_outbox` table, e.g. postgres://office@127.0.0.1/office (README,
        /// "PostgreSQL mirror").
        #[arg(long, value_name = "URL", env = "FIELDSYNC_POSTGRES")]
        postgres: Option<String>,
        #[command(flatten)]
        memory: MemoryArgs,
        /// TOML file with defaults for these options (see example.config.toml); flags win.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum BlobCommand {
    /// Write the file with this hash to --out FILE (or standard output).
    ///
    /// Reads this node's blob store. With a daemon running on the data directory, a file
    /// that is not here is first fetched from the connected peers that may send it (the
    /// relay, or the device that attached it; partitions apply), verified against its
    /// hash before it is stored. Exit 3 if it is not here and no connected peer sent it
    /// (without a daemon: if it is not here). An interrupted fetch keeps what arrived and
    /// the next one resumes there.
    Get {
        /// The file's BLAKE3 hash (the reference's `hash`).
        hash: String,
        /// Where to write it (written beside it, then renamed). [default: standard output]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuthorityCommand {
    /// Write the authority's key and workspace to FILE, encrypted with a passphrase from
    /// FIELDSYNC_BACKUP_PASSPHRASE (or asked at the terminal); `init --restore FILE` makes a
    /// new authority from it. Keep it offline: it can sign for the whole workspace.
    Export { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub(crate) enum InviteAction {
    /// Cancel an unused invite (authority only): the authority refuses it from now on.
    Cancel {
        /// The invite's id (see `fieldsync members`).
        invite_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MirrorCommand {
    /// Empty the mirror's tables and reset its position (creating them if needed): the
    /// relay then writes every row again from its store. Run it with the relay stopped.
    Rebuild {
        /// The database, as for `relay --postgres`.
        #[arg(long, value_name = "URL", env = "FIELDSYNC_POSTGRES")]
        postgres: String,
        /// TOML file whose `[relay] postgres_tables` names the tables.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SchemaCommand {
    /// Print a schema version held here: `{version, current, schema, published_ms}`
    /// (default: the version in use).
    Show {
        #[arg(long)]
        version: Option<u64>,
    },
    /// What publishing FILE (schema TOML) would change, and whether each change is allowed
    /// (README "Schema reference"). Exits 0 either way; `allowed` says.
    Diff { file: PathBuf },
    /// Publish FILE (schema TOML) as the next version (authority only). Refused, with the
    /// reason, if a change is not allowed; else signed, synced to every node and adopted
    /// there on arrival (views are recomputed under it).
    Push { file: PathBuf },
}

/// Reads a schema TOML file as text.
pub(crate) fn read_schema(file: &Path) -> Result<String> {
    String::from_utf8(read_file(file)?)
        .map_err(|_| CliError::invalid(format!("{} is not UTF-8 text", file.display())))
}

#[derive(Debug, Subcommand)]
pub(crate) enum BundleCommand {
    /// Write the changes another node lacks to FILE (all of them if PEER is unknown).
    Export {
        file: PathBuf,
        /// Peer id of the node the bundle is for.
        #[arg(long)]
        since: Option<String>,
    },
    /// Merge a bundle; importing it again, or bundles in any order, gives the same result.
    Import { file: PathBuf },
}

/// A CLI failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    message: String,
    code: u8,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        self.code
    }
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 2,
        }
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 3,
        }
    }
    pub(crate) fn runtime(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: 1,
        }
    }
}

impl From<fieldsync::Error> for CliError {
    fn from(e: fieldsync::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::Invalid => 2,
            ErrorKind::NotFound => 3,
            _ => 1,
        };
        CliError {
            message: e.to_string(),
            code,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::runtime(e.to_string())
    }
}

pub(crate) type Result<T> = std::result::Result<T, CliError>;

/// `COLLECTION=ACCESS` arguments as a map.
pub(crate) fn parse_partitions(
    args: &[String],
) -> Result<std::collections::BTreeMap<String, fieldsync::core::Access>> {
    args.iter()
        .map(|a| {
            let (c, access) = a.split_once('=').ok_or_else(|| {
                CliError::invalid(format!("--partition {a:?} is not COLLECTION=all|own|none"))
            })?;
            Ok((c.to_owned(), parse_id("access", access)?))
        })
        .collect()
}

/// Largest patch `put` takes (as the HTTP API does).
pub(crate) const MAX_PATCH_BYTES: u64 = 8 << 20;

/// `put`'s entity id and patch text, from `[ID] PATCH_JSON`, `[ID] -` (stdin) or
/// `[ID] --file FILE`.
pub(crate) fn put_args(
    first: Option<String>,
    second: Option<String>,
    file: Option<PathBuf>,
) -> Result<(Option<EntityId>, String)> {
    let (id, source) = match (first, second, file) {
        (Some(patch), None, Some(_)) if patch == "-" || patch.trim_start().starts_with('{') => {
            return Err(both())
        }
        (id, None, Some(file)) => (id, Source::File(file)),
        (_, Some(_), Some(_)) => return Err(both()),
        (Some(id), Some(patch), None) => (Some(id), Source::Text(patch)),
        (Some(patch), None, None) => (None, Source::Text(patch)),
        (None, _, None) => {
            return Err(CliError::invalid(
                "put needs a patch: PATCH_JSON, - (standard input) or --file FILE",
            ))
        }
    };
    let id = id
        .map(|i| parse_id::<EntityId>("entity id", &i))
        .transpose()?;
    let text = match source {
        Source::Text(t) if t == "-" => read_limited(std::io::stdin().lock(), "standard input")?,
        Source::File(f) if f.as_os_str() == "-" => {
            read_limited(std::io::stdin().lock(), "standard input")?
        }
        Source::Text(t) => t,
        Source::File(f) => {
            let opened = std::fs::File::open(&f)
                .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", f.display())))?;
            read_limited(opened, &f.display().to_string())?
        }
    };
    Ok((id, text))
}

fn both() -> CliError {
    CliError::invalid("give the patch as PATCH_JSON or --file FILE, not both")
}

enum Source {
    Text(String),
    File(PathBuf),
}

/// Reads a patch of at most [`MAX_PATCH_BYTES`] as UTF-8 text.
fn read_limited(from: impl std::io::Read, what: &str) -> Result<String> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(from, MAX_PATCH_BYTES + 1),
        &mut bytes,
    )
    .map_err(|e| CliError::invalid(format!("cannot read {what}: {e}")))?;
    if bytes.len() as u64 > MAX_PATCH_BYTES {
        return Err(CliError::invalid(format!(
            "the patch in {what} is over the {} MiB limit",
            MAX_PATCH_BYTES >> 20
        )));
    }
    String::from_utf8(bytes)
        .map_err(|_| CliError::invalid(format!("the patch in {what} is not UTF-8 text")))
}

pub(crate) fn parse_id<T: std::str::FromStr>(what: &str, text: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e| CliError::invalid(format!("{what} {text:?} is not valid: {e}")))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))
}

pub(crate) fn emit(value: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value).map_err(|e| CliError::runtime(e.to_string()))?;
    writeln!(out)?;
    Ok(())
}

/// `members`' output: members, then pending invites, each line with its `kind`.
pub(crate) fn emit_members(members: Vec<Json>, invites: Vec<Json>) -> Result<()> {
    let tag = |kind: &str, mut v: Json| {
        if let Some(o) = v.as_object_mut() {
            o.remove("cancelled");
            o.insert("kind".into(), json!(kind));
        }
        v
    };
    emit_lines(
        members
            .into_iter()
            .map(|m| tag("member", m))
            .chain(invites.into_iter().map(|i| tag("invite", i))),
    )
}

fn emit_lines<T: serde::Serialize>(items: impl IntoIterator<Item = T>) -> Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    for item in items {
        serde_json::to_writer(&mut out, &item).map_err(|e| CliError::runtime(e.to_string()))?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
fn progress_bar(what: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}

fn with_progress<T>(what: &'static str, work: impl FnOnce(&mut dyn FnMut(usize, usize)) -> T) -> T {
    let bar = progress_bar(what);
    let result = work(&mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    result
}

/// Prints a collection's views as JSON Lines, each passed through `shape`.
fn stream_views(
    replica: &Replica,
    collection: &str,
    filters: &[String],
    include_deleted: bool,
    shape: impl Fn(fieldsync::View) -> fieldsync::View,
) -> Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut failed = None;
    replica.list(collection, filters, include_deleted, &mut |view| {
        let written = serde_json::to_writer(&mut out, &Json::Object(shape(view)))
            .map_err(std::io::Error::from)
            .and_then(|_| writeln!(out));
        failed = written.err();
        failed.is_none()
    })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    out.flush()?;
    Ok(())
}

/// What `attach` sends: the open file and its reference without the hash.
pub(crate) struct AttachSource {
    pub file: std::fs::File,
    pub size: u64,
    pub mime: String,
    pub name: String,
}

/// Opens FILE for `attach` and checks its reference (all but the hash) before any byte is
/// moved, so a bad --mime or an oversized name fails at once.
pub(crate) fn attach_source(
    field: &str,
    path: &Path,
    mime: Option<String>,
    name: Option<String>,
) -> Result<AttachSource> {
    let file = std::fs::File::open(path)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))?;
    let meta = file
        .metadata()
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(CliError::invalid(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let name = name.unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let mime = mime.unwrap_or_else(|| guess_mime(path).to_owned());
    let probe = json!({ "hash": "0".repeat(64), "size": meta.len(), "mime": mime, "name": name });
    fieldsync::core::attachment::Reference::from_json(field, &probe)
        .map_err(|e| CliError::invalid(e.to_string()))?;
    Ok(AttachSource {
        file,
        size: meta.len(),
        mime,
        name,
    })
}

/// A media type from a file's extension (the common ones in the field), else
/// `application/octet-stream`.
fn guess_mime(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "heic" => "image/heic",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "csv" => "text/csv",
        "json" => "application/json",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// A byte progress bar on stderr (drawn only when stderr is a terminal).
pub(crate) fn bytes_bar(what: &'static str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}

/// Copies `from` to FILE (beside it, then renamed: a half-written file never has the
/// name) or to standard output; the bytes copied.
pub(crate) fn write_out(from: &mut dyn std::io::Read, out: Option<&Path>) -> Result<u64> {
    let Some(file) = out else {
        let mut stdout = std::io::stdout().lock();
        let n = std::io::copy(from, &mut stdout)?;
        stdout.flush()?;
        return Ok(n);
    };
    let tmp = file.with_extension("partial");
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        let n = std::io::copy(from, &mut f)?;
        f.sync_all()?;
        Ok::<u64, std::io::Error>(n)
    })();
    match written {
        Ok(n) => {
            std::fs::rename(&tmp, file)
                .map_err(|e| CliError::runtime(format!("{}: {e}", file.display())))?;
            Ok(n)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(CliError::runtime(format!("{}: {e}", tmp.display())))
        }
    }
}

/// Runs one command.
pub fn run(cli: Cli) -> Result<()> {
    let dir = cli.data;
    let key_file = cli.key_file;
    match cli.command {
        Command::Init {
            schema,
            join,
            restore,
            encrypt,
            name,
        } => {
            let secret = if encrypt {
                Some(new_store_secret(&dir, key_file.as_deref())?)
            } else {
                None
            };
            let key = libp2p::identity::ed25519::Keypair::generate();
            let replica =
                match (schema, join, restore) {
                    (Some(schema), None, None) => {
                        let text = String::from_utf8(read_file(&schema)?).map_err(|_| {
                            CliError::invalid(format!("{} is not UTF-8 text", schema.display()))
                        })?;
                        Replica::init_authority_with(&dir, &text, &name, key, secret.as_ref())?
                    }
                    (None, Some(invite), None) => Replica::init_join_with(
                        &dir,
                        &read_file(&invite)?,
                        &name,
                        key,
                        secret.as_ref(),
                    )?,
                    (None, None, Some(backup)) => {
                        let pass = passphrase(
                            "FIELDSYNC_BACKUP_PASSPHRASE",
                            &format!("passphrase of {}: ", backup.display()),
                            false,
                        )
                        .map_err(|why| {
                            CliError::invalid(format!(
                                "init --restore needs the backup's passphrase: {why}"
                            ))
                        })?;
                        Replica::init_restore(&dir, &read_file(&backup)?, &pass, secret.as_ref())?
                    }
                    _ => return Err(CliError::invalid(
                        "give exactly one of --schema FILE, --join INVITE_FILE or --restore BACKUP",
                    )),
                };
            eprintln!(
                "initialised {} in {}",
                if replica.is_authority() {
                    "workspace authority"
                } else {
                    "device"
                },
                dir.display()
            );
            emit(&json!({
                "peer_id": replica.peer_id().to_string(),
                "workspace": replica.workspace().id.to_string(),
                "authority": replica.is_authority(),
                "encrypted": replica.encrypted(),
            }))
        }
        Command::Run {
            relays,
            peers,
            mdns,
            listen,
            api,
            memory,
            config,
        } => {
            let file = crate::config::load(config.as_deref())?;
            let c = file.run;
            let (relays, peers) = if relays.is_empty() && peers.is_empty() {
                (c.relays, c.peers)
            } else {
                (relays, peers)
            };
            let options = crate::daemon::Options {
                role: fieldsync::core::protocol::Role::Device,
                listen: if listen.is_empty() { c.listen } else { listen },
                dial: relays.iter().cloned().chain(peers).collect(),
                relays,
                open_relay: false,
                mdns: mdns || c.mdns,
                api: api.unwrap_or(c.api),
                memory: memory.options(c.cache_mb, c.store_cache_mb),
                net: file.net,
                mirror: None,
                api_access: file.api,
                blobs: file.blobs,
            };
            run_node(dir, key_file, options)
        }
        Command::Relay {
            listen,
            peers,
            open_relay,
            api,
            postgres,
            memory,
            config,
        } => {
            let file = crate::config::load(config.as_deref())?;
            let c = file.relay;
            let options = crate::daemon::Options {
                role: fieldsync::core::protocol::Role::Relay,
                listen: if listen.is_empty() { c.listen } else { listen },
                dial: if peers.is_empty() { c.peers } else { peers },
                relays: vec![],
                open_relay: open_relay || c.open_relay,
                mdns: false,
                api: api.unwrap_or(c.api),
                memory: memory.options(c.cache_mb, c.store_cache_mb),
                net: file.net,
                mirror: postgres
                    .or(c.postgres)
                    .map(|url| fieldsync_mirror::MirrorConfig {
                        url,
                        tables: c.postgres_tables,
                    }),
                api_access: file.api,
                blobs: file.blobs,
            };
            run_node(dir, key_file, options)
        }
        Command::ApiToken { rotate } => {
            if !dir.is_dir() {
                return Err(CliError::not_found(format!(
                    "no node in {} (`fieldsync init` first)",
                    dir.display()
                )));
            }
            let file = dir.join(fieldsync_api::auth::TOKEN_FILE);
            let failed = |e: std::io::Error| CliError::runtime(format!("{}: {e}", file.display()));
            let (token, created) = if rotate {
                (
                    fieldsync_api::auth::rotate_token(&dir).map_err(failed)?,
                    false,
                )
            } else {
                fieldsync_api::auth::ensure_token(&dir).map_err(failed)?
            };
            if rotate {
                eprintln!(
                    "new API token in {}; the old one no longer works",
                    file.display()
                );
            }
            emit(
                &json!({ "token": token, "file": file.display().to_string(), "created": created, "rotated": rotate }),
            )
        }
        command => {
            // What works on the store itself, unbounded and with progress: only without a
            // daemon (a bundle also goes through a daemon's API, within its limits).
            let on_store = matches!(
                command,
                Command::Import { .. }
                    | Command::Export { .. }
                    | Command::Mirror(_)
                    | Command::Authority(_)
            );
            match daemon(&dir) {
                Some(_) if on_store => Err(CliError::invalid(match command {
                    Command::Authority(_) => "stop the daemon first: `authority export` reads the key from the store",
                    _ => "a daemon is running on this data directory; stop it (Ctrl-C) for this command",
                })),
                // A daemon holds the store: data commands go through its API.
                Some(client) => crate::data::run(&client, command),
                None => {
                    let replica = open_replica(
                        &dir,
                        fieldsync::MemoryOptions::default(),
                        key_file.as_deref(),
                    )?;
                    if on_store || matches!(command, Command::Bundle(_)) {
                        return run_on_store(&replica, command);
                    }
                    if let Command::Attach { config, .. } = &command {
                        replica.set_blob_config(
                            crate::config::load(config.as_deref())?.blobs.store_config(),
                        );
                    }
                    crate::data::run(&Client::in_process(&dir, replica)?, command)
                }
            }
        }
    }
}

/// A client of the daemon running on `dir`, if one answers.
fn daemon(dir: &Path) -> Option<Client> {
    let text = std::fs::read_to_string(dir.join(crate::daemon::DAEMON_FILE)).ok()?;
    let api = serde_json::from_str::<Json>(&text).ok()?["api"]
        .as_str()?
        .to_owned();
    let client = Client::daemon(api, dir);
    // A daemon killed with SIGKILL leaves its file behind: only trust one that answers.
    client.get("/v1/status").ok().map(|_| client)
}

/// `run` and `relay`: the node until Ctrl-C or SIGTERM.
fn run_node(
    dir: PathBuf,
    key_file: Option<PathBuf>,
    options: crate::daemon::Options,
) -> Result<()> {
    // No transparent huge pages in a relay (process-wide, before its threads start):
    // mimalloc marks its arenas MADV_HUGEPAGE, so one touched byte makes 2 MiB resident —
    // half of a relay's idle RSS (84 → 40 MB with 100,000 entities stored) and ~60 MB of
    // its peak serving a first sync, for no measurable speed (it serves stored bytes).
    // Devices are left as they were. A failure (old kernel) only costs memory.
    #[cfg(target_os = "linux")]
    if options.role == fieldsync::core::protocol::Role::Relay {
        if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
            tracing::debug!("cannot turn transparent huge pages off: {e}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::runtime(format!("cannot start the async runtime: {e}")))?;
    let config = crate::daemon::NodeConfig {
        dir,
        key_file,
        options,
    };
    runtime.block_on(crate::daemon::run(config, crate::daemon::shutdown_signal()))
}

/// Opens the node in `dir`; if its store is encrypted, with the key file given, or the
/// passphrase from FIELDSYNC_PASSPHRASE or the terminal.
pub(crate) fn open_replica(
    dir: &Path,
    memory: fieldsync::MemoryOptions,
    key_file: Option<&Path>,
) -> Result<Replica> {
    let prompt = format!("passphrase of the store in {}: ", dir.display());
    Ok(Replica::open_with_key(dir, memory, &mut |kind| {
        match kind {
        fieldsync::KeyKind::KeyFile => match key_file {
            Some(file) => read_key_file(file).map(fieldsync::Secret::KeyFile),
            None => Err("it was encrypted with a key file: pass --key-file FILE (or set FIELDSYNC_KEY_FILE)".into()),
        },
        fieldsync::KeyKind::Passphrase => passphrase("FIELDSYNC_PASSPHRASE", &prompt, false)
            .map_err(|why| format!("it was encrypted with a passphrase: {why}")),
    }
    })?)
}

fn read_key_file(file: &Path) -> std::result::Result<Vec<u8>, String> {
    let meta = std::fs::metadata(file)
        .map_err(|e| format!("cannot read the key file {}: {e}", file.display()))?;
    if meta.len() > fieldsync::MAX_KEY_FILE_BYTES as u64 {
        return Err(format!(
            "{} is {} bytes, too large for a key file",
            file.display(),
            meta.len()
        ));
    }
    std::fs::read(file).map_err(|e| format!("cannot read the key file {}: {e}", file.display()))
}

/// A passphrase from `env`, else asked at the terminal (twice when `confirm`).
fn passphrase(
    env: &str,
    prompt: &str,
    confirm: bool,
) -> std::result::Result<fieldsync::Secret, String> {
    if let Ok(p) = std::env::var(env) {
        return Ok(fieldsync::Secret::Passphrase(p));
    }
    if !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return Err(format!(
            "set {env}, or run the command at a terminal to be asked"
        ));
    }
    let p = rpassword::prompt_password(prompt)
        .map_err(|e| format!("cannot read it from the terminal: {e}"))?;
    if confirm
        && rpassword::prompt_password("again: ")
            .map_err(|e| format!("cannot read it from the terminal: {e}"))?
            != p
    {
        return Err("the two passphrases differ".into());
    }
    Ok(fieldsync::Secret::Passphrase(p))
}

/// Shortest passphrase `init --encrypt` and `authority export` take.
const MIN_PASSPHRASE_CHARS: usize = 8;

/// The secret a new encrypted store gets: the key file (created with a random key if it
/// does not exist), else a new passphrase.
fn new_store_secret(dir: &Path, key_file: Option<&Path>) -> Result<fieldsync::Secret> {
    if let Some(file) = key_file {
        if !file.exists() {
            write_secret_file(file, &fieldsync::generate_key_file())?;
            eprintln!("wrote a new random key to {}; keep it safe and apart from the data directory: without it the store cannot be opened", file.display());
        }
        return read_key_file(file)
            .map(fieldsync::Secret::KeyFile)
            .map_err(CliError::invalid);
    }
    let secret = passphrase(
        "FIELDSYNC_PASSPHRASE",
        &format!("new passphrase for the store in {}: ", dir.display()),
        true,
    )
    .map_err(|why| {
        CliError::invalid(format!(
            "init --encrypt needs a passphrase or --key-file FILE: {why}"
        ))
    })?;
    check_new_passphrase(&secret)?;
    Ok(secret)
}

fn check_new_passphrase(secret: &fieldsync::Secret) -> Result<()> {
    if let fieldsync::Secret::Passphrase(p) = secret {
        if p.chars().count() < MIN_PASSPHRASE_CHARS {
            return Err(CliError::invalid(format!(
                "the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// Writes a secret readable by its owner only.
fn write_secret_file(file: &Path, bytes: &[u8]) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(file)
        .map_err(|e| CliError::invalid(format!("cannot create {}: {e}", file.display())))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| CliError::runtime(format!("{}: {e}", file.display())))
}

/// The commands that work on the store itself, with no daemon: unbounded, with progress.
fn run_on_store(replica: &Replica, command: Command) -> Result<()> {
    match command {
        Command::Authority(AuthorityCommand::Export { file }) => {
            if !replica.is_authority() {
                return Err(CliError::invalid(
                    "only the workspace authority holds the authority key",
                ));
            }
            let secret = passphrase(
                "FIELDSYNC_BACKUP_PASSPHRASE",
                "new passphrase for the backup: ",
                true,
            )
            .map_err(|why| {
                CliError::invalid(format!("authority export needs a passphrase: {why}"))
            })?;
            check_new_passphrase(&secret)?;
            let sealed = replica.export_authority(&secret)?;
            write_secret_file(&file, &sealed)?;
            eprintln!("wrote the authority backup to {}; keep it offline: with its passphrase it signs for the whole workspace", file.display());
            emit(&json!({ "file": file.display().to_string(), "bytes": sealed.len() }))
        }
        Command::Mirror(MirrorCommand::Rebuild { postgres, config }) => {
            let tables = crate::config::load(config.as_deref())?
                .relay
                .postgres_tables;
            let config = fieldsync_mirror::MirrorConfig {
                url: postgres,
                tables,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::runtime(e.to_string()))?;
            let tables = runtime.block_on(async {
                let mut client = fieldsync_mirror::connect(&config.url, None).await?;
                fieldsync_mirror::rebuild(&mut client, replica, &config).await
            });
            let tables = tables.map_err(|e| CliError::runtime(format!("mirror rebuild: {e}")))?;
            eprintln!(
                "emptied {tables} mirror table(s); the relay writes every row again when it runs"
            );
            emit(&json!({ "rebuilt": tables }))
        }
        Command::Bundle(BundleCommand::Export { file, since }) => {
            let peer = since
                .map(|p| parse_id::<PeerId>("peer id", &p))
                .transpose()?;
            let bundle = with_progress("exporting", |p| replica.export_bundle(peer, p))?;
            // Write beside the target, then rename: a half-written bundle never has the name.
            let tmp = file.with_extension("partial");
            std::fs::write(&tmp, &bundle.bytes)
                .map_err(|e| CliError::runtime(format!("{}: {e}", tmp.display())))?;
            std::fs::rename(&tmp, &file)
                .map_err(|e| CliError::runtime(format!("{}: {e}", file.display())))?;
            eprintln!("wrote {} entities to {}", bundle.entities, file.display());
            emit(&json!({
                "file": file.display().to_string(),
                "entities": bundle.entities,
                "bytes": bundle.bytes.len(),
                "since": bundle.since,
                "upto": bundle.upto,
            }))
        }
        Command::Bundle(BundleCommand::Import { file }) => {
            let bytes = read_file(&file)?;
            let summary = with_progress("importing", |p| replica.import_bundle(&bytes, p))?;
            eprintln!(
                "merged {} entities from {}",
                summary.entities,
                file.display()
            );
            emit(&summary)
        }
        Command::Import { collection, file } => {
            let text = String::from_utf8(read_file(&file)?)
                .map_err(|_| CliError::invalid(format!("{} is not UTF-8 text", file.display())))?;
            let n = with_progress("importing", |p| replica.bulk_import(&collection, &text, p))?;
            eprintln!("imported {n} entities into {collection}");
            emit(&json!({ "collection": collection, "imported": n }))
        }
        Command::Export { collection } => {
            stream_views(replica, &collection, &[], false, |mut view| {
                // Plain data plus the id: what `import` takes back.
                view.retain(|k, _| k == "_id" || !k.starts_with('_'));
                view
            })
        }
        _ => unreachable!("cli::run sends the other commands through the API"),
    }
}
