//! Extended attributes: user.* sealed under the name key and bound to the inode's owner ID.

use super::*;

impl EncFs {
    pub(super) fn xattr_name_ok(name: &OsStr) -> Result<(), FsError> {
        // Only user.* is passed through: trusted/security names would act on
        // the backing files with the daemon's privileges. user.kmsfs.* is ours.
        let b = name.as_bytes();
        if b.starts_with(b"user.") && !b.starts_with(b"user.kmsfs.") { Ok(()) } else { Err(FsError::Unsupported) }
    }

    /// Linux keeps user.* xattrs on regular files and directories only.
    pub(super) fn xattr_capable(n: &Node) -> bool {
        matches!(n.kind, Kind::File | Kind::Dir)
    }

    pub(super) fn xattr_integrity(&self, ino: u64, name: &OsStr) -> FsError {
        let path = self.path_of(ino);
        let attr = names::escape(name.as_bytes());
        tracing::error!(path = %path, xattr = %attr, "xattr value does not decrypt (edited, or copied from another file)");
        FsError::Integrity { path, detail: format!("xattr {attr}: value does not decrypt") }
    }

    /// The owner ID an inode's xattr values are bound to (the
    /// `user.kmsfs.owner` xattr: 16 random bytes, minted by the first
    /// setxattr when `mint`). It travels with the inode through renames and
    /// hard links, and a value copied to another inode does not open there.
    pub(super) fn xattr_owner(&self, n: &Node, mint: bool) -> Result<Option<Id>, FsError> {
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
}
