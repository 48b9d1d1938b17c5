//! kmsfs's own lock on a backing file across mounts (`-o shared`).

use super::*;

/// Where byte-range locks that applications take through a `-o shared`
/// mount end: they are forwarded to the backing file below this offset
/// (a lock "to the end of the file" stops here), so they never meet the
/// lock kmsfs itself takes at this offset to update a file.
pub const APP_LOCK_END: u64 = 1 << 62;

/// kmsfs's own cross-mount lock on a backing file (`-o shared`): an open
/// file description lock (F_OFD_SETLKW) on one byte at [`APP_LOCK_END`],
/// shared to read, exclusive to write. Taken around every refresh, read
/// and update, it keeps two mounts from interleaving a header creation, a
/// read-modify-write of a partial block or a truncation, and a read from
/// seeing a block half rewritten. Released on drop. Holds the raw
/// descriptor: the caller keeps the file open (and the lock's open file
/// description alive) for the guard's life.
pub struct UpdateLock(std::os::fd::RawFd);

impl UpdateLock {
    /// Waits for the lock on `file`'s open file description.
    pub fn take(file: &File, write: bool) -> std::io::Result<Self> {
        let fd = file.as_raw_fd();
        let ty = if write { libc::F_WRLCK } else { libc::F_RDLCK };
        ofd_lock(fd, libc::F_OFD_SETLKW, ty as i16, APP_LOCK_END, 1)?;
        Ok(Self(fd))
    }
}

impl Drop for UpdateLock {
    fn drop(&mut self) {
        let _ = ofd_lock(self.0, libc::F_OFD_SETLK, libc::F_UNLCK as i16, APP_LOCK_END, 1);
    }
}
