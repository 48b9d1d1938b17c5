#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real mounts of aws-kms volumes: aws-sdk-kms against moto behind the
//! project's KMS proxy (scripts/harness/kms-server.sh), and the kmsfs binary.

mod common;

use std::process::Command;

use common::kms::*;
use common::*;

fn ls_la(dir: &std::path::Path) {
    let (ok, out) = sh(&format!("ls -laR {} >/dev/null && stat {}/* >/dev/null", dir.display(), dir.display()));
    assert!(ok, "{out}");
}

#[test]
fn kms_volume_call_budget() {
    require_kms!();
    require_mount!();
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
    require_kms!();
    require_mount!();
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
    // The line names the key and the file it concerns.
    assert!(m.log().lines().any(|l| l.contains("disabled") && l.contains("path=/b")), "log: {}", m.log());
    // Nothing was lost: re-enable and everything reads.
    enable(&key);
    assert!(std::fs::read(m.path("b")).unwrap() == data);
}

#[test]
fn kms_down_fails_mount_clearly() {
    require_kms!();
    require_mount!();
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
    require_kms!();
    require_mount!();
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
    require_kms!();
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

fn stats(m: &Mounted) -> serde_json::Value {
    let (ok, out) = m.stats_json();
    assert!(ok, "{out}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn outage_creates_fail_at_open_or_persist() {
    require_kms!();
    require_mount!();
    let key = create_key("outage-creates");
    let (tmp, cipher) = kms_volume(&key.id);
    let mut m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
    std::fs::write(m.path("before"), b"before\n").unwrap(); // activates the pool
    wait_until("a full key pool", 30, || stats(&m)["pool"]["ready"].as_u64() >= Some(64));
    let outage = Outage::start(&key);
    // A shell loop as a user would write it; each line reports its status.
    const N: usize = 70;
    let t = std::time::Instant::now();
    let (_, out) = sh(&format!(
        "cd {} && for i in $(seq 1 {N}); do if sh -c \"echo data$i > f$i\" 2>/dev/null; then echo ok $i; else echo fail $i; fi; done",
        m.mnt.display()
    ));
    let took = t.elapsed();
    let ok: Vec<usize> = out.lines().filter_map(|l| l.strip_prefix("ok ")).map(|i| i.trim().parse().unwrap()).collect();
    let failed = N - ok.len();
    eprintln!("outage: {} of {N} creates succeeded, {failed} failed at open, in {took:?}", ok.len());
    // The pool's 64 keys carry the first 64 creates; the rest fail at open.
    assert!(ok.len() >= 64 && failed >= 1, "{out}");
    // The pool's refills fail too (once their SDK retries give up), and say so.
    wait_until("a failed refill", 30, || stats(&m)["pool"]["refill_errors"].as_u64() >= Some(1));
    let s = stats(&m);
    assert!(s["pool"]["last_error"].as_str().unwrap().contains("unavailable"), "{}", s["pool"]);
    assert_eq!(s["pool"]["ready"], 0, "{}", s["pool"]);
    // One log line per failed open, saying why.
    let lines: Vec<String> =
        m.noisy_log_lines().into_iter().filter(|l| l.contains("create") && l.contains("KMS unavailable")).collect();
    assert_eq!(lines.len(), failed, "{lines:#?}");
    // A failed create leaves nothing behind.
    for i in (1..=N).filter(|i| !ok.contains(i)) {
        assert!(!m.path(&format!("f{i}")).exists(), "f{i} failed but exists");
    }
    // KMS comes back: creates work at once, the pool refills, no remount.
    drop(outage);
    let t = std::time::Instant::now();
    std::fs::write(m.path("after"), b"after\n").unwrap();
    let create = t.elapsed();
    wait_until("the pool to refill", 30, || stats(&m)["pool"]["ready"].as_u64().unwrap() >= 32);
    eprintln!("after the outage: create in {create:?}, pool half full in {:?}", t.elapsed());
    let s = stats(&m);
    assert!(s["pool"]["last_refill"].as_u64().unwrap() > 0, "{}", s["pool"]);
    m.unmount();
    // Every create the shell saw succeed has its data after a remount.
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    for &i in &ok {
        assert_eq!(std::fs::read_to_string(m.path(&format!("f{i}"))).unwrap(), format!("data{i}\n"), "f{i}");
    }
    assert_eq!(std::fs::read_to_string(m.path("after")).unwrap(), "after\n");
}

#[test]
fn writer_keeps_its_key_past_max_age_and_through_an_outage() {
    require_kms!();
    require_mount!();
    use std::io::{Seek, Write};
    use std::os::unix::fs::FileExt;
    let key = create_key("outage-writer");
    let (tmp, cipher) = kms_volume(&key.id);
    let old = random_bytes(10_000, 21);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m0"), &[]);
        for f in ["a", "b", "cold"] {
            std::fs::write(m.path(f), &old).unwrap();
        }
    }
    // A fresh mount: every key is cold, so each open below is counted.
    let mut m = Mounted::start_with(&cipher, &tmp.path().join("m"), &["--cache-max-age", "2"], &[]);
    let d0 = count(&key, "Decrypt");
    let r = std::fs::File::open(m.path("cold")).unwrap();
    assert_eq!(count(&key, "Decrypt"), d0, "a read-only open fetched the key");
    drop(r);
    // Opened for writing before the outage: the key is fetched at open.
    let mut a = std::fs::OpenOptions::new().append(true).open(m.path("a")).unwrap();
    let b = std::fs::OpenOptions::new().write(true).open(m.path("b")).unwrap();
    assert_eq!(count(&key, "Decrypt") - d0, 2, "one Decrypt per file opened for writing");
    let outage = Outage::start(&key);
    // Past the max age, the sweeper (every 5 s) drops the keys from the cache.
    wait_until("keys to leave the cache", 15, || stats(&m)["cache"]["size"] == 0);
    // The cache really lost them: a cold read fails while KMS is down.
    let e = std::fs::read(m.path("cold")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // The writers' keys stay pinned: writes land, with and without fsync.
    let more = random_bytes(5_000, 22);
    a.write_all(&more).unwrap();
    a.sync_all().unwrap();
    a.seek(std::io::SeekFrom::Start(0)).unwrap();
    drop(a);
    b.write_all_at(&more, 3_000).unwrap(); // a partial page: the kernel reads it in first
    b.write_all_at(&more, 20_000).unwrap(); // past the end: a hole, then data
    drop(b); // close() without fsync
    assert_eq!(stats(&m)["keys_pinned"], 0, "pins outlived their writers");
    // Once closed, the key is gone: a new open for writing fails cleanly.
    let e = std::fs::OpenOptions::new().write(true).open(m.path("a")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(outage);
    // KMS back: no remount needed.
    std::fs::OpenOptions::new().append(true).open(m.path("a")).unwrap().write_all(b"!").unwrap();
    m.unmount();
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    let mut want_a = old.clone();
    want_a.extend_from_slice(&more);
    want_a.push(b'!');
    assert!(std::fs::read(m.path("a")).unwrap() == want_a, "a lost data");
    let mut want_b = old.clone();
    want_b[3_000..8_000].copy_from_slice(&more);
    want_b.resize(20_000, 0);
    want_b.extend_from_slice(&more);
    assert!(std::fs::read(m.path("b")).unwrap() == want_b, "b lost data");
}

fn truncate0(p: &std::path::Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string.
    let r = unsafe { libc::truncate(c.as_ptr(), 0) };
    assert_eq!(r, 0, "truncate({}, 0): {}", p.display(), std::io::Error::last_os_error());
}

#[test]
fn truncation_needs_no_old_key() {
    require_kms!();
    require_mount!();
    use std::os::unix::fs::FileExt;
    let key = create_key("truncate");
    let (tmp, cipher) = kms_volume(&key.id);
    let old = random_bytes(10_000, 31);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m0"), &[]);
        for f in ["a", "b", "c", "d", "e", "g"] {
            std::fs::write(m.path(f), &old).unwrap();
        }
    }
    // Damaged headers: the magic of a, a byte inside the header of d.
    for (f, at) in [("a", 0), ("d", 20)] {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(cipher.join(f)).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x55], at).unwrap();
    }
    let mut m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
    let (ok, out) = sh(&format!("cat {} {} >/dev/null", m.path("a").display(), m.path("d").display()));
    assert!(!ok, "damaged files read: {out}");
    // O_TRUNC and truncate(0) overwrite them all the same.
    let (ok, out) = sh(&format!("echo new > {}", m.path("a").display()));
    assert!(ok, "O_TRUNC over a damaged header: {out}");
    // truncate(2) by path. (coreutils truncate opens for writing first,
    // which needs the key like any open for writing.)
    truncate0(&m.path("d"));
    let (ok, out) = sh(&format!("echo dd >> {}", m.path("d").display()));
    assert!(ok, "append after truncate(0): {out}");
    assert_eq!(std::fs::read_to_string(m.path("a")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(m.path("d")).unwrap(), "dd\n");
    // With the KMS key disabled, the old keys of b, c and e cannot be had;
    // O_TRUNC takes a pooled key for the new content, truncate(0) none at all.
    std::fs::write(m.path("p"), b"p").unwrap(); // the pool starts on the first create
    wait_until("a full key pool", 30, || stats(&m)["pool"]["ready"].as_u64() >= Some(64));
    let g = std::fs::OpenOptions::new().write(true).open(m.path("g")).unwrap();
    disable(&key);
    // ftruncate(0) of a file open for writing: its writers get a pooled key.
    g.set_len(0).unwrap();
    g.write_all_at(b"gg", 0).unwrap();
    drop(g);
    let (ok, out) = sh(&format!("echo new > {}", m.path("b").display()));
    assert!(ok, "O_TRUNC with the key disabled: {out}");
    truncate0(&m.path("c"));
    let f = std::fs::OpenOptions::new().write(true).open(m.path("e")).unwrap_err();
    assert_eq!(f.raw_os_error(), Some(libc::EACCES), "open for writing needs the old key: {f}");
    assert_eq!(std::fs::read_to_string(m.path("b")).unwrap(), "new\n");
    assert_eq!(std::fs::metadata(m.path("c")).unwrap().len(), 0);
    enable(&key);
    m.unmount();
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    assert_eq!(std::fs::read_to_string(m.path("a")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(m.path("b")).unwrap(), "new\n");
    assert_eq!(std::fs::read(m.path("c")).unwrap(), b"");
    assert_eq!(std::fs::read_to_string(m.path("d")).unwrap(), "dd\n");
    assert!(std::fs::read(m.path("e")).unwrap() == old);
    assert_eq!(std::fs::read_to_string(m.path("g")).unwrap(), "gg");
}

#[test]
fn disable_key_takes_effect_at_the_next_open() {
    require_kms!();
    require_mount!();
    use std::io::{Read, Write};
    let key = create_key("revoke");
    let (tmp, cipher) = kms_volume(&key.id);
    let old = random_bytes(10_000, 41);
    let mut m = Mounted::start_with(&cipher, &tmp.path().join("m"), &["--cache-max-age", "2"], &[]);
    std::fs::write(m.path("w"), &old).unwrap();
    std::fs::write(m.path("r"), &old).unwrap();
    let mut w = std::fs::OpenOptions::new().append(true).open(m.path("w")).unwrap();
    assert!(std::fs::read(m.path("r")).unwrap() == old); // its pages are in the page cache now
    disable(&key);
    std::thread::sleep(std::time::Duration::from_secs(3)); // past the max age
    // The open writer keeps its key: the write in progress completes.
    let more = random_bytes(5_000, 42);
    w.write_all(&more).unwrap();
    w.sync_all().unwrap();
    // A new open needs the key: a reader gets EACCES although the file's
    // pages were cached (an open without FOPEN_KEEP_CACHE drops them).
    let mut buf = Vec::new();
    let e = std::fs::File::open(m.path("r")).unwrap().read_to_end(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    drop(w);
    // And once the last writer is gone, so is its key.
    let e = std::fs::OpenOptions::new().append(true).open(m.path("w")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    enable(&key);
    m.unmount();
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    let mut want = old.clone();
    want.extend_from_slice(&more);
    assert!(std::fs::read(m.path("w")).unwrap() == want, "the write made after disable-key was lost");
}
