//! Reading: whole blocks scattered into the reply, partial ones through
//! scratch, and the error path (holes, markers, stale last blocks).

use super::*;

impl EncryptedFile {
    /// Like `read_at`, but into a caller-owned buffer that is reused across
    /// calls (no fresh 1 MiB allocation per request). Returns the plaintext
    /// length, which starts at `out[0]`. Whole blocks are read scattered
    /// (ciphertext into `out`) and opened there; only a partly wanted first
    /// or last block takes a copy. A block that fails fails the request and
    /// names itself; the blocks before it stay readable on their own.
    pub fn read_into(
        &self,
        key: Option<&DataKey>,
        off: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, FileError> {
        if len == 0 {
            return Ok(0);
        }
        if self.size == 0 && !self.size_ok {
            // A header and no whole block: block 0 is torn or missing.
            let backing = self.file.metadata()?.len();
            return Err(FileError::BadSize(backing));
        }
        if off >= self.size {
            return Ok(0);
        }
        let key = key.ok_or(FileError::NeedKey)?;
        let h = self.check_key(key)?;
        let end = off.checked_add(len as u64).ok_or(FileError::TooLarge)?.min(self.size);
        let bs = self.layout.block_size();
        let (first, last) = (off / bs, (end - 1) / bs);
        let start = self.layout.block_offset(first);
        let want = (end - off) as usize;
        if out.len() < want {
            out.resize(want, 0);
        }
        let out = &mut out[..want];
        // A partly wanted first or last block is read into scratch, opened in
        // place and the wanted part copied. Every whole block in between is
        // read scattered: its nonce and tag into scratch, its ciphertext
        // straight into its slot in `out`, where it is opened in place.
        let last_plen = self.layout.plain_len(self.size, last) as usize;
        let from_first = (off - first * bs) as usize;
        let to_last = (end - last * bs) as usize;
        let head = from_first != 0 || (first == last && to_last < last_plen);
        let tail = first != last && to_last < last_plen;
        let head_len = if head { self.layout.plain_len(self.size, first) as usize + BLOCK_OVERHEAD } else { 0 };
        let tail_len = if tail { last_plen + BLOCK_OVERHEAD } else { 0 };
        let mid_first = first + u64::from(head);
        let mids = ((last + 1 - u64::from(tail)).saturating_sub(mid_first)) as usize;
        let head_out = if head { (head_len - BLOCK_OVERHEAD - from_first).min(want) } else { 0 };
        let tail_out = if tail { to_last } else { 0 };
        let mut scratch = Scratch::take();
        let (head_buf, rest) = scratch.get(head_len + tail_len + mids * TRAILER).split_at_mut(head_len);
        let (tail_buf, trailers) = rest.split_at_mut(tail_len);
        let (out_head, rest) = out.split_at_mut(head_out);
        let (out_mid, out_tail) = rest.split_at_mut(want - head_out - tail_out);
        {
            let mut iov = Vec::with_capacity(2 + 3 * mids);
            if head {
                iov.push(IoSliceMut::new(head_buf));
            }
            for (t, plain) in trailers.chunks_mut(TRAILER).zip(out_mid.chunks_mut(bs as usize)) {
                let (nonce, tag) = t.split_at_mut(NONCE_LEN);
                iov.extend([IoSliceMut::new(nonce), IoSliceMut::new(plain), IoSliceMut::new(tag)]);
            }
            if tail {
                iov.push(IoSliceMut::new(tail_buf));
            }
            crate::sys::preadv_exact(self.file.as_raw_fd(), &mut iov, start)
                .map_err(|_| FileError::Block { index: last, what: "missing (file truncated)" })?;
        }
        if head {
            let n = out_head.len();
            out_head.copy_from_slice(&self.open_one(h, key, first, head_buf)?[from_first..from_first + n]);
        }
        let last_index = self.last_index();
        for (k, (t, plain)) in trailers.chunks(TRAILER).zip(out_mid.chunks_mut(bs as usize)).enumerate() {
            let i = mid_first + k as u64;
            let (nonce, tag) = t.split_at(NONCE_LEN);
            self.open_parts(h, key, i, Some(i) == last_index, nonce, tag, plain)?;
        }
        if tail {
            out_tail.copy_from_slice(&self.open_one(h, key, last, tail_buf)?[..to_last]);
        }
        Ok(want)
    }

    /// Opens stored block `index` (exactly its stored length) in place;
    /// returns its plaintext.
    pub(super) fn open_one<'b>(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        sealed: &'b mut [u8],
    ) -> Result<&'b [u8], FileError> {
        let is_last = Some(index) == self.last_index();
        let n = sealed.len();
        if n < BLOCK_OVERHEAD {
            return Err(FileError::Block { index, what: "missing (file truncated)" });
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let (plain, tag) = rest.split_at_mut(n - BLOCK_OVERHEAD);
        self.open_parts(h, key, index, is_last, nonce, tag, plain)?;
        Ok(&*plain)
    }

    /// Opens block `index` from its stored parts, read apart: the nonce,
    /// the tag, and the ciphertext in `plain`, which becomes the plaintext.
    /// The fast path is one AEAD open; holes, markers and stale last
    /// blocks are handled on the error path.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_parts(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        is_last: bool,
        nonce: &[u8],
        tag: &[u8],
        plain: &mut [u8],
    ) -> Result<(), FileError> {
        if !is_last && is_hole(nonce) && is_hole(tag) && is_hole(plain) {
            // A hole: its "ciphertext" already reads as zeros. In v2 only
            // where a marker says the user made it.
            if h.version != v2::VERSION || self.st.converting() || (self.st.holes() && self.hole_proven(h, index)?) {
                return Ok(());
            }
            return Err(FileError::Block { index, what: "zeroed, and no hole marker covers it" });
        }
        let aad = self.aad_bytes(h, index, is_last, self.st.lgen);
        if open_detached_v(self.bkey(key), &aad, nonce, tag, plain).is_ok() {
            return Ok(());
        }
        self.open_fallback(h, key, index, is_last, plain)
    }

    /// Opens `stored` (one slot as read) as a v2 block under `k` in every
    /// form the state allows at its place: the last block at the current
    /// generation or, while a change is pending, the one before; with
    /// `stale`, also as a stale last block of either. Returns the plaintext
    /// length (at `work[NONCE_LEN..]`) and whether it was a stale block.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_v2_slot(
        &self,
        h: &FileHeader,
        k: &DataKey,
        index: u64,
        last: bool,
        stored: &[u8],
        work: &mut [u8],
        stale: bool,
    ) -> Option<(usize, bool)> {
        // A block that is not the last carries generation 0 whatever `g` is
        // (`v2::aad`): one try.
        for g in self.st.last_gens().take(if last { 2 } else { 1 }) {
            let w = &mut work[..stored.len()];
            w.copy_from_slice(stored);
            if let Ok(p) = open_in_place_v(k, &self.aad_bytes(h, index, last, g), w) {
                return Some((p.len(), false));
            }
        }
        if !(stale && self.st.pending()) {
            return None;
        }
        self.st
            .last_gens()
            .find_map(|g| open_stale_slot(k, &self.aad_bytes(h, index, true, g), stored, work))
            .map(|n| (n, true))
    }

    /// Reads slot `index` (`len` stored bytes) into `buf`.
    pub(super) fn read_slot<'b>(&self, index: u64, len: usize, buf: &'b mut [u8]) -> Result<&'b mut [u8], FileError> {
        let s = &mut buf[..len];
        read_exact_at(&self.file, s, self.layout.block_offset(index))
            .map_err(|_| FileError::Block { index, what: "missing (file truncated)" })?;
        Ok(s)
    }

    /// Stored length of slot `index` at the current size.
    pub(super) fn slot_len(&self, index: u64) -> usize {
        self.layout.plain_len(self.size, index) as usize + BLOCK_OVERHEAD
    }

    /// The error path of a v2 block: a hole marker (reads as zeros), or,
    /// while a length change is pending, a stale last block; else an error.
    pub(super) fn open_fallback(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        is_last: bool,
        out: &mut [u8],
    ) -> Result<(), FileError> {
        if h.version != v2::VERSION {
            return self.open_stale(h, key, index, out);
        }
        let keys = self.keys.get().ok_or(FileError::NeedKey)?;
        let len = out.len() + BLOCK_OVERHEAD;
        let mut scratch = Scratch::take();
        let (stored, work) = scratch.get(2 * len).split_at_mut(len);
        self.read_slot(index, len, stored)?;
        if let Some((_, g)) = v2::open_marker(keys, &self.aad(h, index, is_last), stored)
            && self.st.accepts(g, is_last)
        {
            out.fill(0);
            return Ok(());
        }
        let found =
            self.open_v2_slot(h, keys.block(), index, is_last, stored, work, true).map(|(n, _)| n).or_else(|| {
                // Converting: a block not rewritten yet, under the previous key.
                if !self.st.converting() {
                    return None;
                }
                match self.prev_key(h, key) {
                    Some(prev) => self.open_v2_slot(h, prev, index, is_last, stored, work, true).map(|(n, _)| n),
                    None => open_v1(key, &self.aad(h, index, is_last), &self.aad(h, index, true), stored, work),
                }
            });
        let n = found.ok_or(FileError::Block { index, what: "authentication failed" })?;
        out[..n].copy_from_slice(&work[NONCE_LEN..NONCE_LEN + n]);
        out[n..].fill(0);
        Ok(())
    }

    /// Whether zero block `index` lies in a run of holes that a marker
    /// proves (cached per run until the file changes).
    pub(super) fn hole_proven(&self, h: &FileHeader, index: u64) -> Result<bool, FileError> {
        if let Ok(g) = self.proven.lock()
            && let Some((s, m)) = *g
            && (s..m).contains(&index)
        {
            return Ok(true);
        }
        match self.find_marker(h, index)? {
            Some((s, m)) if s <= index => {
                // Only the slots the scan saw zero (index..m) are proven: a
                // slot before `index` may hold data between it and the marker.
                if let Ok(mut g) = self.proven.lock() {
                    *g = Some((index, m));
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The first slot after zero block `index` that is not all zeros, if it
    /// is a valid marker: (its run start, its index). Skips what the
    /// backing file holds as holes with SEEK_DATA, so a hole costs O(1).
    pub(super) fn find_marker(&self, h: &FileHeader, index: u64) -> Result<Option<(u64, u64)>, FileError> {
        let (Some(last), Some(keys)) = (self.last_index(), self.keys.get()) else { return Ok(None) };
        let sb = self.layout.stored_block();
        let hs = self.layout.header_size();
        let mut scratch = Scratch::take();
        let buf = scratch.get(sb as usize);
        let mut j = index + 1;
        while j <= last {
            match crate::sys::lseek(self.file.as_raw_fd(), self.layout.block_offset(j), libc::SEEK_DATA) {
                Ok(d) => j = j.max(d.saturating_sub(hs) / sb),
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
                Err(_) => {} // no SEEK_DATA here: read on
            }
            if j > last {
                return Ok(None);
            }
            let slot = self.read_slot(j, self.slot_len(j), buf)?;
            if is_hole(slot) {
                j += 1;
                continue;
            }
            let is_last = j == last;
            return Ok(v2::open_marker(keys, &self.aad(h, j, is_last), slot)
                .filter(|&(_, g)| self.st.accepts(g, is_last))
                .map(|(s, _)| (s, j)));
        }
        Ok(None)
    }

    /// For v2 updates that keep holes provable: whether slot `index` is
    /// data, or a hole or marker in a run (and which).
    pub(super) fn slot_kind(&self, h: &FileHeader, index: u64) -> Result<Slot, FileError> {
        let keys = self.keys.get().ok_or(FileError::NeedKey)?;
        let mut scratch = Scratch::take();
        let len = self.slot_len(index);
        let slot = self.read_slot(index, len, scratch.get(len))?;
        if is_hole(slot) {
            return match self.find_marker(h, index)? {
                Some((start, marker)) if start <= index => Ok(Slot::Run { start, marker }),
                _ => Err(FileError::Block { index, what: "zeroed, and no hole marker covers it" }),
            };
        }
        let is_last = Some(index) == self.last_index();
        Ok(match v2::open_marker(keys, &self.aad(h, index, is_last), slot) {
            Some((start, g)) if self.st.accepts(g, is_last) => Slot::Run { start, marker: index },
            _ => Slot::Data,
        })
    }

    /// The error path of every block read: block `index`, whose plaintext is
    /// `out.len()` bytes at its current flag, did not open. It may be a stale
    /// last block that an interrupted append or truncation left (see
    /// docs/FORMAT.md, "Interrupted updates"). A failed open wipes the
    /// buffer, so the slot is read again. On success `out` holds the stale
    /// block's plaintext followed by zeros.
    pub(super) fn open_stale(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        out: &mut [u8],
    ) -> Result<(), FileError> {
        let len = out.len() + BLOCK_OVERHEAD;
        let mut scratch = Scratch::take();
        let (stored, work) = scratch.get(2 * len).split_at_mut(len);
        read_exact_at(&self.file, stored, self.layout.block_offset(index))
            .map_err(|_| FileError::Block { index, what: "missing (file truncated)" })?;
        let n = open_stale_slot(key, &self.aad(h, index, true).bytes(), stored, work)
            .ok_or(FileError::Block { index, what: "authentication failed" })?;
        out[..n].copy_from_slice(&work[NONCE_LEN..NONCE_LEN + n]);
        out[n..].fill(0);
        Ok(())
    }

    /// Reads block `index` at its current length and flag into `plain`
    /// (at least that long); returns the length. With `keep`, the stored
    /// bytes are left there as well, so an update can undo itself; without,
    /// the ciphertext is read straight into `plain` and the nonce and tag
    /// apart, with no scratch buffer.
    pub(super) fn read_block(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        plain: &mut [u8],
        keep: Option<&mut [u8]>,
    ) -> Result<usize, FileError> {
        let plen = self.layout.plain_len(self.size, index) as usize;
        if plen == 0 {
            return Ok(0);
        }
        let missing = |_| FileError::Block { index, what: "missing (file truncated)" };
        let off = self.layout.block_offset(index);
        let plain = &mut plain[..plen];
        let mut trailer = [0u8; TRAILER];
        match keep {
            Some(k) => {
                let stored = &mut k[..plen + BLOCK_OVERHEAD];
                read_exact_at(&self.file, stored, off).map_err(missing)?;
                plain.copy_from_slice(&stored[NONCE_LEN..NONCE_LEN + plen]);
                trailer[..NONCE_LEN].copy_from_slice(&stored[..NONCE_LEN]);
                trailer[NONCE_LEN..].copy_from_slice(&stored[NONCE_LEN + plen..]);
            }
            None => {
                let (nonce, tag) = trailer.split_at_mut(NONCE_LEN);
                let mut iov = [IoSliceMut::new(nonce), IoSliceMut::new(plain), IoSliceMut::new(tag)];
                crate::sys::preadv_exact(self.file.as_raw_fd(), &mut iov, off).map_err(missing)?;
            }
        }
        let is_last = Some(index) == self.last_index();
        let (nonce, tag) = trailer.split_at(NONCE_LEN);
        self.open_parts(h, key, index, is_last, nonce, tag, plain)?;
        Ok(plen)
    }
}
