#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Offline tools and exit codes against KMS (moto behind the counting
//! proxy): `rewrap --dry-run` makes no KMS call and creates nothing; fsck and
//! rewrap work through the parallel driver; a disabled key is exit 4 for a
//! mount in the foreground and in the background.

mod common;

use std::process::{Command, Stdio};

use common::kms::*;
use common::*;

#[test]
fn rewrap_dry_run_calls_no_kms_and_creates_nothing_then_fsck_and_rewrap_in_parallel() {
    require_kms!();
    let key = create_key("ops-dry");
    let to = create_key("ops-dry-to");
    let tmp = tempfile::tempdir().unwrap();
    let cipher = tmp.path().join("c");
    let (c, _, err) = kmsfs!("init", cipher, "--kms-key", key.arn, "--plaintext-names");
    assert_eq!(c, 0, "{err}");
    const N: usize = 40;
    for i in 0..N {
        let src = tmp.path().join(format!("p{i}"));
        std::fs::write(&src, random_bytes(3000 + i, i as u64)).unwrap();
        let sub = cipher.join(format!("d{}", i % 4));
        std::fs::create_dir_all(&sub).unwrap();
        let (c, _, err) = kmsfs!("encrypt", "--volume", cipher, src, sub.join(format!("f{i}")));
        assert_eq!(c, 0, "{err}");
    }
    let before_listing = sh(&format!("cd {} && ls -laR", cipher.display())).1;
    let (b_key, b_to) = (total(&key), total(&to));
    // Dry run to a KMS key (ARN) and to a key file that does not exist.
    let (c, out, err) = kmsfs!("rewrap", cipher, "--to-key", to.arn, "--dry-run");
    assert_eq!(c, 0, "{err}");
    assert!(out.contains(&format!("{N} kmsfs files would be re-wrapped")), "{out}");
    assert!(out.contains("without verifying its MAC") && out.contains("no key-provider call"), "{out}");
    let newkey = tmp.path().join("new.key");
    let (c, out, err) = kmsfs!("rewrap", cipher, "--to-key-file", newkey, "--dry-run");
    assert_eq!(c, 0, "{err}");
    assert!(out.contains("would create it"), "{out}");
    assert!(!newkey.exists(), "dry run created the key file");
    assert_eq!((total(&key), total(&to)), (b_key, b_to), "dry run made KMS calls");
    assert_eq!(sh(&format!("cd {} && ls -laR", cipher.display())).1, before_listing, "dry run changed the cipher dir");

    // fsck through the parallel driver: one Decrypt per file (+ the config's).
    let d0 = count(&key, "Decrypt");
    let (c, out, err) = kmsfs!("fsck", cipher);
    assert_eq!(c, 0, "{out}{err}");
    assert!(out.contains(&format!("{N} files")), "{out}");
    let calls = count(&key, "Decrypt") - d0;
    assert!((N as u64..=N as u64 + 2).contains(&calls), "Decrypt calls: {calls}");
    // A real rewrap, then every file names the new key.
    let (c, out, err) = kmsfs!("rewrap", cipher, "--to-key", to.arn);
    assert_eq!(c, 0, "{out}{err}");
    assert!(out.contains(&format!("{N} re-wrapped")), "{out}");
    let (c, out, _) = kmsfs!("rewrap", cipher, "--to-key", to.arn, "--dry-run");
    assert_eq!(c, 0);
    assert!(out.contains(&format!("0 kmsfs files would be re-wrapped, {N} already")), "{out}");
    let (c, out, err) = kmsfs!("fsck", cipher);
    assert_eq!(c, 0, "{out}{err}");
}

#[test]
fn disabled_key_is_exit_4_in_foreground_and_background() {
    require_kms!();
    require_mount!();
    let key = create_key("ops-disabled");
    let tmp = tempfile::tempdir().unwrap();
    let cipher = tmp.path().join("c");
    assert_eq!(kmsfs!("init", cipher, "--kms-key", key.arn).0, 0);
    let mnt = tmp.path().join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    disable(&key);
    for fg in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(&cipher).arg(&mnt);
        if fg {
            cmd.arg("-f");
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "fg={fg}: {err}");
        assert!(err.contains("disabled"), "{err}");
        assert!(!mounted(&mnt));
    }
    let (c, _, err) = kmsfs!("fsck", cipher);
    assert_eq!(c, 4, "{err}");
    enable(&key);
    // No credentials: 4 as well.
    let out = Command::new(BIN)
        .arg("fsck")
        .arg(&cipher)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_SHARED_CREDENTIALS_FILE", tmp.path().join("none"))
        .env("AWS_CONFIG_FILE", tmp.path().join("none"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
}
