//! Thin, checked wrappers over the *at(2) syscalls the filesystem needs on
//! O_PATH descriptors. Each returns `io::Result`; none panics.
//!
//! The cipher dir is adversarial: a user who owns a backing directory, or
//! anyone who can write the cipher dir, can plant symlinks, FIFOs, devices
//! and huge files under any name. So every backing path is resolved from a
//! directory descriptor by [`open_beneath`] (no symlink in any component, no
//! `..` out of the directory), small bookkeeping files are read with
//! [`read_regular`] (regular files only, size-capped, never a FIFO or device
//! opened) and written with [`replace_file`] (a fresh `O_EXCL` temp file
//! renamed over the name, so whatever was planted there is replaced, never
//! followed or truncated).
//!
//! `/proc/self/fd/N` paths (chmod, xattrs, reopening a node) name the inode
//! that descriptor N pins: the kernel resolves the magic link to that inode
//! and stops, even when it is a symlink (a planted link is never followed
//! through them; `tests` below shows it).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// `/proc/self/fd/N`, to reopen or chmod an O_PATH descriptor.
pub fn proc_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// openat(2).
pub fn openat(dir: RawFd, name: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: the only pointer is `c`, a CString alive for the call, so openat
    // reads a NUL-terminated name inside memory we own; it writes none of ours.
    let fd = check(unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: `fd` was just returned by openat (checked non-negative) and no other
    // owner holds it, so the OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of openat2(2) (libc's is `non_exhaustive`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Whether the kernel has openat2(2): 0 not yet known, 1 yes, 2 no (ENOSYS).
static OPENAT2: AtomicU8 = AtomicU8::new(0);

fn io_err(errno: libc::c_int) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// Opens `path`, relative to `dir`, without following a symlink in any
/// component and without leaving `dir` (no absolute path, no `..` above it):
/// openat2 with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS, or, on kernels without
/// openat2 (before 5.6), one openat with O_NOFOLLOW per component. O_NOFOLLOW
/// and O_CLOEXEC are always added, so a trailing symlink gives ELOOP, or the
/// link itself with O_PATH.
pub fn open_beneath(dir: RawFd, path: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if OPENAT2.load(Ordering::Relaxed) != 2 {
        let c = cstr(path)?;
        let creates = flags & (libc::O_CREAT | libc::O_TMPFILE) != 0;
        let how = OpenHow {
            flags: flags as u32 as u64,
            mode: if creates { u64::from(mode) } else { 0 },
            resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
        };
        // SAFETY: `c` (a CString) and `how` live across the call and the exact size of
        // `how` is passed, so openat2 reads only memory we own; it writes none.
        let r = unsafe {
            libc::syscall(libc::SYS_openat2, dir, c.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>())
        };
        if r >= 0 {
            OPENAT2.store(1, Ordering::Relaxed);
            // SAFETY: r >= 0 is a descriptor openat2 just created for this call:
            // nothing else in the process has seen its number, so the OwnedFd is
            // its only owner.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENOSYS) {
            return Err(e);
        }
        OPENAT2.store(2, Ordering::Relaxed);
    }
    open_beneath_fallback(dir, path, flags, mode)
}

/// [`open_beneath`] for kernels without openat2: every component but the
/// last is opened O_PATH|O_DIRECTORY|O_NOFOLLOW from the previous one.
fn open_beneath_fallback(dir: RawFd, path: &OsStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let b = path.as_bytes();
    if b.is_empty() || b[0] == b'/' {
        return Err(io_err(libc::EXDEV));
    }
    let parts: Vec<&[u8]> = b.split(|&c| c == b'/').filter(|p| !p.is_empty() && *p != b".").collect();
    if parts.iter().any(|p| *p == b"..") {
        return Err(io_err(libc::EXDEV));
    }
    let Some((last, dirs)) = parts.split_last() else { return Err(io_err(libc::EINVAL)) };
    let mut held: Option<OwnedFd> = None;
    for d in dirs {
        let at = held.as_ref().map_or(dir, |f| f.as_raw_fd());
        held = Some(openat(at, OsStr::from_bytes(d), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?);
    }
    let at = held.as_ref().map_or(dir, |f| f.as_raw_fd());
    openat(at, OsStr::from_bytes(last), flags, mode)
}

/// An O_PATH|O_NOFOLLOW descriptor for `name` in `dir` (the entry itself,
/// even when it is a symlink).
pub fn open_path(dir: RawFd, name: &OsStr) -> io::Result<OwnedFd> {
    open_beneath(dir, name, libc::O_PATH, 0)
}

/// An O_PATH descriptor for the inode `fd` already refers to.
pub fn path_of_fd(fd: &OwnedFd) -> io::Result<OwnedFd> {
    openat(libc::AT_FDCWD, proc_path(fd).as_os_str(), libc::O_PATH, 0)
}

/// Opens the inode an O_PATH descriptor pins, with `flags` (through
/// /proc/self/fd, which resolves to that inode and nothing else).
pub fn reopen(fd: &OwnedFd, flags: libc::c_int) -> io::Result<OwnedFd> {
    openat(libc::AT_FDCWD, proc_path(fd).as_os_str(), flags | libc::O_NOCTTY, 0)
}

/// Why [`read_regular`] refused a file, as an `io::Error` message.
fn refused(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads the small regular file `name` in `dir`: the entry is first opened
/// O_PATH (no symlink followed), checked with fstat to be a regular file of
/// at most `cap` bytes, and only then opened for reading (O_NONBLOCK), so a
/// planted FIFO, device or symlink is never opened and cannot hang the
/// daemon; a file that grows past `cap` meanwhile is refused too.
pub fn read_regular(dir: RawFd, name: &OsStr, cap: usize) -> io::Result<Vec<u8>> {
    let p = open_path(dir, name)?;
    let st = fstat(p.as_raw_fd())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(refused(format!("not a regular file (mode {:o})", st.st_mode & libc::S_IFMT)));
    }
    if st.st_size < 0 || st.st_size as u64 > cap as u64 {
        return Err(refused(format!("{} bytes, more than the {cap} allowed", st.st_size)));
    }
    let f = std::fs::File::from(reopen(&p, libc::O_RDONLY | libc::O_NONBLOCK)?);
    let mut buf = Vec::with_capacity(st.st_size as usize);
    use std::io::Read;
    (&f).take(cap as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > cap {
        return Err(refused(format!("grew past the {cap} bytes allowed")));
    }
    Ok(buf)
}

/// Prefix of kmsfs's temporary entries.
pub const TMP_PREFIX: &str = crate::names::TMP_PREFIX;

/// A fresh random temporary name (`.kmsfs.tmp.` + 32 hex digits).
pub fn temp_name() -> io::Result<OsString> {
    let id = crate::format::random_id().map_err(|_| io_err(libc::EIO))?;
    Ok(format!("{TMP_PREFIX}{}", crate::format::hex(&id)).into())
}

/// Replaces (or creates) `name` in `dir` with `data`: the bytes go to a new
/// file under a random temporary name, created O_CREAT|O_EXCL|O_NOFOLLOW with
/// `mode`, written and fsynced, then renamed over `name`. `name` itself is
/// never opened, so whatever was planted there (a symlink, a FIFO, a hard
/// link to another file) is replaced, never written through; and a crash
/// leaves the old content or the new, never a truncated file. The caller
/// fsyncs `dir` when the rename itself must be durable.
pub fn replace_file(dir: RawFd, name: &OsStr, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_name()?;
    let f = open_beneath(dir, &tmp, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, mode)?;
    let done = (|| {
        // The umask may have narrowed `mode`.
        // SAFETY: fchmod takes integers only, so no memory of ours is read or
        // written; `f` stays open across the call, so the number names our file.
        check(unsafe { libc::fchmod(f.as_raw_fd(), mode as libc::mode_t) })?;
        let f = std::fs::File::from(f);
        use std::io::Write;
        (&f).write_all(data)?;
        f.sync_all()?;
        renameat2(dir, &tmp, dir, name, 0)
    })();
    if done.is_err() {
        let _ = unlinkat(dir, &tmp, 0);
    }
    done
}

/// fsync of a directory given by any descriptor (O_PATH included).
pub fn fsync_dir(dir: &OwnedFd) -> io::Result<()> {
    let d = std::fs::File::from(reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)?);
    d.sync_all()
}

/// fstatat(fd, "", AT_EMPTY_PATH): stat of an O_PATH descriptor.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: libc::stat is plain integers, for which all-zero bits are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a static empty C string and fstatat writes one `stat`
    // into `st`, which we own exclusively.
    check(unsafe { libc::fstatat(fd, c"".as_ptr(), &mut st, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// fstatat(dir, name, AT_SYMLINK_NOFOLLOW).
pub fn statat(dir: RawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: libc::stat is plain integers, for which all-zero bits are a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a CString alive for the call; fstatat writes one `stat` into
    // `st`, which we own exclusively.
    check(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// mkdirat(2).
pub fn mkdirat(dir: RawFd, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`c`); mkdirat writes none.
    check(unsafe { libc::mkdirat(dir, c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

/// mknodat(2).
pub fn mknodat(dir: RawFd, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`c`); mknodat writes none.
    check(unsafe { libc::mknodat(dir, c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) }).map(|_| ())
}

/// symlinkat(2).
pub fn symlinkat(target: &OsStr, dir: RawFd, name: &OsStr) -> io::Result<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`t`, `c`); symlinkat writes none.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) }).map(|_| ())
}

/// readlinkat(fd, "").
pub fn readlink(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: readlinkat writes at most `buf.len()` bytes into `buf`, which we own
    // exclusively; the path is a static empty C string.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// unlinkat(2).
pub fn unlinkat(dir: RawFd, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`c`); unlinkat writes none.
    check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(|_| ())
}

/// renameat2(2).
pub fn renameat2(od: RawFd, on: &OsStr, nd: RawFd, nn: &OsStr, flags: u32) -> io::Result<()> {
    let (a, b) = (cstr(on)?, cstr(nn)?);
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`a`, `b`); renameat2 writes none.
    check(unsafe { libc::renameat2(od, a.as_ptr(), nd, b.as_ptr(), flags) }).map(|_| ())
}

/// linkat(fd, "", dir, name, AT_EMPTY_PATH), falling back to /proc when the
/// daemon lacks CAP_DAC_READ_SEARCH.
pub fn link_fd(fd: &OwnedFd, dir: RawFd, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (a static empty one, `c`); linkat writes none.
    let r = unsafe { libc::linkat(fd.as_raw_fd(), c"".as_ptr(), dir, c.as_ptr(), libc::AT_EMPTY_PATH) };
    if r == 0 {
        return Ok(());
    }
    let p = cstr(proc_path(fd).as_os_str())?;
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`p`, `c`); linkat writes none.
    check(unsafe { libc::linkat(libc::AT_FDCWD, p.as_ptr(), dir, c.as_ptr(), libc::AT_SYMLINK_FOLLOW) }).map(|_| ())
}

/// chmod through /proc (fchmod does not work on O_PATH descriptors).
pub fn chmod(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    let p = cstr(proc_path(fd).as_os_str())?;
    // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`p`); fchmodat writes none.
    check(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode as libc::mode_t, 0) }).map(|_| ())
}

/// fchownat(fd, "", AT_EMPTY_PATH); `u32::MAX` leaves a field unchanged.
pub fn chown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: the only pointer is a static empty C string (AT_EMPTY_PATH); fchownat
    // writes no memory.
    check(unsafe { libc::fchownat(fd, c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) })
        .map(|_| ())
}

/// utimensat on a path relative to `dir` (symlinks) or on /proc (others).
pub fn utimens(dir: RawFd, name: &OsStr, times: &[libc::timespec; 2], nofollow: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if nofollow { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
    // SAFETY: `c` is a CString alive for the call and `times` is exactly the two
    // timespecs utimensat reads; it writes no memory.
    check(unsafe { libc::utimensat(dir, c.as_ptr(), times.as_ptr(), flags) }).map(|_| ())
}

/// statvfs(2).
pub fn statvfs(path: &std::path::Path) -> io::Result<libc::statvfs> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: libc::statvfs is plain integers, for which all-zero bits are valid.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a CString alive for the call; statvfs writes one struct into
    // `s`, which we own exclusively.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut s) })?;
    Ok(s)
}

/// fallocate(2) on a regular descriptor.
pub fn fallocate(fd: RawFd, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes integers only: no pointer, so no memory of ours
    // is read or written whatever the arguments (a stale `fd` could only make
    // it act on another file, an I/O concern, not memory safety).
    check(unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) }).map(|_| ())
}

/// lseek(2) for SEEK_DATA / SEEK_HOLE.
pub fn lseek(fd: RawFd, off: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek takes integers only: no pointer, so no memory of ours is
    // read or written whatever the arguments.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
}

/// getxattr/setxattr/listxattr/removexattr through /proc/self/fd/N: they
/// act on the inode descriptor N pins and never follow a link beyond it
/// (fgetxattr and friends refuse O_PATH descriptors).
pub mod xattr {
    use super::*;

    fn path(fd: &OwnedFd) -> io::Result<CString> {
        cstr(proc_path(fd).as_os_str())
    }

    /// getxattr; `size == 0` asks for the length.
    pub fn get(fd: &OwnedFd, name: &OsStr, size: usize) -> io::Result<Vec<u8>> {
        let (p, n) = (path(fd)?, cstr(name)?);
        let mut buf = vec![0u8; size];
        // SAFETY: `p`, `n` are CStrings alive for the call; getxattr writes at most
        // `size` bytes into `buf`, which holds exactly `size` (null with size 0:
        // then it writes nothing and returns the length).
        let r = unsafe {
            libc::getxattr(
                p.as_ptr(),
                n.as_ptr(),
                if size == 0 { std::ptr::null_mut() } else { buf.as_mut_ptr().cast() },
                size,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if size == 0 {
            return Ok(vec![0u8; r as usize]);
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    /// setxattr.
    pub fn set(fd: &OwnedFd, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
        let (p, n) = (path(fd)?, cstr(name)?);
        // SAFETY: `p`, `n` are CStrings alive for the call and setxattr reads exactly
        // `value.len()` bytes of `value`; it writes no memory.
        check(unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) }).map(|_| ())
    }

    /// listxattr.
    pub fn list(fd: &OwnedFd) -> io::Result<Vec<u8>> {
        let p = path(fd)?;
        // SAFETY: `p` is a CString alive for the call; with a null buffer and size 0
        // listxattr writes nothing and returns the length.
        let n = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: listxattr writes at most `buf.len()` bytes into `buf`, which we own
        // exclusively; `p` is a CString alive for the call.
        let n = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// removexattr.
    pub fn remove(fd: &OwnedFd, name: &OsStr) -> io::Result<()> {
        let (p, n) = (path(fd)?, cstr(name)?);
        // SAFETY: the kernel reads only NUL-terminated strings we own for the whole call (`p`, `n`); removexattr writes none.
        check(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(|_| ())
    }
}

/// preadv(2) until every buffer is full, in runs of at most IOV_MAX buffers.
/// Fails with UnexpectedEof if the file ends first.
pub fn preadv_exact(fd: RawFd, mut bufs: &mut [io::IoSliceMut<'_>], mut off: u64) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    while !bufs.is_empty() {
        let n = bufs.len().min(IOV_MAX) as libc::c_int;
        let at = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: IoSliceMut is guaranteed ABI-compatible with iovec; `n` is at
        // most `bufs.len()`, so the kernel reads only iovecs we pass, and each
        // one borrows a live buffer exclusively for the call, into which it
        // writes at most that buffer's length.
        let r = unsafe { libc::preadv(fd, bufs.as_ptr().cast(), n, at) };
        match r {
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            r => {
                off += r as u64;
                io::IoSliceMut::advance_slices(&mut bufs, r as usize);
            }
        }
    }
    Ok(())
}

/// The effective user ID.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and no pointer: it reads and writes no
    // memory of ours, and it cannot fail.
    unsafe { libc::geteuid() }
}

/// One fcntl open-file-description lock call on `start..start+len`
/// (`len` 0: to the end), retried on EINTR; returns the `flock` as the
/// kernel left it (F_OFD_GETLK fills in the conflicting lock).
pub fn ofd_lock(fd: std::os::fd::RawFd, cmd: i32, ty: i16, start: u64, len: u64) -> std::io::Result<libc::flock> {
    // SAFETY: libc::flock is plain integers, for which all-zero bits are valid
    // (and l_pid must be 0 for OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = i64::try_from(start).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    fl.l_len = i64::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: the lock commands read and write one flock through the pointer,
        // and `fl` is a local we own exclusively; the fd is only a number here.
        let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            return Ok(fl);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// How many threads this process has (the entries of /proc/self/task).
fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}

/// Refuses unless this process has a single thread: the environment may
/// only change then (glibc's getenv takes no lock, so a thread reading it
/// while another writes can read freed memory).
fn single_threaded() -> io::Result<()> {
    match thread_count()? {
        1 => Ok(()),
        n => Err(io::Error::other(format!("the environment can only change with one thread running ({n} are)"))),
    }
}

/// `std::env::set_var`, only while the process has a single thread (else
/// an error and nothing set).
pub fn set_env(var: &str, value: &OsStr) -> io::Result<()> {
    single_threaded()?;
    // SAFETY: the process has exactly one thread (counted just above), and
    // only this thread could start another, which it does not during the
    // call: nothing reads or writes the environment concurrently.
    unsafe { std::env::set_var(var, value) };
    Ok(())
}

/// Takes the descriptor whose number a parent process left in environment
/// variable `var` (for a child it started), and removes the variable, so it
/// is taken once. Only while the process has a single thread. `Ok(None)`
/// without the variable. Refused: a number that is not a descriptor, one of
/// stdin/stdout/stderr, or one with close-on-exec set (every descriptor std
/// and this module open has it, so such a descriptor was opened here, not
/// inherited, and has an owner already).
pub fn take_inherited_fd(var: &str) -> io::Result<Option<OwnedFd>> {
    let Some(v) = std::env::var_os(var) else { return Ok(None) };
    let fd: RawFd = v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| io_err(libc::EBADF))?;
    looks_inherited(fd)?;
    single_threaded()?;
    // SAFETY: one thread only (checked just above, and this thread starts
    // none during the call): nothing reads the environment concurrently.
    unsafe { std::env::remove_var(var) };
    // SAFETY: `fd` is open (F_GETFD succeeded) and has no owner in this
    // process: it is not stdio, and it lacks close-on-exec, which every
    // descriptor opened in this process by std or this module carries, so it
    // was inherited across exec; the variable naming it is gone, so no second
    // call can wrap the same number. The OwnedFd is its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_cloexec(&owned, true)?;
    Ok(Some(owned))
}

/// Refuses a descriptor number that cannot be one a parent passed down:
/// stdin/stdout/stderr, a closed number, or one with close-on-exec set.
fn looks_inherited(fd: RawFd) -> io::Result<()> {
    if fd <= 2 {
        return Err(io_err(libc::EBADF));
    }
    // SAFETY: F_GETFD takes integers only: no pointer, so no memory of ours
    // is read or written whatever `fd` is.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    if flags & libc::FD_CLOEXEC != 0 {
        return Err(io_err(libc::EBADF));
    }
    Ok(())
}

/// Sets or clears close-on-exec on `fd`.
pub fn set_cloexec(fd: &impl AsRawFd, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD takes integers only and touches no memory of ours; the
    // borrow of `fd` keeps the descriptor open, so the number names it.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flag) }).map(|_| ())
}

/// umask(2): sets the file-mode creation mask, returns the old one.
pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask takes an integer only, touches no memory and cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) }
}

/// kill(2).
pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes integers only and touches no memory of ours (which
    // process gets the signal is the caller's concern, not memory safety).
    check(unsafe { libc::kill(pid, sig) }).map(|_| ())
}

/// getxattr(2) on a path (symlinks followed), at most `cap` bytes of value.
pub fn getxattr_path(path: &std::path::Path, name: &std::ffi::CStr, cap: usize) -> io::Result<Vec<u8>> {
    let c = cstr(path.as_os_str())?;
    let mut buf = vec![0u8; cap];
    // SAFETY: `c` and `name` are NUL-terminated and alive for the call, and
    // getxattr writes at most `buf.len()` bytes into `buf`, which we own
    // exclusively: it never writes past the buffer it is given.
    let n = unsafe { libc::getxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn dir() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().unwrap();
        let fd = openat(libc::AT_FDCWD, t.path().as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0).unwrap();
        (t, fd)
    }

    #[test]
    fn open_beneath_refuses_links_and_escapes() {
        let (t, d) = dir();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        std::fs::write(t.path().join("sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink(t.path().join("sub"), t.path().join("link")).unwrap();
        let fd = d.as_raw_fd();
        assert!(open_beneath(fd, OsStr::new("sub/f"), libc::O_RDONLY, 0).is_ok());
        for bad in ["link/f", "../x", "/etc/passwd", "sub/../../x"] {
            assert!(open_beneath(fd, OsStr::new(bad), libc::O_RDONLY, 0).is_err(), "{bad}");
        }
        assert_eq!(
            open_beneath(fd, OsStr::new("link"), libc::O_RDONLY, 0).unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
        let l = open_path(fd, OsStr::new("link")).unwrap();
        assert_eq!(fstat(l.as_raw_fd()).unwrap().st_mode & libc::S_IFMT, libc::S_IFLNK, "O_PATH gives the link itself");
        // The fallback (kernels without openat2) behaves the same.
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        assert!(open_beneath_fallback(fd, OsStr::new("sub/f"), flags, 0).is_ok());
        for bad in ["link/f", "link", "../x", "/etc/passwd", "sub/../f"] {
            assert!(open_beneath_fallback(fd, OsStr::new(bad), flags, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn read_regular_refuses_fifos_links_and_big_files() {
        let (t, d) = dir();
        let fd = d.as_raw_fd();
        std::fs::write(t.path().join("small"), b"hello").unwrap();
        std::fs::write(t.path().join("big"), vec![0u8; 100]).unwrap();
        std::os::unix::fs::symlink("/dev/zero", t.path().join("zero")).unwrap();
        let fifo = CString::new(t.path().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: `fifo` is a CString alive for the call; mkfifo writes no memory.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert_eq!(read_regular(fd, OsStr::new("small"), 64).unwrap(), b"hello");
        for bad in ["big", "zero", "fifo", "missing"] {
            assert!(read_regular(fd, OsStr::new(bad), 64).is_err(), "{bad}");
        }
    }

    #[test]
    fn replace_file_replaces_a_planted_link_instead_of_following_it() {
        let (t, d) = dir();
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, t.path().join("name")).unwrap();
        replace_file(d.as_raw_fd(), OsStr::new("name"), b"new", 0o444).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let md = std::fs::symlink_metadata(t.path().join("name")).unwrap();
        assert!(md.is_file());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(md.permissions().mode() & 0o777, 0o444);
        assert_eq!(std::fs::read(t.path().join("name")).unwrap(), b"new");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 2);
    }

    #[test]
    fn environment_changes_only_with_one_thread() {
        // The test harness runs threads of its own; one more makes sure.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        let e = set_env("KMSFS_SYS_TEST", OsStr::new("x")).unwrap_err();
        assert!(e.to_string().contains("one thread"), "{e}");
        assert!(std::env::var_os("KMSFS_SYS_TEST").is_none());
        drop(tx);
        let _ = t.join();
    }

    #[test]
    fn only_descriptors_inherited_across_exec_are_taken() {
        assert!(take_inherited_fd("KMSFS_SYS_TEST_UNSET").unwrap().is_none());
        // Stdio, a closed number, and a descriptor opened here (std sets
        // close-on-exec, so it has an owner already) are all refused.
        let (_t, owned) = dir();
        for fd in [0, 1, 2, 1_000_000, owned.as_raw_fd()] {
            assert!(looks_inherited(fd).is_err(), "{fd}");
        }
        // What a parent passes down: close-on-exec clear.
        set_cloexec(&owned, false).unwrap();
        assert!(looks_inherited(owned.as_raw_fd()).is_ok());
    }

    #[test]
    fn proc_fd_paths_stop_at_the_pinned_symlink() {
        let (t, d) = dir();
        std::fs::write(t.path().join("target"), b"x").unwrap();
        std::os::unix::fs::symlink("target", t.path().join("link")).unwrap();
        let l = open_path(d.as_raw_fd(), OsStr::new("link")).unwrap();
        // user.* xattrs are refused on a symlink: the call reached the link,
        // not its target.
        assert!(xattr::set(&l, OsStr::new("user.t"), b"v", 0).is_err());
        let tf = open_path(d.as_raw_fd(), OsStr::new("target")).unwrap();
        assert_eq!(xattr::list(&tf).unwrap_or_default(), b"");
        assert_eq!(reopen(&l, libc::O_RDONLY).unwrap_err().raw_os_error(), Some(libc::ELOOP));
    }
}
