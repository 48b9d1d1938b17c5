//! Pre-generated data keys, so bursts of file creation (tar -x, cp -r, git
//! checkout) do not wait on KMS latency one file at a time.
//!
//! Each entry is a (file ID, DEK, wrapped DEK) triple whose context already
//! binds its file ID. Background threads keep the pool topped up with
//! concurrent GenerateDataKey calls; entries older than the cache's max age
//! are discarded, so a pre-generated key lives no longer than a cached one.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::stats::{KeyStats, Op};
use super::{FreshKey, KeyContext, KeyError, KeyProvider};
use crate::format::Id;

struct Inner {
    ready: VecDeque<(FreshKey, Instant)>,
    in_flight: usize,
}

/// A pool of fresh keys for one volume.
pub struct KeyPool {
    provider: Arc<dyn KeyProvider>,
    volume_id: Id,
    target: usize,
    max_age: Duration,
    inner: Mutex<Inner>,
    wake: Condvar,
    stop: AtomicBool,
    /// Set by the first take: a mount that only reads never pre-generates.
    active: AtomicBool,
    stats: Arc<KeyStats>,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl KeyPool {
    /// A pool holding up to `target` keys, refilled by `workers` threads.
    /// `target == 0` disables look-ahead: every take calls the provider.
    pub fn start(
        provider: Arc<dyn KeyProvider>,
        volume_id: Id,
        target: usize,
        workers: usize,
        max_age: Duration,
        stats: Arc<KeyStats>,
    ) -> Arc<Self> {
        let pool = Arc::new(Self {
            provider,
            volume_id,
            target,
            max_age,
            inner: Mutex::new(Inner { ready: VecDeque::new(), in_flight: 0 }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            active: AtomicBool::new(false),
            stats,
        });
        if target > 0 {
            for _ in 0..workers.max(1) {
                let p = pool.clone();
                let spawned = std::thread::Builder::new().name("kmsfs-keypool".into()).spawn(move || p.refill_loop());
                if let Err(e) = spawned {
                    tracing::warn!("key pool: cannot start a refill thread: {e}");
                }
            }
        }
        pool
    }

    fn generate(&self) -> Result<FreshKey, KeyError> {
        let file_id = crate::format::random_id().map_err(|e| KeyError::Other(e.to_string()))?;
        let ctx = KeyContext::file(self.volume_id, file_id);
        let t = Instant::now();
        let res = self.provider.generate(&ctx);
        self.stats.call(Op::Generate, t.elapsed(), res.is_ok());
        let (key, wrapped) = res?;
        Ok(FreshKey { file_id, key, wrapped })
    }

    /// A fresh key: from the pool if one is ready, else generated now.
    pub fn take(&self) -> Result<FreshKey, KeyError> {
        self.active.store(true, Ordering::Relaxed);
        {
            let mut g = lock(&self.inner);
            while let Some((k, born)) = g.ready.pop_front() {
                if born.elapsed() < self.max_age {
                    self.wake.notify_one();
                    return Ok(k);
                }
            }
            self.wake.notify_all();
        }
        self.generate()
    }

    fn refill_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            {
                let mut g = lock(&self.inner);
                loop {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let age = self.max_age;
                    g.ready.retain(|(_, b)| b.elapsed() < age);
                    if self.active.load(Ordering::Relaxed) && g.ready.len() + g.in_flight < self.target {
                        break;
                    }
                    g = self.wake.wait_timeout(g, self.max_age / 2).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
                }
                g.in_flight += 1;
            }
            let res = self.generate();
            let mut g = lock(&self.inner);
            g.in_flight -= 1;
            match res {
                Ok(k) => {
                    g.ready.push_back((k, Instant::now()));
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    // Takers fall back to a direct call and see the error;
                    // here we only avoid hammering a failing service.
                    tracing::debug!("key pool refill failed: {e}");
                    drop(g);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Stops the refill threads and drops (zeroizes) every pre-generated key.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        lock(&self.inner).ready.clear();
        self.wake.notify_all();
    }

    /// Keys ready now.
    pub fn ready(&self) -> usize {
        lock(&self.inner).ready.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::cache::tests::MemProvider;

    #[test]
    fn look_ahead_is_bounded_and_keys_are_distinct() {
        let p = Arc::new(MemProvider::default());
        let pool = KeyPool::start(p.clone(), [1; 16], 8, 2, Duration::from_secs(60), Default::default());
        let mut ids = std::collections::HashSet::new();
        for _ in 0..50 {
            let k = pool.take().unwrap();
            let ctx = KeyContext::file([1; 16], k.file_id);
            assert_eq!(p.unwrap(&k.wrapped, &ctx).unwrap().expose_secret(), k.key.expose_secret());
            assert!(ids.insert(k.file_id));
        }
        std::thread::sleep(Duration::from_millis(100));
        let generated = p.generates.load(std::sync::atomic::Ordering::SeqCst);
        assert!(generated <= 50 + 8, "look-ahead bounded: {generated}");
        pool.shutdown();
    }
}
