#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `-o shared`: two daemons on one cipher dir stand in for two hosts on
//! shared storage (docs/SEMANTICS.md, "Shared mode").

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

/// A volume mounted twice, both in shared mode.
fn two_mounts(v: &Volume) -> (Mounted, Mounted) {
    (v.mount("a", &["shared"]), v.mount("b", &["shared"]))
}

/// Neither errors nor warnings: lock conflicts and races are normal here.
fn no_errors(m: &Mounted) {
    let bad = m.noisy_log_lines();
    assert!(bad.is_empty(), "errors or warnings in {}: {bad:?}", m.log.display());
}

/// The one regular file in the cipher dir besides kmsfs's own.
fn backing_file(cipher: &Path) -> std::path::PathBuf {
    std::fs::read_dir(cipher)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.is_file()
                && !p.file_name().unwrap().to_string_lossy().starts_with(".kmsfs")
                && !p.ends_with("kmsfs.conf")
                && !p.to_string_lossy().contains("gocryptfs")
        })
        .expect("backing file")
}

fn python(script: &str, args: &[&Path]) -> std::process::Child {
    std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3")
}

fn output(c: std::process::Child) -> String {
    let out = c.wait_with_output().unwrap();
    let s = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python failed: {s}");
    s
}

#[test]
fn close_to_open_reads_and_appends() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    for round in 0..5u64 {
        // Same size every round: only the contents change, so only an
        // invalidation at open (not a size change) shows the new data.
        let data = random_bytes(100_000, round);
        std::fs::write(a.path("f"), &data).unwrap();
        assert!(std::fs::read(b.path("f")).unwrap() == data, "round {round}: stale read through b");
        let back = random_bytes(100_000, round + 100);
        std::fs::write(b.path("f"), &back).unwrap();
        assert!(std::fs::read(a.path("f")).unwrap() == back, "round {round}: stale read through a");
    }
    // Appends by one side reach a file the other side holds open, and its
    // size, without a reopen.
    let mut held = std::fs::File::open(b.path("f")).unwrap();
    let mut expect = random_bytes(100_000, 104);
    let mut got = Vec::new();
    held.read_to_end(&mut got).unwrap();
    assert!(got == expect);
    for i in 0..20u64 {
        let chunk = random_bytes(1000 + 333 * i as usize, 500 + i);
        let mut w = std::fs::OpenOptions::new().append(true).open(a.path("f")).unwrap();
        w.write_all(&chunk).unwrap();
        drop(w);
        expect.extend_from_slice(&chunk);
        assert_eq!(std::fs::metadata(b.path("f")).unwrap().len(), expect.len() as u64, "append {i}: size");
        let mut tail = Vec::new();
        held.read_to_end(&mut tail).unwrap();
        assert!(tail == chunk, "append {i}: read {} new bytes, want {}", tail.len(), chunk.len());
    }
    no_errors(&a);
    no_errors(&b);
}

#[test]
fn truncate_and_rewrite_while_open_elsewhere() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    std::fs::write(a.path("f"), random_bytes(50_000, 1)).unwrap();
    let held = std::fs::File::open(b.path("f")).unwrap();
    let mut buf = vec![0u8; 50_000];
    held.read_exact_at(&mut buf, 0).unwrap();
    for round in 0..10u64 {
        // O_TRUNC empties the file; the rewrite gives it a new file ID and key.
        let data = random_bytes(30_000 + 1000 * round as usize, 10 + round);
        std::fs::write(a.path("f"), &data).unwrap();
        let mut got = vec![0u8; data.len() + 10];
        let n = held.read_at(&mut got, 0).unwrap_or_else(|e| panic!("round {round}: read through the held file: {e}"));
        assert_eq!(n, data.len(), "round {round}");
        assert!(got[..n] == data[..], "round {round}: wrong data");
        // And the other way round: b rewrites, a's handle is the held one.
        let mut wb = std::fs::OpenOptions::new().write(true).truncate(true).open(b.path("f")).unwrap();
        wb.write_all(&data[..1000]).unwrap();
        drop(wb);
        assert!(std::fs::read(a.path("f")).unwrap() == data[..1000]);
    }
    // The key cache is keyed by file ID; a header replaced by the other
    // mount drops its old key: one file, one cached key on each side.
    let mut got = vec![0u8; 1000];
    held.read_exact_at(&mut got, 0).unwrap();
    for m in [&a, &b] {
        let (ok, out) = m.stats_json();
        assert!(ok, "{out}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["cache"]["size"], 1, "{}: {out}", m.mnt.display());
    }
    no_errors(&a);
    no_errors(&b);
}

/// Two mounts write interleaved ranges of the same blocks (each a
/// read-modify-write of partial blocks), and race the first write of a new
/// file (its header): nothing either side wrote is lost.
#[test]
fn concurrent_partial_block_writes_lose_nothing() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    const ROUNDS: usize = 300;
    for (k, name) in ["g0", "g1", "g2", "g3", "g4", "g5"].iter().enumerate() {
        // Both create and first-write the same new file at once.
        let mut hs = Vec::new();
        for (side, m) in [&a, &b].into_iter().enumerate() {
            let p = m.path(name);
            hs.push(std::thread::spawn(move || {
                let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&p).unwrap();
                for r in 0..ROUNDS {
                    // 100-byte records: side 0 the even ones, side 1 the odd ones,
                    // 40 per 4 KiB block, so every write shares a block with the other side.
                    let rec = 2 * r + side;
                    let body = vec![(rec % 251) as u8 + 1; 100];
                    f.write_all_at(&body, (rec * 100) as u64).unwrap();
                }
            }));
        }
        for h in hs {
            h.join().unwrap();
        }
        for m in [&a, &b] {
            let got = std::fs::read(m.path(name)).unwrap();
            assert_eq!(got.len(), 2 * ROUNDS * 100, "file {k}");
            for rec in 0..2 * ROUNDS {
                let want = (rec % 251) as u8 + 1;
                assert!(got[rec * 100..rec * 100 + 100].iter().all(|&x| x == want), "file {k}: record {rec} lost");
            }
        }
    }
    no_errors(&a);
    no_errors(&b);
}

const FCNTL: &str = r#"
import fcntl, os, sys, struct, time
a, b = sys.argv[1], sys.argv[2]
open(a, "w").write("x" * 100)
fa = os.open(a, os.O_RDWR)
fb = os.open(b, os.O_RDWR)
# lockf(fd, cmd, len, start). A write lock on bytes 10..20 through mount a.
fcntl.lockf(fa, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 10)
# Through mount b (another open file): the same bytes conflict, others do not.
pid = os.fork()
if pid == 0:
    fb2 = os.open(b, os.O_RDWR)
    try:
        fcntl.lockf(fb2, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 15)
        os._exit(1)
    except OSError:
        pass
    fcntl.lockf(fb2, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 30)
    # F_GETLK sees a's lock.
    got = fcntl.fcntl(fb2, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
    t, w, s, l, p = struct.unpack("hhqqi", got)
    if t != fcntl.F_WRLCK or s != 10 or l != 10:
        print("getlk", t, s, l); os._exit(2)
    # A read lock conflicts with the write lock too; a blocking one waits.
    t0 = time.time()
    fcntl.lockf(fb2, fcntl.LOCK_SH, 10, 10)
    if time.time() - t0 < 0.3:
        print("did not wait"); os._exit(3)
    os._exit(0)
time.sleep(0.6)
# Closing any descriptor of a's file drops this process's locks on it.
os.close(fa)
_, st = os.waitpid(pid, 0)
assert os.WEXITSTATUS(st) == 0, os.WEXITSTATUS(st)
# flock: exclusive through a conflicts through b until closed.
f1 = os.open(a, os.O_RDWR)
fcntl.flock(f1, fcntl.LOCK_EX | fcntl.LOCK_NB)
f2 = os.open(b, os.O_RDWR)
try:
    fcntl.flock(f2, fcntl.LOCK_EX | fcntl.LOCK_NB)
    sys.exit("flock did not conflict")
except OSError:
    pass
# An explicit unlock is synchronous...
fcntl.flock(f1, fcntl.LOCK_UN)
fcntl.flock(f2, fcntl.LOCK_SH | fcntl.LOCK_NB)
fcntl.flock(f2, fcntl.LOCK_UN)
fcntl.flock(f1, fcntl.LOCK_EX | fcntl.LOCK_NB)
# ...the last close's is not: FUSE sends RELEASE after close() returns.
os.close(f1)
for i in range(200):
    try:
        fcntl.flock(f2, fcntl.LOCK_SH | fcntl.LOCK_NB)
        break
    except OSError:
        time.sleep(0.01)
else:
    sys.exit("flock not released by the last close")
print("ok")
"#;

#[test]
fn fcntl_and_flock_locks_conflict_across_mounts() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    let out = output(python(FCNTL, &[&a.path("lk"), &b.path("lk")]));
    assert!(out.contains("ok"), "{out}");
    no_errors(&a);
    no_errors(&b);
}

const SQLITE: &str = r#"
import sqlite3, sys
db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sqlite3.connect(db, timeout=30, isolation_level=None)
c.execute("PRAGMA journal_mode=DELETE")
c.execute("CREATE TABLE IF NOT EXISTS t (who TEXT, i INTEGER, pad TEXT)")
for i in range(n):
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t VALUES (?, ?, ?)", (who, i, "p" * (i % 700)))
    c.execute("COMMIT")
print("done", who)
"#;

#[test]
fn sqlite_writers_on_two_mounts_stay_consistent() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    const N: &str = "150";
    // Create the schema first, so both writers start on a database.
    output(python(SQLITE, &[&a.path("db.sqlite"), Path::new("init"), Path::new("0")]));
    let pa = python(SQLITE, &[&a.path("db.sqlite"), Path::new("a"), Path::new(N)]);
    let pb = python(SQLITE, &[&b.path("db.sqlite"), Path::new("b"), Path::new(N)]);
    output(pa);
    output(pb);
    let check = r#"
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute("PRAGMA integrity_check").fetchone()[0])
print(c.execute("SELECT count(*), count(DISTINCT who || i) FROM t").fetchone())
"#;
    for m in [&a, &b] {
        let out = output(python(check, &[&m.path("db.sqlite")]));
        assert!(out.contains("ok\n(300, 300)"), "{}: {out}", m.mnt.display());
    }
    no_errors(&a);
    no_errors(&b);
}

#[test]
fn mkdir_races_end_with_one_directory() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    const DIRS: usize = 40;
    let mut hs = Vec::new();
    for (side, m) in [&a, &b].into_iter().enumerate() {
        let root = m.mnt.clone();
        hs.push(std::thread::spawn(move || {
            let mut made = 0;
            for i in 0..DIRS {
                match std::fs::create_dir(root.join(format!("d{i}"))) {
                    Ok(()) => made += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => panic!("mkdir d{i}: {e}"),
                }
                // Both sides use the directory at once, whoever made it.
                std::fs::write(root.join(format!("d{i}/from-{side}")), b"x")
                    .unwrap_or_else(|e| panic!("write in d{i}: {e}"));
            }
            made
        }));
    }
    let made: usize = hs.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(made, DIRS, "each directory made exactly once");
    for i in 0..DIRS {
        let la: Vec<_> = std::fs::read_dir(a.path(&format!("d{i}"))).unwrap().map(|e| e.unwrap().file_name()).collect();
        let mut lb: Vec<_> =
            std::fs::read_dir(b.path(&format!("d{i}"))).unwrap().map(|e| e.unwrap().file_name()).collect();
        let mut la = la;
        la.sort();
        lb.sort();
        assert_eq!(la.len(), 2, "d{i}: {la:?}");
        assert_eq!(la, lb, "d{i}");
    }
    let top: Vec<_> = std::fs::read_dir(&a.mnt).unwrap().collect();
    assert_eq!(top.len(), DIRS, "no stray directories");
    no_errors(&a);
    no_errors(&b);
}

#[test]
fn concurrent_creates_renames_and_unlinks_in_one_directory() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    std::fs::create_dir(a.path("d")).unwrap();
    const FILES: usize = 150;
    let mut hs = Vec::new();
    for (side, m) in [&a, &b].into_iter().enumerate() {
        let d = m.path("d");
        hs.push(std::thread::spawn(move || {
            for i in 0..FILES {
                // Long names (hashed, with a side file) and short ones.
                let pad = if i % 3 == 0 { "L".repeat(200) } else { String::new() };
                let tmp = d.join(format!("tmp-{side}-{i}{pad}"));
                std::fs::write(&tmp, format!("{side} {i}")).unwrap();
                std::fs::rename(&tmp, d.join(format!("f-{side}-{i}{pad}"))).unwrap();
                if i % 5 == 0 {
                    std::fs::write(d.join(format!("gone-{side}-{i}")), b"x").unwrap();
                    std::fs::remove_file(d.join(format!("gone-{side}-{i}"))).unwrap();
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    for m in [&a, &b] {
        let mut names: Vec<String> =
            std::fs::read_dir(m.path("d")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names.len(), 2 * FILES, "{}: {:?}", m.mnt.display(), &names[..names.len().min(5)]);
        for side in 0..2 {
            for i in 0..FILES {
                let pad = if i % 3 == 0 { "L".repeat(200) } else { String::new() };
                let p = m.path(&format!("d/f-{side}-{i}{pad}"));
                assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{side} {i}"));
            }
        }
    }
    // A rename through one side is seen at once through the other.
    for i in 0..20 {
        std::fs::rename(a.path(&format!("d/f-0-{}", i * 3 + 1)), a.path(&format!("d/moved-{i}"))).unwrap();
        assert!(!b.path(&format!("d/f-0-{}", i * 3 + 1)).exists(), "old name {i} still seen through b");
        assert_eq!(std::fs::read_to_string(b.path(&format!("d/moved-{i}"))).unwrap(), format!("0 {}", i * 3 + 1));
        // And a directory moved into another keeps its contents.
        std::fs::create_dir(b.path(&format!("sub{i}"))).unwrap();
        std::fs::write(b.path(&format!("sub{i}/x")), format!("{i}")).unwrap();
        std::fs::rename(b.path(&format!("sub{i}")), b.path(&format!("d/sub{i}"))).unwrap();
        assert_eq!(std::fs::read_to_string(a.path(&format!("d/sub{i}/x"))).unwrap(), format!("{i}"));
    }
    no_errors(&a);
    no_errors(&b);
}

#[test]
fn shared_flag_and_option_both_mount() {
    require_mount!();
    let v = Volume::new();
    let log = v.tmp.path().join("s.log");
    let mnt = v.tmp.path().join("s");
    std::fs::create_dir_all(&mnt).unwrap();
    let st = std::process::Command::new(BIN)
        .arg("mount")
        .arg(&v.cipher)
        .arg(&mnt)
        .arg("--shared")
        .arg("--log-file")
        .arg(&log)
        .status()
        .unwrap();
    assert!(st.success());
    let mut f = std::fs::File::create(mnt.join("x")).unwrap();
    f.write_all(b"hello").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    drop(f);
    assert_eq!(std::fs::read(mnt.join("x")).unwrap(), b"hello");
    // The daemon runs in shared mode: locks reach the backing file, so a
    // second open file of it sees this one's lock.
    let out = output(python(
        "import fcntl,os,sys\nf=os.open(sys.argv[1],os.O_RDWR)\nfcntl.lockf(f,fcntl.LOCK_EX|fcntl.LOCK_NB)\n\
         g=open(sys.argv[2],'r+')\n\
         import struct\nr=fcntl.fcntl(g,fcntl.F_OFD_GETLK,struct.pack('hhqqi',fcntl.F_WRLCK,0,0,0,0))\n\
         print('held' if struct.unpack('hhqqi',r)[0]==fcntl.F_WRLCK else 'free')",
        &[&mnt.join("x"), &backing_file(&v.cipher)],
    ));
    assert!(out.contains("held"), "{out}");
    let (ok, out) = sh(&format!("{BIN} unmount {}", mnt.display()));
    assert!(ok, "{out}");
}

/// Offline commands that change the volume take the cipher-dir lock
/// exclusively, so they refuse while any mount (on any host) holds it
/// shared; a plain check still runs.
#[test]
fn offline_commands_refuse_a_live_mount() {
    require_mount!();
    let v = Volume::new();
    let (mut a, b) = two_mounts(&v);
    std::fs::write(a.path("f"), b"x").unwrap();
    let key = v.key.display();
    let c = v.cipher.display();
    for cmd in [format!("fsck --repair --key-file {key} {c}"), format!("rewrap --key-file {key} {c}")] {
        let (ok, out) = sh(&format!("{BIN} {cmd}"));
        assert!(!ok && out.contains("mounted"), "{cmd}: {out}");
    }
    let (ok, out) = sh(&format!("{BIN} fsck --key-file {key} {c}"));
    assert!(ok, "a check runs beside the mounts: {out}");
    a.unmount();
    drop(b);
    let (ok, out) = sh(&format!("{BIN} fsck --repair --key-file {key} {c}"));
    assert!(ok, "{out}");
}

/// One mount cuts and extends a file while the other writes partial blocks
/// and appends, and a third thread truncates to zero now and then (a new
/// header): every state either leaves reads whole, and fsck finds nothing.
#[test]
fn truncations_racing_writes_leave_no_bad_block() {
    require_mount!();
    let v = Volume::new();
    let (mut a, mut b) = two_mounts(&v);
    std::fs::write(a.path("t"), random_bytes(40_000, 9)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cutter = {
        let p = a.path("t");
        let done = done.clone();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            // At least 300 cuts, and on until 300 writes have raced them.
            let mut i = 0u64;
            while i < 300 || done.load(std::sync::atomic::Ordering::Relaxed) < 300 {
                let len = if i % 50 == 49 { 0 } else { (i * 7919) % 60_000 };
                f.set_len(len).unwrap();
                i += 1;
            }
        })
    };
    let writer = {
        let p = b.path("t");
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.write_all_at(&[i as u8 | 1; 300], (i * 4001) % 50_000).unwrap();
                let mut buf = vec![0u8; 9000];
                if let Err(e) = f.read_at(&mut buf, (i * 3001) % 50_000) {
                    panic!("read {i}: {e}");
                }
                i += 1;
                done.store(i, std::sync::atomic::Ordering::Relaxed);
            }
            i
        })
    };
    cutter.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes >= 300, "only {writes} writes raced the truncations");
    let (ra, rb) = (std::fs::read(a.path("t")).unwrap(), std::fs::read(b.path("t")).unwrap());
    assert!(ra == rb);
    no_errors(&a);
    no_errors(&b);
    a.unmount();
    b.unmount();
    let (ok, out) = sh(&format!("{BIN} fsck --key-file {} {}", v.key.display(), v.cipher.display()));
    assert!(ok, "{out}");
}

/// Shared mmap works in shared mode; another mount sees what was written
/// through the mapping once it is synced (msync) and the file reopened.
#[test]
fn mmap_writes_reach_the_other_mount_after_msync() {
    require_mount!();
    let v = Volume::new();
    let (a, b) = two_mounts(&v);
    std::fs::write(a.path("m"), vec![0u8; 100_000]).unwrap();
    let script = r#"
import mmap, os, sys
f = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(f, 100000)
for i in range(0, 100000, 4096):
    m[i:i + 5] = b"hello"
m.flush()
print(open(sys.argv[2], "rb").read().count(b"hello"))
m.close()
os.close(f)
"#;
    let out = output(python(script, &[&a.path("m"), &b.path("m")]));
    assert_eq!(out.trim(), "25", "{out}");
    no_errors(&a);
    no_errors(&b);
}
