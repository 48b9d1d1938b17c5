//! Attributes: getattr, setattr and timestamps.

use super::*;

impl EncFs {
    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.node_attr(ino, &*self.node(ino)?)
    }

    /// The attributes of a node already in hand, fresh from the backing file.
    pub(super) fn node_attr(&self, ino: u64, n: &Node) -> Result<Attr, FsError> {
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
    pub(super) fn set_times(&self, n: &Node, atime: Option<SetTime>, mtime: Option<SetTime>) -> Result<(), FsError> {
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
}
