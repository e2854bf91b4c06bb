//! Hostile peers built from the project's own code, at the frame level: strangers, revoked
//! members, members reading or writing outside their partitions, forged authority values
//! (under the authority's actor id, with a tampered signature, relayed through a second
//! device). Each is refused, counted, and leaves every honest node's data intact.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjType, ReadDoc, ROOT};
use fieldsync::core::authority::{seq_key, Confirmation};
use fieldsync::core::bundle::{Bundle, Limits as BundleLimits};
use fieldsync::core::membership::MemberRole;
use fieldsync::core::protocol::{Frame, OfferEntry, PageRange, Payload, Role};
use fieldsync::core::{Access, EntityId};
use fieldsync::sync::{Config, Event, Input};
use fieldsync::sync_host::Inline as Engine;
use fieldsync::Replica;
use fieldsync_tests::SCHEMA;

const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;

/// A workspace: the authority `hq` and joined devices, each with its engine.
struct Site {
    _tmp: tempfile::TempDir,
    engines: Vec<Engine>,
    /// Hand-made pages sent so far (each gets its own page numbers).
    injected: u64,
}

impl Site {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let hq = Arc::new(Replica::init_authority(&tmp.path().join("hq"), SCHEMA, "hq").unwrap());
        let engines = vec![Engine::new(hq, Config::default().with_role(Role::Relay)).unwrap()];
        Site {
            _tmp: tmp,
            engines,
            injected: 0,
        }
    }

    /// A device joined with a fresh invite for `user` seeing `tasks` as `tasks_access`.
    fn device(&mut self, name: &str, user: &str, tasks_access: Access) -> usize {
        let partitions = [("tasks".to_owned(), tasks_access)].into();
        let invite = self.engines[0]
            .replica()
            .issue_invite(user, MemberRole::Device, partitions, WEEK_MS)
            .unwrap();
        self.join(name, &invite)
    }

    fn join(&mut self, name: &str, invite: &[u8]) -> usize {
        let r = Arc::new(Replica::init_join(&self._tmp.path().join(name), invite, name).unwrap());
        self.engines
            .push(Engine::new(r, Config::default()).unwrap());
        self.engines.len() - 1
    }

    /// A relay member, joined with a fresh relay invite (an engine in the relay role).
    fn relay(&mut self, name: &str) -> usize {
        let invite = self.engines[0]
            .replica()
            .issue_invite(name, MemberRole::Relay, Default::default(), WEEK_MS)
            .unwrap();
        let r = Arc::new(Replica::init_join(&self._tmp.path().join(name), &invite, name).unwrap());
        self.engines
            .push(Engine::new(r, Config::default().with_role(Role::Relay)).unwrap());
        self.engines.len() - 1
    }

    /// Ends the connection between `a` and `b` (both sides see it go).
    fn disconnect(&mut self, a: usize, b: usize) {
        let (pa, pb) = (self.peer(a), self.peer(b));
        self.engines[a].handle(Input::Disconnected(pb)).unwrap();
        self.engines[b].handle(Input::Disconnected(pa)).unwrap();
        self.run();
    }

    fn r(&self, i: usize) -> &Arc<Replica> {
        self.engines[i].replica()
    }

    fn peer(&self, i: usize) -> fieldsync::PeerId {
        self.r(i).peer_id()
    }

    fn connect(&mut self, a: usize, b: usize) {
        let (pa, pb) = (self.peer(a), self.peer(b));
        self.engines[a].handle(Input::Dialed(pb)).unwrap();
        self.engines[b].handle(Input::Connected(pa)).unwrap();
        self.run();
    }

    /// Delivers frames between all engines until none are left.
    fn run(&mut self) {
        loop {
            let mut moved = false;
            for from in 0..self.engines.len() {
                while let Some((to, bytes)) = self.engines[from].poll_transmit() {
                    let src = self.peer(from);
                    if let Some(dst) = (0..self.engines.len()).find(|&j| self.peer(j) == to) {
                        self.engines[dst].handle(Input::Frame(src, bytes)).unwrap();
                    }
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn events(&mut self, i: usize) -> Vec<Event> {
        std::iter::from_fn(|| self.engines[i].poll_event()).collect()
    }

    /// Sends engine `to` a hand-made page from `from`: an offer of entity `id`, then — as
    /// soon as `to` wants it — `payload`, whatever `from`'s store holds.
    fn inject(&mut self, from: usize, to: usize, payload: Payload) {
        let src = self.peer(from);
        self.injected += 1;
        let seq = 1_000_000 + 2 * self.injected;
        let page = PageRange {
            from: seq,
            upto: seq + 1,
        };
        let offer = Frame::Offer {
            page,
            entries: vec![OfferEntry {
                id: payload.id,
                heads: vec![[7; 32]],
            }],
        };
        self.engines[to]
            .handle(Input::Frame(src, offer.encode()))
            .unwrap();
        let data = Frame::Data {
            page,
            payloads: vec![payload],
            skipped: vec![],
        };
        self.engines[to]
            .handle(Input::Frame(src, data.encode()))
            .unwrap();
        // Drop what `to` answered to the hand-made page.
        while self.engines[to].poll_transmit().is_some() {}
    }
}

fn refused_writes(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .flat_map(|e| match e {
            Event::WritesRefused { reasons, .. } => reasons.clone(),
            _ => vec![],
        })
        .collect()
}

fn peer_refused(events: &[Event]) -> Option<String> {
    events.iter().find_map(|e| match e {
        Event::PeerRefused { reason, .. } => Some(reason.clone()),
        _ => None,
    })
}

fn count(r: &Replica, collection: &str) -> u64 {
    r.status()
        .unwrap()
        .entities
        .get(collection)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

/// The stored document of an entity, as bytes, taken from a full bundle of `r`.
fn stored_doc(r: &Replica, id: EntityId) -> Vec<u8> {
    let bundle = r.export_bundle(None, &mut |_, _| {}).unwrap();
    let bundle = Bundle::decode(&bundle.bytes, BundleLimits::default()).unwrap();
    bundle
        .entities
        .into_iter()
        .find(|e| e.id == id)
        .unwrap()
        .doc
}

/// `doc` with an authority record for `field` added under `actor`: what a hostile member
/// writes with raw Automerge.
fn with_auth_record(doc: &[u8], actor: &[u8], field: &str, seq: u64, record_json: &str) -> Vec<u8> {
    let mut d = AutoCommit::load(doc)
        .unwrap()
        .with_actor(ActorId::from(actor.to_vec()));
    let auth = match d.get(ROOT, "_auth").unwrap() {
        Some((_, id)) => id,
        None => d.put_object(ROOT, "_auth", ObjType::Map).unwrap(),
    };
    let per_field = match d.get(&auth, field).unwrap() {
        Some((_, id)) => id,
        None => d.put_object(&auth, field, ObjType::Map).unwrap(),
    };
    d.put(&per_field, seq_key(seq).as_str(), record_json)
        .unwrap();
    d.save()
}

fn payload(id: EntityId, collection: &str, doc: Vec<u8>) -> Payload {
    Payload {
        id,
        collection: collection.into(),
        full: true,
        chunks: vec![serde_bytes::ByteBuf::from(doc)],
    }
}

#[test]
fn a_stranger_is_refused_before_any_entity_data_and_counted() {
    let mut site = Site::new();
    site.r(0)
        .put("tasks", None, r#"{"title":"secret","assignee":"ana"}"#)
        .unwrap();
    // Knows the workspace (its id, schema and authority key) but holds no invite.
    let bare = {
        let mut v: serde_json::Value = serde_json::from_slice(&site.r(0).invite()).unwrap();
        v.as_object_mut().unwrap().remove("token");
        v.as_object_mut().unwrap().remove("token_secret");
        serde_json::to_vec(&v).unwrap()
    };
    let stranger = site.join("stranger", &bare);
    site.connect(0, stranger);
    let hq_events = site.events(0);
    assert!(
        peer_refused(&hq_events).unwrap().contains("not a member"),
        "{hq_events:?}"
    );
    assert_eq!(
        site.engines[0]
            .engine
            .security()
            .sessions_refused
            .load(Ordering::Relaxed),
        1
    );
    assert_eq!(
        count(site.r(stranger), "tasks"),
        0,
        "entity data reached a stranger"
    );
    assert!(site.engines[0].engine.peers().is_empty());
}

#[test]
fn an_invite_admits_one_device_and_expires() {
    let mut site = Site::new();
    let invite = site
        .r(0)
        .issue_invite("ana", MemberRole::Device, Default::default(), WEEK_MS)
        .unwrap();
    let first = site.join("first", &invite);
    let second = site.join("second", &invite);
    site.connect(0, first);
    assert!(peer_refused(&site.events(0)).is_none());
    assert_eq!(
        site.r(0).members().unwrap().len(),
        1,
        "the first device became a member"
    );
    site.connect(0, second);
    assert!(peer_refused(&site.events(0))
        .unwrap()
        .contains("already used"));
    // An expired invite admits nobody.
    let expired = site
        .r(0)
        .issue_invite("bo", MemberRole::Device, Default::default(), -1)
        .unwrap();
    let late = site.join("late", &expired);
    site.connect(0, late);
    assert!(peer_refused(&site.events(0)).unwrap().contains("expired"));
    assert_eq!(
        site.engines[0]
            .engine
            .security()
            .sessions_refused
            .load(Ordering::Relaxed),
        2
    );
}

#[test]
fn a_refused_or_revoked_device_learns_why() {
    use fieldsync::core::membership::MembershipState;
    let refused_by = |events: &[Event]| {
        events.iter().find_map(|e| match e {
            Event::Refused {
                peer,
                state,
                reason,
            } => Some((*peer, *state, reason.clone())),
            _ => None,
        })
    };
    let mut site = Site::new();
    let hq = site.peer(0);
    let invite = site
        .r(0)
        .issue_invite("ana", MemberRole::Device, Default::default(), WEEK_MS)
        .unwrap();
    let first = site.join("first", &invite);
    let copy = site.join("copy", &invite);
    site.connect(first, 0);
    assert!(refused_by(&site.events(first)).is_none());
    assert_eq!(
        site.r(first).status().unwrap().membership.state,
        MembershipState::Active
    );

    // The same invite from another key: refused by the authority, and the device is told so.
    site.connect(copy, 0);
    let (by, state, reason) =
        refused_by(&site.events(copy)).expect("the copy learns it was refused");
    assert_eq!((by, state), (hq, MembershipState::Refused));
    assert!(reason.contains("already used"), "{reason}");
    let m = site.r(copy).status().unwrap().membership;
    assert_eq!(
        (m.state, m.by.clone()),
        (MembershipState::Refused, Some(hq.to_string()))
    );
    assert!(m.warning().unwrap().contains("will not sync"));
    assert_eq!(
        site.r(0).members().unwrap().len(),
        1,
        "the copy became a member"
    );

    // Revoked while connected: the device is told it is revoked.
    site.r(0).revoke(&site.peer(first)).unwrap();
    site.engines[0].local_change().unwrap();
    site.run();
    let (_, state, reason) =
        refused_by(&site.events(first)).expect("the revoked device learns why");
    assert_eq!(state, MembershipState::Revoked);
    assert!(reason.contains("revoked"), "{reason}");
    assert_eq!(
        site.r(first).status().unwrap().membership.state,
        MembershipState::Revoked
    );
}

#[test]
fn a_revoked_member_is_cut_off_by_the_authority_and_by_devices_that_learn_of_it() {
    let mut site = Site::new();
    let ana = site.device("ana", "ana", Access::All);
    let bo = site.device("bo", "bo", Access::All);
    site.connect(0, ana);
    site.connect(0, bo);
    site.connect(ana, bo);
    site.events(0);
    site.events(ana);
    // hq revokes bo: its open session ends at once…
    site.r(0).revoke(&site.peer(bo)).unwrap();
    site.engines[0].local_change().unwrap();
    site.run();
    assert!(peer_refused(&site.events(0)).unwrap().contains("revoked"));
    // …and ana, who syncs the member list from hq, drops bo too.
    let ana_events = site.events(ana);
    assert!(
        peer_refused(&ana_events).is_some_and(|r| r.contains("revoked")),
        "{ana_events:?}"
    );
    // bo writes and reconnects: refused everywhere, nothing of it arrives.
    site.r(bo)
        .put("tasks", None, r#"{"title":"from a revoked device"}"#)
        .unwrap();
    site.connect(0, bo);
    site.connect(ana, bo);
    assert!(peer_refused(&site.events(0)).unwrap().contains("revoked"));
    let titles = |r: &Replica| {
        let mut t = Vec::new();
        r.list("tasks", &[], true, &mut |v| {
            t.push(v["title"].clone());
            true
        })
        .unwrap();
        t
    };
    assert!(titles(site.r(0)).is_empty() && titles(site.r(ana)).is_empty());
    assert!(
        site.engines[ana]
            .engine
            .security()
            .sessions_refused
            .load(Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn a_member_sees_only_its_partition_in_catch_up_live_pushes_and_bundles() {
    let mut site = Site::new();
    let hq = site.r(0).clone();
    let mine = hq
        .put("tasks", None, r#"{"title":"ana's","assignee":"ana"}"#)
        .unwrap();
    let theirs = hq
        .put("tasks", None, r#"{"title":"bo's","assignee":"bo"}"#)
        .unwrap();
    let ana = site.device("ana", "ana", Access::Own);
    site.connect(0, ana);
    let a = site.r(ana).clone();
    assert!(a.get("tasks", mine).is_ok());
    assert!(
        a.get("tasks", theirs).is_err(),
        "bo's task reached ana in catch-up"
    );
    // Live: a new task for bo is not pushed; one for ana is.
    let bos_new = hq
        .put("tasks", None, r#"{"title":"bo's new","assignee":"bo"}"#)
        .unwrap();
    let anas_new = hq
        .put("tasks", None, r#"{"title":"ana's new","assignee":"ana"}"#)
        .unwrap();
    site.engines[0].local_change().unwrap();
    site.run();
    assert!(a.get("tasks", anas_new).is_ok());
    assert!(
        a.get("tasks", bos_new).is_err(),
        "bo's task reached ana live"
    );
    // Asking for bo's task by id gets nothing, and is counted.
    let want = Frame::Want {
        page: PageRange {
            from: 0,
            upto: hq.feed_seq(),
        },
        wants: vec![fieldsync::core::protocol::WantEntry {
            id: theirs,
            have: vec![],
        }],
    };
    let pa = site.peer(ana);
    site.engines[0]
        .handle(Input::Frame(pa, want.encode()))
        .unwrap();
    let answers: Vec<Vec<u8>> = std::iter::from_fn(|| site.engines[0].poll_transmit())
        .map(|(_, b)| b)
        .collect();
    let data = answers
        .iter()
        .map(|b| Frame::decode(b, 16 << 20).unwrap())
        .find(|f| matches!(f, Frame::Data { .. }));
    assert!(
        matches!(data, Some(Frame::Data { payloads, skipped, .. }) if payloads.is_empty() && skipped == vec![theirs])
    );
    assert_eq!(
        site.engines[0]
            .engine
            .security()
            .reads_refused
            .load(Ordering::Relaxed),
        1
    );
    // A bundle hq makes for ana (of what changed since she last acknowledged) holds only
    // her tasks.
    let anas_offline = hq
        .put(
            "tasks",
            None,
            r#"{"title":"ana's by bundle","assignee":"ana"}"#,
        )
        .unwrap();
    let bos_offline = hq
        .put(
            "tasks",
            None,
            r#"{"title":"bo's by bundle","assignee":"bo"}"#,
        )
        .unwrap();
    let bundle = hq.export_bundle(Some(pa), &mut |_, _| {}).unwrap();
    let ids: Vec<EntityId> = Bundle::decode(&bundle.bytes, BundleLimits::default())
        .unwrap()
        .entities
        .iter()
        .map(|e| e.id)
        .collect();
    assert!(ids.contains(&anas_offline), "{ids:?}");
    assert!(!ids.contains(&bos_offline) && !ids.contains(&theirs) && !ids.contains(&bos_new));
}

#[test]
fn writes_outside_a_partition_are_refused_and_never_applied_anywhere() {
    let mut site = Site::new();
    let hq = site.r(0).clone();
    let ana = site.device("ana", "ana", Access::Own);
    let carl = site.device("carl", "carl", Access::All);
    site.connect(0, ana);
    site.connect(0, carl);
    let a = site.r(ana).clone();
    let mine = hq
        .put("tasks", None, r#"{"title":"ana's","assignee":"ana"}"#)
        .unwrap();
    site.engines[0].local_change().unwrap();
    site.run();
    site.events(0);
    // ana's own node refuses to create a task for bo, or to hand hers to bo.
    let planted = EntityId(uuid::Uuid::from_u128(77));
    let local = a
        .put(
            "tasks",
            Some(planted),
            r#"{"title":"planted","assignee":"bo"}"#,
        )
        .unwrap_err()
        .to_string();
    assert!(local.contains("not to user \"ana\""), "{local}");
    let local = a
        .put(
            "tasks",
            Some(mine),
            r#"{"title":"smuggled","assignee":"bo"}"#,
        )
        .unwrap_err()
        .to_string();
    assert!(local.contains("not to user \"ana\""), "{local}");
    assert_eq!(a.get("tasks", mine).unwrap()["assignee"], "ana");
    assert!(a.get("tasks", planted).is_err());
    // A hostile ana sends them anyway, written with raw Automerge.
    let stored = stored_doc(&a, mine);
    let mut d = AutoCommit::load(&stored)
        .unwrap()
        .with_actor(ActorId::from(site.peer(ana).to_bytes()));
    d.put(ROOT, "assignee", "bo").unwrap();
    d.put(ROOT, "title", "smuggled").unwrap();
    let smuggled = d.save();
    let mut d = AutoCommit::load(&stored)
        .unwrap()
        .fork()
        .with_actor(ActorId::from(site.peer(ana).to_bytes()));
    d.put(ROOT, "assignee", "bo").unwrap();
    d.put(ROOT, "title", "planted").unwrap();
    site.inject(ana, 0, payload(mine, "tasks", smuggled));
    site.inject(ana, 0, payload(planted, "tasks", d.save()));
    let refused = refused_writes(&site.events(0));
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused.iter().all(|r| r.contains("not to user \"ana\"")),
        "{refused:?}"
    );
    assert_eq!(
        site.engines[0]
            .engine
            .security()
            .writes_refused
            .load(Ordering::Relaxed),
        2
    );
    assert!(hq.get("tasks", planted).is_err());
    assert_eq!(hq.get("tasks", mine).unwrap()["title"], "ana's");
    assert_eq!(hq.get("tasks", mine).unwrap()["assignee"], "ana");
    // Never applied anywhere: carl, who sees all tasks, has neither change.
    let c = site.r(carl);
    assert!(c.get("tasks", planted).is_err());
    assert_eq!(c.get("tasks", mine).unwrap()["title"], "ana's");
}

/// A payment the authority confirmed at 50, known to `m`.
fn confirmed_payment(site: &mut Site, m: usize) -> EntityId {
    let hq = site.r(0).clone();
    let id = hq
        .put(
            "payments",
            None,
            r#"{"amount":50,"status":"confirmed","collector":"mallory"}"#,
        )
        .unwrap();
    site.engines[0].local_change().unwrap();
    site.run();
    assert_eq!(site.r(m).get("payments", id).unwrap()["amount"], 50);
    id
}

fn assert_forgery_refused(site: &mut Site, victim: usize, id: EntityId) {
    let events = site.events(victim);
    let refused = refused_writes(&events);
    assert_eq!(refused.len(), 1, "{events:?}");
    assert!(
        refused[0].contains("not signed by the authority") || refused[0].contains("removes"),
        "{refused:?}"
    );
    assert_eq!(
        site.engines[victim]
            .engine
            .security()
            .forged_refused
            .load(Ordering::Relaxed),
        1
    );
    let view = site.r(victim).get("payments", id).unwrap();
    assert_eq!(
        view["amount"], 50,
        "a forged value shows as confirmed: {view:?}"
    );
}

#[test]
fn forged_confirmations_are_refused_with_the_authority_actor_id_and_when_relayed() {
    for relay_through_device in [false, true] {
        let mut site = Site::new();
        let mallory = site.device("mallory", "mallory", Access::All);
        let dora = site.device("dora", "dora", Access::All);
        site.connect(0, mallory);
        site.connect(0, dora);
        site.connect(mallory, dora);
        let id = confirmed_payment(&mut site, mallory);
        for i in 0..site.engines.len() {
            site.events(i);
        }
        // Mallory writes amount 5000 as a confirmation, under the authority's actor id,
        // signed with her own key (the best she can do).
        let ws = site.r(0).workspace().clone();
        let own_key = libp2p_identity::ed25519::Keypair::generate();
        let forged = Confirmation::sign(
            &own_key,
            ws.id,
            id,
            "amount",
            99,
            serde_json::json!(5000),
            None,
        );
        let authority_actor = ws.authority_peer().to_bytes();
        let doc = with_auth_record(
            &stored_doc(site.r(mallory), id),
            &authority_actor,
            "amount",
            99,
            &serde_json::to_string(&forged).unwrap(),
        );
        let victim = if relay_through_device { dora } else { 0 };
        site.inject(mallory, victim, payload(id, "payments", doc));
        assert_forgery_refused(&mut site, victim, id);
        // Nothing was stored, so nothing travels on: hq and dora still agree on 50.
        site.engines[victim].local_change().unwrap();
        site.run();
        assert_eq!(site.r(0).get("payments", id).unwrap()["amount"], 50);
        assert_eq!(site.r(dora).get("payments", id).unwrap()["amount"], 50);
    }
}

#[test]
fn a_tampered_signature_is_refused() {
    let mut site = Site::new();
    let mallory = site.device("mallory", "mallory", Access::All);
    site.connect(0, mallory);
    let id = confirmed_payment(&mut site, mallory);
    site.events(0);
    // The authority's real record for amount, with the value changed and the signature kept.
    let doc = stored_doc(site.r(mallory), id);
    let d = AutoCommit::load(&doc).unwrap();
    let (_, auth) = d.get(ROOT, "_auth").unwrap().unwrap();
    let (_, amount) = d.get(&auth, "amount").unwrap().unwrap();
    let key = d.keys(&amount).next().unwrap();
    let (v, _) = d.get(&amount, key.as_str()).unwrap().unwrap();
    let mut record: Confirmation =
        serde_json::from_str(v.into_scalar().unwrap().as_str().unwrap()).unwrap();
    record.value = serde_json::json!(5000);
    let tampered = with_auth_record(
        &doc,
        &site.peer(mallory).to_bytes(),
        "amount",
        record.seq,
        &serde_json::to_string(&record).unwrap(),
    );
    site.inject(mallory, 0, payload(id, "payments", tampered));
    assert_forgery_refused(&mut site, 0, id);
}

#[test]
fn the_member_list_cannot_be_edited_by_members() {
    let mut site = Site::new();
    let mallory = site.device("mallory", "mallory", Access::Own);
    site.connect(0, mallory);
    site.events(0);
    // Mallory rewrites her own member record to role admin, with her own signature.
    let ws = site.r(0).workspace().clone();
    let mid = fieldsync::core::membership::member_entity_id(ws.id, &site.peer(mallory));
    let mut record = serde_json::to_value(&site.r(0).members().unwrap()[0]).unwrap();
    record["role"] = "admin".into();
    let forged = Confirmation::sign(
        &libp2p_identity::ed25519::Keypair::generate(),
        ws.id,
        mid,
        "record",
        9,
        record,
        None,
    );
    let doc = with_auth_record(
        &stored_doc(site.r(mallory), mid),
        &ws.authority_peer().to_bytes(),
        "record",
        9,
        &serde_json::to_string(&forged).unwrap(),
    );
    site.inject(mallory, 0, payload(mid, "_members", doc));
    assert_eq!(refused_writes(&site.events(0)).len(), 1);
    assert_eq!(
        site.r(0).members().unwrap()[0].grant.role,
        MemberRole::Device
    );
    // And the API refuses local writes to it.
    assert!(site
        .r(mallory)
        .put("_members", Some(mid), r#"{"record":{}}"#)
        .unwrap_err()
        .to_string()
        .contains("built in"));
}

#[test]
fn a_device_does_not_take_in_entities_its_user_may_not_see() {
    let mut site = Site::new();
    let mallory = site.device("mallory", "mallory", Access::Own);
    let dora = site.device("dora", "dora", Access::Own);
    site.connect(0, mallory);
    site.connect(0, dora);
    site.connect(mallory, dora);
    // Mallory's own task is hers to write, but dora's device must not hold it.
    let id = site
        .r(mallory)
        .put(
            "tasks",
            None,
            r#"{"title":"mallory's","assignee":"mallory"}"#,
        )
        .unwrap();
    for i in 0..site.engines.len() {
        site.events(i);
    }
    let doc = stored_doc(site.r(mallory), id);
    site.inject(mallory, dora, payload(id, "tasks", doc));
    let refused = refused_writes(&site.events(dora));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("this node's user may not hold it"),
        "{refused:?}"
    );
    assert!(site.r(dora).get("tasks", id).is_err());
}

/// Invite theft: a device presents its invite to a peer that is not the authority (here a
/// member it dialed); that peer copies the `Hello` and presents the same credential to the
/// authority first, from its own peer id. The credential carries only a proof made for
/// the device's peer id with the invite's one-time key, so the thief is refused and the
/// device still joins.
#[test]
fn a_copied_invite_credential_admits_nobody_and_the_device_still_joins() {
    use fieldsync::core::membership::Credential;
    let mut site = Site::new();
    site.r(0)
        .put("tasks", None, r#"{"title":"secret","assignee":"ana"}"#)
        .unwrap();
    let member = site.device("member", "bo", Access::All);
    site.connect(0, member);
    let members_before = site.r(0).members().unwrap().len();
    let invite = site
        .r(0)
        .issue_invite("ana", MemberRole::Device, Default::default(), WEEK_MS)
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&invite).is_empty()
            && serde_json::from_slice::<serde_json::Value>(&invite).unwrap()["token_secret"]
                .is_string(),
        "the invite file holds the one-time key"
    );
    let device = site.join("device", &invite);

    // The device dials the member; the member's side sees its Hello.
    let (pd, pm) = (site.peer(device), site.peer(member));
    site.engines[device].handle(Input::Dialed(pm)).unwrap();
    let (to, hello) = site.engines[device]
        .poll_transmit()
        .expect("the dialer speaks first");
    assert_eq!(to, pm);
    let Frame::Hello {
        credential: Some(stolen @ Credential::Invite { .. }),
        version,
    } = Frame::decode(&hello, u32::MAX).unwrap()
    else {
        panic!("the device presents its invite")
    };
    let Credential::Invite { token, .. } = &stolen else {
        unreachable!()
    };
    assert!(
        !serde_json::to_string(&stolen).unwrap().contains(
            &serde_json::from_slice::<serde_json::Value>(&invite).unwrap()["token_secret"]
                .as_str()
                .unwrap()
                .to_owned()
        ),
        "the Hello does not carry the key"
    );
    let invite_id = token.id;
    site.engines[device]
        .handle(Input::Disconnected(pm))
        .unwrap();
    while site.engines[device].poll_transmit().is_some() {}

    // The thief, with its own peer id, races the device to the authority.
    let thief = fieldsync::PeerId::from(libp2p_identity::Keypair::generate_ed25519().public());
    site.engines[0].handle(Input::Connected(thief)).unwrap();
    site.engines[0]
        .handle(Input::Frame(
            thief,
            Frame::Hello {
                version,
                credential: Some(stolen),
            }
            .encode(),
        ))
        .unwrap();
    let mut sent_to_thief = vec![];
    while let Some((to, bytes)) = site.engines[0].poll_transmit() {
        if to == thief {
            sent_to_thief.push(Frame::decode(&bytes, u32::MAX).unwrap());
        }
    }
    let reason = peer_refused(&site.events(0)).expect("the thief is refused");
    assert!(reason.contains("without its key"), "{reason}");
    assert!(
        sent_to_thief
            .iter()
            .all(|f| matches!(f, Frame::Goodbye { .. })),
        "the thief got more than a Goodbye: {sent_to_thief:?}"
    );
    assert_eq!(
        site.r(0).members().unwrap().len(),
        members_before,
        "the thief took no member record"
    );

    // The device, presenting its own proof, joins and receives the workspace's data.
    site.connect(0, device);
    assert!(peer_refused(&site.events(0)).is_none());
    let members = site.r(0).members().unwrap();
    assert_eq!(members.len(), members_before + 1);
    assert!(
        members
            .iter()
            .any(|m| m.peer == pd.to_string() && m.invite == Some(invite_id)),
        "{members:?}"
    );
    assert_eq!(count(site.r(device), "tasks"), 1);
}

/// Heads remembered from peers (to skip echoing entities back) are capped over all sessions
/// together, and a node at the cap still syncs everything with everyone.
#[test]
fn remembered_heads_are_capped_across_sessions_and_sync_goes_on() {
    let mut site = Site::new();
    let hq = site.r(0).clone();
    site.engines[0] = Engine::new(
        hq,
        Config::default()
            .with_role(Role::Relay)
            .with_max_remembered_heads(50),
    )
    .unwrap();
    let (a, b) = (
        site.device("a", "ana", Access::All),
        site.device("b", "bo", Access::All),
    );
    for (i, d) in [(0, a), (1, b)] {
        for n in 0..40 {
            site.r(d)
                .put(
                    "tasks",
                    None,
                    &format!(r#"{{"title":"t{i}-{n}","assignee":"ana"}}"#),
                )
                .unwrap();
        }
    }
    site.connect(a, 0);
    site.connect(b, 0);
    for _ in 0..3 {
        for i in 0..3 {
            site.engines[i].local_change().unwrap();
        }
        site.run();
    }
    let remembered = site.engines[0].engine.remembered_heads();
    assert!(
        remembered <= 50,
        "hq remembers {remembered} heads over a cap of 50"
    );
    assert!(
        remembered >= 40,
        "the cap is used, not ignored: {remembered}"
    );
    for i in [0, a, b] {
        assert_eq!(count(site.r(i), "tasks"), 80, "node {i} has every task");
    }
}

/// hq, a relay `office` that hq made a delegate, and device `ana`, joined with hq's invite
/// while hq is away: only the delegate admits her.
fn delegated_office() -> (Site, usize, usize) {
    let mut site = Site::new();
    let office = site.relay("office");
    site.connect(office, 0);
    assert!(
        !site.r(office).confirms().unwrap(),
        "a relay confirms nothing by itself"
    );
    assert!(site.r(office).proposals().is_err());
    let record = site.r(0).delegate(&site.peer(office), true).unwrap();
    assert!(record.delegate);
    site.engines[0].local_change().unwrap();
    site.run();
    assert!(
        site.r(office).confirms().unwrap(),
        "the delegation reached the office"
    );
    let listed = site.r(0).members().unwrap();
    assert!(
        listed
            .iter()
            .any(|m| m.peer == site.peer(office).to_string() && m.delegate),
        "members shows the delegate: {listed:?}"
    );
    site.disconnect(office, 0); // hq goes away
    let invite = site
        .r(0)
        .issue_invite("ana", MemberRole::Device, Default::default(), WEEK_MS)
        .unwrap();
    let ana = site.join("ana", &invite);
    site.connect(ana, office);
    assert!(peer_refused(&site.events(office)).is_none());
    assert!(
        site.r(office)
            .members()
            .unwrap()
            .iter()
            .any(|m| m.peer == site.peer(ana).to_string()),
        "the delegate bound ana's invite"
    );
    (site, office, ana)
}

/// `device` records a payment of 50 (a proposal) and syncs it.
fn propose_payment(site: &mut Site, device: usize) -> EntityId {
    let id = site
        .r(device)
        .put("payments", None, r#"{"amount": 50, "collector": "ana"}"#)
        .unwrap();
    site.engines[device].local_change().unwrap();
    site.run();
    id
}

#[test]
fn a_delegated_relay_confirms_and_admits_while_the_authority_is_away() {
    let (mut site, office, ana) = delegated_office();
    let id = propose_payment(&mut site, ana);
    let proposal = site
        .r(office)
        .proposals()
        .unwrap()
        .into_iter()
        .find(|p| p.entity == id)
        .expect("ana's payment waits at the office");
    site.r(office).accept(proposal.id).unwrap();
    site.engines[office].local_change().unwrap();
    site.run();
    assert!(
        site.r(ana).my_proposals().unwrap().is_empty(),
        "the office's confirmation verifies on ana"
    );
    assert_eq!(site.r(ana).get("payments", id).unwrap()["amount"], 50);

    // hq comes back: it takes the office's confirmation and ana's membership as its own.
    site.connect(office, 0);
    assert!(refused_writes(&site.events(0)).is_empty());
    let view = site.r(0).get("payments", id).unwrap();
    assert_eq!(view["amount"], 50, "{view:?}");
    assert!(
        view.get("_pending")
            .is_none_or(|p| p.as_array().is_some_and(|a| a.is_empty())),
        "{view:?}"
    );
    assert!(site
        .r(0)
        .proposals()
        .unwrap()
        .iter()
        .all(|p| p.entity != id));
    assert!(
        site.r(0)
            .members()
            .unwrap()
            .iter()
            .any(|m| m.peer == site.peer(ana).to_string()),
        "hq knows ana as a member"
    );
    assert!(
        site.r(0).pending_invites().unwrap().is_empty(),
        "ana's invite counts as used at hq"
    );
    site.connect(ana, 0);
    assert!(
        peer_refused(&site.events(0)).is_none(),
        "hq admits ana on the office's record"
    );
}

#[test]
fn a_withdrawn_delegate_confirms_nothing_more_and_its_late_records_are_refused() {
    let (mut site, office, ana) = delegated_office();
    let id = propose_payment(&mut site, ana);
    // The delegation the office holds now, as a thief of its key would keep it.
    let ws = site.r(0).workspace().clone();
    let old = {
        let b = stored_doc(
            site.r(office),
            fieldsync::core::membership::member_entity_id(ws.id, &site.peer(office)),
        );
        let d = AutoCommit::load(&b).unwrap();
        let (_, auth) = d.get(ROOT, "_auth").unwrap().unwrap();
        let (_, rec) = d.get(&auth, "record").unwrap().unwrap();
        let newest = d.keys(&rec).last().unwrap();
        let (v, _) = d.get(&rec, newest.as_str()).unwrap().unwrap();
        serde_json::from_str::<Confirmation>(v.into_scalar().unwrap().as_str().unwrap()).unwrap()
    };
    assert!(old.delegate_key(&ws.authority, ws.id).is_some());

    site.connect(office, 0);
    site.r(0).delegate(&site.peer(office), false).unwrap();
    site.engines[0].local_change().unwrap();
    site.run();
    assert!(!site.r(office).confirms().unwrap());
    let pid = site.r(office).my_proposals().unwrap().len(); // none of its own
    assert_eq!(pid, 0);
    let proposal = site
        .r(0)
        .proposals()
        .unwrap()
        .into_iter()
        .find(|p| p.entity == id)
        .unwrap();
    let err = site.r(office).accept(proposal.id).unwrap_err();
    assert!(err.to_string().contains("authority"), "{err}");
    for i in 0..site.engines.len() {
        site.events(i);
    }

    // The key thief signs amount 5000 with the office's key and its old delegation.
    let key = site.r(office).keypair().try_into_ed25519().unwrap();
    let forged = Confirmation {
        by: Some(Box::new(old)),
        ..Confirmation::sign(&key, ws.id, id, "amount", 1, serde_json::json!(5000), None)
    };
    assert!(
        forged.verify(&ws.authority, ws.id, id, "amount"),
        "the record is well signed"
    );
    let doc = with_auth_record(
        &stored_doc(site.r(office), id),
        &site.peer(office).to_bytes(),
        "amount",
        1,
        &serde_json::to_string(&forged).unwrap(),
    );
    for victim in [0, ana] {
        site.inject(office, victim, payload(id, "payments", doc.clone()));
        let refused = refused_writes(&site.events(victim));
        assert!(
            refused.len() == 1 && refused[0].contains("delegation was withdrawn"),
            "{refused:?}"
        );
        let view = site.r(victim).get("payments", id).unwrap();
        assert_ne!(
            view.get("amount"),
            Some(&serde_json::json!(5000)),
            "{view:?}"
        );
    }
    // The authority still confirms, and its confirmation reaches everyone.
    site.r(0).accept(proposal.id).unwrap();
    site.engines[0].local_change().unwrap();
    site.run();
    assert_eq!(site.r(ana).get("payments", id).unwrap()["amount"], 50);
}
