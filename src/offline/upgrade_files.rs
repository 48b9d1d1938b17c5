//! `kmsfs upgrade`, file contents: every format v1 file rewritten as v2.

use std::fs::FileTimes;

use std::path::Path;

use super::{Entry, OpError, Progress, open_backing, sizes, walk};
use crate::file::EncryptedFile;
use crate::format::Id;
use crate::format::layout::Layout;
use crate::keys::KeyProvider;
use crate::names::Names;

/// What [`upgrade_files`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FilesReport {
    /// v1 files rewritten as v2.
    pub upgraded: u64,
    /// Files that were v2 already (or empty), left as they are.
    pub current: u64,
    /// Files that could not be upgraded, with the reason (a damaged one, a
    /// key that does not unwrap). They stay v1.
    pub skipped: Vec<(String, String)>,
}

/// Rewrites every v1 file of the volume as a v2 file (docs/FORMAT.md), for
/// `kmsfs upgrade`: offline, under the cipher-dir lock. Each file is
/// converted in place (`EncryptedFile::upgrade_in_place`: same file ID and
/// wrapped key, so no KMS call beyond the unwrap), and its times are put
/// back. Files already v2 are skipped, and a conversion that was
/// interrupted is finished, so the next run completes an interrupted one.
pub fn upgrade_files(
    cipherdir: &Path,
    layout: Layout,
    volume_id: Id,
    names: &Names,
    provider: &dyn KeyProvider,
    mut progress: impl FnMut(Progress),
) -> Result<FilesReport, OpError> {
    let (files, _) = walk(cipherdir, names, false)?;
    let mut r = FilesReport::default();
    let mut p =
        Progress { files_total: files.len() as u64, bytes_total: sizes(&files).iter().sum(), ..Default::default() };
    for e in &files {
        let done = upgrade_one_file(cipherdir, layout, volume_id, provider, e, &mut r);
        if let Err(why) = done {
            r.skipped.push((e.plain.clone(), why));
        }
        p.files += 1;
        p.bytes += std::fs::symlink_metadata(&e.backing).map(|m| m.len()).unwrap_or(0);
        progress(p);
    }
    Ok(r)
}

fn upgrade_one_file(
    cipherdir: &Path,
    layout: Layout,
    volume_id: Id,
    provider: &dyn KeyProvider,
    e: &Entry,
    r: &mut FilesReport,
) -> Result<(), String> {
    let f = open_backing(cipherdir, e, false).map_err(|e| e.to_string())?;
    let md = f.metadata().map_err(|e| e.to_string())?;
    let enc = EncryptedFile::open(f, layout, volume_id).map_err(|e| e.to_string())?;
    if md.len() == 0 || (enc.is_v2() && !enc.state().converting()) {
        r.current += 1;
        return Ok(());
    }
    let (Some(h), Some(ctx)) = (enc.header(), enc.key_context()) else { return Err("no header".into()) };
    let key = provider.unwrap(&h.wrapped, &ctx).map_err(|e| e.to_string())?;
    // In place, as a first write would: the inode, its links, owner, mode
    // and xattrs stay; a crash leaves a file that reads (CONVERTING), and
    // the next run (or write) finishes it.
    let f = open_backing(cipherdir, e, true).map_err(|e| e.to_string())?;
    let mut enc = EncryptedFile::open(f, layout, volume_id).map_err(|e| e.to_string())?;
    match enc.is_v2() {
        true => enc.finish_conversion(&key),
        false => enc.upgrade_in_place(&key),
    }
    .and_then(|()| enc.sync(false))
    .map_err(|e| e.to_string())?;
    // The backing file's times are the plaintext file's: put them back.
    let times = md.accessed().and_then(|a| Ok(FileTimes::new().set_accessed(a).set_modified(md.modified()?)));
    times.and_then(|t| enc.backing().set_times(t)).map_err(|e| e.to_string())?;
    r.upgraded += 1;
    Ok(())
}
