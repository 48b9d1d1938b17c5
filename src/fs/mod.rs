//! The filesystem logic, free of FUSE: inodes, handles and operations that
//! return `Result<_, FsError>`. `fuse.rs` translates to and from the kernel.
//!
//! Each inode holds an O_PATH descriptor of its backing file, so renames and
//! hard links need no path bookkeeping (as in libfuse's passthrough_hp), and
//! holding it keeps the backing inode number unique while the kernel knows it.
//!
//! This file holds the types, construction and the shared helpers; the
//! operations are split by family, as gocryptfs's fusefrontend is: `inodes`,
//! `attr`, `handles` (open state and keys), `open`, `entries`, `io`, `lock`,
//! `dir` and `xattr`. Directory-ID storage lives in `names::dirid`.

mod attr;
mod dir;
mod entries;
mod handles;
mod inodes;
mod io;
mod lock;
mod open;
mod xattr;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::FsError;
use crate::file::{APP_LOCK_END, EncryptedFile, FileError, KeyArg, KeyNeed, Scratch, UpdateLock, ofd_lock};
use crate::format::Id;
use crate::format::layout::Layout;
use crate::keys::cache::KeyCache;
use crate::keys::pool::KeyPool;
use crate::keys::{DataKey, FreshKey, KeyContext};
pub use crate::names::dirid::{LoadedId, load_dir_id, remove_dir_with_id, store_dir_id};
use crate::names::dirid::{replace_empty_dir, rewrite_dir_id};
use crate::names::{self, DirKey, NameError, Names, StoredName};
use crate::sys;
use crate::volume::CONFIG_NAME;

/// Inode number of the mount root, as FUSE expects.
pub const ROOT_INO: u64 = 1;
/// Reserved xattr on the root that returns live statistics as JSON.
pub const STATS_XATTR: &str = "user.kmsfs.stats";

/// Kinds of inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
    /// Character device.
    CharDev,
    /// Block device.
    BlockDev,
}

impl Kind {
    fn from_mode(mode: u32) -> Self {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Self::Dir,
            libc::S_IFLNK => Self::Symlink,
            libc::S_IFIFO => Self::Fifo,
            libc::S_IFSOCK => Self::Socket,
            libc::S_IFCHR => Self::CharDev,
            libc::S_IFBLK => Self::BlockDev,
            _ => Self::File,
        }
    }
}

/// Attributes of an inode, with the plaintext size.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    /// Inode number as the kernel sees it.
    pub ino: u64,
    /// Plaintext size.
    pub size: u64,
    /// 512-byte blocks allocated in the backing file.
    pub blocks: u64,
    /// Access time.
    pub atime: SystemTime,
    /// Modification time.
    pub mtime: SystemTime,
    /// Change time.
    pub ctime: SystemTime,
    /// Kind.
    pub kind: Kind,
    /// Permission bits (incl. setuid/setgid/sticky).
    pub perm: u16,
    /// Link count.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number.
    pub rdev: u32,
    /// Preferred I/O size.
    pub blksize: u32,
}

/// A time to set.
#[derive(Clone, Copy, Debug)]
pub enum SetTime {
    /// The current time.
    Now,
    /// A given time.
    At(SystemTime),
}

/// Who is asking (from the FUSE request).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// User ID.
    pub uid: u32,
    /// Group ID.
    pub gid: u32,
}

impl Caller {
    /// Whether a write or truncation by this caller keeps set-user-ID and
    /// set-group-ID bits. The kernel asks for CAP_FSETID; fuser does not pass
    /// capabilities, so root stands in for it.
    pub fn keeps_suid(&self) -> bool {
        self.uid == 0
    }
}

/// A directory entry.
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: OsString,
}

/// Options of a mounted filesystem.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Refuse every change.
    pub read_only: bool,
}

struct OpenState {
    enc: EncryptedFile,
    handles: usize,
    /// Handles open for writing; while there are any, `pin` holds the key.
    writers: usize,
    /// The key writers seal with, obtained when the first of them opened.
    /// The kernel acknowledges a write (writeback cache) before it reaches
    /// us, so the key must already be in hand then, and stay usable until
    /// the last writer closes: past the cache max age, through a KMS outage,
    /// after `disable-key`.
    pin: Option<Pin>,
}

/// A key held for a file's writers.
enum Pin {
    /// The key of the header with this file ID.
    Existing(Id, Arc<DataKey>),
    /// For an empty file: the key its first write will use, and when it was
    /// generated (an unused one goes back to the pool).
    Fresh(FreshKey, Instant),
}

impl OpenState {
    fn new(enc: EncryptedFile) -> Self {
        Self { enc, handles: 0, writers: 0, pin: None }
    }

    /// The pinned key, if it is the current header's.
    fn pinned(&self) -> Option<&Arc<DataKey>> {
        match (&self.pin, self.enc.header()) {
            (Some(Pin::Existing(id, k)), Some(h)) if h.file_id == *id => Some(k),
            _ => None,
        }
    }

    /// Whether writers can seal without asking the cache or the provider.
    fn pin_ready(&self) -> bool {
        match (&self.pin, self.enc.header()) {
            (Some(Pin::Fresh(..)), None) => true,
            (Some(Pin::Existing(..)), Some(_)) => self.pinned().is_some(),
            _ => false,
        }
    }
}

struct Node {
    ino: u64,
    fd: OwnedFd,
    kind: Kind,
    lookups: AtomicU64,
    /// (parent ino, name) of the last name we saw, for log lines and symlink utimens.
    name: Mutex<(u64, OsString)>,
    open: RwLock<Option<OpenState>>,
    /// Serializes minting the first key of an empty file, so concurrent
    /// first writes make one GenerateDataKey, not one each.
    first_key: Mutex<()>,
    /// Directories: the ID their children's names are encrypted with.
    dir_id: std::sync::OnceLock<DirKey>,
    /// Files: the file ID of the header when the last handle closed, so the
    /// data key can leave the cache as soon as the file is deleted.
    closed_file_id: Mutex<Option<Id>>,
    /// `-o shared`: one backing open file description per lock owner, which
    /// holds that owner's application locks (see `EncFs::setlk`).
    app_locks: Mutex<HashMap<u64, Arc<File>>>,
}

enum Handle {
    /// An open file, and whether this handle may write.
    File(Arc<Node>, bool),
    Dir(Vec<DirEntry>),
}

/// A directory whose ID record is being re-bound from parent `src` to `dest`.
struct DirMove {
    fd: OwnedFd,
    id: Id,
    src: Id,
    dest: Id,
}

/// Whether `caller` may access a file with `attr` for `want` (4 read,
/// 2 write), by its owner, group and other bits (root may always).
fn may_access(caller: Caller, attr: &Attr, want: u16) -> bool {
    if caller.uid == 0 {
        return true;
    }
    let bits = if attr.uid == caller.uid {
        attr.perm >> 6
    } else if attr.gid == caller.gid {
        attr.perm >> 3
    } else {
        attr.perm
    };
    bits & 7 & want == want
}

/// mkdir(2) masks setgid and sticky by umask rules; restores what was
/// asked, keeping a setgid bit inherited from the parent.
fn restore_dir_mode(fd: &OwnedFd, mode: u32) {
    if let Ok(st) = sys::fstat(fd.as_raw_fd())
        && (st.st_mode & 0o7777) != (mode & 0o7777)
    {
        let _ = sys::chmod(fd, (mode & 0o7777) | (st.st_mode & libc::S_ISGID));
    }
}

enum Obtained {
    None,
    Existing(Arc<DataKey>),
    Fresh(FreshKey, Instant),
}

/// A key taken from the pool for an operation that may fail or change its
/// mind before using it: given back unless taken out.
struct Lent<'a>(&'a KeyPool, Option<(FreshKey, Instant)>);

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some((k, born)) = self.1.take() {
            self.0.give_back(k, born);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}
fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

fn ts(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn timespec(t: Option<SetTime>) -> libc::timespec {
    match t {
        None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        Some(SetTime::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        Some(SetTime::At(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 },
            Err(e) => {
                let d = e.duration();
                let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if n < 0 {
                    s -= 1;
                    n += 1_000_000_000;
                }
                libc::timespec { tv_sec: s, tv_nsec: n }
            }
        },
    }
}

/// The filesystem.
pub struct EncFs {
    root_path: PathBuf,
    root_st_ino: u64,
    layout: Layout,
    volume_id: Id,
    keys: Arc<KeyCache>,
    pool: Arc<KeyPool>,
    opts: FsOptions,
    names: Arc<Names>,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    euid_root: bool,
    /// `-o shared`: other mounts of this cipher dir change files under us.
    shared: bool,
    /// Integrity log lines: rate-limited, with absolute paths.
    pub integrity_log: crate::error::IntegrityLog,
    /// Plaintext bytes served by read and accepted by write, for metrics.
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl EncFs {
    /// A filesystem over `cipherdir`.
    pub fn new(
        cipherdir: &Path,
        layout: Layout,
        volume_id: Id,
        keys: Arc<KeyCache>,
        pool: Arc<KeyPool>,
        names: Arc<Names>,
        opts: FsOptions,
    ) -> Result<Self, FsError> {
        let fd = sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::fstat(fd.as_raw_fd())?;
        let root = Arc::new(Node {
            ino: ROOT_INO,
            fd,
            kind: Kind::Dir,
            lookups: AtomicU64::new(1),
            name: Mutex::new((ROOT_INO, OsString::new())),
            open: RwLock::new(None),
            first_key: Mutex::new(()),
            dir_id: std::sync::OnceLock::new(),
            closed_file_id: Mutex::new(None),
            app_locks: Mutex::new(HashMap::new()),
        });
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_INO, root);
        let euid_root = sys::euid() == 0;
        Ok(Self {
            root_path: cipherdir.to_path_buf(),
            root_st_ino: st.st_ino,
            layout,
            volume_id,
            keys,
            pool,
            opts,
            names,
            nodes: RwLock::new(nodes),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            euid_root,
            shared: false,
            integrity_log: Default::default(),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    /// `-o shared`: the cipher dir is also mounted elsewhere (shared
    /// storage). Sizes then come from the backing file every time, every
    /// read and update of a file re-reads its size and header under the
    /// file's cross-mount update lock, and application locks are forwarded
    /// to the backing file (docs/SEMANTICS.md, "Shared mode").
    pub fn with_shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// Takes the update lock of an open file (`-o shared` only) and
    /// re-reads its size and header. The guard must be dropped before the
    /// open state can go (before the inode lock is released).
    fn sync_shared(&self, ino: u64, o: &mut OpenState, write: bool) -> Result<Option<UpdateLock>, FsError> {
        if !self.shared {
            return Ok(None);
        }
        let l = UpdateLock::take(o.enc.backing(), write)?;
        let old = o.enc.header().map(|h| h.file_id);
        // Another mount emptied (and maybe rewrote) the file: the old key
        // leaves the cache, as after a local truncation. The cache is keyed
        // by file ID, so the new header's key is fetched afresh.
        if o.enc.refresh().map_err(|e| self.file_error(ino, e))?
            && let Some(id) = old
        {
            self.keys.forget(&id);
        }
        Ok(Some(l))
    }

    /// The key cache (for stats and unmount).
    pub fn keys(&self) -> &Arc<KeyCache> {
        &self.keys
    }

    /// Drops every cached and pre-generated key (unmount).
    pub fn shutdown(&self) {
        self.pool.shutdown();
        self.keys.clear();
    }

    // Backing inode numbers become FUSE inode numbers; the backing root and
    // inode 1 swap places so the root is always 1.
    fn to_fuse_ino(&self, st_ino: u64) -> u64 {
        if st_ino == self.root_st_ino {
            ROOT_INO
        } else if st_ino == ROOT_INO {
            self.root_st_ino
        } else {
            st_ino
        }
    }

    fn node(&self, ino: u64) -> Result<Arc<Node>, FsError> {
        rlock(&self.nodes).get(&ino).cloned().ok_or(FsError::NotFound)
    }

    fn dir(&self, ino: u64) -> Result<Arc<Node>, FsError> {
        let n = self.node(ino)?;
        if n.kind != Kind::Dir {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
        }
        Ok(n)
    }

    /// Plaintext path of an inode, for log lines.
    pub fn path_of(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut cur = ino;
        let nodes = rlock(&self.nodes);
        for _ in 0..4096 {
            if cur == ROOT_INO {
                break;
            }
            let Some(n) = nodes.get(&cur) else { break };
            let (parent, name) = lock(&n.name).clone();
            // Names come from the cipher dir (or a user): never raw in a log.
            parts.push(names::escape(name.as_bytes()));
            cur = parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    fn check_name(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        if name.len() > 255 {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
        }
        if parent == ROOT_INO && !self.names.encrypted() && self.is_reserved(name) {
            return Err(FsError::Reserved);
        }
        Ok(())
    }

    fn is_reserved(&self, name: &OsStr) -> bool {
        let b = name.as_bytes();
        b == CONFIG_NAME.as_bytes() || names::is_reserved(b)
    }

    /// What a directory's children's names are bound to. Loaded once per
    /// node; the parent's key comes first, since an authenticated record
    /// verifies only under the parent the directory sits in.
    fn dir_key(&self, dir: &Node) -> Result<DirKey, FsError> {
        if dir.ino == ROOT_INO || !self.names.encrypted() {
            return Ok(DirKey::ROOT);
        }
        if let Some(k) = dir.dir_id.get() {
            return Ok(*k);
        }
        let parent = self.node(lock(&dir.name).0)?;
        let pk = self.dir_key(&parent)?;
        let loaded = load_dir_id(&dir.fd, &pk.id, &self.names, !self.opts.read_only).map_err(|e| {
            let path = self.path_of(dir.ino);
            tracing::error!(path = %path, "directory ID: {e}");
            FsError::Integrity { path, detail: format!("directory ID: {e}") }
        })?;
        if let Some(what) = &loaded.repaired {
            tracing::warn!(path = %self.path_of(dir.ino), "directory ID: {what}");
        }
        Ok(*dir.dir_id.get_or_init(|| loaded.key))
    }

    /// How `name` is stored in `parent`.
    /// EACCES while the provider refuses the name key (see
    /// `Names::set_revoked`); plaintext names need no key.
    fn names_usable(&self) -> Result<(), FsError> {
        match self.names.revoked() {
            Some(e) if self.names.encrypted() => Err(FsError::Key(e)),
            _ => Ok(()),
        }
    }

    fn stored(&self, parent: &Node, name: &OsStr) -> Result<StoredName, FsError> {
        self.names_usable()?;
        let key = self.dir_key(parent)?;
        self.names.encrypt(&key, name).map_err(|e| match e {
            NameError::TooLong => FsError::Io(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)),
            NameError::Undecryptable => FsError::Invalid,
        })
    }

    /// Makes sure a long name's side file holds its full encrypted name
    /// before the entry appears. The content is a function of the name, so a
    /// side file that already holds it (a rename over an existing entry) is
    /// left alone; otherwise it is replaced through a new temporary file
    /// (never rewritten in place: a crash would leave it empty, and a link
    /// planted under its name would be written through).
    fn write_side(&self, parent: &Node, s: &StoredName) -> Result<(), FsError> {
        if let (Some(side), Some(full)) = (s.side_file(), &s.long) {
            let pfd = parent.fd.as_raw_fd();
            if sys::read_regular(pfd, &side, names::SIDE_MAX).is_ok_and(|b| b == full.as_bytes()) {
                return Ok(());
            }
            sys::replace_file(pfd, &side, full.as_bytes(), 0o644)?;
            sys::fsync_dir(&parent.fd)?;
        }
        Ok(())
    }

    fn remove_side(&self, parent: &Node, s: &StoredName) {
        if let Some(side) = s.side_file() {
            let _ = sys::unlinkat(parent.fd.as_raw_fd(), &side, 0);
        }
    }

    fn writable(&self) -> Result<(), FsError> {
        if self.opts.read_only { Err(FsError::ReadOnly) } else { Ok(()) }
    }

    fn attr_of(&self, ino: u64, st: &libc::stat, node: Option<&Node>) -> Attr {
        let kind = Kind::from_mode(st.st_mode);
        let size = if kind == Kind::Symlink && self.names.encrypted() {
            // The plaintext target's length, as readlink(2) will return it.
            node.and_then(|n| sys::readlink(n.fd.as_raw_fd()).ok())
                .and_then(|t| self.names.decrypt_target(&t).ok())
                .map_or(st.st_size as u64, |t| t.len() as u64)
        } else if kind == Kind::File {
            // Shared: another mount may have changed it; the backing size says.
            let open = node.filter(|_| !self.shared).map(|n| rlock(&n.open).as_ref().map(|o| o.enc.size()));
            match open {
                Some(Some(s)) => s,
                _ => match self.layout.plain_size(st.st_size as u64) {
                    Ok(s) => s,
                    Err((s, _)) => s,
                },
            }
        } else {
            st.st_size as u64
        };
        Attr {
            ino,
            size,
            blocks: st.st_blocks as u64,
            atime: ts(st.st_atime, st.st_atime_nsec),
            mtime: ts(st.st_mtime, st.st_mtime_nsec),
            ctime: ts(st.st_ctime, st.st_ctime_nsec),
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: 4096,
        }
    }

    /// Paths, relative to the mount root, of the files that have open
    /// handles: under the writeback cache only these can hold dirty pages
    /// (close writes them back; an mmap keeps its handle open). A stop
    /// fsyncs each through the mount, which waits for their writeback on
    /// every kernel. A file unlinked while open is not found under its old
    /// name (or another file there is fsynced for nothing): nothing can
    /// reach its data once it is closed anyway.
    pub fn open_files(&self) -> Vec<PathBuf> {
        let mut inos: Vec<u64> = rlock(&self.handles)
            .values()
            .filter_map(|h| match &**h {
                Handle::File(n, _) => Some(n.ino),
                Handle::Dir(_) => None,
            })
            .collect();
        inos.sort_unstable();
        inos.dedup();
        let nodes = rlock(&self.nodes);
        inos.into_iter()
            .filter_map(|ino| {
                let mut parts = Vec::new();
                let mut cur = ino;
                while cur != ROOT_INO {
                    let (parent, name) = lock(&nodes.get(&cur)?.name).clone();
                    parts.push(name);
                    cur = parent;
                    if parts.len() > 4096 {
                        return None;
                    }
                }
                Some(parts.iter().rev().collect())
            })
            .collect()
    }

    /// Live statistics.
    pub fn stats_json(&self) -> serde_json::Value {
        let mut v = self.keys.stats().to_json();
        // `kmsfs unmount` of a busy mount asks this process to stop.
        v["pid"] = std::process::id().into();
        v["cache"]["size"] = self.keys.len().into();
        v["pool_ready"] = self.pool.ready().into();
        v["pool"] = self.pool.to_json();
        // The node table is released before any inode lock is taken: error
        // paths take them the other way round (file_error -> path_of).
        let files: Vec<Arc<Node>> = rlock(&self.nodes).values().filter(|n| n.kind == Kind::File).cloned().collect();
        v["keys_pinned"] =
            files.iter().filter(|n| rlock(&n.open).as_ref().is_some_and(|o| o.pin.is_some())).count().into();
        v["inodes"] = rlock(&self.nodes).len().into();
        v["handles"] = rlock(&self.handles).len().into();
        v["integrity_errors"] = self.integrity_log.total().into();
        v["bytes_read"] = self.bytes_read.load(Ordering::Relaxed).into();
        v["bytes_written"] = self.bytes_written.load(Ordering::Relaxed).into();
        v
    }
}
