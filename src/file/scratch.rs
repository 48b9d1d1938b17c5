//! Reusable per-thread buffers for the data path.

use super::*;

/// A stored block's nonce and tag, read apart from its ciphertext.
pub(super) const TRAILER: usize = BLOCK_OVERHEAD;

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
