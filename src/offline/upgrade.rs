//! Legacy (unauthenticated) directory-ID records upgraded to authenticated
//! ones, for `kmsfs upgrade`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::walk::WalkDir;
use super::{OpError, io_err};
use crate::names::{DirKey, EntryKind, Names};

/// What [`upgrade_dir_ids`] did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UpgradeReport {
    /// Directories whose legacy ID record became an authenticated one.
    pub upgraded: Vec<String>,
    /// Entries renamed to names under the authenticated label.
    pub renamed: u64,
    /// Directories left as they were, with the reason (an unreadable ID,
    /// or entries whose names decrypt under neither label).
    pub skipped: Vec<(String, String)>,
}

/// Gives every directory that still has a legacy (unauthenticated, 16-byte)
/// ID record an authenticated one: renames its entries to their names under
/// the "name2" label, then writes the new record bound to its parent's ID.
/// For `kmsfs upgrade`: offline, under the cipher-dir lock, on a host the
/// user trusts, since the legacy IDs found are taken as they are. An
/// interrupted run leaves a directory's already renamed entries hidden until
/// the next run, which recognises them and finishes.
pub fn upgrade_dir_ids(cipherdir: &Path, names: &Names) -> Result<UpgradeReport, OpError> {
    use crate::names::escape;
    let mut r = UpgradeReport::default();
    if !names.encrypted() {
        return Ok(r);
    }
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    // Each directory with its parent's ID, which its record is bound to.
    let root = WalkDir { fd: root, rel: PathBuf::new(), plain: String::new(), key: Some(DirKey::ROOT) };
    let mut stack = vec![(root, crate::names::ROOT_DIR_ID)];
    while let Some((mut d, parent)) = stack.pop() {
        let here = cipherdir.join(&d.rel);
        let Some(key) = d.key else { continue };
        let at_root = d.rel.as_os_str().is_empty();
        if !at_root && !key.bound {
            match upgrade_one(&d.fd, &key, &parent, names) {
                Ok(n) => {
                    r.renamed += n;
                    r.upgraded.push(d.plain.clone());
                    d.key = Some(DirKey { id: key.id, bound: true });
                }
                Err(e) => {
                    r.skipped.push((d.plain.clone(), e.to_string()));
                    continue;
                }
            }
        }
        let Some(key) = d.key else { continue };
        let entries: Vec<_> = std::fs::read_dir(crate::sys::proc_path(&d.fd))
            .map_err(io_err(&here))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&here))?;
        for e in entries {
            let raw = e.file_name();
            if !e.file_type().map_err(io_err(&here.join(&raw)))?.is_dir() || names.classify(&raw) == EntryKind::Internal
            {
                continue;
            }
            let Some(plain) = entry_name(&d.fd, &raw, &key, names) else { continue };
            let fd = crate::sys::open_beneath(d.fd.as_raw_fd(), &raw, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err(&here.join(&raw)))?;
            let shown = format!("{}/{}", d.plain, escape(plain.as_bytes()));
            let child = match crate::names::dirid::load_dir_id(&fd, &key.id, names, false) {
                Ok(l) => Some(l.key),
                Err(err) => {
                    r.skipped.push((shown.clone(), err.to_string()));
                    None
                }
            };
            stack.push((WalkDir { fd, rel: d.rel.join(&raw), plain: shown, key: child }, key.id));
        }
    }
    Ok(r)
}

/// The plaintext name of entry `raw` of a directory, under `key`.
fn entry_name(dir: &OwnedFd, raw: &std::ffi::OsStr, key: &DirKey, names: &Names) -> Option<std::ffi::OsString> {
    let encoded = names.stored_name(dir.as_raw_fd(), raw)?.ok()?;
    names.decrypt(key, &encoded).ok()
}

/// Renames the entries of one legacy directory to their authenticated-label
/// names (a long name's new side file first, its old one last), then writes
/// its authenticated record. Returns how many entries were renamed.
fn upgrade_one(dir: &OwnedFd, legacy: &DirKey, parent: &crate::format::Id, names: &Names) -> std::io::Result<u64> {
    let bound = DirKey { id: legacy.id, bound: true };
    let fd = dir.as_raw_fd();
    let mut renamed = 0;
    for e in std::fs::read_dir(crate::sys::proc_path(dir))? {
        let raw = e?.file_name();
        if names.classify(&raw) == EntryKind::Internal || entry_name(dir, &raw, &bound, names).is_some() {
            continue; // bookkeeping, or renamed by an interrupted run
        }
        let Some(plain) = entry_name(dir, &raw, legacy, names) else {
            return Err(std::io::Error::other(format!(
                "entry {} decrypts under neither label; left as it is",
                crate::names::escape(raw.as_bytes())
            )));
        };
        let new = names.encrypt(&bound, &plain).map_err(std::io::Error::other)?;
        if let (Some(side), Some(full)) = (new.side_file(), &new.long) {
            crate::sys::replace_file(fd, &side, full.as_bytes(), 0o644)?;
            crate::sys::fsync_dir(dir)?;
        }
        crate::sys::renameat2(fd, &raw, fd, &new.on_disk, libc::RENAME_NOREPLACE)?;
        if names.classify(&raw) == EntryKind::Long {
            let _ = crate::sys::unlinkat(fd, &crate::names::side_file_of(&raw), 0);
        }
        renamed += 1;
    }
    crate::sys::fsync_dir(dir)?;
    crate::names::dirid::store_dir_id(dir, &names.dir_record(&bound.id, &[parent]))?;
    Ok(renamed)
}
