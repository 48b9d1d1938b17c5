//! rewrap: every file's data key re-wrapped under another key, headers
//! only; and its dry run, which reads headers and calls no provider.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::{Entry, OpError, Progress, io_err, open_backing, par_map, sizes, walk};
use crate::format::header::{FileHeader, KEY_SECTION};
use crate::format::layout::Layout;
use crate::keys::{KeyContext, KeyProvider};
use crate::names::Names;

/// rewrap results.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RewrapReport {
    /// Files re-wrapped now.
    pub rewrapped: u64,
    /// Files already under the target key (a resumed run).
    pub already: u64,
    /// Empty files (no header).
    pub empty: u64,
    /// Files that failed, with the reason.
    pub failed: Vec<(String, String)>,
}

/// What rewrap did with one file.
enum Rewrapped {
    Empty,
    Already,
    Done,
}

/// Re-wraps every header's DEK under `dest`'s key, `PARALLEL_FILES` files
/// at a time. Data blocks are not touched. Each header update is one pwrite
/// inside the first 512-byte sector (header slots are at most 512 bytes),
/// followed by fsync. A dry run is `rewrap_plan`, which calls no provider.
pub fn rewrap(
    cipherdir: &Path,
    layout: Layout,
    source: &dyn KeyProvider,
    dest: &dyn KeyProvider,
    names: &Names,
    mut progress: impl FnMut(Progress),
) -> Result<RewrapReport, OpError> {
    let files = walk(cipherdir, names, false)?.0;
    let dest_key = dest.key_id();
    let sizes = sizes(&files);
    let mut pr = Progress { files_total: files.len() as u64, bytes_total: sizes.iter().sum(), ..Default::default() };
    progress(pr);
    let one = |e: &Entry| -> Result<Rewrapped, OpError> {
        let (p, rel) = (&e.backing, &e.plain);
        // Beneath the cipher dir: never through a link swapped in since the walk.
        let f = open_backing(cipherdir, e, true).map_err(io_err(p))?;
        if f.metadata().map_err(io_err(p))?.len() == 0 {
            return Ok(Rewrapped::Empty);
        }
        let mut buf = vec![0u8; layout.header_size() as usize];
        f.read_exact_at(&mut buf, 0).map_err(io_err(p))?;
        let mut h = FileHeader::parse(&buf, buf.len())
            .map_err(|e| OpError::Corrupt { path: rel.clone(), detail: e.to_string() })?;
        if h.wrapped.key_id == dest_key && h.wrapped.provider == dest.name() {
            return Ok(Rewrapped::Already);
        }
        let ctx = KeyContext::file(h.volume_id, h.file_id);
        let new = if source.name() == dest.name() && dest.name() != crate::keys::local::NAME {
            dest.rewrap(&h.wrapped, &ctx)?
        } else {
            let key = source.unwrap(&h.wrapped, &ctx)?;
            h.verify(&key).map_err(|e| OpError::Corrupt { path: rel.clone(), detail: e.to_string() })?;
            dest.wrap(&key, &ctx)?
        };
        h.wrapped = new;
        let section =
            h.key_section_bytes().map_err(|e| OpError::Corrupt { path: rel.clone(), detail: e.to_string() })?;
        // The KMS call took time: under a per-file lock, check that the
        // header is still the one we re-wrapped before overwriting it.
        f.lock().map_err(io_err(p))?;
        let mut now = vec![0u8; buf.len()];
        f.read_exact_at(&mut now, 0).map_err(io_err(p))?;
        if now[..KEY_SECTION] != buf[..KEY_SECTION] {
            return Err(OpError::Corrupt {
                path: rel.clone(),
                detail: "the file changed during rewrap (new file ID); run rewrap again".into(),
            });
        }
        f.write_all_at(&section, KEY_SECTION as u64).map_err(io_err(p))?;
        f.sync_data().map_err(io_err(p))?;
        Ok(Rewrapped::Done)
    };
    let results = par_map(&files, one, |i, _| {
        pr.files += 1;
        pr.bytes += sizes[i];
        progress(pr);
    });
    let mut r = RewrapReport::default();
    for (e, res) in files.into_iter().zip(results) {
        match res {
            Ok(Rewrapped::Done) => r.rewrapped += 1,
            Ok(Rewrapped::Already) => r.already += 1,
            Ok(Rewrapped::Empty) => r.empty += 1,
            Err(err) => r.failed.push((e.plain, err.to_string())),
        }
    }
    Ok(r)
}

/// `rewrap --dry-run`: reads the headers only and makes no key-provider
/// call, so it works without the key and changes nothing. Names are not
/// decrypted (that needs the name key), so it counts backing files: those
/// whose header names `dest_key` (if known) are already done, the other
/// kmsfs files would be re-wrapped, and the rest (empty files, kmsfs's own
/// name and directory-ID files) are counted as `empty`.
pub fn rewrap_plan(cipherdir: &Path, layout: Layout, dest_key: Option<&str>) -> Result<RewrapReport, OpError> {
    let mut r = RewrapReport::default();
    let mut stack = vec![cipherdir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            let p = e.path();
            let ft = e.file_type().map_err(io_err(&p))?;
            if dir == cipherdir && crate::names::is_reserved(e.file_name().as_encoded_bytes()) {
                continue;
            }
            if ft.is_dir() {
                stack.push(p);
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let mut buf = vec![0u8; layout.header_size() as usize];
            let header = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&p)
                .and_then(|f| f.read_exact_at(&mut buf, 0))
                .ok()
                .and_then(|()| FileHeader::parse(&buf, buf.len()).ok());
            match header {
                None => r.empty += 1,
                Some(h) if dest_key.is_some_and(|k| k == h.wrapped.key_id) => r.already += 1,
                Some(_) => r.rewrapped += 1,
            }
        }
    }
    Ok(r)
}
