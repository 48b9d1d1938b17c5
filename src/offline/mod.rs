//! Offline volume operations: encrypt, decrypt, inspect, fsck and rewrap.
//! No FUSE here; the CLI calls these and prints their results.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::file::{EncryptedFile, FileError, VerifyReport};
use crate::format::Id;
use crate::format::header::{FileHeader, KEY_SECTION};
use crate::format::layout::Layout;
use crate::keys::{KeyContext, KeyError, KeyProvider};
use crate::names::{DirKey, EntryKind, Names};
use crate::volume::CONFIG_NAME;

mod stream;
pub use stream::{decrypt_stream, encrypt_stream, inspect, peek_header};

/// Errors of offline operations.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is damaged or not a kmsfs file.
    #[error("{path}: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A key provider error.
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> OpError + '_ {
    // Backing names come from the cipher dir: escaped before they are printed.
    move |source| OpError::Io { path: crate::names::escape(path.as_os_str().as_bytes()), source }
}

/// A backing file and the plaintext path it shows up as.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path in the cipher dir.
    pub backing: PathBuf,
    /// The same path relative to the cipher dir (see [`open_backing`]).
    pub rel: PathBuf,
    /// Plaintext path relative to the mount root, escaped for printing.
    pub plain: String,
}

/// Opens a walked file again, resolving its path from the cipher dir
/// without following a symlink in any component, so a directory swapped
/// for a link while a long fsck or rewrap runs cannot send it outside the
/// cipher dir; and only if it is still a regular file.
pub fn open_backing(cipherdir: &Path, e: &Entry, write: bool) -> std::io::Result<File> {
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let p = crate::sys::open_beneath(root.as_raw_fd(), e.rel.as_os_str(), libc::O_PATH, 0)?;
    if crate::sys::fstat(p.as_raw_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
    Ok(File::from(crate::sys::reopen(&p, mode)?))
}

/// Problems with directories found while walking (encrypted names).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DirProblems {
    /// Directories whose ID could not be read, with the reason.
    pub bad_ids: Vec<(String, String)>,
    /// Directories whose missing ID copy was restored (with `repair`).
    pub repaired: Vec<String>,
    /// Entries whose names do not decrypt (hidden from the mount).
    pub undecryptable: Vec<String>,
    /// Directories whose ID record predates authenticated records (made by
    /// an older kmsfs): their ID can be copied to another directory
    /// undetected (docs/SECURITY.md).
    pub legacy_ids: Vec<String>,
}

/// A directory being walked: its descriptor, its path relative to the
/// cipher dir, its plaintext path and the key its children's names use
/// (`None` when its ID could not be read).
struct WalkDir {
    fd: OwnedFd,
    rel: PathBuf,
    plain: String,
    key: Option<DirKey>,
}

/// Every regular file of a cipher dir with its plaintext path, skipping
/// kmsfs's own files. With `repair`, restores a missing directory-ID copy
/// (only from a copy that authenticates, see `names::dirid::load_dir_id`) and removes
/// what crashes leave behind. Directories are walked through descriptors,
/// never by path, and no symlink is followed.
pub fn walk(cipherdir: &Path, names: &Names, repair: bool) -> Result<(Vec<Entry>, DirProblems), OpError> {
    use crate::names::escape;
    let mut out = Vec::new();
    let mut problems = DirProblems::default();
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    let mut stack = vec![WalkDir { fd: root, rel: PathBuf::new(), plain: String::new(), key: Some(DirKey::ROOT) }];
    while let Some(d) = stack.pop() {
        let here = cipherdir.join(&d.rel);
        let mut entries: Vec<_> = std::fs::read_dir(crate::sys::proc_path(&d.fd))
            .map_err(io_err(&here))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&here))?;
        entries.sort_by_key(|e| e.file_name());
        let at_root = d.rel.as_os_str().is_empty();
        for e in entries {
            let raw = e.file_name();
            let nb = raw.as_bytes();
            let rel = d.rel.join(&raw);
            let where_ = escape(rel.as_os_str().as_bytes());
            // d_type, or an lstat through the directory's descriptor.
            let ft = e.file_type().map_err(io_err(&cipherdir.join(&rel)))?;
            if at_root && nb == CONFIG_NAME.as_bytes() {
                continue;
            }
            // kmsfs writes temporary entries only where names are its own:
            // anywhere with encrypted names, only at the root with plaintext
            // names (elsewhere such a name is the user's).
            if nb.starts_with(crate::sys::TMP_PREFIX.as_bytes()) && (names.encrypted() || at_root) {
                // Left by a crash: a directory whose mkdir was cut short
                // (never visible, holds at most its ID), or the temporary
                // file of a bookkeeping write (never the only copy).
                if ft.is_dir() {
                    // Only as much as an unfinished mkdir can hold: anything
                    // else in it (a directory renamed there by whoever owns
                    // this one) is never deleted.
                    let gone = repair && crate::names::dirid::remove_dir_with_id(d.fd.as_raw_fd(), &raw).is_ok();
                    if gone {
                        problems.repaired.push(format!("{where_} (unfinished mkdir removed)"));
                    } else if !repair {
                        problems.bad_ids.push((where_, "unfinished mkdir left by a crash (run fsck --repair)".into()));
                    } else {
                        problems
                            .bad_ids
                            .push((where_, "looks like an unfinished mkdir but holds entries: left as it is".into()));
                    }
                } else if repair && crate::sys::unlinkat(d.fd.as_raw_fd(), &raw, 0).is_ok() {
                    problems.repaired.push(format!("{where_} (leftover temporary file removed)"));
                }
                continue;
            }
            let plain_name = if names.encrypted() {
                let Some(encoded) = names.stored_name(d.fd.as_raw_fd(), &raw) else { continue };
                let encoded = encoded.ok();
                match (encoded, d.key) {
                    (Some(enc), Some(k)) => names.decrypt(&k, &enc).ok().map(|n| escape(n.as_bytes())),
                    _ => None,
                }
            } else if at_root && crate::names::is_reserved(nb) {
                continue;
            } else {
                Some(escape(nb))
            };
            let shown = match &plain_name {
                Some(n) => format!("{}/{n}", d.plain),
                None => {
                    problems.undecryptable.push(where_.clone());
                    format!("{}/?{where_}", d.plain)
                }
            };
            if ft.is_dir() {
                let fd = crate::sys::open_beneath(d.fd.as_raw_fd(), &raw, libc::O_PATH | libc::O_DIRECTORY, 0)
                    .map_err(io_err(&cipherdir.join(&rel)))?;
                let key = match d.key {
                    _ if !names.encrypted() => Some(DirKey::ROOT),
                    // Its record can only be checked under its parent's ID.
                    None => None,
                    Some(pk) => match crate::names::dirid::load_dir_id(&fd, &pk.id, names, repair) {
                        Ok(l) => {
                            if l.repaired.is_some() {
                                problems.repaired.push(shown.clone());
                            } else if !l.complete {
                                let why = if repair {
                                    "one copy of the directory ID is missing or damaged, and nothing vouches for \
                                     the other (legacy ID, no entry decrypts under it)"
                                } else {
                                    "one copy of the directory ID is missing or damaged (run fsck --repair)"
                                };
                                problems.bad_ids.push((shown.clone(), why.into()));
                            }
                            if !l.key.bound {
                                problems.legacy_ids.push(shown.clone());
                            }
                            Some(l.key)
                        }
                        Err(err) => {
                            problems.bad_ids.push((shown.clone(), err.to_string()));
                            None
                        }
                    },
                };
                stack.push(WalkDir { fd, rel, plain: shown, key });
            } else if ft.is_file() {
                out.push(Entry { backing: cipherdir.join(&rel), rel, plain: shown });
            }
        }
    }
    out.sort_by(|a, b| a.plain.cmp(&b.plain));
    Ok((out, problems))
}

/// One damaged file in an fsck report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    /// Path relative to the cipher dir (names are plaintext in this version).
    pub path: String,
    /// What is wrong.
    pub error: String,
    /// Blocks failing authentication.
    pub bad_blocks: Vec<u64>,
}

/// One file that `fsck --repair` changed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Repaired {
    /// Plaintext path.
    pub path: String,
    /// Bytes cut from the end of the backing file.
    pub cut_bytes: u64,
    /// Stored blocks (whole or torn) among them.
    pub cut_blocks: u64,
    /// Blocks re-sealed in place (the new last block, stale last blocks).
    pub resealed: Vec<u64>,
}

/// What is wrong with a file, from its verify report; `None` if nothing.
fn damage_of(v: &VerifyReport, blocks: u64) -> Option<String> {
    if v.bad_size && blocks == 0 {
        Some(format!("torn tail: a header and {} bytes, no whole block (fsck --repair empties the file)", v.torn_bytes))
    } else if v.bad_size {
        Some(format!("torn tail: {} bytes past the last whole block (fsck --repair cuts them)", v.torn_bytes))
    } else if v.bad_blocks.last().is_some_and(|&b| b + 1 == blocks) {
        Some(
            "the last block fails authentication: a torn write or a cut file (fsck --repair cuts back to the \
             last authentic block)"
                .into(),
        )
    } else if !v.bad_blocks.is_empty() {
        Some("blocks failed authentication".into())
    } else {
        None
    }
}

/// fsck results.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FsckReport {
    /// Files checked.
    pub files: u64,
    /// Blocks checked.
    pub blocks: u64,
    /// Damaged files.
    pub damaged: Vec<Damage>,
    /// Files with all-zero (hole) blocks: path and block indexes.
    pub zeroed: Vec<(String, Vec<u64>)>,
    /// Files wrapped under a key this volume does not trust: path and the
    /// key their header names (never sent to KMS).
    pub foreign: Vec<(String, String)>,
    /// Files with stale last blocks, which an interrupted append or
    /// truncation leaves (they read as their data followed by zeros): path
    /// and block indexes.
    pub stale: Vec<(String, Vec<u64>)>,
    /// Files that `repair` changed.
    pub repaired: Vec<Repaired>,
    /// Directory and name problems (encrypted names).
    pub dirs: DirProblems,
}

/// How many files the offline tools (fsck, rewrap) work on at once. Each
/// holds at most one key-provider call in flight, so this is also the bound
/// on concurrent KMS calls: with ~10-50 ms per call, one call at a time
/// made 2,000 aws-kms files take 92 s to check.
pub const PARALLEL_FILES: usize = 16;

/// Progress of an offline pass over a volume.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Files done.
    pub files: u64,
    /// Files in all.
    pub files_total: u64,
    /// Backing bytes of the files done.
    pub bytes: u64,
    /// Backing bytes in all.
    pub bytes_total: u64,
}

/// Runs `work` on every item, `PARALLEL_FILES` at a time on scoped threads
/// (providers are blocking and `Sync`), and returns the results in the
/// items' order, so reports do not depend on timing. `done` runs on the
/// calling thread as each item finishes, with the item's index.
fn par_map<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync, mut done: impl FnMut(usize, &R)) -> Vec<R> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut workers = 0;
        for n in 0..PARALLEL_FILES.min(items.len()) {
            let (tx, next, work) = (tx.clone(), &next, &work);
            let spawned = std::thread::Builder::new().name(format!("kmsfs-ops-{n}")).spawn_scoped(s, move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if tx.send((i, work(item))).is_err() {
                        break;
                    }
                }
            });
            if spawned.is_ok() {
                workers += 1;
            }
        }
        drop(tx);
        for (i, r) in rx {
            done(i, &r);
            out[i] = Some(r);
        }
        // No thread could start: do the work here, one file at a time.
        if workers == 0 {
            for (i, item) in items.iter().enumerate() {
                let r = work(item);
                done(i, &r);
                out[i] = Some(r);
            }
        }
    });
    out.into_iter().flatten().collect()
}

/// The backing sizes of `files` (0 where a stat fails), for progress.
fn sizes(files: &[Entry]) -> Vec<u64> {
    files.iter().map(|e| std::fs::symlink_metadata(&e.backing).map_or(0, |m| m.len())).collect()
}

/// What fsck found in one file.
#[derive(Default)]
struct FileCheck {
    blocks: u64,
    damage: Option<(String, Vec<u64>)>,
    zeroed: Vec<u64>,
    stale: Vec<u64>,
    foreign: Option<String>,
    repaired: Option<Repaired>,
}

/// Verifies one file's header and blocks; with `repair`, also cuts a torn
/// tail back to the last authentic block and re-seals stale last blocks
/// (`EncryptedFile::repair`).
fn check_file(
    cipherdir: &Path,
    e: &Entry,
    layout: Layout,
    volume_id: Id,
    provider: &dyn KeyProvider,
    repair: bool,
) -> FileCheck {
    let mut c = FileCheck::default();
    let damage = |error: String, bad: Vec<u64>| FileCheck { damage: Some((error, bad)), ..Default::default() };
    // Through the walked directory, never following a link that was
    // swapped in since the walk.
    let f = match open_backing(cipherdir, e, repair) {
        Ok(f) => f,
        Err(e) => return damage(e.to_string(), vec![]),
    };
    let mut enc = match EncryptedFile::open(f, layout, volume_id) {
        Ok(e) => e,
        Err(e) => return damage(e.to_string(), vec![]),
    };
    let Some(h) = enc.header() else { return c };
    let ctx = KeyContext::file(h.volume_id, h.file_id);
    let key = match provider.unwrap(&h.wrapped, &ctx) {
        Ok(k) => k,
        Err(KeyError::Untrusted { found }) => return FileCheck { foreign: Some(found), ..Default::default() },
        Err(e) => return damage(format!("header: {e}"), vec![]),
    };
    let mut v = match enc.verify(&key) {
        Ok(v) => v,
        Err(FileError::Header(e)) => return damage(format!("header: {e}"), vec![]),
        Err(e) => return damage(e.to_string(), vec![]),
    };
    let mut not_repaired = None;
    let tail_bad = v.bad_blocks.last().is_some_and(|&b| b + 1 == layout.block_count(enc.size()));
    if repair && (v.bad_size || tail_bad || !v.stale_blocks.is_empty()) {
        match enc.repair(&key, &v) {
            Ok(done) => {
                c.repaired = Some(Repaired {
                    path: e.plain.clone(),
                    cut_bytes: done.cut_bytes,
                    cut_blocks: done.cut_blocks,
                    resealed: done.resealed,
                });
                v = match enc.verify(&key) {
                    Ok(v) => v,
                    Err(err) => return FileCheck { damage: Some((err.to_string(), vec![])), ..c },
                };
            }
            Err(err) => not_repaired = Some(err.to_string()),
        }
    }
    c.blocks = layout.block_count(enc.size());
    if let Some(what) = damage_of(&v, c.blocks) {
        let what = match not_repaired {
            Some(why) => format!("{what}; not repaired: {why}"),
            None => what,
        };
        c.damage = Some((what, v.bad_blocks));
    }
    c.zeroed = v.zero_blocks;
    c.stale = v.stale_blocks;
    c
}

/// Verifies every header and every block of every file, `PARALLEL_FILES`
/// files at a time.
pub fn fsck(
    cipherdir: &Path,
    layout: Layout,
    volume_id: Id,
    provider: &dyn KeyProvider,
    names: &Names,
    repair: bool,
    mut progress: impl FnMut(Progress),
) -> Result<FsckReport, OpError> {
    let (files, dirs) = walk(cipherdir, names, repair)?;
    let mut r = FsckReport { dirs, ..Default::default() };
    let sizes = sizes(&files);
    let mut pr = Progress { files_total: files.len() as u64, bytes_total: sizes.iter().sum(), ..Default::default() };
    progress(pr);
    let checks = par_map(
        &files,
        |e| check_file(cipherdir, e, layout, volume_id, provider, repair),
        |i, _| {
            pr.files += 1;
            pr.bytes += sizes[i];
            progress(pr);
        },
    );
    for (e, c) in files.into_iter().zip(checks) {
        r.files += 1;
        r.blocks += c.blocks;
        if let Some(found) = c.foreign {
            r.foreign.push((e.plain, found));
            continue;
        }
        if let Some(x) = c.repaired {
            r.repaired.push(x);
        }
        if !c.stale.is_empty() {
            r.stale.push((e.plain.clone(), c.stale));
        }
        if let Some((error, bad_blocks)) = c.damage {
            r.damaged.push(Damage { path: e.plain.clone(), error, bad_blocks });
        }
        if !c.zeroed.is_empty() {
            r.zeroed.push((e.plain, c.zeroed));
        }
    }
    Ok(r)
}

/// rewrap results.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RewrapReport {
    /// Files re-wrapped now.
    pub rewrapped: u64,
    /// Files already under the target key (a resumed run).
    pub already: u64,
    /// Empty files (no header).
    pub empty: u64,
    /// Files that failed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// What rewrap did with one file.
enum Rewrapped {
    Empty,
    Already,
    Done,
}

/// Re-wraps every header's DEK under `dest`'s key, `PARALLEL_FILES` files
/// at a time. Data blocks are not touched. Each header update is one pwrite
/// inside the first 512-byte sector (header slots are at most 512 bytes),
/// followed by fsync. A dry run is `rewrap_plan`, which calls no provider.
pub fn rewrap(
    cipherdir: &Path,
    layout: Layout,
    source: &dyn KeyProvider,
    dest: &dyn KeyProvider,
    names: &Names,
    mut progress: impl FnMut(Progress),
) -> Result<RewrapReport, OpError> {
    let files = walk(cipherdir, names, false)?.0;
    let dest_key = dest.key_id();
    let sizes = sizes(&files);
    let mut pr = Progress { files_total: files.len() as u64, bytes_total: sizes.iter().sum(), ..Default::default() };
    progress(pr);
    let one = |e: &Entry| -> Result<Rewrapped, OpError> {
        let (p, rel) = (&e.backing, &e.plain);
        // Beneath the cipher dir: never through a link swapped in since the walk.
        let f = open_backing(cipherdir, e, true).map_err(io_err(p))?;
        if f.metadata().map_err(io_err(p))?.len() == 0 {
            return Ok(Rewrapped::Empty);
        }
        let mut buf = vec![0u8; layout.header_size() as usize];
        f.read_exact_at(&mut buf, 0).map_err(io_err(p))?;
        let mut h = FileHeader::parse(&buf, buf.len())
            .map_err(|e| OpError::Corrupt { path: rel.clone(), detail: e.to_string() })?;
        if h.wrapped.key_id == dest_key && h.wrapped.provider == dest.name() {
            return Ok(Rewrapped::Already);
        }
        let ctx = KeyContext::file(h.volume_id, h.file_id);
        let new = if source.name() == dest.name() && dest.name() != crate::keys::local::NAME {
            dest.rewrap(&h.wrapped, &ctx)?
        } else {
            let key = source.unwrap(&h.wrapped, &ctx)?;
            h.verify(&key).map_err(|e| OpError::Corrupt { path: rel.clone(), detail: e.to_string() })?;
            dest.wrap(&key, &ctx)?
        };
        h.wrapped = new;
        let section =
            h.key_section_bytes().map_err(|e| OpError::Corrupt { path: rel.clone(), detail: e.to_string() })?;
        // The KMS call took time: under a per-file lock, check that the
        // header is still the one we re-wrapped before overwriting it.
        f.lock().map_err(io_err(p))?;
        let mut now = vec![0u8; buf.len()];
        f.read_exact_at(&mut now, 0).map_err(io_err(p))?;
        if now[..KEY_SECTION] != buf[..KEY_SECTION] {
            return Err(OpError::Corrupt {
                path: rel.clone(),
                detail: "the file changed during rewrap (new file ID); run rewrap again".into(),
            });
        }
        f.write_all_at(&section, KEY_SECTION as u64).map_err(io_err(p))?;
        f.sync_data().map_err(io_err(p))?;
        Ok(Rewrapped::Done)
    };
    let results = par_map(&files, one, |i, _| {
        pr.files += 1;
        pr.bytes += sizes[i];
        progress(pr);
    });
    let mut r = RewrapReport::default();
    for (e, res) in files.into_iter().zip(results) {
        match res {
            Ok(Rewrapped::Done) => r.rewrapped += 1,
            Ok(Rewrapped::Already) => r.already += 1,
            Ok(Rewrapped::Empty) => r.empty += 1,
            Err(err) => r.failed.push((e.plain, err.to_string())),
        }
    }
    Ok(r)
}

/// `rewrap --dry-run`: reads the headers only and makes no key-provider
/// call, so it works without the key and changes nothing. Names are not
/// decrypted (that needs the name key), so it counts backing files: those
/// whose header names `dest_key` (if known) are already done, the other
/// kmsfs files would be re-wrapped, and the rest (empty files, kmsfs's own
/// name and directory-ID files) are counted as `empty`.
pub fn rewrap_plan(cipherdir: &Path, layout: Layout, dest_key: Option<&str>) -> Result<RewrapReport, OpError> {
    let mut r = RewrapReport::default();
    let mut stack = vec![cipherdir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let p = e.path();
            let ft = e.file_type().map_err(io_err(&p))?;
            if dir == cipherdir && crate::names::is_reserved(e.file_name().as_encoded_bytes()) {
                continue;
            }
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let mut buf = vec![0u8; layout.header_size() as usize];
            let header = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&p)
                .and_then(|f| f.read_exact_at(&mut buf, 0))
                .ok()
                .and_then(|()| FileHeader::parse(&buf, buf.len()).ok());
            match header {
                None => r.empty += 1,
                Some(h) if dest_key.is_some_and(|k| k == h.wrapped.key_id) => r.already += 1,
                Some(_) => r.rewrapped += 1,
            }
        }
    }
    Ok(r)
}

/// The key the children of directory `fd` use, given its parent's.
fn child_key(fd: &OwnedFd, parent: &DirKey, names: &Names, shown: &Path) -> Result<DirKey, OpError> {
    if !names.encrypted() {
        return Ok(DirKey::ROOT);
    }
    crate::names::dirid::load_dir_id(fd, &parent.id, names, false).map(|l| l.key).map_err(io_err(shown))
}

/// Maps a plaintext path (relative to the mount root) to its backing path.
pub fn plain_to_backing(cipherdir: &Path, plain: &Path, names: &Names) -> Result<PathBuf, OpError> {
    let mut fd = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    let mut cur = cipherdir.to_path_buf();
    let mut key = DirKey::ROOT;
    let parts: Vec<_> = plain
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for (i, name) in parts.iter().enumerate() {
        let s = names
            .encrypt(&key, name)
            .map_err(|e| OpError::Corrupt { path: plain.display().to_string(), detail: e.to_string() })?;
        cur.push(&s.on_disk);
        if i + 1 < parts.len() {
            fd = crate::sys::open_beneath(fd.as_raw_fd(), &s.on_disk, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err(&cur))?;
            key = child_key(&fd, &key, names, &cur)?;
        }
    }
    Ok(cur)
}

/// Maps a backing path (relative to the cipher dir) to its plaintext path.
pub fn backing_to_plain(cipherdir: &Path, backing: &Path, names: &Names) -> Result<PathBuf, OpError> {
    let rel = backing.strip_prefix(cipherdir).unwrap_or(backing);
    let mut fd = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    let mut cur = cipherdir.to_path_buf();
    let mut out = PathBuf::from("/");
    let mut key = DirKey::ROOT;
    let parts: Vec<_> = rel
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for (i, raw) in parts.iter().enumerate() {
        // A reserved name is taken as it is and fails to decrypt below.
        let encoded = names
            .stored_name(fd.as_raw_fd(), raw)
            .unwrap_or_else(|| Ok(raw.as_encoded_bytes().to_vec()))
            .map_err(io_err(&cur.join(raw)))?;
        let name = names.decrypt(&key, &encoded).map_err(|e| OpError::Corrupt {
            path: crate::names::escape(cur.join(raw).as_os_str().as_bytes()),
            detail: e.to_string(),
        })?;
        out.push(name);
        cur.push(raw);
        if i + 1 < parts.len() {
            fd = crate::sys::open_beneath(fd.as_raw_fd(), raw, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err(&cur))?;
            key = child_key(&fd, &key, names, &cur)?;
        }
    }
    Ok(out)
}

/// What [`upgrade_dir_ids`] did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UpgradeReport {
    /// Directories whose legacy ID record became an authenticated one.
    pub upgraded: Vec<String>,
    /// Entries renamed to names under the authenticated label.
    pub renamed: u64,
    /// Directories left as they were, with the reason (an unreadable ID,
    /// or entries whose names decrypt under neither label).
    pub skipped: Vec<(String, String)>,
}

/// Gives every directory that still has a legacy (unauthenticated, 16-byte)
/// ID record an authenticated one: renames its entries to their names under
/// the "name2" label, then writes the new record bound to its parent's ID.
/// For `kmsfs upgrade`: offline, under the cipher-dir lock, on a host the
/// user trusts, since the legacy IDs found are taken as they are. An
/// interrupted run leaves a directory's already renamed entries hidden until
/// the next run, which recognises them and finishes.
pub fn upgrade_dir_ids(cipherdir: &Path, names: &Names) -> Result<UpgradeReport, OpError> {
    use crate::names::escape;
    let mut r = UpgradeReport::default();
    if !names.encrypted() {
        return Ok(r);
    }
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    // Each directory with its parent's ID, which its record is bound to.
    let root = WalkDir { fd: root, rel: PathBuf::new(), plain: String::new(), key: Some(DirKey::ROOT) };
    let mut stack = vec![(root, crate::names::ROOT_DIR_ID)];
    while let Some((mut d, parent)) = stack.pop() {
        let here = cipherdir.join(&d.rel);
        let Some(key) = d.key else { continue };
        let at_root = d.rel.as_os_str().is_empty();
        if !at_root && !key.bound {
            match upgrade_one(&d.fd, &key, &parent, names) {
                Ok(n) => {
                    r.renamed += n;
                    r.upgraded.push(d.plain.clone());
                    d.key = Some(DirKey { id: key.id, bound: true });
                }
                Err(e) => {
                    r.skipped.push((d.plain.clone(), e.to_string()));
                    continue;
                }
            }
        }
        let Some(key) = d.key else { continue };
        let entries: Vec<_> = std::fs::read_dir(crate::sys::proc_path(&d.fd))
            .map_err(io_err(&here))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&here))?;
        for e in entries {
            let raw = e.file_name();
            if !e.file_type().map_err(io_err(&here.join(&raw)))?.is_dir() || names.classify(&raw) == EntryKind::Internal
            {
                continue;
            }
            let Some(plain) = entry_name(&d.fd, &raw, &key, names) else { continue };
            let fd = crate::sys::open_beneath(d.fd.as_raw_fd(), &raw, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err(&here.join(&raw)))?;
            let shown = format!("{}/{}", d.plain, escape(plain.as_bytes()));
            let child = match crate::names::dirid::load_dir_id(&fd, &key.id, names, false) {
                Ok(l) => Some(l.key),
                Err(err) => {
                    r.skipped.push((shown.clone(), err.to_string()));
                    None
                }
            };
            stack.push((WalkDir { fd, rel: d.rel.join(&raw), plain: shown, key: child }, key.id));
        }
    }
    Ok(r)
}

/// The plaintext name of entry `raw` of a directory, under `key`.
fn entry_name(dir: &OwnedFd, raw: &std::ffi::OsStr, key: &DirKey, names: &Names) -> Option<std::ffi::OsString> {
    let encoded = names.stored_name(dir.as_raw_fd(), raw)?.ok()?;
    names.decrypt(key, &encoded).ok()
}

/// Renames the entries of one legacy directory to their authenticated-label
/// names (a long name's new side file first, its old one last), then writes
/// its authenticated record. Returns how many entries were renamed.
fn upgrade_one(dir: &OwnedFd, legacy: &DirKey, parent: &crate::format::Id, names: &Names) -> std::io::Result<u64> {
    let bound = DirKey { id: legacy.id, bound: true };
    let fd = dir.as_raw_fd();
    let mut renamed = 0;
    for e in std::fs::read_dir(crate::sys::proc_path(dir))? {
        let raw = e?.file_name();
        if names.classify(&raw) == EntryKind::Internal || entry_name(dir, &raw, &bound, names).is_some() {
            continue; // bookkeeping, or renamed by an interrupted run
        }
        let Some(plain) = entry_name(dir, &raw, legacy, names) else {
            return Err(std::io::Error::other(format!(
                "entry {} decrypts under neither label; left as it is",
                crate::names::escape(raw.as_bytes())
            )));
        };
        let new = names.encrypt(&bound, &plain).map_err(std::io::Error::other)?;
        if let (Some(side), Some(full)) = (new.side_file(), &new.long) {
            crate::sys::replace_file(fd, &side, full.as_bytes(), 0o644)?;
            crate::sys::fsync_dir(dir)?;
        }
        crate::sys::renameat2(fd, &raw, fd, &new.on_disk, libc::RENAME_NOREPLACE)?;
        if names.classify(&raw) == EntryKind::Long {
            let _ = crate::sys::unlinkat(fd, &crate::names::side_file_of(&raw), 0);
        }
        renamed += 1;
    }
    crate::sys::fsync_dir(dir)?;
    crate::names::dirid::store_dir_id(dir, &names.dir_record(&bound.id, &[parent]))?;
    Ok(renamed)
}

#[cfg(test)]
mod par_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::keys::local::LocalProvider;
    use crate::keys::{DataKey, WrappedKey};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Delegates to a local provider, counting the unwraps in flight.
    struct Slow {
        inner: LocalProvider,
        now: AtomicUsize,
        max: AtomicUsize,
    }

    impl KeyProvider for Slow {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn key_id(&self) -> String {
            self.inner.key_id()
        }
        fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError> {
            self.inner.generate(ctx)
        }
        fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
            self.inner.wrap(key, ctx)
        }
        fn unwrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            // Long enough that the workers overlap, as KMS calls do.
            std::thread::sleep(std::time::Duration::from_millis(30));
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.unwrap(wrapped, ctx)
        }
        fn rewrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
            self.inner.rewrap(wrapped, ctx)
        }
        fn check(&self) -> Result<(), KeyError> {
            self.inner.check()
        }
    }

    #[test]
    fn fsck_keeps_parallel_files_unwraps_in_flight_and_reports_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let cipher = tmp.path().join("c");
        std::fs::create_dir(&cipher).unwrap();
        let p = Slow {
            inner: LocalProvider::create_key_file(&tmp.path().join("k")).unwrap(),
            now: AtomicUsize::new(0),
            max: AtomicUsize::new(0),
        };
        let layout = Layout::new(crate::volume::LOCAL_HEADER_SIZE, 12).unwrap();
        let vid = crate::format::random_id().unwrap();
        let n = 3 * PARALLEL_FILES;
        for i in 0..n {
            let mut out = File::create(cipher.join(format!("f{i:03}"))).unwrap();
            encrypt_stream(&mut &vec![i as u8; 5000 + i][..], &mut out, layout, vid, &p.inner).unwrap();
        }
        // Damage one file in the middle: the report names it, in order.
        let victim = cipher.join("f020");
        let mut b = std::fs::read(&victim).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&victim, b).unwrap();
        let mut seen = Vec::new();
        let r = fsck(&cipher, layout, vid, &p, &crate::names::Names::plaintext(), false, |pr| seen.push(pr)).unwrap();
        assert_eq!(r.files, n as u64);
        assert_eq!(r.damaged.len(), 1);
        assert_eq!(r.damaged[0].path, "/f020");
        assert_eq!(p.max.load(Ordering::SeqCst), PARALLEL_FILES, "unwraps in flight");
        let end = seen.last().unwrap();
        assert_eq!((end.files, end.files_total), (n as u64, n as u64));
        assert_eq!(end.bytes, end.bytes_total);
        assert!(end.bytes_total > (n * 5000) as u64);
    }
}
