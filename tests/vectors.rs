#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Known-answer vectors: checked-in v1 backing files and the key that opens
//! them must keep decrypting to known plaintext (or keep failing, for the
//! damaged ones), so a change cannot silently break existing volumes.
//!
//! Regenerate (only for a new format version!) with
//! `KMSFS_WRITE_VECTORS=1 cargo test --test vectors`.

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kmsfs::file::{EncryptedFile, KeyArg};
use kmsfs::format::layout::Layout;
use kmsfs::keys::local::LocalProvider;
use kmsfs::keys::{FreshKey, KeyContext, KeyProvider};

const VOLUME: [u8; 16] = *b"kmsfs-vectors-v1";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn sha256(b: &[u8]) -> String {
    kmsfs::format::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b).as_ref())
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect()
}

/// The key file, copied to a 0600 temp file (git does not keep modes).
fn provider(tmp: &Path) -> LocalProvider {
    let k = tmp.join("vectors.key");
    std::fs::copy(dir().join("vectors.key"), &k).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    LocalProvider::open(&k).unwrap()
}

struct Case {
    name: &'static str,
    block_log2: u8,
    /// (offset, length) writes of `pattern`, then an optional final set_len.
    writes: &'static [(u64, usize)],
    set_len: Option<u64>,
}

const CASES: &[Case] = &[
    Case { name: "one-byte", block_log2: 12, writes: &[(0, 1)], set_len: None },
    Case { name: "block-minus-1", block_log2: 12, writes: &[(0, 4095)], set_len: None },
    Case { name: "exact-block", block_log2: 12, writes: &[(0, 4096)], set_len: None },
    Case { name: "two-blocks-plus-7", block_log2: 12, writes: &[(0, 8199)], set_len: None },
    Case { name: "sparse", block_log2: 12, writes: &[(0, 10), (40_000, 10)], set_len: Some(60_000) },
    Case { name: "bs16k", block_log2: 14, writes: &[(0, 40_000)], set_len: None },
    Case { name: "bs1m", block_log2: 20, writes: &[(0, 1_500_000)], set_len: None },
];

fn expected_plain(c: &Case) -> Vec<u8> {
    let mut m: Vec<u8> = Vec::new();
    for &(off, len) in c.writes {
        let d = pattern(len);
        let end = off as usize + len;
        if m.len() < end {
            m.resize(end, 0);
        }
        m[off as usize..end].copy_from_slice(&d);
    }
    if let Some(n) = c.set_len {
        m.resize(n as usize, 0);
    }
    m
}

fn write_vectors() {
    let d = dir();
    std::fs::create_dir_all(&d).unwrap();
    let kp = d.join("vectors.key");
    if !kp.exists() {
        LocalProvider::create_key_file(&kp).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = provider(tmp.path());
    let mut manifest = Vec::new();
    for c in CASES {
        let path = d.join(format!("{}.kmsfs", c.name));
        let _ = std::fs::remove_file(&path);
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let layout = Layout::new(256, c.block_log2).unwrap();
        let mut enc = EncryptedFile::open(f, layout, VOLUME).unwrap();
        let file_id = kmsfs::format::random_id().unwrap();
        let (key, wrapped) = p.generate(&KeyContext::file(VOLUME, file_id)).unwrap();
        let fresh = FreshKey { file_id, key, wrapped };
        for (i, &(off, len)) in c.writes.iter().enumerate() {
            let arg = if i == 0 { KeyArg::Fresh(&fresh) } else { KeyArg::Existing(&fresh.key) };
            enc.write_at(arg, off, &pattern(len)).unwrap();
        }
        if let Some(n) = c.set_len {
            enc.set_len(Some(KeyArg::Existing(&fresh.key)), n).unwrap();
        }
        let plain = expected_plain(c);
        manifest.push(serde_json::json!({
            "file": format!("{}.kmsfs", c.name), "block_size": 1u64 << c.block_log2, "header_size": 256,
            "plain_len": plain.len(), "plain_sha256": sha256(&plain), "expect": "ok",
        }));
    }
    // Damaged vectors: each must fail, never yield plaintext.
    let base = std::fs::read(d.join("two-blocks-plus-7.kmsfs")).unwrap();
    let mut flipped = base.clone();
    flipped[256 + 4124 + 50] ^= 1;
    let mut swapped = base.clone();
    let b0: Vec<u8> = base[256..256 + 4124].to_vec();
    swapped.copy_within(256 + 4124..256 + 2 * 4124, 256);
    swapped[256 + 4124..256 + 2 * 4124].copy_from_slice(&b0);
    let truncated = base[..256 + 2 * 4124].to_vec();
    for (name, bytes, expect) in [
        ("damaged-bitflip", flipped, "block 1"),
        ("damaged-swap", swapped, "block 0"),
        ("damaged-truncated", truncated, "block 1"),
    ] {
        std::fs::write(d.join(format!("{name}.kmsfs")), bytes).unwrap();
        manifest.push(serde_json::json!({
            "file": format!("{name}.kmsfs"), "block_size": 4096, "header_size": 256,
            "expect": "integrity", "error_contains": expect,
        }));
    }
    std::fs::write(d.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap() + "\n").unwrap();
}

#[test]
fn known_answer_vectors() {
    if std::env::var_os("KMSFS_WRITE_VECTORS").is_some() {
        write_vectors();
    }
    let tmp = tempfile::tempdir().unwrap();
    let p = provider(tmp.path());
    let manifest: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.len() >= 10);
    for v in &manifest {
        let file = v["file"].as_str().unwrap();
        let bs = v["block_size"].as_u64().unwrap();
        let layout = Layout::new(v["header_size"].as_u64().unwrap() as u16, bs.trailing_zeros() as u8).unwrap();
        let f = OpenOptions::new().read(true).open(dir().join(file)).unwrap();
        let enc = EncryptedFile::open(f, layout, VOLUME).unwrap();
        let h = enc.header().unwrap();
        let key = p.unwrap(&h.wrapped, &enc.key_context().unwrap()).unwrap();
        let res = enc.read_at(Some(&key), 0, (enc.size() as usize).max(1 << 21));
        match v["expect"].as_str().unwrap() {
            "ok" => {
                let plain = res.unwrap_or_else(|e| panic!("{file}: {e}"));
                assert_eq!(plain.len() as u64, v["plain_len"].as_u64().unwrap(), "{file}");
                assert_eq!(sha256(&plain), v["plain_sha256"].as_str().unwrap(), "{file}");
                let r = enc.verify(&key).unwrap();
                assert!(r.bad_blocks.is_empty() && !r.bad_size, "{file}: {r:?}");
            }
            _ => {
                let e = res.err().unwrap_or_else(|| panic!("{file}: damaged vector decrypted"));
                let want = v["error_contains"].as_str().unwrap();
                assert!(e.to_string().contains(want), "{file}: {e}");
            }
        }
    }
}

mod mutated {
    use super::*;
    use proptest::prelude::*;

    /// A good vector: file name, layout, bytes, plaintext sha256.
    type Vector = (String, Layout, Vec<u8>, String);

    /// The good vectors, read once.
    static OK_VECTORS: std::sync::LazyLock<Vec<Vector>> = std::sync::LazyLock::new(ok_vectors);

    fn ok_vectors() -> Vec<Vector> {
        let manifest: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(dir().join("manifest.json")).unwrap()).unwrap();
        manifest
            .iter()
            .filter(|v| v["expect"] == "ok")
            .map(|v| {
                let file = v["file"].as_str().unwrap().to_string();
                let bs = v["block_size"].as_u64().unwrap();
                let layout = Layout::new(v["header_size"].as_u64().unwrap() as u16, bs.trailing_zeros() as u8).unwrap();
                let bytes = std::fs::read(dir().join(&file)).unwrap();
                (file, layout, bytes, v["plain_sha256"].as_str().unwrap().to_string())
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Damage anywhere in a backing file (flipped bytes, a cut) gives an
        /// error or the original plaintext, never other plaintext and never a
        /// panic, and fsck's verify survives it too.
        #[test]
        fn damage_never_decrypts_to_other_plaintext(
            pick in any::<prop::sample::Index>(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
            cut in prop::option::of(any::<prop::sample::Index>()),
        ) {
            let (file, layout, mut bytes, want) = OK_VECTORS[pick.index(OK_VECTORS.len())].clone();
            for (at, x) in &flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            if let Some(c) = cut {
                bytes.truncate(c.index(bytes.len()));
            }
            let tmp = tempfile::tempdir().unwrap();
            let p = provider(tmp.path());
            let path = tmp.path().join("f");
            std::fs::write(&path, &bytes).unwrap();
            let f = OpenOptions::new().read(true).open(&path).unwrap();
            let Ok(enc) = EncryptedFile::open(f, layout, VOLUME) else { return Ok(()) };
            let (Some(h), Some(ctx)) = (enc.header(), enc.key_context()) else { return Ok(()) };
            let Ok(key) = p.unwrap(&h.wrapped, &ctx) else { return Ok(()) };
            if let Ok(plain) = enc.read_at(Some(&key), 0, (enc.size() as usize).max(1 << 21)) {
                prop_assert_eq!(sha256(&plain), want, "{} decrypted to other plaintext", file);
            }
            let _ = enc.verify(&key);
        }
    }
}
