#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `kmsfs info`, `kmsfs stats --format prometheus` and the man page.

mod common;

use std::process::Command;

use common::*;

#[test]
fn info_describes_the_volume_with_and_without_the_key() {
    let v = Volume::new();
    let out = Command::new(BIN).args(["info", "--json"]).arg(&v.cipher).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["provider"], "local");
    assert_eq!(j["names"], "encrypted");
    assert_eq!(j["block_size"], 4096);
    assert_eq!(j["format_version"], 1);
    assert_eq!(j["config_mac"], true);
    assert_eq!(j["config_verified"], false);
    assert_eq!(j["volume_id"].as_str().unwrap().len(), 32);
    assert_eq!(j["trust_record"]["key_id"], j["key_id"], "init recorded the key");
    // Without the key file, plain info still works; --verify needs it (4).
    let moved = v.tmp.path().join("moved.key");
    std::fs::rename(&v.key, &moved).unwrap();
    let out = Command::new(BIN).arg("info").arg(&v.cipher).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("MAC present (not verified"), "{text}");
    let out = Command::new(BIN).args(["info", "--verify"]).arg(&v.cipher).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(BIN)
        .args(["info", "--verify", "--json", "--key-file"])
        .arg(&moved)
        .arg(&v.cipher)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["config_verified"], true);
    // Not a volume: 3.
    let out = Command::new(BIN).arg("info").arg(v.tmp.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn stats_in_prometheus_format() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::write(m.path("a"), vec![7u8; 10_000]).unwrap();
    // Through the page cache the kernel writes back at close; a read with
    // the cache dropped reaches the daemon.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    assert_eq!(std::fs::read(m.path("a")).unwrap().len(), 10_000);
    let out = Command::new(BIN).args(["stats", "--format", "prometheus"]).arg(&m.mnt).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let value = |name: &str| -> u64 {
        let l = text.lines().find(|l| l.starts_with(&format!("{name}{{"))).unwrap_or_else(|| panic!("{name}: {text}"));
        l.rsplit_once(' ').unwrap().1.parse().unwrap()
    };
    assert!((10_000..20_000).contains(&value("kmsfs_written_bytes_total")), "{text}");
    assert!(value("kmsfs_read_bytes_total") >= 10_000, "{text}");
    for name in [
        "kmsfs_kms_calls_total",
        "kmsfs_kms_errors_total",
        "kmsfs_key_cache_hits_total",
        "kmsfs_key_cache_misses_total",
        "kmsfs_key_cache_evictions_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing: {text}");
    }
    // Every sample line: name{labels} number.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, val) = l.rsplit_once(' ').unwrap();
        assert!(series.starts_with("kmsfs_") && series.contains("{mountpoint=\""), "{l}");
        assert!(
            text.contains(&format!(
                "# TYPE {} ",
                series
                    .split('{')
                    .next()
                    .unwrap()
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count")
            )),
            "{l}"
        );
        val.parse::<f64>().unwrap_or_else(|_| panic!("not a number: {l}"));
    }
    assert!(text.contains("op=\"generate_data_key\""), "{text}");
    assert!(text.contains("# TYPE kmsfs_kms_latency_seconds histogram"), "{text}");
    assert!(text.contains("kmsfs_kms_latency_seconds_bucket{") && text.contains("le=\"+Inf\"}"), "{text}");
    assert!(text.contains("kmsfs_kms_latency_seconds_count{"), "{text}");
    assert!(text.contains("kmsfs_integrity_errors_total{"), "{text}");
}

#[test]
fn man_page_covers_commands_options_exit_codes_environment_files_examples() {
    let out = Command::new(BIN).arg("manpage").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    for needle in [
        ".SH COMMANDS",
        "kmsfs mount\"",
        "kmsfs rewrap\"",
        "kmsfs info\"",
        "kmsfs stats\"",
        "nonempty",
        "key_file=PATH",
        ".SH \"EXIT STATUS\"",
        ".SH ENVIRONMENT",
        "KMSFS_LOG",
        "CREDENTIALS_DIRECTORY",
        ".SH FILES",
        ".SH EXAMPLES",
    ] {
        assert!(page.contains(needle), "man page lacks {needle:?}");
    }
    assert!(page.lines().count() > 300, "{} lines", page.lines().count());
}
