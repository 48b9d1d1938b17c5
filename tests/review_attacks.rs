#![allow(clippy::unwrap_used, clippy::expect_used)]
//! An independent attack review of issues 12 and 14: each test is one
//! weakness found by attacking the cipher dir, the config or the offline
//! commands as the issues' attackers would. Each failed before its fix.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::kms::*;
use common::*;

/// A writer of the cipher dir strips the config's MAC (so it looks like one
/// an older kmsfs wrote) and switches the volume to plaintext names. The
/// mount refuses and tells the user to run `kmsfs upgrade`; on a host that
/// already trusts this volume (it has a pin for it, so it has seen the
/// config authenticated), that upgrade must not sign the downgraded config.
#[test]
fn upgrade_refuses_a_stripped_mac_on_a_host_that_trusts_the_volume() {
    let v = Volume::new(); // init records the pin on this host
    let good = v.config();
    let mut c = good.clone();
    let o = c.as_object_mut().unwrap();
    o.remove("mac");
    o.remove("auth_key");
    o.remove("name_key");
    c["plaintext_names"] = true.into();
    v.set_config(&c);
    let (code, out) = run(&["upgrade", p(&v.cipher)]);
    let now = v.config();
    assert!(
        now.get("mac").is_none() && now["plaintext_names"] == true,
        "upgrade signed a downgraded config (exit {code}): {out}"
    );
    assert_eq!(code, 3, "{out}");
    // The real config still works.
    v.set_config(&good);
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert_eq!(code, 0, "{out}");
}

/// `key_file` in kmsfs.conf is not authenticated (it only says where to
/// look), so a writer of the cipher dir chooses the path a root command
/// opens. Only a regular file may ever be opened there: opening a FIFO
/// wakes its writer, and opening some devices acts (a watchdog arms, a
/// tape rewinds). Shown with a FIFO whose writer blocks until a reader
/// opens it.
#[test]
fn key_file_named_by_the_config_is_never_opened_unless_regular() {
    let v = Volume::new();
    let fifo = v.tmp.path().join("fifo.key");
    mkfifo(&fifo, 0o600);
    let mut cfg = v.config();
    cfg["key_file"] = p(&fifo).into();
    v.set_config(&cfg);
    let mnt = v.tmp.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    for args in [vec!["fsck", p(&v.cipher)], vec!["mount", p(&v.cipher), p(&mnt)]] {
        assert!(!opens_fifo(&fifo, &args), "{args:?} opened the FIFO that kmsfs.conf named as its key file");
    }
}

fn mkfifo(path: &Path, mode: libc::mode_t) {
    let c = std::ffi::CString::new(p(path)).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), mode) }, 0);
}

/// Whether running `args` (which must fail) opens the FIFO `fifo`: a writer
/// blocked on it wakes.
fn opens_fifo(fifo: &Path, args: &[&str]) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let f2 = fifo.to_path_buf();
    std::thread::spawn(move || {
        // Blocks until some process opens the FIFO for reading.
        let w = std::fs::OpenOptions::new().write(true).open(&f2);
        let _ = tx.send(w.is_ok());
    });
    std::thread::sleep(Duration::from_millis(100));
    let (code, out) = run(args);
    assert_ne!(code, 0, "{args:?}: {out}");
    let opened = rx.recv_timeout(Duration::from_millis(500)).is_ok();
    if !opened {
        // Release the writer thread.
        let _ = std::fs::OpenOptions::new().read(true).custom_flags_nonblock().open(fifo);
    }
    opened
}

/// docs/SECURITY.md: a symlink, FIFO, device or huge file planted as a
/// kmsfs bookkeeping file is "never followed, opened or read past 1 KiB".
/// The config and the lock at the root are bookkeeping files too: a FIFO
/// (or a device, whose open can act) planted under their names must not
/// be opened.
#[test]
fn config_and_lock_planted_as_fifos_are_never_opened() {
    let v = Volume::new();
    let conf = v.cipher.join("kmsfs.conf");
    let saved = std::fs::read(&conf).unwrap();
    std::fs::remove_file(&conf).unwrap();
    mkfifo(&conf, 0o644);
    assert!(!opens_fifo(&conf, &["fsck", p(&v.cipher)]), "fsck opened a FIFO planted as kmsfs.conf");
    std::fs::remove_file(&conf).unwrap();
    std::fs::write(&conf, &saved).unwrap();
    let lock = v.cipher.join(".kmsfs.lock");
    let _ = std::fs::remove_file(&lock);
    mkfifo(&lock, 0o644);
    let new_key = v.tmp.path().join("new.key");
    assert!(
        !opens_fifo(&lock, &["rewrap", p(&v.cipher), "--to-key-file", p(&new_key)]),
        "rewrap opened a FIFO planted as .kmsfs.lock"
    );
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

/// With plaintext names, `.kmsfs.*` names are reserved only at the root; in
/// any other directory they are the user's. `fsck --repair` must not take
/// a user's `.kmsfs.tmp.*` file or directory there for a crash leftover and
/// delete it, and fsck and rewrap must not skip it.
#[test]
fn plaintext_names_entries_that_look_like_temp_files_are_user_data() {
    require_mount!();
    let v = Volume::plain();
    {
        let m = v.mount("m", &[]);
        std::fs::create_dir(m.path("d")).unwrap();
        std::fs::write(m.path("d/.kmsfs.tmp.notes"), b"my notes").unwrap();
        std::fs::create_dir(m.path("d/.kmsfs.tmp.project")).unwrap();
        std::fs::write(m.path("d/.kmsfs.tmp.project/src"), b"my code").unwrap();
    }
    let (code, out) = run(&["fsck", p(&v.cipher)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 files"), "fsck skipped the user's files: {out}");
    let (code, out) = run(&["fsck", p(&v.cipher), "--repair"]);
    assert_eq!(code, 0, "{out}");
    assert!(v.cipher.join("d/.kmsfs.tmp.notes").exists(), "fsck --repair deleted a user's file: {out}");
    assert!(v.cipher.join("d/.kmsfs.tmp.project/src").exists(), "fsck --repair deleted a user's directory: {out}");
    // rewrap moves them too: after it, the old key is not needed.
    let new_key = v.tmp.path().join("new.key");
    let (code, out) = run(&["rewrap", p(&v.cipher), "--to-key-file", p(&new_key)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("2 re-wrapped"), "rewrap skipped the user's files: {out}");
    std::fs::remove_file(&v.key).unwrap();
    let m = v.mount("m2", &[]);
    assert_eq!(std::fs::read(m.path("d/.kmsfs.tmp.notes")).unwrap(), b"my notes");
    assert_eq!(std::fs::read(m.path("d/.kmsfs.tmp.project/src")).unwrap(), b"my code");
}

/// A local user who owns a backing directory (made through an
/// `allow_other` mount) can rename entries in it, including another
/// user's subdirectory whose files they may not delete. Renamed to
/// `.kmsfs.tmp.<hex>` it looks like an unfinished mkdir, and root's `fsck
/// --repair` must not then delete it with everything in it: an unfinished
/// mkdir holds its ID record and nothing else.
#[test]
fn fsck_repair_never_deletes_a_directory_with_entries_as_an_unfinished_mkdir() {
    require_mount!();
    let v = Volume::new();
    for d in [v.tmp.path(), v.cipher.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    {
        let m = v.mount("m", &["allow_other", "default_permissions"]);
        std::fs::create_dir(m.path("n")).unwrap();
        std::os::unix::fs::chown(m.path("n"), Some(NOBODY), Some(NOBODY)).unwrap();
        // root's directory inside nobody's: nobody may not delete its files.
        std::fs::create_dir(m.path("n/victim")).unwrap();
        std::fs::write(m.path("n/victim/secret"), b"root's data").unwrap();
        let (ok, out) = nobody(&m.mnt, "rm -f n/victim/secret");
        assert!(!ok || m.path("n/victim/secret").exists(), "nobody deleted root's file: {out}");
    }
    let victim = v.backing("n/victim");
    let secret = v.backing("n/victim/secret");
    let n = victim.parent().unwrap().to_path_buf();
    let planted = n.join(format!(".kmsfs.tmp.{}", "ab".repeat(16)));
    let (ok, out) = nobody(&n, &format!("mv {} {}", victim.display(), planted.display()));
    assert!(ok, "nobody could not rename in their own backing directory: {out}");
    let (_, out) = run(&["fsck", p(&v.cipher), "--repair"]);
    let kept = planted.join(secret.file_name().unwrap());
    assert!(kept.exists(), "fsck --repair deleted root's directory and its files: {out}");
}

/// docs/SECURITY.md: "An interrupted rewrap leaves every file readable".
/// For aws-kms the new key is trusted before the first file moves; a local
/// rewrap has no such step, so one file that fails (damaged, or damaged on
/// purpose by a writer of the cipher dir) leaves the files that already
/// moved unreadable under the volume's key until a rerun finishes.
#[test]
#[ignore = "not fixed: a local volume can trust only its own key file (review finding)"]
fn an_interrupted_local_rewrap_stays_readable() {
    require_mount!();
    let v = Volume::plain();
    {
        let m = v.mount("m", &[]);
        for i in 0..4 {
            std::fs::write(m.path(&format!("f{i}")), random_bytes(3000, i)).unwrap();
        }
    }
    let f2 = v.cipher.join("f2");
    let saved = std::fs::read(&f2).unwrap();
    let mut bad = saved.clone();
    bad[68..256].copy_from_slice(&std::fs::read(v.cipher.join("f0")).unwrap()[68..256]);
    std::fs::write(&f2, &bad).unwrap();
    let new_key = v.tmp.path().join("new.key");
    let (code, out) = run(&["rewrap", p(&v.cipher), "--to-key-file", p(&new_key)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("3 re-wrapped") && out.contains("1 failed"), "{out}");
    std::fs::write(&f2, &saved).unwrap();
    let m = v.mount("m2", &[]);
    for i in 0..4 {
        let r = std::fs::read(m.path(&format!("f{i}")));
        assert!(r.as_ref().is_ok_and(|b| *b == random_bytes(3000, i)), "f{i}: {:?}", r.err());
    }
}

/// An attacker who holds another KMS key strips the config's MAC, names
/// their key in it and lists the victim's key as an earlier one, so old
/// files still read. On a host that never saw the volume (a new or rebuilt
/// host, where `kmsfs upgrade` is what the refusal suggests), upgrade must
/// not take the key from the cipher dir, and must not sign earlier keys
/// that no legacy config can have.
#[test]
fn upgrade_never_trusts_the_kms_key_a_legacy_config_names() {
    require_kms!();
    require_mount!();
    let victim = create_key("up-victim");
    let evil = create_key("up-attacker");
    let (tmp, cipher) = kms_volume(&victim.id);
    {
        let m = Mounted::start(&cipher, &tmp.path().join("m"), &[]);
        std::fs::write(m.path("f"), b"victim data").unwrap();
    }
    let mut c = config_of(&cipher);
    let o = c.as_object_mut().unwrap();
    o.remove("mac");
    o.remove("auth_key");
    c["key_id"] = evil.arn.clone().into();
    c["previous_keys"] = serde_json::json!([victim.arn]);
    set_config_of(&cipher, &c);
    let fresh = tempfile::tempdir().unwrap();
    let upgrade = |extra: &[&str]| {
        run_env(&[&["upgrade", p(&cipher)], extra].concat(), &[("KMSFS_TRUST_DIR", fresh.path().as_os_str())])
    };
    let (code, out) = upgrade(&[]);
    let now = config_of(&cipher);
    assert!(now.get("mac").is_none(), "upgrade trusted the attacker's key from the cipher dir (exit {code}): {out}");
    assert_ne!(code, 0, "{out}");
    // Naming the real key does not carry the planted earlier key along.
    let (code, out) = upgrade(&["--kms-key", &victim.arn]);
    let now = config_of(&cipher);
    assert!(
        now.get("mac").is_none() || !now.to_string().contains(&evil.arn),
        "upgrade signed the attacker's key as a trusted earlier key (exit {code}): {out}"
    );
    // A real legacy config, upgraded with its key named, mounts and reads.
    let mut c = now;
    c.as_object_mut().unwrap().remove("previous_keys");
    c["key_id"] = victim.arn.clone().into();
    set_config_of(&cipher, &c);
    let (code, out) = upgrade(&["--kms-key", &victim.arn]);
    assert_eq!(code, 0, "{out}");
    let m = Mounted::start(&cipher, &tmp.path().join("m2"), &[]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"victim data");
}

/// On SIGTERM the daemon writes back every open file by opening its path
/// through the mount. A writer of the cipher dir (or the local user who
/// owns that backing directory) swaps a directory on that path for a
/// symlink (with plaintext names its target is stored in clear): the
/// daemon, root, must not follow it out of the mount and open whatever is
/// there (here a FIFO, whose blocked writer wakes; a device's open can act).
#[test]
fn stop_write_back_never_follows_a_link_out_of_the_mount() {
    require_mount!();
    let v = Volume::plain();
    let outside = v.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let fifo = outside.join("ff");
    let c = std::ffi::CString::new(p(&fifo)).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let mut m = v.mount("m", &[]);
    std::fs::create_dir(m.path("b")).unwrap();
    let held = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(m.path("b/ff")).unwrap();
    std::fs::rename(v.cipher.join("b"), v.cipher.join("b2")).unwrap();
    std::os::unix::fs::symlink(&outside, v.cipher.join("b")).unwrap();
    // Past the kernel's entry cache (1 s), so the path is looked up again.
    std::thread::sleep(Duration::from_millis(1500));
    let (tx, rx) = std::sync::mpsc::channel();
    let f2 = fifo.clone();
    std::thread::spawn(move || {
        let w = std::fs::OpenOptions::new().write(true).open(&f2);
        let _ = tx.send(w.is_ok());
    });
    std::thread::sleep(Duration::from_millis(100));
    let pid = m.child.as_ref().unwrap().id() as i32;
    // SAFETY: plain kill of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let opened = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    if !opened {
        let _ = std::fs::OpenOptions::new().read(true).custom_flags_nonblock().open(&fifo);
    }
    drop(held);
    m.unmount();
    assert!(!opened, "the stopping daemon followed a planted link out of the mount and opened a FIFO");
}
