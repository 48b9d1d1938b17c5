#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The cipher dir is untrusted: its config is authenticated, key files are
//! checked, and rewrap and mounts exclude each other. Each test attacks one
//! point with the real binary (and a real mount where a mount is involved).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn config(v: &Volume) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(v.cipher.join("kmsfs.conf")).unwrap()).unwrap()
}

fn set_config(v: &Volume, c: &serde_json::Value) {
    std::fs::write(v.cipher.join("kmsfs.conf"), serde_json::to_vec_pretty(c).unwrap()).unwrap();
}

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
    if !fuse_available("every_security_field_of_the_config_is_authenticated") {
        return;
    }
    let v = Volume::new();
    let good = config(&v);
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
        set_config(&v, &c);
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
    set_config(&v, &c);
    let (code, out) = try_mount(&v, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("stripped"), "{out}");
    set_config(&v, &good);
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert_eq!(code, 0, "restored config: {out}");
}

/// A foreground mount with its own environment (another host's trust store).
fn mount_env(v: &Volume, name: &str, env: &[(&str, &Path)]) -> std::process::Child {
    let mnt = v.tmp.path().join(name);
    std::fs::create_dir_all(&mnt).unwrap();
    let child = Command::new(BIN)
        .args(["mount", p(&v.cipher), p(&mnt), "-f", "--log-file", p(&mnt.with_extension("log"))])
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !mounted(&mnt) {
        assert!(t.elapsed().as_secs() < 20, "mount did not come up");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

fn unmount_env(v: &Volume, name: &str, mut child: std::process::Child) {
    let _ = Command::new("fusermount3").arg("-u").arg(v.tmp.path().join(name)).status();
    let _ = child.wait();
}

#[test]
fn legacy_config_mounts_read_only_until_upgraded() {
    if !fuse_available("legacy_config_mounts_read_only_until_upgraded") {
        return;
    }
    let v = Volume::new();
    {
        let m = v.mount("m", &[]);
        std::fs::write(m.path("kept"), b"old data").unwrap();
    }
    // What an older kmsfs wrote: no auth_key, no mac.
    let mut c = config(&v);
    c.as_object_mut().unwrap().remove("mac");
    c.as_object_mut().unwrap().remove("auth_key");
    set_config(&v, &c);
    // This host knows the volume as authenticated: a missing MAC was stripped.
    let (code, out) = try_mount(&v, &[]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("stripped"), "{out}");
    // A host that never saw it takes it for an older volume: it mounts, but
    // read-only, so nothing is ever written under an unvouched config.
    let other_host = tempfile::tempdir().unwrap();
    let env = [("KMSFS_TRUST_DIR", other_host.path())];
    let child = mount_env(&v, "ro", &env);
    let mnt = v.tmp.path().join("ro");
    assert_eq!(std::fs::read(mnt.join("kept")).unwrap(), b"old data");
    let e = std::fs::write(mnt.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    unmount_env(&v, "ro", child);
    let (code, out) = run(&["rewrap", p(&v.cipher), "--to-key-file", p(&v.tmp.path().join("k2"))]);
    assert_eq!(code, 3, "rewrap of a legacy config: {out}");
    // One upgrade there authenticates it; then it mounts read-write.
    let out = Command::new(BIN).args(["upgrade", p(&v.cipher)]).envs(env).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("now authenticated"), "{text}");
    let child = mount_env(&v, "rw", &env);
    let mnt = v.tmp.path().join("rw");
    std::fs::write(mnt.join("new"), b"x").unwrap();
    assert_eq!(std::fs::read(mnt.join("kept")).unwrap(), b"old data");
    unmount_env(&v, "rw", child);
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
    let good = config(&v);
    let mut c = good.clone();
    c["key_file"] = p(&inside).into();
    set_config(&v, &c);
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("inside the cipher dir"), "{out}");
    set_config(&v, &good);
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
    if !fuse_available("rewrap_and_a_live_mount_exclude_each_other") {
        return;
    }
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
    let mut c = config(&theirs);
    c["volume_id"] = config(&v)["volume_id"].clone();
    set_config(&v, &c);
    // Their key file path is in their config; even with it, the MAC binds
    // their volume ID, so the swap fails one way or the other.
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert!(matches!(code, 3 | 4), "{out}");
}

/// Runs kmsfs with `stdin` piped in: (exit code, output).
fn run_stdin(args: &[&str], stdin: &[u8]) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

#[test]
fn key_on_standard_input() {
    if !fuse_available("key_on_standard_input") {
        return;
    }
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
