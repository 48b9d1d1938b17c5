//! The file header: a fixed-size slot at the start of every non-empty file.
//!
//! ```text
//! off  len  field
//!   0    4  magic "KMSF"
//!   4    1  format version (1)
//!   5    1  log2(block size), 12..=20
//!   6    2  header size H (u16 BE), equal to the volume's header slot
//!   8   16  volume ID
//!  24   16  file ID
//!  40   12  header nonce
//!  52   16  header tag: AES-256-GCM under the DEK, empty plaintext,
//!           AAD = "KMSH" || bytes 0..40
//!  68    1  provider name length P (1..=32), then P bytes ASCII
//!   .    2  key ID length K (u16 BE, 1..=2048), then K bytes UTF-8
//!   .    2  wrapped DEK length W (u16 BE, 1..=6144), then W bytes
//!   .       zero padding up to H
//! ```
//! The tag authenticates the fixed fields under the DEK; the key section is
//! authenticated by the provider, whose wrapping binds (volume ID, file ID).
//! Keeping the wrapped key outside the tag lets `rewrap` use KMS ReEncrypt
//! without ever seeing the DEK.

use ring::aead::{Aad, Nonce};

use super::keys::{DataKey, WrappedKey};
use super::reader::Reader;
use super::{FORMAT_VERSION, Id, MAGIC, MAX_BLOCK_LOG2, MIN_BLOCK_LOG2, NONCE_LEN, TAG_LEN, v2};

/// Where a header states its own size: a big-endian u16 at bytes 6..8, so a
/// reader learns how much to read before parsing.
const SIZE_FIELD: std::ops::Range<usize> = 6..8;

/// The header size a file's first bytes declare (`None`: under 8 bytes).
/// Unchecked: `FileHeader::parse` validates it.
pub fn declared_size(prefix: &[u8]) -> Option<usize> {
    let b: [u8; 2] = prefix.get(SIZE_FIELD)?.try_into().ok()?;
    Some(usize::from(u16::from_be_bytes(b)))
}

/// Bytes before the key section.
pub const FIXED_LEN: usize = 68;
/// Offset of the key section (provider, key ID, wrapped DEK).
pub const KEY_SECTION: usize = FIXED_LEN;
/// Bytes covered by the header tag.
pub const AUTH_LEN: usize = 40;
const HEADER_AAD_LABEL: &[u8; 4] = b"KMSH";
/// Longest provider name.
pub const MAX_PROVIDER_LEN: usize = 32;
/// Longest key ID (a KMS ARN is at most 2048 characters).
pub const MAX_KEY_ID_LEN: usize = 2048;
/// Longest wrapped DEK (KMS ciphertext blobs are at most 6144 bytes).
pub const MAX_WRAPPED_LEN: usize = 6144;
/// Smallest header slot a volume may use.
pub const MIN_HEADER_SIZE: usize = 128;

/// Why a header was rejected. Never carries key material.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than its fields say.
    #[error("header truncated")]
    Truncated,
    /// Not a kmsfs file.
    #[error("bad magic (not a kmsfs file)")]
    BadMagic,
    /// Written by a newer (or corrupted) version.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u8),
    /// Block size outside 4 KiB..1 MiB.
    #[error("invalid block size exponent {0}")]
    BadBlockSize(u8),
    /// The header's slot size disagrees with the volume.
    #[error("header size {found} does not match the volume's {expected}")]
    SizeMismatch {
        /// What the volume config says.
        expected: usize,
        /// What the header says.
        found: usize,
    },
    /// A length or text field is out of range.
    #[error("invalid {0} field")]
    BadField(&'static str),
    /// Non-zero bytes in the padding.
    #[error("non-zero padding")]
    BadPadding,
    /// The key section does not fit the header slot.
    #[error("key section of {need} bytes does not fit a {slot}-byte header slot")]
    TooLarge {
        /// Bytes needed.
        need: usize,
        /// Slot size.
        slot: usize,
    },
    /// The header tag did not verify under the DEK.
    #[error("header failed authentication")]
    Auth,
    /// The system random generator failed.
    #[error("random number generator failed")]
    Random,
}

/// A parsed header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHeader {
    /// File format version: 1, or 2 ([`super::v2`]).
    pub version: u8,
    /// log2 of the block size.
    pub block_log2: u8,
    /// Size of the header slot in bytes.
    pub header_size: u16,
    /// The volume this file belongs to.
    pub volume_id: Id,
    /// This file's random ID.
    pub file_id: Id,
    /// v1: nonce of the header tag. v2: the header state ([`v2::State`]).
    pub nonce: [u8; NONCE_LEN],
    /// v1: the header tag (AES-GCM). v2: the state tag (HMAC).
    pub tag: [u8; TAG_LEN],
    /// The wrapped DEK.
    pub wrapped: WrappedKey,
}

impl FileHeader {
    /// A new, not yet sealed header.
    pub fn new(block_log2: u8, header_size: u16, volume_id: Id, file_id: Id, wrapped: WrappedKey) -> Self {
        Self {
            version: FORMAT_VERSION,
            block_log2,
            header_size,
            volume_id,
            file_id,
            nonce: [0; NONCE_LEN],
            tag: [0; TAG_LEN],
            wrapped,
        }
    }

    /// A new v2 header; [`Self::seal_state`] sets its state and tag.
    pub fn new_v2(block_log2: u8, header_size: u16, volume_id: Id, file_id: Id, wrapped: WrappedKey) -> Self {
        Self { version: v2::VERSION, ..Self::new(block_log2, header_size, volume_id, file_id, wrapped) }
    }

    /// Parses exactly one header slot of `expected_size` bytes from `buf`.
    /// Never panics, whatever the bytes.
    pub fn parse(buf: &[u8], expected_size: usize) -> Result<Self, HeaderError> {
        let t = HeaderError::Truncated;
        let mut r = Reader::new(buf);
        if r.array::<4>().ok_or(t.clone())? != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = match r.u8().ok_or(t.clone())? {
            v @ (FORMAT_VERSION | v2::VERSION) => v,
            v => return Err(HeaderError::UnsupportedVersion(v)),
        };
        let block_log2 = r.u8().ok_or(t.clone())?;
        if !(MIN_BLOCK_LOG2..=MAX_BLOCK_LOG2).contains(&block_log2) {
            return Err(HeaderError::BadBlockSize(block_log2));
        }
        let header_size = r.u16().ok_or(t.clone())?;
        if usize::from(header_size) != expected_size {
            return Err(HeaderError::SizeMismatch { expected: expected_size, found: header_size.into() });
        }
        if buf.len() < expected_size {
            return Err(t);
        }
        let mut r = Reader::new(&buf[..expected_size]);
        r.take(8).ok_or(t.clone())?;
        let volume_id = r.array::<16>().ok_or(t.clone())?;
        let file_id = r.array::<16>().ok_or(t.clone())?;
        let nonce = r.array::<NONCE_LEN>().ok_or(t.clone())?;
        let tag = r.array::<TAG_LEN>().ok_or(t.clone())?;
        if version == v2::VERSION && v2::State::decode(&nonce).is_none() {
            return Err(HeaderError::BadField("state flags"));
        }
        let plen = usize::from(r.u8().ok_or(t.clone())?);
        if plen == 0 || plen > MAX_PROVIDER_LEN {
            return Err(HeaderError::BadField("provider"));
        }
        let provider = r.take(plen).ok_or(t.clone())?;
        if !provider.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_') {
            return Err(HeaderError::BadField("provider"));
        }
        let klen = usize::from(r.u16().ok_or(t.clone())?);
        if klen == 0 || klen > MAX_KEY_ID_LEN {
            return Err(HeaderError::BadField("key id"));
        }
        let key_id =
            std::str::from_utf8(r.take(klen).ok_or(t.clone())?).map_err(|_| HeaderError::BadField("key id"))?;
        let wlen = usize::from(r.u16().ok_or(t.clone())?);
        if wlen == 0 || wlen > MAX_WRAPPED_LEN {
            return Err(HeaderError::BadField("wrapped key"));
        }
        let blob = r.take(wlen).ok_or(t)?.to_vec();
        if r.rest().iter().any(|&b| b != 0) {
            return Err(HeaderError::BadPadding);
        }
        Ok(Self {
            version,
            block_log2,
            header_size,
            volume_id,
            file_id,
            nonce,
            tag,
            wrapped: WrappedKey {
                provider: String::from_utf8_lossy(provider).into_owned(),
                key_id: key_id.to_owned(),
                blob,
            },
        })
    }

    /// Bytes the key section needs.
    pub fn key_section_len(w: &WrappedKey) -> usize {
        1 + w.provider.len() + 2 + w.key_id.len() + 2 + w.blob.len()
    }

    /// Serializes into exactly `header_size` bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        let slot = usize::from(self.header_size);
        let need = FIXED_LEN + Self::key_section_len(&self.wrapped);
        if need > slot {
            return Err(HeaderError::TooLarge { need, slot });
        }
        let w = &self.wrapped;
        if w.provider.is_empty() || w.provider.len() > MAX_PROVIDER_LEN {
            return Err(HeaderError::BadField("provider"));
        }
        if w.key_id.is_empty() || w.key_id.len() > MAX_KEY_ID_LEN {
            return Err(HeaderError::BadField("key id"));
        }
        if w.blob.is_empty() || w.blob.len() > MAX_WRAPPED_LEN {
            return Err(HeaderError::BadField("wrapped key"));
        }
        let mut out = Vec::with_capacity(slot);
        out.extend_from_slice(&self.auth_bytes());
        out.extend_from_slice(&self.nonce);
        out.extend_from_slice(&self.tag);
        out.push(w.provider.len() as u8);
        out.extend_from_slice(w.provider.as_bytes());
        out.extend_from_slice(&(w.key_id.len() as u16).to_be_bytes());
        out.extend_from_slice(w.key_id.as_bytes());
        out.extend_from_slice(&(w.blob.len() as u16).to_be_bytes());
        out.extend_from_slice(&w.blob);
        out.resize(slot, 0);
        Ok(out)
    }

    /// The key section alone (bytes KEY_SECTION..H), for in-place rewrap.
    pub fn key_section_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        Ok(self.to_bytes()?.split_off(KEY_SECTION))
    }

    /// Bytes 0..40, covered by the tag.
    pub fn auth_bytes(&self) -> [u8; AUTH_LEN] {
        let mut a = [0u8; AUTH_LEN];
        a[0..4].copy_from_slice(&MAGIC);
        a[4] = self.version;
        a[5] = self.block_log2;
        a[SIZE_FIELD].copy_from_slice(&self.header_size.to_be_bytes());
        a[8..24].copy_from_slice(&self.volume_id);
        a[24..40].copy_from_slice(&self.file_id);
        a
    }

    fn aad(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(4 + AUTH_LEN);
        v.extend_from_slice(HEADER_AAD_LABEL);
        v.extend_from_slice(&self.auth_bytes());
        v
    }

    /// Computes the tag under `key` with a fresh random nonce.
    pub fn seal(&mut self, key: &DataKey) -> Result<(), HeaderError> {
        let mut nonce = [0u8; NONCE_LEN];
        super::random_fill(&mut nonce).map_err(|_| HeaderError::Random)?;
        self.seal_with_nonce(key, nonce)
    }

    /// Computes the tag with a caller-chosen nonce (tests, vectors).
    pub fn seal_with_nonce(&mut self, key: &DataKey, nonce: [u8; NONCE_LEN]) -> Result<(), HeaderError> {
        let mut empty: [u8; 0] = [];
        let tag = key
            .aead()
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(self.aad()), &mut empty)
            .map_err(|_| HeaderError::Auth)?;
        self.nonce = nonce;
        self.tag.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Checks the tag under the file's DEK (v2: through its subkeys).
    pub fn verify(&self, key: &DataKey) -> Result<(), HeaderError> {
        if self.version == v2::VERSION {
            return self.verify_state(&v2::FileKeys::derive(key, &self.file_id, 0));
        }
        let mut buf = self.tag;
        key.aead()
            .open_in_place(Nonce::assume_unique_for_key(self.nonce), Aad::from(self.aad()), &mut buf)
            .map(|_| ())
            .map_err(|_| HeaderError::Auth)
    }
}

impl FileHeader {
    /// The v2 header state (`None` for a v1 header).
    pub fn state(&self) -> Option<v2::State> {
        if self.version != v2::VERSION {
            return None;
        }
        v2::State::decode(&self.nonce)
    }

    /// Sets a v2 header's state and its tag.
    pub fn seal_state(&mut self, keys: &v2::FileKeys, state: v2::State) {
        self.nonce = state.encode();
        self.tag = keys.state_tag(&self.auth_bytes(), &self.nonce);
    }

    /// Checks a v2 header's state tag (constant time).
    pub fn verify_state(&self, keys: &v2::FileKeys) -> Result<(), HeaderError> {
        if self.version != v2::VERSION {
            return Err(HeaderError::Auth);
        }
        let want = keys.state_tag(&self.auth_bytes(), &self.nonce);
        aws_lc_rs::constant_time::verify_slices_are_equal(&want, &self.tag).map_err(|_| HeaderError::Auth)
    }
}

/// Where the 28 bytes of a v2 header's state and tag lie.
pub const STATE_RANGE: std::ops::Range<usize> = AUTH_LEN..FIXED_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> FileHeader {
        FileHeader::new(
            12,
            256,
            [1; 16],
            [2; 16],
            WrappedKey { provider: "local".into(), key_id: "local:0011".into(), blob: vec![9; 60] },
        )
    }

    #[test]
    fn round_trip_and_verify() {
        let key = DataKey::from_bytes(&mut [3; 32]);
        let mut h = sample();
        h.seal(&key).unwrap();
        let bytes = h.to_bytes().unwrap();
        assert_eq!(bytes.len(), 256);
        let p = FileHeader::parse(&bytes, 256).unwrap();
        assert_eq!(p, h);
        p.verify(&key).unwrap();
        let other = DataKey::from_bytes(&mut [4; 32]);
        assert_eq!(p.verify(&other), Err(HeaderError::Auth));
    }

    #[test]
    fn every_authenticated_byte_is_bound() {
        let key = DataKey::from_bytes(&mut [3; 32]);
        let mut h = sample();
        h.seal(&key).unwrap();
        let bytes = h.to_bytes().unwrap();
        for i in 0..KEY_SECTION {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                match FileHeader::parse(&b, 256) {
                    Err(_) => {}
                    Ok(p) => assert_eq!(p.verify(&key), Err(HeaderError::Auth), "byte {i} bit {bit}"),
                }
            }
        }
    }

    #[test]
    fn too_large_is_an_error() {
        let mut h = sample();
        h.wrapped.blob = vec![1; 300];
        assert!(matches!(h.to_bytes(), Err(HeaderError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), size in 0usize..600) {
            let _ = FileHeader::parse(&bytes, size);
        }

        #[test]
        fn parse_never_panics_near_valid(flips in proptest::collection::vec((0usize..256, any::<u8>()), 1..8)) {
            let mut b = sample().to_bytes().unwrap();
            for (i, v) in flips { b[i] = v; }
            let _ = FileHeader::parse(&b, 256);
        }
    }
}
