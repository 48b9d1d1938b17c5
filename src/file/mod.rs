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

/// Seals a v2 writer counts in the header at a time: one 28-byte header
/// write per this many sealed blocks, or per write session.
const CTR_CHUNK: u64 = 1 << 20;

#[cfg(not(test))]
fn ctr_chunk() -> u64 {
    CTR_CHUNK
}

#[cfg(not(test))]
fn seal_budget() -> u64 {
    v2::SEAL_BUDGET
}

// Tests lower the count step and the budget to re-key often.
#[cfg(test)]
thread_local! {
    static TEST_CTR_CHUNK: std::cell::Cell<u64> = const { std::cell::Cell::new(CTR_CHUNK) };
    static TEST_BUDGET: std::cell::Cell<u64> = const { std::cell::Cell::new(v2::SEAL_BUDGET) };
}
#[cfg(test)]
fn ctr_chunk() -> u64 {
    TEST_CTR_CHUNK.with(|c| c.get())
}
#[cfg(test)]
fn seal_budget() -> u64 {
    TEST_BUDGET.with(|c| c.get())
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
    /// v2: the header says a length change is pending, and not one this
    /// object began: a crash (or another mount) left it. The first update
    /// settles it (`settle`) before it changes anything, and only a pending
    /// change of this object's own is ever committed.
    inherited: bool,
    /// v2: the header state as this object last wrote or verified it.
    st: v2::State,
    /// v2: the subkeys of the state's epoch, derived once the DEK is known.
    keys: std::sync::OnceLock<FileKeys>,
    /// v2, while converting: the previous epoch's subkeys (epoch > 0).
    prev_keys: std::sync::OnceLock<FileKeys>,
    /// v2: seals this writer counted in the header and has not made yet.
    seals_left: u64,
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
            inherited: st.pending(),
            st,
            keys: std::sync::OnceLock::new(),
            prev_keys: std::sync::OnceLock::new(),
            seals_left: 0,
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
        self.prev_keys = std::sync::OnceLock::new();
        self.st = self.header.as_ref().and_then(|h| h.state()).unwrap_or_default();
        self.inherited = self.st.pending();
        self.seals_left = 0;
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
            self.inherited = self.st.pending();
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
                let keys = self.keys.get_or_init(|| FileKeys::derive(key, &h.file_id, self.st.epoch));
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

    /// The AAD bytes of block `index`: v1's, or v2's with the generation
    /// (`generation` for the last block, 0 for the others).
    fn aad_bytes(&self, h: &FileHeader, index: u64, last: bool, generation: u64) -> AadBytes {
        let a = self.aad(h, index, last);
        if h.version == v2::VERSION {
            AadBytes::V2(v2::aad(&a, if last { generation } else { 0 }))
        } else {
            AadBytes::V1(a.bytes())
        }
    }

    /// v2, converting: the key the blocks not rewritten yet are under (the
    /// previous epoch's; for epoch 0 the v1 DEK, with v1 AADs).
    fn prev_key<'a>(&'a self, h: &FileHeader, key: &'a DataKey) -> Option<&'a DataKey> {
        match self.st.epoch {
            0 => None,
            e => Some(self.prev_keys.get_or_init(|| FileKeys::derive(key, &h.file_id, e - 1)).block()),
        }
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
fn open_stale_slot(key: &DataKey, aad: &[u8], stored: &[u8], work: &mut [u8]) -> Option<usize> {
    let z = stored.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
    for l in z.max(BLOCK_OVERHEAD + 1)..=(z + TAG_LEN - 1).min(stored.len()) {
        let w = &mut work[..l];
        w.copy_from_slice(&stored[..l]);
        if open_in_place_v(key, aad, w).is_ok() {
            return Some(l - BLOCK_OVERHEAD);
        }
    }
    None
}

/// Opens `stored` as a v1 block under the DEK, at its flag (`aad`) or as a
/// v1 stale last block (`last_aad`), as a conversion in place may have left
/// it; returns the plaintext length (at `work[NONCE_LEN..]`).
fn open_v1(
    key: &DataKey,
    aad: &BlockAad<'_>,
    last_aad: &BlockAad<'_>,
    stored: &[u8],
    work: &mut [u8],
) -> Option<usize> {
    let w = &mut work[..stored.len()];
    w.copy_from_slice(stored);
    if let Ok(p) = open_in_place(key, aad, w) {
        return Some(p.len());
    }
    open_stale_slot(key, &last_aad.bytes(), stored, work)
}

/// A block's AAD: v1's 31 bytes or v2's 39.
enum AadBytes {
    V1([u8; crate::format::block::AAD_LEN]),
    V2([u8; v2::AAD_LEN]),
}

impl std::ops::Deref for AadBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::V1(a) => a,
            Self::V2(a) => a,
        }
    }
}

fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    f.read_exact_at(buf, off)
}

mod check;
#[cfg(test)]
mod fault;
mod lock;
mod read;
mod scratch;
#[cfg(test)]
mod tests;
mod write;

pub use lock::{APP_LOCK_END, UpdateLock};
pub(crate) use scratch::Scratch;
use scratch::TRAILER;
