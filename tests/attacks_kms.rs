#![allow(clippy::unwrap_used, clippy::expect_used)]
//! An attacker who writes the cipher dir and holds credentials for a KMS key
//! of their own. Real mounts of aws-kms volumes through aws-sdk-kms against
//! moto behind the project's call-counting proxy (scripts/harness/kms-server.sh).

mod common;

use std::path::Path;

use aws_sdk_kms::types::DataKeySpec;
use common::kms::*;
use common::*;
use kmsfs::format::block::{BlockAad, seal_block};
use kmsfs::format::header::FileHeader;
use kmsfs::format::hex;
use kmsfs::keys::{DataKey, WrappedKey};

/// Rewrites `file` as the attacker would: same volume and file IDs, a data
/// key from GenerateDataKey under the attacker's key with the same
/// encryption context, and blocks sealed under it.
fn forge(file: &Path, evil: &TestKey, content: &[u8]) {
    let old = std::fs::read(file).unwrap();
    let slot = usize::from(u16::from_be_bytes([old[6], old[7]]));
    let h = FileHeader::parse(&old[..slot], slot).unwrap();
    let out = rt()
        .block_on(
            admin()
                .generate_data_key()
                .key_id(&evil.id)
                .key_spec(DataKeySpec::Aes256)
                .encryption_context("kmsfs:volume", hex(&h.volume_id))
                .encryption_context("kmsfs:file", hex(&h.file_id))
                .send(),
        )
        .unwrap();
    let mut raw: [u8; 32] = out.plaintext().unwrap().as_ref().try_into().unwrap();
    let dek = DataKey::from_bytes(&mut raw);
    let wrapped = WrappedKey {
        provider: "aws-kms".into(),
        key_id: out.key_id().unwrap().to_string(),
        blob: out.ciphertext_blob().unwrap().as_ref().to_vec(),
    };
    let mut nh = FileHeader::new(h.block_log2, h.header_size, h.volume_id, h.file_id, wrapped);
    nh.seal(&dek).unwrap();
    let mut bytes = nh.to_bytes().unwrap();
    let aad = BlockAad { file_id: &h.file_id, block_log2: h.block_log2, index: 0, last: true };
    bytes.extend_from_slice(&seal_block(&dek, &aad, content).unwrap());
    std::fs::write(file, bytes).unwrap();
}

#[test]
fn a_header_under_the_attackers_key_is_refused_everywhere() {
    require_kms!();
    require_mount!();
    let key = create_key("victim");
    let evil = create_key("attacker");
    let (tmp, cipher) = kms_volume(&key.id);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        std::fs::write(m.path("victim"), b"the real contents").unwrap();
        std::fs::write(m.path("other"), b"untouched").unwrap();
    }
    forge(&cipher.join("victim"), &evil, b"ATTACKER CONTENT");
    let evil_calls = || count(&evil, "Decrypt") + count(&evil, "ReEncrypt");
    let before = evil_calls();
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
        let e = std::fs::read(m.path("victim")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        assert_eq!(std::fs::read(m.path("other")).unwrap(), b"untouched");
        let log = m.log();
        assert!(log.contains("does not trust") && log.contains(&evil.arn), "log: {log}");
    }
    // fsck lists it as foreign, rewrap refuses to move it, decrypt refuses it.
    let (code, out) = run(&["fsck", p(&cipher)]);
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("FOREIGN /victim") || out.contains("FOREIGN victim"), "{out}");
    let next = create_key("next");
    let (code, out) = run(&["rewrap", p(&cipher), "--to-key", &next.arn]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED") && out.contains("victim"), "{out}");
    let (ok, out) = sh(&format!("{BIN} inspect --json {}/victim", cipher.display()));
    assert!(ok && out.contains(&evil.arn), "the forged header was not re-wrapped: {out}");
    let plain = tmp.path().join("out");
    let (code, out) = run(&["decrypt", "--kms-key", &key.arn, p(&cipher.join("victim")), p(&plain)]);
    assert_ne!(code, 0, "{out}");
    assert!(!plain.exists());
    let (code, out) = run(&["decrypt", p(&cipher.join("victim")), p(&plain)]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--trust-header-key"), "{out}");
    assert!(!plain.exists());
    // Not one Decrypt or ReEncrypt ever named the attacker's key.
    assert_eq!(evil_calls(), before, "a KMS call named the attacker's key");
}

#[test]
fn a_config_swapped_to_the_attackers_key_is_refused() {
    require_kms!();
    require_mount!();
    let key = create_key("swap-victim");
    let evil = create_key("swap-attacker");
    let (tmp, cipher) = kms_volume(&key.id);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        std::fs::write(m.path("f"), b"data").unwrap();
    }
    let good = std::fs::read(cipher.join("kmsfs.conf")).unwrap();
    // A config the attacker made and authenticated under their own key,
    // with the victim's volume ID, so old files would still read.
    let mut cfg = kmsfs::volume::VolumeConfig::load(&cipher).unwrap();
    cfg.key_id = evil.arn.clone();
    let theirs = kmsfs::keys::open_aws_kms(&evil.arn, &[]).unwrap();
    cfg.create_auth_key(theirs.as_ref()).unwrap();
    cfg.store(&cipher).unwrap();
    let mnt = tmp.path().join("m2");
    std::fs::create_dir_all(&mnt).unwrap();
    let (code, out) = run(&["mount", p(&cipher), p(&mnt)]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&evil.arn) && out.contains("trusted key"), "{out}");
    assert!(!mounted(&mnt));
    let (code, out) = run(&["fsck", p(&cipher)]);
    assert_eq!(code, 3, "{out}");
    // A host that never saw the volume has nothing to trust: it asks.
    let fresh = tempfile::tempdir().unwrap();
    let env = [("KMSFS_TRUST_DIR", fresh.path().as_os_str())];
    let (code, out) = run_env(&["fsck", p(&cipher)], &env);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("--kms-key"), "{out}");
    // Naming the real key there does not accept the swapped config either.
    let (code, out) = run_env(&["fsck", p(&cipher), "--kms-key", &key.arn], &env);
    assert_eq!(code, 3, "{out}");
    // The real config, with the real key named once, is trusted from then on.
    std::fs::write(cipher.join("kmsfs.conf"), good).unwrap();
    let (code, out) = run_env(&["fsck", p(&cipher), "--kms-key", &key.arn], &env);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run_env(&["fsck", p(&cipher)], &env);
    assert_eq!(code, 0, "pin recorded: {out}");
}

#[test]
fn an_interrupted_rewrap_stays_readable_and_old_keys_stay_trusted() {
    require_kms!();
    require_mount!();
    let old = create_key("ir-old");
    let new = create_key("ir-new");
    let (tmp, cipher) = kms_volume(&old.id);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        for i in 0..4 {
            std::fs::write(m.path(&format!("f{i}")), random_bytes(3000, i)).unwrap();
        }
    }
    // Interrupt the rewrap: one file's key section belongs to another file,
    // so its ReEncrypt fails while the others move to the new key.
    let f2 = cipher.join("f2");
    let saved = std::fs::read(&f2).unwrap();
    let mut bad = saved.clone();
    bad[68..512].copy_from_slice(&std::fs::read(cipher.join("f0")).unwrap()[68..512]);
    std::fs::write(&f2, &bad).unwrap();
    let (code, out) = run(&["rewrap", p(&cipher), "--to-key", &new.arn]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("3 re-wrapped") && out.contains("1 failed"), "{out}");
    std::fs::write(&f2, &saved).unwrap();
    // Files already under the new key and files still under the old key read.
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    for i in 0..4 {
        assert_eq!(std::fs::read(m.path(&format!("f{i}"))).unwrap(), random_bytes(3000, i), "f{i}");
    }
    drop(m);
    let (code, out) = run(&["rewrap", p(&cipher), "--to-key", &new.arn]);
    assert_eq!(code, 0, "{out}");
    disable(&old);
    let m = Mounted::start(&cipher, &tmp.path().join("m3"), &[]);
    for i in 0..4 {
        assert_eq!(std::fs::read(m.path(&format!("f{i}"))).unwrap(), random_bytes(3000, i), "f{i}");
    }
    enable(&old);
}

#[test]
fn disabling_the_key_stops_listings_within_one_max_age() {
    require_kms!();
    require_mount!();
    let key = create_key("names-revoked");
    // Encrypted names: the name key is unwrapped once at mount.
    let (tmp, cipher) = kms_volume_with(&key.id, &[]);
    let m = Mounted::start_with(&cipher, &tmp.path().join("m2"), &["--cache-max-age", "2"], &[]);
    std::fs::write(m.path("named"), b"x").unwrap();
    disable(&key);
    std::thread::sleep(std::time::Duration::from_millis(2600));
    let e = std::fs::read_dir(&m.mnt).map(|d| d.count()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    let e = std::fs::metadata(m.path("other")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    enable(&key);
    std::thread::sleep(std::time::Duration::from_millis(2600));
    assert_eq!(std::fs::read(m.path("named")).unwrap(), b"x");
    drop(m);
    let log = std::fs::read_to_string(tmp.path().join("m2.log")).unwrap();
    assert!(log.contains("name key is refused") && log.contains("names are back"), "{log}");
}

#[test]
fn credentials_and_keys_never_reach_the_log_even_at_trace() {
    require_kms!();
    require_mount!();
    let key = create_key("log-hygiene");
    let (tmp, cipher) = kms_volume(&key.id);
    // moto accepts any secret: a distinctive one shows whether it leaks.
    const SECRET: &str = "kmsfsTestSecretThatMustNeverBeLogged0123";
    let env = [("KMSFS_LOG", "trace".as_ref()), ("AWS_SECRET_ACCESS_KEY", SECRET.as_ref())];
    let m = Mounted::start_with(&cipher, &tmp.path().join("m"), &[], &env);
    std::fs::write(m.path("f"), b"data").unwrap();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    let log = m.log.clone();
    drop(m);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TRACE") || text.contains("DEBUG"), "trace logging was on: {text}");
    assert!(!text.contains(SECRET), "the secret key reached the log");
    for field in ["Plaintext", "CiphertextBlob", "Authorization", "x-amz-security-token"] {
        assert!(!text.contains(field), "{field} reached the log");
    }
}
