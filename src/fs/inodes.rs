//! Lookup and the inode table: lookup, adopt, forget.

use super::*;

impl EncFs {
    /// Looks up `name` in `parent`, adding one kernel reference.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        if parent == ROOT_INO && !self.names.encrypted() && self.is_reserved(name) {
            return Err(FsError::NotFound);
        }
        let p = self.dir(parent)?;
        let s = self.stored(&p, name)?;
        let fd = sys::open_path(p.fd.as_raw_fd(), &s.on_disk)
            .map_err(|e| if e.raw_os_error() == Some(libc::ENOENT) { FsError::NotFound } else { FsError::Io(e) })?;
        self.adopt(parent, name, fd)
    }

    pub(super) fn adopt(&self, parent: u64, name: &OsStr, fd: OwnedFd) -> Result<Attr, FsError> {
        let st = sys::fstat(fd.as_raw_fd())?;
        let ino = self.to_fuse_ino(st.st_ino);
        let node = {
            let mut nodes = wlock(&self.nodes);
            match nodes.get(&ino) {
                Some(n) => {
                    n.lookups.fetch_add(1, Ordering::Relaxed);
                    *lock(&n.name) = (parent, name.to_owned());
                    n.clone()
                }
                None => {
                    let n = Arc::new(Node {
                        ino,
                        fd,
                        kind: Kind::from_mode(st.st_mode),
                        lookups: AtomicU64::new(1),
                        name: Mutex::new((parent, name.to_owned())),
                        open: RwLock::new(None),
                        first_key: Mutex::new(()),
                        dir_id: std::sync::OnceLock::new(),
                        closed_file_id: Mutex::new(None),
                        app_locks: Mutex::new(HashMap::new()),
                    });
                    nodes.insert(ino, n.clone());
                    n
                }
            }
        };
        Ok(self.attr_of(ino, &st, Some(&node)))
    }

    /// Drops `n` kernel references.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let gone = {
            let mut nodes = wlock(&self.nodes);
            let Some(node) = nodes.get(&ino) else { return };
            let prev = node.lookups.fetch_sub(n.min(node.lookups.load(Ordering::Relaxed)), Ordering::Relaxed);
            if prev <= n { nodes.remove(&ino) } else { None }
        };
        // Closing the last descriptor of an unlinked file frees its backing
        // inode, which takes longer than the table update: do it after the
        // lock is released so lookups and other requests do not queue behind it.
        if let Some(node) = gone {
            // The kernel forgets a deleted file right after the unlink (or
            // the last close): its data key need not wait for LRU or max age.
            if let Some(id) = lock(&node.closed_file_id).take()
                && sys::fstat(node.fd.as_raw_fd()).is_ok_and(|st| st.st_nlink == 0)
            {
                self.keys.forget(&id);
            }
        }
    }
}
