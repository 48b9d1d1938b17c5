//! Streaming encrypt and decrypt of one file, and `inspect`: the per-file
//! format read or written front to back in constant memory.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{OpError, io_err};
use crate::format::header::FileHeader;
use crate::format::layout::Layout;
use crate::format::stream::read_full;
use crate::format::{BLOCK_OVERHEAD, Id, NONCE_LEN, hex};
use crate::keys::{KeyContext, KeyError, KeyProvider};

/// Streams `input` into the per-file format in constant memory.
pub fn encrypt_stream(
    input: &mut dyn Read,
    output: &mut dyn Write,
    layout: Layout,
    volume_id: Id,
    provider: &dyn KeyProvider,
) -> Result<u64, OpError> {
    let io = |source| OpError::Io { path: "stream".into(), source };
    let bs = layout.block_size() as usize;
    let mut cur = vec![0u8; bs + BLOCK_OVERHEAD];
    let n = read_full(input, &mut cur[NONCE_LEN..NONCE_LEN + bs]).map_err(io)?;
    if n == 0 {
        return Ok(0); // An empty file has no header.
    }
    let file_id = crate::format::random_id().map_err(|e| KeyError::Other(e.to_string()))?;
    let (key, wrapped) = provider.generate(&KeyContext::file(volume_id, file_id))?;
    // Every new file is format v2 (src/format/stream.rs).
    let first = &cur[NONCE_LEN..NONCE_LEN + n];
    crate::format::stream::encrypt(first, input, output, layout, volume_id, file_id, &key, wrapped).map_err(|e| match e
    {
        crate::format::stream::StreamError::Io(source) => io(source),
        crate::format::stream::StreamError::Corrupt(d) => OpError::Corrupt { path: "stream".into(), detail: d },
    })
}

/// Reads a header slot from the start of a stream or file prefix.
pub fn peek_header(prefix: &[u8]) -> Result<FileHeader, String> {
    if prefix.len() < 8 {
        return Err("too short for a kmsfs header".into());
    }
    let hs = crate::format::header::declared_size(prefix).unwrap_or(0);
    FileHeader::parse(prefix, hs).map_err(|e| e.to_string())
}

/// Streams a backing file back to plaintext in constant memory. Every block
/// is authenticated before its plaintext is written.
pub fn decrypt_stream(
    input: &mut dyn Read,
    output: &mut dyn Write,
    provider: &dyn KeyProvider,
) -> Result<u64, OpError> {
    let io = |source| OpError::Io { path: "stream".into(), source };
    let corrupt = |d: String| OpError::Corrupt { path: "input".into(), detail: d };
    let mut head = vec![0u8; 8];
    let got = read_full(input, &mut head).map_err(io)?;
    if got == 0 {
        return Ok(0);
    }
    if got < 8 {
        return Err(corrupt("too short for a kmsfs header".into()));
    }
    let hs = crate::format::header::declared_size(&head).unwrap_or(0);
    head.resize(hs.max(8), 0);
    if read_full(input, &mut head[8..]).map_err(io)? != hs.saturating_sub(8) {
        return Err(corrupt("header truncated".into()));
    }
    let h = peek_header(&head).map_err(corrupt)?;
    let ctx = KeyContext::file(h.volume_id, h.file_id);
    let key = provider.unwrap(&h.wrapped, &ctx)?;
    crate::format::stream::decrypt(&h, &key, input, output).map_err(|e| match e {
        crate::format::stream::StreamError::Io(source) => io(source),
        crate::format::stream::StreamError::Corrupt(d) => corrupt(d),
    })
}

/// `kmsfs inspect`: the header as JSON, no key needed.
pub fn inspect(path: &Path) -> Result<serde_json::Value, OpError> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len == 0 {
        return Ok(serde_json::json!({"empty": true, "plaintext_size": 0, "header_size": 0}));
    }
    let mut prefix = vec![0u8; (len as usize).min(65_536)];
    f.read_exact_at(&mut prefix, 0).map_err(io_err(path))?;
    let h = peek_header(&prefix).map_err(|d| OpError::Corrupt { path: path.display().to_string(), detail: d })?;
    let layout = Layout::new(h.header_size, h.block_log2);
    let (plain, size_ok) = match layout.map(|l| l.plain_size(len)) {
        Some(Ok(s)) => (s, true),
        Some(Err((s, _))) => (s, false),
        None => (0, false),
    };
    Ok(serde_json::json!({
        "version": h.version,
        "volume_id": hex(&h.volume_id),
        "file_id": hex(&h.file_id),
        "provider": h.wrapped.provider,
        "key_id": h.wrapped.key_id,
        "block_size": 1u64 << h.block_log2,
        "header_size": h.header_size,
        "plaintext_size": plain,
        "backing_size": len,
        "size_valid": size_ok,
        "wrapped_key_len": h.wrapped.blob.len(),
    }))
}
