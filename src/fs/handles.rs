//! Open state: backing files, data keys pinned per inode, handles and truncation.

use super::*;

impl EncFs {
    pub(super) fn reopen(&self, n: &Node, write: bool) -> Result<File, FsError> {
        let path = sys::proc_path(&n.fd);
        let rw = std::fs::OpenOptions::new().read(true).write(true).open(&path);
        match rw {
            Ok(f) => Ok(f),
            // A read-only backing file (non-root daemon): reads still work.
            Err(e) if !write && e.raw_os_error() == Some(libc::EACCES) => {
                Ok(std::fs::OpenOptions::new().read(true).open(&path)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(super) fn open_enc(&self, n: &Node, write: bool) -> Result<EncryptedFile, FsError> {
        let f = self.reopen(n, write)?;
        // Shared: never read a header another mount is writing. The lock is
        // taken through a duplicate, which outlives it.
        let dup = if self.shared { Some(f.try_clone()?) } else { None };
        let _l = match &dup {
            Some(d) => Some(UpdateLock::take(d, false)?),
            None => None,
        };
        EncryptedFile::open(f, self.layout, self.volume_id).map_err(|e| self.file_error(n.ino, e))
    }

    /// Logs an integrity error once, naming the plaintext path, and maps it.
    pub(super) fn file_error(&self, ino: u64, e: FileError) -> FsError {
        let err = FsError::from_file(e, || self.path_of(ino));
        if let FsError::Integrity { path, detail } = &err {
            self.integrity_log.log(path, detail);
        }
        err
    }

    pub(super) fn obtain(&self, need: &KeyNeed, fresh_if_empty: bool) -> Result<Obtained, FsError> {
        match need {
            KeyNeed::Empty if fresh_if_empty => {
                let (k, born) = self.pool.take_dated()?;
                Ok(Obtained::Fresh(k, born))
            }
            KeyNeed::Empty => Ok(Obtained::None),
            KeyNeed::Existing(h) => {
                let ctx = KeyContext::file(h.volume_id, h.file_id);
                Ok(Obtained::Existing(self.keys.get(&h.wrapped, &ctx)?))
            }
        }
    }

    /// Hands back a key no writer holds any more: an unused fresh key goes
    /// back to the pool; an existing one stays only in the cache.
    pub(super) fn unpin(&self, pin: Pin) {
        if let Pin::Fresh(k, born) = pin {
            self.pool.give_back(k, born);
        }
    }

    /// Runs a mutating file operation with the right key: the writers' pinned
    /// key if there is one, else fetched without holding the inode lock;
    /// retries if the file changed meanwhile.
    pub(super) fn with_key_mut<T>(
        &self,
        n: &Node,
        fresh_if_empty: bool,
        mut op: impl FnMut(&mut EncryptedFile, Option<KeyArg<'_>>) -> Result<T, FileError>,
    ) -> Result<T, FsError> {
        {
            let mut g = wlock(&n.open);
            let Some(o) = g.as_mut() else { return Err(FsError::BadHandle) };
            let _l = self.sync_shared(n.ino, o, true)?;
            if let Some(r) = self.with_pin(o, fresh_if_empty, &mut op) {
                return r.map_err(|e| self.file_error(n.ino, e));
            }
        }
        for _ in 0..8 {
            let mut need = match rlock(&n.open).as_ref() {
                Some(o) => o.enc.key_need(),
                None => return Err(FsError::BadHandle),
            };
            let _gate = if need == KeyNeed::Empty && fresh_if_empty {
                let g = lock(&n.first_key);
                // Another writer may have minted the key while we waited.
                need = match rlock(&n.open).as_ref() {
                    Some(o) => o.enc.key_need(),
                    None => return Err(FsError::BadHandle),
                };
                Some(g)
            } else {
                None
            };
            let got = self.obtain(&need, fresh_if_empty)?;
            let mut g = wlock(&n.open);
            let Some(o) = g.as_mut() else { return Err(FsError::BadHandle) };
            let l = self.sync_shared(n.ino, o, true)?;
            if o.enc.key_need() != need {
                drop(l);
                drop(g);
                if let Obtained::Fresh(k, born) = got {
                    self.pool.give_back(k, born);
                }
                continue;
            }
            let arg = match &got {
                Obtained::None => None,
                Obtained::Existing(k) => Some(KeyArg::Existing(k)),
                Obtained::Fresh(f, _) => Some(KeyArg::Fresh(f)),
            };
            let res = op(&mut o.enc, arg).map_err(|e| self.file_error(n.ino, e));
            let header_id = o.enc.header().map(|h| h.file_id);
            let key = match got {
                Obtained::Fresh(f, _) if header_id == Some(f.file_id) => Some(self.keys.insert(f.file_id, f.key)),
                Obtained::Fresh(f, born) => {
                    self.pool.give_back(f, born);
                    None
                }
                Obtained::Existing(k) => Some(k),
                Obtained::None => None,
            };
            // Writers that lost their pin (a race with truncation) get it back.
            let mut old = None;
            if let (Some(id), Some(k)) = (header_id, key)
                && o.writers > 0
                && !o.pin_ready()
            {
                old = o.pin.replace(Pin::Existing(id, k));
            }
            drop(l);
            drop(g);
            if let Some(p) = old {
                self.unpin(p);
            }
            return res;
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// Runs `op` under the inode lock with the writers' pinned key, if it fits
    /// the file as it is now; `None` if there is no such key.
    pub(super) fn with_pin<T>(
        &self,
        o: &mut OpenState,
        fresh_if_empty: bool,
        op: &mut impl FnMut(&mut EncryptedFile, Option<KeyArg<'_>>) -> Result<T, FileError>,
    ) -> Option<Result<T, FileError>> {
        match o.pin.take() {
            Some(Pin::Existing(id, k)) if o.enc.header().is_some_and(|h| h.file_id == id) => {
                let r = op(&mut o.enc, Some(KeyArg::Existing(&k)));
                o.pin = Some(Pin::Existing(id, k));
                Some(r)
            }
            Some(Pin::Fresh(f, born)) if fresh_if_empty && o.enc.header().is_none() => {
                let r = op(&mut o.enc, Some(KeyArg::Fresh(&f)));
                o.pin = Some(if o.enc.header().is_some_and(|h| h.file_id == f.file_id) {
                    Pin::Existing(f.file_id, self.keys.insert(f.file_id, f.key))
                } else {
                    Pin::Fresh(f, born)
                });
                Some(r)
            }
            other => {
                o.pin = other;
                None
            }
        }
    }

    /// Gives the writers of `n` the file's key before their open returns, so
    /// that no write is acknowledged that cannot be sealed: the current
    /// header's key from the cache or KMS, or for an empty file a fresh one
    /// (`fresh` if given, else from the pool or KMS). Fails, with nothing
    /// pinned, if the key cannot be had within the provider's retry budget.
    pub(super) fn pin_key(&self, n: &Node, fresh: Option<(FreshKey, Instant)>) -> Result<(), FsError> {
        let mut fresh = Lent(&self.pool, fresh);
        for _ in 0..8 {
            let need = {
                let g = rlock(&n.open);
                let o = g.as_ref().ok_or(FsError::BadHandle)?;
                if o.pin_ready() || o.writers == 0 {
                    return Ok(());
                }
                o.enc.key_need()
            };
            let got = match &need {
                KeyNeed::Empty => {
                    let (k, born) = match fresh.1.take() {
                        Some(f) => f,
                        None => self.pool.take_dated()?,
                    };
                    Pin::Fresh(k, born)
                }
                KeyNeed::Existing(h) => {
                    let ctx = KeyContext::file(h.volume_id, h.file_id);
                    Pin::Existing(h.file_id, self.keys.get(&h.wrapped, &ctx)?)
                }
            };
            let mut g = wlock(&n.open);
            let o = g.as_mut().ok_or(FsError::BadHandle)?;
            if o.enc.key_need() == need && !o.pin_ready() && o.writers > 0 {
                let old = o.pin.replace(got);
                drop(g);
                if let Some(p) = old {
                    self.unpin(p);
                }
                return Ok(());
            }
            // Changed meanwhile: keep a fresh key for the next round.
            if let Pin::Fresh(k, born) = got {
                fresh.1 = Some((k, born));
            }
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// Attaches open state to a node (shared by all its handles); `writer`
    /// counts a handle that may write.
    pub(super) fn attach(&self, n: &Arc<Node>, write: bool, writer: bool) -> Result<(), FsError> {
        self.attach_with(n, write, writer, None)
    }

    /// Like `attach`, reusing an already open backing descriptor if given
    /// (create), which saves a reopen through /proc.
    pub(super) fn attach_with(
        &self,
        n: &Arc<Node>,
        write: bool,
        writer: bool,
        file: Option<File>,
    ) -> Result<(), FsError> {
        let mut g = wlock(&n.open);
        let o = match g.as_mut() {
            Some(o) => o,
            None => {
                let enc = match file {
                    Some(f) => {
                        EncryptedFile::open(f, self.layout, self.volume_id).map_err(|e| self.file_error(n.ino, e))?
                    }
                    None => self.open_enc(n, write)?,
                };
                if self.shared {
                    // Another mount emptied and rewrote the file since its last
                    // close here: the key of the header it had then goes.
                    let mut closed = lock(&n.closed_file_id);
                    if let Some(old) = *closed
                        && enc.header().is_none_or(|h| h.file_id != old)
                    {
                        self.keys.forget(&old);
                        *closed = None;
                    }
                }
                g.insert(OpenState::new(enc))
            }
        };
        o.handles += 1;
        o.writers += usize::from(writer);
        Ok(())
    }

    pub(super) fn detach(&self, n: &Node, writer: bool) {
        let mut g = wlock(&n.open);
        let mut unpinned = None;
        if let Some(o) = g.as_mut() {
            o.handles = o.handles.saturating_sub(1);
            if writer {
                o.writers = o.writers.saturating_sub(1);
                if o.writers == 0 {
                    // The last writer is gone: from now on the cache's max age
                    // and the provider decide, so revocation takes effect.
                    unpinned = o.pin.take();
                    // Its last length change ends (format v2). A failure
                    // leaves the change pending, which still reads.
                    if let Ok(_l) = self.sync_shared(n.ino, o, true)
                        && let Err(e) = o.enc.commit()
                    {
                        tracing::warn!(ino = n.ino, "could not end a pending length change: {e}");
                    }
                }
            }
            if o.handles == 0 {
                *lock(&n.closed_file_id) = o.enc.header().map(|h| h.file_id);
                *g = None;
            }
        }
        drop(g);
        if let Some(p) = unpinned {
            self.unpin(p);
        }
    }

    pub(super) fn truncate(&self, n: &Arc<Node>, size: u64) -> Result<(), FsError> {
        if size == 0 {
            return self.truncate_to_zero(n, false);
        }
        self.attach(n, true, false)?;
        let r = self.with_key_mut(n, true, |enc, key| enc.set_len(key, size).and_then(|()| enc.commit()));
        self.detach(n, false);
        r
    }

    /// Empties a file without its old key (O_TRUNC, truncate(0)): an
    /// overwrite must work when the key is disabled, KMS is unreachable or
    /// the header is damaged. If the file has writers after this (or
    /// `new_writer` is one more), they get a fresh key first, so when none
    /// can be had nothing has changed. With `new_writer` the caller's handle
    /// is attached as a writer.
    pub(super) fn truncate_to_zero(&self, n: &Arc<Node>, new_writer: bool) -> Result<(), FsError> {
        let (writers, ready) = match rlock(&n.open).as_ref() {
            Some(o) => (o.writers, matches!(o.pin, Some(Pin::Fresh(..))) && o.enc.header().is_none()),
            None => (0, false),
        };
        let mut fresh =
            Lent(&self.pool, if (new_writer || writers > 0) && !ready { Some(self.pool.take_dated()?) } else { None });
        let mut g = wlock(&n.open);
        let o = match g.as_mut() {
            Some(o) => {
                let _l = if self.shared { Some(UpdateLock::take(o.enc.backing(), true)?) } else { None };
                if let Some(h) = o.enc.header() {
                    self.keys.forget(&h.file_id);
                }
                o.enc.set_len(None, 0).map_err(|e| self.file_error(n.ino, e))?;
                o
            }
            None => g.insert(OpenState::new(self.open_emptied(n)?)),
        };
        if new_writer {
            o.handles += 1;
            o.writers += 1;
        }
        let mut old = None;
        if o.writers == 0 {
            old = o.pin.take();
        } else if let Some((k, born)) = fresh.1.take() {
            old = o.pin.replace(Pin::Fresh(k, born));
        }
        if o.handles == 0 {
            *lock(&n.closed_file_id) = None;
            *g = None;
        }
        drop(g);
        if let Some(p) = old {
            self.unpin(p);
        }
        Ok(())
    }

    /// Opens the backing file of an unopened node emptied. The header is
    /// read first only to drop the old key from the cache; if it does not
    /// parse (damaged, foreign), the file is emptied all the same.
    pub(super) fn open_emptied(&self, n: &Node) -> Result<EncryptedFile, FsError> {
        let f = self.reopen(n, true)?;
        // Shared: taken through a duplicate, which outlives it.
        let dup = if self.shared { Some(f.try_clone()?) } else { None };
        let _l = match &dup {
            Some(d) => Some(UpdateLock::take(d, true)?),
            None => None,
        };
        if let Ok(mut enc) = EncryptedFile::open(f, self.layout, self.volume_id) {
            if let Some(h) = enc.header() {
                self.keys.forget(&h.file_id);
            }
            enc.set_len(None, 0).map_err(|e| self.file_error(n.ino, e))?;
            return Ok(enc);
        }
        let f = self.reopen(n, true)?;
        f.set_len(0)?;
        EncryptedFile::open(f, self.layout, self.volume_id).map_err(|e| self.file_error(n.ino, e))
    }

    pub(super) fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        wlock(&self.handles).insert(fh, Arc::new(h));
        fh
    }

    pub(super) fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        rlock(&self.handles).get(&fh).cloned().ok_or(FsError::BadHandle)
    }

    pub(super) fn file_handle(&self, fh: u64) -> Result<Arc<Node>, FsError> {
        match &*self.handle(fh)? {
            Handle::File(n, _) => Ok(n.clone()),
            Handle::Dir(_) => Err(FsError::BadHandle),
        }
    }
}
