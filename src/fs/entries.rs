//! Directory entries: mknod, mkdir, symlink, link, unlink, rmdir, rename.

use super::*;

impl EncFs {
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
    pub(super) fn dirs_moving(
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
    pub(super) fn dirs_moved(&self, moves: Vec<DirMove>, done: bool) {
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
        // rename(2) of one hard link over another of the same inode succeeds
        // and leaves both names: the source's side file goes only if its
        // entry did (one stat, for long names only).
        if !exchange
            && (parent != newparent || from != to)
            && from.side_file().is_some()
            && sys::statat(pfd, &from.on_disk).is_err_and(|e| e.raw_os_error() == Some(libc::ENOENT))
        {
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
}
