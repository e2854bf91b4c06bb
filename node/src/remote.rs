//! CLI data commands through a running daemon's HTTP API, so the CLI and the daemon can be
//! used on one data directory at once (the daemon holds the store).

use std::path::Path;

use serde_json::Value;

use crate::cli::{emit, parse_id, BundleCommand, CliError, Command, Result};
use crate::daemon::DAEMON_FILE;

/// The API token of the data directory the daemon runs on: every call sends it (the CLI
/// runs as the owner of the data directory, so it may read the token file).
static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// A request with the token, if the data directory has one.
fn authorised<B>(request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    match TOKEN.get().and_then(Option::as_deref) {
        Some(token) => request.header("authorization", format!("Bearer {token}")),
        None => request,
    }
}

/// The API address of a daemon running on `dir`, if one answers.
pub fn daemon_api(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join(DAEMON_FILE)).ok()?;
    let api = serde_json::from_str::<Value>(&text).ok()?["api"]
        .as_str()?
        .to_owned();
    let _ = TOKEN.set(fieldsync_api::auth::read_token(dir).ok().flatten());
    // A daemon killed with SIGKILL leaves its file behind: only trust one that answers.
    authorised(agent().get(format!("{api}/v1/status")))
        .call()
        .ok()
        .filter(|r| r.status().is_success())
        .map(|_| api)
}

fn agent() -> ureq::Agent {
    agent_for(std::time::Duration::from_secs(60))
}

/// Bundles can be large: their transfers get longer than other calls.
const BUNDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

fn agent_for(timeout: std::time::Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// Sends one request; the JSON answer, or the API's error mapped to the CLI's exit codes.
fn call(method: &str, url: &str, body: Option<&str>) -> Result<Value> {
    call_op(method, url, body, None)
}

/// A call carrying an operation id as its `Idempotency-Key`.
fn call_op(method: &str, url: &str, body: Option<&str>, op: Option<&str>) -> Result<Value> {
    let agent = agent();
    let key = op.unwrap_or("");
    let sent = match (method, body, op.is_some()) {
        ("GET", _, _) => authorised(agent.get(url)).call(),
        ("DELETE", _, false) => authorised(agent.delete(url)).call(),
        ("DELETE", _, true) => authorised(agent.delete(url))
            .header("idempotency-key", key)
            .call(),
        ("POST", b, false) => authorised(agent.post(url))
            .header("content-type", "application/json")
            .send(b.unwrap_or("")),
        ("POST", b, true) => authorised(agent.post(url))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .send(b.unwrap_or("")),
        ("PATCH", b, false) => authorised(agent.patch(url))
            .header("content-type", "application/json")
            .send(b.unwrap_or("")),
        ("PATCH", b, true) => authorised(agent.patch(url))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .send(b.unwrap_or("")),
        _ => return Err(CliError::runtime(format!("unsupported method {method}"))),
    };
    let mut response = sent
        .map_err(|e| CliError::runtime(format!("the daemon's API at {url} did not answer: {e}")))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| CliError::runtime(e.to_string()))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    let message = || {
        value["error"]
            .as_str()
            .unwrap_or("request failed")
            .to_owned()
    };
    match status {
        200..=299 => Ok(value),
        // As without a daemon: refused input, what only the authority may do, and an id
        // taken by something else exit 2.
        400 | 403 | 409 | 413 | 507 => Err(CliError::invalid(message())),
        404 => Err(CliError::not_found(message())),
        _ => Err(CliError::runtime(message())),
    }
}

fn emit_array(value: Value) -> Result<()> {
    for item in value.as_array().cloned().unwrap_or_default() {
        emit(&item)?;
    }
    Ok(())
}

/// Percent-encodes a query value.
fn query(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Asks the daemon to sync and follows its progress until it is caught up.
fn sync(api: &str, timeout: std::time::Duration) -> Result<()> {
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "syncing [{bar:30}] {pos}/{len} feed entries ({elapsed})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut status = call("POST", &format!("{api}/v1/sync"), None)?;
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
        status = call("GET", &format!("{api}/v1/status"), None)?;
    }
}

/// Accepts or rejects several proposals in one request; one JSON line per id. Fails (exit
/// 1) if any of them could not be settled, after printing every result.
fn settle_many(api: &str, ids: &[String], verb: &str) -> Result<()> {
    for id in ids {
        parse_id::<fieldsync::ProposalId>("proposal id", id)?;
    }
    let body = serde_json::json!({ "ids": ids }).to_string();
    let results = call("POST", &format!("{api}/v1/proposals/{verb}"), Some(&body))?;
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
/// renamed, as without a daemon) and prints the same summary.
fn bundle_export(api: &str, file: &Path, since: Option<&str>) -> Result<()> {
    let mut url = format!("{api}/v1/bundle");
    if let Some(peer) = since {
        let peer: fieldsync::PeerId = parse_id("peer id", peer)?;
        url.push_str(&format!("?since={peer}"));
    }
    let mut response = authorised(agent_for(BUNDLE_TIMEOUT).get(&url))
        .call()
        .map_err(|e| CliError::runtime(format!("the daemon's API at {url} did not answer: {e}")))?;
    if !response.status().is_success() {
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        return Err(api_error(status, &text));
    }
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (entities, since, upto) = (
        header("fieldsync-entities"),
        header("fieldsync-since"),
        header("fieldsync-upto"),
    );
    let tmp = file.with_extension("partial");
    let written = (|| {
        let mut out = std::fs::File::create(&tmp)?;
        let n = std::io::copy(
            &mut response.body_mut().with_config().limit(u64::MAX).reader(),
            &mut out,
        )?;
        out.sync_all()?;
        Ok::<u64, std::io::Error>(n)
    })();
    let bytes = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(CliError::runtime(format!("{}: {e}", tmp.display())));
        }
    };
    std::fs::rename(&tmp, file)
        .map_err(|e| CliError::runtime(format!("{}: {e}", file.display())))?;
    eprintln!("wrote {entities} entities to {}", file.display());
    emit(
        &serde_json::json!({ "file": file.display().to_string(), "entities": entities, "bytes": bytes, "since": since, "upto": upto }),
    )
}

/// `bundle import` through the daemon: `POST /v1/bundle`.
fn bundle_import(api: &str, file: &Path) -> Result<()> {
    let size = std::fs::metadata(file)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", file.display())))?
        .len();
    if size > fieldsync_api::MAX_BUNDLE_BYTES as u64 {
        return Err(CliError::invalid(format!(
            "{} is {} MiB, over the {} MiB a running daemon takes; stop the daemon and import it on the data directory",
            file.display(),
            size >> 20,
            fieldsync_api::MAX_BUNDLE_BYTES >> 20
        )));
    }
    let bytes = std::fs::read(file)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", file.display())))?;
    let url = format!("{api}/v1/bundle");
    let mut response = authorised(agent_for(BUNDLE_TIMEOUT).post(&url))
        .header("content-type", "application/octet-stream")
        .send(&bytes[..])
        .map_err(|e| CliError::runtime(format!("the daemon's API at {url} did not answer: {e}")))?;
    let summary = json_answer(&mut response)?;
    eprintln!(
        "merged {} entities from {}",
        summary["entities"],
        file.display()
    );
    emit(&summary)
}

/// `attach` through the daemon: streams FILE to `POST /v1/blobs` (with a progress bar),
/// then adds the reference it answers to the field.
fn attach(
    api: &str,
    collection: &str,
    id: &str,
    field: &str,
    source: crate::cli::AttachSource,
) -> Result<()> {
    let id: fieldsync::EntityId = parse_id("entity id", id)?;
    // The target first: a mistyped id fails before the file is sent.
    call(
        "GET",
        &format!("{api}/v1/collections/{}/{id}", query(collection)),
        None,
    )?;
    // The daemon's limits first: an oversized file is refused before it is sent.
    let blobs = call("GET", &format!("{api}/v1/status"), None)?["blobs"].take();
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
    let url = format!("{api}/v1/blobs?name={}", query(&source.name));
    let bar = crate::cli::bytes_bar("uploading", source.size);
    let body = ureq::SendBody::from_owned_reader(bar.wrap_read(source.file));
    let sent = authorised(agent_for(BUNDLE_TIMEOUT).post(&url))
        .header("content-type", &source.mime)
        .header("content-length", source.size.to_string())
        .send(body);
    bar.finish_and_clear();
    let mut response = sent
        .map_err(|e| CliError::runtime(format!("the daemon's API at {url} did not answer: {e}")))?;
    let reference = json_answer(&mut response)?;
    emit(&call(
        "POST",
        &format!(
            "{api}/v1/collections/{}/{id}/attachments/{}",
            query(collection),
            query(field)
        ),
        Some(&reference.to_string()),
    )?)
}

/// `blob get` through the daemon: streams `GET /v1/blobs/{hash}` to FILE or stdout.
fn blob_get(api: &str, hash: &str, out: Option<&Path>) -> Result<()> {
    let hash: fieldsync::blobs::Hash = parse_id("blob hash", hash)?;
    let url = format!("{api}/v1/blobs/{hash}");
    let mut response = authorised(agent_for(BUNDLE_TIMEOUT).get(&url))
        .call()
        .map_err(|e| CliError::runtime(format!("the daemon's API at {url} did not answer: {e}")))?;
    let status = response.status().as_u16();
    if !response.status().is_success() {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        return Err(api_error(status, &text));
    }
    let n = crate::cli::write_out(
        &mut response.body_mut().with_config().limit(u64::MAX).reader(),
        out,
    )?;
    if let Some(out) = out {
        emit(
            &serde_json::json!({ "hash": hash.to_string(), "file": out.display().to_string(), "bytes": n }),
        )?;
    }
    Ok(())
}

/// An API error answer as the CLI's error (exit codes as for every command).
fn api_error(status: u16, text: &str) -> CliError {
    let value: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let message = value["error"]
        .as_str()
        .unwrap_or("request failed")
        .to_owned();
    match status {
        400 | 403 | 409 | 413 | 507 => CliError::invalid(message),
        404 => CliError::not_found(message),
        _ => CliError::runtime(message),
    }
}

/// Runs a data command against the daemon at `api`.
pub fn run(api: &str, command: Command) -> Result<()> {
    match command {
        Command::Put {
            collection,
            id_or_patch,
            patch,
            file,
            op_id,
        } => {
            let (id, patch) = crate::cli::put_args(id_or_patch, patch, file)?;
            let op = op_id
                .as_deref()
                .map(|o| parse_id::<fieldsync::OpId>("op id", o))
                .transpose()?
                .map(|o| o.to_string());
            let mut written = match id {
                Some(id) => call_op(
                    "PATCH",
                    &format!("{api}/v1/collections/{collection}/{id}"),
                    Some(&patch),
                    op.as_deref(),
                )?,
                None => call_op(
                    "POST",
                    &format!("{api}/v1/collections/{collection}"),
                    Some(&patch),
                    op.as_deref(),
                )?,
            };
            // The API's `warning` (this device will not sync) goes to stderr, as without a daemon.
            if let Some(warning) = written.as_object_mut().and_then(|o| o.remove("warning")) {
                eprintln!("warning: {}", warning.as_str().unwrap_or_default());
            }
            emit(&written)
        }
        Command::Get { collection, id } => {
            let id: fieldsync::EntityId = parse_id("entity id", &id)?;
            // Like `get` without a daemon: a deleted entity shows with `_deleted`.
            emit(&call(
                "GET",
                &format!("{api}/v1/collections/{collection}/{id}?include_deleted=true"),
                None,
            )?)
        }
        Command::List {
            collection,
            filters,
            include_deleted,
        } => {
            // Page by page, each printed as it arrives: any size streams in bounded memory.
            let mut url = format!(
                "{api}/v1/collections/{collection}?include_deleted={include_deleted}&limit={}",
                fieldsync_api::MAX_PAGE
            );
            for filter in &filters {
                url.push_str(&format!("&where={}", query(filter)));
            }
            let mut cursor: Option<String> = None;
            loop {
                let page_url = match &cursor {
                    Some(c) => format!("{url}&cursor={}", query(c)),
                    None => url.clone(),
                };
                let mut page = call("GET", &page_url, None)?;
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
            let op = op_id
                .as_deref()
                .map(|o| parse_id::<fieldsync::OpId>("op id", o))
                .transpose()?
                .map(|o| o.to_string());
            emit(&call_op(
                "DELETE",
                &format!("{api}/v1/collections/{collection}/{id}"),
                None,
                op.as_deref(),
            )?)
        }
        Command::History { collection, id } => {
            let id: fieldsync::EntityId = parse_id("entity id", &id)?;
            emit_array(call(
                "GET",
                &format!("{api}/v1/collections/{collection}/{id}/history"),
                None,
            )?)
        }
        Command::Conflicts { all } => {
            emit_array(call("GET", &format!("{api}/v1/conflicts?all={all}"), None)?)
        }
        Command::Resolve {
            conflict_id,
            value_json,
        } => {
            let id: fieldsync::ConflictId = parse_id("conflict id", &conflict_id)?;
            emit(&call(
                "POST",
                &format!("{api}/v1/conflicts/{id}/resolve"),
                Some(&value_json),
            )?)
        }
        Command::Proposals { mine } => emit_array(call(
            "GET",
            &format!("{api}/v1/proposals?mine={mine}"),
            None,
        )?),
        Command::Accept { proposal_ids } => settle_many(api, &proposal_ids, "accept"),
        Command::Reject { proposal_ids } => settle_many(api, &proposal_ids, "reject"),
        Command::Status => emit(&call("GET", &format!("{api}/v1/status"), None)?),
        Command::Schema(crate::cli::SchemaCommand::Show { version }) => {
            let query = version.map(|v| format!("?version={v}")).unwrap_or_default();
            emit(&call("GET", &format!("{api}/v1/schema{query}"), None)?)
        }
        Command::Schema(crate::cli::SchemaCommand::Diff { file }) => emit(&call(
            "POST",
            &format!("{api}/v1/schema/diff"),
            Some(&crate::cli::read_schema(&file)?),
        )?),
        Command::Schema(crate::cli::SchemaCommand::Push { file }) => emit(&call(
            "POST",
            &format!("{api}/v1/schema"),
            Some(&crate::cli::read_schema(&file)?),
        )?),
        Command::Sync { timeout } => sync(api, std::time::Duration::from_secs(timeout)),
        Command::Invite {
            action: Some(crate::cli::InviteAction::Cancel { invite_id }),
            ..
        } => {
            let id: uuid::Uuid = parse_id("invite id", &invite_id)?;
            emit(&call(
                "POST",
                &format!("{api}/v1/invites/{id}/cancel"),
                None,
            )?)
        }
        Command::Invite {
            action: None,
            user,
            role,
            partitions,
            valid_hours,
        } => {
            let body = serde_json::json!({
                "user": user,
                "role": role,
                "partitions": crate::cli::parse_partitions(&partitions)?,
                "valid_secs": valid_hours.saturating_mul(3600),
            });
            println!(
                "{}",
                serde_json::to_string_pretty(&call(
                    "POST",
                    &format!("{api}/v1/invites"),
                    Some(&body.to_string())
                )?)
                .unwrap_or_default()
            );
            Ok(())
        }
        Command::Members => {
            let members = call("GET", &format!("{api}/v1/members"), None)?;
            let invites = call("GET", &format!("{api}/v1/invites"), None)?;
            let array = |v: Value| v.as_array().cloned().unwrap_or_default();
            crate::cli::emit_members(array(members), array(invites))
        }
        Command::Revoke { peer_id } => {
            let peer: fieldsync::PeerId = parse_id("peer id", &peer_id)?;
            emit(&call(
                "POST",
                &format!("{api}/v1/members/{peer}/revoke"),
                None,
            )?)
        }
        Command::Delegate { peer_id, withdraw } => {
            let peer: fieldsync::PeerId = parse_id("peer id", &peer_id)?;
            let method = if withdraw { "DELETE" } else { "POST" };
            emit(&call(
                method,
                &format!("{api}/v1/members/{peer}/delegate"),
                None,
            )?)
        }
        Command::Bundle(BundleCommand::Export { file, since }) => {
            bundle_export(api, &file, since.as_deref())
        }
        Command::Bundle(BundleCommand::Import { file }) => bundle_import(api, &file),
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
            attach(api, &collection, &id, &field, source)
        }
        Command::Blob(crate::cli::BlobCommand::Get { hash, out }) => {
            blob_get(api, &hash, out.as_deref())
        }
        Command::Import { .. } | Command::Export { .. } | Command::Mirror(_) => {
            Err(CliError::invalid(
                "a daemon is running on this data directory; stop it (Ctrl-C) for this command",
            ))
        }
        Command::Init { .. } | Command::Run { .. } | Command::Relay { .. } => Err(
            CliError::invalid("a daemon is already running on this data directory"),
        ),
        Command::ApiToken { .. } => unreachable!("handled by cli::run"),
        Command::Purge { collection, id } => {
            parse_id::<fieldsync::EntityId>("entity id", &id)?;
            emit(&call(
                "POST",
                &format!(
                    "{api}/v1/collections/{}/{}/purge",
                    query(&collection),
                    query(&id)
                ),
                None,
            )?)
        }
        Command::Authority(_) => Err(CliError::invalid(
            "stop the daemon first: `authority export` reads the key from the store",
        )),
    }
}

/// A daemon's JSON answer, or its error as the CLI reports it.
fn json_answer(response: &mut ureq::http::Response<ureq::Body>) -> Result<Value> {
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| CliError::runtime(e.to_string()))?;
    if !(200..300).contains(&status) {
        return Err(api_error(status, &text));
    }
    serde_json::from_str(&text).map_err(|e| CliError::runtime(format!("the daemon answered {e}")))
}
