//! Streaming encryption and decryption of one v2 file (`kmsfs encrypt` /
//! `decrypt`), in constant memory, with the format's own rules: the same
//! header, nonces, generations and hole markers as `src/file.rs` writes
//! (docs/FORMAT.md, "A file, format v2").

use std::io::{Read, Write};

use super::block::{BlockAad, is_hole, open_in_place, open_in_place_v, seal_in_place_v};
use super::header::FileHeader;
use super::keys::{DataKey, WrappedKey};
use super::layout::Layout;
use super::v2::{self, FileKeys};
use super::{BLOCK_OVERHEAD, Id, NONCE_LEN};

/// Seals a streamed file counts in its header, written before the data:
/// the stream is capped at this many blocks (8 TiB at 4 KiB blocks).
const STREAM_SEALS: u64 = v2::SEAL_BUDGET;

/// What went wrong: I/O, or bad input (with a reason naming the block).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The input is not a valid file (names the block).
    #[error("{0}")]
    Corrupt(String),
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes `first` (the input's first bytes, already read, up to one block)
/// and the rest of `input` as a v2 file under `key` (the DEK the provider
/// made for `file_id`). Returns the plaintext bytes written.
#[allow(clippy::too_many_arguments)]
pub fn encrypt(
    first: &[u8],
    input: &mut dyn Read,
    output: &mut dyn Write,
    layout: Layout,
    volume_id: Id,
    file_id: Id,
    key: &DataKey,
    wrapped: WrappedKey,
) -> Result<u64, StreamError> {
    let bad = |e: &dyn std::fmt::Display| StreamError::Corrupt(e.to_string());
    let keys = FileKeys::derive(key, &file_id, 0);
    let mut h = FileHeader::new_v2(layout.block_log2(), layout.header_size() as u16, volume_id, file_id, wrapped);
    let st = v2::State { flags: 0, lgen: 1, epoch: 0, seals: STREAM_SEALS };
    h.seal_state(&keys, st);
    output.write_all(&h.to_bytes().map_err(|e| bad(&e))?)?;
    let bs = layout.block_size() as usize;
    let mut cur = vec![0u8; bs + BLOCK_OVERHEAD];
    let mut next = vec![0u8; bs + BLOCK_OVERHEAD];
    cur[NONCE_LEN..NONCE_LEN + first.len()].copy_from_slice(first);
    let mut n = first.len();
    if n < bs {
        n += read_full(input, &mut cur[NONCE_LEN + n..NONCE_LEN + bs])?;
    }
    let (mut index, mut total) = (0u64, 0u64);
    loop {
        let m = if n == bs { read_full(input, &mut next[NONCE_LEN..NONCE_LEN + bs])? } else { 0 };
        let last = m == 0;
        if index >= STREAM_SEALS {
            return Err(StreamError::Corrupt("input too large for one file".into()));
        }
        let aad = BlockAad { file_id: &file_id, block_log2: layout.block_log2(), index, last };
        let sealed = &mut cur[..n + BLOCK_OVERHEAD];
        let mut nonce = [0u8; NONCE_LEN];
        super::random_fill(&mut nonce).map_err(|e| bad(&e))?;
        seal_in_place_v(keys.block(), &v2::aad(&aad, st.lgen), nonce, sealed).map_err(|e| bad(&e))?;
        output.write_all(sealed)?;
        total += n as u64;
        if last {
            break;
        }
        std::mem::swap(&mut cur, &mut next);
        n = m;
        index += 1;
    }
    output.flush()?;
    Ok(total)
}

/// Streams the blocks of a file whose header `h` was read (v1 or v2) and
/// whose DEK is `key` to plaintext. Every block is authenticated before its
/// plaintext is written. In v2, a run of zero slots is written only once
/// the marker after it proves it, and a stale block that an interrupted
/// update left is refused (`kmsfs fsck --repair` settles it first); in v1
/// a zero slot before the last reads as zeros, as v1 holes do.
pub fn decrypt(
    h: &FileHeader,
    key: &DataKey,
    input: &mut dyn Read,
    output: &mut dyn Write,
) -> Result<u64, StreamError> {
    let bad = |s: String| StreamError::Corrupt(s);
    let st = h.state().unwrap_or_default();
    if st.converting() {
        return Err(bad("a conversion to format v2 was interrupted: run kmsfs upgrade, or write the file once".into()));
    }
    let keys = (h.version == v2::VERSION).then(|| FileKeys::derive(key, &h.file_id, st.epoch));
    match &keys {
        Some(k) => h.verify_state(k),
        None => h.verify(key),
    }
    .map_err(|e| bad(e.to_string()))?;
    let layout = Layout::new(h.header_size, h.block_log2).ok_or_else(|| bad("bad geometry".into()))?;
    let bs = layout.block_size() as usize;
    let zero_block = vec![0u8; bs];
    let mut total = 0u64;
    // v2: a run of zero slots not yet proven: (first index, count).
    let mut zeros: Option<(u64, u64)> = None;
    each_slot(input, layout.stored_block() as usize, |index, last, chunk| {
        let n = chunk.len();
        let aad = BlockAad { file_id: &h.file_id, block_log2: h.block_log2, index, last };
        let Some(keys) = &keys else {
            // v1: a zero slot before the last is a hole.
            let plain = match !last && is_hole(chunk) {
                true => &zero_block[..n - BLOCK_OVERHEAD],
                false => &*open_in_place(key, &aad, chunk)
                    .map_err(|_| bad(format!("block {index}: authentication failed")))?,
            };
            output.write_all(plain)?;
            total += plain.len() as u64;
            return Ok(());
        };
        if !last && is_hole(chunk) {
            let (start, count) = zeros.unwrap_or((index, 0));
            zeros = Some((start, count + 1));
        } else if let Some((run_start, g)) = v2::open_marker(keys, &aad, chunk) {
            if !st.accepts(g, last) || zeros.is_some_and(|(s, _)| run_start > s) {
                return Err(bad(format!("block {index}: a marker that does not cover the holes before it")));
            }
            for _ in 0..zeros.take().map_or(0, |(_, c)| c) {
                output.write_all(&zero_block)?;
                total += bs as u64;
            }
            output.write_all(&zero_block[..n - BLOCK_OVERHEAD])?;
            total += (n - BLOCK_OVERHEAD) as u64;
        } else {
            if let Some((s, _)) = zeros {
                return Err(bad(format!("block {s}: zeroed, and no hole marker covers it")));
            }
            // The last block carries the length generation (or, while a
            // change is pending, the one before); the others carry 0.
            let opened = if last && st.pending() {
                // Two generations to try, once per file: keep the bytes.
                let kept = chunk.to_vec();
                st.last_gens().find_map(|g| {
                    chunk.copy_from_slice(&kept);
                    open_in_place_v(keys.block(), &v2::aad(&aad, g), chunk).ok().map(|p| p.len())
                })
            } else {
                open_in_place_v(keys.block(), &v2::aad(&aad, st.lgen), chunk).ok().map(|p| p.len())
            };
            let plen = opened.ok_or_else(|| bad(format!("block {index}: authentication failed")))?;
            output.write_all(&chunk[NONCE_LEN..NONCE_LEN + plen])?;
            total += plen as u64;
        }
        Ok(())
    })?;
    output.flush()?;
    Ok(total)
}

/// Calls `f(index, last, slot)` for each stored slot of `input` (`sb`
/// bytes, the last one shorter), reading one slot ahead to know the last.
fn each_slot(
    input: &mut dyn Read,
    sb: usize,
    mut f: impl FnMut(u64, bool, &mut [u8]) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    let mut cur = vec![0u8; sb];
    let mut next = vec![0u8; sb];
    let mut n = read_full(input, &mut cur)?;
    if n == 0 {
        return Err(StreamError::Corrupt("block 0: missing (header without blocks: truncated)".into()));
    }
    let mut index = 0u64;
    loop {
        let m = if n == sb { read_full(input, &mut next)? } else { 0 };
        if n <= BLOCK_OVERHEAD {
            return Err(StreamError::Corrupt(format!("block {index}: truncated")));
        }
        f(index, m == 0, &mut cur[..n])?;
        if m == 0 {
            return Ok(());
        }
        std::mem::swap(&mut cur, &mut next);
        n = m;
        index += 1;
    }
}
