//! Reading directories: opendir, readdir, fsyncdir, statfs.

use super::*;

impl EncFs {
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
}
