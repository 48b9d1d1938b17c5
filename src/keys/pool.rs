//! Pre-generated data keys, so bursts of file creation (tar -x, cp -r, git
//! checkout) do not wait on KMS latency one file at a time, and creates keep
//! working through a short KMS outage.
//!
//! Each entry is a (file ID, DEK, wrapped DEK) triple whose context already
//! binds its file ID, with the time it was requested from the provider.
//! Background threads keep the pool topped up with concurrent
//! GenerateDataKey calls. An entry older than the cache's max age is
//! discarded, never handed out, so a pre-generated key lives no longer than a
//! cached one. When refills fail (KMS unreachable, key disabled), one thread
//! probes at a time with exponential backoff; the first success, a probe's or
//! a caller's direct call, resumes full-speed refilling.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::stats::{KeyStats, Op};
use super::{FreshKey, KeyContext, KeyError, KeyProvider};
use crate::format::Id;

/// First wait after a failed refill; doubles per failure up to `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between probes during an outage: bounds how long after KMS
/// comes back an idle pool stays empty.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

struct Inner {
    /// Keys with the instant their generation was requested.
    ready: VecDeque<(FreshKey, Instant)>,
    in_flight: usize,
    /// While refills fail: no refill starts before this instant.
    retry_at: Option<Instant>,
    backoff: Duration,
    refilled: u64,
    refill_errors: u64,
    expired: u64,
    last_refill: Option<SystemTime>,
    last_error: Option<String>,
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

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
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
            inner: Mutex::new(Inner {
                ready: VecDeque::new(),
                in_flight: 0,
                retry_at: None,
                backoff: MIN_BACKOFF,
                refilled: 0,
                refill_errors: 0,
                expired: 0,
                last_refill: None,
                last_error: None,
            }),
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

    /// A new key and the instant its generation was requested (its age
    /// counts from before the call, never from after).
    fn generate(&self) -> Result<(FreshKey, Instant), KeyError> {
        let file_id = crate::format::random_id().map_err(|e| KeyError::Other(e.to_string()))?;
        let ctx = KeyContext::file(self.volume_id, file_id);
        let born = Instant::now();
        let res = self.provider.generate(&ctx);
        self.stats.call(Op::Generate, born.elapsed(), res.is_ok());
        let (key, wrapped) = res?;
        Ok((FreshKey { file_id, key, wrapped }, born))
    }

    /// A fresh key: from the pool if one is ready, else generated now.
    pub fn take(&self) -> Result<FreshKey, KeyError> {
        self.take_dated().map(|(k, _)| k)
    }

    /// Like [`take`](Self::take), with the instant the key's generation was
    /// requested, so that an unused key can be given back.
    pub fn take_dated(&self) -> Result<(FreshKey, Instant), KeyError> {
        self.active.store(true, Ordering::Relaxed);
        {
            let mut g = lock(&self.inner);
            while let Some((k, born)) = g.ready.pop_front() {
                if born.elapsed() < self.max_age {
                    self.wake.notify_one();
                    return Ok((k, born));
                }
                g.expired += 1; // dropped here: zeroized
            }
            self.wake.notify_all();
        }
        let res = self.generate();
        if res.is_ok() {
            // KMS answers again: end the refill threads' backoff now.
            let mut g = lock(&self.inner);
            if g.retry_at.take().is_some() {
                g.backoff = MIN_BACKOFF;
                self.wake.notify_all();
            }
        }
        res
    }

    /// Returns a key that was taken but never used (no header names its file
    /// ID), so a created-but-never-written file costs no KMS call. Dropped
    /// (zeroized) if the pool is stopped, over-full or the key too old.
    pub fn give_back(&self, key: FreshKey, born: Instant) {
        if self.target == 0 || self.stop.load(Ordering::Relaxed) || born.elapsed() >= self.max_age {
            return;
        }
        let mut g = lock(&self.inner);
        // Refills replaced the key when it was taken; up to twice the target
        // lets a loop of creates that never write (touch, lock files) run on
        // given-back keys instead of a GenerateDataKey each.
        if g.ready.len() < 2 * self.target {
            // The front is taken first: a given-back key is the oldest one.
            g.ready.push_front((key, born));
        }
    }

    fn refill_loop(self: Arc<Self>) {
        loop {
            {
                let mut g = lock(&self.inner);
                loop {
                    if self.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let age = self.max_age;
                    let before = g.ready.len();
                    g.ready.retain(|(_, b)| b.elapsed() < age);
                    g.expired += (before - g.ready.len()) as u64;
                    let wanted = self.active.load(Ordering::Relaxed) && g.ready.len() + g.in_flight < self.target;
                    // During an outage one thread probes at a time, after the backoff.
                    let probing = g.retry_at.is_some() && g.in_flight > 0;
                    let until = g.retry_at.and_then(|at| at.checked_duration_since(Instant::now()));
                    let until = until.filter(|d| !d.is_zero());
                    if wanted && !probing && until.is_none() {
                        break;
                    }
                    let d = until.unwrap_or(self.max_age / 2);
                    g = self.wake.wait_timeout(g, d).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
                }
                g.in_flight += 1;
            }
            let res = self.generate();
            let mut g = lock(&self.inner);
            g.in_flight -= 1;
            match res {
                Ok(k) => {
                    g.ready.push_back(k);
                    g.refilled += 1;
                    g.last_refill = Some(SystemTime::now());
                    if g.retry_at.take().is_some() {
                        g.backoff = MIN_BACKOFF;
                        self.wake.notify_all();
                    }
                }
                Err(e) => {
                    // Takers fall back to a direct call and see the error;
                    // here we only avoid hammering a failing service.
                    tracing::debug!("key pool refill failed: {e}");
                    g.refill_errors += 1;
                    g.last_error = Some(e.to_string());
                    // Concurrent failures of one outage back off once.
                    let now = Instant::now();
                    if g.retry_at.is_none_or(|at| at <= now) {
                        g.retry_at = Some(now + g.backoff);
                        g.backoff = (g.backoff * 2).min(MAX_BACKOFF);
                    }
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

    /// A JSON snapshot for `kmsfs stats`: level, refills, refill errors and
    /// the time of the last refill (Unix seconds).
    pub fn to_json(&self) -> serde_json::Value {
        let g = lock(&self.inner);
        let now = Instant::now();
        serde_json::json!({
            "ready": g.ready.len(),
            "target": self.target,
            "in_flight": g.in_flight,
            "refilled": g.refilled,
            "refill_errors": g.refill_errors,
            "expired": g.expired,
            "last_refill": g.last_refill.map(unix_secs),
            "last_refill_age_s": g.last_refill.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
            "last_error": g.last_error,
            "retry_in_ms": g.retry_at.map(|at| at.saturating_duration_since(now).as_millis() as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::fake::MemProvider;
    use std::sync::atomic::Ordering::SeqCst;

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
        let generated = p.generates.load(SeqCst);
        assert!(generated <= 50 + 8, "look-ahead bounded: {generated}");
        pool.shutdown();
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn keys_older_than_max_age_are_never_handed_out() {
        let p = Arc::new(MemProvider::default());
        let pool = KeyPool::start(p.clone(), [1; 16], 4, 1, Duration::from_millis(300), Default::default());
        let first = pool.take().unwrap().file_id; // activates the pool
        wait_for("a full pool", || pool.ready() == 4);
        // Stop refilling, so that only the old keys are there to take.
        p.fail_generate.store(true, SeqCst);
        let old: Vec<Id> = lock(&pool.inner).ready.iter().map(|(k, _)| k.file_id).collect();
        std::thread::sleep(Duration::from_millis(350));
        p.fail_generate.store(false, SeqCst);
        let k = pool.take().unwrap();
        assert!(k.file_id != first && !old.contains(&k.file_id), "an expired pool key was handed out");
        assert!(pool.to_json()["expired"].as_u64().unwrap() >= 4, "{}", pool.to_json());
        // A key given back past its age is dropped too.
        let (k, born) = pool.take_dated().unwrap();
        pool.shutdown();
        let pool = KeyPool::start(p.clone(), [1; 16], 4, 0, Duration::from_millis(300), Default::default());
        pool.give_back(k, born - Duration::from_millis(300));
        assert_eq!(pool.ready(), 0);
        pool.shutdown();
    }

    #[test]
    fn refills_back_off_during_an_outage_and_resume_after() {
        let p = Arc::new(MemProvider::default());
        let pool = KeyPool::start(p.clone(), [1; 16], 8, 4, Duration::from_secs(60), Default::default());
        p.fail_generate.store(true, SeqCst);
        assert!(pool.take().is_err(), "no key while the provider fails");
        std::thread::sleep(Duration::from_millis(700));
        // 4 threads without backoff would make thousands of calls; one probe
        // at a time with 100, 200, 400 ms waits makes a handful.
        let calls = p.generates.load(SeqCst);
        assert!(calls <= 8, "generate calls during 0.7 s of outage: {calls}");
        let j = pool.to_json();
        assert!(j["refill_errors"].as_u64().unwrap() >= 1 && j["last_error"].is_string(), "{j}");
        assert!(j["last_refill"].is_null(), "{j}");
        // Back: the next direct take succeeds and the pool fills up at once.
        p.fail_generate.store(false, SeqCst);
        let t = Instant::now();
        pool.take().unwrap();
        wait_for("a refilled pool", || pool.ready() == 8);
        assert!(t.elapsed() < Duration::from_secs(2), "refill after the outage took {:?}", t.elapsed());
        let j = pool.to_json();
        assert!(j["last_refill"].as_u64().unwrap() > 0 && j["refilled"].as_u64().unwrap() >= 8, "{j}");
        pool.shutdown();
    }

    #[test]
    fn idle_pool_recovers_by_itself() {
        let p = Arc::new(MemProvider::default());
        let pool = KeyPool::start(p.clone(), [1; 16], 4, 2, Duration::from_secs(60), Default::default());
        p.fail_generate.store(true, SeqCst);
        assert!(pool.take().is_err());
        std::thread::sleep(Duration::from_millis(300));
        p.fail_generate.store(false, SeqCst);
        // No take: a probe after the backoff (at most 10 s) finds KMS back.
        wait_for("a probe to refill the pool", || pool.ready() == 4);
        pool.shutdown();
    }

    #[test]
    fn given_back_keys_are_reused() {
        let p = Arc::new(MemProvider::default());
        let pool = KeyPool::start(p.clone(), [1; 16], 4, 0, Duration::from_secs(60), Default::default());
        let (k, born) = pool.take_dated().unwrap();
        let id = k.file_id;
        pool.give_back(k, born);
        assert_eq!(pool.take().unwrap().file_id, id);
        pool.shutdown();
    }
}
