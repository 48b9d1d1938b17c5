//! Key counters: cache hits and misses, provider calls by operation, errors
//! and latency. Read while mounted through `kmsfs stats MOUNTPOINT`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Provider operations that are counted separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// GenerateDataKey.
    Generate,
    /// Decrypt.
    Unwrap,
    /// Encrypt.
    Wrap,
    /// ReEncrypt.
    Rewrap,
}

const OPS: usize = 4;
// Latency histogram bucket upper bounds in microseconds; the last is open.
const BUCKETS_US: [u64; 10] = [100, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 500_000, 1_000_000, u64::MAX];

/// Lock-free counters shared by the cache, the pool and the daemon.
#[derive(Default)]
pub struct KeyStats {
    hits: AtomicU64,
    misses: AtomicU64,
    calls: [AtomicU64; OPS],
    errors: [AtomicU64; OPS],
    lat_sum_us: [AtomicU64; OPS],
    lat_max_us: [AtomicU64; OPS],
    lat_buckets: [[AtomicU64; 10]; OPS],
    evictions: AtomicU64,
}

impl KeyStats {
    /// A cache hit.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Relaxed);
    }
    /// A cache miss.
    pub fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
    }
    /// A key dropped from the cache (capacity, age or unmount).
    pub fn evicted(&self, n: u64) {
        self.evictions.fetch_add(n, Relaxed);
    }
    /// One provider call and how long it took.
    pub fn call(&self, op: Op, took: Duration, ok: bool) {
        let i = op as usize;
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.calls[i].fetch_add(1, Relaxed);
        if !ok {
            self.errors[i].fetch_add(1, Relaxed);
        }
        self.lat_sum_us[i].fetch_add(us, Relaxed);
        self.lat_max_us[i].fetch_max(us, Relaxed);
        let b = BUCKETS_US.iter().position(|&ub| us <= ub).unwrap_or(BUCKETS_US.len() - 1);
        self.lat_buckets[i][b].fetch_add(1, Relaxed);
    }
    /// Number of provider calls of one kind so far.
    pub fn calls(&self, op: Op) -> u64 {
        self.calls[op as usize].load(Relaxed)
    }
    /// Cache hits so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Relaxed)
    }
    /// Cache misses so far.
    pub fn misses(&self) -> u64 {
        self.misses.load(Relaxed)
    }

    /// A JSON snapshot (p50/p99 are bucket upper bounds).
    pub fn to_json(&self) -> serde_json::Value {
        let mut ops = serde_json::Map::new();
        for (op, name) in [
            (Op::Generate, "generate_data_key"),
            (Op::Unwrap, "decrypt"),
            (Op::Wrap, "encrypt"),
            (Op::Rewrap, "re_encrypt"),
        ] {
            let i = op as usize;
            let calls = self.calls[i].load(Relaxed);
            let sum = self.lat_sum_us[i].load(Relaxed);
            let counts: Vec<u64> = self.lat_buckets[i].iter().map(|c| c.load(Relaxed)).collect();
            let pct = |p: f64| -> Option<u64> {
                let total: u64 = counts.iter().sum();
                if total == 0 {
                    return None;
                }
                let want = ((total as f64) * p).ceil() as u64;
                let mut acc = 0;
                for (k, c) in counts.iter().enumerate() {
                    acc += c;
                    if acc >= want {
                        return Some(BUCKETS_US[k].min(self.lat_max_us[i].load(Relaxed)));
                    }
                }
                None
            };
            ops.insert(
                name.into(),
                serde_json::json!({
                    "calls": calls,
                    "errors": self.errors[i].load(Relaxed),
                    "latency_us": {
                        "mean": sum.checked_div(calls).unwrap_or(0),
                        "p50_le": pct(0.5),
                        "p99_le": pct(0.99),
                        "max": self.lat_max_us[i].load(Relaxed),
                        "sum": sum,
                        // Per-bucket counts (not cumulative), by upper bound; the last is open.
                        "buckets": BUCKETS_US.iter().zip(&counts).map(|(le, c)| serde_json::json!([le, c])).collect::<Vec<_>>(),
                    }
                }),
            );
        }
        serde_json::json!({
            "cache": {
                "hits": self.hits(),
                "misses": self.misses(),
                "evictions": self.evictions.load(Relaxed),
            },
            "provider_calls": ops,
        })
    }
}
