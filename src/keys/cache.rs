//! The unwrapped-key cache: a bounded LRU with a max age and single-flight
//! unwrap, so N concurrent opens of a cold file make one KMS Decrypt.
//!
//! The map lock is held only around map operations, never across a provider
//! call. Dropping an entry drops its `Arc<DataKey>`; the key is zeroized when
//! the last user (an in-flight read or write) lets go.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::stats::{KeyStats, Op};
use super::{DataKey, KeyContext, KeyError, KeyProvider, WrappedKey};
use crate::format::Id;

/// Default capacity: 10,000 keys is ~2 MB with AES-GCM contexts, and covers
/// the working set of a `grep -r` over a large tree without re-unwrapping.
pub const DEFAULT_CAPACITY: usize = 10_000;
/// Default max age, as ESDK's caching CMM requires one: bounds how long a
/// disabled KMS key keeps working for already-opened files.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(300);

struct Entry {
    key: Arc<DataKey>,
    born: Instant,
}

/// The cache. Cheap to share behind an `Arc`.
pub struct KeyCache {
    provider: Arc<dyn KeyProvider>,
    map: Mutex<LruCache<Id, Entry>>,
    inflight: Mutex<HashMap<Id, Arc<Mutex<()>>>>,
    max_age: Duration,
    stats: Arc<KeyStats>,
}

/// Removes a single-flight gate from the in-flight map when dropped, if it
/// is still the one there: a failed unwrap must not leave an entry behind
/// (one per file ever tried, for as long as the mount lives).
struct InflightEntry<'a> {
    map: &'a Mutex<HashMap<Id, Arc<Mutex<()>>>>,
    id: Id,
    gate: &'a Arc<Mutex<()>>,
}

impl Drop for InflightEntry<'_> {
    fn drop(&mut self) {
        let mut map = lock(self.map);
        if map.get(&self.id).is_some_and(|g| Arc::ptr_eq(g, self.gate)) {
            map.remove(&self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take key lookups down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyCache {
    /// A cache in front of `provider`.
    pub fn new(provider: Arc<dyn KeyProvider>, capacity: usize, max_age: Duration, stats: Arc<KeyStats>) -> Self {
        let cap = NonZeroUsize::new(capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self { provider, map: Mutex::new(LruCache::new(cap)), inflight: Mutex::new(HashMap::new()), max_age, stats }
    }

    /// The provider behind the cache.
    pub fn provider(&self) -> &Arc<dyn KeyProvider> {
        &self.provider
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<KeyStats> {
        &self.stats
    }

    fn lookup(&self, id: &Id) -> Option<Arc<DataKey>> {
        let mut map = lock(&self.map);
        match map.get(id) {
            Some(e) if e.born.elapsed() < self.max_age => Some(e.key.clone()),
            Some(_) => {
                map.pop(id);
                self.stats.evicted(1);
                None
            }
            None => None,
        }
    }

    /// The DEK for a file, unwrapping through the provider on a miss.
    pub fn get(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<Arc<DataKey>, KeyError> {
        if let Some(k) = self.lookup(&ctx.file_id) {
            self.stats.hit();
            return Ok(k);
        }
        // Single flight: one unwrap per file ID; late arrivals wait, then hit.
        let gate = lock(&self.inflight).entry(ctx.file_id).or_default().clone();
        let _turn = lock(&gate);
        // Whatever happens next, success or error, the gate leaves the map.
        let _leave = InflightEntry { map: &self.inflight, id: ctx.file_id, gate: &gate };
        if let Some(k) = self.lookup(&ctx.file_id) {
            self.stats.hit();
            return Ok(k);
        }
        self.stats.miss();
        let t = Instant::now();
        let res = self.provider.unwrap(wrapped, ctx);
        self.stats.call(Op::Unwrap, t.elapsed(), res.is_ok());
        let key = Arc::new(res?);
        self.insert_arc(ctx.file_id, key.clone());
        Ok(key)
    }

    /// Adds a freshly generated key (new file), returning the shared handle.
    pub fn insert(&self, file_id: Id, key: DataKey) -> Arc<DataKey> {
        let key = Arc::new(key);
        self.insert_arc(file_id, key.clone());
        key
    }

    fn insert_arc(&self, file_id: Id, key: Arc<DataKey>) {
        if lock(&self.map).push(file_id, Entry { key, born: Instant::now() }).is_some_and(|(k, _)| k != file_id) {
            self.stats.evicted(1);
        }
    }

    /// Drops one file's key (e.g. the file was truncated to zero).
    pub fn forget(&self, file_id: &Id) {
        if lock(&self.map).pop(file_id).is_some() {
            self.stats.evicted(1);
        }
    }

    /// Drops every expired key; run periodically so idle keys do not outlive
    /// their max age in memory.
    pub fn sweep(&self) -> usize {
        let mut map = lock(&self.map);
        let expired: Vec<Id> = map.iter().filter(|(_, e)| e.born.elapsed() >= self.max_age).map(|(k, _)| *k).collect();
        for k in &expired {
            map.pop(k);
        }
        self.stats.evicted(expired.len() as u64);
        expired.len()
    }

    /// Drops every key (unmount).
    pub fn clear(&self) {
        let mut map = lock(&self.map);
        self.stats.evicted(map.len() as u64);
        map.clear();
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Unwraps under way (single-flight gates held).
    pub fn inflight(&self) -> usize {
        lock(&self.inflight).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::fake::MemProvider;
    use std::sync::atomic::Ordering;

    fn ctx(f: u8) -> KeyContext {
        KeyContext::file([1; 16], [f; 16])
    }

    #[test]
    fn single_flight_under_32_concurrent_gets() {
        let p = Arc::new(MemProvider { delay: Duration::from_millis(50), ..Default::default() });
        let cache = Arc::new(KeyCache::new(p.clone(), 10, DEFAULT_MAX_AGE, Default::default()));
        let (_, w) = p.generate(&ctx(9)).unwrap();
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let (c, w) = (cache.clone(), w.clone());
                std::thread::spawn(move || c.get(&w, &ctx(9)).map(|_| ()))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(p.unwraps.load(Ordering::SeqCst), 1);
        assert_eq!(cache.stats().misses(), 1);
        assert_eq!(cache.stats().hits(), 31);
    }

    #[test]
    fn capacity_and_max_age() {
        let p = Arc::new(MemProvider::default());
        let cache = KeyCache::new(p.clone(), 2, Duration::from_millis(30), Default::default());
        let ws: Vec<_> = (0..3).map(|i| p.generate(&ctx(i)).unwrap().1).collect();
        for (i, w) in ws.iter().enumerate() {
            cache.get(w, &ctx(i as u8)).unwrap();
        }
        assert_eq!(cache.len(), 2, "LRU bound");
        cache.get(&ws[2], &ctx(2)).unwrap();
        assert_eq!(p.unwraps.load(Ordering::SeqCst), 3, "hit");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(cache.sweep(), 2, "expired keys are dropped");
        cache.get(&ws[2], &ctx(2)).unwrap();
        assert_eq!(p.unwraps.load(Ordering::SeqCst), 4, "re-unwrapped after max age");
    }

    #[test]
    fn errors_are_not_cached() {
        let p = Arc::new(MemProvider::default());
        let cache = KeyCache::new(p.clone(), 2, DEFAULT_MAX_AGE, Default::default());
        let (_, w) = p.generate(&ctx(1)).unwrap();
        p.fail.store(true, Ordering::SeqCst);
        assert!(matches!(cache.get(&w, &ctx(1)), Err(KeyError::Disabled { .. })));
        p.fail.store(false, Ordering::SeqCst);
        assert!(cache.get(&w, &ctx(1)).is_ok());
    }

    #[test]
    fn failed_unwraps_leave_no_inflight_entry() {
        let p = Arc::new(MemProvider { delay: Duration::from_millis(20), ..Default::default() });
        let cache = Arc::new(KeyCache::new(p.clone(), 100, DEFAULT_MAX_AGE, Default::default()));
        p.fail.store(true, Ordering::SeqCst);
        // Many files, several concurrent callers each: every one fails.
        let threads: Vec<_> = (0..16u8)
            .map(|i| {
                let (c, p) = (cache.clone(), p.clone());
                std::thread::spawn(move || {
                    let (_, w) = p.generate(&ctx(i % 4)).unwrap();
                    c.get(&w, &ctx(i % 4)).is_err()
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap(), "unwrap should fail");
        }
        assert_eq!(cache.inflight(), 0, "failed unwraps left in-flight entries");
        assert_eq!(cache.len(), 0);
        // And success leaves none either.
        p.fail.store(false, Ordering::SeqCst);
        let (_, w) = p.generate(&ctx(1)).unwrap();
        cache.get(&w, &ctx(1)).unwrap();
        assert_eq!(cache.inflight(), 0);
    }
}
