//! Format v2: what a v2 file adds to v1's header and blocks.
//!
//! - **Per-file subkeys.** Blocks are sealed under `K_block` and the header
//!   state and hole markers are authenticated under `K_state`, both derived
//!   from the DEK and the file ID with HKDF-SHA256. The DEK itself seals
//!   nothing, so no key ever sees random nonces.
//! - **Counter nonces.** A block's 12-byte nonce is `lgen (u48) || ctr
//!   (u48)`: the file's length generation when it was sealed and a counter
//!   that never repeats under the file's key (the header reserves counters
//!   before they are used). Unique by construction, not by chance.
//! - **Header state** (bytes 40..68): flags, the length generation and the
//!   counter reservation, under an HMAC. Every change of the file's length
//!   bumps the generation and the last block is sealed with it, so an
//!   earlier last block never authenticates as the current one.
//! - **Hole markers.** A hole is a run of all-zero stored blocks closed by a
//!   marker: a stored block whose nonce slot names where the run starts and
//!   whose tag is an HMAC. A zero block that no marker covers is an attack.
//!
//! docs/FORMAT.md describes every byte; `tests/vectors.rs` rebuilds them
//! from the raw primitives.

use aws_lc_rs::{hkdf, hmac};

use super::block::BlockAad;
use super::keys::DataKey;
use super::{DEK_LEN, Id, NONCE_LEN, TAG_LEN};

/// The file format version this module describes.
pub const VERSION: u8 = 2;
/// HKDF salt of the per-file subkeys.
pub const KDF_SALT: &[u8] = b"kmsfs-v2-file-keys";
/// Largest length generation and counter: 48 bits each (in the nonce).
pub const MAX_LGEN: u64 = (1 << 48) - 1;
/// Largest counter reservation: the header holds it in 40 bits.
pub const MAX_CTR: u64 = (1 << 40) - 1;
/// Header state flag: an update that changes the length is in flight, so
/// the state before it (generation `lgen - 1`) still reads.
pub const FLAG_PENDING: u8 = 1;
/// Header state flag: the file has (or had) holes, so zero blocks may be
/// covered by markers. Without it every zero block is an error.
pub const FLAG_HOLES: u8 = 2;
/// Header state flag: a v1 file is being rewritten as v2 in place; blocks
/// not rewritten yet are v1 blocks under the DEK, and zero slots are v1
/// holes. Cleared when every block is v2.
pub const FLAG_CONVERTING: u8 = 4;
const KNOWN_FLAGS: u8 = FLAG_PENDING | FLAG_HOLES | FLAG_CONVERTING;
const STATE_LABEL: &[u8; 4] = b"KMSH";
const MARKER_LABEL: &[u8; 4] = b"KMSM";

/// The mutable part of a v2 header, stored in the 12 bytes v1 used for the
/// header nonce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// [`FLAG_PENDING`], [`FLAG_HOLES`].
    pub flags: u8,
    /// Length generation: bumped by every change of the file's length.
    pub lgen: u64,
    /// Counters below this are reserved (used or skipped); the next
    /// reservation starts here.
    pub ctr_top: u64,
}

impl State {
    /// `flags (1) || lgen (u48 BE) || ctr_top (u40 BE)`.
    pub fn encode(&self) -> [u8; NONCE_LEN] {
        let mut b = [0u8; NONCE_LEN];
        b[0] = self.flags;
        b[1..7].copy_from_slice(&self.lgen.to_be_bytes()[2..]);
        b[7..12].copy_from_slice(&self.ctr_top.to_be_bytes()[3..]);
        b
    }

    /// Parses the 12 state bytes; unknown flags are refused.
    pub fn decode(b: &[u8; NONCE_LEN]) -> Option<Self> {
        if b[0] & !KNOWN_FLAGS != 0 {
            return None;
        }
        let mut l = [0u8; 8];
        l[2..].copy_from_slice(&b[1..7]);
        let mut c = [0u8; 8];
        c[3..].copy_from_slice(&b[7..12]);
        Some(Self { flags: b[0], lgen: u64::from_be_bytes(l), ctr_top: u64::from_be_bytes(c) })
    }

    /// Whether the state before the in-flight length change still reads.
    pub fn pending(&self) -> bool {
        self.flags & FLAG_PENDING != 0
    }

    /// Whether zero blocks may be holes.
    pub fn holes(&self) -> bool {
        self.flags & FLAG_HOLES != 0
    }

    /// Whether v1 blocks (and v1 holes) may remain: a conversion in place
    /// was interrupted.
    pub fn converting(&self) -> bool {
        self.flags & FLAG_CONVERTING != 0
    }

    /// Whether a block sealed at generation `g` may stand at its place:
    /// the last block must carry the current generation (or, while an
    /// update is pending, the one before); no block may come from a later
    /// generation than the header's.
    pub fn accepts(&self, g: u64, last: bool) -> bool {
        if last { g == self.lgen || (self.pending() && g + 1 == self.lgen) } else { g <= self.lgen }
    }
}

/// A block nonce: `lgen (u48 BE) || ctr (u48 BE)`.
pub fn nonce(lgen: u64, ctr: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..6].copy_from_slice(&lgen.to_be_bytes()[2..]);
    n[6..].copy_from_slice(&ctr.to_be_bytes()[2..]);
    n
}

/// The (generation, counter) a nonce carries.
pub fn nonce_parts(n: &[u8]) -> (u64, u64) {
    let mut l = [0u8; 8];
    let mut c = [0u8; 8];
    if n.len() >= NONCE_LEN {
        l[2..].copy_from_slice(&n[..6]);
        c[2..].copy_from_slice(&n[6..12]);
    }
    (u64::from_be_bytes(l), u64::from_be_bytes(c))
}

struct Len32;
impl hkdf::KeyType for Len32 {
    fn len(&self) -> usize {
        DEK_LEN
    }
}

/// The subkeys of one v2 file. No `Clone`, redacted `Debug`; the block key
/// is a [`DataKey`] (zeroized on drop) and the HMAC key is AWS-LC's, which
/// cleanses its context when freed.
pub struct FileKeys {
    block: DataKey,
    state: hmac::Key,
}

impl std::fmt::Debug for FileKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileKeys(..)")
    }
}

impl FileKeys {
    /// `K_x = HKDF-SHA256(salt = "kmsfs-v2-file-keys", IKM = DEK,
    /// info = x || file ID)` for x in `"block"`, `"state"`.
    pub fn derive(dek: &DataKey, file_id: &Id) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(dek.expose_secret());
        let mut out = zeroize::Zeroizing::new([0u8; DEK_LEN]);
        let expand = |label: &[u8], out: &mut [u8; DEK_LEN]| {
            let info = [label, &file_id[..]];
            // A 32-byte output is far below HKDF's limit, so neither call fails.
            if let Ok(okm) = prk.expand(&info, Len32) {
                let _ = okm.fill(out);
            }
        };
        expand(b"block", &mut out);
        let block = DataKey::from_bytes(&mut out);
        expand(b"state", &mut out);
        let state = hmac::Key::new(hmac::HMAC_SHA256, &out[..]);
        Self { block, state }
    }

    /// The key blocks are sealed under.
    pub fn block(&self) -> &DataKey {
        &self.block
    }

    /// The header-state tag: HMAC-SHA256(K_state, "KMSH" || header bytes
    /// 0..40 || state bytes), first 16 bytes.
    pub fn state_tag(&self, fixed: &[u8; 40], state: &[u8; NONCE_LEN]) -> [u8; TAG_LEN] {
        let mut c = hmac::Context::with_key(&self.state);
        c.update(STATE_LABEL);
        c.update(fixed);
        c.update(state);
        truncate(c.sign())
    }

    /// The tag of a hole marker at `index` whose slot holds `plen` zero
    /// plaintext bytes and whose prefix is `prefix` (see [`marker_prefix`]).
    pub fn marker_tag(&self, at: &BlockAad<'_>, plen: u32, prefix: &[u8; NONCE_LEN]) -> [u8; TAG_LEN] {
        let mut c = hmac::Context::with_key(&self.state);
        c.update(MARKER_LABEL);
        c.update(&[VERSION, at.block_log2]);
        c.update(at.file_id);
        c.update(&at.index.to_be_bytes());
        c.update(&[u8::from(at.last)]);
        c.update(&plen.to_be_bytes());
        c.update(prefix);
        truncate(c.sign())
    }
}

fn truncate(t: hmac::Tag) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&t.as_ref()[..TAG_LEN]);
    out
}

/// A marker's 12-byte prefix: `run_start (u48 BE) || lgen (u48 BE)`, the
/// same shape as a block nonce, so the generation checks apply alike.
pub fn marker_prefix(run_start: u64, lgen: u64) -> [u8; NONCE_LEN] {
    nonce(run_start, lgen)
}

/// Checks that `stored` (one slot as read: prefix, `plen` bytes, tag) is a
/// marker at `index`; returns (run start, generation). Constant-time tag
/// comparison.
pub fn open_marker(keys: &FileKeys, at: &BlockAad<'_>, stored: &[u8]) -> Option<(u64, u64)> {
    let n = stored.len();
    if n <= NONCE_LEN + TAG_LEN {
        return None;
    }
    let (prefix, rest) = stored.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(n - NONCE_LEN - TAG_LEN);
    if body.iter().fold(0u8, |a, &b| a | b) != 0 {
        return None;
    }
    let prefix: [u8; NONCE_LEN] = prefix.try_into().ok()?;
    let (run_start, lgen) = nonce_parts(&prefix);
    if run_start > at.index {
        return None;
    }
    let want = keys.marker_tag(at, u32::try_from(body.len()).ok()?, &prefix);
    aws_lc_rs::constant_time::verify_slices_are_equal(&want, tag).ok()?;
    Some((run_start, lgen))
}

/// Writes a marker into `out` (exactly `plen + 28` bytes).
pub fn seal_marker(keys: &FileKeys, at: &BlockAad<'_>, run_start: u64, lgen: u64, out: &mut [u8]) {
    let n = out.len();
    if n <= NONCE_LEN + TAG_LEN {
        return;
    }
    let prefix = marker_prefix(run_start, lgen);
    let plen = (n - NONCE_LEN - TAG_LEN) as u32;
    out[..NONCE_LEN].copy_from_slice(&prefix);
    out[NONCE_LEN..n - TAG_LEN].fill(0);
    let tag = keys.marker_tag(at, plen, &prefix);
    out[n - TAG_LEN..].copy_from_slice(&tag);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_refuses_unknown_flags() {
        let s = State { flags: FLAG_PENDING | FLAG_HOLES, lgen: MAX_LGEN, ctr_top: MAX_CTR };
        assert_eq!(State::decode(&s.encode()), Some(s));
        let mut b = s.encode();
        b[0] |= 8;
        assert_eq!(State::decode(&b), None);
    }

    #[test]
    fn generation_rules() {
        let s = State { flags: 0, lgen: 5, ctr_top: 10 };
        assert!(s.accepts(5, true) && !s.accepts(4, true) && !s.accepts(6, true));
        assert!(s.accepts(0, false) && s.accepts(5, false) && !s.accepts(6, false));
        let p = State { flags: FLAG_PENDING, ..s };
        assert!(p.accepts(4, true) && p.accepts(5, true) && !p.accepts(3, true));
    }

    #[test]
    fn markers_bind_index_flag_length_and_start() {
        let k = FileKeys::derive(&DataKey::from_bytes(&mut [7; 32]), &[1; 16]);
        let at = BlockAad { file_id: &[1; 16], block_log2: 12, index: 9, last: false };
        let mut m = vec![0u8; 100 + 28];
        seal_marker(&k, &at, 3, 2, &mut m);
        assert_eq!(open_marker(&k, &at, &m), Some((3, 2)));
        assert_eq!(open_marker(&k, &BlockAad { index: 8, ..at }, &m), None);
        assert_eq!(open_marker(&k, &BlockAad { last: true, ..at }, &m), None);
        assert_eq!(open_marker(&k, &BlockAad { file_id: &[2; 16], ..at }, &m), None);
        assert_eq!(open_marker(&k, &BlockAad { block_log2: 13, ..at }, &m), None);
        assert_eq!(open_marker(&k, &at, &m[..m.len() - 1]), None);
        let mut bad = m.clone();
        bad[20] = 1;
        assert_eq!(open_marker(&k, &at, &bad), None);
        let mut bad = m.clone();
        bad[5] ^= 1;
        assert_eq!(open_marker(&k, &at, &bad), None);
    }
}
