//! The aggregate cache of the writer: decided aggregates stay in memory, so
//! the next command on one of them reads one stream version instead of its
//! snapshot and events.
//!
//! Only the writer thread touches it, so it needs no lock. What a unit puts
//! in it is staged: kept when the unit's savepoint is released, dropped when
//! the unit fails, and made visible to the next batches only after the
//! batch commits. A cache entry therefore never holds a state the database
//! does not.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};

/// One aggregate as the cache holds it: its state at a stream version.
#[derive(Debug, Clone)]
pub(crate) struct Cached<A> {
    pub(crate) version: i64,
    pub(crate) state: A,
}

type Entry = Box<dyn Any + Send>;

/// Least recently used entries are evicted beyond `capacity`.
pub(crate) struct AggregateCache {
    capacity: usize,
    /// Stream id -> (last use, entry).
    entries: HashMap<String, (u64, Entry)>,
    /// Last use -> stream id: the eviction order.
    by_use: BTreeMap<u64, String>,
    tick: u64,
    /// Written by units of the batch in progress whose savepoints were released.
    batch: HashMap<String, Option<Entry>>,
    /// Written by the unit in progress.
    unit: HashMap<String, Option<Entry>>,
    hits: u64,
    misses: u64,
}

impl AggregateCache {
    pub(crate) fn new(capacity: usize) -> Self {
        AggregateCache {
            capacity,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            tick: 0,
            batch: HashMap::new(),
            unit: HashMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// The state of `stream` at `version`, if the cache holds exactly that.
    pub(crate) fn get<A: Clone + 'static>(&mut self, stream: &str, version: i64) -> Option<A> {
        let found = match self.unit.get(stream).or_else(|| self.batch.get(stream)) {
            Some(staged) => staged
                .as_ref()
                .and_then(|e| e.downcast_ref::<Cached<A>>())
                .cloned(),
            None => match self.entries.get_mut(stream) {
                Some((used, entry)) => {
                    self.tick += 1;
                    self.by_use.remove(used);
                    *used = self.tick;
                    self.by_use.insert(self.tick, stream.to_owned());
                    entry.downcast_ref::<Cached<A>>().cloned()
                }
                None => None,
            },
        };
        match found.filter(|cached| cached.version == version) {
            Some(cached) => {
                self.hits += 1;
                Some(cached.state)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Stages `state` at `version` for `stream` (kept if the unit and its batch commit).
    pub(crate) fn put<A: Send + 'static>(&mut self, stream: &str, version: i64, state: A) {
        self.unit
            .insert(stream.to_owned(), Some(Box::new(Cached { version, state })));
    }

    /// The unit in progress committed to its savepoint: its writes join the batch.
    pub(crate) fn keep_unit(&mut self) {
        self.batch.extend(self.unit.drain());
    }

    /// The unit in progress was rolled back: its writes are dropped.
    pub(crate) fn drop_unit(&mut self) {
        self.unit.clear();
    }

    /// The batch committed: its writes become entries.
    pub(crate) fn commit(&mut self) {
        self.unit.clear();
        let staged: Vec<_> = self.batch.drain().collect();
        for (stream, entry) in staged {
            self.remove(&stream);
            if let Some(entry) = entry {
                self.insert(stream, entry);
            }
        }
    }

    /// The batch rolled back: its writes are dropped, and the entries it
    /// touched are forgotten (they may describe a state that was never committed).
    pub(crate) fn abort(&mut self) {
        let touched: Vec<String> = self.batch.drain().map(|(k, _)| k).collect();
        self.unit.clear();
        for stream in touched {
            self.remove(&stream);
        }
    }

    fn insert(&mut self, stream: String, entry: Entry) {
        if self.capacity == 0 {
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        self.tick += 1;
        self.by_use.insert(self.tick, stream.clone());
        self.entries.insert(stream, (self.tick, entry));
    }

    fn remove(&mut self, stream: &str) {
        if let Some((used, _)) = self.entries.remove(stream) {
            self.by_use.remove(&used);
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            capacity: self.capacity,
            hits: self.hits,
            misses: self.misses,
        }
    }
}

/// How the aggregate cache is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Aggregates held now.
    pub entries: usize,
    /// The most it holds (`runtime.aggregate_cache`).
    pub capacity: usize,
    /// Commands decided on a cached state.
    pub hits: u64,
    /// Commands that loaded the aggregate from the store first.
    pub misses: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(cache: &mut AggregateCache, stream: &str, version: i64, state: u32) {
        cache.put(stream, version, state);
        cache.keep_unit();
        cache.commit();
    }

    #[test]
    fn stays_within_its_bound_and_evicts_the_least_recently_used() {
        let mut cache = AggregateCache::new(3);
        for (i, stream) in ["a", "b", "c"].iter().enumerate() {
            committed(&mut cache, stream, 1, i as u32);
        }
        assert_eq!(
            cache.get::<u32>("a", 1),
            Some(0),
            "a is now the most recent"
        );
        committed(&mut cache, "d", 1, 3);
        assert_eq!(cache.stats().entries, 3);
        assert_eq!(cache.get::<u32>("b", 1), None, "b was least recently used");
        assert_eq!(cache.get::<u32>("a", 1), Some(0));
        assert_eq!(cache.get::<u32>("d", 1), Some(3));
    }

    #[test]
    fn an_entry_at_another_version_is_a_miss() {
        let mut cache = AggregateCache::new(8);
        committed(&mut cache, "a", 4, 7);
        assert_eq!(cache.get::<u32>("a", 5), None);
        assert_eq!(cache.get::<u32>("a", 4), Some(7));
        assert_eq!((cache.stats().hits, cache.stats().misses), (1, 1));
    }

    #[test]
    fn a_failed_unit_or_batch_leaves_nothing_behind() {
        let mut cache = AggregateCache::new(8);
        committed(&mut cache, "a", 1, 1);
        cache.put("a", 2, 2u32);
        assert_eq!(
            cache.get::<u32>("a", 2),
            Some(2),
            "a unit sees its own writes"
        );
        cache.drop_unit();
        assert_eq!(cache.get::<u32>("a", 1), Some(1), "the failed unit is gone");
        cache.put("a", 2, 2u32);
        cache.keep_unit();
        assert_eq!(
            cache.get::<u32>("a", 2),
            Some(2),
            "later units see the batch"
        );
        cache.abort();
        assert_eq!(
            cache.get::<u32>("a", 1),
            None,
            "a rolled-back batch forgets a"
        );
        assert_eq!(cache.get::<u32>("a", 2), None);
    }
}
