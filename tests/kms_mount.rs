#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real mounts of aws-kms volumes: aws-sdk-kms against moto behind the
//! project's KMS proxy (scripts/kms-server.sh), and the kmsfs binary.

mod common;

use std::process::Command;

use common::kms::*;
use common::*;

fn kms_volume(key_ref: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cipher = tmp.path().join("cipher");
    let out = Command::new(BIN)
        .arg("init")
        .arg(&cipher)
        .arg("--kms-key")
        .arg(key_ref)
        .arg("--plaintext-names")
        .output()
        .unwrap();
    assert!(out.status.success(), "init: {}", String::from_utf8_lossy(&out.stderr));
    (tmp, cipher)
}

fn ls_la(dir: &std::path::Path) {
    let (ok, out) = sh(&format!("ls -laR {} >/dev/null && stat {}/* >/dev/null", dir.display(), dir.display()));
    assert!(ok, "{out}");
}

#[test]
fn kms_volume_call_budget() {
    need_harness!("kms_volume_call_budget");
    if !fuse_available("kms_volume_call_budget") {
        return;
    }
    let key = create_key("budget");
    let alias = create_alias(&key, "budget");
    let (tmp, cipher) = kms_volume(&alias);
    const N: usize = 40;
    let before = count(&key, "GenerateDataKey");
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        for i in 0..N {
            std::fs::write(m.path(&format!("f{i}")), random_bytes(5000 + i, i as u64)).unwrap();
        }
    }
    let generated = count(&key, "GenerateDataKey") - before;
    // N files + the mount check (1) + the pool's bounded look-ahead (64 + 16 in flight).
    assert!(generated >= N as u64 && generated <= N as u64 + 1 + 64 + 16, "GenerateDataKey calls: {generated}");
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    let d0 = count(&key, "Decrypt");

    ls_la(&m.mnt);
    assert_eq!(count(&key, "Decrypt"), d0, "stat/readdir made Decrypt calls");
    for round in 0..2 {
        for i in 0..N {
            let got = std::fs::read(m.path(&format!("f{i}"))).unwrap();
            assert!(got == random_bytes(5000 + i, i as u64), "round {round} file {i}");
        }
        // The page cache may serve round 2; drop it so reads reach kmsfs.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    }
    assert_eq!(count(&key, "Decrypt") - d0, N as u64, "M files read twice = M Decrypt calls");
    let (ok, stats) = m.stats_json();
    assert!(ok && stats.contains("\"hits\""), "{stats}");
    drop(m);
    // Backing files name the key ARN, never the alias.
    let (ok, out) = sh(&format!("{BIN} inspect --json {}/f0", cipher.display()));
    assert!(ok && out.contains(&key.arn), "{out}");
}

#[test]
fn disabled_key_gives_clear_errors_and_loses_nothing() {
    need_harness!("disabled_key_gives_clear_errors_and_loses_nothing");
    if !fuse_available("disabled_key_gives_clear_errors_and_loses_nothing") {
        return;
    }
    let key = create_key("disabled");
    let (tmp, cipher) = kms_volume(&key.id);
    let data = random_bytes(100_000, 3);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        std::fs::write(m.path("a"), &data).unwrap();
        std::fs::write(m.path("b"), &data).unwrap();
    }
    disable(&key);
    // Mount fails fast, naming the problem.
    let mnt = tmp.path().join("m2");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new(BIN).arg("mount").arg(&cipher).arg(&mnt).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("disabled"), "mount with disabled key: {err}");
    assert!(!mounted(&mnt));
    enable(&key);
    let m = Mounted::start(&cipher, &tmp.path().join("m3"), &[]);
    assert!(std::fs::read(m.path("a")).unwrap() == data);
    // Disabled while mounted: a cold file gives EACCES with a log line.
    disable(&key);
    let e = std::fs::read(m.path("b")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    assert!(m.log().contains("disabled"), "log: {}", m.log());
    // Nothing was lost: re-enable and everything reads.
    enable(&key);
    assert!(std::fs::read(m.path("b")).unwrap() == data);
}

#[test]
fn kms_down_fails_mount_clearly() {
    need_harness!("kms_down_fails_mount_clearly");
    if !fuse_available("kms_down_fails_mount_clearly") {
        return;
    }
    let key = create_key("down");
    let (tmp, cipher) = kms_volume(&key.id);
    let mnt = tmp.path().join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    // A closed port: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let t = std::time::Instant::now();
    let out = Command::new(BIN)
        .arg("mount")
        .arg(&cipher)
        .arg(&mnt)
        .env("AWS_ENDPOINT_URL_KMS", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mount succeeded with KMS down");
    assert!(err.contains("unavailable") || err.contains("KMS"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(60), "took {:?}", t.elapsed());
    assert!(!mounted(&mnt));
}

#[test]
fn rewrap_to_new_key_touches_no_data() {
    need_harness!("rewrap_to_new_key_touches_no_data");
    if !fuse_available("rewrap_to_new_key_touches_no_data") {
        return;
    }
    let old = create_key("rewrap-old");
    let new = create_key("rewrap-new");
    let (tmp, cipher) = kms_volume(&old.id);
    let data = random_bytes(50_000, 8);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        for i in 0..5 {
            std::fs::write(m.path(&format!("f{i}")), &data).unwrap();
        }
    }
    let before: Vec<Vec<u8>> = (0..5).map(|i| std::fs::read(cipher.join(format!("f{i}"))).unwrap()).collect();
    let re0 = count(&new, "ReEncrypt");
    let out = Command::new(BIN).arg("rewrap").arg(&cipher).arg("--to-key").arg(&new.arn).output().unwrap();
    assert!(
        out.status.success(),
        "rewrap: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(count(&new, "ReEncrypt") - re0, 6, "one ReEncrypt per file and one for the config key");
    for (i, b) in before.iter().enumerate() {
        let a = std::fs::read(cipher.join(format!("f{i}"))).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a[512..] == b[512..], "data blocks of f{i} changed");
        assert!(a[..512] != b[..512], "header of f{i} unchanged");
    }
    // Resumable: a second run finds nothing to do.
    let out = Command::new(BIN).arg("rewrap").arg(&cipher).arg("--to-key").arg(&new.arn).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 re-wrapped, 5 already"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    disable(&old);
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    for i in 0..5 {
        assert!(std::fs::read(m.path(&format!("f{i}"))).unwrap() == data);
    }
}

#[test]
fn offline_encrypt_decrypt_with_kms() {
    need_harness!("offline_encrypt_decrypt_with_kms");
    let key = create_key("offline");
    let tmp = tempfile::tempdir().unwrap();
    let plain = tmp.path().join("p");
    std::fs::write(&plain, random_bytes(123_457, 4)).unwrap();
    let enc = tmp.path().join("e");
    let back = tmp.path().join("b");
    let (ok, out) = sh(&format!("{BIN} encrypt --kms-key {} {} {}", key.id, plain.display(), enc.display()));
    assert!(ok, "{out}");
    // The header names its key, but it is not trusted until the user says so.
    let (ok, out) = sh(&format!("{BIN} decrypt {} {}", enc.display(), back.display()));
    assert!(!ok && out.contains("--trust-header-key"), "{out}");
    let (ok, out) = sh(&format!("{BIN} decrypt --kms-key {} {} {}", key.id, enc.display(), back.display()));
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&plain).unwrap());
    // Via pipes too.
    let (ok, out) = sh(&format!(
        "cat {} | {BIN} encrypt --kms-key {} - - | {BIN} decrypt --trust-header-key - - | cmp - {}",
        plain.display(),
        key.id,
        plain.display()
    ));
    assert!(ok, "{out}");
}
