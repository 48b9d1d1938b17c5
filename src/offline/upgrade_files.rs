//! `kmsfs upgrade`, file contents: every format v1 file rewritten as v2.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
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
/// converted into a temporary file beside it (same file ID and wrapped key,
/// so no new KMS key), given the old file's mode, owner, xattrs and times,
/// fsynced, and renamed over it, so a crash leaves the old file or the new
/// one (and a temporary file that `fsck --repair` removes). A file with
/// more than one hard link is rewritten in place instead
/// (`EncryptedFile::upgrade_in_place`), since a rename would split the
/// link. Files already v2 are skipped, and a conversion in place that was
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
    if enc.is_v2() {
        // An interrupted conversion in place: finish it.
        let (Some(h), Some(ctx)) = (enc.header(), enc.key_context()) else { return Err("no header".into()) };
        let key = provider.unwrap(&h.wrapped, &ctx).map_err(|e| e.to_string())?;
        let f = open_backing(cipherdir, e, true).map_err(|e| e.to_string())?;
        let mut enc = EncryptedFile::open(f, layout, volume_id).map_err(|e| e.to_string())?;
        enc.finish_conversion(&key).map_err(|e| e.to_string())?;
        r.upgraded += 1;
        return Ok(());
    }
    let (Some(h), Some(ctx)) = (enc.header(), enc.key_context()) else { return Err("no header".into()) };
    let key = provider.unwrap(&h.wrapped, &ctx).map_err(|e| e.to_string())?;
    if md.nlink() > 1 {
        // A rename would split the link: rewrite the one inode in place
        // (a crash leaves it readable; the next run finishes it).
        let f = open_backing(cipherdir, e, true).map_err(|e| e.to_string())?;
        let mut enc = EncryptedFile::open(f, layout, volume_id).map_err(|e| e.to_string())?;
        enc.upgrade_in_place(&key).map_err(|e| e.to_string())?;
        enc.sync(false).map_err(|e| e.to_string())?;
        r.upgraded += 1;
        return Ok(());
    }
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|e| e.to_string())?;
    let parent = e.rel.parent().filter(|p| !p.as_os_str().is_empty()).map(|p| p.as_os_str()).unwrap_or(".".as_ref());
    let dir = crate::sys::open_beneath(root.as_raw_fd(), parent, libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(|e| e.to_string())?;
    let name = e.rel.file_name().ok_or("no name")?;
    let tmp = crate::sys::temp_name().map_err(|e| e.to_string())?;
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let out = crate::sys::openat(dir.as_raw_fd(), &tmp, flags, 0o600).map_err(|e| e.to_string())?;
    let undo = |why: String| {
        let _ = crate::sys::unlinkat(dir.as_raw_fd(), &tmp, 0);
        why
    };
    let copy = (|| -> Result<(), String> {
        // xattrs first (the owner ID and sealed values move as they are).
        let src: OwnedFd = open_backing(cipherdir, e, false).map_err(|e| e.to_string())?.into();
        let raw = crate::sys::xattr::list(&src).map_err(|e| e.to_string())?;
        for n in raw.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let n = std::ffi::OsStr::from_bytes(n);
            let v = crate::sys::xattr::get(&src, n, 0).map_err(|e| e.to_string())?;
            let v = crate::sys::xattr::get(&src, n, v.len().max(1)).map_err(|e| e.to_string())?;
            crate::sys::xattr::set(&out, n, &v, 0).map_err(|e| e.to_string())?;
        }
        let file: File = out.try_clone().map_err(|e| e.to_string())?.into();
        let conv = enc.convert_to_v2(&key, file, |_| {}).map_err(|e| e.to_string())?;
        drop(conv);
        crate::sys::chown(out.as_raw_fd(), md.uid(), md.gid()).map_err(|e| e.to_string())?;
        crate::sys::chmod(&out, md.mode() & 0o7777).map_err(|e| e.to_string())?;
        let times = [
            libc::timespec { tv_sec: md.atime(), tv_nsec: md.atime_nsec() },
            libc::timespec { tv_sec: md.mtime(), tv_nsec: md.mtime_nsec() },
        ];
        crate::sys::utimens(dir.as_raw_fd(), &tmp, &times, true).map_err(|e| e.to_string())?;
        File::from(out.try_clone().map_err(|e| e.to_string())?).sync_all().map_err(|e| e.to_string())?;
        // Still the file we converted? (Nothing else runs under the lock.)
        let now = crate::sys::statat(dir.as_raw_fd(), name).map_err(|e| e.to_string())?;
        if now.st_ino != md.ino() {
            return Err("replaced while upgrading".into());
        }
        crate::sys::renameat2(dir.as_raw_fd(), &tmp, dir.as_raw_fd(), name, 0).map_err(|e| e.to_string())?;
        crate::sys::fsync_dir(&dir).map_err(|e| e.to_string())
    })();
    copy.map_err(undo)?;
    r.upgraded += 1;
    Ok(())
}
