#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real tools and real faults through a real mount: SEEK_DATA/SEEK_HOLE
//! against a model and against cp/rsync/tar, rename onto an empty directory
//! and rmdir past kmsfs's bookkeeping files, and a stop (SIGTERM, SIGINT,
//! `kmsfs unmount`) of a busy mount with dirty pages in the kernel's
//! writeback cache.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use proptest::prelude::*;

const OVERHEAD: u64 = 28;

fn seek(f: &std::fs::File, off: u64, whence: i32) -> Result<u64, i32> {
    // SAFETY: plain lseek on an open descriptor.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 { Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)) } else { Ok(r as u64) }
}

/// The data extents of `f` (size `size`) found by alternating SEEK_DATA and
/// SEEK_HOLE, checking on the way that each answer moves forward.
fn data_extents(f: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    let mut out = vec![];
    let mut pos = 0;
    while pos < size {
        assert!(out.len() <= size as usize, "SEEK_DATA/SEEK_HOLE do not advance");
        let d = match seek(f, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(libc::ENXIO) => break,
            Err(e) => panic!("SEEK_DATA at {pos}: errno {e}"),
        };
        assert!(d >= pos && d < size, "SEEK_DATA({pos}) = {d}, size {size}");
        let h = seek(f, d, libc::SEEK_HOLE).unwrap_or_else(|e| panic!("SEEK_HOLE at {d}: errno {e}"));
        assert!(h > d && h <= size, "SEEK_HOLE({d}) = {h} after SEEK_DATA({pos}) = {d}, size {size}");
        out.push((d, h));
        pos = h;
    }
    out
}

/// The expected plaintext data extents, derived independently from the
/// backing file's own extents: a block is data when any byte of its stored
/// slot is, a hole when its whole slot is a hole.
fn expected_extents(backing: &Path, size: u64, bs: u64) -> Vec<(u64, u64)> {
    if size == 0 {
        return vec![];
    }
    let f = std::fs::File::open(backing).unwrap();
    let blen = f.metadata().unwrap().len();
    let body = (size / bs) * (bs + OVERHEAD) + if !size.is_multiple_of(bs) { size % bs + OVERHEAD } else { 0 };
    let header = blen - body;
    let raw = data_extents(&f, blen);
    let blocks = size.div_ceil(bs);
    let mut out: Vec<(u64, u64)> = vec![];
    for i in 0..blocks {
        let start = header + i * (bs + OVERHEAD);
        let end = start + size.saturating_sub(i * bs).min(bs) + OVERHEAD;
        if raw.iter().any(|&(a, b)| a < end && b > start) {
            let (ps, pe) = (i * bs, ((i + 1) * bs).min(size));
            match out.last_mut() {
                Some(last) if last.1 == ps => last.1 = pe,
                _ => out.push((ps, pe)),
            }
        }
    }
    out
}

/// What SEEK_DATA / SEEK_HOLE at `off` must answer, given the data extents.
fn expected_at(ext: &[(u64, u64)], size: u64, off: u64) -> (Result<u64, i32>, Result<u64, i32>) {
    if off >= size {
        return (Err(libc::ENXIO), Err(libc::ENXIO));
    }
    let data = ext.iter().find(|&&(_, e)| e > off).map(|&(s, _)| s.max(off)).ok_or(libc::ENXIO);
    let hole = match ext.iter().find(|&&(s, e)| s <= off && off < e) {
        Some(&(_, e)) => e,
        None => off,
    };
    (data, Ok(hole))
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize },
    SetLen(u64),
}

fn ops(max: u64, bs: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (0..max, 1..(3 * bs as usize + 100)).prop_map(|(off, len)| Op::Write { off, len }),
        1 => (0..max).prop_map(Op::SetLen),
    ];
    proptest::collection::vec(op, 1..8)
}

/// Applies `ops` to a file in the mount and to the model, then compares the
/// SEEK_DATA/SEEK_HOLE map with the backing extents and the model.
fn check_layout(m: &Mounted, cipher: &Path, bs: u64, name: &str, ops: &[Op]) {
    let p = m.path(name);
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    let mut model: Vec<u8> = vec![];
    // Blocks that must be data: written ones and every last block.
    let mut written = BTreeSet::new();
    for (k, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len } => {
                let data = random_bytes(len, k as u64 + off);
                f.write_all_at(&data, off).unwrap();
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
                written.extend(off / bs..=(end as u64 - 1) / bs);
            }
            Op::SetLen(s) => {
                f.set_len(s).unwrap();
                model.resize(s as usize, 0);
                written.retain(|&b| b < s.div_ceil(bs));
            }
        }
        if !model.is_empty() {
            written.insert((model.len() as u64 - 1) / bs);
        }
    }
    // SEEK_DATA/SEEK_HOLE answer from the backing file, which the writeback
    // cache fills at fsync.
    f.sync_all().unwrap();
    let size = model.len() as u64;
    let got = data_extents(&f, size);
    let want = expected_extents(&cipher.join(name), size, bs);
    assert_eq!(got, want, "extents of {ops:?}");
    for &b in &written {
        let at = b * bs;
        assert!(got.iter().any(|&(s, e)| s <= at && at < e), "written block {b} reported as a hole: {got:?} {ops:?}");
    }
    // Point queries, at block and page edges and at random offsets.
    let mut probes: Vec<u64> = vec![0, size, size + 1];
    for &(s, e) in &got {
        probes.extend([s, e, s.saturating_sub(1), e.saturating_sub(1)]);
    }
    for i in 0..size.div_ceil(bs).min(64) {
        probes.extend([i * bs, i * bs + bs - 1, i * bs + bs / 2]);
    }
    probes.extend((0..16).map(|i| (size / 16) * i + i * 7));
    for off in probes {
        let (d, h) = expected_at(&want, size, off);
        assert_eq!(seek(&f, off, libc::SEEK_DATA), d, "SEEK_DATA({off}) of {want:?} size {size}");
        assert_eq!(seek(&f, off, libc::SEEK_HOLE), h, "SEEK_HOLE({off}) of {want:?} size {size}");
    }
    // And read agrees: the plaintext is the model, holes read as zeros.
    let mut back = vec![0u8; model.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == model, "content differs from the model for {ops:?}");
    drop(f);
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn seek_data_hole_match_model() {
    require_mount!();
    // Plaintext names, so the test reads the backing extents directly.
    let v4 = Volume::with_args(&["--plaintext-names"]);
    let v64 = Volume::with_args(&["--plaintext-names", "--block-size", "65536"]);
    let (m4, m64) = (v4.mount("m", &[]), v64.mount("m", &[]));
    let cfg = ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() };
    let n = std::cell::Cell::new(0u32);
    let layouts = prop_oneof![
        ops(96 << 10, 4096).prop_map(|o| (false, o)),
        ops(8 << 20, 4096).prop_map(|o| (false, o)),
        ops(1 << 20, 65536).prop_map(|o| (true, o)),
    ];
    proptest!(cfg, |(case in layouts)| {
        n.set(n.get() + 1);
        let name = format!("f{}", n.get());
        match case {
            (true, o) => check_layout(&m64, &v64.cipher, 65536, &name, &o),
            (false, o) => check_layout(&m4, &v4.cipher, 4096, &name, &o),
        }
    });
    // The layout from the bug report: a few bytes at 0, 512 MiB and the end.
    let p = m4.path("gig");
    let f = std::fs::File::create(&p).unwrap();
    for off in [0, 512 << 20, (1 << 30) - 4] {
        f.write_all_at(b"kmsf", off).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let f = std::fs::File::open(&p).unwrap();
    let got = data_extents(&f, 1 << 30);
    assert_eq!(got, expected_extents(&v4.cipher.join("gig"), 1 << 30, 4096));
    assert_eq!(got.len(), 3, "{got:?}");
    // Where cp used to loop: both calls answered 536866816.
    let (d, h) = expected_at(&got, 1 << 30, 536866816);
    assert_eq!((seek(&f, 536866816, libc::SEEK_DATA), seek(&f, 536866816, libc::SEEK_HOLE)), (d, h));
    assert_ne!(d, h);
}

/// Runs a shell command with a time bound; returns how long it took.
fn timed(cmd: &str, bound: Duration) -> Duration {
    let t = Instant::now();
    let (ok, out) = sh(&format!("timeout {} sh -c '{}'", bound.as_secs(), cmd.replace('\'', "'\\''")));
    assert!(ok, "`{cmd}` failed or exceeded {bound:?}: {out}");
    t.elapsed()
}

#[test]
fn sparse_copy_tools_round_trip() {
    require_mount!();
    require_tools!("rsync", "tar", "cmp");
    let v = Volume::new();
    let m = v.mount("m", &[]);
    let out = v.tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let src = v.tmp.path().join("src");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(1 << 30).unwrap();
    for (off, what) in [(0u64, &b"start"[..]), (512 << 20, b"middle"), ((1 << 30) - 3, b"end")] {
        f.write_all_at(what, off).unwrap();
    }
    drop(f);
    let bound = Duration::from_secs(120);
    let (s, mp, o) = (src.display(), m.mnt.display(), out.display());
    let mut took = vec![];
    took.push(("cp in", timed(&format!("cp --sparse=always {s} {mp}/f"), bound)));
    took.push(("cp out", timed(&format!("cp --sparse=always {mp}/f {o}/cp"), bound)));
    took.push(("cp back", timed(&format!("cp --sparse=always {o}/cp {mp}/cp"), bound)));
    took.push(("rsync out", timed(&format!("rsync -S {mp}/f {o}/rsync"), bound)));
    took.push(("rsync back", timed(&format!("rsync -S {o}/rsync {mp}/rsync"), bound)));
    took.push((
        "tar out",
        timed(&format!("cd {mp} && tar -cSf - f | (mkdir {o}/tar && cd {o}/tar && tar -xSf -)"), bound),
    ));
    took.push((
        "tar back",
        timed(&format!("cd {o}/tar && tar -cSf - f | (mkdir {mp}/tar && cd {mp}/tar && tar -xSf -)"), bound),
    ));
    for copy in [format!("{mp}/f"), format!("{o}/cp"), format!("{o}/rsync"), format!("{o}/tar/f")] {
        let (ok, msg) = sh(&format!("cmp {s} {copy}"));
        assert!(ok, "{copy}: {msg}");
    }
    for copy in ["cp", "rsync", "tar/f"] {
        let (ok, msg) = sh(&format!("cmp {s} {mp}/{copy}"));
        assert!(ok, "{copy} back in the mount: {msg}");
        // The copy stayed sparse both ways (a dense one would take 1 GiB).
        assert!(std::fs::metadata(out.join(copy)).unwrap().blocks() < 1024, "{copy} outside is not sparse");
        assert!(std::fs::metadata(m.path(copy)).unwrap().blocks() < 1024, "{copy} in the mount is not sparse");
    }
    eprintln!("sparse_copy_tools_round_trip: {took:?}");
}

fn fsck_clean(v: &Volume) {
    let o = Command::new(BIN).arg("fsck").arg(&v.cipher).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "fsck: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn listing(p: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn errno_of(r: std::io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn rename_onto_empty_directories(v: &Volume) {
    let long = "ü".repeat(120) + "-long"; // hashed long name when encrypted
    let mut m = v.mount("m", &[]);
    // Same parent.
    std::fs::create_dir_all(m.path("a/sub")).unwrap();
    std::fs::write(m.path("a/one"), b"one").unwrap();
    std::fs::write(m.path("a/sub/two"), b"two").unwrap();
    std::fs::create_dir(m.path("b")).unwrap();
    std::fs::rename(m.path("a"), m.path("b")).unwrap();
    assert!(!m.path("a").exists());
    assert_eq!(listing(&m.path("b")), ["one", "sub"]);
    assert_eq!(std::fs::read(m.path("b/sub/two")).unwrap(), b"two");
    // Across directories, with long names on both sides.
    std::fs::create_dir_all(m.path("x").join(&long)).unwrap();
    std::fs::write(m.path("x").join(&long).join("f"), b"f").unwrap();
    std::fs::create_dir_all(m.path("y").join(format!("{long}2"))).unwrap();
    std::fs::rename(m.path("x").join(&long), m.path("y").join(format!("{long}2"))).unwrap();
    assert_eq!(listing(&m.path("x")), Vec::<String>::new());
    assert_eq!(listing(&m.path("y")), [format!("{long}2")]);
    assert_eq!(std::fs::read(m.path("y").join(format!("{long}2")).join("f")).unwrap(), b"f");
    std::fs::create_dir(m.path("y/short")).unwrap();
    std::fs::rename(m.path("y").join(format!("{long}2")), m.path("y/short")).unwrap();
    assert_eq!(std::fs::read(m.path("y/short/f")).unwrap(), b"f");
    // A target that holds anything real stays: ENOTEMPTY, nothing moves.
    std::fs::create_dir_all(m.path("c/inner")).unwrap();
    std::fs::write(m.path("c/inner/keep"), b"keep").unwrap();
    assert_eq!(errno_of(std::fs::rename(m.path("b"), m.path("c"))), Some(libc::ENOTEMPTY));
    std::fs::create_dir(m.path("d")).unwrap();
    std::fs::write(m.path("d/.hidden"), b"").unwrap();
    assert_eq!(errno_of(std::fs::rename(m.path("b"), m.path("d"))), Some(libc::ENOTEMPTY));
    assert_eq!(errno_of(std::fs::remove_dir(m.path("d"))), Some(libc::ENOTEMPTY));
    assert_eq!(std::fs::read(m.path("c/inner/keep")).unwrap(), b"keep");
    assert_eq!(listing(&m.path("b")), ["one", "sub"]);
    // The other way round works once the target is emptied; onto itself too.
    std::fs::remove_file(m.path("d/.hidden")).unwrap();
    std::fs::rename(m.path("b"), m.path("d")).unwrap();
    std::fs::rename(m.path("d"), m.path("d")).unwrap();
    // A file onto an empty directory and the reverse keep their errors.
    std::fs::create_dir(m.path("e")).unwrap();
    std::fs::write(m.path("file"), b"f").unwrap();
    assert_eq!(errno_of(std::fs::rename(m.path("file"), m.path("e"))), Some(libc::EISDIR));
    assert_eq!(errno_of(std::fs::rename(m.path("e"), m.path("file"))), Some(libc::ENOTDIR));
    // A directory into its own subdirectory still fails.
    std::fs::create_dir(m.path("d/sub/empty")).unwrap();
    assert_eq!(errno_of(std::fs::rename(m.path("d"), m.path("d/sub/empty"))), Some(libc::EINVAL));
    // rmdir past the bookkeeping files.
    std::fs::remove_dir(m.path("d/sub/empty")).unwrap();
    std::fs::remove_dir(m.path("x")).unwrap();
    std::fs::remove_dir(m.path("e")).unwrap();
    m.unmount();
    drop(m);
    fsck_clean(v);
    let m = v.mount("m2", &[]);
    assert_eq!(listing(&m.mnt), ["c", "d", "file", "y"]);
    assert_eq!(listing(&m.path("d")), ["one", "sub"]);
    assert_eq!(std::fs::read(m.path("d/one")).unwrap(), b"one");
    assert_eq!(std::fs::read(m.path("d/sub/two")).unwrap(), b"two");
    assert_eq!(std::fs::read(m.path("y/short/f")).unwrap(), b"f");
}

#[test]
fn rename_onto_empty_directory_encrypted_names() {
    require_mount!();
    rename_onto_empty_directories(&Volume::new());
}

#[test]
fn rename_onto_empty_directory_plaintext_names() {
    require_mount!();
    rename_onto_empty_directories(&Volume::plain());
}

/// Bookkeeping files alone (the ID file, an orphaned long-name side file,
/// an unfinished mkdir) do not make a directory non-empty; anything else,
/// even an entry the mount hides because it does not decrypt, does.
#[test]
fn bookkeeping_files_do_not_count_as_entries() {
    require_mount!();
    let v = Volume::new();
    let m = v.mount("m", &[]);
    for d in ["t1", "t2", "t3", "src"] {
        std::fs::create_dir(m.path(d)).unwrap();
    }
    std::fs::write(m.path("src/data"), b"data").unwrap();
    let (b1, b2, b3) = (v.backing("t1"), v.backing("t2"), v.backing("t3"));
    for b in [&b1, &b2] {
        std::fs::write(b.join("L.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.name"), b"").unwrap();
        std::fs::create_dir(b.join(".kmsfs.tmp.0123456789abcdef0123456789abcdef")).unwrap();
        std::fs::write(b.join(".kmsfs.tmp.0123456789abcdef0123456789abcdef/.kmsfs.dirid"), [7u8; 16]).unwrap();
    }
    std::fs::write(b3.join("not-a-kmsfs-name"), b"foreign").unwrap();
    assert_eq!(listing(&m.path("t1")), Vec::<String>::new());
    assert_eq!(listing(&m.path("t3")), Vec::<String>::new());
    std::fs::remove_dir(m.path("t1")).unwrap();
    assert!(!b1.exists());
    std::fs::rename(m.path("src"), m.path("t2")).unwrap();
    assert_eq!(std::fs::read(m.path("t2/data")).unwrap(), b"data");
    assert_eq!(errno_of(std::fs::remove_dir(m.path("t3"))), Some(libc::ENOTEMPTY));
    assert_eq!(errno_of(std::fs::rename(m.path("t2"), m.path("t3"))), Some(libc::ENOTEMPTY));
    assert_eq!(std::fs::read(b3.join("not-a-kmsfs-name")).unwrap(), b"foreign");
    assert_eq!(std::fs::read(m.path("t2/data")).unwrap(), b"data");
    // A crash between the two steps of either leaves a directory whose ID
    // file is gone but whose xattr copy remains: it still serves, and is
    // removable, and fsck --repair restores the file.
    std::fs::create_dir(m.path("t4")).unwrap();
    std::fs::write(m.path("t4/x"), b"x").unwrap();
    let b4 = v.backing("t4");
    std::fs::remove_file(b4.join(".kmsfs.dirid")).unwrap();
    drop(m);
    let m = v.mount("m2", &[]);
    assert_eq!(std::fs::read(m.path("t4/x")).unwrap(), b"x");
    std::fs::remove_file(m.path("t4/x")).unwrap();
    std::fs::remove_dir(m.path("t4")).unwrap();
    drop(m);
    std::fs::remove_file(b3.join("not-a-kmsfs-name")).unwrap();
    fsck_clean(&v);
}

enum Stop {
    Signal(i32),
    Unmount,
}

/// A shared writable mapping of a whole file.
struct Mapping(*mut libc::c_void, usize);

impl Mapping {
    fn new(f: &std::fs::File, len: usize) -> Self {
        // SAFETY: a fresh shared mapping of an open file of `len` bytes.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping(p, len)
    }
    fn write(&self, data: &[u8]) {
        assert_eq!(data.len(), self.1);
        // SAFETY: the mapping is `self.1` bytes long and writable.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.0.cast::<u8>(), data.len()) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// A process writes 200,000 bytes (no fsync) and keeps the file open, so
/// the data sits in the kernel's writeback cache and the mount is busy;
/// another 200,000 bytes go through a shared mapping whose descriptor is
/// already closed. Then the daemon is stopped. Every byte must be in the
/// volume after.
fn stop_keeps_dirty_writes(stop: Stop, name: &str) {
    let v = Volume::new();
    let mut m = v.mount("m", &[]);
    let data = random_bytes(200_000, 42);
    let mut f = std::fs::File::create(m.path("dirty")).unwrap();
    f.write_all(&data).unwrap();
    let mapped = random_bytes(200_000, 43);
    let g = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(m.path("mapped"));
    let g = g.unwrap();
    g.set_len(mapped.len() as u64).unwrap();
    let map = Mapping::new(&g, mapped.len());
    drop(g);
    map.write(&mapped);
    let pid = m.child.as_ref().unwrap().id();
    let t = Instant::now();
    match stop {
        Stop::Signal(s) => {
            // SAFETY: signalling our own child.
            assert_eq!(unsafe { libc::kill(pid as i32, s) }, 0);
        }
        Stop::Unmount => {
            let o = Command::new(BIN).arg("unmount").arg(&m.mnt).output().unwrap();
            assert!(o.status.success(), "kmsfs unmount of a busy mount: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let st = loop {
        if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{name}: the daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    m.child = None;
    assert!(st.success(), "{name}: daemon exit {st}: {}", m.log());
    assert!(!mounted(&m.mnt), "{name}: still mounted");
    eprintln!("{name}: daemon exited {:?} after the stop", t.elapsed());
    // The writer finds its mount gone: a late write and fsync report it.
    let late = f.write_all(b"late").and_then(|()| f.sync_all());
    eprintln!("{name}: late write+fsync: {late:?}");
    assert!(late.is_err(), "{name}: a write after the stop looked durable");
    drop(f);
    drop(map);
    let m2 = v.mount("m2", &[]);
    let back = std::fs::read(m2.path("dirty")).unwrap();
    assert_eq!(back.len(), data.len(), "{name}: bytes lost");
    assert!(back == data, "{name}: content differs");
    assert!(std::fs::read(m2.path("mapped")).unwrap() == mapped, "{name}: mapped writes lost");
}

#[test]
fn stop_with_dirty_pages_keeps_acknowledged_writes() {
    require_mount!();
    stop_keeps_dirty_writes(Stop::Signal(libc::SIGTERM), "SIGTERM");
    stop_keeps_dirty_writes(Stop::Signal(libc::SIGINT), "SIGINT");
    stop_keeps_dirty_writes(Stop::Unmount, "kmsfs unmount");
}

/// `kmsfs unmount` of a mount in daemon mode (not the test's child), busy
/// with dirty pages and then idle.
#[test]
fn unmount_command_busy_and_idle() {
    require_mount!();
    let v = Volume::new();
    let mnt = v.tmp.path().join("m");
    std::fs::create_dir(&mnt).unwrap();
    let mount = || {
        let o = Command::new(BIN).arg("mount").arg(&v.cipher).arg(&mnt).output().unwrap();
        assert!(o.status.success(), "mount: {}", String::from_utf8_lossy(&o.stderr));
    };
    let unmount = || {
        let o = Command::new(BIN).arg("unmount").arg(&mnt).output().unwrap();
        assert!(o.status.success(), "unmount: {}", String::from_utf8_lossy(&o.stderr));
        assert!(!mounted(&mnt));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    mount();
    let data = random_bytes(200_000, 9);
    let mut f = std::fs::File::create(mnt.join("dirty")).unwrap();
    f.write_all(&data).unwrap();
    assert!(unmount().contains("was busy"));
    drop(f);
    mount();
    assert!(std::fs::read(mnt.join("dirty")).unwrap() == data, "bytes lost");
    assert_eq!(unmount(), "");
    let o = Command::new(BIN).arg("unmount").arg(&mnt).output().unwrap();
    assert_eq!(o.status.code(), Some(5), "not mounted any more");
}
