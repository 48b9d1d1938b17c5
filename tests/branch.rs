#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Branch key mode (`init --key-mode branch`) on real mounts: aws-sdk-kms
//! against moto behind the project's call-counting proxy
//! (scripts/harness/kms-server.sh), and the kmsfs binary.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::kms::*;
use common::*;
use kmsfs::keys::KeyProvider;

const N: usize = 2000;

fn branch_volume(key_ref: &str, extra: &[&str]) -> (tempfile::TempDir, std::path::PathBuf) {
    kms_volume_with(key_ref, &[&["--key-mode", "branch"], extra].concat())
}

/// Every KMS call the proxy saw on these keys, whatever the operation.
fn calls(keys: &[&TestKey]) -> u64 {
    keys.iter().map(|k| total(k)).sum()
}

fn content(i: usize) -> Vec<u8> {
    format!("file {i}\n").into_bytes()
}

fn inspect(file: &Path) -> serde_json::Value {
    let (code, out) = run(&["inspect", "--json", p(file)]);
    assert_eq!(code, 0, "{out}");
    serde_json::from_str(&out).unwrap()
}

fn read_all(m: &Mounted, n: usize) {
    for i in 0..n {
        assert_eq!(std::fs::read(m.path(&format!("d/f{i}"))).unwrap(), content(i), "file {i}");
    }
}

#[test]
fn creates_and_cold_reads_make_a_handful_of_kms_calls() {
    require_kms!();
    require_mount!();
    let key = create_key("branch-budget");
    // Encrypted names: the mount also unwraps the name key.
    let (tmp, cipher) = branch_volume(&key.id, &[]);
    let c0 = calls(&[&key]);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        let c1 = calls(&[&key]);
        // Config key, name key, DescribeKey + GenerateDataKey (the key's
        // state), branch key.
        assert!(c1 - c0 <= 5, "mount made {} KMS calls", c1 - c0);
        std::fs::create_dir(m.path("d")).unwrap();
        for i in 0..N {
            std::fs::write(m.path(&format!("d/f{i}")), content(i)).unwrap();
        }
        let created = calls(&[&key]) - c1;
        assert!(created <= 2, "{N} creates made {created} KMS calls");
        eprintln!("branch mode: mount {} KMS calls, {N} creates {created}", c1 - c0);
    }
    let d0 = count(&key, "Decrypt");
    let c0 = calls(&[&key]);
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    read_all(&m, N);
    let decrypts = count(&key, "Decrypt") - d0;
    assert!(decrypts <= 3, "remount + cold reads of {N} files: {decrypts} Decrypts");
    eprintln!("branch mode: remount + {N} cold reads: {decrypts} Decrypts, {} calls", calls(&[&key]) - c0);
    drop(m);
    // Headers name the branch provider and version, never the KMS key.
    let (code, out) = run(&["path", p(&cipher), "d/f0"]);
    assert_eq!(code, 0, "{out}");
    let h = inspect(Path::new(out.trim()));
    assert_eq!(h["provider"], "aws-kms-branch", "{h}");
    assert_eq!(h["key_id"], "branch:1", "{h}");
}

#[test]
fn disable_and_enable_take_effect_within_one_max_age() {
    require_kms!();
    require_mount!();
    let key = create_key("branch-disable");
    let (tmp, cipher) = branch_volume(&key.id, &["--plaintext-names"]);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m0"), &[]);
        for f in ["a", "b", "c"] {
            std::fs::write(m.path(f), f.as_bytes()).unwrap();
        }
    }
    const TTL: u64 = 2;
    let m = Mounted::start_with(&cipher, &tmp.path().join("m"), &["--cache-max-age", &TTL.to_string()], &[]);
    let t0 = Instant::now();
    assert_eq!(std::fs::read(m.path("a")).unwrap(), b"a");
    disable(&key);
    // One max age after the branch key was last confirmed (at the mount),
    // creates and reads of files whose key is not cached are refused.
    std::thread::sleep(Duration::from_secs(TTL).saturating_sub(t0.elapsed()) + Duration::from_millis(300));
    let e = std::fs::write(m.path("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "create: {e}");
    let e = std::fs::read(m.path("b")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "cold read: {e}");
    let log = m.log();
    assert!(log.contains("branch key version 1 refused") && log.contains("disabled"), "log: {log}");
    // While refused, the daemon does not ask KMS on every create.
    let c = calls(&[&key]);
    for i in 0..50 {
        assert!(std::fs::write(m.path(&format!("x{i}")), b"x").is_err());
    }
    assert!(calls(&[&key]) - c <= 2, "refused creates hammered KMS: {}", calls(&[&key]) - c);
    // Enabled again: no remount needed.
    enable(&key);
    let t = Instant::now();
    loop {
        match std::fs::write(m.path("new"), b"back") {
            Ok(()) => break,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
                assert!(t.elapsed() < Duration::from_secs(TTL), "still refused {:?} after enable-key", t.elapsed());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert_eq!(std::fs::read(m.path("b")).unwrap(), b"b");
    assert_eq!(std::fs::read(m.path("c")).unwrap(), b"c");
    assert!(m.log().contains("usable again"), "log: {}", m.log());
}

#[test]
fn rewrap_moves_only_volume_keys_and_rotation_keeps_old_files() {
    require_kms!();
    require_mount!();
    let k1 = create_key("branch-rewrap-1");
    let k2 = create_key("branch-rewrap-2");
    let (tmp, cipher) = branch_volume(&k1.id, &[]);
    const M: usize = 300;
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        std::fs::create_dir(m.path("d")).unwrap();
        for i in 0..M {
            std::fs::write(m.path(&format!("d/f{i}")), content(i)).unwrap();
        }
    }
    let (_, backing) = run(&["path", p(&cipher), "d/f0"]);
    let backing = std::path::PathBuf::from(backing.trim());
    let before = std::fs::read(&backing).unwrap();
    let c0 = calls(&[&k1, &k2]);
    let (code, out) = run(&["rewrap", p(&cipher), "--to-key", &k2.arn]);
    assert_eq!(code, 0, "{out}");
    let rewrap_calls = calls(&[&k1, &k2]) - c0;
    // Open (config key), DescribeKey + GenerateDataKey on K2, config key,
    // then one ReEncrypt per volume key (name, config, branch): not per file.
    assert!(rewrap_calls <= 8, "rewrap of {M} files made {rewrap_calls} KMS calls");
    eprintln!("branch mode: rewrap --to-key of {M} files: {rewrap_calls} KMS calls");
    assert_eq!(std::fs::read(&backing).unwrap(), before, "rewrap touched a file");
    // The old key is no longer needed at all.
    disable(&k1);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
        read_all(&m, M);
        std::fs::write(m.path("d/after"), b"after").unwrap();
    }
    // A new branch version for new files; old files keep theirs.
    let (code, out) = run(&["rotate-branch", p(&cipher)]);
    assert_eq!(code, 0, "{out}");
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m3"), &[]);
        std::fs::write(m.path("d/v2"), b"v2").unwrap();
        read_all(&m, M);
    }
    let (_, v2) = run(&["path", p(&cipher), "d/v2"]);
    assert_eq!(inspect(Path::new(v2.trim()))["key_id"], "branch:2");
    assert_eq!(inspect(&backing)["key_id"], "branch:1");
    // --all-files moves old files to version 2, locally.
    let c0 = calls(&[&k2]);
    let (code, out) = run(&["rewrap", p(&cipher), "--all-files"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{} moved to branch:2", M + 1)), "{out}");
    assert!(calls(&[&k2]) - c0 <= 6, "rewrap --all-files made {} KMS calls", calls(&[&k2]) - c0);
    assert_eq!(inspect(&backing)["key_id"], "branch:2");
    let m = Mounted::start(&cipher, &tmp.path().join("m4"), &[]);
    read_all(&m, M);
    assert_eq!(std::fs::read(m.path("d/after")).unwrap(), b"after");
    enable(&k1);
}

#[test]
fn branch_key_context_and_file_headers_are_checked() {
    require_kms!();
    require_mount!();
    let key = create_key("branch-context");
    let (tmp, cipher) = branch_volume(&key.id, &["--plaintext-names"]);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        std::fs::write(m.path("a"), random_bytes(10_000, 1)).unwrap();
        std::fs::write(m.path("b"), random_bytes(10_000, 2)).unwrap();
        std::fs::write(m.path("c"), random_bytes(10_000, 3)).unwrap();
        std::fs::write(m.path("d"), random_bytes(10_000, 4)).unwrap();
    }
    // Header swap: b's key section and IDs on a's blocks.
    let a = std::fs::read(cipher.join("a")).unwrap();
    let mut b = std::fs::read(cipher.join("b")).unwrap();
    b[..512].copy_from_slice(&a[..512]);
    std::fs::write(cipher.join("b_swapped"), &b).unwrap();
    // A foreign branch version: same blob, key ID "branch:2" (same length).
    // Each tampered file has its own file ID: the key cache is keyed by it.
    let mut foreign = std::fs::read(cipher.join("c")).unwrap();
    let at = foreign.windows(8).position(|w| w == b"branch:1").unwrap();
    foreign[at + 7] = b'2';
    std::fs::write(cipher.join("c_foreign"), &foreign).unwrap();
    // An edited wrapped key (the last byte of the 60-byte blob).
    let mut edited = std::fs::read(cipher.join("d")).unwrap();
    edited[at + 8 + 2 + 59] ^= 1;
    std::fs::write(cipher.join("d_edited"), &edited).unwrap();
    {
        // Before a is read: the key cache is keyed by file ID, so once a's
        // key is cached a copy of a with an edited key section reads as a
        // (whole-file copies are not detected, docs/SECURITY.md).
        let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
        for f in ["b_swapped", "c_foreign", "d_edited"] {
            let e = std::fs::read(m.path(f)).map(|_| ()).expect_err(f);
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "{f}: {e}");
        }
        assert_eq!(std::fs::read(m.path("a")).unwrap(), random_bytes(10_000, 1));
    }
    for f in ["b_swapped", "c_foreign", "d_edited"] {
        std::fs::remove_file(cipher.join(f)).unwrap();
    }
    // Branch keys are authenticated: stripped, renumbered or edited without
    // the config key, the config is refused (exit 3).
    let good = std::fs::read(cipher.join("kmsfs.conf")).unwrap();
    let text = String::from_utf8(good.clone()).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let edits: [&dyn Fn(&mut serde_json::Value); 3] = [
        &|v| {
            v.as_object_mut().unwrap().remove("branch_keys");
        },
        &|v| v["branch_keys"][0]["version"] = 2.into(),
        &|v| v["branch_keys"][0]["key"]["blob"] = "AAAA".into(),
    ];
    for edit in edits {
        let mut e = v.clone();
        edit(&mut e);
        std::fs::write(cipher.join("kmsfs.conf"), serde_json::to_vec(&e).unwrap()).unwrap();
        let (code, out) = run(&["fsck", p(&cipher)]);
        assert_eq!(code, 3, "{e}: {out}");
    }
    std::fs::write(cipher.join("kmsfs.conf"), &good).unwrap();
    // Someone who can use the KMS key and re-sign the config puts in a
    // branch key wrapped under another context: the name of another
    // purpose, another version, another volume. The mount refuses it.
    let kms = kmsfs::keys::open_aws_kms(&key.arn, &[]).unwrap();
    let cfg = kmsfs::volume::VolumeConfig::load(&cipher).unwrap();
    let (ctx, _) = cfg.branch_keys[0].key.parts(cfg.volume_id()).unwrap();
    use kmsfs::keys::{KeyContext, Purpose};
    for wrong in [
        KeyContext { purpose: Some(Purpose::Config), ..ctx },
        KeyContext { file_id: kmsfs::keys::branch::branch_id(2).unwrap(), ..ctx },
        KeyContext { volume_id: [9; 16], ..ctx },
    ] {
        let mut cfg = kmsfs::volume::VolumeConfig::load(&cipher).unwrap();
        let (_k, w) = kms.generate(&wrong).unwrap();
        cfg.branch_keys[0].key = kmsfs::volume::StoredKey::from_wrapped(&ctx, &w);
        let auth = cfg.unwrap_auth_key(kms.as_ref()).unwrap();
        cfg.sign(&auth).unwrap();
        cfg.store(&cipher).unwrap();
        let mnt = tmp.path().join("m3");
        std::fs::create_dir_all(&mnt).unwrap();
        let (code, out) = run(&["mount", p(&cipher), p(&mnt)]);
        assert_eq!(code, 4, "{wrong:?}: {out}");
        assert!(out.contains("does not decrypt"), "{out}");
        assert!(!mounted(&mnt));
    }
    std::fs::write(cipher.join("kmsfs.conf"), good).unwrap();
    let m = Mounted::start(&cipher, &tmp.path().join("m4"), &[]);
    assert_eq!(std::fs::read(m.path("b")).unwrap(), random_bytes(10_000, 2));
}
