#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The encrypted file object without a mount: round trips, a model test
//! against a plain Vec<u8>, and one test per attack on the backing bytes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use kmsfs::file::{EncryptedFile, FileError, KeyArg};
use kmsfs::format::layout::Layout;
use kmsfs::keys::local::LocalProvider;
use kmsfs::keys::{DataKey, FreshKey, KeyContext, KeyProvider};
use proptest::prelude::*;

const VOL: [u8; 16] = [7; 16];

struct Fixture {
    dir: tempfile::TempDir,
    provider: LocalProvider,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let provider = LocalProvider::create_key_file(&dir.path().join("k.key")).unwrap();
        Self { dir, provider }
    }
    fn fresh(&self) -> FreshKey {
        let file_id = kmsfs::format::random_id().unwrap();
        let (key, wrapped) = self.provider.generate(&KeyContext::file(VOL, file_id)).unwrap();
        FreshKey { file_id, key, wrapped }
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    fn key_for(&self, f: &EncryptedFile) -> DataKey {
        let h = f.header().unwrap();
        self.provider.unwrap(&h.wrapped, &f.key_context().unwrap()).unwrap()
    }
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(p).unwrap()
}

fn layout(log2: u8) -> Layout {
    Layout::new(256, log2).unwrap()
}

/// Writes `data` into a new file at `name` in `step`-sized writes.
fn write_file(fx: &Fixture, name: &str, log2: u8, data: &[u8], step: usize) {
    let _ = std::fs::remove_file(fx.path(name));
    let mut f = EncryptedFile::open(open_rw(&fx.path(name)), layout(log2), VOL).unwrap();
    let fresh = fx.fresh();
    let mut off = 0;
    for chunk in data.chunks(step.max(1)) {
        if f.header().is_none() {
            f.write_at(KeyArg::Fresh(&fresh), off as u64, chunk).unwrap();
        } else {
            f.write_at(KeyArg::Existing(&fresh.key), off as u64, chunk).unwrap();
        }
        off += chunk.len();
    }
}

fn read_file(fx: &Fixture, name: &str, log2: u8) -> Result<Vec<u8>, FileError> {
    let f = EncryptedFile::open(open_rw(&fx.path(name)), layout(log2), VOL)?;
    if f.header().is_none() {
        return f.read_at(None, 0, 1 << 20);
    }
    let key = fx.key_for(&f);
    f.read_at(Some(&key), 0, (f.size() as usize).max(4096))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

#[test]
fn round_trips_at_boundaries() {
    let fx = Fixture::new();
    for log2 in [12u8, 14, 16] {
        let b = 1usize << log2;
        for n in [0, 1, b - 1, b, b + 1, 2 * b + 7] {
            for step in [n.max(1), 1000, b] {
                let name = format!("f{log2}-{n}-{step}");
                let data = pattern(n, n as u8);
                write_file(&fx, &name, log2, &data, step);
                let back = read_file(&fx, &name, log2).unwrap();
                assert!(back == data, "log2 {log2} size {n} step {step}");
                let backing = std::fs::metadata(fx.path(&name)).unwrap().len();
                assert_eq!(layout(log2).plain_size(backing), Ok(n as u64), "size from backing length");
            }
        }
    }
}

#[test]
fn round_trip_10_mib() {
    let fx = Fixture::new();
    for log2 in [12u8, 16, 20] {
        let data = pattern(10 << 20, 3);
        write_file(&fx, "big", log2, &data, 1 << 20);
        assert!(read_file(&fx, "big", log2).unwrap() == data);
        std::fs::remove_file(fx.path("big")).unwrap();
    }
}

/// Large requests read whole blocks scattered straight into the output
/// (8 MiB at 4 KiB blocks is 6,144 buffers, over preadv's 1,024 per call) and
/// open them there: check odd offsets, holes, and a reused buffer full of
/// stale bytes against the plaintext.
#[test]
fn large_reads_at_odd_offsets_and_reused_buffer() {
    let fx = Fixture::new();
    for log2 in [12u8, 16] {
        let mut data = pattern((3 << 20) + 1234, 9);
        write_file(&fx, "big", log2, &data, 1 << 20);
        // A hole between 4 MiB and 5 MiB, then a tail.
        let mut f = EncryptedFile::open(open_rw(&fx.path("big")), layout(log2), VOL).unwrap();
        let key = fx.key_for(&f);
        f.write_at(KeyArg::Existing(&key), 5 << 20, &pattern(777, 4)).unwrap();
        data.resize(5 << 20, 0);
        data.extend_from_slice(&pattern(777, 4));
        let mut buf = vec![0xAAu8; 4 << 20];
        let cases = [
            (0u64, 1usize << 20),
            (1, 1 << 20),
            (4095, (1 << 20) + 2),
            (12345, 2_000_000),
            ((3 << 20) - 17, 2 << 20),
            ((4 << 20) - 5000, 3 << 20),
            (0, 8 << 20),
            ((5 << 20) + 3, 100),
        ];
        for (off, len) in cases {
            let n = f.read_into(Some(&key), off, len, &mut buf).unwrap();
            let end = (off as usize + len).min(data.len());
            assert_eq!(n, end - off as usize, "length at {off}+{len}");
            assert!(buf[..n] == data[off as usize..end], "log2 {log2} read {off}+{len}");
            buf[..n].fill(0x55);
        }
        std::fs::remove_file(fx.path("big")).unwrap();
    }
}

/// A bad block anywhere in a large request, in its nonce, ciphertext or tag
/// (which the scattered read puts in different buffers), fails the whole
/// read and names the first bad block.
#[test]
fn corrupt_block_in_a_large_read_names_the_first_bad_block() {
    let fx = Fixture::new();
    let data = pattern(1 << 20, 5);
    write_file(&fx, "v", 12, &data, 1 << 20);
    let bytes = std::fs::read(fx.path("v")).unwrap();
    for (bad, within) in
        [(vec![200u64], 100), (vec![10, 200], 3), (vec![0], SB - 5), (vec![255], 100), (vec![7], SB - 1)]
    {
        std::fs::write(fx.path("c"), &bytes).unwrap();
        for &i in &bad {
            flip(&fx.path("c"), H + i * SB + within);
        }
        let f = EncryptedFile::open(open_rw(&fx.path("c")), layout(12), VOL).unwrap();
        let key = fx.key_for(&f);
        match f.read_at(Some(&key), 0, 1 << 20) {
            Err(FileError::Block { index, .. }) => assert_eq!(index, bad[0], "blocks {bad:?}"),
            other => panic!("blocks {bad:?}: expected a block error, got {:?}", other.map(|v| v.len())),
        }
    }
}

#[test]
fn sparse_extend_is_o1_and_reads_zeros() {
    let fx = Fixture::new();
    let mut f = EncryptedFile::open(open_rw(&fx.path("sparse")), layout(12), VOL).unwrap();
    let fresh = fx.fresh();
    f.write_at(KeyArg::Fresh(&fresh), 0, b"head").unwrap();
    f.set_len(Some(KeyArg::Existing(&fresh.key)), 1 << 30).unwrap();
    f.write_at(KeyArg::Existing(&fresh.key), (1 << 30) + 100, b"tail").unwrap();
    let meta = std::fs::metadata(fx.path("sparse")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < 1 << 20, "backing stays sparse: {} blocks", meta.blocks());
    let mid = f.read_at(Some(&fresh.key), 500 << 20, 8192).unwrap();
    assert!(mid.iter().all(|&b| b == 0));
    assert_eq!(f.read_at(Some(&fresh.key), 0, 4).unwrap(), b"head");
    assert_eq!(f.read_at(Some(&fresh.key), (1 << 30) + 100, 10).unwrap(), b"tail");
    let report = f.verify(&fresh.key).unwrap();
    assert!(report.bad_blocks.is_empty());
    // A v2 file proves its holes with a marker: fsck reports none of them
    // as zeroed (a zero block no marker covers is a bad block instead).
    assert!(f.is_v2());
    assert!(report.zero_blocks.is_empty(), "proven holes are not suspect: {}", report.zero_blocks.len());
}

#[test]
fn truncate_to_zero_mints_a_new_file_id() {
    let fx = Fixture::new();
    let mut f = EncryptedFile::open(open_rw(&fx.path("t")), layout(12), VOL).unwrap();
    let a = fx.fresh();
    f.write_at(KeyArg::Fresh(&a), 0, b"one").unwrap();
    let id1 = f.header().unwrap().file_id;
    f.set_len(None, 0).unwrap();
    assert_eq!(std::fs::metadata(fx.path("t")).unwrap().len(), 0);
    let b = fx.fresh();
    assert!(matches!(f.write_at(KeyArg::Existing(&a.key), 0, b"x"), Err(FileError::NeedKey)));
    f.write_at(KeyArg::Fresh(&b), 0, b"two").unwrap();
    assert_ne!(f.header().unwrap().file_id, id1);
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Read(u64, usize),
}

fn op() -> impl Strategy<Value = Op> {
    let off = prop_oneof![0u64..20_000, Just(4095u64), Just(4096), Just(8192), 0u64..200];
    prop_oneof![
        3 => (off.clone(), proptest::collection::vec(any::<u8>(), 1..9000)).prop_map(|(o, d)| Op::Write(o, d)),
        1 => prop_oneof![0u64..20_000, Just(0u64), Just(4096), Just(4097)].prop_map(Op::SetLen),
        2 => (off, 0usize..10_000).prop_map(|(o, l)| Op::Read(o, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn model_test(ops in proptest::collection::vec(op(), 1..40)) {
        let fx = Fixture::new();
        let mut f = EncryptedFile::open(open_rw(&fx.path("m")), layout(12), VOL).unwrap();
        let mut model: Vec<u8> = Vec::new();
        let mut key: Option<FreshKey> = None;
        for op in ops {
            let need_fresh = f.header().is_none();
            if need_fresh { key = Some(fx.fresh()); }
            let k = key.as_ref().unwrap();
            let arg = if need_fresh { KeyArg::Fresh(k) } else { KeyArg::Existing(&k.key) };
            match op {
                Op::Write(o, d) => {
                    f.write_at(arg, o, &d).unwrap();
                    let end = o as usize + d.len();
                    if model.len() < end { model.resize(end, 0); }
                    model[o as usize..end].copy_from_slice(&d);
                }
                Op::SetLen(n) => {
                    f.set_len(Some(arg), n).unwrap();
                    model.resize(n as usize, 0);
                }
                Op::Read(o, l) => {
                    let got = if f.header().is_some() { f.read_at(Some(&k.key), o, l).unwrap() } else { f.read_at(None, o, l).unwrap() };
                    let s = (o as usize).min(model.len());
                    let e = (o as usize + l).min(model.len());
                    prop_assert_eq!(&got[..], &model[s..e]);
                }
            }
            prop_assert_eq!(f.size(), model.len() as u64);
            let backing = std::fs::metadata(fx.path("m")).unwrap().len();
            prop_assert_eq!(layout(12).plain_size(backing), Ok(model.len() as u64));
        }
        // A fresh open of the backing file sees the same bytes.
        drop(f);
        prop_assert_eq!(read_file(&fx, "m", 12).unwrap(), model);
    }
}

// ---- attacks: every one must give an error, never plaintext ----

const B: usize = 4096;
const H: u64 = 256;
const SB: u64 = (B + 28) as u64;

/// A 3-block file (2 full + 100 bytes) and its plaintext.
fn victim(fx: &Fixture, name: &str, seed: u8) -> Vec<u8> {
    let data = pattern(2 * B + 100, seed);
    write_file(fx, name, 12, &data, 3000);
    data
}

fn flip(path: &Path, off: u64) {
    let f = open_rw(path);
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, off).unwrap();
}

fn assert_rejected(fx: &Fixture, name: &str, what: &str) {
    match std::panic::catch_unwind(|| read_file(fx, name, 12)) {
        Ok(Ok(_)) => panic!("{what}: tampered file was read"),
        Ok(Err(_)) => {}
        Err(_) => {} // key unwrap refused inside the helper: also a rejection
    }
}

#[test]
fn header_bit_flips() {
    let fx = Fixture::new();
    let data = victim(&fx, "v", 1);
    let bytes = std::fs::read(fx.path("v")).unwrap();
    for off in 0..H {
        std::fs::write(fx.path("h"), &bytes).unwrap();
        flip(&fx.path("h"), off);
        let f = EncryptedFile::open(open_rw(&fx.path("h")), layout(12), VOL);
        let Ok(f) = f else { continue };
        let h = f.header().unwrap();
        let Ok(key) = fx.provider.unwrap(&h.wrapped, &f.key_context().unwrap()) else { continue };
        let r = f.read_at(Some(&key), 0, data.len());
        assert!(r.is_err(), "flip at header byte {off} was not detected");
    }
}

#[test]
fn block_bit_flips_in_nonce_ciphertext_and_tag() {
    let fx = Fixture::new();
    victim(&fx, "v", 2);
    let bytes = std::fs::read(fx.path("v")).unwrap();
    for (what, off) in [("nonce", H + SB), ("ciphertext", H + SB + 12 + 500), ("tag", H + 2 * SB - 1)] {
        std::fs::write(fx.path("b"), &bytes).unwrap();
        flip(&fx.path("b"), off);
        assert_rejected(&fx, "b", what);
    }
}

#[test]
fn block_swap_within_file() {
    let fx = Fixture::new();
    victim(&fx, "v", 3);
    let mut bytes = std::fs::read(fx.path("v")).unwrap();
    let (a, b) = (H as usize, (H + SB) as usize);
    let first: Vec<u8> = bytes[a..b].to_vec();
    bytes.copy_within(b..b + SB as usize, a);
    bytes[b..b + SB as usize].copy_from_slice(&first);
    std::fs::write(fx.path("s"), &bytes).unwrap();
    assert_rejected(&fx, "s", "swap");
}

#[test]
fn block_copied_from_other_file_same_index() {
    let fx = Fixture::new();
    victim(&fx, "v", 4);
    victim(&fx, "w", 5);
    let mut v = std::fs::read(fx.path("v")).unwrap();
    let w = std::fs::read(fx.path("w")).unwrap();
    let r = (H + SB) as usize..(H + 2 * SB) as usize;
    v[r.clone()].copy_from_slice(&w[r]);
    std::fs::write(fx.path("c"), &v).unwrap();
    assert_rejected(&fx, "c", "cross-file copy");
}

#[test]
fn truncation_at_block_boundary_and_mid_block() {
    let fx = Fixture::new();
    victim(&fx, "v", 6);
    let bytes = std::fs::read(fx.path("v")).unwrap();
    for (what, len) in [("boundary", H + 2 * SB), ("boundary-1", H + SB), ("mid", H + SB + 100), ("header-only", H)] {
        std::fs::write(fx.path("t"), &bytes[..len as usize]).unwrap();
        assert_rejected(&fx, "t", what);
    }
}

#[test]
fn appended_block() {
    let fx = Fixture::new();
    victim(&fx, "v", 7);
    let mut bytes = std::fs::read(fx.path("v")).unwrap();
    let extra: Vec<u8> = bytes[H as usize..(H + SB) as usize].to_vec();
    bytes.extend_from_slice(&extra);
    std::fs::write(fx.path("a"), &bytes).unwrap();
    assert_rejected(&fx, "a", "append");
}

#[test]
fn header_of_another_file() {
    let fx = Fixture::new();
    victim(&fx, "v", 8);
    victim(&fx, "w", 9);
    let mut v = std::fs::read(fx.path("v")).unwrap();
    let w = std::fs::read(fx.path("w")).unwrap();
    v[..H as usize].copy_from_slice(&w[..H as usize]);
    std::fs::write(fx.path("x"), &v).unwrap();
    assert_rejected(&fx, "x", "foreign header");
}

#[test]
fn zeroed_last_block_is_not_a_hole() {
    let fx = Fixture::new();
    victim(&fx, "v", 10);
    let mut bytes = std::fs::read(fx.path("v")).unwrap();
    let n = bytes.len();
    bytes[(H + 2 * SB) as usize..n].fill(0);
    std::fs::write(fx.path("z"), &bytes).unwrap();
    assert_rejected(&fx, "z", "zeroed last block");
}

// ---- torn tails and interrupted updates (docs/FORMAT.md "Interrupted updates") ----

/// Reads block `i` alone.
fn read_block(f: &EncryptedFile, key: &DataKey, i: u64) -> Result<Vec<u8>, FileError> {
    f.read_at(Some(key), i * B as u64, B)
}

fn open(fx: &Fixture, name: &str) -> EncryptedFile {
    EncryptedFile::open(open_rw(&fx.path(name)), layout(12), VOL).unwrap()
}

/// A kill -9 in the middle of a large pwrite leaves the backing file cut at
/// a page boundary: 1..28 bytes past a whole block, or inside a block. Every
/// intact block still reads; only the torn one fails, and names itself;
/// `repair` cuts back to the last authentic block and re-seals it as last.
#[test]
fn torn_tail_fails_only_its_block_and_repair_cuts_it() {
    let fx = Fixture::new();
    let data = pattern(10 * B + 300, 11);
    write_file(&fx, "v", 12, &data, 10 * B + 300);
    let bytes = std::fs::read(fx.path("v")).unwrap();
    // (backing length, blocks that must read, the block that fails, size after repair)
    for (cut, good, bad, repaired) in [
        (H + 7 * SB + 1, 6, 6, 7 * B),
        (H + 7 * SB + 28, 6, 6, 7 * B),
        (H + 7 * SB, 6, 6, 7 * B),
        (H + 7 * SB + 500, 7, 7, 7 * B),
        (H + 7 * SB + SB - 1, 7, 7, 7 * B),
        (H + 28, 0, 0, 0),
        (H + 100, 0, 0, 0),
    ] {
        std::fs::write(fx.path("t"), &bytes[..cut as usize]).unwrap();
        let mut f = open(&fx, "t");
        let key = fx.key_for(&f);
        for i in 0..good {
            let got = read_block(&f, &key, i).unwrap_or_else(|e| panic!("cut {cut}: block {i}: {e}"));
            assert!(got == data[i as usize * B..(i as usize + 1) * B], "cut {cut}: block {i}");
        }
        match f.read_at(Some(&key), 0, 20 * B) {
            Err(FileError::Block { index, .. }) => assert_eq!(index, bad, "cut {cut}"),
            Err(FileError::BadSize(_)) => assert_eq!(bad, 0, "cut {cut}"),
            other => panic!("cut {cut}: expected block {bad} to fail, got {:?}", other.map(|v| v.len())),
        }
        let v = f.verify(&key).unwrap();
        assert!(v.bad_size || v.bad_blocks == [bad], "cut {cut}: {v:?}");
        let r = f.repair(&key, &v).unwrap();
        assert_eq!(r.cut_bytes, cut - layout(12).backing_size(repaired as u64), "cut {cut}: {r:?}");
        drop(f);
        let back = read_file(&fx, "t", 12).unwrap_or_else(|e| panic!("cut {cut}: after repair: {e}"));
        assert!(back == data[..repaired], "cut {cut}: {} bytes after repair", back.len());
        let f = open(&fx, "t");
        if f.header().is_some() {
            assert_eq!(f.verify(&fx.key_for(&f)).unwrap(), Default::default(), "cut {cut}: clean after repair");
        }
    }
}

/// A torn tail 1..28 bytes past a block that is sealed as the last one (an
/// append torn right after it began) reads whole; the stray bytes are
/// invisible, and the next append overwrites them.
#[test]
fn torn_bytes_after_an_intact_last_block_read_whole() {
    let fx = Fixture::new();
    let data = pattern(3 * B, 12);
    write_file(&fx, "v", 12, &data, 3 * B);
    let f = std::fs::OpenOptions::new().append(true).open(fx.path("v")).unwrap();
    use std::io::Write;
    (&f).write_all(&[0x5a; 17]).unwrap();
    let mut f = open(&fx, "v");
    let key = fx.key_for(&f);
    assert_eq!(f.size(), 3 * B as u64);
    assert!(f.read_at(Some(&key), 0, 4 * B).unwrap() == data);
    assert_eq!(f.verify(&key).unwrap().torn_bytes, 17);
    f.write_at(KeyArg::Existing(&key), 3 * B as u64, b"more").unwrap();
    let mut want = data.clone();
    want.extend_from_slice(b"more");
    drop(f);
    assert!(read_file(&fx, "v", 12).unwrap() == want);
}

/// Truncating a torn file to the size it reports keeps every whole block:
/// the caller asks for that end, so the last whole block is re-sealed as last.
#[test]
fn truncate_to_reported_size_cuts_a_torn_tail() {
    let fx = Fixture::new();
    let data = pattern(5 * B + 10, 13);
    write_file(&fx, "v", 12, &data, 5 * B + 10);
    let bytes = std::fs::read(fx.path("v")).unwrap();
    std::fs::write(fx.path("t"), &bytes[..(H + 4 * SB + 9) as usize]).unwrap();
    let mut f = open(&fx, "t");
    let key = fx.key_for(&f);
    assert_eq!(f.size(), 4 * B as u64);
    f.set_len(Some(KeyArg::Existing(&key)), 4 * B as u64).unwrap();
    assert!(f.read_at(Some(&key), 0, 8 * B).unwrap() == data[..4 * B]);
    drop(f);
    assert!(read_file(&fx, "t", 12).unwrap() == data[..4 * B]);
}

/// Issue 14, point 6: a file left with only its header reads EIO, and after
/// a successful write reads fine through the same object.
#[test]
fn header_only_file_reads_after_a_write_through_the_same_handle() {
    let fx = Fixture::new();
    write_file(&fx, "v", 12, &pattern(5000, 14), 5000);
    let bytes = std::fs::read(fx.path("v")).unwrap();
    for stray in [0usize, 5, 28] {
        std::fs::write(fx.path("h"), &bytes[..H as usize + stray]).unwrap();
        let mut f = open(&fx, "h");
        let key = fx.key_for(&f);
        assert!(matches!(f.read_at(Some(&key), 0, 10), Err(FileError::BadSize(_))));
        f.write_at(KeyArg::Existing(&key), 1, b"abc").unwrap();
        assert_eq!(f.read_at(Some(&key), 0, 10).unwrap(), b"\0abc", "stray {stray}");
        assert_eq!(f.verify(&key).unwrap(), Default::default());
        // A sparse first write leaves block 0 a hole, not the stray bytes.
        std::fs::write(fx.path("h"), &bytes[..H as usize + stray]).unwrap();
        let mut f = open(&fx, "h");
        f.write_at(KeyArg::Existing(&key), 2 * B as u64, b"x").unwrap();
        assert!(f.read_at(Some(&key), 0, 3 * B).unwrap().iter().take(2 * B).all(|&b| b == 0));
    }
}

/// The stale-last tolerance accepts only a block of this file, at this
/// index, sealed as the last block, followed by zeros. So an old last block
/// put back in its slot reads as its old data followed by zeros (a v1
/// limitation, docs/SECURITY.md), while a block from another index or
/// another file, a not-last block, or trailing bytes that are not zero
/// still fail.
#[test]
fn stale_last_block_tolerance_is_narrow() {
    let fx = Fixture::new();
    // v is 3 full blocks; `old` is v when it ended inside block 1.
    let data = pattern(3 * B, 15);
    write_file(&fx, "v", 12, &data[..B + 100], B + 100);
    let old = std::fs::read(fx.path("v")).unwrap();
    let short_last = old[(H + SB) as usize..].to_vec(); // block 1 sealed last, 100 bytes
    let mut f = open(&fx, "v");
    let key = fx.key_for(&f);
    f.write_at(KeyArg::Existing(&key), B as u64 + 100, &data[B + 100..]).unwrap();
    drop(f);
    let good = std::fs::read(fx.path("v")).unwrap();
    let slot1 = (H + SB) as usize..(H + 2 * SB) as usize;
    let put = |slot_bytes: &[u8]| {
        let mut b = good.clone();
        b[slot1.clone()].fill(0);
        b[slot1.start..slot1.start + slot_bytes.len()].copy_from_slice(slot_bytes);
        std::fs::write(fx.path("s"), &b).unwrap();
        let f = open(&fx, "s");
        f.read_at(Some(&key), B as u64, B)
    };
    // The old last block, put back: its data, then zeros.
    let got = put(&short_last).unwrap();
    assert!(got[..100] == data[B..B + 100] && got[100..].iter().all(|&b| b == 0));
    // Not followed by zeros: fails.
    let mut dirty = short_last.clone();
    dirty.push(1);
    assert!(put(&dirty).is_err(), "trailing non-zero byte");
    // Block 1 of another file sealed last at the same length: fails.
    write_file(&fx, "w", 12, &data[..B + 100], B + 100);
    let other = std::fs::read(fx.path("w")).unwrap()[(H + SB) as usize..].to_vec();
    assert!(put(&other).is_err(), "another file's block");
    // The old last block moved to another index: fails.
    let mut b = good.clone();
    let slot2 = (H + 2 * SB) as usize..(H + 3 * SB) as usize;
    b[slot2.clone()].fill(0);
    b[slot2.start..slot2.start + short_last.len()].copy_from_slice(&short_last);
    b.extend_from_slice(&good[(H + SB) as usize..(H + 2 * SB) as usize]);
    std::fs::write(fx.path("m"), &b).unwrap();
    assert!(open(&fx, "m").read_at(Some(&key), 2 * B as u64, B).is_err(), "moved to another index");
    // A full not-last block cut short and zero padded: fails.
    let mut cut = good[slot1.clone()].to_vec();
    cut.truncate(2000);
    assert!(put(&cut).is_err(), "a cut not-last block");
    // The truncation attacks of v1 still fail: cutting at a block boundary.
    std::fs::write(fx.path("c"), &good[..(H + 2 * SB) as usize]).unwrap();
    assert!(open(&fx, "c").read_at(Some(&key), B as u64, B).is_err(), "cut at a block boundary");
    // Format v2 accepts a stale last block only while the length change
    // that could leave one is pending; once committed, it fails.
    // (A reopened file finds the change pending and settles it at its
    // next update, here a rewrite of one byte, which commits.)
    let mut f = open(&fx, "v");
    assert!(f.is_v2() && f.state().pending());
    f.write_at(KeyArg::Existing(&key), 0, &data[..1]).unwrap();
    f.commit().unwrap();
    assert!(!f.state().pending());
    drop(f);
    let mut b = std::fs::read(fx.path("v")).unwrap();
    b[slot1.clone()].fill(0);
    b[slot1.start..slot1.start + short_last.len()].copy_from_slice(&short_last);
    std::fs::write(fx.path("s"), &b).unwrap();
    assert!(open(&fx, "s").read_at(Some(&key), B as u64, B).is_err(), "a stale last block after the commit");
}
