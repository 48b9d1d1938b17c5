//! Opening and creating files, and the owner of new entries.

use super::*;

impl EncFs {
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
    pub(super) fn set_owner(&self, fd: &OwnedFd, kind: u32, parent: &Node, caller: Caller) -> Result<(), FsError> {
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
    pub(super) fn clear_set_id(&self, n: &Node) -> Result<(), FsError> {
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
    pub(super) fn create_existing(
        &self,
        parent: u64,
        name: &OsStr,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64), FsError> {
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
    pub(super) fn make_entry(
        &self,
        p: &Node,
        s: &StoredName,
        make: impl FnOnce() -> std::io::Result<()>,
    ) -> Result<(), FsError> {
        self.write_side(p, s)?;
        if let Err(e) = make() {
            if e.raw_os_error() != Some(libc::EEXIST) {
                self.remove_side(p, s);
            }
            return Err(e.into());
        }
        Ok(())
    }
}
