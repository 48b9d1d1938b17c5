//! The filesystem logic, free of FUSE: inodes, handles and operations that
//! return `Result<_, FsError>`. `fuse.rs` translates to and from the kernel.
//!
//! Each inode holds an O_PATH descriptor of its backing file, so renames and
//! hard links need no path bookkeeping (as in libfuse's passthrough_hp), and
//! holding it keeps the backing inode number unique while the kernel knows it.

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

    /// Looks up `name` in `parent`, adding one kernel reference.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        if parent == ROOT_INO && !self.names.encrypted() && self.is_reserved(name) {
            return Err(FsError::NotFound);
        }
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        let fd = sys::open_path(p.fd.as_raw_fd(), &s.on_disk)
            .map_err(|e| if e.raw_os_error() == Some(libc::ENOENT) { FsError::NotFound } else { FsError::Io(e) })?;
        self.adopt(parent, name, fd)
    }

    fn adopt(&self, parent: u64, name: &OsStr, fd: OwnedFd) -> Result<Attr, FsError> {
        let st = sys::fstat(fd.as_raw_fd())?;
        let ino = self.to_fuse_ino(st.st_ino);
        let node = {
            let mut nodes = wlock(&self.nodes);
            match nodes.get(&ino) {
                Some(n) => {
                    n.lookups.fetch_add(1, Ordering::Relaxed);
                    *lock(&n.name) = (parent, name.to_owned());
                    n.clone()
                }
                None => {
                    let n = Arc::new(Node {
                        ino,
                        fd,
                        kind: Kind::from_mode(st.st_mode),
                        lookups: AtomicU64::new(1),
                        name: Mutex::new((parent, name.to_owned())),
                        open: RwLock::new(None),
                        first_key: Mutex::new(()),
                        dir_id: std::sync::OnceLock::new(),
                        closed_file_id: Mutex::new(None),
                        app_locks: Mutex::new(HashMap::new()),
                    });
                    nodes.insert(ino, n.clone());
                    n
                }
            }
        };
        Ok(self.attr_of(ino, &st, Some(&node)))
    }

    /// Drops `n` kernel references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let gone = {
            let mut nodes = wlock(&self.nodes);
            let Some(node) = nodes.get(&ino) else { return };
            let prev = node.lookups.fetch_sub(n.min(node.lookups.load(Ordering::Relaxed)), Ordering::Relaxed);
            if prev <= n { nodes.remove(&ino) } else { None }
        };
        // Closing the last descriptor of an unlinked file frees its backing
        // inode, which takes longer than the table update: do it after the
        // lock is released so lookups and other requests do not queue behind it.
        if let Some(node) = gone {
            // The kernel forgets a deleted file right after the unlink (or
            // the last close): its data key need not wait for LRU or max age.
            if let Some(id) = lock(&node.closed_file_id).take()
                && sys::fstat(node.fd.as_raw_fd()).is_ok_and(|st| st.st_nlink == 0)
            {
                self.keys.forget(&id);
            }
        }
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.node_attr(ino, &*self.node(ino)?)
    }

    /// The attributes of a node already in hand, fresh from the backing file.
    fn node_attr(&self, ino: u64, n: &Node) -> Result<Attr, FsError> {
        let st = sys::fstat(n.fd.as_raw_fd())?;
        Ok(self.attr_of(ino, &st, Some(n)))
    }

    /// The kernel's flush of its cached mtime/ctime (writeback cache only),
    /// which it sends after every write-back and after every unlink. Once the
    /// last link is gone nobody can look the file up again and open handles
    /// see the kernel's own times, so the backing utimensat is skipped: one
    /// syscall less per deleted file.
    pub fn flush_times(&self, ino: u64, mtime: Option<SetTime>) -> Result<Attr, FsError> {
        let n = self.node(ino)?;
        if n.kind == Kind::File {
            let st = sys::fstat(n.fd.as_raw_fd())?;
            if st.st_nlink == 0 {
                return Ok(self.attr_of(ino, &st, Some(&n)));
            }
        }
        self.writable()?;
        self.set_times(&n, None, mtime)?;
        self.node_attr(ino, &n)
    }

    /// utimensat on the backing entry (through the parent for a symlink,
    /// which has no descriptor that utimensat follows).
    fn set_times(&self, n: &Node, atime: Option<SetTime>, mtime: Option<SetTime>) -> Result<(), FsError> {
        let times = [timespec(atime), timespec(mtime)];
        if n.kind == Kind::Symlink {
            let (parent, name) = lock(&n.name).clone();
            let p = self.node(parent)?;
            let s = self.stored(&p, &name)?;
            sys::utimens(p.fd.as_raw_fd(), &s.on_disk, &times, true)?;
        } else {
            sys::utimens(libc::AT_FDCWD, sys::proc_path(&n.fd).as_os_str(), &times, false)?;
        }
        Ok(())
    }

    /// chmod / chown / truncate / utimens. A truncation by `caller` clears
    /// set-ID bits as the kernel's does (see `clear_set_id`) unless the same
    /// request sets the mode.
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: u64,
        caller: Caller,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    ) -> Result<Attr, FsError> {
        self.writable()?;
        let n = self.node(ino)?;
        if let Some(size) = size {
            if n.kind == Kind::Dir {
                return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EISDIR)));
            }
            if mode.is_none() && !caller.keeps_suid() {
                self.clear_set_id(&n)?;
            }
            self.truncate(&n, size)?;
        }
        if let Some(mode) = mode
            && n.kind != Kind::Symlink
        {
            sys::chmod(&n.fd, mode & 0o7777)?;
        }
        if uid.is_some() || gid.is_some() {
            sys::chown(n.fd.as_raw_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if atime.is_some() || mtime.is_some() {
            self.set_times(&n, atime, mtime)?;
        }
        self.node_attr(ino, &n)
    }

    fn reopen(&self, n: &Node, write: bool) -> Result<File, FsError> {
        let path = sys::proc_path(&n.fd);
        let rw = std::fs::OpenOptions::new().read(true).write(true).open(&path);
        match rw {
            Ok(f) => Ok(f),
            // A read-only backing file (non-root daemon): reads still work.
            Err(e) if !write && e.raw_os_error() == Some(libc::EACCES) => {
                Ok(std::fs::OpenOptions::new().read(true).open(&path)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn open_enc(&self, n: &Node, write: bool) -> Result<EncryptedFile, FsError> {
        let f = self.reopen(n, write)?;
        // Shared: never read a header another mount is writing. The lock is
        // taken through a duplicate, which outlives it.
        let dup = if self.shared { Some(f.try_clone()?) } else { None };
        let _l = match &dup {
            Some(d) => Some(UpdateLock::take(d, false)?),
            None => None,
        };
        EncryptedFile::open(f, self.layout, self.volume_id).map_err(|e| self.file_error(n.ino, e))
    }

    /// Logs an integrity error once, naming the plaintext path, and maps it.
    fn file_error(&self, ino: u64, e: FileError) -> FsError {
        let err = FsError::from_file(e, || self.path_of(ino));
        if let FsError::Integrity { path, detail } = &err {
            self.integrity_log.log(path, detail);
        }
        err
    }

    fn obtain(&self, need: &KeyNeed, fresh_if_empty: bool) -> Result<Obtained, FsError> {
        match need {
            KeyNeed::Empty if fresh_if_empty => {
                let (k, born) = self.pool.take_dated()?;
                Ok(Obtained::Fresh(k, born))
            }
            KeyNeed::Empty => Ok(Obtained::None),
            KeyNeed::Existing(h) => {
                let ctx = KeyContext::file(h.volume_id, h.file_id);
                Ok(Obtained::Existing(self.keys.get(&h.wrapped, &ctx)?))
            }
        }
    }

    /// Hands back a key no writer holds any more: an unused fresh key goes
    /// back to the pool; an existing one stays only in the cache.
    fn unpin(&self, pin: Pin) {
        if let Pin::Fresh(k, born) = pin {
            self.pool.give_back(k, born);
        }
    }

    /// Runs a mutating file operation with the right key: the writers' pinned
    /// key if there is one, else fetched without holding the inode lock;
    /// retries if the file changed meanwhile.
    fn with_key_mut<T>(
        &self,
        n: &Node,
        fresh_if_empty: bool,
        mut op: impl FnMut(&mut EncryptedFile, Option<KeyArg<'_>>) -> Result<T, FileError>,
    ) -> Result<T, FsError> {
        {
            let mut g = wlock(&n.open);
            let Some(o) = g.as_mut() else { return Err(FsError::BadHandle) };
            let _l = self.sync_shared(n.ino, o, true)?;
            if let Some(r) = self.with_pin(o, fresh_if_empty, &mut op) {
                return r.map_err(|e| self.file_error(n.ino, e));
            }
        }
        for _ in 0..8 {
            let mut need = match rlock(&n.open).as_ref() {
                Some(o) => o.enc.key_need(),
                None => return Err(FsError::BadHandle),
            };
            let _gate = if need == KeyNeed::Empty && fresh_if_empty {
                let g = lock(&n.first_key);
                // Another writer may have minted the key while we waited.
                need = match rlock(&n.open).as_ref() {
                    Some(o) => o.enc.key_need(),
                    None => return Err(FsError::BadHandle),
                };
                Some(g)
            } else {
                None
            };
            let got = self.obtain(&need, fresh_if_empty)?;
            let mut g = wlock(&n.open);
            let Some(o) = g.as_mut() else { return Err(FsError::BadHandle) };
            let l = self.sync_shared(n.ino, o, true)?;
            if o.enc.key_need() != need {
                drop(l);
                drop(g);
                if let Obtained::Fresh(k, born) = got {
                    self.pool.give_back(k, born);
                }
                continue;
            }
            let arg = match &got {
                Obtained::None => None,
                Obtained::Existing(k) => Some(KeyArg::Existing(k)),
                Obtained::Fresh(f, _) => Some(KeyArg::Fresh(f)),
            };
            let res = op(&mut o.enc, arg).map_err(|e| self.file_error(n.ino, e));
            let header_id = o.enc.header().map(|h| h.file_id);
            let key = match got {
                Obtained::Fresh(f, _) if header_id == Some(f.file_id) => Some(self.keys.insert(f.file_id, f.key)),
                Obtained::Fresh(f, born) => {
                    self.pool.give_back(f, born);
                    None
                }
                Obtained::Existing(k) => Some(k),
                Obtained::None => None,
            };
            // Writers that lost their pin (a race with truncation) get it back.
            let mut old = None;
            if let (Some(id), Some(k)) = (header_id, key)
                && o.writers > 0
                && !o.pin_ready()
            {
                old = o.pin.replace(Pin::Existing(id, k));
            }
            drop(l);
            drop(g);
            if let Some(p) = old {
                self.unpin(p);
            }
            return res;
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// Runs `op` under the inode lock with the writers' pinned key, if it fits
    /// the file as it is now; `None` if there is no such key.
    fn with_pin<T>(
        &self,
        o: &mut OpenState,
        fresh_if_empty: bool,
        op: &mut impl FnMut(&mut EncryptedFile, Option<KeyArg<'_>>) -> Result<T, FileError>,
    ) -> Option<Result<T, FileError>> {
        match o.pin.take() {
            Some(Pin::Existing(id, k)) if o.enc.header().is_some_and(|h| h.file_id == id) => {
                let r = op(&mut o.enc, Some(KeyArg::Existing(&k)));
                o.pin = Some(Pin::Existing(id, k));
                Some(r)
            }
            Some(Pin::Fresh(f, born)) if fresh_if_empty && o.enc.header().is_none() => {
                let r = op(&mut o.enc, Some(KeyArg::Fresh(&f)));
                o.pin = Some(if o.enc.header().is_some_and(|h| h.file_id == f.file_id) {
                    Pin::Existing(f.file_id, self.keys.insert(f.file_id, f.key))
                } else {
                    Pin::Fresh(f, born)
                });
                Some(r)
            }
            other => {
                o.pin = other;
                None
            }
        }
    }

    /// Gives the writers of `n` the file's key before their open returns, so
    /// that no write is acknowledged that cannot be sealed: the current
    /// header's key from the cache or KMS, or for an empty file a fresh one
    /// (`fresh` if given, else from the pool or KMS). Fails, with nothing
    /// pinned, if the key cannot be had within the provider's retry budget.
    fn pin_key(&self, n: &Node, fresh: Option<(FreshKey, Instant)>) -> Result<(), FsError> {
        let mut fresh = Lent(&self.pool, fresh);
        for _ in 0..8 {
            let need = {
                let g = rlock(&n.open);
                let o = g.as_ref().ok_or(FsError::BadHandle)?;
                if o.pin_ready() || o.writers == 0 {
                    return Ok(());
                }
                o.enc.key_need()
            };
            let got = match &need {
                KeyNeed::Empty => {
                    let (k, born) = match fresh.1.take() {
                        Some(f) => f,
                        None => self.pool.take_dated()?,
                    };
                    Pin::Fresh(k, born)
                }
                KeyNeed::Existing(h) => {
                    let ctx = KeyContext::file(h.volume_id, h.file_id);
                    Pin::Existing(h.file_id, self.keys.get(&h.wrapped, &ctx)?)
                }
            };
            let mut g = wlock(&n.open);
            let o = g.as_mut().ok_or(FsError::BadHandle)?;
            if o.enc.key_need() == need && !o.pin_ready() && o.writers > 0 {
                let old = o.pin.replace(got);
                drop(g);
                if let Some(p) = old {
                    self.unpin(p);
                }
                return Ok(());
            }
            // Changed meanwhile: keep a fresh key for the next round.
            if let Pin::Fresh(k, born) = got {
                fresh.1 = Some((k, born));
            }
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// Attaches open state to a node (shared by all its handles); `writer`
    /// counts a handle that may write.
    fn attach(&self, n: &Arc<Node>, write: bool, writer: bool) -> Result<(), FsError> {
        self.attach_with(n, write, writer, None)
    }

    /// Like `attach`, reusing an already open backing descriptor if given
    /// (create), which saves a reopen through /proc.
    fn attach_with(&self, n: &Arc<Node>, write: bool, writer: bool, file: Option<File>) -> Result<(), FsError> {
        let mut g = wlock(&n.open);
        let o = match g.as_mut() {
            Some(o) => o,
            None => {
                let enc = match file {
                    Some(f) => {
                        EncryptedFile::open(f, self.layout, self.volume_id).map_err(|e| self.file_error(n.ino, e))?
                    }
                    None => self.open_enc(n, write)?,
                };
                if self.shared {
                    // Another mount emptied and rewrote the file since its last
                    // close here: the key of the header it had then goes.
                    let mut closed = lock(&n.closed_file_id);
                    if let Some(old) = *closed
                        && enc.header().is_none_or(|h| h.file_id != old)
                    {
                        self.keys.forget(&old);
                        *closed = None;
                    }
                }
                g.insert(OpenState::new(enc))
            }
        };
        o.handles += 1;
        o.writers += usize::from(writer);
        Ok(())
    }

    fn detach(&self, n: &Node, writer: bool) {
        let mut g = wlock(&n.open);
        let mut unpinned = None;
        if let Some(o) = g.as_mut() {
            o.handles = o.handles.saturating_sub(1);
            if writer {
                o.writers = o.writers.saturating_sub(1);
                if o.writers == 0 {
                    // The last writer is gone: from now on the cache's max age
                    // and the provider decide, so revocation takes effect.
                    unpinned = o.pin.take();
                }
            }
            if o.handles == 0 {
                *lock(&n.closed_file_id) = o.enc.header().map(|h| h.file_id);
                *g = None;
            }
        }
        drop(g);
        if let Some(p) = unpinned {
            self.unpin(p);
        }
    }

    fn truncate(&self, n: &Arc<Node>, size: u64) -> Result<(), FsError> {
        if size == 0 {
            return self.truncate_to_zero(n, false);
        }
        self.attach(n, true, false)?;
        let r = self.with_key_mut(n, true, |enc, key| enc.set_len(key, size));
        self.detach(n, false);
        r
    }

    /// Empties a file without its old key (O_TRUNC, truncate(0)): an
    /// overwrite must work when the key is disabled, KMS is unreachable or
    /// the header is damaged. If the file has writers after this (or
    /// `new_writer` is one more), they get a fresh key first, so when none
    /// can be had nothing has changed. With `new_writer` the caller's handle
    /// is attached as a writer.
    fn truncate_to_zero(&self, n: &Arc<Node>, new_writer: bool) -> Result<(), FsError> {
        let (writers, ready) = match rlock(&n.open).as_ref() {
            Some(o) => (o.writers, matches!(o.pin, Some(Pin::Fresh(..))) && o.enc.header().is_none()),
            None => (0, false),
        };
        let mut fresh =
            Lent(&self.pool, if (new_writer || writers > 0) && !ready { Some(self.pool.take_dated()?) } else { None });
        let mut g = wlock(&n.open);
        let o = match g.as_mut() {
            Some(o) => {
                let _l = if self.shared { Some(UpdateLock::take(o.enc.backing(), true)?) } else { None };
                if let Some(h) = o.enc.header() {
                    self.keys.forget(&h.file_id);
                }
                o.enc.set_len(None, 0).map_err(|e| self.file_error(n.ino, e))?;
                o
            }
            None => g.insert(OpenState::new(self.open_emptied(n)?)),
        };
        if new_writer {
            o.handles += 1;
            o.writers += 1;
        }
        let mut old = None;
        if o.writers == 0 {
            old = o.pin.take();
        } else if let Some((k, born)) = fresh.1.take() {
            old = o.pin.replace(Pin::Fresh(k, born));
        }
        if o.handles == 0 {
            *lock(&n.closed_file_id) = None;
            *g = None;
        }
        drop(g);
        if let Some(p) = old {
            self.unpin(p);
        }
        Ok(())
    }

    /// Opens the backing file of an unopened node emptied. The header is
    /// read first only to drop the old key from the cache; if it does not
    /// parse (damaged, foreign), the file is emptied all the same.
    fn open_emptied(&self, n: &Node) -> Result<EncryptedFile, FsError> {
        let f = self.reopen(n, true)?;
        // Shared: taken through a duplicate, which outlives it.
        let dup = if self.shared { Some(f.try_clone()?) } else { None };
        let _l = match &dup {
            Some(d) => Some(UpdateLock::take(d, true)?),
            None => None,
        };
        if let Ok(mut enc) = EncryptedFile::open(f, self.layout, self.volume_id) {
            if let Some(h) = enc.header() {
                self.keys.forget(&h.file_id);
            }
            enc.set_len(None, 0).map_err(|e| self.file_error(n.ino, e))?;
            return Ok(enc);
        }
        let f = self.reopen(n, true)?;
        f.set_len(0)?;
        EncryptedFile::open(f, self.layout, self.volume_id).map_err(|e| self.file_error(n.ino, e))
    }

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        wlock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        rlock(&self.handles).get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    fn file_handle(&self, fh: u64) -> Result<Arc<Node>, FsError> {
        match &*self.handle(fh)? {
            Handle::File(n, _) => Ok(n.clone()),
            Handle::Dir(_) => Err(FsError::BadHandle),
        }
    }

    /// Opens a file; `flags` are open(2) flags.
    pub fn open(&self, ino: u64, flags: i32, caller: Caller) -> Result<u64, FsError> {
        let n = self.node(ino)?;
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if write {
            self.writable()?;
        }
        if n.kind == Kind::Dir {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EISDIR)));
        }
        let trunc = flags & libc::O_TRUNC != 0 && write;
        if trunc && !caller.keeps_suid() {
            self.clear_set_id(&n)?;
        }
        if trunc {
            // Needs no old key: the file is emptied, and its writers get a fresh one.
            self.truncate_to_zero(&n, true)?;
        } else {
            self.attach(&n, write, write)?;
            if self.shared {
                // Close-to-open: what other mounts wrote and closed is seen now.
                let mut g = wlock(&n.open);
                if let Some(o) = g.as_mut()
                    && let Err(e) = self.sync_shared(n.ino, o, false)
                {
                    drop(g);
                    self.detach(&n, write);
                    return Err(e);
                }
            }
            // No write without a key: a writer holds it from open to release.
            // Read-only opens stay lazy (the first read fetches it).
            if write && let Err(e) = self.pin_key(&n, None) {
                self.detach(&n, true);
                return Err(e);
            }
        }
        Ok(self.new_handle(Handle::File(n, write)))
    }

    /// Gives an entry this request just made to the caller, as the kernel
    /// would: a root daemon creates everything as root. A setgid parent
    /// passes on its group instead. `kind` (an S_IF* type) is what was made.
    ///
    /// Whoever owns the backing directory can swap another entry in under
    /// the new name between its creation and this call (a hard link to
    /// someone else's file, a directory of theirs). So the entry must still
    /// be what was made: that type, one link (two for a directory), owned by
    /// the daemon; anything else is refused rather than handed over.
    fn set_owner(&self, fd: &OwnedFd, kind: u32, parent: &Node, caller: Caller) -> Result<(), FsError> {
        if !self.euid_root {
            return Ok(());
        }
        if caller.uid == 0 && caller.gid == 0 {
            // Created as root by root: the backing filesystem already chose
            // the right owner and group (setgid parents included).
            return Ok(());
        }
        let st = sys::fstat(fd.as_raw_fd())?;
        let links: libc::nlink_t = if kind == libc::S_IFDIR { 2 } else { 1 };
        if st.st_mode & libc::S_IFMT != kind || st.st_nlink != links || st.st_uid != 0 {
            let path = self.path_of(parent.ino);
            tracing::error!(dir = %path, "a new entry was replaced in the backing directory before its owner was set");
            return Err(FsError::Integrity { path, detail: "new entry replaced in the backing directory".into() });
        }
        let pst = sys::fstat(parent.fd.as_raw_fd())?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 { pst.st_gid } else { caller.gid };
        sys::chown(fd.as_raw_fd(), caller.uid, gid)?;
        Ok(())
    }

    /// Clears set-user-ID, and set-group-ID on a group-executable file, as
    /// the kernel does when a caller without CAP_FSETID writes, truncates,
    /// fallocates or copies into a file. The kernel leaves this to us
    /// (FUSE_HANDLE_KILLPRIV_V2, which spares a security.capability GETXATTR
    /// on every write), and the backing file system keeps the bits because
    /// the daemon writes as root. Callers have checked the mount is writable.
    fn clear_set_id(&self, n: &Node) -> Result<(), FsError> {
        if n.kind != Kind::File {
            return Ok(());
        }
        let mode = sys::fstat(n.fd.as_raw_fd())?.st_mode & 0o7777;
        let mut keep = mode & !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            keep &= !libc::S_ISGID;
        }
        if keep != mode {
            sys::chmod(&n.fd, keep)?;
        }
        Ok(())
    }

    /// Creates and opens a regular file. The backing file is always created
    /// with O_EXCL, so the file chowned to the caller and handed over is the
    /// one this call made, never one that was already there.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64), FsError> {
        self.writable()?;
        self.check_name(parent, name)?;
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        // No write without a key: a new file's key is in hand before its
        // entry exists, so a create that cannot have one (pool empty and KMS
        // unreachable) fails with nothing left behind.
        let mut fresh = Lent(&self.pool, Some(self.pool.take_dated()?));
        self.write_side(&p, &s)?;
        let made =
            sys::open_beneath(p.fd.as_raw_fd(), &s.on_disk, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, mode & 0o7777);
        let f = match made {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                return self.create_existing(parent, name, flags, caller);
            }
            Err(e) => {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    self.remove_side(&p, &s);
                }
                return Err(e.into());
            }
        };
        self.set_owner(&f, libc::S_IFREG, &p, caller)?;
        let attr = self.adopt(parent, name, sys::path_of_fd(&f)?)?;
        let n = self.node(attr.ino)?;
        self.attach_with(&n, true, true, Some(File::from(f)))?;
        // The file is new and empty: it takes the fresh key.
        if let Err(e) = self.pin_key(&n, fresh.1.take()) {
            self.detach(&n, true);
            return Err(e);
        }
        let fh = self.new_handle(Handle::File(n.clone(), true));
        Ok((attr, fh))
    }

    /// A create(2) without O_EXCL found the name taken: the entry appeared
    /// after the kernel's lookup (another mount of this cipher dir, or a
    /// write to the cipher dir itself). Opens it as open(2) would, with the
    /// permission check the kernel skipped because it believed the name was
    /// free (owner, group and other bits; the caller's supplementary groups
    /// are not known here, so they grant nothing).
    fn create_existing(&self, parent: u64, name: &OsStr, flags: i32, caller: Caller) -> Result<(Attr, u64), FsError> {
        let attr = self.lookup(parent, name)?;
        let opened = (|| {
            let errno = |e| Err(FsError::Io(std::io::Error::from_raw_os_error(e)));
            match attr.kind {
                Kind::File => {}
                Kind::Dir => return errno(libc::EISDIR),
                _ => return errno(libc::EEXIST),
            }
            let acc = flags & libc::O_ACCMODE;
            let read = if acc != libc::O_WRONLY { 4 } else { 0 };
            let write = if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 { 2 } else { 0 };
            if !may_access(caller, &attr, read | write) {
                return errno(libc::EACCES);
            }
            self.open(attr.ino, (flags & !libc::O_CREAT & !libc::O_EXCL) | libc::O_RDWR, caller)
        })();
        match opened {
            Ok(fh) => Ok((self.getattr(attr.ino)?, fh)),
            Err(e) => {
                self.forget(attr.ino, 1);
                Err(e)
            }
        }
    }

    /// Runs `make` to create entry `s` in `p`, with the long-name side file
    /// written first and removed again if the entry could not be made.
    fn make_entry(&self, p: &Node, s: &StoredName, make: impl FnOnce() -> std::io::Result<()>) -> Result<(), FsError> {
        self.write_side(p, s)?;
        if let Err(e) = make() {
            if e.raw_os_error() != Some(libc::EEXIST) {
                self.remove_side(p, s);
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// mknod: regular files, FIFOs and sockets.
    pub fn mknod(&self, parent: u64, name: &OsStr, mode: u32, rdev: u32, caller: Caller) -> Result<Attr, FsError> {
        self.writable()?;
        self.check_name(parent, name)?;
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        self.make_entry(&p, &s, || sys::mknodat(p.fd.as_raw_fd(), &s.on_disk, mode, rdev.into()))?;
        let fd = sys::open_path(p.fd.as_raw_fd(), &s.on_disk)?;
        let kind = if mode & libc::S_IFMT == 0 { libc::S_IFREG } else { mode & libc::S_IFMT };
        self.set_owner(&fd, kind, &p, caller)?;
        self.adopt(parent, name, fd)
    }

    /// mkdir. With encrypted names the directory is built under a temporary
    /// name, complete with both copies of its ID record, its mode and its
    /// owner, then renamed into place, so a visible directory always has its
    /// ID, and everything is done through the descriptor of the directory
    /// this call made.
    pub fn mkdir(&self, parent: u64, name: &OsStr, mode: u32, caller: Caller) -> Result<Attr, FsError> {
        self.writable()?;
        self.check_name(parent, name)?;
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        let pfd = p.fd.as_raw_fd();
        let fd = if !self.names.encrypted() {
            sys::mkdirat(pfd, &s.on_disk, mode & 0o7777)?;
            let fd = sys::open_beneath(pfd, &s.on_disk, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            self.set_owner(&fd, libc::S_IFDIR, &p, caller)?;
            restore_dir_mode(&fd, mode);
            fd
        } else {
            let pk = self.dir_key(&p)?;
            let mut id =
                crate::format::random_id().map_err(|_| FsError::Io(std::io::Error::from_raw_os_error(libc::EIO)))?;
            id[0] |= 1; // never the root's all-zero ID
            let tmp = sys::temp_name()?;
            sys::mkdirat(pfd, &tmp, 0o700)?;
            let built = (|| -> Result<OwnedFd, FsError> {
                let d = sys::open_beneath(pfd, &tmp, libc::O_PATH | libc::O_DIRECTORY, 0)?;
                // Root-owned and 0700 until here, so nobody else can have
                // put anything in it.
                store_dir_id(&d, &self.names.dir_record(&id, &[&pk.id]))?;
                // A setgid parent's bit stays, as mkdir(2) keeps it.
                let inherited = sys::fstat(d.as_raw_fd())?.st_mode & libc::S_ISGID;
                sys::chmod(&d, (mode & 0o7777) | inherited)?;
                self.set_owner(&d, libc::S_IFDIR, &p, caller)?;
                restore_dir_mode(&d, mode);
                self.make_entry(&p, &s, || sys::renameat2(pfd, &tmp, pfd, &s.on_disk, libc::RENAME_NOREPLACE))?;
                Ok(d)
            })();
            match built {
                Ok(d) => d,
                Err(e) => {
                    let _ = remove_dir_with_id(pfd, &tmp);
                    return Err(e);
                }
            }
        };
        let _ = sys::fsync_dir(&p.fd);
        self.adopt(parent, name, fd)
    }

    /// symlink; the target is encrypted with encrypted names.
    pub fn symlink(&self, parent: u64, name: &OsStr, target: &OsStr, caller: Caller) -> Result<Attr, FsError> {
        self.writable()?;
        self.check_name(parent, name)?;
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        let t = self.names.encrypt_target(target);
        self.make_entry(&p, &s, || sys::symlinkat(&t, p.fd.as_raw_fd(), &s.on_disk))?;
        let fd = sys::open_path(p.fd.as_raw_fd(), &s.on_disk)?;
        self.set_owner(&fd, libc::S_IFLNK, &p, caller)?;
        self.adopt(parent, name, fd)
    }

    /// readlink.
    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let n = self.node(ino)?;
        let t = sys::readlink(n.fd.as_raw_fd())?;
        self.names.decrypt_target(&t).map_err(|_| {
            let path = self.path_of(ino);
            tracing::error!(path = %path, "symlink target does not decrypt");
            FsError::Integrity { path, detail: "symlink target does not decrypt".into() }
        })
    }

    /// link: a new name for an existing inode.
    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr, FsError> {
        self.writable()?;
        self.check_name(newparent, newname)?;
        let n = self.node(ino)?;
        let p = self.dir(newparent)?;
        let s = self.stored(&p, newname)?;
        self.make_entry(&p, &s, || sys::link_fd(&n.fd, p.fd.as_raw_fd(), &s.on_disk))?;
        let fd = sys::open_path(p.fd.as_raw_fd(), &s.on_disk)?;
        self.adopt(newparent, newname, fd)
    }

    /// unlink.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.writable()?;
        self.check_name(parent, name)?;
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        sys::unlinkat(p.fd.as_raw_fd(), &s.on_disk, 0)?;
        self.remove_side(&p, &s);
        Ok(())
    }

    /// rmdir. With encrypted names a directory that holds only bookkeeping
    /// files is empty; see `remove_dir_with_id`.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        self.writable()?;
        self.check_name(parent, name)?;
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        if self.names.encrypted() {
            remove_dir_with_id(p.fd.as_raw_fd(), &s.on_disk)?;
        } else {
            sys::unlinkat(p.fd.as_raw_fd(), &s.on_disk, libc::AT_REMOVEDIR)?;
        }
        self.remove_side(&p, &s);
        Ok(())
    }

    /// Before a rename that takes directories to another parent: makes each
    /// one's authenticated ID record valid under both parents, so it
    /// verifies wherever the rename (or a crash) leaves it. `dirs_moved`
    /// then keeps only the parent it ended up in. Empty for renames within
    /// one directory, which leave every record as it is.
    fn dirs_moving(
        &self,
        p: &Node,
        from: &StoredName,
        q: &Node,
        to: &StoredName,
        exchange: bool,
    ) -> Result<Vec<DirMove>, FsError> {
        if p.ino == q.ino || !self.names.encrypted() {
            return Ok(Vec::new());
        }
        let (pk, qk) = (self.dir_key(p)?, self.dir_key(q)?);
        let mut sides = vec![(p, from, pk.id, qk.id)];
        if exchange {
            sides.push((q, to, qk.id, pk.id));
        }
        let mut moves = Vec::new();
        for (dir, entry, src, dest) in sides {
            let Ok(d) = sys::open_beneath(dir.fd.as_raw_fd(), &entry.on_disk, libc::O_PATH | libc::O_DIRECTORY, 0)
            else {
                continue; // not a directory (or gone: the rename will say)
            };
            // Only a record valid here is extended; anything else moves as it is.
            let Ok(loaded) = load_dir_id(&d, &src, &self.names, false) else { continue };
            if !loaded.key.bound {
                continue;
            }
            let id = loaded.key.id;
            if let Err(e) = rewrite_dir_id(&d, &self.names.dir_record(&id, &[&src, &dest]), true, true) {
                self.dirs_moved(moves, false);
                return Err(e.into());
            }
            moves.push(DirMove { fd: d, id, src, dest });
        }
        Ok(moves)
    }

    /// After the rename: each moved directory's record keeps the tag of the
    /// parent it is now in (`done`), or of the one it stayed in. A failure
    /// here leaves a record valid under both, which the next load trims.
    fn dirs_moved(&self, moves: Vec<DirMove>, done: bool) {
        for m in moves {
            let keep = if done { m.dest } else { m.src };
            if let Err(e) = rewrite_dir_id(&m.fd, &self.names.dir_record(&m.id, &[&keep]), true, true) {
                tracing::warn!("cannot finish a moved directory's ID record ({e}); it is trimmed when next loaded");
            }
        }
    }

    /// rename, with RENAME_NOREPLACE and RENAME_EXCHANGE passed through.
    /// A directory keeps its ID when moved, so no child is re-encrypted; one
    /// that replaces an empty directory goes through `replace_empty_dir`.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), FsError> {
        self.writable()?;
        self.check_name(parent, name)?;
        self.check_name(newparent, newname)?;
        let (p, q) = (self.dir(parent)?, self.dir(newparent)?);
        let (from, to) = (self.stored(&p, name)?, self.stored(&q, newname)?);
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if !exchange {
            // Side files are keyed by stored name, so an exchange needs none.
            self.write_side(&q, &to)?;
        }
        let moving = self.dirs_moving(&p, &from, &q, &to, exchange)?;
        let (pfd, qfd) = (p.fd.as_raw_fd(), q.fd.as_raw_fd());
        let mut moved = sys::renameat2(pfd, &from.on_disk, qfd, &to.on_disk, flags);
        if let Err(e) = &moved
            && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST))
            && flags == 0
            && self.names.encrypted()
        {
            // The target directory may hold nothing but its ID file.
            moved = replace_empty_dir(pfd, &from.on_disk, qfd, &to.on_disk);
        }
        if let Err(e) = moved {
            self.dirs_moved(moving, false);
            if !exchange && to.long.is_some() && sys::statat(q.fd.as_raw_fd(), &to.on_disk).is_err() {
                self.remove_side(&q, &to);
            }
            return Err(e.into());
        }
        self.dirs_moved(moving, true);
        if !exchange && (parent != newparent || from != to) {
            self.remove_side(&p, &from);
        }
        // Keep log names current; the O_PATH descriptors follow the inode.
        if let Ok(st) = sys::statat(q.fd.as_raw_fd(), &to.on_disk)
            && let Some(n) = rlock(&self.nodes).get(&self.to_fuse_ino(st.st_ino))
        {
            *lock(&n.name) = (newparent, newname.to_owned());
        }
        if exchange
            && let Ok(st) = sys::statat(p.fd.as_raw_fd(), &from.on_disk)
            && let Some(n) = rlock(&self.nodes).get(&self.to_fuse_ino(st.st_ino))
        {
            *lock(&n.name) = (parent, name.to_owned());
        }
        Ok(())
    }

    /// Reads from an open file and hands the plaintext, or the error, to
    /// `done` exactly once. The plaintext sits in a per-thread buffer, so the
    /// hot path does not allocate (and fault in) a fresh buffer per request.
    pub fn read_with<R>(&self, fh: u64, off: u64, size: u32, done: impl FnOnce(Result<&[u8], FsError>) -> R) -> R {
        let mut buf = Scratch::take();
        match self.read_into(fh, off, size, buf.vec()) {
            Ok(n) => {
                self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                done(Ok(&buf.vec()[..n]))
            }
            Err(e) => done(Err(e)),
        }
    }

    fn read_into(&self, fh: u64, off: u64, size: u32, buf: &mut Vec<u8>) -> Result<usize, FsError> {
        let n = self.file_handle(fh)?;
        if self.shared {
            return self.read_shared(&n, off, size, buf);
        }
        for _ in 0..8 {
            let need = match rlock(&n.open).as_ref() {
                // A file being written reads with its writers' key: the
                // kernel reads pages in to complete partial-page writes.
                Some(o) if o.pinned().is_some() => {
                    return o
                        .enc
                        .read_into(o.pinned().map(|k| &**k), off, size as usize, buf)
                        .map_err(|e| self.file_error(n.ino, e));
                }
                Some(o) => o.enc.key_need(),
                None => return Err(FsError::BadHandle),
            };
            let key = match self.obtain(&need, false)? {
                Obtained::Existing(k) => Some(k),
                _ => None,
            };
            let g = rlock(&n.open);
            let Some(o) = g.as_ref() else { return Err(FsError::BadHandle) };
            if o.enc.key_need() != need {
                continue;
            }
            return o.enc.read_into(key.as_deref(), off, size as usize, buf).map_err(|e| self.file_error(n.ino, e));
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// A read under `-o shared`: the file's size and header are re-read
    /// under its update lock first, so a file another mount grew, cut or
    /// emptied and rewrote (new file ID and key) reads as it is now. The key
    /// is fetched for the header as last seen, outside the locks, and used
    /// only if the header is still that one.
    fn read_shared(&self, n: &Node, off: u64, size: u32, buf: &mut Vec<u8>) -> Result<usize, FsError> {
        for _ in 0..8 {
            let (need, pinned) = match rlock(&n.open).as_ref() {
                Some(o) => (o.enc.key_need(), o.pinned().is_some()),
                None => return Err(FsError::BadHandle),
            };
            let key = match pinned {
                true => None,
                false => match self.obtain(&need, false)? {
                    Obtained::Existing(k) => Some(k),
                    _ => None,
                },
            };
            let mut g = wlock(&n.open);
            let Some(o) = g.as_mut() else { return Err(FsError::BadHandle) };
            let l = self.sync_shared(n.ino, o, false)?;
            let r = if let Some(k) = o.pinned() {
                o.enc.read_into(Some(k), off, size as usize, buf)
            } else if o.enc.key_need() == need {
                o.enc.read_into(key.as_deref(), off, size as usize, buf)
            } else {
                drop(l);
                continue;
            };
            drop(l);
            return r.map_err(|e| self.file_error(n.ino, e));
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// `-o shared`: the backing open file description that holds `owner`'s
    /// application locks on `n`, opened on first use.
    fn lock_file(&self, n: &Node, owner: u64) -> Result<Arc<File>, FsError> {
        if let Some(f) = lock(&n.app_locks).get(&owner) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.reopen(n, false)?);
        Ok(lock(&n.app_locks).entry(owner).or_insert(f).clone())
    }

    /// The backing range of an application lock on bytes `start..=end`
    /// (`end` past [`APP_LOCK_END`]: to the end of the file).
    fn lock_range(start: u64, end: u64) -> Result<(u64, u64), FsError> {
        if start >= APP_LOCK_END || end < start {
            return Err(FsError::Invalid);
        }
        let stop = end.saturating_add(1).min(APP_LOCK_END);
        Ok((start, stop - start))
    }

    /// F_GETLK (`-o shared`): the first lock of another owner, on this or
    /// another mount, that conflicts with `typ` on `start..=end`, as
    /// (start, end, type); F_UNLCK if none.
    pub fn getlk(&self, fh: u64, owner: u64, start: u64, end: u64, typ: i32) -> Result<(u64, u64, i32), FsError> {
        let n = self.file_handle(fh)?;
        let (s, len) = Self::lock_range(start, end)?;
        let f = self.lock_file(&n, owner)?;
        let fl = ofd_lock(f.as_raw_fd(), libc::F_OFD_GETLK, typ as i16, s, len)?;
        if i32::from(fl.l_type) == libc::F_UNLCK {
            return Ok((start, end, libc::F_UNLCK));
        }
        let from = fl.l_start.max(0) as u64;
        let to = if fl.l_len == 0 || from.saturating_add(fl.l_len as u64) >= APP_LOCK_END {
            i64::MAX as u64
        } else {
            from + fl.l_len as u64 - 1
        };
        Ok((from, to, i32::from(fl.l_type)))
    }

    /// F_SETLK / F_SETLKW and flock (`-o shared`): takes or drops `owner`'s
    /// lock on `start..=end` as an open file description lock on the backing
    /// file, so it conflicts with locks taken through every mount of this
    /// cipher dir. `wait` blocks until the lock is free.
    pub fn setlk(&self, fh: u64, owner: u64, start: u64, end: u64, typ: i32, wait: bool) -> Result<(), FsError> {
        let n = self.file_handle(fh)?;
        let (s, len) = Self::lock_range(start, end)?;
        if typ == libc::F_UNLCK && !lock(&n.app_locks).contains_key(&owner) {
            return Ok(());
        }
        let f = self.lock_file(&n, owner)?;
        let cmd = if wait { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK };
        match ofd_lock(f.as_raw_fd(), cmd, typ as i16, s, len) {
            Ok(_) => Ok(()),
            // EACCES from F_SETLK means "held by another": POSIX lets it be EAGAIN.
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Drops every application lock `owner` holds on `ino` (a close of any
    /// of its descriptors for POSIX locks, the last close for flock).
    pub fn drop_locks(&self, ino: u64, owner: u64) {
        if let Ok(n) = self.node(ino) {
            let f = lock(&n.app_locks).remove(&owner);
            drop(f);
        }
    }

    /// Writes `data` at `off` of an open file; returns bytes written.
    /// `kill_suid` first clears set-ID bits (see `clear_set_id`), which the
    /// kernel asks for on a write by a caller without CAP_FSETID.
    pub fn write(&self, fh: u64, off: u64, data: &[u8], kill_suid: bool) -> Result<u32, FsError> {
        self.writable()?;
        let n = self.file_handle(fh)?;
        if kill_suid {
            self.clear_set_id(&n)?;
        }
        self.with_key_mut(&n, true, |enc, key| match key {
            Some(k) => enc.write_at(k, off, data),
            None => Err(FileError::NeedKey),
        })?;
        self.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len() as u32)
    }

    /// copy_file_range: decrypts and re-encrypts through the normal paths
    /// (blocks cannot be shared between files: each has its own key), at
    /// most 1 MiB per call, as the kernel loops for the rest.
    pub fn copy_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        caller: Caller,
    ) -> Result<u32, FsError> {
        self.read_with(fh_in, off_in, len.min(1 << 20) as u32, |r| match r? {
            [] => Ok(0),
            data => self.write(fh_out, off_out, data, !caller.keeps_suid()),
        })
    }

    /// fsync / fdatasync.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), FsError> {
        let n = self.file_handle(fh)?;
        let g = rlock(&n.open);
        match g.as_ref() {
            Some(o) => o.enc.sync(datasync).map_err(|e| self.file_error(n.ino, e)),
            None => Err(FsError::BadHandle),
        }
    }

    /// Closes a file or directory handle.
    pub fn release(&self, fh: u64) -> Result<(), FsError> {
        let h = wlock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        if let Handle::File(n, writer) = &*h {
            self.detach(n, *writer);
        }
        Ok(())
    }

    /// fallocate: mode 0 extends, KEEP_SIZE alone is a no-op (blocks are
    /// written on demand), PUNCH_HOLE zeroes a range.
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32, caller: Caller) -> Result<(), FsError> {
        self.writable()?;
        let n = self.file_handle(fh)?;
        if !caller.keeps_suid() {
            self.clear_set_id(&n)?;
        }
        let end = off.checked_add(len).ok_or(FsError::TooLarge)?;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match mode {
            0 => self.with_key_mut(&n, true, |enc, key| if end > enc.size() { enc.set_len(key, end) } else { Ok(()) }),
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            PUNCH | libc::FALLOC_FL_ZERO_RANGE | 0x11 => self.with_key_mut(&n, false, |enc, key| {
                let size = enc.size();
                let stop = if mode & libc::FALLOC_FL_KEEP_SIZE != 0 { end.min(size) } else { end };
                if stop <= off {
                    return Ok(());
                }
                let Some(key) = key else { return if stop > size { Err(FileError::NeedKey) } else { Ok(()) } };
                let zeros = vec![0u8; (stop - off).min(1 << 20) as usize];
                let mut pos = off;
                let k = match key {
                    KeyArg::Existing(k) => k,
                    KeyArg::Fresh(_) => return Err(FileError::NeedKey),
                };
                while pos < stop {
                    let l = (stop - pos).min(zeros.len() as u64) as usize;
                    enc.write_at(KeyArg::Existing(k), pos, &zeros[..l])?;
                    pos += l as u64;
                }
                Ok(())
            }),
            _ => Err(FsError::Unsupported),
        }
    }

    /// SEEK_DATA / SEEK_HOLE in whole plaintext blocks. A block is data when
    /// any byte of its stored slot is data in the backing file, and a hole
    /// when its whole slot is (it then reads as zeros). The backing file's
    /// extents are page-grained while slots are B+28 bytes, so an extent
    /// edge seldom falls on a slot edge: a page shared by two slots makes
    /// both data, and a hole narrower than a slot is no hole at all.
    pub fn lseek(&self, fh: u64, off: u64, whence: i32) -> Result<u64, FsError> {
        let n = self.file_handle(fh)?;
        if self.shared {
            // The size as another mount may have left it.
            let mut g = wlock(&n.open);
            let o = g.as_mut().ok_or(FsError::BadHandle)?;
            drop(self.sync_shared(n.ino, o, false)?);
        }
        let g = rlock(&n.open);
        let o = g.as_ref().ok_or(FsError::BadHandle)?;
        let size = o.enc.size();
        let enxio = || FsError::Io(std::io::Error::from_raw_os_error(libc::ENXIO));
        if off >= size {
            return Err(enxio());
        }
        let l = self.layout;
        let (bs, sb, blocks) = (l.block_size(), l.stored_block(), l.block_count(size));
        let end = l.backing_size(size);
        let fd = o.enc.backing().as_raw_fd();
        // The first backing data byte at or after `c` within our blocks.
        let next_data = |c: u64| match sys::lseek(fd, c, libc::SEEK_DATA) {
            Ok(d) => Ok((d < end).then_some(d)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(e) => Err(FsError::Io(e)),
        };
        match whence {
            libc::SEEK_DATA => {
                // Every slot between the start of off's block and `d` is a
                // hole, so the block holding `d` is the first data block.
                let d = next_data(l.block_offset(off / bs))?.ok_or_else(enxio)?;
                Ok(off.max((d - l.header_size()) / sb * bs))
            }
            libc::SEEK_HOLE => {
                let mut i = off / bs;
                while i < blocks {
                    let h = sys::lseek(fd, l.block_offset(i), libc::SEEK_HOLE)?;
                    // Blocks i.. that start before `h` start with data; the
                    // first candidate is the first slot starting at or after h.
                    let k = (h.max(l.header_size()) - l.header_size()).div_ceil(sb);
                    if h >= end || k >= blocks {
                        break;
                    }
                    let slot_end = (l.block_offset(k) + sb).min(end);
                    match next_data(l.block_offset(k))? {
                        Some(d) if d < slot_end => i = k + 1,
                        _ => return Ok(off.max(k * bs)),
                    }
                }
                Ok(size)
            }
            _ => Err(FsError::Invalid),
        }
    }

    /// Opens a directory, snapshotting its entries.
    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        self.names_usable()?;
        let n = self.dir(ino)?;
        let mut entries = vec![
            DirEntry { ino, kind: Kind::Dir, name: ".".into() },
            DirEntry { ino: lock(&n.name).0, kind: Kind::Dir, name: "..".into() },
        ];
        let dir_key = self.dir_key(&n)?;
        for e in std::fs::read_dir(sys::proc_path(&n.fd))? {
            let e = e?;
            let raw = e.file_name();
            if ino == ROOT_INO && self.is_reserved(&raw) {
                continue; // kmsfs.conf: the volume's own file, not an entry
            }
            let name = if self.names.encrypted() {
                let encoded = match self.names.stored_name(n.fd.as_raw_fd(), &raw) {
                    None => continue,
                    Some(Ok(b)) => b,
                    // Only a long name's side file can fail to read.
                    Some(Err(err)) => {
                        tracing::warn!(
                            dir = %self.path_of(ino),
                            entry = %names::escape(raw.as_bytes()),
                            "long name's side file unreadable ({err}); hidden"
                        );
                        continue;
                    }
                };
                match self.names.decrypt(&dir_key, &encoded) {
                    Ok(n) => n,
                    Err(_) => {
                        // Not ours (or damaged): hide it, as gocryptfs does.
                        tracing::warn!(
                            dir = %self.path_of(ino),
                            entry = %names::escape(raw.as_bytes()),
                            "entry name does not decrypt; hidden"
                        );
                        continue;
                    }
                }
            } else {
                raw
            };
            use std::os::unix::fs::{DirEntryExt, FileTypeExt};
            let ft = e.file_type()?;
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_socket() {
                Kind::Socket
            } else if ft.is_char_device() {
                Kind::CharDev
            } else if ft.is_block_device() {
                Kind::BlockDev
            } else {
                Kind::File
            };
            entries.push(DirEntry { ino: self.to_fuse_ino(e.ino()), kind, name });
        }
        Ok(self.new_handle(Handle::Dir(entries)))
    }

    /// Entries of an open directory from index `offset`.
    pub fn readdir(&self, fh: u64, offset: u64) -> Result<Vec<DirEntry>, FsError> {
        match &*self.handle(fh)? {
            Handle::Dir(entries) => Ok(entries.iter().skip(offset as usize).cloned().collect()),
            Handle::File(..) => Err(FsError::BadHandle),
        }
    }

    /// fsync of a directory.
    pub fn fsyncdir(&self, ino: u64) -> Result<(), FsError> {
        let n = self.dir(ino)?;
        File::open(sys::proc_path(&n.fd))?.sync_all()?;
        Ok(())
    }

    /// statfs of the backing filesystem.
    pub fn statfs(&self) -> Result<libc::statvfs, FsError> {
        Ok(sys::statvfs(&self.root_path)?)
    }

    fn xattr_name_ok(name: &OsStr) -> Result<(), FsError> {
        // Only user.* is passed through: trusted/security names would act on
        // the backing files with the daemon's privileges. user.kmsfs.* is ours.
        let b = name.as_bytes();
        if b.starts_with(b"user.") && !b.starts_with(b"user.kmsfs.") { Ok(()) } else { Err(FsError::Unsupported) }
    }

    /// Linux keeps user.* xattrs on regular files and directories only.
    fn xattr_capable(n: &Node) -> bool {
        matches!(n.kind, Kind::File | Kind::Dir)
    }

    fn xattr_integrity(&self, ino: u64, name: &OsStr) -> FsError {
        let path = self.path_of(ino);
        let attr = names::escape(name.as_bytes());
        tracing::error!(path = %path, xattr = %attr, "xattr value does not decrypt (edited, or copied from another file)");
        FsError::Integrity { path, detail: format!("xattr {attr}: value does not decrypt") }
    }

    /// The owner ID an inode's xattr values are bound to (the
    /// `user.kmsfs.owner` xattr: 16 random bytes, minted by the first
    /// setxattr when `mint`). It travels with the inode through renames and
    /// hard links, and a value copied to another inode does not open there.
    fn xattr_owner(&self, n: &Node, mint: bool) -> Result<Option<Id>, FsError> {
        let name = OsStr::new(names::OWNER_XATTR);
        for _ in 0..2 {
            match sys::xattr::get(&n.fd, name, 16) {
                Ok(v) => {
                    if let Ok(id) = <Id>::try_from(v.as_slice()) {
                        return Ok(Some(id));
                    }
                    if !mint {
                        return Ok(None); // malformed: no value can open under it
                    }
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ERANGE)) => {
                    if !mint {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
            let id =
                crate::format::random_id().map_err(|_| FsError::Io(std::io::Error::from_raw_os_error(libc::EIO)))?;
            // XATTR_CREATE: of two first setxattrs at once, one owner wins and
            // the other call reads it on the next round.
            match sys::xattr::set(&n.fd, name, &id, libc::XATTR_CREATE) {
                Ok(()) => return Ok(Some(id)),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// getxattr; `size == 0` asks for the length.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Vec<u8>, FsError> {
        let no_data = || FsError::Io(std::io::Error::from_raw_os_error(libc::ENODATA));
        let v = if ino == ROOT_INO && name == STATS_XATTR {
            serde_json::to_vec(&self.stats_json()).map_err(|_| FsError::Invalid)?
        } else {
            Self::xattr_name_ok(name).map_err(|_| no_data())?;
            let n = self.node(ino)?;
            if !Self::xattr_capable(&n) {
                return Err(no_data());
            }
            let len = sys::xattr::get(&n.fd, name, 0)?.len();
            let stored = sys::xattr::get(&n.fd, name, len.max(1))?;
            let owner = if self.names.encrypted() { self.xattr_owner(&n, false)? } else { None };
            self.names.decrypt_xattr(owner.as_ref(), name, &stored).map_err(|_| self.xattr_integrity(ino, name))?.0
        };
        if size == 0 {
            return Ok(vec![0; v.len()]);
        }
        if (size as usize) < v.len() {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::ERANGE)));
        }
        Ok(v)
    }

    /// setxattr; with encrypted names the value is sealed to this inode's
    /// owner ID and the attribute's name (a legacy value is re-sealed so).
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<(), FsError> {
        self.writable()?;
        Self::xattr_name_ok(name)?;
        let n = self.node(ino)?;
        if !Self::xattr_capable(&n) {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EPERM)));
        }
        let owner =
            if self.names.encrypted() { self.xattr_owner(&n, true)?.unwrap_or_default() } else { Id::default() };
        Ok(sys::xattr::set(&n.fd, name, &self.names.encrypt_xattr(&owner, name, value), flags)?)
    }

    /// listxattr.
    pub fn listxattr(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let n = self.node(ino)?;
        if !Self::xattr_capable(&n) {
            return Ok(Vec::new());
        }
        let raw = sys::xattr::list(&n.fd)?;
        let mut out = Vec::new();
        for name in raw.split(|&b| b == 0).filter(|s| s.starts_with(b"user.") && !s.starts_with(b"user.kmsfs.")) {
            out.extend_from_slice(name);
            out.push(0);
        }
        Ok(out)
    }

    /// removexattr.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<(), FsError> {
        self.writable()?;
        Self::xattr_name_ok(name)?;
        let n = self.node(ino)?;
        if !Self::xattr_capable(&n) {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EPERM)));
        }
        Ok(sys::xattr::remove(&n.fd, name)?)
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
