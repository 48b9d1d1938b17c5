//! An encrypted file over a backing file descriptor: read, write and resize
//! at any offset, with read-modify-write of partial blocks.
//!
//! The object never calls a key provider. The caller fetches the key first
//! (which may call KMS) without holding the inode lock, then calls in with it.

use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::format::block::{BlockAad, CodecError, is_hole, open_detached, open_in_place, seal_in_place, seal_to};
use crate::format::header::{FileHeader, HeaderError};
use crate::format::layout::Layout;
use crate::format::{BLOCK_OVERHEAD, Id, NONCE_LEN, TAG_LEN, random_fill};
use crate::keys::{DataKey, FreshKey, KeyContext};
pub use crate::sys::ofd_lock;

/// What went wrong in one file. Carries block indexes, never plaintext.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The backing file failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The header did not parse or did not verify.
    #[error("header: {0}")]
    Header(#[from] HeaderError),
    /// A block failed authentication, or is missing.
    #[error("block {index}: {what}")]
    Block {
        /// Zero-based block index.
        index: u64,
        /// What failed.
        what: &'static str,
    },
    /// The backing size is impossible for this layout (torn write, tampering).
    #[error("backing size {0} is not a valid kmsfs file size (truncated or torn)")]
    BadSize(u64),
    /// The caller passed the wrong kind of key; fetch again and retry.
    #[error("file needs a different key (changed concurrently)")]
    NeedKey,
    /// The header belongs to another volume.
    #[error("file belongs to another volume")]
    ForeignVolume,
    /// The header's block size differs from the volume's.
    #[error("file block size 2^{0} differs from the volume's")]
    ForeignBlockSize(u8),
    /// The random generator failed.
    #[error("random number generator failed")]
    Random,
    /// Offset arithmetic overflowed.
    #[error("offset too large")]
    TooLarge,
}

impl From<CodecError> for FileError {
    fn from(e: CodecError) -> Self {
        match e {
            CodecError::Random => Self::Random,
            CodecError::Auth => Self::Block { index: u64::MAX, what: "authentication failed" },
            CodecError::Length(_) => Self::Block { index: u64::MAX, what: "invalid length" },
        }
    }
}

/// The key a mutating call needs.
pub enum KeyArg<'a> {
    /// The file's existing key (its header is present).
    Existing(&'a DataKey),
    /// A new key for a file that is empty (no header yet).
    Fresh(&'a FreshKey),
}

/// What key an operation will need, computed under a read lock.
#[derive(Debug, Clone)]
pub enum KeyNeed {
    /// The file is empty; reads need nothing, writes need a fresh key.
    Empty,
    /// The header's wrapped key, with its context.
    Existing(std::sync::Arc<FileHeader>),
}

// Identity, not content: every read and write re-checks the need after
// taking the lock, and a new header is always a new Arc. Comparing contents
// would walk the wrapped key twice per operation.
impl PartialEq for KeyNeed {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Empty, Self::Empty) => true,
            (Self::Existing(a), Self::Existing(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for KeyNeed {}

/// Verification results for fsck.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blocks that failed authentication.
    pub bad_blocks: Vec<u64>,
    /// Non-final blocks stored as all zeros (holes; an attacker can make them).
    pub zero_blocks: Vec<u64>,
    /// The backing size is invalid.
    pub bad_size: bool,
    /// Blocks that read as a stale last block: an append or truncation was
    /// interrupted there (or an old block was put back; docs/SECURITY.md).
    pub stale_blocks: Vec<u64>,
    /// Bytes past the last whole block that form no block (a torn tail).
    pub torn_bytes: u64,
}

/// What `repair` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// Bytes cut from the end of the backing file.
    pub cut_bytes: u64,
    /// Stored blocks (whole or torn) among them.
    pub cut_blocks: u64,
    /// Blocks re-sealed in place: the new last block, stale last blocks.
    pub resealed: Vec<u64>,
}

/// The steps of a multi-step update, named so tests can fail or crash one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Step {
    /// fallocate(KEEP_SIZE) of the range a growing write fills.
    Reserve,
    /// The pwrite of blocks past the old last block.
    WriteNew,
    /// The pwrite that changes existing blocks in place.
    WriteOld,
    /// The ftruncate that ends a shrink.
    Truncate,
}

/// One encrypted file.
pub struct EncryptedFile {
    file: File,
    layout: Layout,
    volume_id: Id,
    header: Option<std::sync::Arc<FileHeader>>,
    /// The header's bytes as stored, so `refresh` sees a header another
    /// mount replaced (`-o shared`) with one comparison.
    header_raw: Vec<u8>,
    size: u64,
    size_ok: bool,
    verified: AtomicBool,
}

impl EncryptedFile {
    /// Opens over a backing file; reads and parses the header, no key needed.
    pub fn open(file: File, layout: Layout, volume_id: Id) -> Result<Self, FileError> {
        let backing = file.metadata()?.len();
        let (size, size_ok) = match layout.plain_size(backing) {
            Ok(s) => (s, true),
            Err((s, _)) => (s, false),
        };
        let mut header_raw = Vec::new();
        let header = if backing == 0 {
            None
        } else {
            header_raw = vec![0u8; layout.header_size() as usize];
            read_exact_at(&file, &mut header_raw, 0).map_err(|_| HeaderError::Truncated)?;
            Some(std::sync::Arc::new(Self::parse_header(&header_raw, layout, volume_id)?))
        };
        Ok(Self { file, layout, volume_id, header, header_raw, size, size_ok, verified: AtomicBool::new(false) })
    }

    fn parse_header(raw: &[u8], layout: Layout, volume_id: Id) -> Result<FileHeader, FileError> {
        let h = FileHeader::parse(raw, raw.len())?;
        if h.volume_id != volume_id {
            return Err(FileError::ForeignVolume);
        }
        if h.block_log2 != layout.block_log2() {
            return Err(FileError::ForeignBlockSize(h.block_log2));
        }
        Ok(h)
    }

    /// Re-reads the size and the header from the backing file, which another
    /// mount may have changed (`-o shared`; the caller holds the file's
    /// update lock, see [`UpdateLock`]). A header whose bytes changed (the
    /// file was emptied and rewritten there, with a new file ID and key)
    /// replaces the old one and must be verified again; an unchanged one
    /// keeps its identity, so a [`KeyNeed`] taken before still matches.
    /// Costs an fstat and one header-sized pread. Returns whether the
    /// header was replaced or removed.
    pub fn refresh(&mut self) -> Result<bool, FileError> {
        let backing = self.file.metadata()?.len();
        (self.size, self.size_ok) = match self.layout.plain_size(backing) {
            Ok(s) => (s, true),
            Err((s, _)) => (s, false),
        };
        if backing == 0 {
            if self.header.take().is_some() {
                self.header_raw.clear();
                self.verified.store(false, Ordering::Relaxed);
                return Ok(true);
            }
            return Ok(false);
        }
        let mut scratch = Scratch::take();
        let raw = scratch.get(self.layout.header_size() as usize);
        read_exact_at(&self.file, raw, 0).map_err(|_| HeaderError::Truncated)?;
        if self.header.is_some() && self.header_raw == *raw {
            return Ok(false);
        }
        let h = Self::parse_header(raw, self.layout, self.volume_id)?;
        self.header = Some(std::sync::Arc::new(h));
        self.header_raw = raw.to_vec();
        self.verified.store(false, Ordering::Relaxed);
        Ok(true)
    }

    /// Plaintext size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The parsed header, if the file is not empty.
    pub fn header(&self) -> Option<&FileHeader> {
        self.header.as_deref()
    }

    /// The backing file.
    pub fn backing(&self) -> &File {
        &self.file
    }

    /// What key the next operation needs.
    pub fn key_need(&self) -> KeyNeed {
        match &self.header {
            None => KeyNeed::Empty,
            Some(h) => KeyNeed::Existing(h.clone()),
        }
    }

    /// The context the header's wrapped key is bound to.
    pub fn key_context(&self) -> Option<KeyContext> {
        self.header.as_ref().map(|h| KeyContext::file(h.volume_id, h.file_id))
    }

    fn check_key(&self, key: &DataKey) -> Result<&FileHeader, FileError> {
        let h = self.header.as_ref().ok_or(FileError::NeedKey)?;
        if !self.verified.load(Ordering::Relaxed) {
            h.verify(key)?;
            self.verified.store(true, Ordering::Relaxed);
        }
        Ok(h)
    }

    fn aad<'h>(&self, h: &'h FileHeader, index: u64, last: bool) -> BlockAad<'h> {
        BlockAad { file_id: &h.file_id, block_log2: self.layout.block_log2(), index, last }
    }

    fn last_index(&self) -> Option<u64> {
        (self.size > 0).then(|| (self.size - 1) >> self.layout.block_log2())
    }

    /// Reads up to `len` bytes at `off`; short only at EOF.
    pub fn read_at(&self, key: Option<&DataKey>, off: u64, len: usize) -> Result<Vec<u8>, FileError> {
        let mut buf = Vec::new();
        let n = self.read_into(key, off, len, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

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
            let is_last = Some(i) == last_index;
            if !is_last && is_hole(t) && is_hole(plain) {
                continue; // a hole: its "ciphertext" already reads as zeros
            }
            let (nonce, tag) = t.split_at(NONCE_LEN);
            if open_detached(key, &self.aad(h, i, is_last), nonce, tag, plain).is_err() {
                self.open_stale(h, key, i, plain)?;
            }
        }
        if tail {
            out_tail.copy_from_slice(&self.open_one(h, key, last, tail_buf)?[..to_last]);
        }
        Ok(want)
    }

    /// Opens stored block `index` (exactly its stored length) in place;
    /// returns its plaintext.
    fn open_one<'b>(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        sealed: &'b mut [u8],
    ) -> Result<&'b [u8], FileError> {
        let is_last = Some(index) == self.last_index();
        let n = sealed.len();
        if !is_last && is_hole(sealed) {
            return Ok(&sealed[NONCE_LEN..n - TAG_LEN]);
        }
        let opened = open_in_place(key, &self.aad(h, index, is_last), sealed).is_ok();
        let plain = &mut sealed[NONCE_LEN..n - TAG_LEN];
        if !opened {
            self.open_stale(h, key, index, plain)?;
        }
        Ok(plain)
    }

    /// The error path of every block read: block `index`, whose plaintext is
    /// `out.len()` bytes at its current flag, did not open. It may be a stale
    /// last block that an interrupted append or truncation left (see
    /// docs/FORMAT.md, "Interrupted updates"). A failed open wipes the
    /// buffer, so the slot is read again. On success `out` holds the stale
    /// block's plaintext followed by zeros.
    fn open_stale(&self, h: &FileHeader, key: &DataKey, index: u64, out: &mut [u8]) -> Result<(), FileError> {
        let len = out.len() + BLOCK_OVERHEAD;
        let mut scratch = Scratch::take();
        let (stored, work) = scratch.get(2 * len).split_at_mut(len);
        read_exact_at(&self.file, stored, self.layout.block_offset(index))
            .map_err(|_| FileError::Block { index, what: "missing (file truncated)" })?;
        let n = open_stale_slot(key, &self.aad(h, index, true), stored, work)
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
    fn read_block(
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
        if !is_last && is_hole(&trailer) && is_hole(plain) {
            return Ok(plen);
        }
        let (nonce, tag) = trailer.split_at(NONCE_LEN);
        if open_detached(key, &self.aad(h, index, is_last), nonce, tag, plain).is_err() {
            self.open_stale(h, key, index, plain)?;
        }
        Ok(plen)
    }

    /// Installs a header for an empty file, or checks the given key.
    fn ensure_header(&mut self, key: KeyArg<'_>) -> Result<(), FileError> {
        match (key, &self.header) {
            (KeyArg::Fresh(f), None) => {
                let mut h = FileHeader::new(
                    self.layout.block_log2(),
                    self.layout.header_size() as u16,
                    self.volume_id,
                    f.file_id,
                    f.wrapped.clone(),
                );
                h.seal(&f.key)?;
                let bytes = h.to_bytes()?;
                self.file.write_all_at(&bytes, 0)?;
                self.header = Some(std::sync::Arc::new(h));
                self.header_raw = bytes;
                self.verified.store(true, Ordering::Relaxed);
                self.size_ok = true;
                Ok(())
            }
            (KeyArg::Existing(k), Some(_)) => self.check_key(k).map(|_| ()),
            _ => Err(FileError::NeedKey),
        }
    }

    fn key_of<'k>(key: &KeyArg<'k>) -> &'k DataKey {
        match key {
            KeyArg::Existing(k) => k,
            KeyArg::Fresh(f) => &f.key,
        }
    }

    /// The backing size that the current plaintext size implies; the actual
    /// size differs only after a torn write.
    fn valid_backing(&self) -> u64 {
        match (self.size, &self.header) {
            (0, None) => 0,
            (0, Some(_)) => self.layout.header_size(),
            (s, _) => self.layout.backing_size(s),
        }
    }

    /// Seals blocks `first..` in `region` for a file of `new_size` bytes. A
    /// block that `src` (data, offset) covers whole is sealed straight from
    /// it; any other block's plaintext must already sit in its slot.
    fn seal(
        &self,
        key: &DataKey,
        first: u64,
        region: &mut [u8],
        new_size: u64,
        src: Option<(&[u8], u64)>,
    ) -> Result<(), FileError> {
        let h = self.header.as_ref().ok_or(FileError::NeedKey)?;
        let new_last = (new_size - 1) >> self.layout.block_log2();
        let bs = self.layout.block_size();
        let stride = bs as usize + BLOCK_OVERHEAD;
        // Nonces come from the RNG in batches, not one call per block.
        let mut nonces = [0u8; NONCE_LEN * 32];
        for (k, chunk) in region.chunks_mut(stride).enumerate() {
            let slot = k % 32;
            if slot == 0 {
                random_fill(&mut nonces).map_err(|_| FileError::Random)?;
            }
            let mut nn = [0u8; NONCE_LEN];
            nn.copy_from_slice(&nonces[slot * NONCE_LEN..(slot + 1) * NONCE_LEN]);
            let i = first + k as u64;
            let aad = self.aad(h, i, i == new_last);
            let plen = chunk.len() - BLOCK_OVERHEAD;
            let whole = src.and_then(|(data, off)| {
                let at = (i * bs).checked_sub(off)? as usize;
                data.get(at..at + plen)
            });
            match whole {
                Some(plain) => seal_to(key, &aad, nn, plain, chunk)?,
                None => seal_in_place(key, &aad, nn, chunk)?,
            }
        }
        Ok(())
    }

    /// One write of a multi-step update (tests inject faults here).
    fn pwrite(&self, step: Step, buf: &[u8], off: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(r) = fault::hit(step, |n| self.file.write_all_at(&buf[..n.min(buf.len())], off)) {
            return r;
        }
        let _ = step;
        self.file.write_all_at(buf, off)
    }

    /// The ftruncate that ends a shrink.
    fn cut(&self, len: u64) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(r) = fault::hit(Step::Truncate, |_| Ok(())) {
            return r;
        }
        self.file.set_len(len)
    }

    /// Reserves `start..end` past the end of the file, so that ENOSPC or
    /// EDQUOT fail here, before a growing update changes anything. A backing
    /// filesystem without fallocate goes on without it.
    fn reserve(&self, start: u64, end: u64) -> std::io::Result<()> {
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
    fn restore(&self, off: u64, stored: &[u8]) {
        #[cfg(test)]
        if fault::crashed() {
            return;
        }
        let _ = self.file.write_all_at(stored, off);
    }

    /// Undoes a failed growing update: the old last block's stored bytes (if
    /// its rewrite had started), the old backing size, the space reserved
    /// past it, and the header of a file that had none.
    fn undo_growth(&mut self, backing: u64, old_last: Option<(u64, &[u8])>, reserved_to: u64, fresh_header: bool) {
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
                // not-last block (zero padded).
                let slot = &mut resealed[NONCE_LEN..NONCE_LEN + bs as usize];
                let n = self.read_block(&h, k, ol, slot, Some(&mut *saved))?;
                slot[n..].fill(0);
                self.seal(k, ol, &mut resealed[..sb], new_size, None)?;
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
        if !growing {
            // An overwrite: lengths and flags stay; one pwrite.
            self.pwrite(Step::WriteOld, region, off_first)?;
            return Ok(());
        }
        if !self.size_ok {
            // A torn tail: the write defines the new end; its bytes must not
            // linger in a slot that stays a hole.
            self.file.set_len(old_backing)?;
        }
        let new_backing = self.layout.backing_size(new_size);
        let mut touched_old = false;
        let mut reserved_to = old_backing;
        let res = (|| -> std::io::Result<()> {
            let Some(ol) = old_last.filter(|&ol| new_last > ol) else {
                // Growing inside the old last block, or the first blocks of
                // an empty file: one pwrite.
                touched_old = old_last.is_some();
                let step = if touched_old { Step::WriteOld } else { Step::WriteNew };
                return self.pwrite(step, region, off_first);
            };
            // Room first, so ENOSPC fails before anything changes. A write
            // far past the end leaves the gap a hole: reserve around it.
            let next = self.layout.block_offset(ol + 1);
            let new_from = self.layout.block_offset(first.max(ol + 1));
            reserved_to = new_backing;
            self.reserve(old_backing, if new_from > next { next } else { new_backing })?;
            if new_from > next {
                self.reserve(new_from, new_backing)?;
            }
            // The new blocks past the old last block...
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
            return Err(e.into());
        }
        self.size = new_size;
        self.size_ok = true;
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
            return Ok(());
        }
        if new_size == self.size && self.size_ok {
            return Ok(());
        }
        let key = key.ok_or(FileError::NeedKey)?;
        if new_size > self.size {
            return self.write_at(key, new_size - 1, &[0]);
        }
        // Shrinking, or cutting a torn tail at the current size.
        let k = Self::key_of(&key);
        self.ensure_header(key)?;
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        let bs = self.layout.block_size() as usize;
        let sb = self.layout.stored_block() as usize;
        let nl = (new_size - 1) / bs as u64;
        let q = self.layout.plain_len(new_size, nl) as usize;
        let olen = self.layout.plain_len(self.size, nl) as usize + BLOCK_OVERHEAD;
        let off = self.layout.block_offset(nl);
        let mut scratch = Scratch::take();
        let (saved, work) = scratch.get(2 * sb).split_at_mut(sb);
        match self.read_block(&h, k, nl, &mut work[NONCE_LEN..NONCE_LEN + bs], Some(&mut *saved)) {
            Ok(_) => {}
            // A torn tail leaves the last whole block sealed as not last:
            // cutting the file there is what the caller asks for.
            Err(e) if !self.size_ok && Some(nl) == self.last_index() => {
                let w = &mut work[..olen];
                w.copy_from_slice(&saved[..olen]);
                open_in_place(k, &self.aad(&h, nl, false), w).map_err(|_| e)?;
            }
            Err(e) => return Err(e),
        }
        let mut nonce = [0u8; NONCE_LEN];
        random_fill(&mut nonce).map_err(|_| FileError::Random)?;
        seal_in_place(k, &self.aad(&h, nl, true), nonce, &mut work[..q + BLOCK_OVERHEAD])?;
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

    /// Checks the header and every block; for fsck.
    pub fn verify(&self, key: &DataKey) -> Result<VerifyReport, FileError> {
        let mut r = VerifyReport { bad_size: !self.size_ok, ..Default::default() };
        let Some(h) = self.header.as_ref() else { return Ok(r) };
        h.verify(key)?;
        if !self.size_ok {
            r.torn_bytes = self.file.metadata()?.len().saturating_sub(self.valid_backing());
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
            if open_stale_slot(key, &self.aad(h, i, true), s, work).is_some() {
                r.stale_blocks.push(i);
            } else {
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
    fn open_lenient(
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
        let attempt = |last: bool, work: &mut [u8]| {
            work[..n].copy_from_slice(stored);
            open_in_place(key, &self.aad(h, index, last), &mut work[..n]).is_ok()
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
        open_stale_slot(key, &self.aad(h, index, true), stored, work).map(|p| (p, true))
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
        h.verify(key)?;
        let backing = self.file.metadata()?.len();
        let sb = self.layout.stored_block();
        let bs = self.layout.block_size() as usize;
        let slots = backing.saturating_sub(self.layout.header_size()).div_ceil(sb);
        let mut buf = vec![0u8; 2 * sb as usize];
        let (stored, work) = buf.split_at_mut(sb as usize);
        let mut keep = None;
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
        if reseal {
            let mut nonce = [0u8; NONCE_LEN];
            random_fill(&mut nonce).map_err(|_| FileError::Random)?;
            seal_in_place(key, &self.aad(&h, last, true), nonce, &mut work[..n + BLOCK_OVERHEAD])?;
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
            let Some(n) = open_stale_slot(key, &self.aad(&h, i, true), stored, work) else { continue };
            work[NONCE_LEN + n..NONCE_LEN + bs].fill(0);
            let mut nonce = [0u8; NONCE_LEN];
            random_fill(&mut nonce).map_err(|_| FileError::Random)?;
            seal_in_place(key, &self.aad(&h, i, false), nonce, work)?;
            self.file.write_all_at(work, off)?;
            r.resealed.push(i);
        }
        self.file.sync_all()?;
        Ok(r)
    }

    /// fsync of the backing file.
    pub fn sync(&self, data_only: bool) -> Result<(), FileError> {
        if data_only {
            self.file.sync_data()?
        } else {
            self.file.sync_all()?
        }
        Ok(())
    }
}

/// Opens `stored`, one block's slot as read, as a stale last block: sealed
/// as the last block at a shorter length and followed by zero bytes, as an
/// interrupted append or truncation leaves it (docs/FORMAT.md). Its stored
/// length ends where the trailing zeros start, or up to 15 bytes later, as a
/// tag may end in zero bytes. Returns the plaintext length; the plaintext is
/// at `work[NONCE_LEN..]`, which must be as long as `stored`. Only called
/// after the block failed to open as it should.
fn open_stale_slot(key: &DataKey, aad: &BlockAad<'_>, stored: &[u8], work: &mut [u8]) -> Option<usize> {
    let z = stored.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    for l in z.max(BLOCK_OVERHEAD + 1)..=(z + TAG_LEN - 1).min(stored.len()) {
        let w = &mut work[..l];
        w.copy_from_slice(&stored[..l]);
        if open_in_place(key, aad, w).is_ok() {
            return Some(l - BLOCK_OVERHEAD);
        }
    }
    None
}

fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, off)
}

/// Where byte-range locks that applications take through a `-o shared`
/// mount end: they are forwarded to the backing file below this offset
/// (a lock "to the end of the file" stops here), so they never meet the
/// lock kmsfs itself takes at this offset to update a file.
pub const APP_LOCK_END: u64 = 1 << 62;

/// kmsfs's own cross-mount lock on a backing file (`-o shared`): an open
/// file description lock (F_OFD_SETLKW) on one byte at [`APP_LOCK_END`],
/// shared to read, exclusive to write. Taken around every refresh, read
/// and update, it keeps two mounts from interleaving a header creation, a
/// read-modify-write of a partial block or a truncation, and a read from
/// seeing a block half rewritten. Released on drop. Holds the raw
/// descriptor: the caller keeps the file open (and the lock's open file
/// description alive) for the guard's life.
pub struct UpdateLock(std::os::fd::RawFd);

impl UpdateLock {
    /// Waits for the lock on `file`'s open file description.
    pub fn take(file: &File, write: bool) -> std::io::Result<Self> {
        let fd = file.as_raw_fd();
        let ty = if write { libc::F_WRLCK } else { libc::F_RDLCK };
        ofd_lock(fd, libc::F_OFD_SETLKW, ty as i16, APP_LOCK_END, 1)?;
        Ok(Self(fd))
    }
}

impl Drop for UpdateLock {
    fn drop(&mut self) {
        let _ = ofd_lock(self.0, libc::F_OFD_SETLK, libc::F_UNLCK as i16, APP_LOCK_END, 1);
    }
}

/// A stored block's nonce and tag, read apart from its ciphertext.
const TRAILER: usize = BLOCK_OVERHEAD;

/// A per-thread reusable buffer, so a 1 MiB read or write allocates and
/// zeroes nothing. Each thread keeps up to `SCRATCH_SLOTS` of them: a read
/// needs two at once (the reply, and the partial blocks, nonces and tags),
/// and copy_file_range holds its reply while the write takes another.
/// Taken out of the pool while in use, so nested use never aliases.
pub(crate) struct Scratch(Vec<u8>);

thread_local! {
    static SCRATCH: std::cell::Cell<Vec<Vec<u8>>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Buffers kept per thread, and the capacity above which one is dropped
/// instead (one maximal FUSE request plus block overhead fits).
const SCRATCH_SLOTS: usize = 2;
const SCRATCH_KEEP: usize = 2 << 20;

impl Scratch {
    pub(crate) fn take() -> Self {
        let mut pool = SCRATCH.take();
        let v = pool.pop().unwrap_or_default();
        SCRATCH.set(pool);
        Self(v)
    }

    /// The first `len` bytes, growing the buffer if needed; their contents
    /// are stale and must be overwritten.
    pub(crate) fn get(&mut self, len: usize) -> &mut [u8] {
        if self.0.len() < len {
            self.0.resize(len, 0);
        }
        &mut self.0[..len]
    }

    /// The whole buffer, for callers that size it themselves.
    pub(crate) fn vec(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.0.capacity() > SCRATCH_KEEP {
            return;
        }
        let mut pool = SCRATCH.take();
        if pool.len() < SCRATCH_SLOTS {
            pool.push(std::mem::take(&mut self.0));
        }
        SCRATCH.set(pool);
    }
}

/// Fault injection for the unit tests of update ordering: fail a step
/// (ENOSPC, optionally after writing part of it), or "crash" there (the
/// step and everything after it, undo included, does nothing).
#[cfg(test)]
mod fault {
    use super::Step;
    use std::cell::Cell;

    #[derive(Clone, Copy, Debug)]
    pub(super) enum Fault {
        Fail,
        FailAfter(usize),
        Crash,
        CrashAfter(usize),
    }

    thread_local! {
        static ARMED: Cell<Option<(Step, Fault)>> = const { Cell::new(None) };
        static CRASHED: Cell<bool> = const { Cell::new(false) };
    }

    pub(super) fn arm(step: Step, f: Fault) {
        ARMED.set(Some((step, f)));
        CRASHED.set(false);
    }

    /// Whether the armed fault has fired; disarms.
    pub(super) fn fired() -> bool {
        let fired = ARMED.get().is_none();
        ARMED.set(None);
        CRASHED.set(false);
        fired
    }

    pub(super) fn crashed() -> bool {
        CRASHED.get()
    }

    pub(super) fn hit(step: Step, partial: impl FnOnce(usize) -> std::io::Result<()>) -> Option<std::io::Result<()>> {
        let enospc = || Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        if CRASHED.get() {
            return Some(enospc());
        }
        let (s, f) = ARMED.get()?;
        if s != step {
            return None;
        }
        ARMED.set(None);
        if let Fault::FailAfter(n) | Fault::CrashAfter(n) = f {
            let _ = partial(n);
        }
        CRASHED.set(matches!(f, Fault::Crash | Fault::CrashAfter(_)));
        Some(enospc())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Every step of every multi-step update, failed or crashed: data that
    //! was there before stays readable (docs/FORMAT.md, "Interrupted updates").

    use super::fault::{self, Fault};
    use super::*;
    use crate::keys::KeyProvider;
    use crate::keys::local::LocalProvider;

    const B: u64 = 4096;
    const VOL: Id = [3; 16];

    struct Fx {
        dir: tempfile::TempDir,
        key: FreshKey,
    }

    impl Fx {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let p = LocalProvider::create_key_file(&dir.path().join("k")).unwrap();
            let file_id = crate::format::random_id().unwrap();
            let (key, wrapped) = p.generate(&KeyContext::file(VOL, file_id)).unwrap();
            Self { dir, key: FreshKey { file_id, key, wrapped } }
        }
        fn open(&self) -> EncryptedFile {
            let path = self.dir.path().join("f");
            let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap();
            EncryptedFile::open(f, Layout::new(256, 12).unwrap(), VOL).unwrap()
        }
        /// A fresh file holding `data`.
        fn file(&self, data: &[u8]) -> EncryptedFile {
            let _ = std::fs::remove_file(self.dir.path().join("f"));
            let mut f = self.open();
            if !data.is_empty() {
                f.write_at(KeyArg::Fresh(&self.key), 0, data).unwrap();
            }
            f
        }
        fn arg(&self, f: &EncryptedFile) -> KeyArg<'_> {
            if f.header().is_some() { KeyArg::Existing(&self.key.key) } else { KeyArg::Fresh(&self.key) }
        }
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1).collect()
    }

    #[derive(Clone, Debug)]
    enum Op {
        Write(u64, usize),
        SetLen(u64),
    }

    impl Op {
        fn apply(&self, fx: &Fx, f: &mut EncryptedFile) -> Result<(), FileError> {
            match *self {
                Op::Write(off, n) => f.write_at(fx.arg(f), off, &pattern(n, 0x40)),
                Op::SetLen(n) => f.set_len(Some(fx.arg(f)), n),
            }
        }
        fn model(&self, old: &[u8]) -> Vec<u8> {
            let mut m = old.to_vec();
            match *self {
                Op::Write(off, n) => {
                    let end = off as usize + n;
                    if m.len() < end {
                        m.resize(end, 0);
                    }
                    m[off as usize..end].copy_from_slice(&pattern(n, 0x40));
                }
                Op::SetLen(n) => m.resize(n as usize, 0),
            }
            m
        }
        fn grows(&self, old: usize) -> bool {
            match *self {
                Op::Write(off, n) => off as usize + n > old,
                Op::SetLen(n) => n as usize != old,
            }
        }
    }

    /// The updates to attack, from each starting size.
    fn ops(size: u64) -> Vec<Op> {
        let mut v = vec![
            Op::Write(size, 1),
            Op::Write(size, 50),
            Op::Write(size, 10_000),
            Op::Write(size + 20_000, 100),
            Op::Write(size.saturating_sub(50), 9_000),
            Op::Write(size.saturating_sub(50), 50),
            Op::Write(size.saturating_sub(B + 10), B as usize + 100),
            Op::Write(0, 3),
            Op::SetLen(size + 10),
            Op::SetLen(size + 30_000),
        ];
        for cut in [1, 10, B, 5_000] {
            if size > cut {
                v.push(Op::SetLen(size - cut));
            }
        }
        v
    }

    /// The faults to inject into `op` on a file of `old` bytes. A write that
    /// fails part way (ENOSPC) stops where the file needs new space: past
    /// its old end, or inside its old last block when that grows in place,
    /// never inside blocks already allocated before it.
    fn faults(op: &Op, old: usize) -> Vec<Fault> {
        let mut v = vec![Fault::Fail, Fault::Crash];
        if !op.grows(old) {
            return v;
        }
        let first = match *op {
            Op::Write(off, _) => off / B,
            Op::SetLen(n) => n.saturating_sub(1) / B,
        };
        let old_last = (old as u64).saturating_sub(1) / B;
        for n in [1, 100, 3_000, 4_124, 4_200, 9_000] {
            if first >= old_last || old == 0 {
                v.push(Fault::FailAfter(n));
            }
            v.push(Fault::CrashAfter(n));
        }
        v
    }

    /// Reads each block on its own; `None` for a block that fails.
    fn blocks(fx: &Fx) -> (u64, Vec<Option<Vec<u8>>>) {
        let f = fx.open();
        let n = f.size().div_ceil(B);
        let key = f.header().map(|_| &fx.key.key);
        (f.size(), (0..n).map(|i| f.read_at(key, i * B, B as usize).ok()).collect())
    }

    /// After a crash: every byte below both the old and the new size is the
    /// old or the new value (the same outside the update), in a block that
    /// reads, unless it is the one block rewritten in place by a torn write;
    /// bytes past either size may also be zeros.
    fn check_after_crash(fx: &Fx, old: &[u8], new: &[u8], torn_in_place: bool, what: &str) {
        let (size, got) = blocks(fx);
        let keep = old.len().min(new.len()) as u64;
        // A torn in-place write loses that block (and repair then cuts it).
        assert!(size >= keep || torn_in_place, "{what}: size {size} lost acknowledged bytes below {keep}");
        let mut failed = 0;
        for (i, b) in got.iter().enumerate() {
            let Some(b) = b else {
                if (i as u64) * B < keep {
                    failed += 1;
                }
                continue;
            };
            for (j, &x) in b.iter().enumerate() {
                let at = i * B as usize + j;
                let ok = old.get(at) == Some(&x) || new.get(at) == Some(&x) || (x == 0 && at as u64 >= keep);
                assert!(ok, "{what}: byte {at} is {x}");
            }
        }
        let allowed = usize::from(torn_in_place);
        assert!(failed <= allowed, "{what}: {failed} blocks below the old size fail");
    }

    /// `-o shared`: a second open of the backing file (another mount) sees
    /// growth, and a file emptied and rewritten under a new file ID and key,
    /// after `refresh`; the update lock excludes across open files.
    #[test]
    fn refresh_follows_another_writer_and_update_lock_excludes() {
        let fx = Fx::new();
        let mut w = fx.file(&pattern(5000, 1));
        let mut r = fx.open();
        assert!(!r.refresh().unwrap(), "same header");
        w.write_at(KeyArg::Existing(&fx.key.key), 5000, &pattern(3000, 2)).unwrap();
        assert_eq!(r.size(), 5000);
        assert!(!r.refresh().unwrap());
        assert_eq!(r.size(), 8000);
        assert_eq!(r.read_at(Some(&fx.key.key), 5000, 3000).unwrap(), pattern(3000, 2));
        // Emptied and rewritten with another key: a new header.
        let other = Fx::new();
        w.set_len(None, 0).unwrap();
        assert!(r.refresh().unwrap(), "emptied");
        assert!(r.header().is_none());
        w.write_at(KeyArg::Fresh(&other.key), 0, &pattern(100, 3)).unwrap();
        assert!(r.refresh().unwrap(), "new header");
        assert_eq!(r.header().unwrap().file_id, other.key.file_id);
        assert_eq!(r.read_at(Some(&other.key.key), 0, 100).unwrap(), pattern(100, 3));
        // Exclusive against any other open file description, shared with readers.
        let g = UpdateLock::take(w.backing(), true).unwrap();
        let busy = ofd_lock(r.backing().as_raw_fd(), libc::F_OFD_SETLK, libc::F_RDLCK as i16, APP_LOCK_END, 1);
        assert!(busy.is_err());
        drop(g);
        let g1 = UpdateLock::take(w.backing(), false).unwrap();
        let g2 = UpdateLock::take(r.backing(), false).unwrap();
        drop((g1, g2));
        // Application locks (below APP_LOCK_END) never meet the update lock.
        ofd_lock(r.backing().as_raw_fd(), libc::F_OFD_SETLK, libc::F_WRLCK as i16, 0, APP_LOCK_END).unwrap();
        drop(UpdateLock::take(w.backing(), true).unwrap());
    }

    #[test]
    fn failed_or_crashed_updates_keep_earlier_data() {
        let fx = Fx::new();
        let steps = [Step::Reserve, Step::WriteNew, Step::WriteOld, Step::Truncate];
        let mut fired = 0;
        for size in [0u64, 1, 100, B - 1, B, B + 100, 3 * B - 5, 3 * B] {
            let old = pattern(size as usize, size as u8);
            for op in ops(size) {
                for step in steps {
                    for f in faults(&op, old.len()) {
                        let what = format!("size {size}, {op:?}, {f:?} at {step:?}");
                        let mut file = fx.file(&old);
                        fault::arm(step, f);
                        let res = op.apply(&fx, &mut file);
                        if !fault::fired() {
                            res.unwrap_or_else(|e| panic!("{what}: not hit, yet {e}"));
                            continue;
                        }
                        fired += 1;
                        assert!(res.is_err(), "{what}: a failed step must fail the update");
                        drop(file);
                        let new = op.model(&old);
                        match f {
                            Fault::Fail | Fault::FailAfter(_) => {
                                // Undone: the file is exactly as before, with
                                // no stale or torn block left behind.
                                let file = fx.open();
                                assert_eq!(file.size(), size, "{what}");
                                let key = file.header().map(|_| &fx.key.key);
                                assert_eq!(file.read_at(key, 0, 1 << 20).unwrap(), old, "{what}");
                                if let Some(k) = key {
                                    let v = file.verify(k).unwrap();
                                    assert_eq!(v, VerifyReport::default(), "{what}");
                                }
                            }
                            Fault::Crash | Fault::CrashAfter(_) => {
                                let torn = matches!(f, Fault::CrashAfter(_)) && step == Step::WriteOld;
                                check_after_crash(&fx, &old, &new, torn, &what);
                                // fsck --repair leaves a file that reads whole.
                                let mut file = fx.open();
                                if file.header().is_some() {
                                    let v = file.verify(&fx.key.key).unwrap();
                                    if file.repair(&fx.key.key, &v).is_ok() {
                                        let v = file.verify(&fx.key.key).unwrap();
                                        assert!(!v.bad_size && v.stale_blocks.is_empty(), "{what}: {v:?}");
                                        assert!(torn || v.bad_blocks.is_empty(), "{what}: {v:?}");
                                    }
                                }
                                check_after_crash(&fx, &old, &new, torn, &format!("{what}, repaired"));
                            }
                        }
                    }
                }
            }
        }
        eprintln!("{fired} faults fired");
        assert!(fired > 500, "only {fired} faults fired");
    }
}
