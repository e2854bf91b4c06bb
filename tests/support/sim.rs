//! A seeded multi-device simulator: real engines on memory stores, on a virtual network
//! with latency, duplication, reordering, partitions, heals and crashes.
//!
//! Everything random comes from one seed, so a failing run is reproduced from its number.
//! Time is virtual: frames are delivered in order of their (random) arrival times.
//!
//! A crash drops a node's engine and replica and keeps only what its store flushed
//! ([`fieldsync_store::MemoryStore::crash`]); a restart reopens the replica from that.
//! [`Network::crash_at_next_flush`] makes the crash happen inside a flush, so the writes
//! being made durable are lost — what a power cut does to a real node. Every write
//! fieldsync acknowledges is durable before the acknowledgement, so nothing acknowledged
//! may be missing afterwards.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::path::PathBuf;

use fieldsync_store::MemoryStore;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fieldsync::core::protocol::{Limits, Role};
use fieldsync::sync::{Config, Engine, Event, Input, Now, Outcome, Task, TaskId};
use fieldsync::sync_host::{self, Watch};
use fieldsync::{Clock, EntityId, PeerId, Replica, View};
use libp2p_identity::ed25519;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::SCHEMA;

/// Virtual time plus seeded ids: what makes a run reproducible from its seed.
struct SimClock {
    /// Virtual ms since the network started, shared by all nodes.
    now: Arc<AtomicU64>,
    rng: Mutex<StdRng>,
}

/// 2026-01-01 in ms: virtual time starts here.
const EPOCH_MS: u64 = 1_767_225_600_000;

impl Clock for SimClock {
    fn now_ms(&self) -> i64 {
        (EPOCH_MS + self.now.load(Ordering::Relaxed)) as i64
    }
    fn new_id(&self) -> uuid::Uuid {
        let mut random = [0u8; 10];
        self.rng
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fill(&mut random);
        uuid::Builder::from_unix_timestamp_millis(
            EPOCH_MS + self.now.load(Ordering::Relaxed),
            &random,
        )
        .into_uuid()
    }
}

/// A node's index in the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub usize);

/// Network faults, all driven by the seed.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// Frame latency range in virtual ms; frames on one link may overtake each other.
    pub latency_ms: (u64, u64),
    /// Probability that a frame is delivered twice.
    pub duplicate: f64,
    /// Probability that a frame kills its connection instead of arriving (a lost link);
    /// the nodes reconnect and resume.
    pub drop_connection: f64,
    /// How long a storage task takes, in virtual ms (tasks may finish out of order).
    pub io_ms: (u64, u64),
}

impl Faults {
    /// A perfect network with zero latency.
    pub fn none() -> Self {
        Faults {
            latency_ms: (0, 0),
            duplicate: 0.0,
            drop_connection: 0.0,
            io_ms: (0, 0),
        }
    }
    /// Latency, reordering, duplication and dropped connections.
    pub fn hostile() -> Self {
        Faults {
            latency_ms: (1, 40),
            duplicate: 0.05,
            drop_connection: 0.002,
            io_ms: (0, 5),
        }
    }
}

struct Node {
    name: String,
    /// Seed of the node's key and ids.
    node_seed: u64,
    /// Stands for the data directory (the store is in memory).
    label: PathBuf,
    store: Arc<MemoryStore>,
    /// The next flush fails and the node crashes there.
    crash_at_flush: bool,
    role: Role,
    live: Option<(Arc<Replica>, Engine, Watch)>,
    /// Bumped at every restart, so tasks and timers of a crashed run are dropped.
    incarnation: u64,
    /// When the engine's next timer is scheduled (virtual ms).
    timer_at: Option<u64>,
    events: Vec<Event>,
}

#[derive(Default, Clone, Copy)]
struct Link {
    /// The links the topology wants (both nodes up and no partition ⇒ connected).
    wanted: bool,
    partitioned: bool,
    connected: bool,
    /// Bumped on every disconnect, so frames of an old connection are dropped.
    epoch: u64,
}

/// Counters of what crossed the network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub frames: u64,
    pub bytes: u64,
}

/// What the virtual clock runs, in order of time.
enum Work {
    /// A frame in flight.
    Frame {
        from: NodeId,
        to: NodeId,
        epoch: u64,
        bytes: Vec<u8>,
    },
    /// A storage task of a node's engine, done when its time comes (tasks finish in any
    /// order, as on a real node's worker pool).
    Io {
        node: NodeId,
        incarnation: u64,
        id: TaskId,
        task: Task,
    },
    /// A node's engine asked to be called at this time.
    Timer { node: NodeId, incarnation: u64 },
}

/// The simulated network.
pub struct Network {
    pub seed: u64,
    rng: StdRng,
    now: u64,
    clock_now: Arc<AtomicU64>,
    seq: u64,
    pub faults: Faults,
    limits: Limits,
    invite: Option<Vec<u8>>,
    nodes: Vec<Node>,
    links: BTreeMap<(NodeId, NodeId), Link>,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    deliveries: BTreeMap<usize, Work>,
    next_delivery: usize,
    pub traffic: Traffic,
    /// Upper bound on deliveries in one `run_until_quiescent`, so a livelock fails loudly.
    pub max_steps: u64,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a < b {
        (a, b)
    } else {
        (b, a)
    }
}

impl Network {
    /// A new empty network driven by `seed`.
    pub fn new(seed: u64, faults: Faults) -> Self {
        Network {
            seed,
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            clock_now: Arc::new(AtomicU64::new(0)),
            seq: 0,
            faults,
            limits: Limits::default(),
            invite: None,
            nodes: Vec::new(),
            links: BTreeMap::new(),
            queue: BinaryHeap::new(),
            deliveries: BTreeMap::new(),
            next_delivery: 0,
            traffic: Traffic::default(),
            max_steps: 5_000_000,
        }
    }

    /// Sets the engines' limits (for nodes added afterwards).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    fn engine(&self, name: &str, replica: &Arc<Replica>, role: Role) -> (Engine, Watch) {
        let config = Config::default()
            .with_role(role)
            .with_limits(self.limits)
            .with_name(name);
        let local = sync_host::local_state(replica).unwrap_or_else(|e| panic!("{name}: {e}"));
        (Engine::new(config, local), Watch::new(replica))
    }

    /// The seed of the next node's key and ids.
    fn node_seed(&self) -> u64 {
        self.seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.nodes.len() as u64 + 1)
    }

    fn key(node_seed: u64) -> ed25519::Keypair {
        let mut bytes = [0u8; 32];
        StdRng::seed_from_u64(node_seed).fill(&mut bytes);
        let secret = ed25519::SecretKey::try_from_bytes(&mut bytes).expect("32 bytes make a key");
        ed25519::Keypair::from(secret)
    }

    fn clock(&self, node_seed: u64) -> Arc<dyn Clock> {
        Arc::new(SimClock {
            now: self.clock_now.clone(),
            rng: Mutex::new(StdRng::seed_from_u64(node_seed ^ 0xC10C)),
        })
    }

    /// Adds the workspace's relay, which is its authority. Must be the first node.
    pub fn add_relay(&mut self, name: &str) -> NodeId {
        assert!(
            self.invite.is_none(),
            "the first relay creates the workspace"
        );
        let (label, store) = (
            PathBuf::from(format!("memory:{name}")),
            Arc::new(MemoryStore::new()),
        );
        let node_seed = self.node_seed();
        let replica =
            Replica::init_authority_on(store.clone(), &label, SCHEMA, name, Self::key(node_seed))
                .expect("init relay");
        let replica = Arc::new(replica.with_clock(self.clock(node_seed)));
        self.invite = Some(vec![]);
        self.push_node(name, node_seed, (label, store), Role::Relay, replica)
    }

    /// Adds a device that joined the workspace.
    pub fn add_device(&mut self, name: &str) -> NodeId {
        assert!(self.invite.is_some(), "add a relay first");
        // One invite per device: an invite admits one device only.
        let invite = self.replica(NodeId(0)).invite();
        let (label, store) = (
            PathBuf::from(format!("memory:{name}")),
            Arc::new(MemoryStore::new()),
        );
        let node_seed = self.node_seed();
        let replica =
            Replica::init_join_on(store.clone(), &label, &invite, name, Self::key(node_seed))
                .expect("init device");
        let replica = Arc::new(replica.with_clock(self.clock(node_seed)));
        self.push_node(name, node_seed, (label, store), Role::Device, replica)
    }

    fn push_node(
        &mut self,
        name: &str,
        node_seed: u64,
        (label, store): (PathBuf, Arc<MemoryStore>),
        role: Role,
        replica: Arc<Replica>,
    ) -> NodeId {
        let (engine, watch) = self.engine(name, &replica, role);
        let live = Some((replica, engine, watch));
        self.nodes.push(Node {
            name: name.into(),
            node_seed,
            label,
            store,
            crash_at_flush: false,
            role,
            live,
            incarnation: 0,
            timer_at: None,
            events: Vec::new(),
        });
        NodeId(self.nodes.len() - 1)
    }

    /// The node's replica (panics if it is crashed).
    pub fn replica(&self, n: NodeId) -> &Arc<Replica> {
        &self.nodes[n.0]
            .live
            .as_ref()
            .unwrap_or_else(|| panic!("{} is down", self.nodes[n.0].name))
            .0
    }

    fn peer(&self, n: NodeId) -> PeerId {
        self.replica(n).peer_id()
    }

    /// Events the node's engine reported so far.
    pub fn events(&self, n: NodeId) -> &[Event] {
        &self.nodes[n.0].events
    }

    /// Wants `a` and `b` connected (whenever both are up and not partitioned).
    pub fn connect(&mut self, a: NodeId, b: NodeId) {
        self.links.entry(pair(a, b)).or_default().wanted = true;
        self.settle_links();
    }

    /// Cuts `a` from `b` until `heal`.
    pub fn partition(&mut self, a: NodeId, b: NodeId) {
        self.links.entry(pair(a, b)).or_default().partitioned = true;
        self.settle_links();
    }

    /// Cuts `n` from everyone until `heal_all`.
    pub fn isolate(&mut self, n: NodeId) {
        let keys: Vec<_> = self
            .links
            .keys()
            .copied()
            .filter(|(a, b)| *a == n || *b == n)
            .collect();
        for k in keys {
            self.links.get_mut(&k).expect("link").partitioned = true;
        }
        self.settle_links();
    }

    /// Ends every partition.
    pub fn heal_all(&mut self) {
        for link in self.links.values_mut() {
            link.partitioned = false;
        }
        self.settle_links();
    }

    /// Crashes `n`: its engine and replica are dropped, its store keeps only what was
    /// flushed; its peers see the connection drop.
    pub fn crash(&mut self, n: NodeId) {
        let keys: Vec<_> = self
            .links
            .keys()
            .copied()
            .filter(|(a, b)| *a == n || *b == n)
            .collect();
        for k in keys {
            self.disconnect(k);
        }
        let node = &mut self.nodes[n.0];
        node.live = None;
        node.incarnation += 1;
        node.timer_at = None;
        node.crash_at_flush = false;
        node.store = Arc::new(
            node.store
                .crash()
                .unwrap_or_else(|e| panic!("{} does not survive its crash: {e}", node.name)),
        );
    }

    /// Makes `n` crash during its next flush: what that flush was making durable is lost,
    /// and nothing it covered was acknowledged. (A write by the app that hits it fails, as
    /// on a real node, and the app must not count it.)
    pub fn crash_at_next_flush(&mut self, n: NodeId) {
        self.nodes[n.0].store.fail_next_flush();
        self.nodes[n.0].crash_at_flush = true;
    }

    /// Whether `n` is up.
    pub fn is_up(&self, n: NodeId) -> bool {
        self.nodes[n.0].live.is_some()
    }

    /// Restarts a crashed node from its store.
    pub fn restart(&mut self, n: NodeId) {
        let node = &self.nodes[n.0];
        let replica = Replica::open_on(node.store.clone(), &node.label)
            .unwrap_or_else(|e| panic!("{} does not reopen: {e}", node.name));
        // A restarted node continues its id stream from a fresh, still seeded, generator.
        let replica =
            Arc::new(replica.with_clock(self.clock(node.node_seed ^ self.now.rotate_left(17))));
        let (engine, watch) = self.engine(&node.name.clone(), &replica, node.role);
        self.nodes[n.0].live = Some((replica, engine, watch));
        self.settle_links();
    }

    fn disconnect(&mut self, k: (NodeId, NodeId)) {
        let Some(link) = self.links.get_mut(&k) else {
            return;
        };
        if !link.connected {
            return;
        }
        link.connected = false;
        link.epoch += 1;
        for (me, other) in [(k.0, k.1), (k.1, k.0)] {
            if self.nodes[me.0].live.is_some() && self.nodes[other.0].live.is_some() {
                let peer = self.peer(other);
                self.input(me, Input::Disconnected(peer));
            }
        }
    }

    /// Connects or disconnects links to match what is wanted, up and unpartitioned.
    fn settle_links(&mut self) {
        let keys: Vec<_> = self.links.keys().copied().collect();
        for k in keys {
            let link = self.links[&k];
            let should = link.wanted
                && !link.partitioned
                && self.nodes[k.0 .0].live.is_some()
                && self.nodes[k.1 .0].live.is_some();
            if should && !link.connected {
                self.links.get_mut(&k).expect("link").connected = true;
                let (pa, pb) = (self.peer(k.0), self.peer(k.1));
                self.input(k.0, Input::Dialed(pb));
                self.input(k.1, Input::Connected(pa));
            } else if !should && link.connected {
                self.disconnect(k);
            }
        }
    }

    /// The time as node `n`'s engine sees it.
    fn now_for(&self, replica: &Replica) -> Now {
        sync_host::now(replica, std::time::Duration::from_millis(self.now))
    }

    /// Feeds an input to a node's engine and routes everything it produces.
    fn input(&mut self, n: NodeId, input: Input) {
        let now = match self.nodes[n.0].live.as_ref() {
            Some((replica, _, _)) => self.now_for(replica),
            None => return,
        };
        let Some((replica, engine, watch)) = self.nodes[n.0].live.as_mut() else {
            return;
        };
        engine.handle(now, input);
        // A write (local or received) may have changed the member list.
        match watch.poll(replica) {
            Ok(changes) => changes.into_iter().for_each(|c| engine.handle(now, c)),
            Err(e) => panic!(
                "seed {}: member list of {}: {e}",
                self.seed, self.nodes[n.0].name
            ),
        }
        self.drain(n);
    }

    /// Schedules `work` at virtual time `at`.
    fn schedule(&mut self, at: u64, work: Work) {
        let id = self.next_delivery;
        self.next_delivery += 1;
        self.deliveries.insert(id, work);
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, id)));
    }

    fn drain(&mut self, n: NodeId) {
        let mut failed = Vec::new();
        loop {
            let Some((_, engine, _)) = self.nodes[n.0].live.as_mut() else {
                return;
            };
            let Some((peer, bytes)) = engine.poll_transmit() else {
                break;
            };
            let Some(to) = self.node_of(peer) else {
                continue;
            };
            let Some(link) = self.links.get(&pair(n, to)).copied() else {
                continue;
            };
            if !link.connected {
                continue;
            }
            self.traffic.frames += 1;
            self.traffic.bytes += bytes.len() as u64;
            let copies = if self.rng.random_bool(self.faults.duplicate) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let (lo, hi) = self.faults.latency_ms;
                let at = self.now
                    + if hi > lo {
                        self.rng.random_range(lo..=hi)
                    } else {
                        lo
                    };
                self.schedule(
                    at,
                    Work::Frame {
                        from: n,
                        to,
                        epoch: link.epoch,
                        bytes: bytes.clone(),
                    },
                );
            }
        }
        loop {
            let incarnation = self.nodes[n.0].incarnation;
            let Some((_, engine, _)) = self.nodes[n.0].live.as_mut() else {
                return;
            };
            let Some((id, task)) = engine.poll_io() else {
                break;
            };
            let (lo, hi) = self.faults.io_ms;
            let at = self.now
                + if hi > lo {
                    self.rng.random_range(lo..=hi)
                } else {
                    lo
                };
            self.schedule(
                at,
                Work::Io {
                    node: n,
                    incarnation,
                    id,
                    task,
                },
            );
        }
        let node = &mut self.nodes[n.0];
        let Some((_, engine, _)) = node.live.as_mut() else {
            return;
        };
        let timeout = engine.poll_timeout().map(|t| t.as_millis() as u64);
        let mut storage_failed = None;
        while let Some(event) = engine.poll_event() {
            match &event {
                Event::SessionFailed { peer, .. } => failed.push(*peer),
                Event::StorageFailed { reason } => storage_failed = Some(reason.clone()),
                _ => {}
            }
            node.events.push(event);
        }
        if let Some(at) = timeout.filter(|at| node.timer_at.is_none_or(|t| *at < t)) {
            node.timer_at = Some(at);
            let incarnation = node.incarnation;
            self.schedule(
                at.max(self.now),
                Work::Timer {
                    node: n,
                    incarnation,
                },
            );
        }
        if let Some(reason) = storage_failed {
            panic!(
                "seed {}: storage of {} failed: {reason}",
                self.seed, self.nodes[n.0].name
            );
        }
        for peer in failed {
            if let Some(to) = self.node_of(peer) {
                self.disconnect(pair(n, to));
            }
        }
    }

    /// Runs a storage task of `n`'s engine and hands it the result. A task that hits the
    /// flush [`Self::crash_at_next_flush`] armed kills the node there, before anything that
    /// flush covered was acknowledged.
    fn run_task(&mut self, n: NodeId, incarnation: u64, id: TaskId, task: Task) {
        if self.nodes[n.0].incarnation != incarnation {
            return; // of a run that crashed
        }
        let Some((replica, _, _)) = self.nodes[n.0].live.as_ref() else {
            return;
        };
        let outcome = sync_host::run_task(replica, task);
        if matches!(outcome, Outcome::Failed(_)) && self.nodes[n.0].crash_at_flush {
            self.crash(n);
            return;
        }
        self.input(n, Input::IoDone(id, outcome));
    }

    fn node_of(&self, peer: PeerId) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|node| {
                node.live
                    .as_ref()
                    .is_some_and(|(r, _, _)| r.peer_id() == peer)
            })
            .map(NodeId)
    }

    /// Writes on a node, as its app would, and lets its engine offer the change.
    pub fn put(
        &mut self,
        n: NodeId,
        collection: &str,
        id: Option<EntityId>,
        patch: &str,
    ) -> EntityId {
        self.try_put(n, collection, id, patch)
            .unwrap_or_else(|e| panic!("put on {}: {e}", self.nodes[n.0].name))
    }

    /// [`Self::put`] on a node that may crash in the write's flush
    /// ([`Self::crash_at_next_flush`]): then the write is not acknowledged (an error) and
    /// the node is down.
    pub fn try_put(
        &mut self,
        n: NodeId,
        collection: &str,
        id: Option<EntityId>,
        patch: &str,
    ) -> Result<EntityId, fieldsync::Error> {
        match self.replica(n).put(collection, id, patch) {
            Ok(id) => {
                let feed_seq = self.replica(n).feed_seq();
                self.input(n, Input::LocalChange { feed_seq });
                Ok(id)
            }
            Err(e) if self.nodes[n.0].crash_at_flush => {
                self.crash(n);
                Err(e)
            }
            Err(e) => panic!("put on {}: {e}", self.nodes[n.0].name),
        }
    }

    /// Runs `f` against a node's replica, then lets its engine offer what changed.
    pub fn write<T>(&mut self, n: NodeId, f: impl FnOnce(&Replica) -> T) -> T {
        let out = f(self.replica(n));
        let feed_seq = self.replica(n).feed_seq();
        self.input(n, Input::LocalChange { feed_seq });
        out
    }

    /// Delivers frames until none are left, reconnecting dropped links. Returns the
    /// number of deliveries.
    pub fn run_until_quiescent(&mut self) -> u64 {
        let steps = self.run_steps(self.max_steps);
        assert!(
            self.queue.is_empty(),
            "seed {}: no quiescence after {steps} deliveries",
            self.seed
        );
        steps
    }

    /// Delivers at most `max` frames (fewer if the network goes quiet).
    pub fn run_steps(&mut self, max: u64) -> u64 {
        let mut steps = 0;
        loop {
            self.settle_links();
            if steps >= max {
                return steps;
            }
            let Some(Reverse((at, _, id))) = self.queue.pop() else {
                return steps;
            };
            steps += 1;
            self.now = self.now.max(at);
            self.clock_now.store(self.now, Ordering::Relaxed);
            let (from, to, epoch, bytes) = match self.deliveries.remove(&id).expect("delivery") {
                Work::Frame {
                    from,
                    to,
                    epoch,
                    bytes,
                } => (from, to, epoch, bytes),
                Work::Io {
                    node,
                    incarnation,
                    id,
                    task,
                } => {
                    self.run_task(node, incarnation, id, task);
                    continue;
                }
                Work::Timer { node, incarnation } => {
                    if self.nodes[node.0].incarnation == incarnation {
                        self.nodes[node.0].timer_at = None;
                        self.input(node, Input::Tick);
                    }
                    continue;
                }
            };
            let k = pair(from, to);
            let Some(link) = self.links.get(&k).copied() else {
                continue;
            };
            if !link.connected || link.epoch != epoch {
                continue; // sent on a connection that is gone
            }
            if self.rng.random_bool(self.faults.drop_connection) {
                self.disconnect(k);
                continue;
            }
            let from = self.peer(from);
            self.input(to, Input::Frame(from, bytes));
        }
    }

    /// The view of an entity on a node (None if absent).
    pub fn view(&self, n: NodeId, collection: &str, id: EntityId) -> Option<View> {
        self.replica(n).get(collection, id).ok()
    }

    /// Every view of a collection on a node, including deleted ones.
    pub fn views(&self, n: NodeId, collection: &str) -> Vec<View> {
        let mut out = Vec::new();
        self.replica(n)
            .list(collection, &[], true, &mut |v| {
                out.push(v);
                true
            })
            .expect("list");
        out
    }

    /// The node's name.
    pub fn name(&self, n: NodeId) -> &str {
        &self.nodes[n.0].name
    }

    /// A random number from the network's seeded generator.
    pub fn random_range(&mut self, range: std::ops::Range<usize>) -> usize {
        self.rng.random_range(range)
    }
}
