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
use crate::format::{BLOCK_OVERHEAD, Id, NONCE_LEN, random_fill};
use crate::keys::{DataKey, FreshKey, KeyContext};

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
}

/// One encrypted file.
pub struct EncryptedFile {
    file: File,
    layout: Layout,
    volume_id: Id,
    header: Option<std::sync::Arc<FileHeader>>,
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
        let header = if backing == 0 {
            None
        } else {
            let mut buf = vec![0u8; layout.header_size() as usize];
            read_exact_at(&file, &mut buf, 0).map_err(|_| HeaderError::Truncated)?;
            let h = FileHeader::parse(&buf, buf.len())?;
            if h.volume_id != volume_id {
                return Err(FileError::ForeignVolume);
            }
            if h.block_log2 != layout.block_log2() {
                return Err(FileError::ForeignBlockSize(h.block_log2));
            }
            Some(std::sync::Arc::new(h))
        };
        Ok(Self { file, layout, volume_id, header, size, size_ok, verified: AtomicBool::new(false) })
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
    /// or last block takes a copy.
    pub fn read_into(
        &self,
        key: Option<&DataKey>,
        off: u64,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, FileError> {
        if !self.size_ok && len > 0 {
            // A torn or truncated tail (including a header with no blocks).
            let backing = self.file.metadata()?.len();
            return Err(FileError::BadSize(backing));
        }
        if off >= self.size || len == 0 {
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
        if tail {
            out_tail.copy_from_slice(&self.open_one(h, key, last, tail_buf)?[..to_last]);
        }
        let last_index = self.last_index();
        for (k, (t, plain)) in trailers.chunks(TRAILER).zip(out_mid.chunks_mut(bs as usize)).enumerate() {
            let i = mid_first + k as u64;
            let is_last = Some(i) == last_index;
            if !is_last && is_hole(t) && is_hole(plain) {
                continue; // a hole: its "ciphertext" already reads as zeros
            }
            let (nonce, tag) = t.split_at(NONCE_LEN);
            open_detached(key, &self.aad(h, i, is_last), nonce, tag, plain).map_err(|e| block_error(i, e))?;
        }
        Ok(want)
    }

    /// Opens stored block `index` in place; returns its plaintext.
    fn open_one<'b>(
        &self,
        h: &FileHeader,
        key: &DataKey,
        index: u64,
        sealed: &'b mut [u8],
    ) -> Result<&'b [u8], FileError> {
        let plen = self.layout.plain_len(self.size, index) as usize;
        let is_last = Some(index) == self.last_index();
        if !is_last && is_hole(sealed) {
            return Ok(&sealed[NONCE_LEN..NONCE_LEN + plen]);
        }
        let plain = open_in_place(key, &self.aad(h, index, is_last), sealed).map_err(|e| block_error(index, e))?;
        if plain.len() != plen {
            return Err(FileError::Block { index, what: "invalid length" });
        }
        Ok(plain)
    }

    /// Reads block `index` of the current file (old flags) into a B-sized buffer.
    fn read_block(&self, h: &FileHeader, key: &DataKey, index: u64, buf: &mut [u8]) -> Result<usize, FileError> {
        let plen = self.layout.plain_len(self.size, index) as usize;
        if plen == 0 {
            return Ok(0);
        }
        let mut scratch = Scratch::take();
        let stored = scratch.get(plen + BLOCK_OVERHEAD);
        read_exact_at(&self.file, stored, self.layout.block_offset(index))
            .map_err(|_| FileError::Block { index, what: "missing (file truncated)" })?;
        let plain = self.open_one(h, key, index, stored)?;
        buf[..plen].copy_from_slice(plain);
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

    /// Seals blocks `first..` into `region` for a file of `new_size` bytes
    /// and writes them in one pwrite. A block that `src` (data, offset)
    /// covers whole is sealed straight from it; any other block's plaintext
    /// must already sit in its slot.
    fn seal_and_write(
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
        self.file.write_all_at(region, self.layout.block_offset(first))?;
        Ok(())
    }

    /// Re-seals the current last block as a full, non-final block (zero
    /// padded), because the file is about to grow past it.
    fn reseal_old_last(&self, key: &DataKey, new_size: u64) -> Result<(), FileError> {
        let Some(old_last) = self.last_index() else { return Ok(()) };
        let h = self.header.as_ref().ok_or(FileError::NeedKey)?;
        let bs = self.layout.block_size() as usize;
        let mut scratch = Scratch::take();
        let region = scratch.get(bs + BLOCK_OVERHEAD);
        let slot = &mut region[NONCE_LEN..NONCE_LEN + bs];
        let n = self.read_block(h, key, old_last, slot)?;
        slot[n..].fill(0); // the reused buffer is stale past the old end
        self.seal_and_write(key, old_last, region, new_size, None)
    }

    /// Writes `data` at `off`, growing the file if needed.
    pub fn write_at(&mut self, key: KeyArg<'_>, off: u64, data: &[u8]) -> Result<(), FileError> {
        if data.is_empty() {
            return Ok(());
        }
        let k = Self::key_of(&key);
        self.ensure_header(key)?;
        let end = off.checked_add(data.len() as u64).ok_or(FileError::TooLarge)?;
        let new_size = self.size.max(end);
        let bs = self.layout.block_size();
        let (first, last) = (off / bs, (end - 1) / bs);
        let old_last = self.last_index();
        let new_last = (new_size - 1) / bs;
        if let Some(ol) = old_last
            && new_last > ol
            && ol < first
        {
            self.reseal_old_last(k, new_size)?;
        }
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        let mut len = 0usize;
        for i in first..=last {
            len += self.layout.plain_len(new_size, i) as usize + BLOCK_OVERHEAD;
        }
        let mut scratch = Scratch::take();
        let region = scratch.get(len);
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
                Some(ol) if i <= ol => self.read_block(&h, k, i, slot)?,
                _ => 0,
            };
            slot[n..].fill(0);
            let src = (bstart + from - off) as usize;
            slot[from as usize..to as usize].copy_from_slice(&data[src..src + (to - from) as usize]);
        }
        self.seal_and_write(k, first, region, new_size, Some((data, off)))?;
        self.size = new_size;
        Ok(())
    }

    /// Truncates or extends to `new_size`. Extending leaves a hole: the gap's
    /// blocks are never written, so the backing file stays sparse.
    pub fn set_len(&mut self, key: Option<KeyArg<'_>>, new_size: u64) -> Result<(), FileError> {
        if new_size == 0 {
            // A fresh file ID and DEK will be minted on the next write.
            self.file.set_len(0)?;
            self.header = None;
            self.size = 0;
            self.size_ok = true;
            self.verified.store(false, Ordering::Relaxed);
            return Ok(());
        }
        if new_size == self.size && self.size_ok {
            return Ok(());
        }
        let key = key.ok_or(FileError::NeedKey)?;
        let k = Self::key_of(&key);
        self.ensure_header(key)?;
        let bs = self.layout.block_size();
        let new_last = (new_size - 1) / bs;
        let h = self.header.clone().ok_or(FileError::NeedKey)?;
        let mut region = vec![0u8; bs as usize + BLOCK_OVERHEAD];
        let slot = &mut region[NONCE_LEN..NONCE_LEN + bs as usize];
        match self.last_index() {
            Some(ol) if new_size > self.size && new_last > ol => {
                self.reseal_old_last(k, new_size)?;
            }
            Some(_) => {
                // The new last block exists now: keep its head.
                self.read_block(&h, k, new_last, slot)?;
            }
            None => {}
        }
        let plen = self.layout.plain_len(new_size, new_last) as usize;
        slot[plen..].fill(0);
        self.file.set_len(self.layout.backing_size(new_size))?;
        self.seal_and_write(k, new_last, &mut region[..plen + BLOCK_OVERHEAD], new_size, None)?;
        self.size = new_size;
        self.size_ok = true;
        Ok(())
    }

    /// Checks the header and every block; for fsck.
    pub fn verify(&self, key: &DataKey) -> Result<VerifyReport, FileError> {
        let mut r = VerifyReport { bad_size: !self.size_ok, ..Default::default() };
        let Some(h) = self.header.as_ref() else { return Ok(r) };
        h.verify(key)?;
        let bs = self.layout.block_size() as usize;
        let mut stored = vec![0u8; bs + BLOCK_OVERHEAD];
        let count = self.layout.block_count(self.size);
        for i in 0..count {
            let plen = self.layout.plain_len(self.size, i) as usize;
            let s = &mut stored[..plen + BLOCK_OVERHEAD];
            if read_exact_at(&self.file, s, self.layout.block_offset(i)).is_err() {
                r.bad_blocks.push(i);
                continue;
            }
            if Some(i) != self.last_index() && is_hole(s) {
                r.zero_blocks.push(i);
                continue;
            }
            if self.open_one(h, key, i, s).is_err() {
                r.bad_blocks.push(i);
            }
        }
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

fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, off)
}

/// A stored block's nonce and tag, read apart from its ciphertext.
const TRAILER: usize = BLOCK_OVERHEAD;

/// The error for block `index` failing to open.
fn block_error(index: u64, e: CodecError) -> FileError {
    let what = match e {
        CodecError::Length(_) => "invalid length",
        CodecError::Auth | CodecError::Random => "authentication failed",
    };
    FileError::Block { index, what }
}

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
