//! The libp2p swarm a node runs: transports (TCP, QUIC, WebSocket, circuit relay), noise
//! and yamux, and the behaviours (connection limits, identify, ping, the sync stream
//! protocol, opt-in mDNS, circuit relay server and client, DCUtR).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fieldsync::sync::SecurityStats;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{dcutr, identify, mdns, noise, ping, relay, tcp, yamux, Multiaddr, PeerId, Swarm};

use crate::{check_listen, Config, Error, Stats, WsTls};

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    limits: libp2p::connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    pub(crate) stream: libp2p_stream::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_server: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
}

/// Peers the engine admitted: the relay serves circuits to these only.
pub(crate) type Admitted = Arc<std::sync::Mutex<HashSet<PeerId>>>;

/// A relay rate limiter that lets admitted members through and counts everyone else.
fn members_only(
    admitted: Admitted,
    security: Arc<SecurityStats>,
    what: &'static str,
) -> Box<dyn relay::RateLimiter> {
    Box::new(move |peer: PeerId, _addr: &Multiaddr, _now| {
        let ok = admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&peer);
        if !ok {
            security.relay_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, what, "circuit relay refused to a peer that is not an admitted member");
        }
        ok
    })
}

/// The largest WebSocket message accepted: noise frames, the largest thing a peer sends in
/// one message, are at most 64 KiB.
const MAX_WS_MESSAGE: usize = 1 << 20;

/// The WebSocket transport (`/ws` and `/tls/ws`) over TCP, with noise and yamux as on TCP:
/// browsers reach a node this way.
pub(crate) fn websocket_transport(
    key: &libp2p::identity::Keypair,
    tls: &WsTls,
) -> Result<
    impl libp2p::Transport<
            Output = (PeerId, libp2p::core::muxing::StreamMuxerBox),
            Error = impl std::error::Error + Send + Sync + 'static,
            Dial = impl Send,
            ListenerUpgrade = impl Send,
        > + Send
        + Unpin
        + 'static,
    Error,
> {
    use libp2p::core::upgrade::Version;
    use libp2p::Transport as _;
    use libp2p_websocket::tls as wstls;
    let tls_error = |e: wstls::Error| Error::Setup(format!("WebSocket TLS: {e}"));
    let mut config = wstls::Config::builder();
    for cert in &tls.trust {
        config
            .add_trust(&wstls::Certificate::new(cert.clone()))
            .map_err(tls_error)?;
    }
    if let Some((chain, key)) = &tls.server {
        config
            .server(
                wstls::PrivateKey::new(key.clone()),
                chain.iter().cloned().map(wstls::Certificate::new),
            )
            .map_err(tls_error)?;
    }
    let mut ws = libp2p_websocket::Config::new(tcp::tokio::Transport::new(
        tcp::Config::default().nodelay(true),
    ));
    ws.set_max_data_size(MAX_WS_MESSAGE)
        .set_tls_config(config.finish());
    Ok(ws
        .upgrade(Version::V1Lazy)
        .authenticate(noise::Config::new(key).map_err(|e| Error::Setup(e.to_string()))?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, libp2p::core::muxing::StreamMuxerBox::new(muxer))))
}

/// Builds the swarm for `config` and starts its listeners. `admitted` is who the relay
/// serves circuits to (kept by the event loop).
pub(crate) fn build(
    keypair: libp2p::identity::Keypair,
    config: &Config,
    stats: &Stats,
    admitted: &Admitted,
) -> Result<Swarm<Behaviour>, Error> {
    let mdns_on = config.mdns;
    let relay_server = config.relay_server;
    let max_connections = config.max_connections;
    let relay_config = {
        let mut c = relay::Config::default();
        if !config.open_relay {
            c.reservation_rate_limiters.push(members_only(
                admitted.clone(),
                stats.security.clone(),
                "reservation",
            ));
            c.circuit_src_rate_limiters.push(members_only(
                admitted.clone(),
                stats.security.clone(),
                "circuit",
            ));
        }
        c
    };
    let websocket = websocket_transport(&keypair, &config.ws_tls)?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_quic()
        .with_other_transport(|_| websocket)
        .map_err(|never: std::convert::Infallible| -> Error { match never {} })?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let id = key.public().to_peer_id();
            // Query every 5 s (libp2p's default is 5 min): a device that missed the first
            // announcement still finds its peers quickly.
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config {
                        query_interval: Duration::from_secs(5),
                        ..Default::default()
                    },
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(
                    libp2p::connection_limits::ConnectionLimits::default()
                        .with_max_established(Some(max_connections)),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/fieldsync/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::default(),
                stream: libp2p_stream::Behaviour::new(),
                mdns: Toggle::from(mdns),
                relay_server: Toggle::from(
                    relay_server.then(|| relay::Behaviour::new(id, relay_config)),
                ),
                relay_client,
                dcutr: dcutr::Behaviour::new(id),
            })
        })
        .map_err(|e| Error::Setup(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    check_listen(&config.listen)?;
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).map_err(|e| Error::Listen {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(swarm)
}
