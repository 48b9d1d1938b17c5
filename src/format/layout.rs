//! Pure offset math between plaintext and backing file positions.
//!
//! A non-empty backing file is `header (H) || block 0 || block 1 || ...`, each
//! stored block `nonce || ciphertext || tag` of `len + 28` bytes, every block
//! but the last holding exactly B plaintext bytes. So the plaintext size
//! follows from the backing size alone, with no read and no key.

use super::{BLOCK_OVERHEAD, MAX_BLOCK_LOG2, MIN_BLOCK_LOG2};

/// The geometry of one volume: header slot and block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    header_size: u64,
    block_log2: u8,
}

/// The backing size cannot be produced by this layout (torn write or tampering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("backing size {0} is not a valid kmsfs file size")]
pub struct BadSize(pub u64);

impl Layout {
    /// A layout; `None` for an out-of-range block size or header slot.
    pub fn new(header_size: u16, block_log2: u8) -> Option<Self> {
        if !(MIN_BLOCK_LOG2..=MAX_BLOCK_LOG2).contains(&block_log2)
            || usize::from(header_size) < super::header::MIN_HEADER_SIZE
        {
            return None;
        }
        Some(Self { header_size: header_size.into(), block_log2 })
    }
    /// Header slot in bytes.
    pub fn header_size(&self) -> u64 {
        self.header_size
    }
    /// log2 of the block size.
    pub fn block_log2(&self) -> u8 {
        self.block_log2
    }
    /// Plaintext bytes per block.
    pub fn block_size(&self) -> u64 {
        1 << self.block_log2
    }
    /// Stored bytes per full block.
    pub fn stored_block(&self) -> u64 {
        self.block_size() + BLOCK_OVERHEAD as u64
    }
    /// Backing offset of block `index`.
    pub fn block_offset(&self, index: u64) -> u64 {
        self.header_size + index * self.stored_block()
    }
    /// Number of blocks holding `plain` bytes.
    pub fn block_count(&self, plain: u64) -> u64 {
        plain.div_ceil(self.block_size())
    }
    /// Plaintext length of block `index` in a file of `plain` bytes.
    pub fn plain_len(&self, plain: u64, index: u64) -> u64 {
        plain.saturating_sub(index * self.block_size()).min(self.block_size())
    }
    /// Backing size for a plaintext size.
    pub fn backing_size(&self, plain: u64) -> u64 {
        if plain == 0 {
            return 0;
        }
        let full = plain / self.block_size();
        let rem = plain % self.block_size();
        self.header_size + full * self.stored_block() + if rem > 0 { rem + BLOCK_OVERHEAD as u64 } else { 0 }
    }
    /// Plaintext size for a backing size. An invalid size still yields the
    /// plaintext of its whole blocks, so `ls` works while reads report EIO.
    pub fn plain_size(&self, backing: u64) -> Result<u64, (u64, BadSize)> {
        if backing == 0 {
            return Ok(0);
        }
        if backing <= self.header_size {
            return Err((0, BadSize(backing)));
        }
        let body = backing - self.header_size;
        let full = body / self.stored_block();
        let rem = body % self.stored_block();
        match rem {
            0 => Ok(full * self.block_size()),
            r if r > BLOCK_OVERHEAD as u64 => Ok(full * self.block_size() + r - BLOCK_OVERHEAD as u64),
            _ => Err((full * self.block_size(), BadSize(backing))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_example() {
        // docs/FORMAT.md: H = 256, B = 4096, 10000 bytes -> 2 full + 1808.
        let l = Layout::new(256, 12).unwrap();
        assert_eq!(l.backing_size(10_000), 256 + 2 * 4124 + 1808 + 28);
        assert_eq!(l.plain_size(10_340), Ok(10_000));
        assert_eq!(l.plain_size(0), Ok(0));
        assert!(l.plain_size(256).is_err());
        assert!(l.plain_size(256 + 28).is_err());
        assert_eq!(l.plain_size(256 + 29), Ok(1));
    }

    #[test]
    fn inverse_for_all_small_sizes() {
        for log2 in [12u8, 13, 16, 20] {
            let l = Layout::new(512, log2).unwrap();
            let b = l.block_size();
            for p in (0..3 * b + 5).step_by(97).chain([b - 1, b, b + 1, 2 * b, 2 * b + 7]) {
                assert_eq!(l.plain_size(l.backing_size(p)), Ok(p), "log2 {log2} p {p}");
            }
        }
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(Layout::new(256, 11).is_none());
        assert!(Layout::new(256, 21).is_none());
        assert!(Layout::new(64, 12).is_none());
    }
}
