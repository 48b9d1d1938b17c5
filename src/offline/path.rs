//! `kmsfs path`: a plaintext path to its backing path, and back.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{OpError, io_err};
use crate::names::{DirKey, Names};

/// The key the children of directory `fd` use, given its parent's.
fn child_key(fd: &OwnedFd, parent: &DirKey, names: &Names, shown: &Path) -> Result<DirKey, OpError> {
    if !names.encrypted() {
        return Ok(DirKey::ROOT);
    }
    crate::names::dirid::load_dir_id(fd, &parent.id, names, false).map(|l| l.key).map_err(io_err(shown))
}

/// Maps a plaintext path (relative to the mount root) to its backing path.
pub fn plain_to_backing(cipherdir: &Path, plain: &Path, names: &Names) -> Result<PathBuf, OpError> {
    let mut fd = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    let mut cur = cipherdir.to_path_buf();
    let mut key = DirKey::ROOT;
    let parts: Vec<_> = plain
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for (i, name) in parts.iter().enumerate() {
        let s = names
            .encrypt(&key, name)
            .map_err(|e| OpError::Corrupt { path: plain.display().to_string(), detail: e.to_string() })?;
        cur.push(&s.on_disk);
        if i + 1 < parts.len() {
            fd = crate::sys::open_beneath(fd.as_raw_fd(), &s.on_disk, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err(&cur))?;
            key = child_key(&fd, &key, names, &cur)?;
        }
    }
    Ok(cur)
}

/// Maps a backing path (relative to the cipher dir) to its plaintext path.
pub fn backing_to_plain(cipherdir: &Path, backing: &Path, names: &Names) -> Result<PathBuf, OpError> {
    let rel = backing.strip_prefix(cipherdir).unwrap_or(backing);
    let mut fd = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    let mut cur = cipherdir.to_path_buf();
    let mut out = PathBuf::from("/");
    let mut key = DirKey::ROOT;
    let parts: Vec<_> = rel
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    for (i, raw) in parts.iter().enumerate() {
        // A reserved name is taken as it is and fails to decrypt below.
        let encoded = names
            .stored_name(fd.as_raw_fd(), raw)
            .unwrap_or_else(|| Ok(raw.as_encoded_bytes().to_vec()))
            .map_err(io_err(&cur.join(raw)))?;
        let name = names.decrypt(&key, &encoded).map_err(|e| OpError::Corrupt {
            path: crate::names::escape(cur.join(raw).as_os_str().as_bytes()),
            detail: e.to_string(),
        })?;
        out.push(name);
        cur.push(raw);
        if i + 1 < parts.len() {
            fd = crate::sys::open_beneath(fd.as_raw_fd(), raw, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err(&cur))?;
            key = child_key(&fd, &key, names, &cur)?;
        }
    }
    Ok(out)
}
