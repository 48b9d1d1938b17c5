//! The plaintext data key (DEK): the one secret every block depends on.

use std::mem::MaybeUninit;

use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use zeroize::Zeroize;

use super::DEK_LEN;

/// A 256-bit data key, ready to seal and open blocks.
///
/// No `Clone` and no derived `Debug`: the bytes and the expanded AES-GCM key
/// (ring's, which has the VAES-AVX2 code path AWS-LC lacks: about twice the
/// block throughput on CPUs without AVX-512) are zeroized on drop. ring does
/// not wipe its own keys, so the schedule sits in a heap `MaybeUninit` that
/// `drop` overwrites. Share it with `Arc`, never by copying.
pub struct DataKey {
    bytes: Box<[u8; DEK_LEN]>,
    // Always initialized until `drop` zeroizes it.
    aead: Box<MaybeUninit<LessSafeKey>>,
}

impl DataKey {
    /// Takes ownership of raw key bytes, zeroizing the caller's copy.
    pub fn from_bytes(raw: &mut [u8; DEK_LEN]) -> Self {
        let mut bytes = Box::new([0u8; DEK_LEN]);
        bytes.copy_from_slice(raw);
        raw.zeroize();
        // AES-256-GCM accepts every 32-byte key, so this cannot fail.
        let aead = match UnboundKey::new(&AES_256_GCM, &bytes[..]) {
            Ok(k) => Box::new(MaybeUninit::new(LessSafeKey::new(k))),
            Err(_) => unreachable!("AES-256 accepts any 32-byte key"),
        };
        Self { bytes, aead }
    }

    /// Copies key bytes from a slice of exactly 32 bytes.
    pub fn from_slice(raw: &[u8]) -> Option<Self> {
        let mut arr: [u8; DEK_LEN] = raw.try_into().ok()?;
        Some(Self::from_bytes(&mut arr))
    }

    /// A fresh random key from the system CSPRNG.
    pub fn generate() -> Result<Self, super::RandomError> {
        let mut raw = [0u8; DEK_LEN];
        super::random_fill(&mut raw)?;
        Ok(Self::from_bytes(&mut raw))
    }

    /// The raw bytes, for wrapping by a provider. Never log or store them.
    pub fn expose_secret(&self) -> &[u8; DEK_LEN] {
        &self.bytes
    }

    /// The prepared AEAD key.
    pub(crate) fn aead(&self) -> &LessSafeKey {
        // SAFETY: `from_bytes`, the only constructor, writes a valid key into
        // the slot, and only `wipe` overwrites it, which runs in `drop` (and in
        // a test, on a `ManuallyDrop` key never used again): while `&self` is
        // alive the slot holds an initialized `LessSafeKey`.
        unsafe { self.aead.assume_init_ref() }
    }

    /// Overwrites the raw bytes and the expanded key; the key is unusable after.
    fn wipe(&mut self) {
        self.bytes.zeroize();
        // ring's key types are plain data without `Drop`, so overwriting the
        // bytes in place is all their destruction needs.
        self.aead.zeroize();
    }
}

impl Drop for DataKey {
    #[inline(never)]
    fn drop(&mut self) {
        self.wipe();
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let mut raw = [0x41u8; 32];
        let k = DataKey::from_bytes(&mut raw);
        assert_eq!(raw, [0u8; 32], "caller copy is zeroized");
        assert_eq!(format!("{k:?}"), "DataKey(..)");
    }

    #[test]
    fn wipe_clears_bytes_and_key_schedule() {
        // ManuallyDrop: the wiped key is leaked, never used or dropped again.
        let mut k = std::mem::ManuallyDrop::new(DataKey::from_bytes(&mut [0x41u8; 32]));
        k.wipe();
        assert_eq!(*k.bytes, [0u8; DEK_LEN]);
        let n = std::mem::size_of::<LessSafeKey>();
        assert!(n >= 15 * 16, "holds the 15 AES-256 round keys inline");
        // SAFETY: `k.aead` is a live heap slot of exactly `n` bytes (the size of
        // a `LessSafeKey`), and `wipe` has just written zeros over all of it, so
        // every byte is initialized and valid as a `u8`; `k` is neither moved
        // nor dropped (ManuallyDrop) while the slice is borrowed.
        let schedule = unsafe { std::slice::from_raw_parts(k.aead.as_ptr().cast::<u8>(), n) };
        assert!(schedule.iter().all(|&b| b == 0));
    }
}
