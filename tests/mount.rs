#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real FUSE mounts through the kmsfs binary.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

use common::*;

#[test]
fn round_trips_by_size() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let sizes = [0usize, 1, 4095, 4096, 4097, 65_536 + 3, 1 << 20, (5 << 20) + 7, 20 << 20];
    for (i, &n) in sizes.iter().enumerate() {
        let data = random_bytes(n, i as u64);
        let src = v.tmp.path().join(format!("src{i}"));
        std::fs::write(&src, &data).unwrap();
        let (ok, out) = sh(&format!("cp {} {}", src.display(), m.path(&format!("f{i}")).display()));
        assert!(ok, "{out}");
        let back = std::fs::read(m.path(&format!("f{i}"))).unwrap();
        assert!(back == data, "size {n} differs");
        assert_eq!(std::fs::metadata(m.path(&format!("f{i}"))).unwrap().len(), n as u64);
    }
    drop(m);
    // And after a remount (nothing served from the page cache).
    let m = v.mount("m2", &[]);
    for (i, &n) in sizes.iter().enumerate() {
        let back = std::fs::read(m.path(&format!("f{i}"))).unwrap();
        assert!(back == random_bytes(n, i as u64), "size {n} differs after remount");
    }
}

#[test]
fn marker_never_reaches_backing_dir() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let marker = b"KMSFS-MARKER-4f1c2a";
    let mut data = marker.repeat(1000);
    data.extend_from_slice(&random_bytes(10_000, 1));
    data.extend_from_slice(marker);
    std::fs::write(m.path("a.txt"), &data).unwrap();
    std::fs::write(m.path("small"), marker).unwrap();
    drop(m);
    for e in walk(&v.cipher) {
        let bytes = std::fs::read(&e).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker), "marker in {}", e.display());
    }
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else if e.file_type().unwrap().is_file() {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn random_io_matches_model() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let p = m.path("model");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    let mut model: Vec<u8> = Vec::new();
    let mut x = 12345u64;
    let mut next = |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    for step in 0..400 {
        match next(4) {
            0 | 1 => {
                let off = next(300_000) as usize;
                let len = 1 + next(20_000) as usize;
                let d = random_bytes(len, step);
                f.write_all_at(&d, off as u64).unwrap();
                if model.len() < off + len {
                    model.resize(off + len, 0);
                }
                model[off..off + len].copy_from_slice(&d);
            }
            2 => {
                let n = next(300_000) as usize;
                f.set_len(n as u64).unwrap();
                model.resize(n, 0);
            }
            _ => {
                let off = next(320_000) as usize;
                let len = next(30_000) as usize;
                let mut buf = vec![0u8; len];
                let mut got = 0;
                while got < len {
                    let k = f.read_at(&mut buf[got..], (off + got) as u64).unwrap();
                    if k == 0 {
                        break;
                    }
                    got += k;
                }
                let s = off.min(model.len());
                let e = (off + len).min(model.len());
                assert_eq!(&buf[..got], &model[s..e], "step {step}");
            }
        }
    }
    drop(f);
    assert!(std::fs::read(&p).unwrap() == model);
}

/// Eight writers fill interleaved 10,000-byte chunks (not block aligned)
/// while a reader rereads chunk 3, which only writer 3 touches.
fn hammer_one_file(p: &std::path::Path, direct: bool) {
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 10_000;
    let flags = if direct { libc::O_DIRECT } else { 0 };
    std::fs::File::create(p).unwrap().set_len((8 * 40 * CHUNK) as u64).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let p = p.to_owned();
            std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).custom_flags(flags).open(&p).unwrap();
                for i in 0..40 {
                    let off = (i * 8 + t) * CHUNK;
                    f.write_all_at(&vec![(t as u8) + 1; CHUNK], off as u64).unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let p = p.to_owned();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(&p).unwrap();
            let mut buf = vec![0u8; CHUNK];
            for _ in 0..200 {
                f.read_exact_at(&mut buf, 3 * CHUNK as u64).unwrap();
                if direct {
                    // One READ against one WRITE request: the inode lock makes
                    // each whole request atomic, so never torn.
                    assert!(buf.iter().all(|&b| b == buf[0]), "torn read");
                } else {
                    // Through the page cache Linux itself gives no read/write
                    // atomicity across pages (ext4 neither), but no byte may
                    // ever be stale garbage or another writer's.
                    assert!(buf.iter().all(|&b| b == 0 || b == 4), "foreign bytes");
                }
            }
        })
    };
    for t in threads {
        t.join().unwrap();
    }
    reader.join().unwrap();
    let all = std::fs::read(p).unwrap();
    for (c, chunk) in all.chunks(CHUNK).enumerate() {
        assert!(chunk.iter().all(|&b| b == (c % 8) as u8 + 1), "chunk {c}");
    }
}

#[test]
fn concurrent_writers_and_readers() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    hammer_one_file(&m.path("cached"), false);
    hammer_one_file(&m.path("direct"), true);
    // Many files at once.
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let dir = m.path("");
            std::thread::spawn(move || {
                for i in 0..25 {
                    let d = random_bytes(1000 + i * 97, (t * 100 + i) as u64);
                    let f = dir.join(format!("t{t}-{i}"));
                    std::fs::write(&f, &d).unwrap();
                    assert!(std::fs::read(&f).unwrap() == d);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn mmap_read_and_write() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let p = m.path("mm");
    let n = 3 * 4096 + 100;
    std::fs::write(&p, random_bytes(n, 9)).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: mapping a file we own, within its size; unmapped below.
    unsafe {
        let ptr =
            libc::mmap(std::ptr::null_mut(), n, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(ptr, libc::MAP_FAILED);
        let s = std::slice::from_raw_parts_mut(ptr as *mut u8, n);
        assert!(s == &random_bytes(n, 9)[..], "mmap read");
        s[5000..5010].copy_from_slice(b"MMAPWRITE!");
        assert_eq!(libc::msync(ptr, n, libc::MS_SYNC), 0);
        libc::munmap(ptr, n);
    }
    drop(f);
    drop(m);
    let m = v.mount("m2", &[]);
    let back = std::fs::read(m.path("mm")).unwrap();
    assert_eq!(&back[5000..5010], b"MMAPWRITE!");
}

#[test]
fn rename_link_symlink() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::create_dir_all(m.path("a/b")).unwrap();
    std::fs::write(m.path("a/b/f"), b"content").unwrap();
    std::fs::rename(m.path("a/b/f"), m.path("a/g")).unwrap();
    assert_eq!(std::fs::read(m.path("a/g")).unwrap(), b"content");
    std::fs::rename(m.path("a"), m.path("z")).unwrap();
    assert_eq!(std::fs::read(m.path("z/g")).unwrap(), b"content");
    std::fs::hard_link(m.path("z/g"), m.path("hl")).unwrap();
    let (a, b) = (std::fs::metadata(m.path("z/g")).unwrap(), std::fs::metadata(m.path("hl")).unwrap());
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    std::fs::write(m.path("hl"), b"changed via link").unwrap();
    assert_eq!(std::fs::read(m.path("z/g")).unwrap(), b"changed via link");
    std::os::unix::fs::symlink("z/g", m.path("sl")).unwrap();
    assert_eq!(std::fs::read_link(m.path("sl")).unwrap().to_str(), Some("z/g"));
    assert_eq!(std::fs::read(m.path("sl")).unwrap(), b"changed via link");
    // RENAME_EXCHANGE and RENAME_NOREPLACE.
    std::fs::write(m.path("x1"), b"one").unwrap();
    std::fs::write(m.path("x2"), b"two").unwrap();
    let (ok, out) =
        sh(&format!("mv --exchange {} {} 2>&1 || echo NOEXCHANGE", m.path("x1").display(), m.path("x2").display()));
    if !out.contains("NOEXCHANGE") && !out.contains("unrecognized") {
        assert!(ok);
        assert_eq!(std::fs::read(m.path("x1")).unwrap(), b"two");
    }
    let (_, out) =
        sh(&format!("mv -n {} {}; cat {}", m.path("x1").display(), m.path("x2").display(), m.path("x2").display()));
    assert!(out.contains("one") || out.contains("two"));
    // The volume config is invisible and untouchable: with encrypted names a
    // plaintext "kmsfs.conf" is just another (encrypted) name.
    assert!(!m.path("kmsfs.conf").exists());
    std::fs::write(m.path("kmsfs.conf"), b"x").unwrap();
    assert!(std::fs::read_to_string(v.cipher.join("kmsfs.conf")).unwrap().contains("volume_id"));
    drop(m);
    let pv = Volume::plain();
    let m = pv.mount("m", &[]);
    assert!(!m.path("kmsfs.conf").exists());
    assert!(std::fs::write(m.path("kmsfs.conf"), b"x").is_err());
}

#[test]
fn sparse_file_stays_sparse() {
    require_mount!();
    let v = Volume::plain();
    let m = v.mount("m", &[]);
    let mut f = std::fs::File::create(m.path("sparse")).unwrap();
    f.write_all(b"start").unwrap();
    f.seek(SeekFrom::Start(1 << 30)).unwrap();
    f.write_all(b"end").unwrap();
    drop(f);
    let st = std::fs::metadata(v.cipher.join("sparse")).unwrap();
    assert!(st.blocks() * 512 < 4 << 20, "backing uses {} bytes", st.blocks() * 512);
    let mut f = std::fs::File::open(m.path("sparse")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.seek(SeekFrom::Start(512 << 20)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(std::fs::metadata(m.path("sparse")).unwrap().len(), (1 << 30) + 3);
}

#[test]
fn corrupted_backing_file_gives_eio() {
    require_mount!();
    let v = Volume::plain();
    let m = v.mount("m", &[]);
    std::fs::write(m.path("victim"), random_bytes(20_000, 5)).unwrap();
    drop(m);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(v.cipher.join("victim")).unwrap();
    let mut b = [0u8];
    let off = 256 + 4124 + 100; // inside block 1
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 1], off).unwrap();
    drop(f);
    let m = v.mount("m2", &[]);
    let err = std::fs::read(m.path("victim")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // Block 0 still reads: damage is contained to the block.
    let mut head = vec![0u8; 4096];
    std::fs::File::open(m.path("victim")).unwrap().read_exact_at(&mut head, 0).unwrap();
    assert!(head == random_bytes(20_000, 5)[..4096]);
    let log = m.log();
    assert!(log.contains("/victim") && log.contains("block 1"), "log names file and block: {log}");
}

#[test]
fn kill9_then_remount_keeps_fsynced_files() {
    require_mount!();
    let v = Volume::new();
    let mut m = v.mount("m", &[]);
    let mut synced = vec![];
    for i in 0..20 {
        let d = random_bytes(50_000 + i * 1000, i as u64);
        let mut f = std::fs::File::create(m.path(&format!("s{i}"))).unwrap();
        f.write_all(&d).unwrap();
        f.sync_all().unwrap();
        synced.push(d);
    }
    // Unsynced writes in flight while the daemon dies.
    let dir = m.path("");
    let writer = std::thread::spawn(move || {
        for i in 0..1000 {
            if std::fs::write(dir.join(format!("u{i}")), random_bytes(30_000, 1000 + i)).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(150));
    m.kill9();
    let _ = writer.join();
    let m = v.mount("m2", &[]);
    for (i, d) in synced.iter().enumerate() {
        assert!(std::fs::read(m.path(&format!("s{i}"))).unwrap() == *d, "s{i} damaged");
    }
}

#[test]
fn two_mounts_share_one_cipher_dir() {
    require_mount!();
    let v = Volume::new();
    let a = v.mount("a", &[]);
    let b = v.mount("b", &[]);
    let d = random_bytes(300_000, 77);
    std::fs::write(a.path("from-a"), &d).unwrap();
    assert!(std::fs::read(b.path("from-a")).unwrap() == d);
    std::fs::write(b.path("from-b"), b"hello from b").unwrap();
    assert_eq!(std::fs::read(a.path("from-b")).unwrap(), b"hello from b");
}

#[test]
fn ordinary_tools_work() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let mp = m.mnt.display().to_string();
    let src = v.tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    for i in 0..50 {
        std::fs::write(src.join(format!("sub/f{i}")), random_bytes(i * 300, i as u64)).unwrap();
    }
    std::fs::write(src.join("sub/deeper/x"), b"x").unwrap();
    let s = src.display();
    for (what, cmd) in [
        (
            "tar",
            format!(
                "tar -C {s} -cf {mp}/t.tar . && mkdir {mp}/untar && tar -C {mp}/untar -xf {mp}/t.tar && diff -r {s} {mp}/untar"
            ),
        ),
        ("rsync", format!("command -v rsync >/dev/null || exit 0; rsync -a {s}/ {mp}/rs/ && diff -r {s} {mp}/rs")),
        ("sed -i", format!("printf 'a\\nb\\n' > {mp}/sed.txt && sed -i s/a/A/ {mp}/sed.txt && grep -q A {mp}/sed.txt")),
        ("cp -a", format!("cp -a {s} {mp}/cpa && diff -r {s} {mp}/cpa")),
        (
            "git",
            format!(
                "command -v git >/dev/null || exit 0; cd {mp} && git init -q repo && cd repo && cp -r {s}/sub . && git add -A && git -c user.email=t@t -c user.name=t commit -qm c && git fsck >/dev/null 2>&1 && git status --porcelain | wc -l | grep -qx 0"
            ),
        ),
        (
            "sqlite3",
            format!(
                "command -v sqlite3 >/dev/null || exit 0; sqlite3 {mp}/db.sqlite 'create table t(x); insert into t values(1),(2),(3);' && test $(sqlite3 {mp}/db.sqlite 'select sum(x) from t') = 6 && sqlite3 {mp}/db.sqlite 'pragma integrity_check' | grep -q ok"
            ),
        ),
    ] {
        let (ok, out) = sh(&cmd);
        assert!(ok, "{what} failed: {out}");
    }
}

/// isatty() on a file sends FUSE_IOCTL (Python's open() does it for every
/// file), FLUSH comes on every close: both must be answered without a log
/// line, or a busy mount floods the journal.
#[test]
fn everyday_calls_keep_the_log_quiet() {
    require_mount!();
    let v = Volume::new();
    let mut m = v.mount("m", &[]);
    for i in 0..20 {
        let p = m.path(&format!("f{i}"));
        std::fs::write(&p, b"data").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        // SAFETY: isatty only reads the fd, which `f` keeps open.
        let tty = unsafe { libc::isatty(std::os::fd::AsRawFd::as_raw_fd(&f)) };
        assert_eq!(tty, 0);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENOTTY));
    }
    let (ok, out) = sh(&format!("cat {0}/f1 >/dev/null && ls -l {0} >/dev/null", m.mnt.display()));
    assert!(ok, "{out}");
    m.unmount();
    let noisy = m.noisy_log_lines();
    assert!(noisy.is_empty(), "log lines from everyday calls: {noisy:?}");
}

/// Times set through the mount persist across a remount (they reach the
/// backing file through the kernel's time flush), and an unlinked file that
/// is still open keeps working.
#[test]
fn times_persist_and_unlinked_open_files_work() {
    require_mount!();
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::MetadataExt;
    let v = Volume::new();
    let mut m = v.mount("m", &[]);
    let f = std::fs::File::create(m.path("t")).unwrap();
    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000)).unwrap();
    drop(f);
    let mut g =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("gone")).unwrap();
    g.write_all(b"before").unwrap();
    std::fs::remove_file(m.path("gone")).unwrap();
    g.write_all(b" after unlink").unwrap();
    g.rewind().unwrap();
    let mut back = String::new();
    g.read_to_string(&mut back).unwrap();
    assert_eq!(back, "before after unlink");
    assert_eq!(g.metadata().unwrap().nlink(), 0);
    drop(g);
    m.unmount();
    let noisy = m.noisy_log_lines();
    assert!(noisy.is_empty(), "{noisy:?}");
    let m = v.mount("m2", &[]);
    assert_eq!(std::fs::metadata(m.path("t")).unwrap().mtime(), 1_000_000_000);
    assert!(!m.path("gone").exists());
}

#[test]
fn disabled_on_read_only_mount() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    std::fs::write(m.path("f"), b"data").unwrap();
    drop(m);
    let m = v.mount("ro", &["ro"]);
    assert_eq!(std::fs::read(m.path("f")).unwrap(), b"data");
    let e = std::fs::write(m.path("g"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
}

#[test]
fn copy_file_range_within_mount() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let data = random_bytes(3 << 20, 11);
    std::fs::write(m.path("src"), &data).unwrap();
    let (ok, out) = sh(&format!(
        "python3 -c \"import os; a=os.open('{s}', os.O_RDONLY); b=os.open('{d}', os.O_WRONLY|os.O_CREAT, 0o644); n=0\nwhile True:\n  k=os.copy_file_range(a, b, 1<<20)\n  n+=k\n  if k==0: break\nprint(n)\"",
        s = m.path("src").display(),
        d = m.path("dst").display()
    ));
    assert!(ok && out.trim() == (3 << 20).to_string(), "{out}");
    assert!(std::fs::read(m.path("dst")).unwrap() == data);
    assert!(!m.log().contains("Not Implemented"), "{}", m.log());
}

/// A write, truncation, fallocate or copy_file_range by a caller without
/// CAP_FSETID clears the set-user-ID bit, and set-group-ID on a
/// group-executable file, as on a local file system; root's writes keep
/// them. kmsfs does this itself (FUSE_HANDLE_KILLPRIV_V2), so it is tested
/// through the mount.
#[test]
fn unprivileged_writes_clear_set_id_bits() {
    require_mount!();
    use std::os::unix::fs::PermissionsExt;
    let v = Volume::new();
    // nobody must be able to reach the mountpoint inside the temp dir.
    std::fs::set_permissions(v.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = v.mount("m", &["allow_other", "default_permissions"]);
    let mode = |name: &str| std::fs::metadata(m.path(name)).unwrap().permissions().mode() & 0o7777;
    let set = |name: &str, mode: u32| {
        std::fs::set_permissions(m.path(name), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    for name in ["append", "trunc", "otrunc", "root", "sgid-noexec", "falloc", "copy"] {
        std::fs::write(m.path(name), b"data").unwrap();
        set(name, 0o6777);
    }
    set("sgid-noexec", 0o2766);
    // A first write while the bits are off, so the kernel has cached that
    // the file needs no privilege check; then the bits come back.
    set("append", 0o777);
    let nobody = |cmd: &str| {
        let (ok, out) =
            sh(&format!("cd {} && setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '{cmd}'", m.mnt.display()));
        assert!(ok, "{cmd}: {out}");
    };
    nobody("printf x >> append");
    set("append", 0o6777);
    nobody("printf y >> append");
    nobody("truncate -s 1 trunc");
    nobody(": > otrunc");
    nobody("printf z >> sgid-noexec");
    nobody("fallocate -l 8192 falloc");
    nobody(
        "python3 -c \"import os, sys; s = os.open(sys.argv[1], os.O_RDONLY); d = os.open(sys.argv[2], os.O_WRONLY); \
         assert os.copy_file_range(s, d, 4, offset_dst=2) == 4\" root copy",
    );
    let (ok, out) = sh(&format!("printf r >> {}", m.path("root").display()));
    assert!(ok, "{out}");
    assert_eq!(mode("append"), 0o777);
    assert_eq!(std::fs::read(m.path("append")).unwrap(), b"dataxy");
    assert_eq!(mode("trunc"), 0o777);
    assert_eq!(std::fs::read(m.path("trunc")).unwrap(), b"d");
    assert_eq!(mode("otrunc"), 0o777);
    assert_eq!(std::fs::read(m.path("otrunc")).unwrap(), b"");
    assert_eq!(mode("sgid-noexec"), 0o2766, "set-group-ID without group execute is a locking mark, kept");
    assert_eq!(mode("falloc"), 0o777);
    assert_eq!(std::fs::metadata(m.path("falloc")).unwrap().len(), 8192);
    assert_eq!(mode("copy"), 0o777);
    assert_eq!(std::fs::read(m.path("copy")).unwrap(), b"dadata");
    assert_eq!(mode("root"), 0o6777);
    assert_eq!(std::fs::read(m.path("root")).unwrap(), b"datar");
}

/// A deleted file's data key leaves the key cache when the kernel forgets
/// the file, not after the LRU or the max age.
#[test]
fn deleting_a_file_drops_its_key_from_the_cache() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let cached = || {
        let (ok, out) = m.stats_json();
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["cache"]["size"].as_u64().unwrap()
    };
    std::fs::write(m.path("keep"), b"kept").unwrap();
    std::fs::write(m.path("gone"), b"deleted").unwrap();
    assert_eq!(cached(), 2);
    std::fs::remove_file(m.path("gone")).unwrap();
    let t = std::time::Instant::now();
    while cached() != 1 {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "key of the deleted file is still cached");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(m.path("keep")).unwrap(), b"kept");
}
