//! The FUSE adapter: translates fuser requests into `EncFs` calls and replies.
//! The only module that names fuser types. Handlers never panic.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    IoctlFlags, KernelConfig, LockOwner, OpenFlags, PollEvents, PollFlags, PollNotifier, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen,
    ReplyPoll, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::error::FsError;
use crate::fs::{Attr, Caller, EncFs, Kind, SetTime};

/// Attribute and entry cache time. Short, so a second mount of the same
/// cipher dir (shared storage) sees changes within a second; zero with
/// `-o shared`, where every lookup and stat asks the daemon.
const TTL: Duration = Duration::from_secs(1);
/// Largest write the kernel may send: 1 MiB (the kernel's cap).
pub const MAX_WRITE: u32 = 1 << 20;

/// Adapter options.
#[derive(Clone, Debug)]
pub struct FuseOptions {
    /// Use the kernel writeback cache (coalesces small writes).
    pub writeback_cache: bool,
    /// `-o shared`: other mounts of the cipher dir (other hosts) change it.
    /// No attribute or entry caching, no writeback cache, pages dropped at
    /// every open and whenever the size or mtime changed, and application
    /// locks (fcntl, flock) forwarded to the backing files.
    pub shared: bool,
}

/// The fuser filesystem.
pub struct KmsFuse {
    fs: Arc<EncFs>,
    opts: FuseOptions,
}

impl KmsFuse {
    /// Wraps a filesystem.
    pub fn new(fs: Arc<EncFs>, opts: FuseOptions) -> Self {
        Self { fs, opts }
    }

    fn ttl(&self) -> &'static Duration {
        if self.opts.shared { &Duration::ZERO } else { &TTL }
    }
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(s),
    })
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

/// The errno for a failed operation on inode `ino` (for name operations,
/// the parent directory), logged with the path it concerns when it is worth
/// a line (a key provider's refusal or outage, say).
fn errno(fs: &EncFs, op: &str, ino: u64, e: &FsError) -> Errno {
    let n = e.errno();
    if e.is_notable() {
        // Integrity errors were already logged with path and block.
        if !matches!(e, FsError::Integrity { .. }) {
            warn!(op, errno = n, path = %fs.path_of(ino), "{e}");
        }
    } else {
        debug!(op, errno = n, "{e}");
    }
    Errno::from_i32(n)
}

impl Filesystem for KmsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let mut caps = InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            // We clear set-ID bits ourselves (see EncFs::clear_set_id), so the
            // kernel stops asking for security.capability before every write.
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        if self.opts.shared {
            // Locks go to the backing files; the kernel re-checks size and
            // mtime before each read and drops stale pages (no writeback
            // cache: writes reach the backing file before they return).
            caps |= InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS | InitFlags::FUSE_AUTO_INVAL_DATA;
        } else if self.opts.writeback_cache {
            caps |= InitFlags::FUSE_WRITEBACK_CACHE;
        }
        for cap in caps.iter() {
            if config.add_capabilities(cap).is_err() {
                debug!("kernel lacks FUSE capability {cap:?}");
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(self.ttl(), &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&self.fs, "lookup", parent.0, &e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(self.ttl(), &attr(&a)),
            Err(e) => reply.error(errno(&self.fs, "getattr", ino.0, &e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // mtime+ctime and nothing else is, almost always, the kernel flushing
        // the times it keeps under the writeback cache. A user's utimensat
        // that omits atime looks the same; it is handled the same except on
        // an unlinked file, whose times only the kernel's cache still shows.
        let flush = self.opts.writeback_cache
            && ctime.is_some()
            && atime.is_none()
            && mode.is_none()
            && uid.is_none()
            && gid.is_none()
            && size.is_none();
        // The kernel marks a truncation that must clear set-ID bits with
        // FATTR_KILL_SUIDGID, which fuser does not pass on, so the core
        // decides from the caller as the kernel does.
        let r = if flush {
            self.fs.flush_times(ino.0, time(mtime))
        } else {
            self.fs.setattr(ino.0, caller(req), mode, uid, gid, size, time(atime), time(mtime))
        };
        match r {
            Ok(a) => reply.attr(self.ttl(), &attr(&a)),
            Err(e) => reply.error(errno(&self.fs, "setattr", ino.0, &e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&self.fs, "readlink", ino.0, &e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match self.fs.mknod(parent.0, name, mode, rdev, caller(req)) {
            Ok(a) => reply.entry(self.ttl(), &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&self.fs, "mknod", parent.0, &e)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        match self.fs.mkdir(parent.0, name, mode, caller(req)) {
            Ok(a) => reply.entry(self.ttl(), &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&self.fs, "mkdir", parent.0, &e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "unlink", parent.0, &e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "rmdir", parent.0, &e)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        match self.fs.symlink(parent.0, link_name, target.as_os_str(), caller(req)) {
            Ok(a) => reply.entry(self.ttl(), &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&self.fs, "symlink", parent.0, &e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.fs.rename(parent.0, name, newparent.0, newname, flags.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "rename", parent.0, &e)),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        match self.fs.link(ino.0, newparent.0, newname) {
            Ok(a) => reply.entry(self.ttl(), &attr(&a), Generation(0)),
            Err(e) => reply.error(errno(&self.fs, "link", ino.0, &e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(ino.0, flags.0, caller(req)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&self.fs, "open", ino.0, &e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.fs.read_with(fh.0, offset, size, |r| match r {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(errno(&self.fs, "read", _ino.0, &e)),
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Set on write-through writes by callers without CAP_FSETID (the
        // kernel sends writes to set-ID files through, not via its cache).
        let kill_suid = wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.fs.write(fh.0, offset, data, kill_suid) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&self.fs, "write", _ino.0, &e)),
        }
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock: LockOwner, reply: ReplyEmpty) {
        if self.opts.shared {
            // A close drops the closing process's POSIX locks on the file.
            self.fs.drop_locks(ino.0, lock.0);
            reply.ok();
            return;
        }
        // Writes go to the backing file synchronously, so FLUSH has nothing
        // to do. ENOSYS makes the kernel stop sending it (fc->no_flush) after
        // it has written back its own cache, which saves a round trip on every
        // close(); close() still reports writeback errors.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Set with FUSE_RELEASE_FLOCK_UNLOCK: the last close drops flock locks.
        if let Some(owner) = lock.filter(|_| self.opts.shared) {
            self.fs.drop_locks(ino.0, owner.0);
        }
        match self.fs.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "release", ino.0, &e)),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "fsync", _ino.0, &e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&self.fs, "opendir", ino.0, &e)),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        match self.fs.readdir(fh.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate() {
                    if reply.add(INodeNo(e.ino), offset + i as u64 + 1, kind(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&self.fs, "readdir", _ino.0, &e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        match self.fs.release(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "releasedir", _ino.0, &e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsyncdir(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "fsyncdir", ino.0, &e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                255,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(&self.fs, "statfs", _ino.0, &e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.fs.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "setxattr", ino.0, &e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name, size) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&self.fs, "getxattr", ino.0, &e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
            Ok(v) => reply.data(&v),
            Err(e) => reply.error(errno(&self.fs, "listxattr", ino.0, &e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "removexattr", ino.0, &e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permission checks are the kernel's (default_permissions); this only
        // confirms the inode exists.
        match self.fs.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "access", ino.0, &e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.fs.create(parent.0, name, mode, flags, caller(req)) {
            Ok((a, fh)) => reply.created(self.ttl(), &attr(&a), Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(&self.fs, "create", parent.0, &e)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fs.fallocate(fh.0, offset, length, mode, caller(req)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&self.fs, "fallocate", _ino.0, &e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.fs.copy_range(fh_in.0, offset_in, fh_out.0, offset_out, len, caller(req)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&self.fs, "copy_file_range", _ino_in.0, &e)),
        }
    }

    // No ioctls are supported. fuser's default logs a warning per call, and
    // every isatty() (Python's open(), many shells) sends one: answer quietly.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    // ENOSYS makes the kernel stop asking and report files as always ready,
    // as for any regular file; quietly, unlike fuser's default.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        // Only asked in shared mode (FUSE_POSIX_LOCKS); the holder may be on
        // another host, so no pid is reported.
        match self.fs.getlk(fh.0, lock_owner.0, start, end, typ) {
            Ok((s, e, t)) => reply.locked(s, e, t, 0),
            Err(e) => reply.error(errno(&self.fs, "getlk", _ino.0, &e)),
        }
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        if !sleep {
            match self.fs.setlk(fh.0, lock_owner.0, start, end, typ, false) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&self.fs, "setlk", _ino.0, &e)),
            }
            return;
        }
        // F_SETLKW and blocking flock wait on a thread of their own: a
        // worker blocked for as long as another host holds the lock would
        // starve the requests that release it.
        let fs = self.fs.clone();
        let spawned = std::thread::Builder::new().name("kmsfs-lockw".into()).spawn(move || {
            match fs.setlk(fh.0, lock_owner.0, start, end, typ, true) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&fs, "setlk", _ino.0, &e)),
            }
        });
        if let Err(e) = spawned {
            warn!("cannot start a lock waiter: {e}");
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let Ok(off) = u64::try_from(offset) else {
            reply.error(Errno::from_i32(libc::EINVAL));
            return;
        };
        match self.fs.lseek(fh.0, off, whence) {
            Ok(o) => reply.offset(o as i64),
            Err(e) => reply.error(errno(&self.fs, "lseek", _ino.0, &e)),
        }
    }
}
