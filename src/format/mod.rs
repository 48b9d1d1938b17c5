//! The on-disk format of one encrypted file: header, block codec and offset math.
//!
//! Nothing here does I/O or talks to a key provider; `docs/FORMAT.md` is the
//! byte-level description and must be kept in step with this module.

pub mod block;
// Wipes ring's key schedule in place (see the module).
#[allow(unsafe_code)]
pub mod data_key;
pub mod header;
pub mod keys;
pub mod layout;
pub mod reader;
pub mod stream;
pub mod v2;

/// First four bytes of every non-empty backing file.
pub const MAGIC: [u8; 4] = *b"KMSF";
/// Version 1 of the file format (and the volume config's format version).
/// New files are written as v2 ([`v2::VERSION`]); v1 files still read.
pub const FORMAT_VERSION: u8 = 1;
/// AES-GCM nonce, stored in front of every block.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag, stored after every block.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed block adds to its plaintext.
pub const BLOCK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Length of volume and file IDs.
pub const ID_LEN: usize = 16;
/// Smallest block size: 4 KiB (log2).
pub const MIN_BLOCK_LOG2: u8 = 12;
/// Largest block size: 1 MiB (log2).
pub const MAX_BLOCK_LOG2: u8 = 20;
/// Default block size: 4 KiB, see docs/FORMAT.md "Choice of block size".
pub const DEFAULT_BLOCK_LOG2: u8 = 12;
/// Length of a DEK in bytes (AES-256).
pub const DEK_LEN: usize = 32;

/// A random 128-bit ID naming a volume or a file.
pub type Id = [u8; ID_LEN];

/// Lower-case hex of an ID, used in encryption contexts and reports.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses lower- or upper-case hex of exactly `N` bytes.
///
/// Kept by hand rather than taken from the `hex` crate: it decodes into a
/// fixed-size array the caller owns (a key file's bytes go straight into a
/// `Zeroizing` buffer, never into a heap copy that outlives it), and it is a
/// dozen lines with no error type to carry.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        let hi = (s[2 * i] as char).to_digit(16)?;
        let lo = (s[2 * i + 1] as char).to_digit(16)?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// The system CSPRNG failed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
#[error("random number generator failed")]
pub struct RandomError;

/// Fills `buf` from the system CSPRNG (AWS-LC's DRBG, seeded by the kernel).
pub fn random_fill(buf: &mut [u8]) -> Result<(), RandomError> {
    aws_lc_rs::rand::fill(buf).map_err(|_| RandomError)
}

/// A fresh random ID.
pub fn random_id() -> Result<Id, RandomError> {
    let mut id = [0u8; ID_LEN];
    random_fill(&mut id)?;
    Ok(id)
}
