//! The block codec: AES-256-GCM over one block, as pure functions.
//!
//! On disk a block is `nonce (12) || ciphertext (len) || tag (16)`. The AAD
//! binds the format version, the block size, the file ID, the block index and
//! whether the block is the file's last, so blocks cannot be moved within or
//! across files, and truncation at a block boundary is detected.

use ring::aead::{Aad, Nonce, Tag};

use super::keys::DataKey;
use super::{BLOCK_OVERHEAD, FORMAT_VERSION, Id, NONCE_LEN, TAG_LEN};

/// Length of the serialized AAD.
pub const AAD_LEN: usize = 4 + 1 + 1 + 16 + 8 + 1;
const AAD_LABEL: [u8; 4] = *b"KMSB";

/// Errors of the block codec. Carry no plaintext and no key material.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum CodecError {
    /// The tag did not verify: tampered, moved, truncated or wrong key.
    #[error("block failed authentication")]
    Auth,
    /// A sealed block shorter than nonce + tag, or longer than a block.
    #[error("sealed block has invalid length {0}")]
    Length(usize),
    /// The system random generator failed.
    #[error("random number generator failed")]
    Random,
}

impl From<super::RandomError> for CodecError {
    fn from(_: super::RandomError) -> Self {
        Self::Random
    }
}

/// What a block's AAD binds.
#[derive(Clone, Copy, Debug)]
pub struct BlockAad<'a> {
    /// The file's ID from its header.
    pub file_id: &'a Id,
    /// log2 of the block size.
    pub block_log2: u8,
    /// Zero-based block index.
    pub index: u64,
    /// Whether this is the file's last block.
    pub last: bool,
}

impl BlockAad<'_> {
    /// The serialized AAD (see docs/FORMAT.md).
    pub fn bytes(&self) -> [u8; AAD_LEN] {
        self.bytes_v(FORMAT_VERSION)
    }

    /// The serialized AAD of a block of file format `version` (1 or 2: the
    /// same fields, the version byte differs).
    pub fn bytes_v(&self, version: u8) -> [u8; AAD_LEN] {
        let mut a = [0u8; AAD_LEN];
        a[0..4].copy_from_slice(&AAD_LABEL);
        a[4] = version;
        a[5] = self.block_log2;
        a[6..22].copy_from_slice(self.file_id);
        a[22..30].copy_from_slice(&self.index.to_be_bytes());
        a[30] = u8::from(self.last);
        a
    }
}

/// Seals `out[NONCE_LEN..len-TAG_LEN]` in place. `out` must be exactly
/// `plain_len + BLOCK_OVERHEAD` long with the plaintext already at offset
/// `NONCE_LEN`; the nonce and tag are written around it. The caller supplies
/// the nonce so tests are deterministic; production passes a random one.
pub fn seal_in_place(
    key: &DataKey,
    aad: &BlockAad<'_>,
    nonce: [u8; NONCE_LEN],
    out: &mut [u8],
) -> Result<(), CodecError> {
    seal_in_place_v(key, &aad.bytes(), nonce, out)
}

/// [`seal_in_place`] with the AAD as bytes (v2's is longer: `format::v2::aad`).
pub fn seal_in_place_v(key: &DataKey, aad: &[u8], nonce: [u8; NONCE_LEN], out: &mut [u8]) -> Result<(), CodecError> {
    let n = out.len();
    if n < BLOCK_OVERHEAD {
        return Err(CodecError::Length(n));
    }
    out[..NONCE_LEN].copy_from_slice(&nonce);
    let tag: Tag = key
        .aead()
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..n - TAG_LEN],
        )
        .map_err(|_| CodecError::Auth)?;
    out[n - TAG_LEN..].copy_from_slice(tag.as_ref());
    Ok(())
}

/// Opens a sealed block in place and returns the plaintext slice within it.
pub fn open_in_place<'b>(key: &DataKey, aad: &BlockAad<'_>, sealed: &'b mut [u8]) -> Result<&'b mut [u8], CodecError> {
    open_in_place_v(key, &aad.bytes(), sealed)
}

/// [`open_in_place`] with the AAD as bytes.
pub fn open_in_place_v<'b>(key: &DataKey, aad: &[u8], sealed: &'b mut [u8]) -> Result<&'b mut [u8], CodecError> {
    let n = sealed.len();
    if n < BLOCK_OVERHEAD {
        return Err(CodecError::Length(n));
    }
    let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
    let (ct, tag) = rest.split_at_mut(n - BLOCK_OVERHEAD);
    open_detached_v(key, aad, nonce, tag, ct)?;
    Ok(ct)
}

/// Seals `plain` into `out`, which must be exactly `plain.len() +
/// BLOCK_OVERHEAD` long, so a whole block of a write is sealed straight from
/// the request buffer. ring seals in place only: the copy stays in L1 and
/// costs 5–10 % of the cipher.
pub fn seal_to(
    key: &DataKey,
    aad: &BlockAad<'_>,
    nonce: [u8; NONCE_LEN],
    plain: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    seal_to_v(key, &aad.bytes(), nonce, plain, out)
}

/// [`seal_to`] with the AAD as bytes.
pub fn seal_to_v(
    key: &DataKey,
    aad: &[u8],
    nonce: [u8; NONCE_LEN],
    plain: &[u8],
    out: &mut [u8],
) -> Result<(), CodecError> {
    if out.len() != plain.len() + BLOCK_OVERHEAD {
        return Err(CodecError::Length(out.len()));
    }
    out[NONCE_LEN..NONCE_LEN + plain.len()].copy_from_slice(plain);
    seal_in_place_v(key, aad, nonce, out)
}

/// Opens a block given as its stored nonce and tag and its ciphertext in
/// `inout`, which becomes the plaintext: the parts may lie apart, as a
/// scattered read leaves them. On failure `inout` holds no plaintext (ring
/// zeroes it).
pub fn open_detached(
    key: &DataKey,
    aad: &BlockAad<'_>,
    nonce: &[u8],
    tag: &[u8],
    inout: &mut [u8],
) -> Result<(), CodecError> {
    open_detached_v(key, &aad.bytes(), nonce, tag, inout)
}

/// [`open_detached`] with the AAD as bytes.
pub fn open_detached_v(
    key: &DataKey,
    aad: &[u8],
    nonce: &[u8],
    tag: &[u8],
    inout: &mut [u8],
) -> Result<(), CodecError> {
    let (Ok(nonce), Ok(tag)) = (<[u8; NONCE_LEN]>::try_from(nonce), Tag::try_from(tag)) else {
        return Err(CodecError::Length(nonce.len() + inout.len() + tag.len()));
    };
    key.aead()
        .open_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), tag, inout, 0..)
        .map(|_| ())
        .map_err(|_| CodecError::Auth)
}

/// Convenience: seals `plain` into a new vector with a random nonce.
pub fn seal_block(key: &DataKey, aad: &BlockAad<'_>, plain: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![0u8; plain.len() + BLOCK_OVERHEAD];
    out[NONCE_LEN..NONCE_LEN + plain.len()].copy_from_slice(plain);
    let mut nonce = [0u8; NONCE_LEN];
    super::random_fill(&mut nonce)?;
    seal_in_place(key, aad, nonce, &mut out)?;
    Ok(out)
}

/// Convenience: opens a sealed block into a new vector.
pub fn open_block(key: &DataKey, aad: &BlockAad<'_>, sealed: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut buf = sealed.to_vec();
    let n = open_in_place(key, aad, &mut buf)?.len();
    buf.copy_within(NONCE_LEN..NONCE_LEN + n, 0);
    buf.truncate(n);
    Ok(buf)
}

/// Whether a stored block is all zero bytes: a hole left by a sparse extend.
/// Only ever honoured for blocks that are not the last one.
pub fn is_hole(stored: &[u8]) -> bool {
    // A fold without early exit lets the compiler vectorize; holes are rare
    // and real blocks almost always differ from zero in the first bytes.
    stored.first().is_some_and(|&b| b == 0) && stored.iter().fold(0u8, |acc, &b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DataKey {
        DataKey::from_bytes(&mut [7u8; 32])
    }

    #[test]
    fn round_trip_and_binding() {
        let k = key();
        let fid = [1u8; 16];
        let aad = BlockAad { file_id: &fid, block_log2: 12, index: 3, last: false };
        let sealed = seal_block(&k, &aad, b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + BLOCK_OVERHEAD);
        assert_eq!(open_block(&k, &aad, &sealed).unwrap(), b"hello");
        for other in [
            BlockAad { index: 4, ..aad },
            BlockAad { last: true, ..aad },
            BlockAad { block_log2: 13, ..aad },
            BlockAad { file_id: &[2u8; 16], ..aad },
        ] {
            assert_eq!(open_block(&k, &other, &sealed), Err(CodecError::Auth));
        }
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(open_block(&k, &aad, &bad), Err(CodecError::Auth), "flip at {i}");
        }
        assert_eq!(open_block(&k, &aad, &sealed[..27]), Err(CodecError::Length(27)));
        let mut sealed2 = vec![0u8; 5 + BLOCK_OVERHEAD];
        seal_to(&k, &aad, [9u8; NONCE_LEN], b"hello", &mut sealed2).unwrap();
        assert_eq!(open_block(&k, &aad, &sealed2).unwrap(), b"hello");
        let mut sealed3 = vec![0u8; 5 + BLOCK_OVERHEAD];
        sealed3[NONCE_LEN..NONCE_LEN + 5].copy_from_slice(b"hello");
        seal_in_place(&k, &aad, [9u8; NONCE_LEN], &mut sealed3).unwrap();
        assert_eq!(sealed2, sealed3, "out-of-place and in-place seal agree");
        assert_eq!(seal_to(&k, &aad, [9u8; NONCE_LEN], b"hell", &mut sealed2), Err(CodecError::Length(33)));
        // The parts of a block read apart open where the ciphertext lies.
        let (nonce, tag) = (&sealed[..NONCE_LEN], &sealed[sealed.len() - TAG_LEN..]);
        let mut out = [0u8; 5];
        out.copy_from_slice(&sealed[NONCE_LEN..NONCE_LEN + 5]);
        open_detached(&k, &aad, nonce, tag, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert_eq!(open_detached(&k, &aad, &nonce[..4], tag, &mut out), Err(CodecError::Length(4 + 5 + TAG_LEN)));
        out.copy_from_slice(&sealed[NONCE_LEN..NONCE_LEN + 5]);
        out[0] ^= 1;
        assert_eq!(open_detached(&k, &aad, nonce, tag, &mut out), Err(CodecError::Auth));
    }

    #[test]
    fn holes() {
        assert!(is_hole(&[0u8; 4124]));
        let mut b = [0u8; 4124];
        b[4123] = 1;
        assert!(!is_hole(&b));
        b[4123] = 0;
        b[9] = 1;
        assert!(!is_hole(&b));
    }
}
