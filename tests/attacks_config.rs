#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The cipher dir is untrusted: its config is authenticated, key files are
//! checked, and rewrap and mounts exclude each other. Each test attacks one
//! point with the real binary (and a real mount where a mount is involved).

mod common;

use std::process::Command;

use common::*;

/// `kmsfs mount` in the background mode a user runs: (exit code, output).
fn try_mount(v: &Volume, extra: &[&str]) -> (i32, String) {
    let mnt = v.tmp.path().join("try");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut args = vec!["mount", p(&v.cipher), p(&mnt)];
    args.extend_from_slice(extra);
    let r = run(&args);
    if mounted(&mnt) {
        let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    }
    r
}

#[test]
fn every_security_field_of_the_config_is_authenticated() {
    require_mount!();
    let v = Volume::new();
    let good = v.config();
    assert!(good["mac"].is_string() && good["auth_key"].is_object(), "{good}");
    // The untouched config mounts.
    let (code, out) = try_mount(&v, &[]);
    assert_eq!(code, 0, "{out}");
    // (JSON pointer, forged value): each a field that decides security.
    let edits = [
        ("/plaintext_names", serde_json::json!(true)),
        ("/block_size", serde_json::json!(65536)),
        ("/header_size", serde_json::json!(512)),
        ("/volume_id", serde_json::json!("00112233445566778899aabbccddeeff")),
        ("/name_key/blob", serde_json::json!("AAAA")),
        ("/previous_keys", serde_json::json!(["arn:aws:kms:x"])),
        ("/mac", serde_json::json!("00".repeat(32))),
        ("/key_id", serde_json::json!("local:0000000000000000")),
    ];
    for (what, value) in edits {
        let mut c = good.clone();
        match c.pointer_mut(what) {
            Some(slot) => *slot = value,
            None => c[&what[1..]] = value,
        }
        v.set_config(&c);
        let (code, out) = try_mount(&v, &[]);
        assert_ne!(code, 0, "{what}: a tampered config mounted: {out}");
        assert!(matches!(code, 3 | 4), "{what}: exit {code}: {out}");
        let (code, out) = run(&["fsck", p(&v.cipher)]);
        assert!(matches!(code, 3 | 4), "{what}: fsck exit {code}: {out}");
        let (code, _) = run(&["path", p(&v.cipher), "x"]);
        assert!(matches!(code, 3 | 4), "{what}: path exit {code}");
    }
    // Stripping the MAC to pass the change off as an older config: refused
    // on a host that knows the volume.
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("mac");
    c.as_object_mut().unwrap().remove("auth_key");
    c["plaintext_names"] = true.into();
    v.set_config(&c);
    let (code, out) = try_mount(&v, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("stripped"), "{out}");
    v.set_config(&good);
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert_eq!(code, 0, "restored config: {out}");
}

#[test]
fn legacy_config_mounts_read_only_until_upgraded() {
    require_mount!();
    let v = Volume::new();
    {
        let m = v.mount("m", &[]);
        std::fs::write(m.path("kept"), b"old data").unwrap();
    }
    // What an older kmsfs wrote: no auth_key, no mac.
    let mut c = v.config();
    c.as_object_mut().unwrap().remove("mac");
    c.as_object_mut().unwrap().remove("auth_key");
    v.set_config(&c);
    // This host knows the volume as authenticated: a missing MAC was stripped.
    let (code, out) = try_mount(&v, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("stripped"), "{out}");
    // A host that never saw it takes it for an older volume: it mounts, but
    // read-only, so nothing is ever written under an unvouched config.
    let other_host = tempfile::tempdir().unwrap();
    let env = [("KMSFS_TRUST_DIR", other_host.path().as_os_str())];
    let ro = Mounted::start_with(&v.cipher, &v.tmp.path().join("ro"), &[], &env);
    assert_eq!(std::fs::read(ro.path("kept")).unwrap(), b"old data");
    let e = std::fs::write(ro.path("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    drop(ro);
    let (code, out) = run(&["rewrap", p(&v.cipher), "--to-key-file", p(&v.tmp.path().join("k2"))]);
    assert_eq!(code, 3, "rewrap of a legacy config: {out}");
    // One upgrade there authenticates it; then it mounts read-write.
    let (code, text) = run_env(&["upgrade", p(&v.cipher)], &env);
    assert!(code == 0 && text.contains("now authenticated"), "{text}");
    let rw = Mounted::start_with(&v.cipher, &v.tmp.path().join("rw"), &[], &env);
    std::fs::write(rw.path("new"), b"x").unwrap();
    assert_eq!(std::fs::read(rw.path("kept")).unwrap(), b"old data");
}

#[test]
fn key_files_inside_the_cipher_dir_or_behind_links_are_refused() {
    let v = Volume::new();
    let inside = v.cipher.join("stolen.key");
    std::fs::copy(&v.key, &inside).unwrap();
    let out_file = v.tmp.path().join("out");
    for args in [
        vec!["fsck", p(&v.cipher), "--key-file", p(&inside)],
        vec!["path", p(&v.cipher), "x", "--key-file", p(&inside)],
        vec!["rewrap", p(&v.cipher), "--to-key-file", p(&inside)],
        vec!["rewrap", p(&v.cipher), "--to-key-file", p(&v.tmp.path().join("new.key")), "--key-file", p(&inside)],
        vec!["decrypt", "--volume", p(&v.cipher), "--key-file", p(&inside), p(&inside), p(&out_file)],
        vec!["mount", p(&v.cipher), p(&v.tmp.path().join("mnt")), "--key-file", p(&inside)],
    ] {
        let (code, out) = run(&args);
        assert_eq!(code, 2, "{args:?}: {out}");
        assert!(out.contains("outside the cipher dir"), "{args:?}: {out}");
    }
    let opt = format!("key_file={}", p(&inside));
    let (code, out) = run(&["mount", p(&v.cipher), p(&v.tmp.path().join("mnt")), "-o", &opt]);
    assert_eq!(code, 2, "-o key_file=: {out}");
    // A key path recorded in the config that points inside is refused too.
    let good = v.config();
    let mut c = good.clone();
    c["key_file"] = p(&inside).into();
    v.set_config(&c);
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("inside the cipher dir"), "{out}");
    v.set_config(&good);
    // A symlink to the real key file is never followed.
    let link = v.tmp.path().join("link.key");
    std::os::unix::fs::symlink(&v.key, &link).unwrap();
    let (code, out) = run(&["fsck", p(&v.cipher), "--key-file", p(&link)]);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("symbolic link"), "{out}");
    std::fs::remove_file(&inside).unwrap();
    let (code, out) = run(&["fsck", p(&v.cipher), "--key-file", p(&v.key)]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn rewrap_and_a_live_mount_exclude_each_other() {
    require_mount!();
    let v = Volume::new();
    let new_key = v.tmp.path().join("new.key");
    {
        // A custom fsname hides the cipher dir from /proc/mounts: the lock
        // does not depend on it.
        let m = v.mount("m", &["fsname=elsewhere"]);
        std::fs::write(m.path("f"), b"data").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&m.log).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the log file is private: {mode:o}");
        let (code, out) = run(&["rewrap", p(&v.cipher), "--to-key-file", p(&new_key)]);
        assert_eq!(code, 5, "{out}");
        assert!(out.contains("mounted"), "{out}");
        assert!(!new_key.exists(), "a refused rewrap created nothing");
        // A second mount of the same volume is still allowed (shared lock).
        let _m2 = v.mount("m2", &[]);
        assert_eq!(std::fs::read(_m2.path("f")).unwrap(), b"data");
    }
    let (code, out) = run(&["rewrap", p(&v.cipher), "--to-key-file", p(&new_key)]);
    assert_eq!(code, 0, "{out}");
    let m = Mounted::start(&v.cipher, &v.tmp.path().join("m3"), &[&format!("key_file={}", p(&new_key))]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    // A planted symlink as the lock file is never followed.
    drop(m);
    std::fs::remove_file(v.cipher.join(".kmsfs.lock")).unwrap();
    let target = v.tmp.path().join("root-owned-target");
    std::os::unix::fs::symlink(&target, v.cipher.join(".kmsfs.lock")).unwrap();
    let (code, out) = run(&["rewrap", p(&v.cipher), "--to-key-file", p(&v.key), "--key-file", p(&new_key)]);
    assert_ne!(code, 0, "{out}");
    assert!(!target.exists(), "followed the planted link");
}

#[test]
fn another_volumes_config_under_another_key_is_refused() {
    // The attacker cannot forge a MAC, but can copy a whole config made
    // under a key they hold: its key differs from this host's pin.
    let v = Volume::new();
    let theirs = Volume::new();
    let mut c = theirs.config();
    c["volume_id"] = v.config()["volume_id"].clone();
    v.set_config(&c);
    // Their key file path is in their config; even with it, the MAC binds
    // their volume ID, so the swap fails one way or the other.
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert!(matches!(code, 3 | 4), "{out}");
}

#[test]
fn key_on_standard_input() {
    require_mount!();
    let v = Volume::new();
    let key = std::fs::read(&v.key).unwrap();
    // The recorded key file is gone: only standard input has the key.
    let moved = v.tmp.path().join("elsewhere.key");
    std::fs::rename(&v.key, &moved).unwrap();
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert_eq!(code, 4, "{out}");
    let (code, out) = run_stdin(&["fsck", p(&v.cipher), "--key-file", "-"], &key);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run_stdin(&["fsck", p(&v.cipher), "--key-file", "-"], b"not a key\n");
    assert_eq!(code, 4, "{out}");
    // A background mount hands the key to its daemon through a pipe.
    let mnt = v.tmp.path().join("m");
    std::fs::create_dir_all(&mnt).unwrap();
    let (code, out) = run_stdin(&["mount", p(&v.cipher), p(&mnt), "--key-file", "-"], &key);
    assert_eq!(code, 0, "{out}");
    std::fs::write(mnt.join("f"), b"through stdin").unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"through stdin");
    let (code, out) = run(&["unmount", p(&mnt)]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = run_stdin(&["decrypt", "--volume", p(&v.cipher), "--key-file", "-", "-", "-"], &key);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("both the key and the data"), "{out}");
}
