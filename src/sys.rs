//! Thin, checked wrappers over the *at(2) syscalls the filesystem needs on
//! O_PATH descriptors. Each returns `io::Result`; none panics.
#![allow(unsafe_code)]

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

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
    // SAFETY: `c` is a valid NUL-terminated string; the fd is checked.
    let fd = check(unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An O_PATH|O_NOFOLLOW descriptor for `name` in `dir`.
pub fn open_path(dir: RawFd, name: &OsStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
}

/// fstatat(fd, "", AT_EMPTY_PATH): stat of an O_PATH descriptor.
pub fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers; empty path with AT_EMPTY_PATH.
    check(unsafe { libc::fstatat(fd, c"".as_ptr(), &mut st, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// fstatat(dir, name, AT_SYMLINK_NOFOLLOW).
pub fn statat(dir: RawFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    check(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

/// mkdirat(2).
pub fn mkdirat(dir: RawFd, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid pointer.
    check(unsafe { libc::mkdirat(dir, c.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

/// mknodat(2).
pub fn mknodat(dir: RawFd, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid pointer.
    check(unsafe { libc::mknodat(dir, c.as_ptr(), mode as libc::mode_t, rdev as libc::dev_t) }).map(|_| ())
}

/// symlinkat(2).
pub fn symlinkat(target: &OsStr, dir: RawFd, name: &OsStr) -> io::Result<()> {
    let (t, c) = (cstr(target)?, cstr(name)?);
    // SAFETY: valid pointers.
    check(unsafe { libc::symlinkat(t.as_ptr(), dir, c.as_ptr()) }).map(|_| ())
}

/// readlinkat(fd, "").
pub fn readlink(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer is valid for its length.
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
    // SAFETY: valid pointer.
    check(unsafe { libc::unlinkat(dir, c.as_ptr(), flags) }).map(|_| ())
}

/// renameat2(2).
pub fn renameat2(od: RawFd, on: &OsStr, nd: RawFd, nn: &OsStr, flags: u32) -> io::Result<()> {
    let (a, b) = (cstr(on)?, cstr(nn)?);
    // SAFETY: valid pointers.
    check(unsafe { libc::renameat2(od, a.as_ptr(), nd, b.as_ptr(), flags) }).map(|_| ())
}

/// linkat(fd, "", dir, name, AT_EMPTY_PATH), falling back to /proc when the
/// daemon lacks CAP_DAC_READ_SEARCH.
pub fn link_fd(fd: &OwnedFd, dir: RawFd, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: valid pointers.
    let r = unsafe { libc::linkat(fd.as_raw_fd(), c"".as_ptr(), dir, c.as_ptr(), libc::AT_EMPTY_PATH) };
    if r == 0 {
        return Ok(());
    }
    let p = cstr(proc_path(fd).as_os_str())?;
    // SAFETY: valid pointers.
    check(unsafe { libc::linkat(libc::AT_FDCWD, p.as_ptr(), dir, c.as_ptr(), libc::AT_SYMLINK_FOLLOW) }).map(|_| ())
}

/// chmod through /proc (fchmod does not work on O_PATH descriptors).
pub fn chmod(fd: &OwnedFd, mode: u32) -> io::Result<()> {
    let p = cstr(proc_path(fd).as_os_str())?;
    // SAFETY: valid pointer.
    check(unsafe { libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode as libc::mode_t, 0) }).map(|_| ())
}

/// fchownat(fd, "", AT_EMPTY_PATH); `u32::MAX` leaves a field unchanged.
pub fn chown(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: empty path with AT_EMPTY_PATH.
    check(unsafe { libc::fchownat(fd, c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) })
        .map(|_| ())
}

/// utimensat on a path relative to `dir` (symlinks) or on /proc (others).
pub fn utimens(dir: RawFd, name: &OsStr, times: &[libc::timespec; 2], nofollow: bool) -> io::Result<()> {
    let c = cstr(name)?;
    let flags = if nofollow { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
    // SAFETY: valid pointers.
    check(unsafe { libc::utimensat(dir, c.as_ptr(), times.as_ptr(), flags) }).map(|_| ())
}

/// statvfs(2).
pub fn statvfs(path: &std::path::Path) -> io::Result<libc::statvfs> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    check(unsafe { libc::statvfs(c.as_ptr(), &mut s) })?;
    Ok(s)
}

/// fallocate(2) on a regular descriptor.
pub fn fallocate(fd: RawFd, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall on an owned descriptor.
    check(unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) }).map(|_| ())
}

/// lseek(2) for SEEK_DATA / SEEK_HOLE.
pub fn lseek(fd: RawFd, off: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as u64) }
}

/// lgetxattr/lsetxattr/llistxattr/lremovexattr through /proc.
pub mod xattr {
    use super::*;

    fn path(fd: &OwnedFd) -> io::Result<CString> {
        cstr(proc_path(fd).as_os_str())
    }

    /// getxattr; `size == 0` asks for the length.
    pub fn get(fd: &OwnedFd, name: &OsStr, size: usize) -> io::Result<Vec<u8>> {
        let (p, n) = (path(fd)?, cstr(name)?);
        let mut buf = vec![0u8; size];
        // SAFETY: buffer valid for `size` bytes (null when 0).
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
        // SAFETY: valid pointers and lengths.
        check(unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) }).map(|_| ())
    }

    /// listxattr.
    pub fn list(fd: &OwnedFd) -> io::Result<Vec<u8>> {
        let p = path(fd)?;
        // SAFETY: null buffer asks for the size.
        let n = unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        // SAFETY: buffer valid for its length.
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
        // SAFETY: valid pointers.
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
        // SAFETY: IoSliceMut is ABI-compatible with iovec, and each one
        // borrows a live buffer exclusively for the call.
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
