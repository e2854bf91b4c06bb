//! The CLI's data commands, each written once as calls to the HTTP API. A [`Client`]
//! carries the calls to the daemon running on the data directory or, with none running, to
//! the same API in this process (`client.rs`), so both ways answer alike.

use std::path::Path;

use axum::http::Method;
use serde_json::{json, Value};

use crate::cli::{
    emit, parse_id, BlobCommand, BundleCommand, CliError, Command, InviteAction, Result,
    SchemaCommand,
};
use crate::client::{encode, Body, Client, TRANSFER_TIMEOUT};

/// Runs a data command through `client`.
pub(crate) fn run(client: &Client, command: Command) -> Result<()> {
    match command {
        Command::Put {
            collection,
            id_or_patch,
            patch,
            file,
            op_id,
        } => {
            let (id, patch) = crate::cli::put_args(id_or_patch, patch, file)?;
            let collection = encode(&collection);
            let (method, path) = match id {
                Some(id) => (Method::PATCH, format!("/v1/collections/{collection}/{id}")),
                None => (Method::POST, format!("/v1/collections/{collection}")),
            };
            let op = op_header(op_id.as_deref())?;
            let mut written = client.call_with(method, &path, &op.headers(), Body::Json(patch))?;
            // The API's `warning` (this device will not sync) goes to stderr.
            if let Some(warning) = written.as_object_mut().and_then(|o| o.remove("warning")) {
                eprintln!("warning: {}", warning.as_str().unwrap_or_default());
            }
            emit(&written)
        }
        Command::Get { collection, id } => {
            let id: fieldsync::EntityId = parse_id("entity id", &id)?;
            // A deleted entity shows, with `_deleted`.
            emit(&client.get(&format!(
                "/v1/collections/{}/{id}?include_deleted=true",
                encode(&collection)
            ))?)
        }
        Command::List {
            collection,
            filters,
            include_deleted,
        } => {
            // Page by page, each printed as it arrives: any size streams in bounded memory.
            let mut path = format!(
                "/v1/collections/{}?include_deleted={include_deleted}&limit={}",
                encode(&collection),
                fieldsync_api::MAX_PAGE
            );
            for filter in &filters {
                path.push_str(&format!("&where={}", encode(filter)));
            }
            let mut cursor: Option<String> = None;
            loop {
                let page_path = match &cursor {
                    Some(c) => format!("{path}&cursor={}", encode(c)),
                    None => path.clone(),
                };
                let mut page = client.get(&page_path)?;
                emit_array(page["items"].take())?;
                match page["next"].as_str() {
                    Some(next) => cursor = Some(next.to_owned()),
                    None => return Ok(()),
                }
            }
        }
        Command::Delete {
            collection,
            id,
            op_id,
        } => {
            let id: fieldsync::EntityId = parse_id("entity id", &id)?;
            let op = op_header(op_id.as_deref())?;
            emit(&client.call_with(
                Method::DELETE,
                &format!("/v1/collections/{}/{id}", encode(&collection)),
                &op.headers(),
                Body::Empty,
            )?)
        }
        Command::Purge { collection, id } => {
            let id: fieldsync::EntityId = parse_id("entity id", &id)?;
            let purged = client.post(
                &format!("/v1/collections/{}/{id}/purge", encode(&collection)),
                Body::Empty,
            )?;
            eprintln!("purged {collection} {id}; the purge reaches other nodes when they sync");
            emit(&purged)
        }
        Command::History { collection, id } => {
            let id: fieldsync::EntityId = parse_id("entity id", &id)?;
            emit_array(client.get(&format!(
                "/v1/collections/{}/{id}/history",
                encode(&collection)
            ))?)
        }
        Command::Conflicts { all } => emit_array(client.get(&format!("/v1/conflicts?all={all}"))?),
        Command::Resolve {
            conflict_id,
            value_json,
        } => {
            let id: fieldsync::ConflictId = parse_id("conflict id", &conflict_id)?;
            emit(&client.post(
                &format!("/v1/conflicts/{id}/resolve"),
                Body::Json(value_json),
            )?)
        }
        Command::Proposals { mine } => {
            emit_array(client.get(&format!("/v1/proposals?mine={mine}"))?)
        }
        Command::Accept { proposal_ids } => settle_many(client, &proposal_ids, "accept"),
        Command::Reject { proposal_ids } => settle_many(client, &proposal_ids, "reject"),
        Command::Status => emit(&client.get("/v1/status")?),
        Command::Schema(SchemaCommand::Show { version }) => {
            let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
            emit(&client.get(&format!("/v1/schema{query}"))?)
        }
        Command::Schema(SchemaCommand::Diff { file }) => emit(&client.post(
            "/v1/schema/diff",
            Body::Json(crate::cli::read_schema(&file)?),
        )?),
        Command::Schema(SchemaCommand::Push { file }) => {
            let pushed = client.post("/v1/schema", Body::Json(crate::cli::read_schema(&file)?))?;
            eprintln!(
                "published schema version {}; it reaches other nodes when they sync",
                pushed["version"]
            );
            emit(&pushed)
        }
        Command::Sync { timeout } => sync(client, std::time::Duration::from_secs(timeout)),
        Command::Invite {
            action: Some(InviteAction::Cancel { invite_id }),
            ..
        } => {
            let id: uuid::Uuid = parse_id("invite id", &invite_id)?;
            emit(&client.post(&format!("/v1/invites/{id}/cancel"), Body::Empty)?)
        }
        Command::Invite {
            action: None,
            user,
            role,
            partitions,
            valid_hours,
        } => {
            let body = json!({
                "user": user,
                "role": role,
                "partitions": crate::cli::parse_partitions(&partitions)?,
                "valid_secs": valid_hours.saturating_mul(3600),
            });
            // The invite file itself, as `init --join` takes it.
            let invite = client.post("/v1/invites", Body::Json(body.to_string()))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&invite).unwrap_or_default()
            );
            Ok(())
        }
        Command::Members => {
            let members = client.get("/v1/members")?;
            let invites = client.get("/v1/invites")?;
            let array = |v: Value| v.as_array().cloned().unwrap_or_default();
            crate::cli::emit_members(array(members), array(invites))
        }
        Command::Revoke { peer_id } => {
            let peer: fieldsync::PeerId = parse_id("peer id", &peer_id)?;
            emit(&client.post(&format!("/v1/members/{peer}/revoke"), Body::Empty)?)
        }
        Command::Delegate { peer_id, withdraw } => {
            let peer: fieldsync::PeerId = parse_id("peer id", &peer_id)?;
            let method = if withdraw {
                Method::DELETE
            } else {
                Method::POST
            };
            emit(&client.call(method, &format!("/v1/members/{peer}/delegate"), Body::Empty)?)
        }
        Command::Bundle(BundleCommand::Export { file, since }) => {
            bundle_export(client, &file, since.as_deref())
        }
        Command::Bundle(BundleCommand::Import { file }) => bundle_import(client, &file),
        Command::Attach {
            collection,
            id,
            field,
            file,
            mime,
            name,
            config: _,
        } => {
            let source = crate::cli::attach_source(&field, &file, mime, name)?;
            attach(client, &collection, &id, &field, source)
        }
        Command::Blob(BlobCommand::Get { hash, out }) => blob_get(client, &hash, out.as_deref()),
        Command::Init { .. }
        | Command::Run { .. }
        | Command::Relay { .. }
        | Command::ApiToken { .. }
        | Command::Import { .. }
        | Command::Export { .. }
        | Command::Mirror(_)
        | Command::Authority(_) => unreachable!("cli::run runs these on the data directory"),
    }
}

/// An operation id given with `--op-id`, sent as the `Idempotency-Key` header.
struct OpHeader(Option<String>);

impl OpHeader {
    fn headers(&self) -> Vec<(&str, &str)> {
        self.0
            .as_deref()
            .map(|op| ("idempotency-key", op))
            .into_iter()
            .collect()
    }
}

fn op_header(op_id: Option<&str>) -> Result<OpHeader> {
    let op = op_id
        .map(|o| parse_id::<fieldsync::OpId>("op id", o))
        .transpose()?;
    Ok(OpHeader(op.map(|o| o.to_string())))
}

fn emit_array(value: Value) -> Result<()> {
    for item in value.as_array().cloned().unwrap_or_default() {
        emit(&item)?;
    }
    Ok(())
}

/// Asks the daemon to sync and follows its progress until it is caught up.
fn sync(client: &Client, timeout: std::time::Duration) -> Result<()> {
    if !client.is_daemon() {
        return Err(CliError::invalid(
            "`fieldsync sync` needs a running daemon (`fieldsync run`) on this data directory",
        ));
    }
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "syncing [{bar:30}] {pos}/{len} feed entries ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut status = client.post("/v1/sync", Body::Empty)?;
    loop {
        let peers: Vec<&Value> = status["peers"]
            .as_object()
            .map(|p| p.values().filter(|v| v["connected"] == true).collect())
            .unwrap_or_default();
        let (done, total) = peers.iter().fold((0, 0), |(d, t), p| {
            (
                d + p["done"].as_u64().unwrap_or(0),
                t + p["total"].as_u64().unwrap_or(0),
            )
        });
        bar.set_length(total);
        bar.set_position(done);
        let caught_up = !peers.is_empty()
            && peers.iter().all(|p| p["completed"] == true)
            && status["pending_to_relay"] == 0;
        if caught_up {
            bar.finish_and_clear();
            eprintln!("in sync with {} peer(s)", peers.len());
            return emit(&status);
        }
        if started.elapsed() > timeout {
            bar.finish_and_clear();
            let why = if peers.is_empty() {
                "no peer is connected"
            } else {
                "peers are still catching up"
            };
            return Err(CliError::runtime(format!(
                "not in sync after {}s: {why}",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        status = client.get("/v1/status")?;
    }
}

/// Accepts or rejects several proposals in one request; one JSON line per id. Fails (exit
/// 1) if any of them could not be settled, after printing every result.
fn settle_many(client: &Client, ids: &[String], verb: &str) -> Result<()> {
    for id in ids {
        parse_id::<fieldsync::ProposalId>("proposal id", id)?;
    }
    // One id: its own error, exit code included, as for any single command.
    if let [id] = ids {
        return emit(&client.post(&format!("/v1/proposals/{id}/{verb}"), Body::Empty)?);
    }
    let body = json!({ "ids": ids }).to_string();
    let results = client.post(&format!("/v1/proposals/{verb}"), Body::Json(body))?;
    let failed = results
        .as_array()
        .map(|a| a.iter().filter(|r| r["error"].is_string()).count())
        .unwrap_or(0);
    emit_array(results)?;
    if failed > 0 {
        return Err(CliError::runtime(format!(
            "{failed} of {} proposal(s) could not be settled",
            ids.len()
        )));
    }
    Ok(())
}

/// `bundle export` through the daemon: streams `GET /v1/bundle` into FILE (beside it, then
/// renamed) and prints a summary.
fn bundle_export(client: &Client, file: &Path, since: Option<&str>) -> Result<()> {
    let mut path = "/v1/bundle".to_owned();
    if let Some(peer) = since {
        let peer: fieldsync::PeerId = parse_id("peer id", peer)?;
        path.push_str(&format!("?since={peer}"));
    }
    let answer = client.send(Method::GET, &path, &[], Body::Empty, TRANSFER_TIMEOUT)?;
    let (entities, since, upto) = (
        answer.header_u64("fieldsync-entities"),
        answer.header_u64("fieldsync-since"),
        answer.header_u64("fieldsync-upto"),
    );
    let bytes = crate::cli::write_out(&mut answer.into_reader()?, Some(file))?;
    eprintln!("wrote {entities} entities to {}", file.display());
    emit(
        &json!({ "file": file.display().to_string(), "entities": entities, "bytes": bytes, "since": since, "upto": upto }),
    )
}

/// `bundle import` through the daemon: streams FILE to `POST /v1/bundle`.
fn bundle_import(client: &Client, file: &Path) -> Result<()> {
    let from = std::fs::File::open(file)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", file.display())))?;
    let len = from
        .metadata()
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", file.display())))?
        .len();
    if len > fieldsync_api::MAX_BUNDLE_BYTES as u64 {
        return Err(CliError::invalid(format!(
            "{} is {} MiB, over the {} MiB a running daemon takes; stop the daemon and import it on the data directory",
            file.display(),
            len >> 20,
            fieldsync_api::MAX_BUNDLE_BYTES >> 20
        )));
    }
    let body = Body::Stream {
        from: Box::new(from),
        len,
        mime: "application/octet-stream".into(),
    };
    let summary = client
        .send(Method::POST, "/v1/bundle", &[], body, TRANSFER_TIMEOUT)?
        .json()?;
    eprintln!(
        "merged {} entities from {}",
        summary["entities"],
        file.display()
    );
    emit(&summary)
}

/// `attach`: streams FILE to `POST /v1/blobs` (with a progress bar), then adds the
/// reference it answers to the field.
fn attach(
    client: &Client,
    collection: &str,
    id: &str,
    field: &str,
    source: crate::cli::AttachSource,
) -> Result<()> {
    let id: fieldsync::EntityId = parse_id("entity id", id)?;
    // The target first: a mistyped collection, field or id fails before the file is sent.
    let schema = client.get("/v1/schema")?;
    let schema = fieldsync::core::Schema::from_toml(schema["schema"].as_str().unwrap_or(""))
        .map_err(|e| CliError::runtime(format!("the node's schema does not parse: {e}")))?;
    let rule = schema
        .collection(collection)
        .map_err(fieldsync::Error::from)?
        .rule(field)
        .name();
    if rule != "attachments" {
        return Err(CliError::invalid(format!(
            "field {field:?} of {collection:?} has rule {rule}, not attachments; declare it as {{ rule = \"attachments\" }} in the schema"
        )));
    }
    let collection = encode(collection);
    client.get(&format!("/v1/collections/{collection}/{id}"))?;
    // The node's limits first: an oversized file is refused before it is sent.
    let blobs = client.get("/v1/status")?["blobs"].take();
    let limit = blobs["max_blob_bytes"].as_u64().unwrap_or(u64::MAX);
    if source.size > limit {
        return Err(CliError::invalid(
            fieldsync::blobs::Error::TooLarge { limit }.to_string(),
        ));
    }
    let (used, quota) = (
        blobs["bytes"].as_u64().unwrap_or(0),
        blobs["quota_bytes"].as_u64().unwrap_or(u64::MAX),
    );
    if used.saturating_add(source.size) > quota {
        return Err(CliError::invalid(
            fieldsync::blobs::Error::QuotaExceeded {
                quota,
                used,
                needed: source.size,
            }
            .to_string(),
        ));
    }
    let bar = crate::cli::bytes_bar("uploading", source.size);
    let body = Body::Stream {
        from: Box::new(bar.wrap_read(source.file)),
        len: source.size,
        mime: source.mime,
    };
    let path = format!("/v1/blobs?name={}", encode(&source.name));
    let sent = client.send(Method::POST, &path, &[], body, TRANSFER_TIMEOUT);
    bar.finish_and_clear();
    let reference = sent?.json()?;
    emit(&client.post(
        &format!(
            "/v1/collections/{collection}/{id}/attachments/{}",
            encode(field)
        ),
        Body::Json(reference.to_string()),
    )?)
}

/// `blob get`: streams `GET /v1/blobs/{hash}` to FILE or stdout (a daemon first fetches
/// it from its peers if it lacks it).
fn blob_get(client: &Client, hash: &str, out: Option<&Path>) -> Result<()> {
    let hash: fieldsync::blobs::Hash = parse_id("blob hash", hash)?;
    let answer = client.send(
        Method::GET,
        &format!("/v1/blobs/{hash}"),
        &[],
        Body::Empty,
        TRANSFER_TIMEOUT,
    )?;
    let n = crate::cli::write_out(&mut answer.into_reader()?, out)?;
    if let Some(out) = out {
        emit(&json!({ "hash": hash.to_string(), "file": out.display().to_string(), "bytes": n }))?;
    }
    Ok(())
}
