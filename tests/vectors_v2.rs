#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Known-answer vectors for format v2, checked two ways:
//!
//! - against kmsfs itself (`EncryptedFile`), and
//! - against an independent decoder in this file, written from
//!   docs/FORMAT.md with the raw primitives only (RustCrypto AES-GCM, HMAC
//!   and SHA-256; HKDF spelled out over HMAC), as age's testkit does. The
//!   decoder also builds a file from scratch that kmsfs must read.
//!
//! The damaged set holds the attacks of the issue "Format v2", each with
//! its expected outcome. Regenerate (only for a new format version!) with
//! `KMSFS_WRITE_VECTORS=1 cargo test --test vectors_v2`.

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInOut, KeyInit};
use hmac::Mac;
use kmsfs::file::{EncryptedFile, KeyArg};
use kmsfs::format::layout::Layout;
use kmsfs::keys::local::LocalProvider;
use kmsfs::keys::{FreshKey, KeyContext, KeyProvider};

const VOLUME: [u8; 16] = *b"kmsfs-vectors-v1";
const H: usize = 256;
const B: usize = 4096;
const SB: usize = B + 28;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn v2dir() -> PathBuf {
    dir().join("v2")
}

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| ((i % 251) as u8 ^ (i / 4096) as u8).wrapping_add(seed)).collect()
}

fn provider(tmp: &Path) -> LocalProvider {
    let k = tmp.join("vectors.key");
    std::fs::copy(dir().join("vectors.key"), &k).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    LocalProvider::open(&k).unwrap()
}

fn kek() -> [u8; 32] {
    let text = std::fs::read_to_string(dir().join("vectors.key")).unwrap();
    let t = text.trim();
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap();
    }
    k
}

// ---- the independent implementation, from docs/FORMAT.md ----------------

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// HKDF-SHA256 (RFC 5869) for one 32-byte output block.
fn hkdf32(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let prk = hmac(salt, &[ikm]);
    let mut parts: Vec<&[u8]> = info.to_vec();
    parts.push(&[1]);
    hmac(&prk, &parts)
}

fn gcm_seal(key: &[u8; 32], nonce: &[u8], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let c = aes_gcm::Aes256Gcm::new_from_slice(key).unwrap();
    let n = aes_gcm::Nonce::try_from(nonce).unwrap();
    let mut buf = plain.to_vec();
    let tag = c.encrypt_inout_detached(&n, aad, buf.as_mut_slice().into()).unwrap();
    let mut out = nonce.to_vec();
    out.extend_from_slice(&buf);
    out.extend_from_slice(tag.as_slice());
    out
}

fn gcm_open(key: &[u8; 32], stored: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    let n = stored.len();
    if n < 28 {
        return None;
    }
    let c = aes_gcm::Aes256Gcm::new_from_slice(key).unwrap();
    let nonce = aes_gcm::Nonce::try_from(&stored[..12]).unwrap();
    let tag = aes_gcm::Tag::try_from(&stored[n - 16..]).unwrap();
    let mut buf = stored[12..n - 16].to_vec();
    c.decrypt_inout_detached(&nonce, aad, buf.as_mut_slice().into(), &tag).ok()?;
    Some(buf)
}

fn u48(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |a, &x| a << 8 | u64::from(x))
}

/// `"KMSB" || 02 || log2(B) || file ID || index || last || generation`
/// (the file's lgen for the last block, 0 for the others).
fn block_aad(fid: &[u8], index: u64, last: bool, lgen: u64) -> Vec<u8> {
    let mut a = b"KMSB".to_vec();
    a.extend_from_slice(&[2, 12]);
    a.extend_from_slice(fid);
    a.extend_from_slice(&index.to_be_bytes());
    a.push(u8::from(last));
    a.extend_from_slice(&(if last { lgen } else { 0 }).to_be_bytes());
    a
}

fn marker_tag(kst: &[u8; 32], fid: &[u8], index: u64, last: bool, plen: u32, prefix: &[u8]) -> [u8; 16] {
    let t = hmac(kst, &[b"KMSM", &[2, 12], fid, &index.to_be_bytes(), &[u8::from(last)], &plen.to_be_bytes(), prefix]);
    t[..16].try_into().unwrap()
}

struct Keys {
    kblock: [u8; 32],
    kstate: [u8; 32],
}

fn derive(dek: &[u8; 32], fid: [u8; 16], epoch: u16) -> Keys {
    let salt = b"kmsfs-v2-file-keys";
    Keys {
        kblock: hkdf32(salt, dek, &[b"block", &fid, &epoch.to_be_bytes()]),
        kstate: hkdf32(salt, dek, &[b"state", &fid]),
    }
}

/// Decodes a whole v2 file: `Err` names the first thing that fails.
fn raw_decode(kek: &[u8; 32], f: &[u8]) -> Result<Vec<u8>, String> {
    if f.is_empty() {
        return Ok(Vec::new());
    }
    if f.len() <= H || &f[..4] != b"KMSF" || f[4] != 2 || f[5] != 12 || f[6..8] != (H as u16).to_be_bytes() {
        return Err("header".into());
    }
    let (vol, fid): ([u8; 16], [u8; 16]) = (f[8..24].try_into().unwrap(), f[24..40].try_into().unwrap());
    if vol != VOLUME {
        return Err("volume".into());
    }
    let state = &f[40..52];
    // Key section: provider, key ID, wrapped DEK (local: nonce || ct || tag).
    let mut p = 68;
    let plen = f[p] as usize;
    p += 1 + plen;
    let klen = u16::from_be_bytes([f[p], f[p + 1]]) as usize;
    p += 2 + klen;
    let wlen = u16::from_be_bytes([f[p], f[p + 1]]) as usize;
    p += 2;
    let mut aad = b"kmsfs-local-wrap-v1".to_vec();
    aad.extend_from_slice(&vol);
    aad.extend_from_slice(&fid);
    let dek: [u8; 32] =
        gcm_open(kek, &f[p..p + wlen], &aad).ok_or("wrapped key")?.try_into().map_err(|_| "dek length")?;
    // State: flags (1) || lgen (u40) || epoch (u16) || seals (u32).
    let (flags, lgen, epoch) = (state[0], u48(&state[1..6]), u48(&state[6..8]) as u16);
    if flags & !7 != 0 || flags & 4 != 0 {
        return Err("state flags (or a conversion in progress)".into());
    }
    let k = derive(&dek, fid, epoch);
    if hmac(&k.kstate, &[b"KMSH", &f[..40], state])[..16] != f[52..68] {
        return Err("header state tag".into());
    }
    let pending = flags & 1 != 0;
    let body = f.len() - H;
    let (n, r) = (body / SB, body % SB);
    if (1..=28).contains(&r) {
        return Err("torn tail".into());
    }
    let size = n * B + r.saturating_sub(28);
    let blocks = size.div_ceil(B) as u64;
    let slot = |i: u64| {
        let s = H + i as usize * SB;
        &f[s..(s + SB).min(f.len())]
    };
    let gen_ok = |g: u64, last: bool| if last { g == lgen || (pending && g + 1 == lgen) } else { g <= lgen };
    let marker = |i: u64, last: bool| -> Option<u64> {
        let s = slot(i);
        let m = s.len();
        if s[12..m - 16].iter().any(|&b| b != 0) {
            return None;
        }
        let (start, g) = (u48(&s[..6]), u48(&s[6..12]));
        let ok = start <= i
            && gen_ok(g, last)
            && marker_tag(&k.kstate, &fid, i, last, (m - 28) as u32, &s[..12]) == s[m - 16..];
        ok.then_some(start)
    };
    let mut out = Vec::with_capacity(size);
    for i in 0..blocks {
        let last = i + 1 == blocks;
        let s = slot(i);
        if !last && s.iter().all(|&b| b == 0) {
            // A hole: the first slot after it that is not all zeros must be
            // a marker whose run covers it.
            let j = (i + 1..blocks).find(|&j| slot(j).iter().any(|&b| b != 0)).ok_or(format!("block {i}: zeroed"))?;
            match marker(j, j + 1 == blocks) {
                Some(start) if start <= i => {}
                _ => return Err(format!("block {i}: zeroed")),
            }
            out.extend(std::iter::repeat_n(0u8, s.len() - 28));
            continue;
        }
        // The last block carries lgen (or lgen - 1 while pending).
        let gens: &[u64] = if last && pending && lgen > 0 { &[lgen, lgen - 1] } else { &[lgen] };
        if let Some(p) = gens.iter().find_map(|&g| gcm_open(&k.kblock, s, &block_aad(&fid, i, last, g))) {
            out.extend_from_slice(&p);
        } else if marker(i, last).is_some() {
            out.extend(std::iter::repeat_n(0u8, s.len() - 28));
        } else {
            return Err(format!("block {i}: authentication"));
        }
    }
    Ok(out)
}

/// Builds a v2 file from scratch: `plain` in full blocks at generation 1,
/// counters 0.., with blocks `holes` left as a hole run closed by a marker.
fn raw_build(kek: &[u8; 32], fid: [u8; 16], dek: [u8; 32], plain: &[u8], hole_run: Option<(u64, u64)>) -> Vec<u8> {
    let k = derive(&dek, fid, 0);
    let mut f = Vec::new();
    f.extend_from_slice(b"KMSF");
    f.extend_from_slice(&[2, 12]);
    f.extend_from_slice(&(H as u16).to_be_bytes());
    f.extend_from_slice(&VOLUME);
    f.extend_from_slice(&fid);
    let flags = if hole_run.is_some() { 2 } else { 0 };
    let state = [flags, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x10, 0]; // lgen 1, epoch 0, seals 4096
    f.extend_from_slice(&state);
    let tag = hmac(&k.kstate, &[b"KMSH", &f[..40], &state]);
    f.extend_from_slice(&tag[..16]);
    let mut aad = b"kmsfs-local-wrap-v1".to_vec();
    aad.extend_from_slice(&VOLUME);
    aad.extend_from_slice(&fid);
    let wrapped = gcm_seal(kek, &[7u8; 12], &aad, &dek);
    let mut id = hmac_free_sha(kek);
    id.truncate(8);
    let key_id = format!("local:{}", id.iter().map(|x| format!("{x:02x}")).collect::<String>());
    f.push(5);
    f.extend_from_slice(b"local");
    f.extend_from_slice(&(key_id.len() as u16).to_be_bytes());
    f.extend_from_slice(key_id.as_bytes());
    f.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
    f.extend_from_slice(&wrapped);
    f.resize(H, 0);
    let blocks = plain.len().div_ceil(B) as u64;
    for (i, chunk) in plain.chunks(B).enumerate() {
        let i = i as u64;
        let last = i + 1 == blocks;
        match hole_run {
            Some((s, m)) if (s..m).contains(&i) => f.extend(std::iter::repeat_n(0u8, chunk.len() + 28)),
            Some((s, m)) if i == m => {
                let mut prefix = [0u8; 12];
                prefix[..6].copy_from_slice(&s.to_be_bytes()[2..]);
                prefix[6..].copy_from_slice(&1u64.to_be_bytes()[2..]);
                f.extend_from_slice(&prefix);
                f.extend(std::iter::repeat_n(0u8, chunk.len()));
                f.extend_from_slice(&marker_tag(&k.kstate, &fid, i, last, chunk.len() as u32, &prefix));
            }
            _ => {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&i.to_be_bytes()); // any unique nonce
                f.extend_from_slice(&gcm_seal(&k.kblock, &nonce, &block_aad(&fid, i, last, 1), chunk));
            }
        }
    }
    f
}

/// The local key ID's digest: SHA-256("kmsfs local key id v1" || KEK).
fn hmac_free_sha(kek: &[u8; 32]) -> Vec<u8> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"kmsfs local key id v1");
    h.update(kek);
    h.finalize().to_vec()
}

// ---- kmsfs itself ---------------------------------------------------------

fn kmsfs_read(tmp: &Path, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let p = provider(tmp);
    let path = tmp.join("f");
    std::fs::write(&path, bytes).unwrap();
    let f = OpenOptions::new().read(true).open(&path).unwrap();
    let enc = EncryptedFile::open(f, Layout::new(H as u16, 12).unwrap(), VOLUME).map_err(|e| e.to_string())?;
    let (Some(h), Some(ctx)) = (enc.header(), enc.key_context()) else { return Ok(Vec::new()) };
    let key = p.unwrap(&h.wrapped, &ctx).map_err(|e| e.to_string())?;
    enc.read_at(Some(&key), 0, (enc.size() as usize).max(1 << 21)).map_err(|e| e.to_string())
}

#[test]
fn a_file_built_from_the_raw_primitives_reads_in_kmsfs() {
    let kek = kek();
    let tmp = tempfile::tempdir().unwrap();
    let plain = pattern(5 * B + 123, 3);
    for run in [None, Some((1, 3))] {
        let bytes = raw_build(&kek, [0x42; 16], [0x24; 32], &plain, run);
        let mut want = plain.clone();
        if let Some((s, m)) = run {
            want[s as usize * B..(m as usize + 1) * B].fill(0);
        }
        assert_eq!(raw_decode(&kek, &bytes).unwrap(), want, "the decoder agrees with itself");
        assert_eq!(kmsfs_read(tmp.path(), &bytes).unwrap(), want, "kmsfs reads it ({run:?})");
        // A zero block the marker does not cover: both refuse.
        if run.is_some() {
            let mut b = bytes.clone();
            b[H..H + SB].fill(0);
            assert!(raw_decode(&kek, &b).is_err());
            assert!(kmsfs_read(tmp.path(), &b).is_err());
        }
    }
}

struct Case {
    name: &'static str,
    /// (offset, length) writes, then an optional set_len.
    writes: &'static [(u64, usize)],
    set_len: Option<u64>,
}

const CASES: &[Case] = &[
    Case { name: "one-byte", writes: &[(0, 1)], set_len: None },
    Case { name: "two-blocks-plus-7", writes: &[(0, 8199)], set_len: None },
    Case { name: "sparse", writes: &[(0, 10), (40_000, 10), (90_000, 5000), (20_000, 100)], set_len: Some(120_000) },
    Case { name: "shrunk", writes: &[(0, 74 * B)], set_len: Some(40 * B as u64 + 17) },
];

fn expected(c: &Case) -> Vec<u8> {
    let mut m: Vec<u8> = Vec::new();
    for (k, &(off, len)) in c.writes.iter().enumerate() {
        let end = off as usize + len;
        if m.len() < end {
            m.resize(end, 0);
        }
        m[off as usize..end].copy_from_slice(&pattern(len, k as u8));
    }
    if let Some(n) = c.set_len {
        m.resize(n as usize, 0);
    }
    m
}

/// Writes a case through kmsfs; returns the backing bytes after each step.
fn write_case(tmp: &Path, c: &Case) -> Vec<Vec<u8>> {
    let p = provider(tmp);
    let path = tmp.join(c.name);
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    let mut enc = EncryptedFile::open(f, Layout::new(H as u16, 12).unwrap(), VOLUME).unwrap();
    let file_id = kmsfs::format::random_id().unwrap();
    let (key, wrapped) = p.generate(&KeyContext::file(VOLUME, file_id)).unwrap();
    let fresh = FreshKey { file_id, key, wrapped };
    let mut steps = Vec::new();
    for (k, &(off, len)) in c.writes.iter().enumerate() {
        let arg = if k == 0 { KeyArg::Fresh(&fresh) } else { KeyArg::Existing(&fresh.key) };
        enc.write_at(arg, off, &pattern(len, k as u8)).unwrap();
        enc.commit().unwrap();
        steps.push(std::fs::read(&path).unwrap());
    }
    if let Some(n) = c.set_len {
        enc.set_len(Some(KeyArg::Existing(&fresh.key)), n).unwrap();
        enc.commit().unwrap();
        steps.push(std::fs::read(&path).unwrap());
    }
    steps
}

fn slot(i: usize) -> std::ops::Range<usize> {
    H + i * SB..H + (i + 1) * SB
}

fn write_vectors() {
    let d = v2dir();
    std::fs::create_dir_all(&d).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut manifest = Vec::new();
    let mut shrunk = Vec::new();
    for c in CASES {
        let steps = write_case(tmp.path(), c);
        let last = steps.last().unwrap().clone();
        std::fs::write(d.join(format!("{}.kmsfs", c.name)), &last).unwrap();
        let plain = expected(c);
        manifest.push(serde_json::json!({
            "file": format!("{}.kmsfs", c.name), "expect": "ok",
            "plain_len": plain.len(), "plain_sha256": sha256(&plain),
        }));
        if c.name == "shrunk" {
            shrunk = steps;
        }
    }
    // The attacks, on "shrunk": 74 blocks (before) cut to 40 blocks + 17.
    let (before, now) = (&shrunk[0], &shrunk[1]);
    let mut attacks: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut b = now.clone();
    b[slot(3)].fill(0);
    attacks.push(("zeroed-block", b, "integrity"));
    let mut b = now.clone();
    b[H + 40 * SB..].fill(0);
    let old_tail = &before[slot(40).start..];
    b.truncate(slot(40).start);
    b[slot(39)].fill(0);
    b.extend_from_slice(old_tail);
    attacks.push(("undo-truncation-zeroed-last", b, "integrity"));
    let mut b = before.clone();
    b[..H].copy_from_slice(&now[..H]);
    attacks.push(("undo-truncation-old-blocks", b, "integrity"));
    let b = before[..slot(40).end].to_vec();
    attacks.push(("dropped-blocks", b, "integrity"));
    let mut b = now.clone();
    b.extend_from_slice(&before[slot(45)]);
    attacks.push(("added-block", b, "integrity"));
    let mut b = now.clone();
    b[60] ^= 1;
    attacks.push(("bitflip-header-state", b, "integrity"));
    // A whole earlier copy (header and all) is a state the file was in:
    // it reads as that state. Pinned, documented in docs/SECURITY.md.
    attacks.push(("whole-file-rollback", before.clone(), "ok-earlier-state"));
    for (name, bytes, expect) in attacks {
        std::fs::write(d.join(format!("damaged-{name}.kmsfs")), &bytes).unwrap();
        let mut e = serde_json::json!({ "file": format!("damaged-{name}.kmsfs"), "expect": expect });
        if expect == "ok-earlier-state" {
            let p = pattern(74 * B, 0);
            e["plain_len"] = p.len().into();
            e["plain_sha256"] = sha256(&p).into();
        }
        manifest.push(e);
    }
    std::fs::write(d.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap() + "\n").unwrap();
}

/// Every vector, through kmsfs and through the independent decoder.
#[test]
fn known_answer_vectors_v2() {
    if std::env::var_os("KMSFS_WRITE_VECTORS").is_some() {
        write_vectors();
    }
    let kek = kek();
    let tmp = tempfile::tempdir().unwrap();
    let manifest: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(v2dir().join("manifest.json")).unwrap()).unwrap();
    assert!(manifest.len() >= 11, "{} vectors", manifest.len());
    for v in &manifest {
        let file = v["file"].as_str().unwrap();
        let bytes = std::fs::read(v2dir().join(file)).unwrap();
        let (ours, raw) = (kmsfs_read(tmp.path(), &bytes), raw_decode(&kek, &bytes));
        match v["expect"].as_str().unwrap() {
            "integrity" => {
                assert!(ours.is_err(), "{file}: kmsfs decrypted a damaged vector");
                assert!(raw.is_err(), "{file}: the decoder decrypted a damaged vector");
            }
            _ => {
                let (ours, raw) = (ours.unwrap_or_else(|e| panic!("{file}: {e}")), raw.unwrap());
                assert_eq!(ours.len() as u64, v["plain_len"].as_u64().unwrap(), "{file}");
                assert_eq!(sha256(&ours), v["plain_sha256"].as_str().unwrap(), "{file}");
                assert!(ours == raw, "{file}: kmsfs and the decoder differ");
            }
        }
    }
}

/// Files kmsfs writes now (random keys and IDs), decoded independently.
#[test]
fn fresh_kmsfs_files_decode_independently() {
    let kek = kek();
    let tmp = tempfile::tempdir().unwrap();
    for c in CASES {
        let last = write_case(tmp.path(), c).pop().unwrap();
        assert_eq!(raw_decode(&kek, &last).unwrap(), expected(c), "{}", c.name);
    }
}

/// The streaming decoder (`kmsfs decrypt`) agrees with the vectors of both
/// versions: v1 and v2 good files give their plaintext, damaged ones fail.
#[test]
fn streaming_decrypt_reads_every_vector_of_both_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let p = provider(tmp.path());
    for d in [dir(), v2dir()] {
        let manifest: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap()).unwrap();
        for v in &manifest {
            let file = v["file"].as_str().unwrap();
            let bytes = std::fs::read(d.join(file)).unwrap();
            let h = kmsfs::offline::peek_header(&bytes).unwrap();
            let key = p.unwrap(&h.wrapped, &KeyContext::file(h.volume_id, h.file_id)).unwrap();
            let mut out = Vec::new();
            let r = kmsfs::format::stream::decrypt(&h, &key, &mut &bytes[h.header_size as usize..], &mut out);
            match v["expect"].as_str().unwrap() {
                "integrity" => assert!(r.is_err(), "{file}: damaged vector streamed"),
                _ => {
                    r.unwrap_or_else(|e| panic!("{file}: {e}"));
                    assert_eq!(sha256(&out), v["plain_sha256"].as_str().unwrap(), "{file}");
                }
            }
        }
    }
}
