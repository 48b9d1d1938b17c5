//! A mount's live statistics: read from the mount (the `user.kmsfs.stats`
//! xattr of its root, which the daemon answers), and rendered for
//! Prometheus.

use std::path::Path;

/// The stats snapshot of the kmsfs mount at `mnt`, as JSON.
pub fn read_stats(mnt: &Path) -> std::io::Result<serde_json::Value> {
    let buf = crate::sys::getxattr_path(mnt, c"user.kmsfs.stats", 64 * 1024)
        .map_err(|e| std::io::Error::new(e.kind(), format!("not a kmsfs mount ({e})")))?;
    serde_json::from_slice(&buf).map_err(std::io::Error::other)
}

/// The stats snapshot in Prometheus text format, for node_exporter's
/// textfile collector. Counters only grow while the mount lives.
pub fn prometheus(v: &serde_json::Value, mnt: &Path) -> String {
    use std::fmt::Write as _;
    let label = mnt.display().to_string().replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, serde_json::Value)>| {
        let _ = writeln!(o, "# HELP kmsfs_{name} {help}\n# TYPE kmsfs_{name} {kind}");
        for (extra, val) in rows {
            let val = val.as_f64().unwrap_or(0.0);
            let _ = writeln!(o, "kmsfs_{name}{{mountpoint=\"{label}\"{extra}}} {val}");
        }
    };
    let ops: Vec<(String, serde_json::Value)> = v["provider_calls"]
        .as_object()
        .map(|m| m.iter().map(|(k, s)| (k.clone(), s.clone())).collect())
        .unwrap_or_default();
    let per_op = |f: &dyn Fn(&serde_json::Value) -> serde_json::Value| {
        ops.iter().map(|(op, s)| (format!(",op=\"{op}\""), f(s))).collect::<Vec<_>>()
    };
    metric("kms_calls_total", "counter", "Key-provider calls by operation.", per_op(&|s| s["calls"].clone()));
    metric("kms_errors_total", "counter", "Failed key-provider calls by operation.", per_op(&|s| s["errors"].clone()));
    metric(
        "kms_latency_mean_seconds",
        "gauge",
        "Mean key-provider call latency by operation.",
        per_op(&|s| (s["latency_us"]["mean"].as_f64().unwrap_or(0.0) / 1e6).into()),
    );
    metric(
        "kms_latency_p99_seconds",
        "gauge",
        "Upper bound of the 99th percentile key-provider latency by operation.",
        per_op(&|s| (s["latency_us"]["p99_le"].as_f64().unwrap_or(0.0) / 1e6).into()),
    );
    let mut hist = String::new();
    // A real histogram: cumulative buckets in seconds, _sum and _count.
    let _ = writeln!(
        hist,
        "# HELP kmsfs_kms_latency_seconds Key-provider call latency by operation.\n# TYPE kmsfs_kms_latency_seconds histogram"
    );
    for (op, st) in &ops {
        let mut acc = 0u64;
        for b in st["latency_us"]["buckets"].as_array().into_iter().flatten() {
            acc += b[1].as_u64().unwrap_or(0);
            let le = match b[0].as_u64() {
                Some(u64::MAX) | None => "+Inf".to_string(),
                Some(us) => format!("{}", us as f64 / 1e6),
            };
            let _ = writeln!(
                hist,
                "kmsfs_kms_latency_seconds_bucket{{mountpoint=\"{label}\",op=\"{op}\",le=\"{le}\"}} {acc}"
            );
        }
        let sum = st["latency_us"]["sum"].as_f64().unwrap_or(0.0) / 1e6;
        let _ = writeln!(hist, "kmsfs_kms_latency_seconds_sum{{mountpoint=\"{label}\",op=\"{op}\"}} {sum}");
        let _ = writeln!(
            hist,
            "kmsfs_kms_latency_seconds_count{{mountpoint=\"{label}\",op=\"{op}\"}} {}",
            st["calls"].as_u64().unwrap_or(0)
        );
    }
    let c = &v["cache"];
    metric("key_cache_hits_total", "counter", "Data-key cache hits.", vec![(String::new(), c["hits"].clone())]);
    metric("key_cache_misses_total", "counter", "Data-key cache misses.", vec![(String::new(), c["misses"].clone())]);
    metric(
        "key_cache_evictions_total",
        "counter",
        "Data keys dropped from the cache.",
        vec![(String::new(), c["evictions"].clone())],
    );
    metric("key_cache_keys", "gauge", "Data keys in the cache.", vec![(String::new(), c["size"].clone())]);
    metric(
        "key_pool_ready",
        "gauge",
        "Fresh data keys ready in the pool.",
        vec![(String::new(), v["pool"]["ready"].clone())],
    );
    metric(
        "key_pool_refill_errors_total",
        "counter",
        "Failed pool refills.",
        vec![(String::new(), v["pool"]["refill_errors"].clone())],
    );
    metric(
        "integrity_errors_total",
        "counter",
        "Reads that failed authentication (EIO), logged or not.",
        vec![(String::new(), v["integrity_errors"].clone())],
    );
    metric(
        "read_bytes_total",
        "counter",
        "Plaintext bytes served by read.",
        vec![(String::new(), v["bytes_read"].clone())],
    );
    metric(
        "written_bytes_total",
        "counter",
        "Plaintext bytes accepted by write.",
        vec![(String::new(), v["bytes_written"].clone())],
    );
    metric("inodes", "gauge", "Inodes the mount knows.", vec![(String::new(), v["inodes"].clone())]);
    metric("handles", "gauge", "Open file handles.", vec![(String::new(), v["handles"].clone())]);
    o.push_str(&hist);
    o
}
