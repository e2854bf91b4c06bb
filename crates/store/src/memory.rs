//! The memory engine: the same layout as sled's, in a map, for the simulator and tests.
//!
//! What a commit writes is visible at once but durable only after a flush, like a page
//! cache: [`MemoryStore::crash`] keeps only what was flushed (a power cut), so a test can
//! check that nothing acknowledged is lost. Flushes can be paused (a slow disk) and made to
//! fail (an fsync error), the moments when a real node holds writes it has not made
//! durable.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use crate::{Error, Kv, KvPair, KvStore, KvWrite};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Default)]
struct State {
    /// What reads see: everything applied.
    live: Map,
    /// What a crash keeps: everything flushed.
    durable: Map,
    /// Batches applied since the last flush, oldest first.
    unflushed: Vec<Vec<KvWrite>>,
    paused: bool,
    fail_next_flush: bool,
    /// Flushed writes not yet taken by [`MemoryStore::take_flushed`] (journaled stores).
    journal: Option<Vec<KvWrite>>,
}

/// A map with a durable part, as a [`Kv`].
#[derive(Debug, Default, Clone)]
pub struct MemKv {
    state: Arc<(Mutex<State>, Condvar)>,
}

fn apply_to(map: &mut Map, batch: &[KvWrite]) {
    for (k, v) in batch {
        match v {
            Some(v) => map.insert(k.clone(), v.clone()),
            None => map.remove(k),
        };
    }
}

impl MemKv {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Kv for MemKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.lock().live.get(key).cloned())
    }

    fn scan(
        &self,
        start: &[u8],
        limit: usize,
        keep: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<Vec<KvPair>, Error> {
        let state = self.lock();
        Ok(state
            .live
            .range(start.to_vec()..)
            .take(limit)
            .take_while(|(k, _)| keep(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last_key(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        let state = self.lock();
        Ok(state
            .live
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .last()
            .map(|(k, _)| k.clone()))
    }

    fn apply(&self, batch: Vec<KvWrite>) -> Result<(), Error> {
        let mut state = self.lock();
        apply_to(&mut state.live, &batch);
        state.unflushed.push(batch);
        Ok(())
    }

    fn flush(&self) -> Result<(), Error> {
        let (lock, resumed) = &*self.state;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        while state.paused {
            state = resumed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if std::mem::take(&mut state.fail_next_flush) {
            return Err(Error::Simulated("the flush failed".into()));
        }
        let batches = std::mem::take(&mut state.unflushed);
        match &mut state.journal {
            // The durable copy lives elsewhere: the caller takes the writes there.
            Some(journal) => journal.extend(batches.into_iter().flatten()),
            None => {
                for batch in &batches {
                    apply_to(&mut state.durable, batch);
                }
            }
        }
        Ok(())
    }
}

/// The memory engine; see the module docs.
pub type MemoryStore = KvStore<MemKv>;

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        // An empty map holds no layout to misread.
        KvStore::on(MemKv::default()).unwrap_or_else(|_| unreachable!("an empty map opens"))
    }

    /// A store whose durable copy is kept by the caller (a browser's IndexedDB): it starts
    /// from `pairs` (that copy, as saved), and every flush hands its writes to
    /// [`Self::take_flushed`] instead of keeping them. What the caller has not saved yet is
    /// not durable, so it must save them before saying anything is.
    pub fn journaled(pairs: impl IntoIterator<Item = KvPair>) -> Result<Self, Error> {
        let kv = MemKv::default();
        {
            let mut state = kv.lock();
            state.live = pairs.into_iter().collect();
            state.journal = Some(Vec::new());
        }
        KvStore::on(kv)
    }

    /// The writes flushed since the last call, oldest first (`None`: remove the key); empty
    /// for a store that is not journaled.
    pub fn take_flushed(&self) -> Vec<KvWrite> {
        self.kv
            .lock()
            .journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// A power cut: the store as it would reopen, with only what was flushed. This store
    /// should not be used afterwards (as a crashed process's handles are gone).
    pub fn crash(&self) -> Result<MemoryStore, Error> {
        let durable = self.kv.lock().durable.clone();
        let kv = MemKv::default();
        {
            let mut state = kv.lock();
            state.live = durable.clone();
            state.durable = durable;
        }
        KvStore::on(kv)
    }

    /// Commits applied but not flushed.
    pub fn unflushed(&self) -> usize {
        self.kv.lock().unflushed.len()
    }

    /// Holds every flush (and so every `wait_durable`) until [`Self::resume_flushes`].
    pub fn pause_flushes(&self) {
        self.kv.lock().paused = true;
    }

    pub fn resume_flushes(&self) {
        self.kv.lock().paused = false;
        self.kv.state.1.notify_all();
    }

    /// Makes the next flush fail, leaving its writes undurable; like a failed fsync, the
    /// store then refuses further flushes until it is reopened (after [`Self::crash`]).
    pub fn fail_next_flush(&self) {
        self.kv.lock().fail_next_flush = true;
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DocWrite, EntityWrite, Store};

    fn write(id: u8) -> EntityWrite {
        EntityWrite {
            id: [id; 16],
            collection: "tasks".into(),
            doc: DocWrite::Snapshot(vec![id]),
            view: vec![id],
            heads: vec![[id; 32]],
            index: vec![],
        }
    }

    #[test]
    fn a_journaled_store_hands_over_what_it_flushed_and_reopens_from_it() {
        let s = MemoryStore::journaled([]).unwrap();
        let t = s.commit(vec![write(1)], vec![]).unwrap();
        assert!(
            s.take_flushed().is_empty(),
            "nothing is flushed before wait_durable"
        );
        s.wait_durable(t).unwrap();
        let writes = s.take_flushed();
        assert!(!writes.is_empty());
        assert!(
            s.take_flushed().is_empty(),
            "each write is handed over once"
        );
        // The caller's copy, as saved, opens to the same store.
        let mut saved = BTreeMap::new();
        apply_to(&mut saved, &writes);
        let again = MemoryStore::journaled(saved).unwrap();
        assert_eq!(again.record(&[1; 16]).unwrap(), s.record(&[1; 16]).unwrap());
        assert!(again.record(&[1; 16]).unwrap().is_some());
        assert_eq!(again.last_seq(), s.last_seq());
    }

    #[test]
    fn a_crash_keeps_what_was_flushed_and_nothing_else() {
        let s = MemoryStore::new();
        let t = s
            .commit(vec![write(1)], vec![("m".into(), Some(b"1".to_vec()))])
            .unwrap();
        s.wait_durable(t).unwrap();
        s.commit(vec![write(2)], vec![("m".into(), Some(b"2".to_vec()))])
            .unwrap();
        assert_eq!(s.unflushed(), 1);
        assert!(
            s.load_doc(&[2; 16]).unwrap().is_some(),
            "an unflushed write is visible before the crash"
        );
        let after = s.crash().unwrap();
        assert!(after.load_doc(&[1; 16]).unwrap().is_some());
        assert!(after.load_doc(&[2; 16]).unwrap().is_none());
        assert_eq!(after.meta("m").unwrap(), Some(b"1".to_vec()));
        assert_eq!(after.last_seq(), 1);
        assert_eq!(after.feed_since(0, 10).unwrap(), vec![(1, [1; 16])]);
    }

    #[test]
    fn a_failed_flush_is_an_error_and_its_writes_do_not_survive() {
        let s = MemoryStore::new();
        s.fail_next_flush();
        let t = s.commit(vec![write(1)], vec![]).unwrap();
        assert!(s.wait_durable(t).is_err());
        assert!(s.crash().unwrap().record(&[1; 16]).unwrap().is_none());
    }

    #[test]
    fn a_paused_flush_holds_the_writer_until_resumed() {
        let s = Arc::new(MemoryStore::new());
        s.pause_flushes();
        let t = s.commit(vec![write(1)], vec![]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                s.wait_durable(t).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(100))
                .is_err(),
            "durable while paused"
        );
        s.resume_flushes();
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("durable once resumed");
        writer.join().unwrap();
        assert!(s.crash().unwrap().record(&[1; 16]).unwrap().is_some());
    }
}
