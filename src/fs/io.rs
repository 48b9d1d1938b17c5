//! Data: read, write, copy_file_range, fsync, release, fallocate, lseek.

use super::*;

impl EncFs {
    /// Reads from an open file and hands the plaintext, or the error, to
    /// `done` exactly once. The plaintext sits in a per-thread buffer, so the
    /// hot path does not allocate (and fault in) a fresh buffer per request.
    pub fn read_with<R>(&self, fh: u64, off: u64, size: u32, done: impl FnOnce(Result<&[u8], FsError>) -> R) -> R {
        let mut buf = Scratch::take();
        match self.read_into(fh, off, size, buf.vec()) {
            Ok(n) => {
                self.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                done(Ok(&buf.vec()[..n]))
            }
            Err(e) => done(Err(e)),
        }
    }

    pub(super) fn read_into(&self, fh: u64, off: u64, size: u32, buf: &mut Vec<u8>) -> Result<usize, FsError> {
        let n = self.file_handle(fh)?;
        if self.shared {
            return self.read_shared(&n, off, size, buf);
        }
        for _ in 0..8 {
            let need = match rlock(&n.open).as_ref() {
                // A file being written reads with its writers' key: the
                // kernel reads pages in to complete partial-page writes.
                Some(o) if o.pinned().is_some() => {
                    return o
                        .enc
                        .read_into(o.pinned().map(|k| &**k), off, size as usize, buf)
                        .map_err(|e| self.file_error(n.ino, e));
                }
                Some(o) => o.enc.key_need(),
                None => return Err(FsError::BadHandle),
            };
            let key = match self.obtain(&need, false)? {
                Obtained::Existing(k) => Some(k),
                _ => None,
            };
            let g = rlock(&n.open);
            let Some(o) = g.as_ref() else { return Err(FsError::BadHandle) };
            if o.enc.key_need() != need {
                continue;
            }
            return o.enc.read_into(key.as_deref(), off, size as usize, buf).map_err(|e| self.file_error(n.ino, e));
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// A read under `-o shared`: the file's size and header are re-read
    /// under its update lock first, so a file another mount grew, cut or
    /// emptied and rewrote (new file ID and key) reads as it is now. The key
    /// is fetched for the header as last seen, outside the locks, and used
    /// only if the header is still that one.
    pub(super) fn read_shared(&self, n: &Node, off: u64, size: u32, buf: &mut Vec<u8>) -> Result<usize, FsError> {
        for _ in 0..8 {
            let (need, pinned) = match rlock(&n.open).as_ref() {
                Some(o) => (o.enc.key_need(), o.pinned().is_some()),
                None => return Err(FsError::BadHandle),
            };
            let key = match pinned {
                true => None,
                false => match self.obtain(&need, false)? {
                    Obtained::Existing(k) => Some(k),
                    _ => None,
                },
            };
            let mut g = wlock(&n.open);
            let Some(o) = g.as_mut() else { return Err(FsError::BadHandle) };
            let l = self.sync_shared(n.ino, o, false)?;
            let r = if let Some(k) = o.pinned() {
                o.enc.read_into(Some(k), off, size as usize, buf)
            } else if o.enc.key_need() == need {
                o.enc.read_into(key.as_deref(), off, size as usize, buf)
            } else {
                drop(l);
                continue;
            };
            drop(l);
            return r.map_err(|e| self.file_error(n.ino, e));
        }
        Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EAGAIN)))
    }

    /// Writes `data` at `off` of an open file; returns bytes written.
    /// `kill_suid` first clears set-ID bits (see `clear_set_id`), which the
    /// kernel asks for on a write by a caller without CAP_FSETID.
    pub fn write(&self, fh: u64, off: u64, data: &[u8], kill_suid: bool) -> Result<u32, FsError> {
        self.writable()?;
        let n = self.file_handle(fh)?;
        if kill_suid {
            self.clear_set_id(&n)?;
        }
        self.with_key_mut(&n, true, |enc, key| match key {
            Some(k) => enc.write_at(k, off, data),
            None => Err(FileError::NeedKey),
        })?;
        self.bytes_written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len() as u32)
    }

    /// copy_file_range: decrypts and re-encrypts through the normal paths
    /// (blocks cannot be shared between files: each has its own key), at
    /// most 1 MiB per call, as the kernel loops for the rest.
    pub fn copy_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        caller: Caller,
    ) -> Result<u32, FsError> {
        self.read_with(fh_in, off_in, len.min(1 << 20) as u32, |r| match r? {
            [] => Ok(0),
            data => self.write(fh_out, off_out, data, !caller.keeps_suid()),
        })
    }

    /// fsync / fdatasync.
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), FsError> {
        let n = self.file_handle(fh)?;
        {
            let g = rlock(&n.open);
            let o = g.as_ref().ok_or(FsError::BadHandle)?;
            o.enc.sync(datasync).map_err(|e| self.file_error(n.ino, e))?;
            // Nothing pending (the usual case): no write lock, no refresh.
            if !o.enc.state().pending() && !self.shared {
                return Ok(());
            }
        }
        // The data is on disk: a pending length change (format v2) ends.
        let mut g = wlock(&n.open);
        let o = g.as_mut().ok_or(FsError::BadHandle)?;
        let _l = self.sync_shared(n.ino, o, true)?;
        o.enc.commit().map_err(|e| self.file_error(n.ino, e))
    }

    /// Closes a file or directory handle.
    pub fn release(&self, fh: u64) -> Result<(), FsError> {
        let h = wlock(&self.handles).remove(&fh).ok_or(FsError::BadHandle)?;
        if let Handle::File(n, writer) = &*h {
            self.detach(n, *writer);
        }
        Ok(())
    }

    /// fallocate: mode 0 extends, KEEP_SIZE alone is a no-op (blocks are
    /// written on demand), PUNCH_HOLE and ZERO_RANGE make holes (format v2)
    /// or zeros.
    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32, caller: Caller) -> Result<(), FsError> {
        self.writable()?;
        let n = self.file_handle(fh)?;
        if !caller.keeps_suid() {
            self.clear_set_id(&n)?;
        }
        let end = off.checked_add(len).ok_or(FsError::TooLarge)?;
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // Only ZERO_RANGE without KEEP_SIZE grows the file, and an empty
        // file then needs its first key, as a write would.
        let grows = mode == libc::FALLOC_FL_ZERO_RANGE;
        match mode {
            0 => self.with_key_mut(&n, true, |enc, key| if end > enc.size() { enc.set_len(key, end) } else { Ok(()) }),
            libc::FALLOC_FL_KEEP_SIZE => Ok(()),
            PUNCH | libc::FALLOC_FL_ZERO_RANGE | 0x11 => self.with_key_mut(&n, grows, |enc, key| {
                let size = enc.size();
                let stop = if mode & libc::FALLOC_FL_KEEP_SIZE != 0 { end.min(size) } else { end };
                if stop <= off {
                    return Ok(());
                }
                // Past the end, zeros are what an extension reads as.
                if off >= size {
                    return enc.set_len(key, stop);
                }
                let Some(key) = key else { return if stop > size { Err(FileError::NeedKey) } else { Ok(()) } };
                let k = match key {
                    KeyArg::Existing(k) => k,
                    KeyArg::Fresh(_) => return Err(FileError::NeedKey),
                };
                // Inside the file: holes (format v2) or sealed zeros; past
                // its end (ZERO_RANGE without KEEP_SIZE): an extension.
                enc.punch(k, off, stop.min(size))?;
                if stop > size {
                    enc.set_len(Some(KeyArg::Existing(k)), stop)?;
                }
                Ok(())
            }),
            _ => Err(FsError::Unsupported),
        }
    }

    /// SEEK_DATA / SEEK_HOLE in whole plaintext blocks. A block is data when
    /// any byte of its stored slot is data in the backing file, and a hole
    /// when its whole slot is (it then reads as zeros). The backing file's
    /// extents are page-grained while slots are B+28 bytes, so an extent
    /// edge seldom falls on a slot edge: a page shared by two slots makes
    /// both data, and a hole narrower than a slot is no hole at all.
    pub fn lseek(&self, fh: u64, off: u64, whence: i32) -> Result<u64, FsError> {
        let n = self.file_handle(fh)?;
        if self.shared {
            // The size as another mount may have left it.
            let mut g = wlock(&n.open);
            let o = g.as_mut().ok_or(FsError::BadHandle)?;
            drop(self.sync_shared(n.ino, o, false)?);
        }
        let g = rlock(&n.open);
        let o = g.as_ref().ok_or(FsError::BadHandle)?;
        let size = o.enc.size();
        let enxio = || FsError::Io(std::io::Error::from_raw_os_error(libc::ENXIO));
        if off >= size {
            return Err(enxio());
        }
        let l = self.layout;
        let (bs, sb, blocks) = (l.block_size(), l.stored_block(), l.block_count(size));
        let end = l.backing_size(size);
        let fd = o.enc.backing().as_raw_fd();
        // The first backing data byte at or after `c` within our blocks.
        let next_data = |c: u64| match sys::lseek(fd, c, libc::SEEK_DATA) {
            Ok(d) => Ok((d < end).then_some(d)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(e) => Err(FsError::Io(e)),
        };
        match whence {
            libc::SEEK_DATA => {
                // Every slot between the start of off's block and `d` is a
                // hole, so the block holding `d` is the first data block.
                let d = next_data(l.block_offset(off / bs))?.ok_or_else(enxio)?;
                Ok(off.max((d - l.header_size()) / sb * bs))
            }
            libc::SEEK_HOLE => {
                let mut i = off / bs;
                while i < blocks {
                    let h = sys::lseek(fd, l.block_offset(i), libc::SEEK_HOLE)?;
                    // Blocks i.. that start before `h` start with data; the
                    // first candidate is the first slot starting at or after h.
                    let k = (h.max(l.header_size()) - l.header_size()).div_ceil(sb);
                    if h >= end || k >= blocks {
                        break;
                    }
                    let slot_end = (l.block_offset(k) + sb).min(end);
                    match next_data(l.block_offset(k))? {
                        Some(d) if d < slot_end => i = k + 1,
                        _ => return Ok(off.max(k * bs)),
                    }
                }
                Ok(size)
            }
            _ => Err(FsError::Invalid),
        }
    }
}
