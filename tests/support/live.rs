//! Real nodes in one process: each a replica with the libp2p node running on tokio,
//! listening on 127.0.0.1. Used by the examples that run seed scenarios over the network.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldsync::core::protocol::Role;
use fieldsync::Replica;
use fieldsync_net::{Config, Handle, Notice};
use tokio::sync::{mpsc, watch};

/// A running node.
#[derive(Debug)]
pub struct LiveNode {
    pub name: String,
    pub replica: Arc<Replica>,
    pub handle: Handle,
    /// Its first listening address, `/ip4/127.0.0.1/tcp/…/p2p/…`.
    pub addr: String,
    /// Sync sessions opened and closed so far (from its notices), for failure reports.
    pub sessions: Arc<Sessions>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), fieldsync_net::Error>>,
}

impl LiveNode {
    /// Starts the node of `replica`, dialling `dial`, and waits until it listens.
    pub async fn start(
        name: &str,
        replica: Arc<Replica>,
        role: Role,
        dial: &[String],
    ) -> anyhow::Result<LiveNode> {
        Self::start_with(name, replica, role, dial, |_| {}).await
    }

    /// Like [`Self::start`], with network settings changed by `tweak` (limits, bans).
    pub async fn start_with(
        name: &str,
        replica: Arc<Replica>,
        role: Role,
        dial: &[String],
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<LiveNode> {
        let (handle, inbox) = fieldsync_net::channel();
        let (tx, mut notices) = mpsc::channel(fieldsync_net::NOTICE_QUEUE);
        let (stop, mut stopped) = watch::channel(false);
        let config = Config {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            dial: dial.iter().map(|a| a.parse()).collect::<Result<_, _>>()?,
            role,
            ..Config::default()
        };
        let mut config = config;
        tweak(&mut config);
        let task = tokio::spawn(fieldsync_net::run(
            replica.clone(),
            config,
            inbox,
            tx,
            async move {
                let _ = stopped.changed().await;
            },
        ));
        let addr = loop {
            match tokio::time::timeout(Duration::from_secs(10), notices.recv()).await {
                Ok(Some(Notice::Listening(a))) => break a.to_string(),
                Ok(Some(_)) => continue,
                _ => anyhow::bail!("{name} did not start listening"),
            }
        };
        // Keep draining notices so the node never waits on them; count its sessions.
        let sessions = Arc::new(Sessions::default());
        let counts = sessions.clone();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                match notice {
                    Notice::PeerConnected(_) => counts.opened.fetch_add(1, Ordering::Relaxed),
                    Notice::PeerDisconnected(_) => counts.closed.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
        });
        Ok(LiveNode {
            name: name.to_owned(),
            replica,
            handle,
            addr,
            sessions,
            stop,
            task,
        })
    }

    /// Its sessions and what it refused, in one line (for the error of a test that fails).
    pub fn describe(&self) -> String {
        let security = &self.handle.stats.security;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "{}: sessions {} opened {} closed, feed {}, refused {} sessions {} writes, \
             {} violations, {} floods, {} bans, {} frames ignored",
            self.name,
            get(&self.sessions.opened),
            get(&self.sessions.closed),
            self.replica.feed_seq(),
            get(&security.sessions_refused),
            get(&security.writes_refused),
            get(&security.protocol_violations),
            get(&security.floods),
            get(&security.peers_banned),
            get(&security.frames_ignored),
        )
    }

    /// Writes through the replica and tells the node to offer the change.
    pub async fn put(
        &self,
        collection: &str,
        id: Option<fieldsync::EntityId>,
        patch: &str,
    ) -> anyhow::Result<fieldsync::EntityId> {
        let id = self.replica.put(collection, id, patch)?;
        self.handle.local_change().await;
        Ok(id)
    }

    /// Stops the node (its replica stays open for offline work).
    pub async fn stop(self) -> Arc<Replica> {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.replica
    }
}

/// Sync sessions a [`LiveNode`] opened and closed.
#[derive(Debug, Default)]
pub struct Sessions {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
}

/// Opens (or creates) the replicas of an authority and devices under `root`.
pub fn replicas(
    root: &Path,
    devices: &[&str],
) -> anyhow::Result<(Arc<Replica>, Vec<Arc<Replica>>)> {
    let (hq, devs) = crate::workspace(root, devices)?;
    Ok((Arc::new(hq), devs.into_iter().map(Arc::new).collect()))
}

/// Waits until `check` holds (up to 30 s).
pub async fn until(what: &str, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        if Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
