#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Reference-model tests of the filesystem core, as mountpoint-s3's
//! reftests: proptest generates sequences of operations (create, open,
//! write, read, truncate, rename with its flags, link, unlink, mkdir, rmdir,
//! symlink, mknod of a FIFO, setxattr, removexattr, lseek SEEK_DATA and
//! SEEK_HOLE, fallocate, copy_file_range, close, and unmount then mount
//! again), runs each on `EncFs` in-process and on a simple in-memory model,
//! and after every operation compares the result (errno included) and the
//! whole tree: directory listings, kinds, sizes, link counts, inode identity
//! of hard links, contents, symlink targets and xattrs, plus the files still
//! open (unlinked ones too), and the cipher dir's bookkeeping (no stray
//! long-name side files or temporaries). Both name modes, and `-o shared`. No mount, no /dev/fuse and no root: the
//! core is called as `fuse.rs` calls it. `REFTEST_CASES=N` sets the cases
//! per mode (192 by default: about 20 s in release on two cores).

#[path = "reftest/driver.rs"]
mod driver;
#[path = "reftest/model.rs"]
mod model;

use std::collections::{BTreeMap, HashMap};

use driver::Driver;
use kmsfs::fs::{Kind as FsKind, ROOT_INO};
use model::{Body, Ino, Kind, Model, ROOT};
use proptest::prelude::*;

/// Names: short ones collide often; 200 and 255 bytes are long names
/// (stored in side files) once encrypted; the last two are reserved at the
/// root of a plaintext-names volume.
const NAMES: [&str; 8] = ["a", "b", "c", "d", "", "", "kmsfs.conf", ".kmsfs.x"];
const XATTRS: [&str; 3] = ["user.a", "user.b", "user.long.name.of.an.attribute"];
/// Open files at most; opening another closes the oldest first.
const MAX_HANDLES: usize = 6;

fn name(i: u8) -> String {
    match NAMES[i as usize % NAMES.len()] {
        "" if i.is_multiple_of(2) => "L".repeat(200),
        "" => "M".repeat(255),
        s => s.to_string(),
    }
}

/// Where an operation acts: an existing entry, a name in an existing
/// directory (new or not), or a path of names that may not resolve.
#[derive(Clone, Debug)]
enum PathSel {
    Existing(usize),
    InDir(usize, u8),
    Raw(Vec<u8>),
    /// An entry that has xattrs, if any does.
    WithXattrs(usize),
}

#[derive(Clone, Debug)]
enum Op {
    Create { path: PathSel, excl: bool, trunc: bool },
    Open { path: PathSel, write: bool, trunc: bool },
    Close { h: usize },
    Write { h: usize, off: u64, len: usize, seed: u8 },
    WritePath { path: PathSel, off: u64, len: usize, seed: u8 },
    Read { h: usize, off: u64, len: u32 },
    Truncate { path: PathSel, size: u64 },
    Mkdir { path: PathSel },
    Rmdir { path: PathSel },
    Unlink { path: PathSel },
    Symlink { path: PathSel, target: u8 },
    Mkfifo { path: PathSel },
    Link { from: PathSel, to: PathSel },
    Rename { from: PathSel, to: PathSel, flags: u32 },
    SetXattr { path: PathSel, name: u8, len: usize, seed: u8, flags: i32 },
    RemoveXattr { path: PathSel, name: u8 },
    Lseek { h: usize, off: u64, data: bool },
    Fallocate { h: usize, off: u64, len: u64, mode: i32 },
    CopyRange { from: usize, off_in: u64, to: usize, off_out: u64, len: usize },
    Remount,
}

fn name_idx() -> impl Strategy<Value = u8> {
    prop_oneof![12 => 0..6u8, 1 => 6..8u8]
}

/// A path that names an existing entry more often than not.
fn old_path() -> impl Strategy<Value = PathSel> {
    path_sel(8, 2)
}

/// A path that names a free name more often than not.
fn new_path() -> impl Strategy<Value = PathSel> {
    path_sel(3, 6)
}

fn path_sel(existing: u32, in_dir: u32) -> impl Strategy<Value = PathSel> {
    prop_oneof![
        existing => any::<usize>().prop_map(PathSel::Existing),
        in_dir => (any::<usize>(), name_idx()).prop_map(|(d, n)| PathSel::InDir(d, n)),
        1 => prop::collection::vec(name_idx(), 1..4).prop_map(PathSel::Raw),
    ]
}

/// Offsets and sizes around the 4 KiB block edges.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0..20_000u64,
        1 => (0..5u64).prop_map(|b| b * 4096),
        1 => (1..5u64).prop_map(|b| b * 4096 - 1),
        1 => (0..5u64).prop_map(|b| b * 4096 + 1),
    ]
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![3 => 0..6000usize, 1 => Just(4096), 1 => 1..16usize]
}

fn falloc_mode() -> impl Strategy<Value = i32> {
    use libc::{FALLOC_FL_KEEP_SIZE as KEEP, FALLOC_FL_PUNCH_HOLE as PUNCH, FALLOC_FL_ZERO_RANGE as ZERO};
    prop_oneof![Just(0), Just(KEEP), Just(PUNCH | KEEP), Just(ZERO), Just(ZERO | KEEP)]
}

fn op() -> impl Strategy<Value = Op> {
    let rename_flags =
        prop_oneof![4 => Just(0u32), 1 => Just(libc::RENAME_NOREPLACE), 1 => Just(libc::RENAME_EXCHANGE)];
    let xattr_flags = prop_oneof![2 => Just(0), 1 => Just(libc::XATTR_CREATE), 1 => Just(libc::XATTR_REPLACE)];
    prop_oneof![
        4 => (new_path(), any::<bool>(), any::<bool>()).prop_map(|(path, excl, trunc)| Op::Create { path, excl, trunc }),
        2 => (old_path(), any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(path, write, trunc)| Op::Open { path, write, trunc }),
        2 => any::<usize>().prop_map(|h| Op::Close { h }),
        5 => (any::<usize>(), offset(), length(), any::<u8>())
            .prop_map(|(h, off, len, seed)| Op::Write { h, off, len, seed }),
        2 => (old_path(), offset(), length(), any::<u8>())
            .prop_map(|(path, off, len, seed)| Op::WritePath { path, off, len, seed }),
        2 => (any::<usize>(), offset(), 0..9000u32).prop_map(|(h, off, len)| Op::Read { h, off, len }),
        3 => (old_path(), offset()).prop_map(|(path, size)| Op::Truncate { path, size }),
        3 => new_path().prop_map(|path| Op::Mkdir { path }),
        2 => old_path().prop_map(|path| Op::Rmdir { path }),
        2 => old_path().prop_map(|path| Op::Unlink { path }),
        1 => (new_path(), any::<u8>()).prop_map(|(path, target)| Op::Symlink { path, target }),
        1 => new_path().prop_map(|path| Op::Mkfifo { path }),
        2 => (old_path(), new_path()).prop_map(|(from, to)| Op::Link { from, to }),
        4 => (old_path(), new_path(), rename_flags).prop_map(|(from, to, flags)| Op::Rename { from, to, flags }),
        2 => (old_path(), 0..3u8, 0..300usize, any::<u8>(), xattr_flags)
            .prop_map(|(path, name, len, seed, flags)| Op::SetXattr { path, name, len, seed, flags }),
        2 => (prop_oneof![3 => any::<usize>().prop_map(PathSel::WithXattrs), 1 => old_path()], 0..3u8)
            .prop_map(|(path, name)| Op::RemoveXattr { path, name }),
        2 => (any::<usize>(), offset(), any::<bool>()).prop_map(|(h, off, data)| Op::Lseek { h, off, data }),
        1 => (any::<usize>(), offset(), 1..9000u64, falloc_mode())
            .prop_map(|(h, off, len, mode)| Op::Fallocate { h, off, len, mode }),
        1 => (any::<usize>(), offset(), any::<usize>(), offset(), length())
            .prop_map(|(from, off_in, to, off_out, len)| Op::CopyRange { from, off_in, to, off_out, len }),
        1 => Just(Op::Remount),
    ]
}

fn resolve(m: &Model, p: &PathSel) -> Vec<String> {
    match p {
        PathSel::Existing(i) => {
            let all = m.all_paths();
            if all.is_empty() { vec![name(*i as u8)] } else { all[i % all.len()].0.clone() }
        }
        PathSel::InDir(d, n) => {
            let dirs = m.all_dirs();
            let mut p = dirs[d % dirs.len()].clone();
            p.push(name(*n));
            p
        }
        PathSel::Raw(v) => v.iter().map(|&n| name(n)).collect(),
        PathSel::WithXattrs(i) => {
            let with: Vec<_> = m.all_paths().into_iter().filter(|(_, c)| !m.inode(*c).xattrs.is_empty()).collect();
            if with.is_empty() { resolve(m, &PathSel::Existing(*i)) } else { with[i % with.len()].0.clone() }
        }
    }
}

/// Never zero, so written bytes tell themselves apart from holes.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i as u8).wrapping_mul(31) ^ seed ^ (i >> 8) as u8) | 1).collect()
}

fn show(p: &[String]) -> String {
    let short: Vec<String> =
        p.iter().map(|c| if c.len() > 8 { format!("{}x{}", &c[..1], c.len()) } else { c.clone() }).collect();
    format!("/{}", short.join("/"))
}

fn errno_name(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// Outcomes seen, per operation (`REFTEST_STATS=1` prints them): the
/// generator must reach both successes and each errno.
static OUTCOMES: std::sync::Mutex<BTreeMap<String, usize>> = std::sync::Mutex::new(BTreeMap::new());

/// Both sides must agree: both fine, or the same errno.
fn same<A: std::fmt::Debug, B: std::fmt::Debug>(what: &str, m: &Result<A, i32>, f: &Result<B, i32>) {
    let op = what.split(' ').next().unwrap_or(what);
    let outcome = match m {
        Ok(_) => "ok".to_string(),
        Err(e) => errno_name(*e).split(" (").next().unwrap_or_default().to_string(),
    };
    *OUTCOMES.lock().unwrap_or_else(|p| p.into_inner()).entry(format!("{op}: {outcome}")).or_default() += 1;
    match (m, f) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) if a == b => {}
        _ => panic!(
            "{what}: model says {:?}, filesystem says {:?}",
            m.as_ref().map_err(|e| errno_name(*e)),
            f.as_ref().map_err(|e| errno_name(*e))
        ),
    }
}

/// Keeps at most MAX_HANDLES open, closing the oldest on both sides.
fn make_room(m: &mut Model, f: &mut Driver) {
    while m.handles.len() >= MAX_HANDLES {
        m.close(0);
        f.close(0).expect("close");
    }
}

fn apply(m: &mut Model, f: &mut Driver, op: &Op) -> String {
    // The kernel follows a symlink before open or truncate, and refuses to
    // truncate a FIFO; neither reaches the core as such.
    let not_openable =
        |m: &Model, p: &[String]| m.lookup(p).is_ok_and(|i| matches!(m.kind(i), Kind::Symlink | Kind::Fifo));
    match op {
        Op::Create { path, excl, trunc } => {
            let p = resolve(m, path);
            make_room(m, f);
            let (a, b) = (m.create(&p, *excl, *trunc), f.create(&p, *excl, *trunc));
            let w = format!("create {} excl={excl} trunc={trunc}", show(&p));
            same(&w, &a, &b);
            w
        }
        Op::Open { path, write, trunc } => {
            let p = resolve(m, path);
            let w = format!("open {} write={write} trunc={trunc}", show(&p));
            if not_openable(m, &p) {
                return w + " (symlink or FIFO: skipped)";
            }
            make_room(m, f);
            same(&w, &m.open(&p, *write, *trunc), &f.open(&p, *write, *trunc));
            w
        }
        Op::Close { h } => {
            if m.handles.is_empty() {
                return "close (nothing open)".into();
            }
            let h = h % m.handles.len();
            m.close(h);
            same("close", &Ok::<(), i32>(()), &f.close(h));
            format!("close #{h}")
        }
        Op::Write { h, off, len, seed } => {
            let ws: Vec<usize> = (0..m.handles.len()).filter(|&i| m.handles[i].write).collect();
            if ws.is_empty() {
                return "write (no writable handle)".into();
            }
            let h = ws[h % ws.len()];
            let data = bytes(*len, *seed);
            m.write(h, *off, &data);
            let w = format!("write #{h} {off}+{len}");
            let r = f.write(h, *off, &data);
            same(&w, &Ok(()), &r);
            assert_eq!(r, Ok(*len as u32), "{w}: short write");
            w
        }
        Op::WritePath { path, off, len, seed } => {
            let p = resolve(m, path);
            let w = format!("write {} {off}+{len}", show(&p));
            if not_openable(m, &p) {
                return w + " (symlink or FIFO: skipped)";
            }
            let data = bytes(*len, *seed);
            let a = m.lookup(&p).and_then(|i| match m.kind(i) {
                Kind::Dir => Err(libc::EISDIR),
                _ => Ok(i),
            });
            if a.is_ok() {
                make_room(m, f);
                let h = m.open(&p, true, false).expect("open");
                m.write(h, *off, &data);
                m.close(h);
            }
            same(&w, &a, &f.write_path(&p, *off, &data));
            w
        }
        Op::Read { h, off, len } => {
            if m.handles.is_empty() {
                return "read (nothing open)".into();
            }
            let h = h % m.handles.len();
            let w = format!("read #{h} {off}+{len}");
            let want = m.read(h, *off, *len as usize);
            let got = f.read_fh(f.handles[h].0, *off, *len);
            assert!(got.as_ref() == Ok(&want), "{w}: got {:?}", got.map(|g| (g.len(), first_diff(&g, &want))));
            w
        }
        Op::Truncate { path, size } => {
            let p = resolve(m, path);
            let w = format!("truncate {} {size}", show(&p));
            if not_openable(m, &p) {
                return w + " (symlink or FIFO: skipped)";
            }
            same(&w, &m.truncate(&p, *size), &f.truncate(&p, *size));
            w
        }
        Op::Mkdir { path } => {
            let p = resolve(m, path);
            let w = format!("mkdir {}", show(&p));
            same(&w, &m.mkdir(&p), &f.mkdir(&p));
            w
        }
        Op::Rmdir { path } => {
            let p = resolve(m, path);
            let w = format!("rmdir {}", show(&p));
            same(&w, &m.rmdir(&p), &f.rmdir(&p));
            w
        }
        Op::Unlink { path } => {
            let p = resolve(m, path);
            let w = format!("unlink {}", show(&p));
            same(&w, &m.unlink(&p), &f.unlink(&p));
            w
        }
        Op::Mkfifo { path } => {
            let p = resolve(m, path);
            let w = format!("mkfifo {}", show(&p));
            same(&w, &m.mkfifo(&p), &f.mkfifo(&p));
            w
        }
        Op::Symlink { path, target } => {
            let p = resolve(m, path);
            let t = format!("../t{}/{}", target, "x".repeat(*target as usize % 90)).into_bytes();
            let w = format!("symlink {} -> {}", show(&p), String::from_utf8_lossy(&t));
            same(&w, &m.symlink(&p, &t), &f.symlink(&p, &t));
            w
        }
        Op::Link { from, to } => {
            let (a, b) = (resolve(m, from), resolve(m, to));
            let w = format!("link {} {}", show(&a), show(&b));
            same(&w, &m.link(&a, &b), &f.link(&a, &b));
            w
        }
        Op::Rename { from, to, flags } => {
            let (a, b) = (resolve(m, from), resolve(m, to));
            let w = format!("rename {} {} flags={flags}", show(&a), show(&b));
            same(&w, &m.rename(&a, &b, *flags), &f.rename(&a, &b, *flags));
            w
        }
        Op::SetXattr { path, name, len, seed, flags } => {
            let p = resolve(m, path);
            let (n, v) = (XATTRS[*name as usize % XATTRS.len()], bytes(*len, *seed));
            let w = format!("setxattr {} {n} len={len} flags={flags}", show(&p));
            same(&w, &m.setxattr(&p, n, &v, *flags), &f.setxattr(&p, n, &v, *flags));
            w
        }
        Op::RemoveXattr { path, name } => {
            let p = resolve(m, path);
            // Of an entry picked for its xattrs, one it has.
            let has: Vec<String> = match (path, m.lookup(&p)) {
                (PathSel::WithXattrs(_), Ok(i)) => m.inode(i).xattrs.keys().cloned().collect(),
                _ => Vec::new(),
            };
            let n = match has.is_empty() {
                true => XATTRS[*name as usize % XATTRS.len()],
                false => has[*name as usize % has.len()].as_str(),
            };
            let w = format!("removexattr {} {n}", show(&p));
            same(&w, &m.removexattr(&p, n), &f.removexattr(&p, n));
            w
        }
        Op::Lseek { h, off, data } => {
            if m.handles.is_empty() {
                return "lseek (nothing open)".into();
            }
            let h = h % m.handles.len();
            let whence = if *data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
            let w = format!("lseek #{h} {off} {}", if *data { "SEEK_DATA" } else { "SEEK_HOLE" });
            check_lseek(&w, m.data(m.handles[h].ino), *off, *data, f.block_size, f.lseek(h, *off, whence));
            w
        }
        Op::Fallocate { h, off, len, mode } => {
            let ws: Vec<usize> = (0..m.handles.len()).filter(|&i| m.handles[i].write).collect();
            if ws.is_empty() {
                return "fallocate (no writable handle)".into();
            }
            let h = ws[h % ws.len()];
            let w = format!("fallocate #{h} {off}+{len} mode={mode:#x}");
            m.fallocate(h, *off, *len, *mode);
            same(&w, &Ok(()), &f.fallocate(h, *off, *len, *mode));
            w
        }
        Op::CopyRange { from, off_in, to, off_out, len } => {
            let ws: Vec<usize> = (0..m.handles.len()).filter(|&i| m.handles[i].write).collect();
            if ws.is_empty() {
                return "copy_file_range (no writable handle)".into();
            }
            let (from, to) = (from % m.handles.len(), ws[to % ws.len()]);
            let w = format!("copy_file_range #{from} {off_in} -> #{to} {off_out} len={len}");
            let n = m.copy_range(from, *off_in, to, *off_out, *len);
            let r = f.copy_range(from, *off_in, to, *off_out, *len as u64);
            same(&w, &Ok(()), &r);
            assert_eq!(r, Ok(n as u32), "{w}: bytes copied");
            w
        }
        Op::Remount => {
            while !m.handles.is_empty() {
                m.close(0);
            }
            f.remount();
            "remount".into()
        }
    }
}

/// SEEK_DATA and SEEK_HOLE work in whole blocks (docs/SEMANTICS.md), so the
/// model cannot name the exact answer; it checks what must hold: past the
/// end is ENXIO, SEEK_DATA never skips a nonzero byte, and SEEK_HOLE lands
/// on a block that reads as zeros (or at the end).
fn check_lseek(w: &str, d: &[u8], off: u64, data: bool, bs: u64, got: Result<u64, i32>) {
    let size = d.len() as u64;
    let zero = |a: u64, b: u64| d[a as usize..b as usize].iter().all(|&x| x == 0);
    if off >= size {
        assert_eq!(got, Err(libc::ENXIO), "{w}: size {size}");
        return;
    }
    match (data, got) {
        (true, Ok(x)) => assert!(off <= x && x < size && zero(off, x), "{w}: SEEK_DATA gave {x}, size {size}"),
        (true, Err(libc::ENXIO)) => assert!(zero(off, size), "{w}: ENXIO but data follows"),
        (false, Ok(x)) => assert!(
            off <= x && x <= size && (x == size || zero(x, size.min((x / bs + 1) * bs))),
            "{w}: SEEK_HOLE gave {x}, size {size}"
        ),
        (_, r) => panic!("{w}: {r:?}"),
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or(if a.len() != b.len() { Some(a.len().min(b.len())) } else { None })
}

/// Model inode <-> filesystem inode, both ways: hard links share one, and
/// no two live model inodes share one.
#[derive(Default)]
struct Inos {
    to_fs: HashMap<Ino, u64>,
    to_model: HashMap<u64, Ino>,
}

impl Inos {
    fn bind(&mut self, at: &str, mi: Ino, fi: u64) {
        if let Some(&x) = self.to_fs.get(&mi) {
            assert_eq!(x, fi, "{at}: inode changed (or a hard link is a different inode)");
        }
        if let Some(&x) = self.to_model.get(&fi) {
            assert_eq!(x, mi, "{at}: two entries that are different files share inode {fi}");
        }
        self.to_fs.insert(mi, fi);
        self.to_model.insert(fi, mi);
    }

    fn sweep(&mut self, m: &Model) {
        self.to_fs.retain(|mi, _| m.inodes.contains_key(mi));
        self.to_model.retain(|_, mi| m.inodes.contains_key(mi));
    }
}

fn fs_kind(k: Kind) -> FsKind {
    match k {
        Kind::File => FsKind::File,
        Kind::Dir => FsKind::Dir,
        Kind::Symlink => FsKind::Symlink,
        Kind::Fifo => FsKind::Fifo,
    }
}

/// The whole tree, the open files and the cipher dir's bookkeeping.
fn check(m: &Model, f: &mut Driver, inos: &mut Inos, after: &str) {
    inos.sweep(m);
    inos.bind(after, ROOT, ROOT_INO);
    let mut stack = vec![(Vec::<String>::new(), ROOT, ROOT_INO, ROOT_INO)];
    while let Some((path, mi, fi, parent_fi)) = stack.pop() {
        let at = format!("after {after}: {}", show(&path));
        let (listed, dotdot) = f.list(fi).unwrap_or_else(|e| panic!("{at}: readdir: {}", errno_name(e)));
        assert_eq!(dotdot, parent_fi, "{at}: '..'");
        let got: BTreeMap<String, (FsKind, u64)> =
            listed.iter().map(|e| (e.name.to_string_lossy().into_owned(), (e.kind, e.ino))).collect();
        let want: Vec<(&String, FsKind)> = m.entries(mi).iter().map(|(n, &c)| (n, fs_kind(m.kind(c)))).collect();
        let got_names: Vec<(&String, FsKind)> = got.iter().map(|(n, (k, _))| (n, *k)).collect();
        assert_eq!(got_names, want, "{at}: listing");
        xattrs_match(m, f, &at, mi, fi);
        for (n, &c) in m.entries(mi) {
            let at = format!("{at}/{}", show(std::slice::from_ref(n)).trim_start_matches('/'));
            let a = f.lookup_in(fi, n).unwrap_or_else(|e| panic!("{at}: lookup: {}", errno_name(e)));
            inos.bind(&at, c, a.ino);
            assert_eq!(got[n].1, a.ino, "{at}: readdir and lookup disagree on the inode");
            assert_eq!(a.kind, fs_kind(m.kind(c)), "{at}: kind");
            assert_eq!(a.nlink, m.nlink(c), "{at}: link count");
            match &m.inode(c).body {
                Body::File(d) => {
                    assert_eq!(a.size, d.len() as u64, "{at}: size");
                    let back = f.read_all(a.ino, a.size).unwrap_or_else(|e| panic!("{at}: read: {}", errno_name(e)));
                    assert!(
                        back == *d,
                        "{at}: contents differ (len {} vs {}, first at {:?})",
                        back.len(),
                        d.len(),
                        first_diff(&back, d)
                    );
                    xattrs_match(m, f, &at, c, a.ino);
                }
                Body::Fifo => assert_eq!(a.size, 0, "{at}: FIFO size"),
                Body::Symlink(t) => {
                    assert_eq!(a.size, t.len() as u64, "{at}: symlink size");
                    assert_eq!(f.fs.readlink(a.ino).map_err(|e| e.errno()).as_ref(), Ok(t), "{at}: target");
                }
                Body::Dir(_) => stack.push((path.iter().cloned().chain([n.clone()]).collect(), c, a.ino, fi)),
            }
        }
    }
    // Open files, unlinked or not, read as the model says through their own handle.
    for (h, mh) in m.handles.iter().enumerate() {
        let at = format!("after {after}: handle #{h}");
        let (fh, fi) = f.handles[h];
        inos.bind(&at, mh.ino, fi);
        let d = m.data(mh.ino);
        assert_eq!(f.fs.getattr(fi).map(|a| a.size).map_err(|e| e.errno()), Ok(d.len() as u64), "{at}: size");
        let back = f.read_fh(fh, 0, d.len() as u32 + 10);
        assert!(back.as_deref() == Ok(d), "{at}: contents differ");
        if m.inode(mh.ino).links > 0 {
            assert_eq!(f.fs.getattr(fi).map(|a| a.nlink).map_err(|e| e.errno()), Ok(m.nlink(mh.ino)), "{at}: nlink");
        }
    }
    bookkeeping(f.cipher(), &format!("after {after}"));
    f.forget_all();
}

fn xattrs_match(m: &Model, f: &Driver, at: &str, mi: Ino, fi: u64) {
    let want: Vec<(String, Vec<u8>)> = m.inode(mi).xattrs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let got = f.xattrs(fi).unwrap_or_else(|e| panic!("{at}: xattrs: {}", errno_name(e)));
    assert!(got == want, "{at}: xattrs: got {:?}, want {:?}", names_of(&got), names_of(&want));
}

fn names_of(v: &[(String, Vec<u8>)]) -> Vec<(&str, usize)> {
    v.iter().map(|(n, x)| (n.as_str(), x.len())).collect()
}

/// Every long name's entry has its side file and every side file its
/// entry; no temporary is left behind.
fn bookkeeping(dir: &std::path::Path, at: &str) {
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for n in &names {
        assert!(!n.starts_with(kmsfs::names::TMP_PREFIX), "{at}: temporary {n} left in {}", dir.display());
        if n.starts_with("L.") {
            if let Some(entry) = n.strip_suffix(".name") {
                assert!(names.iter().any(|x| x == entry), "{at}: side file {n} without its entry in {}", dir.display());
            } else {
                let side = format!("{n}.name");
                assert!(names.contains(&side), "{at}: long name {n} without its side file in {}", dir.display());
            }
        }
        let p = dir.join(n);
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            bookkeeping(&p, at);
        }
    }
}

fn run(ops: &[Op], encrypted_names: bool, shared: bool) {
    let mut m = Model::new(!encrypted_names);
    let mut f = Driver::new(encrypted_names, shared);
    let mut inos = Inos::default();
    check(&m, &mut f, &mut inos, "start");
    for (i, op) in ops.iter().enumerate() {
        let what = apply(&mut m, &mut f, op);
        f.forget_all();
        check(&m, &mut f, &mut inos, &format!("op {i}: {what}"));
    }
    while !m.handles.is_empty() {
        m.close(0);
        f.close(0).expect("close");
    }
    check(&m, &mut f, &mut inos, "closing everything");
    f.finish();
}

/// Found by this test: rename(2) of one hard link over another of the
/// same inode succeeds and changes nothing, but the core removed the
/// source's long-name side file, so that name vanished from its directory.
#[test]
fn rename_of_a_hard_link_over_its_twin_keeps_both_names() {
    let (d, long) = (PathSel::Raw(vec![3]), PathSel::Raw(vec![4]));
    let ops = [
        Op::Create { path: d.clone(), excl: false, trunc: false },
        Op::Link { from: d.clone(), to: long.clone() },
        Op::Rename { from: long.clone(), to: d.clone(), flags: 0 },
        Op::Remount,
        Op::Rename { from: long, to: d, flags: 0 },
    ];
    run(&ops, true, false);
}

/// Found by this test: fallocate(FALLOC_FL_ZERO_RANGE) on a new, empty
/// file (or from past the end of one) failed with EIO for want of a key.
#[test]
fn zero_range_extends_an_empty_file() {
    let path = PathSel::Raw(vec![0]);
    let ops = [
        Op::Create { path, excl: false, trunc: false },
        Op::Fallocate { h: 0, off: 0, len: 1, mode: libc::FALLOC_FL_ZERO_RANGE },
        Op::Write { h: 0, off: 0, len: 10, seed: 1 },
        Op::Fallocate { h: 0, off: 5000, len: 100, mode: libc::FALLOC_FL_ZERO_RANGE },
        Op::Fallocate { h: 0, off: 3, len: 9000, mode: libc::FALLOC_FL_ZERO_RANGE },
    ];
    for (enc, shared) in [(false, false), (true, false), (true, true)] {
        run(&ops, enc, shared);
    }
}

#[test]
#[ignore = "prints what the generator reaches: REFTEST_STATS=1 cargo test --release --test reftest -- --ignored"]
fn outcomes() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: cases(), ..Default::default() });
    for enc in [false, true] {
        runner
            .run(&prop::collection::vec(op(), 1..60), |ops| {
                run(&ops, enc, false);
                Ok(())
            })
            .unwrap();
    }
    print_outcomes();
}

fn cases() -> u32 {
    std::env::var("REFTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(192)
}

fn print_outcomes() {
    if std::env::var_os("REFTEST_STATS").is_some() {
        for (k, n) in OUTCOMES.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            eprintln!("{k}: {n}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn plaintext_names_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, false, false);
    }

    #[test]
    fn encrypted_names_match_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, true, false);
    }

    /// `-o shared`: sizes, headers and keys re-read under the cross-mount
    /// update lock at every read and update (docs/SEMANTICS.md).
    #[test]
    fn shared_mode_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(&ops, true, true);
    }
}
