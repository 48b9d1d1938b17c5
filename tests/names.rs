#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Encrypted names, symlink targets and xattr values through real mounts.

mod common;

use std::process::Command;

use common::*;

const MARK: &str = "ZQXMARK";

fn all_backing_names(dir: &std::path::Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        out.push(e.file_name().to_string_lossy().into_owned());
        let ft = e.file_type().unwrap();
        if ft.is_symlink() {
            out.push(std::fs::read_link(e.path()).unwrap().to_string_lossy().into_owned());
        }
        if ft.is_dir() {
            all_backing_names(&e.path(), out);
        }
    }
}

#[test]
fn no_plaintext_name_target_or_xattr_in_backing_dir() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::create_dir_all(m.path(&format!("{MARK}-dir/{MARK} sub"))).unwrap();
    std::fs::write(m.path(&format!("{MARK}-dir/{MARK} sub/{MARK}.txt")), b"x").unwrap();
    std::os::unix::fs::symlink(format!("{MARK}-target"), m.path(&format!("{MARK}-link"))).unwrap();
    std::fs::write(m.path("plain"), b"x").unwrap();
    let (ok, out) = sh(&format!("setfattr -n user.{MARK} -v {MARK}-value {}", m.path("plain").display()));
    assert!(ok, "{out}");
    let (ok, out) = sh(&format!("getfattr --only-values -n user.{MARK} {}", m.path("plain").display()));
    assert!(ok && out.contains(&format!("{MARK}-value")), "{out}");
    assert_eq!(std::fs::read_link(m.path(&format!("{MARK}-link"))).unwrap().to_str(), Some(&*format!("{MARK}-target")));
    assert_eq!(std::fs::symlink_metadata(m.path(&format!("{MARK}-link"))).unwrap().len(), (MARK.len() + 7) as u64);
    drop(m);
    let mut names = vec![];
    all_backing_names(&v.cipher, &mut names);
    for n in &names {
        assert!(!n.contains(MARK), "plaintext in backing name or target: {n}");
    }
    // xattr values: scan raw xattrs of every backing entry.
    let (_, dump) = sh(&format!("getfattr -R -d -m - {} 2>/dev/null", v.cipher.display()));
    assert!(!dump.contains(&format!("{MARK}-value")), "xattr value in clear: {dump}");
}

#[test]
fn awkward_and_long_names_rename_link() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let long = "é".repeat(127) + "x"; // 255 bytes
    let long2 = "ß".repeat(126) + "abc"; // 255 bytes
    let names = ["with space", "new\nline", "tab\there", &long, "a", "ünïcødé ☃", "-dash", ".hidden"];
    std::fs::create_dir_all(m.path("d1")).unwrap();
    std::fs::create_dir_all(m.path("d2")).unwrap();
    for (i, n) in names.iter().enumerate() {
        std::fs::write(m.path("d1").join(n), format!("content {i}")).unwrap();
    }
    let mut listed: Vec<_> = std::fs::read_dir(m.path("d1")).unwrap().map(|e| e.unwrap().file_name()).collect();
    listed.sort();
    let mut want: Vec<std::ffi::OsString> = names.iter().map(|n| n.into()).collect();
    want.sort();
    assert_eq!(listed, want);
    // 256 bytes is too long.
    let e = std::fs::write(m.path("d1").join("x".repeat(256)), b"").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    // Rename across directories: short->long, long->short, long->long.
    std::fs::rename(m.path("d1/a"), m.path("d2").join(&long2)).unwrap();
    std::fs::rename(m.path("d1").join(&long), m.path("d2/short")).unwrap();
    std::fs::rename(m.path("d1/with space"), m.path("d2").join(&long)).unwrap();
    assert_eq!(std::fs::read_to_string(m.path("d2").join(&long2)).unwrap(), "content 4");
    assert_eq!(std::fs::read_to_string(m.path("d2/short")).unwrap(), "content 3");
    assert_eq!(std::fs::read_to_string(m.path("d2").join(&long)).unwrap(), "content 0");
    // Hard link and symlink with long names.
    std::fs::hard_link(m.path("d2").join(&long), m.path("d1").join(&long2)).unwrap();
    assert_eq!(std::fs::read_to_string(m.path("d1").join(&long2)).unwrap(), "content 0");
    std::os::unix::fs::symlink(format!("../d2/{long}"), m.path("d1/sym")).unwrap();
    assert_eq!(std::fs::read_to_string(m.path("d1/sym")).unwrap(), "content 0");
    // Deleting removes side files too: only the ID file stays behind.
    for e in std::fs::read_dir(m.path("d1")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    std::fs::remove_dir(m.path("d1")).unwrap();
    drop(m);
    let m = v.mount("m2", &[]);
    let mut listed: Vec<_> = std::fs::read_dir(m.path("d2")).unwrap().map(|e| e.unwrap().file_name()).collect();
    listed.sort();
    let mut want: Vec<std::ffi::OsString> = vec![long.clone().into(), long2.clone().into(), "short".into()];
    want.sort();
    assert_eq!(listed, want);
    let (code, out) = {
        let o = Command::new(BIN).arg("fsck").arg(&v.cipher).output().unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned())
    };
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn directory_rename_is_o1() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::create_dir_all(m.path("big/inner")).unwrap();
    for i in 0..200 {
        std::fs::write(m.path(&format!("big/inner/f{i}")), b"x").unwrap();
    }
    let backing = || {
        let o = Command::new(BIN).arg("path").arg(&v.cipher).arg("big2/inner").output().unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = Command::new(BIN).arg("path").arg(&v.cipher).arg("big/inner").output().unwrap();
    let inner_before = std::path::PathBuf::from(String::from_utf8_lossy(&before.stdout).trim());
    let children_before: Vec<_> = std::fs::read_dir(&inner_before).unwrap().map(|e| e.unwrap().file_name()).collect();
    std::fs::rename(m.path("big"), m.path("big2")).unwrap();
    let inner_after = std::path::PathBuf::from(backing());
    // The inner directory's backing name and all its children are unchanged.
    assert_eq!(inner_before.file_name(), inner_after.file_name());
    let mut a: Vec<_> = std::fs::read_dir(&inner_after).unwrap().map(|e| e.unwrap().file_name()).collect();
    let mut b = children_before;
    a.sort();
    b.sort();
    assert_eq!(a, b);
    assert_eq!(std::fs::read(m.path("big2/inner/f199")).unwrap(), b"x");
    // Path mapping back.
    // Any encrypted entry (not the directory's own ID file).
    let child = a.iter().find(|n| !n.as_encoded_bytes().starts_with(b".kmsfs")).unwrap();
    let some_child = inner_after.join(child);
    let o = Command::new(BIN).arg("path").arg("--reverse").arg(&v.cipher).arg(&some_child).output().unwrap();
    let plain = String::from_utf8_lossy(&o.stdout);
    assert!(plain.starts_with("/big2/inner/"), "{plain}");
}

#[test]
fn directory_id_copies_survive_and_fsck_repairs() {
    require_mount!();
    let v = Volume::new();
    {
        let m = v.mount("m", &[]);
        std::fs::create_dir_all(m.path("a/b")).unwrap();
        std::fs::write(m.path("a/b/f"), b"data").unwrap();
    }
    let o = Command::new(BIN).arg("path").arg(&v.cipher).arg("a/b").output().unwrap();
    let b_dir = std::path::PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    // Lose the ID file (as a sync tool or crash might): fsck reports, repairs.
    std::fs::remove_file(b_dir.join(".kmsfs.dirid")).unwrap();
    let o = Command::new(BIN).arg("fsck").arg(&v.cipher).output().unwrap();
    assert_eq!(o.status.code(), Some(6), "{}", String::from_utf8_lossy(&o.stdout));
    let o = Command::new(BIN).arg("fsck").arg("--repair").arg(&v.cipher).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("REPAIRED /a/b"), "{out}");
    assert!(b_dir.join(".kmsfs.dirid").exists());
    let o = Command::new(BIN).arg("fsck").arg(&v.cipher).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    // Lose the xattr copy: the mount still works and restores it.
    let (ok, out) = sh(&format!("setfattr -x user.kmsfs.dirid {}", b_dir.display()));
    assert!(ok, "{out}");
    let m = v.mount("m2", &[]);
    assert_eq!(std::fs::read(m.path("a/b/f")).unwrap(), b"data");
    let (ok, out) = sh(&format!("getfattr -n user.kmsfs.dirid {}", b_dir.display()));
    assert!(ok, "xattr not restored: {out}");
    drop(m);
    // An unfinished mkdir (crash between mkdir and rename) is reported, then removed.
    std::fs::create_dir(b_dir.join(".kmsfs.tmp.0011")).unwrap();
    let o = Command::new(BIN).arg("fsck").arg(&v.cipher).output().unwrap();
    assert_eq!(o.status.code(), Some(6), "{}", String::from_utf8_lossy(&o.stdout));
    let o = Command::new(BIN).arg("fsck").arg("--repair").arg(&v.cipher).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("unfinished mkdir removed"));
    assert!(!b_dir.join(".kmsfs.tmp.0011").exists());
}

#[test]
fn kill9_during_mkdir_and_rename_loops() {
    require_mount!();
    let v = Volume::new();
    let mut m = v.mount("m", &[]);
    let root = m.mnt.clone();
    let worker = std::thread::spawn(move || {
        for i in 0..100_000 {
            let d = root.join(format!("dir{}", i % 50));
            let _ = std::fs::create_dir(&d);
            let _ = std::fs::write(d.join("f"), b"x");
            let long = format!("{}{i}", "n".repeat(200));
            if std::fs::rename(&d, root.join(&long)).is_err() {
                break;
            }
            if std::fs::rename(root.join(&long), &d).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(700));
    m.kill9();
    let _ = worker.join();
    let m = v.mount("m2", &[]);
    // Every directory lists.
    for e in std::fs::read_dir(&m.mnt).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            std::fs::read_dir(e.path()).unwrap().for_each(|x| {
                x.unwrap();
            });
        }
    }
    drop(m);
    let o = Command::new(BIN).arg("fsck").arg("--repair").arg(&v.cipher).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let o = Command::new(BIN).arg("fsck").arg(&v.cipher).output().unwrap();
    let out2 = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "after repair: {out}\n{out2}");
}

/// Hard links to symlinks work within and across directories, and survive
/// renames and a remount: a symlink's target is bound to the volume, not to
/// the link's name or directory (docs/SECURITY.md says why).
#[test]
fn hard_links_to_symlinks_across_directories() {
    require_mount!();
    use std::os::unix::fs::MetadataExt;
    let v = Volume::new();
    let check = |m: &Mounted, paths: &[&str]| {
        for p in paths {
            assert_eq!(std::fs::read_link(m.path(p)).unwrap().to_str(), Some("target/one"), "{p}");
            assert_eq!(std::fs::symlink_metadata(m.path(p)).unwrap().nlink(), 3, "{p}");
        }
    };
    let m = v.mount("m", &[]);
    std::fs::create_dir_all(m.path("d1")).unwrap();
    std::fs::create_dir_all(m.path("d2")).unwrap();
    std::os::unix::fs::symlink("target/one", m.path("d1/l")).unwrap();
    std::fs::hard_link(m.path("d1/l"), m.path("d1/l2")).unwrap();
    std::fs::hard_link(m.path("d1/l"), m.path("d2/l3")).unwrap();
    std::fs::rename(m.path("d1/l2"), m.path("d2/l4")).unwrap();
    check(&m, &["d1/l", "d2/l3", "d2/l4"]);
    drop(m);
    let m = v.mount("m2", &[]);
    check(&m, &["d1/l", "d2/l3", "d2/l4"]);
    assert!(m.noisy_log_lines().is_empty(), "{:?}", m.noisy_log_lines());
}

/// A long name's side file is never rewritten in place (issue 14, 6c): with
/// the daemon killed while files are renamed over a long name again and
/// again, the long name is always there after the remount.
#[test]
fn kill9_during_rename_over_a_long_name_keeps_it() {
    require_mount!();
    let v = Volume::new();
    let target = "t".repeat(220);
    for round in 0..5 {
        let mut m = v.mount(&format!("m{round}"), &[]);
        std::fs::write(m.path(&target), b"first").unwrap();
        let (root, t) = (m.mnt.clone(), target.clone());
        let worker = std::thread::spawn(move || {
            for i in 0..100_000 {
                let src = root.join(format!("{}{i}", "s".repeat(200)));
                if std::fs::write(&src, b"next").is_err() || std::fs::rename(&src, root.join(&t)).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(300 + 100 * round));
        m.kill9();
        let _ = worker.join();
        let m = v.mount(&format!("check{round}"), &[]);
        let names: Vec<_> = std::fs::read_dir(&m.mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(names.iter().any(|n| n.to_str() == Some(target.as_str())), "round {round}: {} entries", names.len());
        assert!(m.noisy_log_lines().is_empty(), "round {round}: {:?}", m.noisy_log_lines());
    }
}

/// Directories from before ID records were authenticated (16-byte legacy
/// records, names under the old label) are upgraded offline: entries
/// renamed, records replaced, nested directories too; a second run does
/// nothing.
#[test]
fn legacy_directories_are_upgraded_offline() {
    use kmsfs::names::{DirKey, Names};
    use std::ffi::OsStr;
    let names = Names::new(&[4; 32]);
    let tmp = tempfile::tempdir().unwrap();
    let cipher = tmp.path().join("cipher");
    std::fs::create_dir(&cipher).unwrap();
    let legacy_dir = |parent: &std::path::Path, pkey: &DirKey, name: &str, id: [u8; 16]| {
        let p = parent.join(names.encrypt(pkey, OsStr::new(name)).unwrap().on_disk);
        std::fs::create_dir(&p).unwrap();
        let fd = kmsfs::sys::openat(libc::AT_FDCWD, p.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        kmsfs::fs::store_dir_id(&fd, &id).unwrap();
        (p, DirKey { id, bound: false })
    };
    let file = |dir: &std::path::Path, key: &DirKey, name: &str| {
        let s = names.encrypt(key, OsStr::new(name)).unwrap();
        if let (Some(side), Some(full)) = (s.side_file(), &s.long) {
            std::fs::write(dir.join(side), full).unwrap();
        }
        std::fs::write(dir.join(&s.on_disk), b"").unwrap();
    };
    let (docs, dk) = legacy_dir(&cipher, &DirKey::ROOT, "docs", [0x11; 16]);
    let long = "l".repeat(200);
    file(&docs, &dk, "a.txt");
    file(&docs, &dk, &long);
    let (inner, ik) = legacy_dir(&docs, &dk, "inner", [0x22; 16]);
    file(&inner, &ik, "b");
    let (old_files, before) = kmsfs::offline::walk(&cipher, &names, false).unwrap();
    assert_eq!(before.legacy_ids.len(), 2);
    let mut old_plain: Vec<_> = old_files.iter().map(|e| e.plain.clone()).collect();
    old_plain.sort();
    let r = kmsfs::offline::upgrade_dir_ids(&cipher, &names).unwrap();
    assert_eq!((r.upgraded.len(), r.renamed, r.skipped.len()), (2, 4, 0), "{r:?}");
    let (files, after) = kmsfs::offline::walk(&cipher, &names, false).unwrap();
    let mut plain: Vec<_> = files.iter().map(|e| e.plain.clone()).collect();
    plain.sort();
    assert_eq!(plain, vec!["/docs/a.txt".to_string(), "/docs/inner/b".into(), format!("/docs/{long}")]);
    assert_eq!(plain, old_plain, "legacy directories read before the upgrade too");
    assert!(after.legacy_ids.is_empty() && after.bad_ids.is_empty() && after.undecryptable.is_empty(), "{after:?}");
    let again = kmsfs::offline::upgrade_dir_ids(&cipher, &names).unwrap();
    assert_eq!((again.upgraded.len(), again.renamed), (0, 0));
}
