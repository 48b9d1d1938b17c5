#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Every documented exit code (README "Exit codes", `kmsfs --help`), from
//! each command that can give it, in the foreground and through the
//! background mount's ready pipe; and mount safety (non-empty, inside the
//! cipher dir, dead mount, a path with a space).

mod common;

use std::process::{Command, Stdio};

use common::*;

/// `kmsfs!` reduced to (exit code, stderr): where the codes are documented.
macro_rules! code {
    ($($a:expr),* $(,)?) => {{
        let (c, _, err) = kmsfs!($($a),*);
        (c, err)
    }};
}

#[test]
fn help_lists_exit_codes_and_environment() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for needle in ["Exit codes:", "  4  key provider", "  6  damaged data", "Environment:", "KMSFS_LOG", "AWS_PROFILE"]
    {
        assert!(text.contains(needle), "--help lacks {needle:?}: {text}");
    }
}

#[test]
fn offline_commands_use_the_documented_codes() {
    let v = Volume::plain();
    let t = v.tmp.path();
    let plain = t.join("plain");
    std::fs::write(&plain, random_bytes(20_000, 1)).unwrap();
    let enc = t.join("enc");
    assert_eq!(code!("encrypt", "--key-file", v.key, plain, enc).0, 0);

    // 1: an input file that does not exist.
    let (c, err) = code!("encrypt", "--key-file", v.key, t.join("missing"), t.join("o"));
    assert_eq!(c, 1, "{err}");
    // 2: usage.
    assert_eq!(code!("frobnicate", "--bogus").0, 2);
    assert_eq!(code!("init", t.join("x"), "--block-size", "1000").0, 2);
    // 3: not a volume; not a kmsfs file (inspect and decrypt alike).
    let (c, err) = code!("fsck", t);
    assert_eq!(c, 3, "{err}");
    let (c, err) = code!("inspect", plain);
    assert_eq!(c, 3, "inspect of a non-kmsfs file: {err}");
    assert!(err.contains("not a kmsfs file"), "{err}");
    let (c, err) = code!("decrypt", "--key-file", v.key, plain, t.join("o"));
    assert_eq!(c, 3, "decrypt of a non-kmsfs file: {err}");
    // 4: the wrong key, a missing key file.
    let other = Volume::plain();
    let (c, err) = code!("decrypt", "--key-file", other.key, enc, t.join("o"));
    assert_eq!(c, 4, "decrypt with the wrong key: {err}");
    assert!(!t.join("o").exists() && !t.join("o.kmsfs-partial").exists());
    let (c, err) = code!("decrypt", "--key-file", t.join("nokey"), enc, t.join("o"));
    assert_eq!(c, 4, "{err}");
    // 6: a damaged kmsfs file (decrypt, inspect of a torn header, fsck).
    let mut bytes = std::fs::read(&enc).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 1;
    let bad = t.join("bad");
    std::fs::write(&bad, &bytes).unwrap();
    let (c, err) = code!("decrypt", "--key-file", v.key, bad, t.join("o"));
    assert_eq!(c, 6, "{err}");
    std::fs::write(&bad, &bytes[..10]).unwrap();
    let (c, err) = code!("inspect", bad);
    assert_eq!(c, 6, "torn kmsfs header: {err}");
    assert_eq!(code!("encrypt", "--volume", v.cipher, plain, v.cipher.join("f")).0, 0);
    let mut f = std::fs::read(v.cipher.join("f")).unwrap();
    let n = f.len();
    f[n - 1] ^= 1;
    std::fs::write(v.cipher.join("f"), &f).unwrap();
    let (c, err) = code!("fsck", v.cipher);
    assert_eq!(c, 6, "{err}");
}

#[test]
fn mount_codes_in_foreground_and_background() {
    require_mount!();
    let v = Volume::new();
    let t = v.tmp.path();
    let mnt = t.join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    // 4: a missing key file, in both modes (the background parent forwards
    // the daemon's own code).
    for fg in [false, true] {
        let mut args = vec![std::ffi::OsString::from("mount")];
        args.extend([v.cipher.clone().into(), mnt.clone().into(), "--key-file".into(), t.join("nokey").into()]);
        if fg {
            args.push("-f".into());
        }
        let out = Command::new(BIN).args(&args).stdin(Stdio::null()).output().unwrap();
        assert_eq!(out.status.code(), Some(4), "fg={fg}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // 3: not a volume.
    let (c, err) = code!("mount", t, mnt);
    assert_eq!(c, 3, "{err}");
    // 2: an unknown mount option.
    let (c, err) = code!("mount", v.cipher, mnt, "-o", "frob");
    assert_eq!(c, 2, "{err}");
    assert!(!mounted(&mnt));
    // 0, then 5: already mounted.
    {
        let (c, err) = code!("mount", v.cipher, mnt);
        assert_eq!(c, 0, "{err}");
        assert!(mounted(&mnt));
        let (c, err) = code!("mount", v.cipher, mnt);
        assert_eq!(c, 5, "{err}");
        assert!(err.contains("already mounted"), "{err}");
        let (c, err) = code!("unmount", mnt);
        assert_eq!(c, 0, "{err}");
        assert!(!mounted(&mnt));
    }
    // 5: unmount of something that is not mounted.
    assert_eq!(code!("unmount", mnt).0, 5);
}

#[test]
fn mountpoint_safety() {
    require_mount!();
    let v = Volume::new();
    let t = v.tmp.path();
    // Not empty: refused, unless -o nonempty.
    let full = t.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    for fg in ["", "-f"] {
        let mut args = vec!["mount", v.cipher.to_str().unwrap(), full.to_str().unwrap()];
        if !fg.is_empty() {
            args.push(fg);
        }
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{err}");
        assert!(err.contains("not empty") && err.contains("-o nonempty"), "{err}");
    }
    {
        let _m = Mounted::start(&v.cipher, &full, &["nonempty"]);
        assert!(!full.join("x").exists(), "the mount hides the old file");
    }
    assert!(full.join("x").exists());
    // The cipher dir itself, or inside it.
    for inside in [v.cipher.clone(), v.cipher.join("sub")] {
        std::fs::create_dir_all(&inside).unwrap();
        let (c, err) = code!("mount", v.cipher, inside, "-o", "nonempty");
        assert_eq!(c, 5, "{err}");
        assert!(err.contains("inside"), "{err}");
    }
    std::fs::remove_dir(v.cipher.join("sub")).unwrap();
    // Usual fstab options are accepted; the fs type is fuse.kmsfs; a path
    // with a space cannot be mounted twice and unmount finds it.
    let spaced = t.join("with space\tand tab");
    std::fs::create_dir_all(&spaced).unwrap();
    let (c, err) = code!("mount", v.cipher, spaced, "-o", "relatime,async,noatime,nodev,nosuid,defaults,_netdev");
    assert_eq!(c, 0, "{err}");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.contains("with\\040space\\011and\\040tab")).expect("in mountinfo");
    assert!(line.contains(" - fuse.kmsfs "), "{line}");
    let (c, err) = code!("mount", v.cipher, spaced);
    assert_eq!(c, 5, "second mount at a spaced path: {err}");
    assert!(err.contains("already mounted"), "{err}");
    let (c, err) = code!("unmount", spaced);
    assert_eq!(c, 0, "{err}");
    assert!(!info_has(&spaced));
}

fn info_has(p: &std::path::Path) -> bool {
    let esc = p.to_str().unwrap().replace(' ', "\\040").replace('\t', "\\011");
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(&esc))
}

#[test]
fn dead_mount_is_named_and_unmount_clears_it() {
    require_mount!();
    let v = Volume::new();
    let mnt = v.tmp.path().join("dead");
    let mut m = Mounted::start(&v.cipher, &mnt, &[]);
    // kill -9 without clearing the mount: its daemon is gone.
    let mut child = m.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let e = std::fs::read_dir(&mnt).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));
    let (c, err) = code!("mount", v.cipher, mnt);
    assert_eq!(c, 5, "{err}");
    assert!(err.contains("dead mount") && err.contains("kmsfs unmount"), "{err}");
    let (c, err) = code!("unmount", mnt);
    assert_eq!(c, 0, "{err}");
    assert!(!info_has(&mnt));
    assert!(std::fs::metadata(&mnt).is_ok());
    let _m = Mounted::start(&v.cipher, &mnt, &[]);
}
