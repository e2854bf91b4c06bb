//! The `--config` TOML file of `fieldsync run` / `fieldsync relay`: defaults for everything
//! their flags set (flags win). `example.config.toml` documents every key and default.

use std::net::SocketAddr;
use std::path::Path;

use libp2p::Multiaddr;
use serde::Deserialize;

use crate::cli::CliError;

/// Default `cache_mb`: documents kept in memory (MiB).
const DEFAULT_CACHE_MB: u64 = (fieldsync::MemoryOptions::DEFAULT.doc_cache_bytes >> 20) as u64;
/// Default `store_cache_mb`: the store's page cache (MiB).
const DEFAULT_STORE_CACHE_MB: u64 = fieldsync::MemoryOptions::DEFAULT.store_cache_bytes >> 20;
/// Default `store_cache_mb` of a relay. A relay's reads are mostly first syncs, which stream
/// the whole store once (larger than any cache), so a big page cache only holds pages that
/// are not read again — and sled's in-memory pages weigh 2–3× the on-disk bytes it counts
/// against the capacity (32 MiB made ~65 MB of heap serving a 100,000-entity first sync).
/// 8 MiB still holds the tree's index pages and the feed's tail; first-sync time and relay
/// CPU measured the same (node/benches/scale.rs).
pub(crate) const RELAY_DEFAULT_STORE_CACHE_MB: u64 = 8;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct File {
    pub run: Run,
    pub relay: Relay,
    pub net: Net,
    pub api: Api,
    pub blobs: Blobs,
}

/// `[blobs]`: the attachments' blob store, for both (and `attach --config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Blobs {
    /// Largest file one attachment may be, in bytes (default 256 MiB).
    pub max_blob_bytes: u64,
    /// Most bytes all files together may hold (default 10 GiB).
    pub quota_bytes: u64,
    /// A file no live entity references is removed this many seconds after it was stored
    /// or last attached (default 86400).
    pub gc_grace_secs: u64,
    /// Seconds between two collections (default 600).
    pub gc_interval_secs: u64,
    /// Bytes per second this node sends of attachment files to peers, all together
    /// (default 0: as fast as the link allows).
    pub send_bytes_per_sec: u64,
}

impl Default for Blobs {
    fn default() -> Self {
        let d = fieldsync::blobs::Config::default();
        Blobs {
            max_blob_bytes: d.max_blob_bytes,
            quota_bytes: d.quota_bytes,
            gc_grace_secs: 86_400,
            gc_interval_secs: 600,
            send_bytes_per_sec: 0,
        }
    }
}

impl Blobs {
    /// The blob store's limits.
    pub fn store_config(&self) -> fieldsync::blobs::Config {
        fieldsync::blobs::Config::default()
            .with_max_blob_bytes(self.max_blob_bytes)
            .with_quota_bytes(self.quota_bytes)
    }
}

/// `[api]`: who may use the HTTP API, for both.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Every route needs `Authorization: Bearer TOKEN`, not only writes (always so when the
    /// API listens on a non-loopback address).
    pub require_token: bool,
    /// Origins whose web pages may call the API (CORS), e.g. "https://office.example.com";
    /// none by default (CORS off). The console at /console needs none: it is same-origin.
    pub cors_origins: Vec<String>,
}

/// `[run]`: the device daemon.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Run {
    pub relays: Vec<Multiaddr>,
    pub peers: Vec<Multiaddr>,
    pub mdns: bool,
    pub listen: Vec<Multiaddr>,
    pub api: SocketAddr,
    pub cache_mb: u64,
    pub store_cache_mb: u64,
}

impl Default for Run {
    fn default() -> Self {
        Run {
            relays: vec![],
            peers: vec![],
            mdns: false,
            listen: vec![multiaddr("/ip4/0.0.0.0/tcp/0")],
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            cache_mb: DEFAULT_CACHE_MB,
            store_cache_mb: DEFAULT_STORE_CACHE_MB,
        }
    }
}

/// `[relay]`: the relay daemon.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    pub listen: Vec<Multiaddr>,
    pub peers: Vec<Multiaddr>,
    /// Serve circuit relay v2 to non-members too (default false).
    pub open_relay: bool,
    pub api: SocketAddr,
    pub cache_mb: u64,
    pub store_cache_mb: u64,
    /// Mirror every collection into this PostgreSQL database (a libpq URL); none by default.
    pub postgres: Option<String>,
    /// Table names of the mirror, per collection (default: the collection's name).
    pub postgres_tables: std::collections::BTreeMap<String, String>,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            listen: vec![
                multiaddr("/ip4/0.0.0.0/tcp/4001"),
                multiaddr("/ip4/0.0.0.0/udp/4001/quic-v1"),
            ],
            peers: vec![],
            open_relay: false,
            api: SocketAddr::from(([127, 0, 0, 1], 7070)),
            cache_mb: DEFAULT_CACHE_MB,
            store_cache_mb: RELAY_DEFAULT_STORE_CACHE_MB,
            postgres: None,
            postgres_tables: Default::default(),
        }
    }
}

/// `[net]`: connection handling for both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Net {
    pub max_connections: u32,
    pub min_backoff_ms: u64,
    pub max_backoff_ms: u64,
    pub ban_secs: u64,
    pub max_frames_per_sec: u32,
    /// PEM certificate chain and private key for `/tls/ws` (wss) listeners.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// PEM certificates trusted when dialing `/tls/ws`, besides the public web roots.
    pub tls_trust: Vec<std::path::PathBuf>,
}

impl Default for Net {
    fn default() -> Self {
        let d = fieldsync_net::Config::default();
        Net {
            max_connections: d.max_connections,
            min_backoff_ms: d.min_backoff.as_millis() as u64,
            max_backoff_ms: d.max_backoff.as_millis() as u64,
            ban_secs: d.ban.as_secs(),
            max_frames_per_sec: d.max_frames_per_sec,
            tls_cert: None,
            tls_key: None,
            tls_trust: vec![],
        }
    }
}

impl Net {
    /// The WebSocket TLS material named by `tls_cert`, `tls_key` and `tls_trust`, read and
    /// checked now so a bad file fails at start with its name.
    pub fn ws_tls(&self) -> Result<fieldsync_net::WsTls, CliError> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))
        };
        let certs = |path: &Path| -> Result<Vec<Vec<u8>>, CliError> {
            let pem = read(path)?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .map(|c| c.map(|c| c.to_vec()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CliError::invalid(format!("{}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(CliError::invalid(format!(
                    "{}: no PEM certificate in it",
                    path.display()
                )));
            }
            Ok(certs)
        };
        let server = match (&self.tls_cert, &self.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| {
                    CliError::invalid(format!("{}: not a PEM private key: {e}", key.display()))
                })?;
                Some((certs(cert)?, key_der.secret_der().to_vec()))
            }
            _ => {
                return Err(CliError::invalid(
                    "[net] tls_cert and tls_key go together: set both or neither",
                ))
            }
        };
        let trust = self
            .tls_trust
            .iter()
            .map(|p| certs(p))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        Ok(fieldsync_net::WsTls { server, trust })
    }
}

fn multiaddr(s: &str) -> Multiaddr {
    s.parse().unwrap_or_else(|_| Multiaddr::empty())
}

/// Reads the file at `path`, or the defaults when there is none.
pub fn load(path: Option<&Path>) -> Result<File, CliError> {
    let Some(path) = path else {
        return Ok(File::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::invalid(format!("cannot read {}: {e}", path.display())))?;
    let file: File =
        toml::from_str(&text).map_err(|e| CliError::invalid(format!("{}: {e}", path.display())))?;
    for origin in &file.api.cors_origins {
        fieldsync_api::auth::check_origin(origin)
            .map_err(|e| CliError::invalid(format!("{}: [api] {e}", path.display())))?;
    }
    if file.blobs.gc_interval_secs == 0 {
        return Err(CliError::invalid(format!(
            "{}: [blobs] gc_interval_secs must be at least 1",
            path.display()
        )));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses_to_the_defaults() {
        let example: File =
            toml::from_str(include_str!("../../example.config.toml")).expect("example parses");
        let d = File::default();
        assert_eq!(example.run.listen, d.run.listen);
        assert_eq!(example.run.api, d.run.api);
        assert_eq!(example.relay.listen, d.relay.listen);
        assert_eq!(example.relay.api, d.relay.api);
        assert_eq!(example.relay.open_relay, d.relay.open_relay);
        assert_eq!(
            (example.run.cache_mb, example.run.store_cache_mb),
            (d.run.cache_mb, d.run.store_cache_mb)
        );
        assert_eq!(
            (example.relay.cache_mb, example.relay.store_cache_mb),
            (d.relay.cache_mb, d.relay.store_cache_mb)
        );
        assert_eq!(example.net.max_connections, d.net.max_connections);
        assert_eq!(example.net.min_backoff_ms, d.net.min_backoff_ms);
        assert_eq!(example.net.max_backoff_ms, d.net.max_backoff_ms);
        assert_eq!(example.net.ban_secs, d.net.ban_secs);
        assert_eq!(example.net.max_frames_per_sec, d.net.max_frames_per_sec);
        assert!(toml::from_str::<File>("[run]\nlisten = [\"not an address\"]").is_err());
        assert!(toml::from_str::<File>("[run]\nbogus = 1").is_err());
        assert_eq!(
            (example.api.require_token, example.api.cors_origins.len()),
            (d.api.require_token, d.api.cors_origins.len())
        );
        assert_eq!(
            (
                example.blobs.max_blob_bytes,
                example.blobs.quota_bytes,
                example.blobs.gc_grace_secs,
                example.blobs.gc_interval_secs,
                example.blobs.send_bytes_per_sec
            ),
            (
                d.blobs.max_blob_bytes,
                d.blobs.quota_bytes,
                d.blobs.gc_grace_secs,
                d.blobs.gc_interval_secs,
                d.blobs.send_bytes_per_sec
            )
        );
        assert_eq!(d.blobs.max_blob_bytes, 256 << 20);
        let api: File = toml::from_str(
            "[api]\nrequire_token = true\ncors_origins = [\"http://localhost:5173\"]",
        )
        .expect("api parses");
        assert!(api.api.require_token);
        assert_eq!(api.api.cors_origins, ["http://localhost:5173"]);
    }
}
