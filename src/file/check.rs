//! fsck's side: verifying every block, repairing what a crash leaves,
//! and converting a v1 file to v2.

use super::*;

impl EncryptedFile {
    /// Checks the header and every block; for fsck.
    pub fn verify(&self, key: &DataKey) -> Result<VerifyReport, FileError> {
        let mut r = VerifyReport { bad_size: !self.size_ok, ..Default::default() };
        if self.header.is_none() {
            return Ok(r);
        }
        let h = self.check_key(key)?;
        if !self.size_ok {
            r.torn_bytes = self.file.metadata()?.len().saturating_sub(self.valid_backing());
        }
        if h.version == v2::VERSION {
            return self.verify_v2(h, key, r);
        }
        let sb = self.layout.stored_block() as usize;
        let mut buf = vec![0u8; 2 * sb];
        let (stored, work) = buf.split_at_mut(sb);
        let count = self.layout.block_count(self.size);
        for i in 0..count {
            let s = &mut stored[..self.layout.plain_len(self.size, i) as usize + BLOCK_OVERHEAD];
            if read_exact_at(&self.file, s, self.layout.block_offset(i)).is_err() {
                r.bad_blocks.push(i);
                continue;
            }
            let is_last = Some(i) == self.last_index();
            if !is_last && is_hole(s) {
                r.zero_blocks.push(i);
                continue;
            }
            let w = &mut work[..s.len()];
            w.copy_from_slice(s);
            if open_in_place(key, &self.aad(h, i, is_last), w).is_ok() {
                continue;
            }
            if open_stale_slot(key, &self.aad(h, i, true).bytes(), s, work).is_some() {
                r.stale_blocks.push(i);
            } else {
                r.bad_blocks.push(i);
            }
        }
        Ok(r)
    }

    /// `verify` for a v2 file: proven holes and markers are fine; a stale
    /// last block counts only while a length change is pending; while
    /// converting, blocks under the previous key are fine too.
    pub(super) fn verify_v2(
        &self,
        h: &FileHeader,
        key: &DataKey,
        mut r: VerifyReport,
    ) -> Result<VerifyReport, FileError> {
        let keys = self.keys.get().ok_or(FileError::NeedKey)?;
        let sb = self.layout.stored_block() as usize;
        let mut buf = vec![0u8; 2 * sb];
        let (stored, work) = buf.split_at_mut(sb);
        for i in 0..self.layout.block_count(self.size) {
            let is_last = Some(i) == self.last_index();
            let Ok(s) = self.read_slot(i, self.slot_len(i), stored) else {
                r.bad_blocks.push(i);
                continue;
            };
            if !is_last && is_hole(s) {
                if !(self.st.converting() || self.st.holes() && self.hole_proven(h, i)?) {
                    r.bad_blocks.push(i);
                }
                continue;
            }
            if let Some((_, stale)) = self.open_v2_slot(h, keys.block(), i, is_last, s, work, true) {
                if stale {
                    r.stale_blocks.push(i);
                }
                continue;
            }
            if v2::open_marker(keys, &self.aad(h, i, is_last), s).is_some_and(|(_, g)| self.st.accepts(g, is_last)) {
                continue;
            }
            let previous = self.st.converting()
                && match self.prev_key(h, key) {
                    Some(prev) => self.open_v2_slot(h, prev, i, is_last, s, work, true).is_some(),
                    None => open_v1(key, &self.aad(h, i, is_last), &self.aad(h, i, true), s, work).is_some(),
                };
            if !previous {
                r.bad_blocks.push(i);
            }
        }
        Ok(r)
    }

    /// Opens a slot as read (`stored`, up to one stored block) in any way a
    /// crash can leave it: as the last block, as a full not-last block, as
    /// a hole, or as a stale last block. Returns the plaintext length (at
    /// `work[NONCE_LEN..]`) and whether the block must be re-sealed to be
    /// the file's last.
    pub(super) fn open_lenient(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        stored: &[u8],
        work: &mut [u8],
    ) -> Option<(usize, bool)> {
        let (n, full) = (stored.len(), stored.len() == self.layout.stored_block() as usize);
        if n <= BLOCK_OVERHEAD {
            return None;
        }
        let bkey = self.bkey(key);
        if h.version == v2::VERSION {
            // A v2 repair keeps a data block sealed as the last one at this
            // or one of the two generations before (a power loss may keep
            // the commit and lose the update's blocks), a full not-last
            // block, a marker, or a stale last block; never a bare zero
            // slot, which no marker after it can prove any more.
            let gens = (0..3).filter_map(|d| self.st.lgen.checked_sub(d));
            for g in gens.clone() {
                let w = &mut work[..n];
                w.copy_from_slice(stored);
                if open_in_place_v(bkey, &self.aad_bytes(h, index, true, g), w).is_ok() {
                    return Some((n - BLOCK_OVERHEAD, g != self.st.lgen));
                }
            }
            let w = &mut work[..n];
            w.copy_from_slice(stored);
            if full && open_in_place_v(bkey, &self.aad_bytes(h, index, false, 0), w).is_ok() {
                return Some((n - BLOCK_OVERHEAD, true));
            }
            if let Some(keys) = self.keys.get()
                && [true, false].iter().any(|&l| v2::open_marker(keys, &self.aad(h, index, l), stored).is_some())
            {
                work[..n].fill(0);
                return Some((n - BLOCK_OVERHEAD, true));
            }
            return gens
                .clone()
                .find_map(|g| open_stale_slot(bkey, &self.aad_bytes(h, index, true, g), stored, work))
                .map(|p| (p, true));
        }
        let attempt = |last: bool, work: &mut [u8]| {
            work[..n].copy_from_slice(stored);
            open_in_place(bkey, &self.aad(h, index, last), &mut work[..n]).is_ok()
        };
        if attempt(true, work) {
            return Some((n - BLOCK_OVERHEAD, false));
        }
        if full && attempt(false, work) {
            return Some((n - BLOCK_OVERHEAD, true));
        }
        if full && is_hole(stored) {
            work[..n].fill(0);
            return Some((n - BLOCK_OVERHEAD, true));
        }
        open_stale_slot(bkey, &self.aad(h, index, true).bytes(), stored, work).map(|p| (p, true))
    }

    /// Repairs what a torn write or an interrupted update leaves, for
    /// `fsck --repair`; `found` is this file's `verify` report. Cuts a torn
    /// tail back to the last block that authenticates (the final slot, or
    /// the one before it: a torn write leaves at most one partial block),
    /// re-seals that block as the last one, and re-seals stale last blocks
    /// inside the file as full blocks. Other failing blocks are left as
    /// they are. Each step is ordered as in `set_len`, so a crash during a
    /// repair leaves a file that a second run repairs.
    pub fn repair(&mut self, key: &DataKey, found: &VerifyReport) -> Result<RepairReport, FileError> {
        let mut r = RepairReport::default();
        let Some(h) = self.header.clone() else { return Ok(r) };
        self.check_key(key)?;
        self.forget_proofs();
        let v = h.version;
        let backing = self.file.metadata()?.len();
        let sb = self.layout.stored_block();
        let bs = self.layout.block_size() as usize;
        let slots = backing.saturating_sub(self.layout.header_size()).div_ceil(sb);
        let mut buf = vec![0u8; 2 * sb as usize];
        let (stored, work) = buf.split_at_mut(sb as usize);
        let mut keep = None;
        // A torn tail leaves at most one partial block (its size may even
        // look valid), so the block before it may be kept. What is cut is
        // reported; only `fsck --repair` and `settle` (for a crash's
        // leftovers, see there) call this.
        for i in (slots.saturating_sub(2)..slots).rev() {
            let off = self.layout.block_offset(i);
            let s = &mut stored[..(backing - off).min(sb) as usize];
            read_exact_at(&self.file, s, off)?;
            if let Some((n, reseal)) = self.open_lenient(&h, key, i, s, work) {
                keep = Some((i, n, reseal, s.len()));
                break;
            }
        }
        let Some((last, n, reseal, slot_len)) = keep else {
            if slots > 1 {
                return Err(FileError::Block { index: slots - 2, what: "fails, and so does the block after it" });
            }
            // A header and at most one torn block: nothing authentic.
            self.file.set_len(0)?;
            self.file.sync_all()?;
            (r.cut_bytes, r.cut_blocks) = (backing, slots);
            self.header = None;
            self.header_raw.clear();
            self.verified.store(false, Ordering::Relaxed);
            (self.size, self.size_ok) = (0, true);
            return Ok(r);
        };
        let off = self.layout.block_offset(last);
        // A kept v2 slot that reads as zeros (a hole or a marker) closes
        // the run of holes before it as its marker.
        let run = self.run_start_before(&h, last, &stored[..slot_len])?;
        if v == v2::VERSION {
            // The kept block becomes the last of a new generation.
            self.begin_length_change(run.is_some())?;
        }
        if reseal || v == v2::VERSION {
            match run {
                Some(start) => self.seal_marker(last, true, start, &mut work[..n + BLOCK_OVERHEAD])?,
                None => {
                    let nonce = self.repair_nonce(key)?;
                    let w = &mut work[..n + BLOCK_OVERHEAD];
                    let aad = self.aad_bytes(&h, last, true, self.st.lgen);
                    seal_in_place_v(self.bkey(key), &aad, nonce, w)?;
                }
            }
            work[n + BLOCK_OVERHEAD..slot_len].fill(0);
            self.file.write_all_at(&work[..slot_len], off)?;
            r.resealed.push(last);
        }
        let end = off + (n + BLOCK_OVERHEAD) as u64;
        if end < backing {
            self.file.set_len(end)?;
            (r.cut_bytes, r.cut_blocks) = (backing - end, slots - 1 - last);
        }
        (self.size, self.size_ok) = (last * bs as u64 + n as u64, true);
        for &i in found.stale_blocks.iter().filter(|&&i| i < last) {
            let off = self.layout.block_offset(i);
            read_exact_at(&self.file, stored, off)?;
            // (This repair already began a new generation: the stale block
            // carries one of the two before it.)
            let stale = match v {
                v2::VERSION => (1..4)
                    .filter_map(|d| self.st.lgen.checked_sub(d))
                    .find_map(|g| open_stale_slot(self.bkey(key), &self.aad_bytes(&h, i, true, g), stored, work)),
                _ => open_stale_slot(self.bkey(key), &self.aad(&h, i, true).bytes(), stored, work),
            };
            let Some(n) = stale else { continue };
            work[NONCE_LEN + n..NONCE_LEN + bs].fill(0);
            let nonce = self.repair_nonce(key)?;
            let aad = self.aad_bytes(&h, i, false, 0);
            seal_in_place_v(self.bkey(key), &aad, nonce, work)?;
            self.file.write_all_at(work, off)?;
            r.resealed.push(i);
        }
        self.file.sync_all()?;
        // Repaired: the pending change is settled, whoever began it.
        self.inherited = false;
        self.commit()?;
        self.file.sync_all()?;
        Ok(r)
    }

    /// For `repair` (v2): if slot `index` (stored bytes `slot`) is a hole or
    /// a marker, where its run starts: a marker's own start, or the first
    /// of the zero slots right before it.
    pub(super) fn run_start_before(&self, h: &FileHeader, index: u64, slot: &[u8]) -> Result<Option<u64>, FileError> {
        let Some(keys) = self.keys.get().filter(|_| h.version == v2::VERSION) else { return Ok(None) };
        if let Some((s, _)) = [true, false].iter().find_map(|&l| v2::open_marker(keys, &self.aad(h, index, l), slot)) {
            return Ok(Some(s));
        }
        if !is_hole(slot) {
            return Ok(None);
        }
        let sb = self.layout.stored_block() as usize;
        let mut buf = vec![0u8; sb];
        let mut j = index;
        while j > 0 && read_exact_at(&self.file, &mut buf, self.layout.block_offset(j - 1)).is_ok() && is_hole(&buf) {
            j -= 1;
        }
        Ok(Some(j))
    }

    /// Before the first update of a v2 file whose pending length change
    /// this object did not begin (a crash left it, or another mount): the
    /// file is checked and repaired as `fsck --repair` would (stale last
    /// blocks re-sealed as full ones, the last block re-sealed at a new
    /// generation, the state committed), so the next length change starts
    /// from a state with no leftovers. Reads the whole file once.
    pub(super) fn settle(&mut self, key: &DataKey) -> Result<(), FileError> {
        match self.header.as_ref().map(|h| h.version) {
            // A v1 file is rewritten as v2 at its first update.
            Some(FORMAT_VERSION) => return self.upgrade_in_place(key),
            Some(v2::VERSION) if self.st.converting() => return self.convert_blocks(key),
            Some(v2::VERSION) if self.inherited => {}
            _ => return Ok(()),
        }
        let found = self.verify(key)?;
        // Only what a crash leaves is settled here: stale blocks, and a torn
        // last block of the change in flight. Other damage is for fsck to
        // report, never for an update to hide.
        let torn_last = found.bad_blocks == [self.layout.block_count(self.size).saturating_sub(1)];
        if let Some(&index) = found.bad_blocks.first()
            && !(torn_last && self.st.pending())
        {
            return Err(FileError::Block { index, what: "damaged (kmsfs fsck reports it; the update is refused)" });
        }
        self.repair(key, &found)?;
        self.inherited = false;
        Ok(())
    }

    /// Rewrites this v1 file as v2 in place, at its first update (and for
    /// `kmsfs upgrade` of a file with several hard links): the same file ID
    /// and wrapped key, so no KMS call. The v2 header goes first, marked
    /// `CONVERTING` and synced, so that from then on every block reads
    /// whether it was rewritten yet or not (v1 blocks under the DEK, v1
    /// holes); then every block is re-sealed in place, each run of v1 holes
    /// closed by a marker; then the mark is cleared. A crash anywhere leaves
    /// a file that reads, and its next update finishes the conversion. A
    /// file with a torn tail stays v1 until `fsck --repair`.
    pub fn upgrade_in_place(&mut self, key: &DataKey) -> Result<(), FileError> {
        let Some(old) = self.header.clone() else { return Ok(()) };
        if old.version != FORMAT_VERSION || !self.size_ok {
            return Ok(());
        }
        self.check_key(key)?;
        let blocks = self.layout.block_count(self.size);
        let keys = FileKeys::derive(key, &old.file_id, 0);
        let mut h =
            FileHeader::new_v2(old.block_log2, old.header_size, old.volume_id, old.file_id, old.wrapped.clone());
        let seals = blocks.checked_add(ctr_chunk()).filter(|&t| t <= seal_budget()).ok_or(FileError::TooLarge)?;
        let st = v2::State { flags: v2::FLAG_CONVERTING | v2::FLAG_HOLES, lgen: 1, epoch: 0, seals };
        h.seal_state(&keys, st);
        let bytes = h.to_bytes()?;
        // One write inside the first sector, on disk before any v2 block.
        self.pwrite(Step::State, &bytes, 0)?;
        self.file.sync_data()?;
        self.header = Some(std::sync::Arc::new(h));
        self.header_raw = bytes;
        self.reset_file_state();
        let _ = self.keys.set(keys);
        self.seals_left = ctr_chunk();
        self.verified.store(true, Ordering::Relaxed);
        self.convert_blocks(key)
    }

    /// Finishes a conversion in place that a crash interrupted (for
    /// `kmsfs upgrade`; an update does the same on its own).
    pub fn finish_conversion(&mut self, key: &DataKey) -> Result<(), FileError> {
        if self.is_v2() && self.st.converting() {
            self.convert_blocks(key)?;
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// Re-keys a v2 file whose seal count reached the budget: the next
    /// epoch's key, `CONVERTING` set and synced (blocks under the previous
    /// key still read), every block re-sealed, the mark cleared. A crash
    /// leaves a file that reads; its next update finishes the re-key.
    pub(super) fn rekey(&mut self, key: &DataKey) -> Result<(), FileError> {
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        let epoch = self.st.epoch + 1;
        if epoch > v2::MAX_EPOCH {
            return Err(FileError::TooLarge);
        }
        let blocks = self.layout.block_count(self.size);
        self.st.epoch = epoch;
        self.st.seals = blocks;
        self.st.flags |= v2::FLAG_CONVERTING;
        self.keys = std::sync::OnceLock::new();
        self.prev_keys = std::sync::OnceLock::new();
        let _ = self.keys.set(FileKeys::derive(key, &h.file_id, epoch));
        self.write_state()?;
        self.file.sync_data()?;
        self.seals_left = 0;
        self.convert_blocks(key)
    }

    /// The body of a conversion (v1 to v2, or a re-key), and how an
    /// interrupted one is finished: each block not yet under the current
    /// key is re-sealed under it (random nonce), and each run of zero slots
    /// that no marker closes (v1 holes) gets one in its last slot.
    pub(super) fn convert_blocks(&mut self, key: &DataKey) -> Result<(), FileError> {
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        self.check_key(key)?;
        let keys = self.keys.get().ok_or(FileError::NeedKey)?;
        let blocks = self.layout.block_count(self.size);
        let sb = self.layout.stored_block() as usize;
        let mut buf = vec![0u8; 3 * sb];
        let (stored, rest) = buf.split_at_mut(sb);
        let (work, out) = rest.split_at_mut(sb);
        let mut nonces = [0u8; NONCE_LEN];
        let mut run: Option<u64> = None;
        for i in 0..blocks {
            let last = i + 1 == blocks;
            let len = self.slot_len(i);
            let s = self.read_slot(i, len, stored)?;
            if !last && is_hole(s) {
                run.get_or_insert(i);
                continue;
            }
            let current = self.open_v2_slot(&h, keys.block(), i, last, s, work, false).is_some();
            let marker = !current && v2::open_marker(keys, &self.aad(&h, i, last), s).is_some();
            if let Some(start) = run.take()
                && !marker
            {
                // v1 holes before this block get a marker in the slot just
                // before it (a zero slot: it reads as zeros either way).
                let m = &mut out[..sb];
                v2::seal_marker(keys, &self.aad(&h, i - 1, false), start, self.st.lgen, m);
                self.pwrite(Step::WriteOld, m, self.layout.block_offset(i - 1))?;
            }
            if current || marker {
                continue;
            }
            let n = match self.prev_key(&h, key) {
                Some(prev) => self.open_v2_slot(&h, prev, i, last, s, work, true).map(|(n, _)| n),
                None => open_v1(key, &self.aad(&h, i, last), &self.aad(&h, i, true), s, work),
            }
            .ok_or(FileError::Block { index: i, what: "authentication failed" })?;
            let o = &mut out[..len];
            o[NONCE_LEN..NONCE_LEN + n].copy_from_slice(&work[NONCE_LEN..NONCE_LEN + n]);
            o[NONCE_LEN + n..len - TAG_LEN].fill(0);
            random_fill(&mut nonces).map_err(|_| FileError::Random)?;
            seal_in_place_v(keys.block(), &self.aad_bytes(&h, i, last, self.st.lgen), nonces, o)?;
            self.pwrite(Step::WriteOld, o, self.layout.block_offset(i))?;
        }
        self.file.sync_data()?;
        self.st.flags &= !v2::FLAG_CONVERTING;
        self.write_state()?;
        self.prev_keys = std::sync::OnceLock::new();
        self.forget_proofs();
        Ok(())
    }

    /// A nonce for a block `repair` re-seals: random, and counted (v2).
    pub(super) fn repair_nonce(&mut self, key: &DataKey) -> Result<[u8; NONCE_LEN], FileError> {
        self.take_seals(key, 1)?;
        let mut n = [0u8; NONCE_LEN];
        random_fill(&mut n).map_err(|_| FileError::Random)?;
        Ok(n)
    }
}
