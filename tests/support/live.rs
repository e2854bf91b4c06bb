//! Real nodes in one process: each a replica with the libp2p node running on tokio,
//! listening on 127.0.0.1. Used by the examples that run seed scenarios over the network.

use std::path::Path;
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
        // Keep draining notices so the node never waits on them.
        tokio::spawn(async move { while notices.recv().await.is_some() {} });
        Ok(LiveNode {
            name: name.to_owned(),
            replica,
            handle,
            addr,
            stop,
            task,
        })
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
