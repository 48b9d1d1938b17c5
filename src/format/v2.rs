//! Format v2: what a v2 file adds to v1's header and blocks.
//!
//! - **Per-file subkeys.** Blocks are sealed under `K_block(epoch)`; the
//!   header state and hole markers are authenticated under `K_state`; both
//!   are derived from the DEK and the file ID with HKDF-SHA256.
//! - **A seal budget.** Block nonces are random (96 bits). The header counts
//!   the seals made under the current epoch's key, and before the count
//!   would pass [`SEAL_BUDGET`] (2^31, under NIST's 2^32 for random nonces)
//!   the file is re-keyed: every block re-sealed under the next epoch. An
//!   attacker who rolls the count back can make a key seal more than
//!   counted, but nonces stay random, so nothing ever repeats by design.
//! - **Header state** (bytes 40..68): flags, the length generation, the
//!   epoch and the seal count, under an HMAC. Every change of the file's
//!   length bumps the generation, and the last block's AAD carries it, so
//!   an earlier last block never authenticates as the current one.
//! - **Hole markers.** A hole is a run of all-zero stored blocks closed by a
//!   marker: a stored block whose first bytes name where the run starts and
//!   whose tag is an HMAC. A zero block that no marker covers is an attack.
//!
//! docs/FORMAT.md describes every byte; `tests/vectors_v2.rs` rebuilds them
//! from the raw primitives.

use aws_lc_rs::{hkdf, hmac};

use super::block::BlockAad;
use super::keys::DataKey;
use super::{DEK_LEN, Id, NONCE_LEN, TAG_LEN};

/// The file format version this module describes.
pub const VERSION: u8 = 2;
/// HKDF salt of the per-file subkeys.
pub const KDF_SALT: &[u8] = b"kmsfs-v2-file-keys";
/// Largest length generation: 40 bits in the header.
pub const MAX_LGEN: u64 = (1 << 40) - 1;
/// Largest epoch: 16 bits in the header.
pub const MAX_EPOCH: u64 = u16::MAX as u64;
/// Seals one epoch's key may make before the file is re-keyed: 2^31, half
/// of NIST SP 800-38D's 2^32 for random 96-bit nonces, leaving room for
/// counts a crash or an attacker rolled back.
pub const SEAL_BUDGET: u64 = 1 << 31;
/// Header state flag: an update that changes the length is in flight, so
/// the state before it (generation `lgen - 1`) still reads.
pub const FLAG_PENDING: u8 = 1;
/// Header state flag: the file has (or had) holes, so zero blocks may be
/// covered by markers. Without it every zero block is an error.
pub const FLAG_HOLES: u8 = 2;
/// Header state flag: the blocks are being re-sealed under this epoch's
/// key (a re-key, or a v1 file converted in place); blocks not rewritten
/// yet are under the previous key (the previous epoch's, or for epoch 0
/// the v1 DEK, where zero slots are v1 holes). Cleared when all are done.
pub const FLAG_CONVERTING: u8 = 4;
const KNOWN_FLAGS: u8 = FLAG_PENDING | FLAG_HOLES | FLAG_CONVERTING;
const STATE_LABEL: &[u8; 4] = b"KMSH";
const MARKER_LABEL: &[u8; 4] = b"KMSM";
/// Length of a v2 block AAD: v1's 31 bytes and the generation (u64).
pub const AAD_LEN: usize = super::block::AAD_LEN + 8;

/// The mutable part of a v2 header, stored in the 12 bytes v1 used for the
/// header nonce.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// [`FLAG_PENDING`], [`FLAG_HOLES`], [`FLAG_CONVERTING`].
    pub flags: u8,
    /// Length generation: bumped by every change of the file's length.
    pub lgen: u64,
    /// Which `K_block` seals the blocks.
    pub epoch: u64,
    /// Seals counted (reserved) under this epoch's key.
    pub seals: u64,
}

impl State {
    /// `flags (1) || lgen (u40 BE) || epoch (u16 BE) || seals (u32 BE)`.
    pub fn encode(&self) -> [u8; NONCE_LEN] {
        let mut b = [0u8; NONCE_LEN];
        b[0] = self.flags;
        b[1..6].copy_from_slice(&self.lgen.to_be_bytes()[3..]);
        b[6..8].copy_from_slice(&self.epoch.to_be_bytes()[6..]);
        b[8..12].copy_from_slice(&self.seals.to_be_bytes()[4..]);
        b
    }

    /// Parses the 12 state bytes; unknown flags are refused.
    pub fn decode(b: &[u8; NONCE_LEN]) -> Option<Self> {
        if b[0] & !KNOWN_FLAGS != 0 {
            return None;
        }
        let be = |s: &[u8]| s.iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
        Some(Self { flags: b[0], lgen: be(&b[1..6]), epoch: be(&b[6..8]), seals: be(&b[8..12]) })
    }

    /// Whether the state before the in-flight length change still reads.
    pub fn pending(&self) -> bool {
        self.flags & FLAG_PENDING != 0
    }

    /// Whether zero blocks may be holes.
    pub fn holes(&self) -> bool {
        self.flags & FLAG_HOLES != 0
    }

    /// Whether blocks under the previous key may remain.
    pub fn converting(&self) -> bool {
        self.flags & FLAG_CONVERTING != 0
    }

    /// The generations a last block may carry: the current one, and while
    /// a length change is pending the one before.
    pub fn last_gens(&self) -> impl Iterator<Item = u64> {
        let prev = (self.pending() && self.lgen > 0).then(|| self.lgen - 1);
        std::iter::once(self.lgen).chain(prev)
    }

    /// Whether a marker of generation `g` may stand at its place: the last
    /// slot must carry a generation [`Self::last_gens`] allows; no slot may
    /// come from a later generation than the header's.
    pub fn accepts(&self, g: u64, last: bool) -> bool {
        if last { g == self.lgen || (self.pending() && g + 1 == self.lgen) } else { g <= self.lgen }
    }
}

/// A v2 block's AAD: v1's fields with version 2, then the generation:
/// `generation` (the file's `lgen`) for the last block, 0 for every other.
pub fn aad(at: &BlockAad<'_>, generation: u64) -> [u8; AAD_LEN] {
    let mut a = [0u8; AAD_LEN];
    a[..super::block::AAD_LEN].copy_from_slice(&at.bytes_v(VERSION));
    let g = if at.last { generation } else { 0 };
    a[super::block::AAD_LEN..].copy_from_slice(&g.to_be_bytes());
    a
}

/// A 12-byte marker prefix: `run_start (u48 BE) || lgen (u48 BE)`.
pub fn marker_prefix(run_start: u64, lgen: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..6].copy_from_slice(&run_start.to_be_bytes()[2..]);
    n[6..].copy_from_slice(&lgen.to_be_bytes()[2..]);
    n
}

/// The (run start, generation) a marker prefix carries.
pub fn prefix_parts(n: &[u8]) -> (u64, u64) {
    let be = |s: &[u8]| s.iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
    if n.len() < NONCE_LEN {
        return (u64::MAX, u64::MAX);
    }
    (be(&n[..6]), be(&n[6..12]))
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
    /// `K_block = HKDF-SHA256(salt = "kmsfs-v2-file-keys", IKM = DEK,
    /// info = "block" || file ID || epoch (u16 BE))` and `K_state` the same
    /// with info = "state" || file ID.
    pub fn derive(dek: &DataKey, file_id: &Id, epoch: u64) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(dek.expose_secret());
        let mut out = zeroize::Zeroizing::new([0u8; DEK_LEN]);
        let expand = |info: &[&[u8]], out: &mut [u8; DEK_LEN]| {
            // A 32-byte output is far below HKDF's limit, so neither call fails.
            if let Ok(okm) = prk.expand(info, Len32) {
                let _ = okm.fill(out);
            }
        };
        let e = (epoch as u16).to_be_bytes();
        expand(&[b"block", &file_id[..], &e], &mut out);
        let block = DataKey::from_bytes(&mut out);
        expand(&[b"state", &file_id[..]], &mut out);
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
    let (run_start, lgen) = prefix_parts(&prefix);
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
        let s = State {
            flags: FLAG_PENDING | FLAG_HOLES | FLAG_CONVERTING,
            lgen: MAX_LGEN,
            epoch: MAX_EPOCH,
            seals: u32::MAX as u64,
        };
        assert_eq!(State::decode(&s.encode()), Some(s));
        let mut b = s.encode();
        b[0] |= 8;
        assert_eq!(State::decode(&b), None);
    }

    #[test]
    fn generation_rules() {
        let s = State { flags: 0, lgen: 5, ..State::default() };
        assert!(s.accepts(5, true) && !s.accepts(4, true) && !s.accepts(6, true));
        assert!(s.accepts(0, false) && s.accepts(5, false) && !s.accepts(6, false));
        assert_eq!(s.last_gens().collect::<Vec<_>>(), [5]);
        let p = State { flags: FLAG_PENDING, ..s };
        assert!(p.accepts(4, true) && p.accepts(5, true) && !p.accepts(3, true));
        assert_eq!(p.last_gens().collect::<Vec<_>>(), [5, 4]);
    }

    #[test]
    fn markers_bind_index_flag_length_and_start() {
        let k = FileKeys::derive(&DataKey::from_bytes(&mut [7; 32]), &[1; 16], 0);
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
