//! POSIX record locks, kept as OFD locks on the backing file.

use super::*;

impl EncFs {
    /// `-o shared`: the backing open file description that holds `owner`'s
    /// application locks on `n`, opened on first use.
    pub(super) fn lock_file(&self, n: &Node, owner: u64) -> Result<Arc<File>, FsError> {
        if let Some(f) = lock(&n.app_locks).get(&owner) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.reopen(n, false)?);
        Ok(lock(&n.app_locks).entry(owner).or_insert(f).clone())
    }

    /// The backing range of an application lock on bytes `start..=end`
    /// (`end` past [`APP_LOCK_END`]: to the end of the file).
    pub(super) fn lock_range(start: u64, end: u64) -> Result<(u64, u64), FsError> {
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
}
