#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Operations around the daemon's log: SIGHUP reopens the log file and keeps
//! the mount, an unwritable log file fails the mount, the file is 0600; and
//! the AWS profile and region flags.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sighup_reopens_the_log_file_and_keeps_serving() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::write(m.path("a"), b"hello").unwrap();
    let rotated = m.log.with_extension("log.1");
    std::fs::rename(&m.log, &rotated).unwrap();
    let pid = m.child.as_ref().unwrap().id() as i32;
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let t = Instant::now();
    while !m.log().contains("reopened") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no reopen; old log: {}",
            std::fs::read_to_string(&rotated).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::metadata(&m.log).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(mounted(&m.mnt), "SIGHUP stopped the mount");
    assert_eq!(std::fs::read(m.path("a")).unwrap(), b"hello");
    std::fs::write(m.path("b"), b"after").unwrap();
    assert_eq!(std::fs::read(m.path("b")).unwrap(), b"after");
}

#[test]
fn log_file_is_0600_and_an_unwritable_one_fails_the_mount() {
    require_mount!();
    let v = Volume::new();
    let mnt = v.tmp.path().join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    for fg in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(&v.cipher).arg(&mnt).arg("--log-file").arg(v.tmp.path().join("no/such/dir/log"));
        if fg {
            cmd.arg("-f");
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "fg={fg}: {err}");
        assert!(err.contains("log file"), "{err}");
        assert!(!mounted(&mnt));
    }
    // A looser existing log file is put back to 0600.
    let log = v.tmp.path().join("m.log");
    std::fs::write(&log, b"old\n").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
    let m = v.mount("m", &[]);
    assert_eq!(std::fs::metadata(&m.log).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(m.log().starts_with("old\n"), "appends");
}

#[test]
fn a_missing_aws_profile_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("aws-config");
    std::fs::write(&cfg, "[profile other]\nregion = eu-west-1\n").unwrap();
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .env("HOME", tmp.path())
        .env("AWS_CONFIG_FILE", &cfg)
        .args(["--profile", "nosuch", "init"])
        .arg(tmp.path().join("c"))
        .args(["--kms-key", "alias/kmsfs-nothing"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("AWS profile \"nosuch\"") && err.contains("aws-config"), "{err}");
    // --region is a global flag, accepted before or after the command.
    let out = Command::new(BIN).args(["inspect", "--region", "eu-west-1", "--help"]).output().unwrap();
    assert!(out.status.success());
}

#[test]
fn unit_prevents_restart_on_config_and_key_errors() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kmsfs@.service")).unwrap();
    assert!(unit.lines().any(|l| l == "RestartPreventExitStatus=2 3 4"), "{unit}");
    assert!(unit.contains("Environment=HOME=/root"));
    assert!(unit.contains("LoadCredential=kmsfs.key:"));
}

#[test]
fn key_from_systemd_credentials_directory() {
    require_mount!();
    let v = Volume::new();
    let creds = v.tmp.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::rename(&v.key, creds.join("kmsfs.key")).unwrap();
    let mnt = v.tmp.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    // Without the credential the recorded key file is missing: exit 4.
    let out = Command::new(BIN).arg("mount").arg(&v.cipher).arg(&mnt).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(BIN)
        .arg("mount")
        .arg(&v.cipher)
        .arg(&mnt)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(mnt.join("a"), b"via credential").unwrap();
    assert_eq!(std::fs::read(mnt.join("a")).unwrap(), b"via credential");
    let out = Command::new(BIN).arg("unmount").arg(&mnt).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!mounted(&mnt));
}

#[test]
fn a_bad_block_is_logged_once_per_read_with_its_absolute_path() {
    use std::os::unix::fs::FileExt;
    require_mount!();
    let v = Volume::plain();
    let m = v.mount("m", &[]);
    std::fs::write(m.path("victim"), random_bytes(20_000, 5)).unwrap();
    drop(m);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(v.cipher.join("victim")).unwrap();
    let off = 256 + 4124 + 100; // inside block 1
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 1], off).unwrap();
    drop(f);
    let m = v.mount("m2", &[]);
    // The kernel turns this one read into several FUSE reads of block 1.
    let err = std::fs::read(m.path("victim")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let lines: Vec<String> = m.log().lines().filter(|l| l.contains("integrity error")).map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let abs = m.mnt.join("victim");
    assert!(lines[0].contains(abs.to_str().unwrap()) && lines[0].contains("block 1"), "{lines:?}");
}
