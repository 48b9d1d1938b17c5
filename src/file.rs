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

use crate::format::block::{
    BlockAad, CodecError, is_hole, open_detached_v, open_in_place, open_in_place_v, seal_in_place_v, seal_to_v,
};
use crate::format::header::{FileHeader, HeaderError, STATE_RANGE};
use crate::format::layout::Layout;
use crate::format::v2::{self, FileKeys};
use crate::format::{BLOCK_OVERHEAD, FORMAT_VERSION, Id, NONCE_LEN, TAG_LEN, random_fill};
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
    /// A write of a v2 header's state (length generation, counters).
    State,
}

/// Counters a v2 writer reserves at a time: one header write (and one
/// fdatasync) per this many sealed blocks, or per write session.
const CTR_CHUNK: u64 = 1 << 20;

#[cfg(not(test))]
fn ctr_chunk() -> u64 {
    CTR_CHUNK
}

// Tests lower the reservation to cross it often.
#[cfg(test)]
thread_local! { static TEST_CTR_CHUNK: std::cell::Cell<u64> = const { std::cell::Cell::new(CTR_CHUNK) }; }
#[cfg(test)]
fn ctr_chunk() -> u64 {
    TEST_CTR_CHUNK.with(|c| c.get())
}

/// What a v2 slot holds, for the updates that keep holes provable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Sealed data (or a v1 block).
    Data,
    /// A hole block (all zeros) or a marker, in the run `start..=marker`.
    Run { start: u64, marker: u64 },
}

/// The markers a v2 write adds or rewrites: (slot, run start) each.
#[derive(Default)]
struct HolePlan {
    /// A marker for the run that ends just before the write.
    left: Option<(u64, u64)>,
    /// The marker of the run that continues after the write.
    right: Option<(u64, u64)>,
    /// The marker that closes the gap a write past the end leaves.
    gap: Option<(u64, u64)>,
    /// The old last block is a marker of a run starting here.
    old_last_run: Option<u64>,
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
    /// v2: the header state as this object last wrote or verified it.
    st: v2::State,
    /// v2: the subkeys, derived once the DEK is known.
    keys: std::sync::OnceLock<FileKeys>,
    /// v2: this writer's reserved counters, `ctr_next..ctr_end`.
    ctr_next: u64,
    ctr_end: u64,
    /// v2: a run of hole blocks `start..marker` already proven by its marker.
    proven: std::sync::Mutex<Option<(u64, u64)>>,
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
        let st = header.as_ref().and_then(|h| h.state()).unwrap_or_default();
        Ok(Self {
            file,
            layout,
            volume_id,
            header,
            header_raw,
            size,
            size_ok,
            verified: AtomicBool::new(false),
            st,
            keys: std::sync::OnceLock::new(),
            ctr_next: 0,
            ctr_end: 0,
            proven: std::sync::Mutex::new(None),
        })
    }

    /// Whether the file is in format v2.
    pub fn is_v2(&self) -> bool {
        self.header.as_ref().is_some_and(|h| h.version == v2::VERSION)
    }

    /// The v2 header state (default for v1 and empty files).
    pub fn state(&self) -> v2::State {
        self.st
    }

    fn forget_proofs(&self) {
        if let Ok(mut g) = self.proven.lock() {
            *g = None;
        }
    }

    /// Drops what belonged to the previous header (a new file ID).
    fn reset_file_state(&mut self) {
        self.keys = std::sync::OnceLock::new();
        self.st = self.header.as_ref().and_then(|h| h.state()).unwrap_or_default();
        (self.ctr_next, self.ctr_end) = (0, 0);
        self.forget_proofs();
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
        self.forget_proofs();
        if backing == 0 {
            if self.header.take().is_some() {
                self.header_raw.clear();
                self.verified.store(false, Ordering::Relaxed);
                self.reset_file_state();
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
        // Another mount changed only a v2 state (same file, same key): keep
        // the subkeys and this writer's counters, which stay its own (every
        // reservation starts at the header's top); verify the new state.
        let same_file = self.header.as_ref().is_some_and(|o| {
            o.file_id == h.file_id && o.version == h.version && self.header_raw.len() == raw.len() && {
                let (a, b) = (&self.header_raw, &*raw);
                a[..STATE_RANGE.start] == b[..STATE_RANGE.start] && a[STATE_RANGE.end..] == b[STATE_RANGE.end..]
            }
        });
        self.header_raw = raw.to_vec();
        self.verified.store(false, Ordering::Relaxed);
        if same_file {
            // The header keeps its identity (a key fetched for it still
            // fits); the new state is verified before its next use.
            self.st = h.state().unwrap_or_default();
            return Ok(false);
        }
        self.header = Some(std::sync::Arc::new(h));
        self.reset_file_state();
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
            if h.version == v2::VERSION {
                let keys = self.keys.get_or_init(|| FileKeys::derive(key, &h.file_id));
                // The state as stored (which `st` mirrors): another mount
                // may have changed it since the header was parsed.
                let raw = self.header_raw.get(STATE_RANGE).ok_or(HeaderError::Truncated)?;
                let (state, tag) = raw.split_at(NONCE_LEN);
                let state: [u8; NONCE_LEN] = state.try_into().map_err(|_| HeaderError::Truncated)?;
                let want = keys.state_tag(&h.auth_bytes(), &state);
                aws_lc_rs::constant_time::verify_slices_are_equal(&want, tag).map_err(|_| HeaderError::Auth)?;
                if v2::State::decode(&state) != Some(self.st) {
                    return Err(HeaderError::Auth.into());
                }
            } else {
                h.verify(key)?;
            }
            self.verified.store(true, Ordering::Relaxed);
        }
        Ok(h)
    }

    /// The key blocks are sealed under: the DEK (v1) or the file's block
    /// subkey (v2). Call after `check_key`.
    fn bkey<'a>(&'a self, key: &'a DataKey) -> &'a DataKey {
        match (self.is_v2(), self.keys.get()) {
            (true, Some(k)) => k.block(),
            _ => key,
        }
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
    fn open_one<'b>(
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
    fn open_parts(
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
            if h.version != v2::VERSION || (self.st.holes() && self.hole_proven(h, index)?) {
                return Ok(());
            }
            return Err(FileError::Block { index, what: "zeroed, and no hole marker covers it" });
        }
        let v = h.version;
        if open_detached_v(self.bkey(key), &self.aad(h, index, is_last), v, nonce, tag, plain).is_ok() {
            if v == v2::VERSION {
                self.check_gen(index, nonce, is_last)?;
            }
            return Ok(());
        }
        self.open_fallback(h, key, index, is_last, plain)
    }

    /// A v2 block that authenticated must also come from a generation the
    /// header allows at its place, with a counter the header reserved.
    fn check_gen(&self, index: u64, nonce: &[u8], last: bool) -> Result<(), FileError> {
        let (g, c) = v2::nonce_parts(nonce);
        if self.st.accepts(g, last) && c < self.st.ctr_top {
            return Ok(());
        }
        Err(FileError::Block { index, what: "from another state of the file (rolled back or spliced)" })
    }

    /// Reads slot `index` (`len` stored bytes) into `buf`.
    fn read_slot<'b>(&self, index: u64, len: usize, buf: &'b mut [u8]) -> Result<&'b mut [u8], FileError> {
        let s = &mut buf[..len];
        read_exact_at(&self.file, s, self.layout.block_offset(index))
            .map_err(|_| FileError::Block { index, what: "missing (file truncated)" })?;
        Ok(s)
    }

    /// Stored length of slot `index` at the current size.
    fn slot_len(&self, index: u64) -> usize {
        self.layout.plain_len(self.size, index) as usize + BLOCK_OVERHEAD
    }

    /// The error path of a v2 block: a hole marker (reads as zeros), or,
    /// while a length change is pending, a stale last block; else an error.
    fn open_fallback(
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
        if self.st.pending()
            && let Some(n) = open_stale_slot(keys.block(), &self.aad(h, index, true), v2::VERSION, stored, work)
            && self.st.accepts(v2::nonce_parts(stored).0, true)
        {
            out[..n].copy_from_slice(&work[NONCE_LEN..NONCE_LEN + n]);
            out[n..].fill(0);
            return Ok(());
        }
        Err(FileError::Block { index, what: "authentication failed" })
    }

    /// Whether zero block `index` lies in a run of holes that a marker
    /// proves (cached per run until the file changes).
    fn hole_proven(&self, h: &FileHeader, index: u64) -> Result<bool, FileError> {
        if let Ok(g) = self.proven.lock()
            && let Some((s, m)) = *g
            && (s..m).contains(&index)
        {
            return Ok(true);
        }
        match self.find_marker(h, index)? {
            Some((s, m)) if s <= index => {
                if let Ok(mut g) = self.proven.lock() {
                    *g = Some((s, m));
                }
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// The first slot after zero block `index` that is not all zeros, if it
    /// is a valid marker: (its run start, its index). Skips what the
    /// backing file holds as holes with SEEK_DATA, so a hole costs O(1).
    fn find_marker(&self, h: &FileHeader, index: u64) -> Result<Option<(u64, u64)>, FileError> {
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
    fn slot_kind(&self, h: &FileHeader, index: u64) -> Result<Slot, FileError> {
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
    fn open_stale(&self, h: &FileHeader, key: &DataKey, index: u64, out: &mut [u8]) -> Result<(), FileError> {
        let len = out.len() + BLOCK_OVERHEAD;
        let mut scratch = Scratch::take();
        let (stored, work) = scratch.get(2 * len).split_at_mut(len);
        read_exact_at(&self.file, stored, self.layout.block_offset(index))
            .map_err(|_| FileError::Block { index, what: "missing (file truncated)" })?;
        let n = open_stale_slot(key, &self.aad(h, index, true), FORMAT_VERSION, stored, work)
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
        let (nonce, tag) = trailer.split_at(NONCE_LEN);
        self.open_parts(h, key, index, is_last, nonce, tag, plain)?;
        Ok(plen)
    }

    /// Installs a header for an empty file, or checks the given key.
    fn ensure_header(&mut self, key: KeyArg<'_>) -> Result<(), FileError> {
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
                let keys = FileKeys::derive(&f.key, &f.file_id);
                let st = v2::State { flags: 0, lgen: 1, ctr_top: ctr_chunk() };
                h.seal_state(&keys, st);
                let bytes = h.to_bytes()?;
                self.file.write_all_at(&bytes, 0)?;
                self.header = Some(std::sync::Arc::new(h));
                self.header_raw = bytes;
                self.reset_file_state();
                let _ = self.keys.set(keys);
                (self.ctr_next, self.ctr_end) = (0, st.ctr_top);
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
    /// Seals blocks `first..` in `region` for a file of `new_size` bytes. A
    /// block that `src` (data, offset) covers whole is sealed straight from
    /// it; any other block's plaintext must already sit in its slot. v2
    /// blocks take the nonces (current generation, `ctr`, `ctr + 1`, ...);
    /// the caller reserved them with `take_ctrs`.
    #[allow(clippy::too_many_arguments)]
    fn seal(
        &self,
        key: &DataKey,
        first: u64,
        region: &mut [u8],
        new_size: u64,
        src: Option<(&[u8], u64)>,
        ctr: u64,
    ) -> Result<(), FileError> {
        let h = self.header.as_ref().ok_or(FileError::NeedKey)?;
        let (v, key) = (h.version, self.bkey(key));
        let new_last = (new_size - 1) >> self.layout.block_log2();
        let bs = self.layout.block_size();
        let stride = bs as usize + BLOCK_OVERHEAD;
        // v1 nonces come from the RNG in batches, not one call per block.
        let mut nonces = [0u8; NONCE_LEN * 32];
        for (k, chunk) in region.chunks_mut(stride).enumerate() {
            let slot = k % 32;
            let nn = if v == v2::VERSION {
                v2::nonce(self.st.lgen, ctr + k as u64)
            } else {
                if slot == 0 {
                    random_fill(&mut nonces).map_err(|_| FileError::Random)?;
                }
                let mut nn = [0u8; NONCE_LEN];
                nn.copy_from_slice(&nonces[slot * NONCE_LEN..(slot + 1) * NONCE_LEN]);
                nn
            };
            let i = first + k as u64;
            let aad = self.aad(h, i, i == new_last);
            let plen = chunk.len() - BLOCK_OVERHEAD;
            let whole = src.and_then(|(data, off)| {
                let at = (i * bs).checked_sub(off)? as usize;
                data.get(at..at + plen)
            });
            match whole {
                Some(plain) => seal_to_v(key, &aad, v, nn, plain, chunk)?,
                None => seal_in_place_v(key, &aad, v, nn, chunk)?,
            }
        }
        Ok(())
    }

    /// Reserves `n` v2 nonce counters and returns the first. A writer takes
    /// counters from its own reservation; a new one starts at the header's
    /// top, which is written and synced before any of them is used, so no
    /// crash or power loss can hand a counter out twice. 0 for v1.
    fn take_ctrs(&mut self, n: u64) -> Result<u64, FileError> {
        if !self.is_v2() {
            return Ok(0);
        }
        if self.ctr_next + n > self.ctr_end {
            let base = self.st.ctr_top;
            let top = base.checked_add(n.max(ctr_chunk())).filter(|&t| t <= v2::MAX_CTR).ok_or(FileError::TooLarge)?;
            self.st.ctr_top = top;
            self.write_state()?;
            self.file.sync_data()?;
            (self.ctr_next, self.ctr_end) = (base, top);
        }
        let c = self.ctr_next;
        self.ctr_next += n;
        Ok(c)
    }

    /// Writes the v2 header state (`st`) and its tag: one pwrite of 28
    /// bytes inside the first sector.
    fn write_state(&mut self) -> Result<(), FileError> {
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
    fn begin_length_change(&mut self, holes: bool) -> Result<(), FileError> {
        let lgen = self.st.lgen.checked_add(1).filter(|&g| g <= v2::MAX_LGEN).ok_or(FileError::TooLarge)?;
        self.st.lgen = lgen;
        self.st.flags |= v2::FLAG_PENDING | if holes { v2::FLAG_HOLES } else { 0 };
        self.write_state()
    }

    /// Ends the pending length change (v2): from here on only the current
    /// generation's last block reads. Called at fsync, when the last writer
    /// closes, and after a truncate; cheap when nothing is pending.
    pub fn commit(&mut self) -> Result<(), FileError> {
        if self.is_v2() && self.st.pending() && self.keys.get().is_some() {
            self.st.flags &= !v2::FLAG_PENDING;
            self.write_state()?;
        }
        Ok(())
    }

    /// Seals a v2 hole marker for slot `index` (`plen` zero bytes) in `out`.
    fn seal_marker(&self, index: u64, last: bool, run_start: u64, out: &mut [u8]) -> Result<(), FileError> {
        let (Some(h), Some(keys)) = (self.header.as_ref(), self.keys.get()) else { return Err(FileError::NeedKey) };
        v2::seal_marker(keys, &self.aad(h, index, last), run_start, self.st.lgen, out);
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

    fn write_inner(&mut self, key: KeyArg<'_>, off: u64, data: &[u8]) -> Result<(), FileError> {
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
        let ctr = self.take_ctrs(last - first + 2)?;
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
                    None => self.seal(k, ol, &mut resealed[..sb], new_size, None, ctr + last - first + 1)?,
                }
                saved_len = olen;
            } else if saved_len == 0 {
                // The write covers it whole: keep its bytes only to undo.
                read_exact_at(&self.file, &mut saved[..olen], self.layout.block_offset(ol))
                    .map_err(|_| FileError::Block { index: ol, what: "missing (file truncated)" })?;
                saved_len = olen;
            }
        }
        self.seal(k, first, region, new_size, Some((data, off)), ctr)?;
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
    fn undo_state(&mut self, old: v2::State) {
        #[cfg(test)]
        if fault::crashed() {
            return;
        }
        if self.is_v2() && self.st != old {
            // Counters stay reserved: never hand one out twice.
            let top = self.st.ctr_top;
            self.st = v2::State { ctr_top: top, ..old };
            let _ = self.write_state();
        }
    }

    /// What a v2 write must do to keep every hole provable: for a write of
    /// blocks `first..=last`, the marker that a run left of it needs, the
    /// marker right of it that must start later, the gap it leaves past the
    /// end, and whether the old last block is a marker. Reads the edge
    /// slots only when the file has holes.
    fn plan_holes(&self, h: &FileHeader, first: u64, last: u64, growing: bool) -> Result<HolePlan, FileError> {
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
    fn fix_right(&mut self, right: Option<(u64, u64)>, size: u64, last_index: u64) -> Result<(), FileError> {
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
    fn shrink(&mut self, key: KeyArg<'_>, new_size: u64) -> Result<(), FileError> {
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
        let ctr = self.take_ctrs(1)?;
        let mut scratch = Scratch::take();
        let (saved, work) = scratch.get(2 * sb).split_at_mut(sb);
        match self.read_block(&h, k, nl, &mut work[NONCE_LEN..NONCE_LEN + bs], Some(&mut *saved)) {
            Ok(_) => {}
            // A torn tail leaves the last whole block sealed as not last:
            // cutting the file there is what the caller asks for.
            Err(e) if !self.size_ok && Some(nl) == self.last_index() => {
                let w = &mut work[..olen];
                w.copy_from_slice(&saved[..olen]);
                open_in_place_v(self.bkey(k), &self.aad(&h, nl, false), v, w).map_err(|_| e)?;
            }
            Err(e) => return Err(e),
        }
        match run {
            Some(start) => self.seal_marker(nl, true, start, &mut work[..q + BLOCK_OVERHEAD])?,
            None => {
                let nonce = if v == v2::VERSION {
                    v2::nonce(self.st.lgen, ctr)
                } else {
                    let mut n = [0u8; NONCE_LEN];
                    random_fill(&mut n).map_err(|_| FileError::Random)?;
                    n
                };
                seal_in_place_v(self.bkey(k), &self.aad(&h, nl, true), v, nonce, &mut work[..q + BLOCK_OVERHEAD])?;
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
            return self.verify_v2(h, r);
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
            if open_stale_slot(key, &self.aad(h, i, true), FORMAT_VERSION, s, work).is_some() {
                r.stale_blocks.push(i);
            } else {
                r.bad_blocks.push(i);
            }
        }
        Ok(r)
    }

    /// `verify` for a v2 file: proven holes and markers are fine; a stale
    /// last block counts only while a length change is pending.
    fn verify_v2(&self, h: &FileHeader, mut r: VerifyReport) -> Result<VerifyReport, FileError> {
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
                if !(self.st.holes() && self.hole_proven(h, i)?) {
                    r.bad_blocks.push(i);
                }
                continue;
            }
            let w = &mut work[..s.len()];
            w.copy_from_slice(s);
            if open_in_place_v(keys.block(), &self.aad(h, i, is_last), v2::VERSION, w).is_ok() {
                if self.check_gen(i, s, is_last).is_err() {
                    r.bad_blocks.push(i);
                }
                continue;
            }
            if v2::open_marker(keys, &self.aad(h, i, is_last), s).is_some_and(|(_, g)| self.st.accepts(g, is_last)) {
                continue;
            }
            if self.st.pending()
                && open_stale_slot(keys.block(), &self.aad(h, i, true), v2::VERSION, s, work).is_some()
                && self.st.accepts(v2::nonce_parts(s).0, true)
            {
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
        let (v, bkey) = (h.version, self.bkey(key));
        // A v2 repair takes a block of any earlier generation (a power loss
        // may have kept an older last block) and re-seals it as current.
        let gen_ok = |s: &[u8]| v != v2::VERSION || v2::nonce_parts(s).0 <= self.st.lgen;
        let attempt = |last: bool, work: &mut [u8]| {
            work[..n].copy_from_slice(stored);
            open_in_place_v(bkey, &self.aad(h, index, last), v, &mut work[..n]).is_ok() && gen_ok(stored)
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
        if let Some(keys) = self.keys.get().filter(|_| v == v2::VERSION)
            && [true, false].iter().any(|&l| v2::open_marker(keys, &self.aad(h, index, l), stored).is_some())
        {
            work[..n].fill(0);
            return Some((n - BLOCK_OVERHEAD, true));
        }
        open_stale_slot(bkey, &self.aad(h, index, true), v, stored, work).filter(|_| gen_ok(stored)).map(|p| (p, true))
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
                    let nonce = self.repair_nonce()?;
                    let w = &mut work[..n + BLOCK_OVERHEAD];
                    seal_in_place_v(self.bkey(key), &self.aad(&h, last, true), v, nonce, w)?;
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
            let Some(n) = open_stale_slot(self.bkey(key), &self.aad(&h, i, true), v, stored, work) else { continue };
            work[NONCE_LEN + n..NONCE_LEN + bs].fill(0);
            let nonce = self.repair_nonce()?;
            seal_in_place_v(self.bkey(key), &self.aad(&h, i, false), v, nonce, work)?;
            self.file.write_all_at(work, off)?;
            r.resealed.push(i);
        }
        self.file.sync_all()?;
        self.commit()?;
        self.file.sync_all()?;
        Ok(r)
    }

    /// For `repair` (v2): if slot `index` (stored bytes `slot`) is a hole or
    /// a marker, where its run starts: a marker's own start, or the first
    /// of the zero slots right before it.
    fn run_start_before(&self, h: &FileHeader, index: u64, slot: &[u8]) -> Result<Option<u64>, FileError> {
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

    /// A nonce for a block `repair` re-seals: random (v1) or the next
    /// counter at the current generation (v2).
    fn repair_nonce(&mut self) -> Result<[u8; NONCE_LEN], FileError> {
        if self.is_v2() {
            let c = self.take_ctrs(1)?;
            return Ok(v2::nonce(self.st.lgen, c));
        }
        let mut n = [0u8; NONCE_LEN];
        random_fill(&mut n).map_err(|_| FileError::Random)?;
        Ok(n)
    }

    /// `fallocate(PUNCH_HOLE)` of `off..end` (inside the file): the parts of
    /// blocks at its edges and the last block are written as zeros; whole
    /// blocks before the last become a run of holes, closed by a marker
    /// (format v2), in O(1) space and time. The marker is written before the
    /// backing range is punched, so a crash in between leaves data or
    /// zeros, both readable. v1 files get sealed zero blocks.
    pub fn punch(&mut self, key: &DataKey, off: u64, end: u64) -> Result<(), FileError> {
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
            self.st.flags |= v2::FLAG_HOLES;
            self.write_state()?;
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

    fn write_zeros(&mut self, key: &DataKey, mut off: u64, end: u64) -> Result<(), FileError> {
        let zeros = vec![0u8; (end.saturating_sub(off)).min(1 << 20) as usize];
        while off < end {
            let l = (end - off).min(zeros.len() as u64);
            self.write_at(KeyArg::Existing(key), off, &zeros[..l as usize])?;
            off += l;
        }
        Ok(())
    }

    /// Writes this v1 file's plaintext into `out` (an empty file) as a v2
    /// file under the same file ID and wrapped key, so the DEK and the
    /// provider's binding stay and no KMS call is needed beyond the unwrap
    /// the caller made. Holes of the v1 file (all-zero slots) stay holes.
    /// The result is committed and fsynced; the caller renames it into
    /// place. `progress` is told the bytes done.
    pub fn convert_to_v2(
        &self,
        key: &DataKey,
        out: File,
        mut progress: impl FnMut(u64),
    ) -> Result<EncryptedFile, FileError> {
        let h = self.check_key(key)?;
        if h.version != FORMAT_VERSION {
            return Err(FileError::Header(HeaderError::UnsupportedVersion(h.version)));
        }
        let mut dst = EncryptedFile::open(out, self.layout, self.volume_id)?;
        if self.size == 0 {
            return Ok(dst);
        }
        let dek = DataKey::from_slice(key.expose_secret()).ok_or(FileError::NeedKey)?;
        let fresh = FreshKey { file_id: h.file_id, key: dek, wrapped: h.wrapped.clone() };
        let bs = self.layout.block_size();
        let chunk = 256 * bs;
        let fd = self.file.as_raw_fd();
        let mut buf = Vec::new();
        let mut off = 0u64;
        while off < self.size {
            let len = chunk.min(self.size - off);
            // Skip ranges the backing file holds as holes (SEEK_DATA).
            let start = self.layout.block_offset(off / bs);
            let has_data = match crate::sys::lseek(fd, start, libc::SEEK_DATA) {
                Ok(d) => d < self.layout.block_offset((off + len).div_ceil(bs)),
                Err(e) => e.raw_os_error() != Some(libc::ENXIO),
            };
            if has_data || off + len == self.size {
                let n = self.read_into(Some(key), off, len as usize, &mut buf)?;
                let arg = if dst.header.is_none() { KeyArg::Fresh(&fresh) } else { KeyArg::Existing(&fresh.key) };
                dst.write_at(arg, off, &buf[..n])?;
            }
            off += len;
            progress(off);
        }
        dst.commit()?;
        dst.sync(false)?;
        Ok(dst)
    }

    /// fsync of the backing file. The caller then [`Self::commit`]s (v2),
    /// now that the data a pending length change describes is on disk.
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
fn open_stale_slot(key: &DataKey, aad: &BlockAad<'_>, version: u8, stored: &[u8], work: &mut [u8]) -> Option<usize> {
    let z = stored.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    for l in z.max(BLOCK_OVERHEAD + 1)..=(z + TAG_LEN - 1).min(stored.len()) {
        let w = &mut work[..l];
        w.copy_from_slice(&stored[..l]);
        if open_in_place_v(key, aad, version, w).is_ok() {
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

    /// Format v2 nonces: with the counter reservation lowered to 4, many
    /// write sessions (each a new `EncryptedFile`, as after a remount),
    /// rewrites of one block and appends never seal two blocks under one
    /// (generation, counter) pair, every counter lies below the header's
    /// reservation, and a failed or crashed state write hands out nothing
    /// twice. Every nonce ever written is collected from the backing file
    /// after each write.
    #[test]
    fn v2_nonces_never_repeat_across_sessions_and_reservations() {
        TEST_CTR_CHUNK.with(|c| c.set(4));
        let fx = Fx::new();
        let mut seen = std::collections::HashSet::new();
        let mut f = fx.file(&pattern(3 * B as usize, 1));
        let collect = |seen: &mut std::collections::HashSet<[u8; 12]>, f: &EncryptedFile, fresh: &[u64]| {
            let top = f.state().ctr_top;
            for &i in fresh {
                let mut n = [0u8; 12];
                f.backing().read_exact_at(&mut n, 256 + i * (B + 28)).unwrap();
                assert!(v2::nonce_parts(&n).1 < top, "counter below the reservation");
                assert!(seen.insert(n), "nonce {n:?} sealed twice (block {i})");
            }
        };
        collect(&mut seen, &f, &[0, 1, 2]);
        let mut reserved = f.state().ctr_top;
        for session in 0..60u64 {
            if session % 3 == 0 {
                f = fx.open(); // a new session: a new reservation
            }
            let i = session % 4;
            let k = &fx.key.key;
            let armed = session % 7 == 3;
            if armed {
                // A state write that fails: the next one must not reuse.
                fault::arm(Step::State, Fault::Fail);
            }
            let r = f.write_at(KeyArg::Existing(k), i * B + 10, &pattern(100 + session as usize, session as u8));
            if armed && fault::fired() {
                assert!(r.is_err());
                continue;
            }
            r.unwrap();
            collect(&mut seen, &f, &[i]);
            assert!(f.state().ctr_top >= reserved);
            reserved = f.state().ctr_top;
        }
        assert!(reserved > 60, "reservations crossed many times: top {reserved}");
        TEST_CTR_CHUNK.with(|c| c.set(CTR_CHUNK));
    }

    /// A v1 file (written through the v1 codec by hand) converts to v2
    /// with the same content, holes kept as holes, same file ID and key.
    #[test]
    fn v1_files_convert_to_v2() {
        let fx = Fx::new();
        let h = FileHeader::new(12, 256, VOL, fx.key.file_id, fx.key.wrapped.clone());
        let mut hh = h.clone();
        hh.seal(&fx.key.key).unwrap();
        let mut bytes = hh.to_bytes().unwrap();
        let data = pattern(5 * B as usize + 77, 3);
        let blocks = data.len().div_ceil(B as usize);
        for (i, c) in data.chunks(B as usize).enumerate() {
            let aad = BlockAad { file_id: &fx.key.file_id, block_log2: 12, index: i as u64, last: i + 1 == blocks };
            if i == 2 {
                bytes.extend(std::iter::repeat_n(0u8, c.len() + 28)); // a v1 hole
                continue;
            }
            bytes.extend(crate::format::block::seal_block(&fx.key.key, &aad, c).unwrap());
        }
        let mut want = data.clone();
        want[2 * B as usize..3 * B as usize].fill(0);
        std::fs::write(fx.dir.path().join("f"), &bytes).unwrap();
        let v1 = fx.open();
        assert!(!v1.is_v2());
        assert_eq!(v1.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap(), want);
        let out = fx.dir.path().join("g");
        let o = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&out).unwrap();
        let mut seen = 0;
        let v2f = v1.convert_to_v2(&fx.key.key, o, |n| seen = n).unwrap();
        assert_eq!(seen, want.len() as u64);
        assert!(v2f.is_v2());
        assert_eq!(v2f.header().unwrap().file_id, fx.key.file_id);
        drop(v2f);
        let o = std::fs::OpenOptions::new().read(true).write(true).open(&out).unwrap();
        let f = EncryptedFile::open(o, Layout::new(256, 12).unwrap(), VOL).unwrap();
        assert!(f.is_v2());
        assert_eq!(f.read_at(Some(&fx.key.key), 0, 1 << 20).unwrap(), want);
        assert_eq!(f.verify(&fx.key.key).unwrap(), VerifyReport::default());
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
        let steps = [Step::Reserve, Step::WriteNew, Step::WriteOld, Step::Truncate, Step::State];
        let mut fired = 0;
        for size in [0u64, 1, 100, B - 1, B, B + 100, 3 * B - 5, 3 * B] {
            let old = pattern(size as usize, size as u8);
            for op in ops(size) {
                for step in steps {
                    // The 28-byte state write lies in the first sector and
                    // the first page: it is never torn, only done or not.
                    let fs = faults(&op, old.len());
                    for f in fs.into_iter().filter(|f| step != Step::State || matches!(f, Fault::Fail | Fault::Crash)) {
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
