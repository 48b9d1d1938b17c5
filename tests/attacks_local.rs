#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Attacks on a mounted volume from the cipher dir: by a local user of an
//! `allow_other` mount who owns backing directories (created through the
//! mount, they are chowned to that user), and by anyone who can edit the
//! cipher dir. Each test mounts a real volume as root and attacks it.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn must(r: (bool, String), what: &str) -> String {
    assert!(r.0, "{what}: {}", r.1);
    r.1
}

/// A volume laid out as a default install leaves it (cipher dir 0755, so
/// backing directories are reachable by their owners), a root-only
/// directory standing for /etc, and a world-writable `pub` in the mount.
struct Shared {
    v: Volume,
    root_only: PathBuf,
}

impl Shared {
    fn new() -> Self {
        let v = Volume::new();
        for p in [v.tmp.path(), v.cipher.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let root_only = v.tmp.path().join("root-only");
        std::fs::create_dir(&root_only).unwrap();
        std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o700)).unwrap();
        Self { v, root_only }
    }

    fn mount(&self, name: &str) -> Mounted {
        let m = self.v.mount(name, &["allow_other", "default_permissions"]);
        if !m.path("pub").exists() {
            std::fs::create_dir(m.path("pub")).unwrap();
            std::fs::set_permissions(m.path("pub"), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        m
    }

    /// Nothing was created in the root-only directory.
    fn assert_untouched(&self) {
        let left: Vec<_> = std::fs::read_dir(&self.root_only).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "root wrote into a root-only directory: {left:?}");
    }
}

/// The directory-ID repair used to open `.kmsfs.dirid` with O_CREAT|O_TRUNC,
/// following links: a user owning a backing directory could plant a
/// symlink there and have root write to any path. Now the repair writes a
/// new file and renames it over whatever is planted.
#[test]
fn planted_dirid_symlink_is_replaced_not_followed() {
    require_mount!();
    let s = Shared::new();
    let m = s.mount("m");
    must(nobody(&m.mnt, "mkdir pub/d && echo hello > pub/d/f"), "nobody mkdir");
    drop(m);
    let bd = s.v.backing("pub/d");
    assert_eq!(std::fs::metadata(&bd).unwrap().uid(), NOBODY, "backing dirs belong to their users");
    let target = s.root_only.join("ld.so.preload");
    must(nobody(&bd, &format!("rm -f .kmsfs.dirid && ln -s {} .kmsfs.dirid", target.display())), "plant the link");
    let m = s.mount("m2");
    let out = must(nobody(&m.mnt, "ls pub/d && cat pub/d/f"), "list after planting");
    assert!(out.contains("hello"), "{out}");
    s.assert_untouched();
    let id = bd.join(".kmsfs.dirid");
    let md = std::fs::symlink_metadata(&id).unwrap();
    assert!(md.is_file() && md.uid() == 0, "the planted link was replaced by a root-owned file");
    assert_eq!(md.len(), 33, "an authenticated record: version, ID, tag");
    assert!(m.log().contains("file copy restored"), "{}", m.log());
}

/// Long-name side files used to be rewritten in place (O_TRUNC, following
/// links) when a rename replaced an entry or a name was created again.
#[test]
fn planted_side_file_links_are_replaced_not_followed() {
    require_mount!();
    let s = Shared::new();
    let m = s.mount("m");
    let (a, b) = ("a".repeat(200), "b".repeat(200));
    must(nobody(&m.mnt, &format!("mkdir pub/d && echo A > pub/d/{a} && echo B > pub/d/{b}")), "setup");
    let side_b = {
        let mut p = s.v.backing(&format!("pub/d/{b}")).into_os_string();
        p.push(".name");
        PathBuf::from(p)
    };
    let bd = side_b.parent().unwrap().to_path_buf();
    assert!(side_b.is_file(), "{}", side_b.display());
    // Rename over an entry whose side file is now a link to a root-only path.
    let plant = |victim: &str| {
        must(
            nobody(&bd, &format!("rm -f {0} && ln -s {1} {0}", side_b.display(), s.root_only.join(victim).display())),
            "plant",
        );
    };
    plant("by-rename");
    must(nobody(&m.mnt, &format!("mv pub/d/{a} pub/d/{b}")), "rename over");
    s.assert_untouched();
    assert!(std::fs::symlink_metadata(&side_b).unwrap().is_file());
    assert_eq!(must(nobody(&m.mnt, &format!("cat pub/d/{b}")), "read"), "A\n");
    // Create the name again after deleting it, with the link planted meanwhile.
    must(nobody(&m.mnt, &format!("rm pub/d/{b}")), "rm");
    plant("by-create");
    must(nobody(&m.mnt, &format!("echo C > pub/d/{b}")), "create");
    s.assert_untouched();
    assert!(std::fs::symlink_metadata(&side_b).unwrap().is_file());
    drop(m);
    // And the entry survives a remount: its side file is whole.
    let m = s.mount("m2");
    assert_eq!(must(nobody(&m.mnt, &format!("cat pub/d/{b}")), "read after remount"), "C\n");
}

/// Side files and ID files planted as a FIFO, a link to /dev/zero or a huge
/// file: the daemon refuses them at once (never opens a FIFO, never reads
/// past a small cap), instead of hanging or filling its memory.
#[test]
fn fifo_dev_zero_and_huge_bookkeeping_files_fail_fast() {
    require_mount!();
    let s = Shared::new();
    let m = s.mount("m");
    must(nobody(&m.mnt, "mkdir pub/d pub/e && echo ok > pub/d/f"), "setup");
    drop(m);
    let (bd, be) = (s.v.backing("pub/d"), s.v.backing("pub/e"));
    must(
        nobody(
            &bd,
            "touch L.fifo L.zero L.huge && mkfifo L.fifo.name && ln -s /dev/zero L.zero.name \
             && truncate -s 1G L.huge.name",
        ),
        "plant side files",
    );
    // Both copies of e's ID unusable: the xattr gone, the file a FIFO.
    must(nobody(&be, "setfattr -x user.kmsfs.dirid . && rm .kmsfs.dirid && mkfifo .kmsfs.dirid"), "plant ID FIFO");
    let m = s.mount("m2");
    let t = Instant::now();
    let out = must(nobody(&m.mnt, "ls pub/d"), "list d");
    assert_eq!(out.trim(), "f", "the planted entries are hidden");
    let (ok, out) = nobody(&m.mnt, "ls pub/e");
    assert!(!ok && out.contains("Input/output error"), "{out}");
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    let log = m.log();
    assert_eq!(log.matches("side file unreadable").count(), 3, "{log}");
    assert!(log.contains("directory ID") && log.contains("/pub/e"), "{log}");
}

/// A create(2) that finds its name taken never hands over the existing
/// file. Through FUSE this needs a race (the name appearing between the
/// kernel's lookup and its create, e.g. from a second mount), so the call is
/// made on the filesystem directly, with the caller nobody.
#[test]
fn create_never_hands_over_an_existing_file() {
    use kmsfs::fs::{Caller, EncFs, FsOptions};
    let tmp = tempfile::tempdir().unwrap();
    let cipher = tmp.path().join("cipher");
    std::fs::create_dir(&cipher).unwrap();
    let provider: std::sync::Arc<dyn kmsfs::keys::KeyProvider> =
        std::sync::Arc::new(kmsfs::keys::local::LocalProvider::create_key_file(&tmp.path().join("k")).unwrap());
    let stats = std::sync::Arc::new(kmsfs::keys::stats::KeyStats::default());
    let age = Duration::from_secs(60);
    let cache = std::sync::Arc::new(kmsfs::keys::cache::KeyCache::new(provider.clone(), 16, age, stats.clone()));
    let pool = kmsfs::keys::pool::KeyPool::start(provider, [7; 16], 0, 0, age, stats);
    let names = std::sync::Arc::new(kmsfs::names::Names::new(&[9; 32]));
    let layout = kmsfs::format::layout::Layout::new(256, 12).unwrap();
    let fs = EncFs::new(&cipher, layout, [7; 16], cache, pool, names, FsOptions { read_only: false }).unwrap();
    let root = Caller { uid: 0, gid: 0 };
    let other = Caller { uid: NOBODY, gid: NOBODY };
    let name = std::ffi::OsStr::new("secret");
    let (a, fh) = fs.create(1, name, 0o600, libc::O_RDWR | libc::O_CREAT, root).unwrap();
    fs.release(fh).unwrap();
    let e = fs.create(1, name, 0o666, libc::O_WRONLY | libc::O_CREAT, other).unwrap_err();
    assert_eq!(e.errno(), libc::EACCES);
    let e = fs.create(1, name, 0o666, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, other).unwrap_err();
    assert_eq!(e.errno(), libc::EEXIST);
    let after = fs.getattr(a.ino).unwrap();
    assert_eq!((after.uid, after.perm), (0, 0o600), "still root's, still 0600");
    // The owner itself gets an ordinary open.
    let (_, fh) = fs.create(1, name, 0o600, libc::O_WRONLY | libc::O_CREAT, root).unwrap();
    fs.release(fh).unwrap();
    fs.shutdown();
}

/// The config used to be written through a fixed temporary name
/// (`.kmsfs.conf.tmp`), followed if it was a link.
#[test]
fn config_store_never_writes_through_a_planted_link() {
    let v = Volume::new();
    let victim = v.tmp.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, v.cipher.join(".kmsfs.conf.tmp")).unwrap();
    let cfg = kmsfs::volume::VolumeConfig::load(&v.cipher).unwrap();
    cfg.store(&v.cipher).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert!(std::fs::symlink_metadata(v.cipher.join("kmsfs.conf")).unwrap().is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&v.cipher)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kmsfs.tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An xattr of a backing file, raw (root, no mount involved).
fn raw_getxattr(p: &Path, name: &str) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let (cp, cn) = (std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap(), std::ffi::CString::new(name).unwrap());
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid strings and buffer.
    let n = unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "getxattr {name} {}: {}", p.display(), std::io::Error::last_os_error());
    buf.truncate(n as usize);
    buf
}

fn raw_setxattr(p: &Path, name: &str, value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let (cp, cn) = (std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap(), std::ffi::CString::new(name).unwrap());
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::lsetxattr(cp.as_ptr(), cn.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {name} {}: {}", p.display(), std::io::Error::last_os_error());
}

/// A user xattr value copied from one file to another (in the cipher dir)
/// does not open there: values are bound to their inode's owner ID.
#[test]
fn xattr_value_copied_to_another_file_gives_eio() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::write(m.path("f1"), b"one").unwrap();
    std::fs::write(m.path("f2"), b"two").unwrap();
    for (f, val) in [("f1", "approved"), ("f2", "rejected")] {
        must(sh(&format!("setfattr -n user.review -v {val} {}", m.path(f).display())), "setfattr");
    }
    drop(m);
    let (b1, b2) = (v.backing("f1"), v.backing("f2"));
    raw_setxattr(&b2, "user.review", &raw_getxattr(&b1, "user.review"));
    let m = v.mount("m2", &[]);
    let ok =
        must(sh(&format!("getfattr --absolute-names --only-values -n user.review {}", m.path("f1").display())), "f1");
    assert_eq!(ok, "approved");
    let (ok, out) = sh(&format!("getfattr --absolute-names --only-values -n user.review {}", m.path("f2").display()));
    assert!(!ok && out.contains("Input/output error"), "{out}");
    let log = m.log();
    let line = log.lines().find(|l| l.contains("xattr value does not decrypt")).unwrap_or_default();
    assert!(line.contains("/f2") && line.contains("user.review"), "{log}");
    // A rename or hard link keeps the values readable: the owner ID is the inode's.
    std::fs::rename(m.path("f1"), m.path("f1-renamed")).unwrap();
    std::fs::hard_link(m.path("f1-renamed"), m.path("f1-link")).unwrap();
    for f in ["f1-renamed", "f1-link"] {
        let out =
            must(sh(&format!("getfattr --absolute-names --only-values -n user.review {}", m.path(f).display())), f);
        assert_eq!(out, "approved");
    }
}

/// Moving an entry to another directory by giving that directory the
/// first one's ID (both copies of its record) gives EIO: a record is
/// authenticated together with its parent's ID. Writing the ID as an
/// unauthenticated legacy record instead unlocks nothing either: names in
/// directories with authenticated records use other associated data.
#[test]
fn directory_id_copied_to_move_entries_gives_eio() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::create_dir_all(m.path("a/E")).unwrap();
    std::fs::create_dir_all(m.path("b/D")).unwrap();
    std::fs::write(m.path("a/E/x"), b"moved").unwrap();
    std::fs::write(m.path("b/D/y"), b"stays").unwrap();
    drop(m);
    let (e, d, x) = (v.backing("a/E"), v.backing("b/D"), v.backing("a/E/x"));
    let copy_record = |bytes: &[u8]| {
        std::fs::remove_file(d.join(".kmsfs.dirid")).unwrap();
        std::fs::write(d.join(".kmsfs.dirid"), bytes).unwrap();
        raw_setxattr(&d, "user.kmsfs.dirid", bytes);
    };
    let record = std::fs::read(e.join(".kmsfs.dirid")).unwrap();
    assert_eq!(record.len(), 33);
    copy_record(&record);
    std::fs::rename(&x, d.join(x.file_name().unwrap())).unwrap();
    let m = v.mount("m2", &[]);
    let err = std::fs::read_dir(m.path("b/D")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(std::fs::read(m.path("b/D/x")).unwrap_err().raw_os_error(), Some(libc::EIO));
    let log = m.log();
    assert!(log.lines().any(|l| l.contains("/b/D") && l.contains("does not authenticate under its parent")), "{log}");
    drop(m);
    // The same ID as a legacy record.
    copy_record(&record[1..17]);
    let m = v.mount("m3", &[]);
    let listed: Vec<_> = std::fs::read_dir(m.path("b/D")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(std::fs::read(m.path("b/D/x")).is_err());
    assert!(m.log().contains("entry name does not decrypt; hidden"), "{}", m.log());
    // a/E itself still reads (it lost its entry, not its ID).
    assert_eq!(std::fs::read_dir(m.path("a/E")).unwrap().count(), 0);
}

/// A directory moved to another parent through the mount (rename, or
/// RENAME_EXCHANGE) is re-bound: it
/// reads after a remount, fsck is clean, and its record is valid under the
/// new parent only.
#[test]
fn directory_moved_to_another_parent_is_rebound() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::create_dir_all(m.path("a/sub/deeper")).unwrap();
    std::fs::create_dir_all(m.path("b")).unwrap();
    std::fs::write(m.path("a/sub/deeper/f"), b"data").unwrap();
    let before = std::fs::metadata(v.backing("a/sub")).unwrap();
    std::fs::rename(m.path("a/sub"), m.path("b/sub")).unwrap();
    assert_eq!(std::fs::read(m.path("b/sub/deeper/f")).unwrap(), b"data");
    drop(m);
    // Same directory, same mtime: re-binding its record is not a change to it.
    let after = std::fs::metadata(v.backing("b/sub")).unwrap();
    assert_eq!((before.ino(), before.mtime(), before.mtime_nsec()), (after.ino(), after.mtime(), after.mtime_nsec()));
    let record = std::fs::read(v.backing("b/sub").join(".kmsfs.dirid")).unwrap();
    assert_eq!(record.len(), 33, "one tag: the new parent's");
    let m = v.mount("m2", &[]);
    assert_eq!(std::fs::read(m.path("b/sub/deeper/f")).unwrap(), b"data");
    // And back, within one parent and across.
    std::fs::rename(m.path("b/sub"), m.path("b/sub2")).unwrap();
    std::fs::rename(m.path("b/sub2"), m.path("sub3")).unwrap();
    assert_eq!(std::fs::read(m.path("sub3/deeper/f")).unwrap(), b"data");
    // RENAME_EXCHANGE of two directories in different parents re-binds both.
    std::fs::create_dir_all(m.path("a/x")).unwrap();
    std::fs::write(m.path("a/x/in-x"), b"x").unwrap();
    let (from, to) = (m.path("a/x"), m.path("sub3/deeper"));
    let (cf, ct) = (
        std::ffi::CString::new(from.to_str().unwrap()).unwrap(),
        std::ffi::CString::new(to.to_str().unwrap()).unwrap(),
    );
    // SAFETY: valid paths.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, cf.as_ptr(), libc::AT_FDCWD, ct.as_ptr(), libc::RENAME_EXCHANGE) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert!(m.noisy_log_lines().is_empty(), "{:?}", m.noisy_log_lines());
    drop(m);
    let m = v.mount("m3", &[]);
    assert_eq!(std::fs::read(m.path("a/x/f")).unwrap(), b"data");
    assert_eq!(std::fs::read(m.path("sub3/deeper/in-x")).unwrap(), b"x");
    drop(m);
    let o = Command::new(BIN).arg("fsck").arg(&v.cipher).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Names from the cipher dir reach the log escaped: a file named with a
/// newline cannot forge a log line.
#[test]
fn names_are_escaped_in_log_lines() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let evil = "x\n2099-01-01T00:00:00Z ERROR forged line";
    std::fs::write(m.path(evil), b"data").unwrap();
    drop(m);
    // Damage the file so that reading it logs its path.
    let b = v.backing(evil);
    let mut bytes = std::fs::read(&b).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&b, &bytes).unwrap();
    let m = v.mount("m2", &[]);
    assert!(std::fs::read(m.path(evil)).is_err());
    let log = m.log();
    assert!(!log.lines().any(|l| l.starts_with("2099")), "{log}");
    assert!(log.contains("x\\x0a2099"), "{log}");
}

/// What a load of a directory's ID restores, and from what: a copy is
/// rebuilt from an authenticated one, from a legacy one only when an entry
/// decrypts under it, and a record left valid under two parents by a move
/// that a crash cut short is trimmed to the parent it is in.
#[test]
fn directory_id_repair_trusts_only_what_authenticates() {
    use kmsfs::fs::load_dir_id;
    use kmsfs::names::{DirKey, Names};
    let names = Names::new(&[3; 32]);
    let (id, parent, elsewhere) = ([5u8; 16], [6u8; 16], [7u8; 16]);
    let tmp = tempfile::tempdir().unwrap();
    let open =
        || kmsfs::sys::openat(libc::AT_FDCWD, tmp.path().as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
    let file = tmp.path().join(".kmsfs.dirid");
    let put = |bytes: &[u8]| {
        let _ = std::fs::remove_file(&file);
        std::fs::write(&file, bytes).unwrap();
        raw_setxattr(tmp.path(), "user.kmsfs.dirid", bytes);
    };
    // An interrupted move: valid under both parents, trimmed to this one.
    put(&names.dir_record(&id, &[&elsewhere, &parent]));
    let l = load_dir_id(&open(), &parent, &names, true).unwrap();
    assert_eq!((l.key, l.repaired.is_some()), (DirKey { id, bound: true }, true));
    assert_eq!(std::fs::read(&file).unwrap(), names.dir_record(&id, &[&parent]));
    assert_eq!(raw_getxattr(tmp.path(), "user.kmsfs.dirid"), names.dir_record(&id, &[&parent]));
    assert!(load_dir_id(&open(), &elsewhere, &names, true).is_err(), "no longer valid where it came from");
    // A lost file copy comes back from the authenticated xattr copy.
    std::fs::remove_file(&file).unwrap();
    let l = load_dir_id(&open(), &parent, &names, true).unwrap();
    assert!(!l.complete && l.repaired.is_some());
    assert_eq!(std::fs::read(&file).unwrap(), names.dir_record(&id, &[&parent]));
    // A legacy copy with the other one lost: restored only once an entry
    // of the directory decrypts under it.
    put(&id);
    std::fs::remove_file(&file).unwrap();
    let l = load_dir_id(&open(), &parent, &names, true).unwrap();
    assert_eq!((l.key, l.repaired.is_some()), (DirKey { id, bound: false }, false));
    assert!(!file.exists(), "nothing vouches for it yet");
    let legacy = DirKey { id, bound: false };
    let child = names.encrypt(&legacy, std::ffi::OsStr::new("child")).unwrap();
    std::fs::write(tmp.path().join(&child.on_disk), b"").unwrap();
    let l = load_dir_id(&open(), &parent, &names, true).unwrap();
    assert!(l.repaired.is_some());
    assert_eq!(std::fs::read(&file).unwrap(), id);
    // An authenticated copy that fails next to a legacy one: refused.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, names.dir_record(&id, &[&elsewhere])).unwrap();
    assert!(load_dir_id(&open(), &parent, &names, true).is_err());
}
