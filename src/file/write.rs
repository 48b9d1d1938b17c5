//! Updates: writes, truncation and hole punching, each ordered so a
//! failure or crash at any step leaves the data before it readable, and
//! the v2 header state (generations, counters, markers) they keep.

use super::*;

impl EncryptedFile {
    /// Installs a header for an empty file, or checks the given key.
    pub(super) fn ensure_header(&mut self, key: KeyArg<'_>) -> Result<(), FileError> {
        match (key, &self.header) {
            (KeyArg::Fresh(f), None) => {
                // Every new file is v2. Its header reserves the first
                // counters: they are used only under this header's DEK, so
                // the reservation needs no sync of its own.
                let mut h = FileHeader::new_v2(
                    self.layout.block_log2(),
                    self.layout.header_size() as u16,
                    self.volume_id,
                    f.file_id,
                    f.wrapped.clone(),
                );
                let keys = FileKeys::derive(&f.key, &f.file_id, 0);
                let st = v2::State { flags: 0, lgen: 1, epoch: 0, seals: ctr_chunk() };
                h.seal_state(&keys, st);
                let bytes = h.to_bytes()?;
                self.file.write_all_at(&bytes, 0)?;
                self.header = Some(std::sync::Arc::new(h));
                self.header_raw = bytes;
                self.reset_file_state();
                let _ = self.keys.set(keys);
                self.seals_left = st.seals;
                self.verified.store(true, Ordering::Relaxed);
                self.size_ok = true;
                Ok(())
            }
            (KeyArg::Existing(k), Some(_)) => self.check_key(k).map(|_| ()),
            _ => Err(FileError::NeedKey),
        }
    }

    /// Seals blocks `first..` in `region` for a file of `new_size` bytes. A
    /// block that `src` (data, offset) covers whole is sealed straight from
    /// it; any other block's plaintext must already sit in its slot.
    /// Seals blocks `first..` in `region` for a file of `new_size` bytes. A
    /// block that `src` (data, offset) covers whole is sealed straight from
    /// it; any other block's plaintext must already sit in its slot. v2
    /// blocks are counted first ([`Self::take_seals`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn seal(
        &self,
        key: &DataKey,
        first: u64,
        region: &mut [u8],
        new_size: u64,
        src: Option<(&[u8], u64)>,
    ) -> Result<(), FileError> {
        let h = self.header.as_ref().ok_or(FileError::NeedKey)?;
        let key = self.bkey(key);
        let new_last = (new_size - 1) >> self.layout.block_log2();
        let bs = self.layout.block_size();
        let stride = bs as usize + BLOCK_OVERHEAD;
        // v1 nonces come from the RNG in batches, not one call per block.
        let mut nonces = [0u8; NONCE_LEN * 32];
        for (k, chunk) in region.chunks_mut(stride).enumerate() {
            let slot = k % 32;
            if slot == 0 {
                random_fill(&mut nonces).map_err(|_| FileError::Random)?;
            }
            let mut nn = [0u8; NONCE_LEN];
            nn.copy_from_slice(&nonces[slot * NONCE_LEN..(slot + 1) * NONCE_LEN]);
            let i = first + k as u64;
            let aad = self.aad_bytes(h, i, i == new_last, self.st.lgen);
            let plen = chunk.len() - BLOCK_OVERHEAD;
            let whole = src.and_then(|(data, off)| {
                let at = (i * bs).checked_sub(off)? as usize;
                data.get(at..at + plen)
            });
            match whole {
                Some(plain) => seal_to_v(key, &aad, nn, plain, chunk)?,
                None => seal_in_place_v(key, &aad, nn, chunk)?,
            }
        }
        Ok(())
    }

    /// Counts `n` v2 seals before they are made. A writer counts in steps
    /// of 2^20 in the header (one 28-byte write, no sync: the count is a
    /// budget, and nonces are random). When the count would pass the seal
    /// budget, the file is first re-keyed ([`Self::rekey`]). Nothing for v1.
    pub(super) fn take_seals(&mut self, key: &DataKey, n: u64) -> Result<(), FileError> {
        if !self.is_v2() || self.seals_left >= n {
            self.seals_left = self.seals_left.saturating_sub(n);
            return Ok(());
        }
        let step = n.max(ctr_chunk());
        if self.st.seals + step > seal_budget() {
            self.rekey(key)?;
        }
        self.st.seals = (self.st.seals + step).min(u32::MAX as u64);
        self.write_state()?;
        self.seals_left = step - n;
        Ok(())
    }

    /// Writes the v2 header state (`st`) and its tag: one pwrite of 28
    /// bytes inside the first sector.
    pub(super) fn write_state(&mut self) -> Result<(), FileError> {
        let (Some(h), Some(keys)) = (self.header.as_ref(), self.keys.get()) else { return Err(FileError::NeedKey) };
        let mut buf = [0u8; 28];
        let enc = self.st.encode();
        buf[..NONCE_LEN].copy_from_slice(&enc);
        buf[NONCE_LEN..].copy_from_slice(&keys.state_tag(&h.auth_bytes(), &enc));
        self.pwrite(Step::State, &buf, STATE_RANGE.start as u64)?;
        if self.header_raw.len() >= STATE_RANGE.end {
            self.header_raw[STATE_RANGE].copy_from_slice(&buf);
        }
        Ok(())
    }

    /// Starts a change of the file's length (v2): a new generation, with
    /// the one before still valid until [`Self::commit`].
    pub(super) fn begin_length_change(&mut self, holes: bool) -> Result<(), FileError> {
        let lgen = self.st.lgen.checked_add(1).filter(|&g| g <= v2::MAX_LGEN).ok_or(FileError::TooLarge)?;
        self.st.lgen = lgen;
        self.st.flags |= v2::FLAG_PENDING | if holes { v2::FLAG_HOLES } else { 0 };
        self.write_state()
    }

    /// Ends the pending length change (v2): from here on only the current
    /// generation's last block reads. Called at fsync, when the last writer
    /// closes, and after a truncate; cheap when nothing is pending.
    pub fn commit(&mut self) -> Result<(), FileError> {
        if self.is_v2() && self.st.pending() && !self.inherited && self.keys.get().is_some() {
            self.st.flags &= !v2::FLAG_PENDING;
            self.write_state()?;
        }
        Ok(())
    }

    /// Seals a v2 hole marker for slot `index` (`plen` zero bytes) in `out`.
    pub(super) fn seal_marker(&self, index: u64, last: bool, run_start: u64, out: &mut [u8]) -> Result<(), FileError> {
        let (Some(h), Some(keys)) = (self.header.as_ref(), self.keys.get()) else { return Err(FileError::NeedKey) };
        v2::seal_marker(keys, &self.aad(h, index, last), run_start, self.st.lgen, out);
        Ok(())
    }

    /// One write of a multi-step update (tests inject faults here).
    pub(super) fn pwrite(&self, step: Step, buf: &[u8], off: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(r) = fault::hit(step, |n| self.file.write_all_at(&buf[..n.min(buf.len())], off)) {
            return r;
        }
        let _ = step;
        self.file.write_all_at(buf, off)
    }

    /// The ftruncate that ends a shrink.
    pub(super) fn cut(&self, len: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(r) = fault::hit(Step::Truncate, |_| Ok(())) {
            return r;
        }
        self.file.set_len(len)
    }

    /// Reserves `start..end` past the end of the file, so that ENOSPC or
    /// EDQUOT fail here, before a growing update changes anything. A backing
    /// filesystem without fallocate goes on without it.
    pub(super) fn reserve(&self, start: u64, end: u64) -> std::io::Result<()> {
        if end <= start {
            return Ok(());
        }
        #[cfg(test)]
        if let Some(r) = fault::hit(Step::Reserve, |_| Ok(())) {
            return r;
        }
        match crate::sys::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, start, end - start) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    /// Puts a block's stored bytes back after a failed in-place rewrite.
    pub(super) fn restore(&self, off: u64, stored: &[u8]) {
        #[cfg(test)]
        if fault::crashed() {
            return;
        }
        let _ = self.file.write_all_at(stored, off);
    }

    /// Undoes a failed growing update: the old last block's stored bytes (if
    /// its rewrite had started), the old backing size, the space reserved
    /// past it, and the header of a file that had none.
    pub(super) fn undo_growth(
        &mut self,
        backing: u64,
        old_last: Option<(u64, &[u8])>,
        reserved_to: u64,
        fresh_header: bool,
    ) {
        #[cfg(test)]
        if fault::crashed() {
            return;
        }
        if let Some((off, stored)) = old_last {
            self.restore(off, stored);
        }
        let _ = self.file.set_len(backing);
        if reserved_to > backing {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let _ = crate::sys::fallocate(self.file.as_raw_fd(), punch, backing, reserved_to - backing);
        }
        if fresh_header {
            self.header = None;
            self.header_raw.clear();
            self.verified.store(false, Ordering::Relaxed);
            self.reset_file_state();
        }
    }

    /// Writes `data` at `off`, growing the file if needed.
    ///
    /// An overwrite inside the file is one pwrite. A write that grows the
    /// file is ordered so that a failure or a crash at any point leaves the
    /// data before it readable (docs/FORMAT.md, "Interrupted updates"):
    /// space is reserved first; blocks past the old last block are written
    /// next; the old last block, which changes in place (re-sealed as not
    /// last, or longer), is written last and on its own. A failed step puts
    /// the old last block's bytes and the old size back.
    pub fn write_at(&mut self, key: KeyArg<'_>, off: u64, data: &[u8]) -> Result<(), FileError> {
        if let KeyArg::Existing(k) = key {
            self.settle(k)?;
        }
        let old = self.st;
        let fresh = self.header.is_none();
        self.forget_proofs();
        let r = self.write_inner(key, off, data);
        if r.is_err() {
            if fresh && self.header.is_some() {
                // A new file's update failed before its blocks: no header
                // without blocks stays behind.
                self.undo_growth(0, None, 0, true);
            } else {
                self.undo_state(old);
            }
        }
        r
    }

    pub(super) fn write_inner(&mut self, key: KeyArg<'_>, off: u64, data: &[u8]) -> Result<(), FileError> {
        if data.is_empty() {
            return Ok(());
        }
        let k = Self::key_of(&key);
        let end = off.checked_add(data.len() as u64).ok_or(FileError::TooLarge)?;
        let growing = end > self.size;
        let old_backing = self.valid_backing();
        let fresh_header = self.header.is_none();
        self.ensure_header(key)?;
        let new_size = self.size.max(end);
        let bs = self.layout.block_size();
        let sb = self.layout.stored_block() as usize;
        let (first, last) = (off / bs, (end - 1) / bs);
        let old_last = self.last_index();
        let new_last = (new_size - 1) / bs;
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        let plan = self.plan_holes(&h, first, last, growing)?;
        let old_st = self.st;
        let fresh_holes = fresh_header && plan.gap.is_some();
        if self.is_v2() && (growing && !fresh_header || fresh_holes) {
            if fresh_holes {
                self.st.flags |= v2::FLAG_HOLES;
                self.write_state()?;
            } else {
                self.begin_length_change(plan.gap.is_some())?;
            }
        }
        self.take_seals(k, last - first + 2)?;
        let mut len = 0usize;
        for i in first..=last {
            len += self.layout.plain_len(new_size, i) as usize + BLOCK_OVERHEAD;
        }
        let mut scratch = Scratch::take();
        let region = scratch.get(len);
        // A growing write keeps the old last block's stored bytes (`saved`)
        // to undo itself, and re-seals that block in `resealed` when the
        // write starts past it.
        let mut keep = (growing && old_last.is_some()).then(Scratch::take);
        let (saved, resealed): (&mut [u8], &mut [u8]) = match keep.as_mut() {
            Some(s) => s.get(2 * sb).split_at_mut(sb),
            None => (&mut [], &mut []),
        };
        let mut saved_len = 0usize;
        let mut pos = 0usize;
        for i in first..=last {
            let plen = self.layout.plain_len(new_size, i) as usize;
            let bstart = i * bs;
            let slot = &mut region[pos + NONCE_LEN..pos + NONCE_LEN + plen];
            let from = off.max(bstart) - bstart;
            let to = end.min(bstart + plen as u64) - bstart;
            pos += plen + BLOCK_OVERHEAD;
            if from == 0 && to == plen as u64 {
                continue; // whole: sealed straight from `data`
            }
            // A partial block: its slot in the reused buffer holds stale
            // bytes, so lay down the old block (zeros past its end) first.
            let n = match old_last {
                Some(ol) if i <= ol => {
                    let save = (growing && i == ol).then_some(&mut *saved);
                    let n = self.read_block(&h, k, i, slot, save)?;
                    if growing && i == ol {
                        saved_len = n + BLOCK_OVERHEAD;
                    }
                    n
                }
                _ => 0,
            };
            slot[n..].fill(0);
            let src = (bstart + from - off) as usize;
            slot[from as usize..to as usize].copy_from_slice(&data[src..src + (to - from) as usize]);
        }
        if let Some(ol) = old_last
            && growing
        {
            let olen = self.layout.plain_len(self.size, ol) as usize + BLOCK_OVERHEAD;
            if ol < first {
                // The file grows past its last block, which becomes a full,
                // not-last block (zero padded), or a not-last marker.
                let slot = &mut resealed[NONCE_LEN..NONCE_LEN + bs as usize];
                let n = self.read_block(&h, k, ol, slot, Some(&mut *saved))?;
                slot[n..].fill(0);
                match plan.old_last_run {
                    Some(start) => self.seal_marker(ol, false, start, &mut resealed[..sb])?,
                    None => self.seal(k, ol, &mut resealed[..sb], new_size, None)?,
                }
                saved_len = olen;
            } else if saved_len == 0 {
                // The write covers it whole: keep its bytes only to undo.
                read_exact_at(&self.file, &mut saved[..olen], self.layout.block_offset(ol))
                    .map_err(|_| FileError::Block { index: ol, what: "missing (file truncated)" })?;
                saved_len = olen;
            }
        }
        self.seal(k, first, region, new_size, Some((data, off)))?;
        let off_first = self.layout.block_offset(first);
        let mut mark = [0u8; 0].to_vec();
        if let Some((at, start)) = plan.left {
            // The run before the write keeps a marker: a zero block becomes
            // one, which reads as zeros before and after.
            mark.resize(sb, 0);
            self.seal_marker(at, false, start, &mut mark)?;
            self.pwrite(Step::WriteOld, &mark, self.layout.block_offset(at))?;
        }
        if !growing {
            // An overwrite: lengths and flags stay; one pwrite.
            self.pwrite(Step::WriteOld, region, off_first)?;
            return self.fix_right(plan.right, new_size, new_last);
        }
        if !self.size_ok {
            // A torn tail: the write defines the new end; its bytes must not
            // linger in a slot that stays a hole.
            self.file.set_len(old_backing)?;
        }
        let new_backing = self.layout.backing_size(new_size);
        let mut touched_old = false;
        let mut reserved_to = old_backing;
        // A write past the end leaves a gap: a run of holes closed by a
        // marker in the slot before the first new block.
        if let Some((at, start)) = plan.gap {
            mark.resize(sb, 0);
            self.seal_marker(at, false, start, &mut mark)?;
        }
        let gap_at = plan.gap.map(|(at, _)| self.layout.block_offset(at));
        let res = (|| -> std::io::Result<()> {
            let Some(ol) = old_last.filter(|&ol| new_last > ol) else {
                // Growing inside the old last block, or the first blocks of
                // an empty file: one pwrite (after the gap's marker).
                if let Some(at) = gap_at {
                    self.pwrite(Step::WriteNew, &mark, at)?;
                }
                touched_old = old_last.is_some();
                let step = if touched_old { Step::WriteOld } else { Step::WriteNew };
                return self.pwrite(step, region, off_first);
            };
            // Room first, so ENOSPC fails before anything changes. A write
            // far past the end leaves the gap a hole: reserve around it.
            let next = self.layout.block_offset(ol + 1);
            let new_from = self.layout.block_offset(first.max(ol + 1));
            let res_from = gap_at.unwrap_or(new_from);
            reserved_to = new_backing;
            self.reserve(old_backing, if res_from > next { next } else { new_backing })?;
            if res_from > next {
                self.reserve(res_from, new_backing)?;
            }
            // The new blocks past the old last block...
            if let Some(at) = gap_at {
                self.pwrite(Step::WriteNew, &mark, at)?;
            }
            let split = if first > ol { 0 } else { (ol + 1 - first) as usize * sb };
            self.pwrite(Step::WriteNew, &region[split..], new_from)?;
            // ...then the in-place change, the old last block with it.
            touched_old = true;
            if first > ol {
                self.pwrite(Step::WriteOld, &resealed[..sb], self.layout.block_offset(ol))
            } else {
                self.pwrite(Step::WriteOld, &region[..split], off_first)
            }
        })();
        if let Err(e) = res {
            let ol = old_last.filter(|_| touched_old).map(|ol| (self.layout.block_offset(ol), &saved[..saved_len]));
            self.undo_growth(old_backing, ol, reserved_to, fresh_header);
            if !fresh_header {
                self.undo_state(old_st);
            }
            return Err(e.into());
        }
        self.size = new_size;
        self.size_ok = true;
        Ok(())
    }

    /// Puts the v2 state back after a failed update (best effort: a state
    /// left pending still reads the data before the update).
    pub(super) fn undo_state(&mut self, old: v2::State) {
        #[cfg(test)]
        if fault::crashed() {
            return;
        }
        if self.is_v2() && self.st != old {
            // Seals made stay counted.
            let (seals, epoch) = (self.st.seals, self.st.epoch);
            self.st = v2::State { seals, epoch, ..old };
            let _ = self.write_state();
        }
    }

    /// What a v2 write must do to keep every hole provable: for a write of
    /// blocks `first..=last`, the marker that a run left of it needs, the
    /// marker right of it that must start later, the gap it leaves past the
    /// end, and whether the old last block is a marker. Reads the edge
    /// slots only when the file has holes.
    pub(super) fn plan_holes(
        &self,
        h: &FileHeader,
        first: u64,
        last: u64,
        growing: bool,
    ) -> Result<HolePlan, FileError> {
        let mut p = HolePlan::default();
        if !self.is_v2() {
            return Ok(p);
        }
        let old_blocks = self.layout.block_count(self.size);
        if growing && first > old_blocks {
            p.gap = Some((first - 1, old_blocks));
        }
        let Some(ol) = self.last_index() else { return Ok(p) };
        if !self.st.holes() {
            return Ok(p);
        }
        if first <= ol {
            if let Slot::Run { start, .. } = self.slot_kind(h, first)?
                && start < first
            {
                p.left = Some((first - 1, start));
            }
            if let Slot::Run { marker, .. } = self.slot_kind(h, last.min(ol))?
                && marker > last
            {
                p.right = Some((marker, last + 1));
            }
        } else if let Slot::Run { start, marker } = self.slot_kind(h, ol)?
            && marker == ol
        {
            p.old_last_run = Some(start);
        }
        Ok(p)
    }

    /// Rewrites the marker right of a write so its run starts after it.
    pub(super) fn fix_right(&mut self, right: Option<(u64, u64)>, size: u64, last_index: u64) -> Result<(), FileError> {
        let Some((at, start)) = right else { return Ok(()) };
        let mut buf = vec![0u8; self.layout.plain_len(size, at) as usize + BLOCK_OVERHEAD];
        self.seal_marker(at, at == last_index, start, &mut buf)?;
        self.pwrite(Step::WriteOld, &buf, self.layout.block_offset(at))?;
        Ok(())
    }

    /// Truncates or extends to `new_size`. Extending leaves a hole: the gap's
    /// blocks are never written, so the backing file stays sparse.
    ///
    /// Extending is a write of one zero byte at the new end (ordered as any
    /// growing write). Shrinking first re-seals the new last block in place,
    /// followed by zeros to the end of what its slot held, then cuts the
    /// file: a crash in between leaves the data before the new size readable.
    pub fn set_len(&mut self, key: Option<KeyArg<'_>>, new_size: u64) -> Result<(), FileError> {
        if new_size == 0 {
            // A fresh file ID and DEK will be minted on the next write.
            self.file.set_len(0)?;
            self.header = None;
            self.header_raw.clear();
            self.size = 0;
            self.size_ok = true;
            self.verified.store(false, Ordering::Relaxed);
            self.reset_file_state();
            return Ok(());
        }
        if new_size == self.size && self.size_ok {
            return Ok(());
        }
        let key = key.ok_or(FileError::NeedKey)?;
        if let KeyArg::Existing(k) = key {
            self.settle(k)?;
        }
        if new_size > self.size {
            return self.write_at(key, new_size - 1, &[0]);
        }
        let old = self.st;
        self.forget_proofs();
        let r = self.shrink(key, new_size);
        if r.is_err() {
            self.undo_state(old);
        }
        r
    }

    /// Shrinking, or cutting a torn tail at the current size.
    pub(super) fn shrink(&mut self, key: KeyArg<'_>, new_size: u64) -> Result<(), FileError> {
        let k = Self::key_of(&key);
        self.ensure_header(key)?;
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        let v = h.version;
        let bs = self.layout.block_size() as usize;
        let sb = self.layout.stored_block() as usize;
        let nl = (new_size - 1) / bs as u64;
        let q = self.layout.plain_len(new_size, nl) as usize;
        let olen = self.layout.plain_len(self.size, nl) as usize + BLOCK_OVERHEAD;
        let off = self.layout.block_offset(nl);
        // v2: a new last block inside a run of holes becomes the run's
        // marker, so the holes before it stay provable.
        let run = match self.is_v2() && self.st.holes() {
            true => match self.slot_kind(&h, nl)? {
                Slot::Run { start, .. } => Some(start),
                Slot::Data => None,
            },
            false => None,
        };
        if v == v2::VERSION {
            self.begin_length_change(false)?;
        }
        self.take_seals(k, 1)?;
        let mut scratch = Scratch::take();
        let (saved, work) = scratch.get(2 * sb).split_at_mut(sb);
        match self.read_block(&h, k, nl, &mut work[NONCE_LEN..NONCE_LEN + bs], Some(&mut *saved)) {
            Ok(_) => {}
            // A torn tail leaves the last whole block sealed as not last:
            // cutting the file there is what the caller asks for.
            Err(e) if !self.size_ok && Some(nl) == self.last_index() => {
                let w = &mut work[..olen];
                w.copy_from_slice(&saved[..olen]);
                open_in_place_v(self.bkey(k), &self.aad_bytes(&h, nl, false, 0), w).map_err(|_| e)?;
            }
            Err(e) => return Err(e),
        }
        match run {
            Some(start) => self.seal_marker(nl, true, start, &mut work[..q + BLOCK_OVERHEAD])?,
            None => {
                let mut nonce = [0u8; NONCE_LEN];
                random_fill(&mut nonce).map_err(|_| FileError::Random)?;
                let aad = self.aad_bytes(&h, nl, true, self.st.lgen);
                seal_in_place_v(self.bkey(k), &aad, nonce, &mut work[..q + BLOCK_OVERHEAD])?;
            }
        }
        work[q + BLOCK_OVERHEAD..olen].fill(0);
        if let Err(e) = self.pwrite(Step::WriteOld, &work[..olen], off) {
            self.restore(off, &saved[..olen]);
            return Err(e.into());
        }
        if let Err(e) = self.cut(self.layout.backing_size(new_size)) {
            self.restore(off, &saved[..olen]);
            return Err(e.into());
        }
        self.size = new_size;
        self.size_ok = true;
        Ok(())
    }

    /// `fallocate(PUNCH_HOLE)` of `off..end` (inside the file): the parts of
    /// blocks at its edges and the last block are written as zeros; whole
    /// blocks before the last become a run of holes, closed by a marker
    /// (format v2), in O(1) space and time. The marker is written before the
    /// backing range is punched, so a crash in between leaves data or
    /// zeros, both readable. v1 files get sealed zero blocks.
    pub fn punch(&mut self, key: &DataKey, off: u64, end: u64) -> Result<(), FileError> {
        self.settle(key)?;
        let end = end.min(self.size);
        if off >= end {
            return Ok(());
        }
        let bs = self.layout.block_size();
        let last = self.last_index().unwrap_or(0);
        let (a, b) = (off.div_ceil(bs), (end / bs).min(last));
        if !self.is_v2() || a >= b {
            return self.write_zeros(key, off, end);
        }
        self.write_zeros(key, off, a * bs)?;
        self.write_zeros(key, b * bs, end)?;
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        self.check_key(key)?;
        self.forget_proofs();
        // The run the punched blocks join: from an adjacent run on the
        // left, to a marker at b - 1 or to the marker of a run on the right.
        let (mut start, mut from) = (a, a);
        if self.st.holes()
            && a > 0
            && let Slot::Run { start: s, marker } = self.slot_kind(&h, a - 1)?
        {
            start = s;
            if marker == a - 1 {
                from = a - 1;
            }
        }
        let right = if self.st.holes() { self.slot_kind(&h, b)? } else { Slot::Data };
        let (marker_at, punch_to) = match right {
            Slot::Run { marker, .. } => (marker, b),
            Slot::Data => (b - 1, b - 1),
        };
        if !self.st.holes() {
            // On disk before any block relies on it (power loss).
            self.st.flags |= v2::FLAG_HOLES;
            self.write_state()?;
            self.file.sync_data()?;
        }
        let mut buf = vec![0u8; self.slot_len(marker_at)];
        self.seal_marker(marker_at, Some(marker_at) == self.last_index(), start, &mut buf)?;
        self.pwrite(Step::WriteOld, &buf, self.layout.block_offset(marker_at))?;
        self.forget_proofs();
        if punch_to > from {
            let (lo, hi) = (self.layout.block_offset(from), self.layout.block_offset(punch_to));
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if crate::sys::fallocate(self.file.as_raw_fd(), mode, lo, hi - lo).is_err() {
                // No hole punching here: zeros make the same run.
                let zeros = vec![0u8; self.layout.stored_block() as usize];
                for i in from..punch_to {
                    self.pwrite(Step::WriteOld, &zeros, self.layout.block_offset(i))?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn write_zeros(&mut self, key: &DataKey, mut off: u64, end: u64) -> Result<(), FileError> {
        let zeros = vec![0u8; (end.saturating_sub(off)).min(1 << 20) as usize];
        while off < end {
            let l = (end - off).min(zeros.len() as u64);
            self.write_at(KeyArg::Existing(key), off, &zeros[..l as usize])?;
            off += l;
        }
        Ok(())
    }
}
