//! Directory IDs on disk: the two copies (xattr and `.kmsfs.dirid` file) of
//! a directory's ID record, how they are read, checked, repaired and removed.
//!
//! Used by the mount (`fs`) and the offline tools (`offline`) alike, so neither
//! needs the other.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use super::{DirKey, DirRecord, Names};
use crate::format::Id;
use crate::sys;

/// A directory's ID as [`load_dir_id`] found it.
#[derive(Debug, Clone)]
pub struct LoadedId {
    /// What the directory's children's names are bound to.
    pub key: DirKey,
    /// Both copies were present and valid as found.
    pub complete: bool,
    /// What was restored or rewritten, when something was.
    pub repaired: Option<String>,
}

/// One copy (xattr or file) of a directory-ID record, as read.
enum Copy {
    Missing,
    /// Present but unusable; `bound` if it claimed to be authenticated.
    Bad {
        bound: bool,
    },
    Good(DirKey, DirRecord),
}

fn judge(raw: Option<Vec<u8>>, parent: &Id, names: &Names) -> Copy {
    let Some(raw) = raw else { return Copy::Missing };
    match DirRecord::parse(&raw) {
        None => Copy::Bad { bound: raw.first() == Some(&super::DIRID_V2) && raw.len() > 16 },
        Some(rec) => match names.check_dir_record(&rec, parent) {
            Some(key) => Copy::Good(key, rec),
            None => Copy::Bad { bound: true },
        },
    }
}

/// The raw bytes of a directory's ID file, read without following links or
/// opening anything but a small regular file (`None`: no such file).
fn read_id_file(dir: &OwnedFd) -> std::io::Result<Option<Vec<u8>>> {
    match sys::read_regular(dir.as_raw_fd(), OsStr::new(super::DIRID_FILE), super::DIRID_MAX) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether some entry of the directory has a name that decrypts under `key`
/// (what vouches for an unauthenticated legacy ID before it is copied).
fn an_entry_decrypts(dir: &OwnedFd, key: &DirKey, names: &Names) -> bool {
    let Ok(rd) = std::fs::read_dir(sys::proc_path(dir)) else { return false };
    for e in rd.take(256).flatten() {
        let raw = e.file_name();
        let Some(encoded) = names.stored_name(dir.as_raw_fd(), &raw) else { continue };
        let encoded = encoded.ok();
        if encoded.is_some_and(|b| names.decrypt(key, &b).is_ok()) {
            return true;
        }
    }
    false
}

/// Runs `f`, then puts the directory's modification time back: rewriting
/// its bookkeeping file is not a change the user made.
fn keeping_mtime<T>(dir: &OwnedFd, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    let before = sys::fstat(dir.as_raw_fd());
    let r = f();
    if let Ok(st) = before {
        let times = [
            libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            libc::timespec { tv_sec: st.st_mtime, tv_nsec: st.st_mtime_nsec },
        ];
        let _ = sys::utimens(libc::AT_FDCWD, sys::proc_path(dir).as_os_str(), &times, false);
    }
    r
}

/// Writes a directory-ID record (for a repair or a move) to the xattr
/// copy, the file copy or both, keeping the directory's mtime. Returns
/// whether the xattr copy was written: a filesystem without user xattrs
/// (NFS) keeps the file copy alone, quietly.
pub(crate) fn rewrite_dir_id(dir: &OwnedFd, record: &[u8], xattr: bool, file: bool) -> std::io::Result<bool> {
    keeping_mtime(dir, || {
        let mut wrote_xattr = false;
        if xattr {
            match sys::xattr::set(dir, OsStr::new(super::DIRID_XATTR), record, 0) {
                Ok(()) => wrote_xattr = true,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) if !file => return Err(e),
                Err(e) => tracing::warn!("cannot store directory ID xattr ({e}); relying on the ID file"),
            }
        }
        if file {
            write_dir_id_file(dir, record)?;
            sys::fsync_dir(dir)?;
        }
        Ok(wrote_xattr)
    })
}

/// Reads a directory's ID record (xattr and file copy) and checks it under
/// the directory's parent, whose ID is `parent`. An authenticated (v2)
/// record verifies only there, so an ID copied from a directory elsewhere,
/// or edited, is refused; a legacy 16-byte record (written before records
/// were authenticated) is taken as it is, and its children's names use the
/// legacy associated data, so it never unlocks an authenticated directory.
///
/// With `repair`, a copy that is missing or unusable is rewritten from the
/// other one, but only from an authenticated copy, or from a legacy one
/// under which an entry of the directory decrypts; a record still valid
/// under two parents (a move cut short) is trimmed to this one. Neither copy
/// is ever opened as anything but a small regular file, and a rewrite
/// replaces the file, never writes through what is there.
pub fn load_dir_id(dir: &OwnedFd, parent: &Id, names: &Names, repair: bool) -> std::io::Result<LoadedId> {
    let xattr = match sys::xattr::get(dir, OsStr::new(super::DIRID_XATTR), super::DIRID_MAX) {
        Ok(v) => Some(v),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => None,
        // Too big, or no xattrs on this filesystem: unusable, not missing.
        Err(e) if e.raw_os_error() == Some(libc::ERANGE) => Some(Vec::new()),
        Err(_) => None,
    };
    let file = read_id_file(dir).unwrap_or(Some(Vec::new()));
    let (x, f) = (judge(xattr, parent, names), judge(file, parent, names));
    let err = |m: &str| std::io::Error::other(m.to_string());
    let (key, rec, complete) = match (&x, &f) {
        (Copy::Good(a, r), Copy::Good(b, _)) if a == b => (*a, r.clone(), true),
        (Copy::Good(..), Copy::Good(..)) => {
            return Err(err("the xattr and file copies of the directory ID differ"));
        }
        (Copy::Good(k, r), other) | (other, Copy::Good(k, r)) => {
            if !k.bound && matches!(other, Copy::Bad { bound: true }) {
                return Err(err("one copy of the directory ID is authenticated and fails, the other is not"));
            }
            (*k, r.clone(), false)
        }
        (Copy::Missing, Copy::Missing) => return Err(err("both copies of the directory ID are missing")),
        _ => {
            return Err(err(
                "the directory ID does not authenticate under its parent (copied from another directory, or edited)",
            ));
        }
    };
    let trimmed = matches!(&rec, DirRecord::Bound { tags, .. } if tags.len() > 1);
    let mut out = LoadedId { key, complete: complete && !trimmed, repaired: None };
    if !repair || out.complete {
        return Ok(out);
    }
    if !key.bound && !an_entry_decrypts(dir, &key, names) {
        // An unauthenticated ID nothing vouches for: use it, copy it nowhere.
        return Ok(out);
    }
    let record = if key.bound { names.dir_record(&key.id, &[parent]) } else { key.id.to_vec() };
    let (fix_x, fix_f) = (trimmed || !matches!(x, Copy::Good(..)), trimmed || !matches!(f, Copy::Good(..)));
    match rewrite_dir_id(dir, &record, fix_x, fix_f) {
        Ok(wrote_xattr) => {
            out.repaired = if trimmed && complete {
                Some("record of an interrupted move trimmed to its parent".into())
            } else if fix_f {
                Some("file copy restored from the xattr copy".into())
            } else if wrote_xattr {
                Some("xattr copy restored from the file copy".into())
            } else {
                None // no xattrs here: the file copy is all there is
            };
        }
        Err(e) => tracing::warn!("cannot restore a directory ID copy: {e}"),
    }
    Ok(out)
}

fn write_dir_id_file(dir: &OwnedFd, record: &[u8]) -> std::io::Result<()> {
    sys::replace_file(dir.as_raw_fd(), OsStr::new(super::DIRID_FILE), record, 0o444)
}

/// Writes both copies of a directory's ID record, durably.
pub fn store_dir_id(dir: &OwnedFd, record: &[u8]) -> std::io::Result<()> {
    // tmpfs and most local filesystems keep user xattrs; if this one does
    // not, the file copy alone still works (fsck reports it).
    if let Err(e) = sys::xattr::set(dir, OsStr::new(super::DIRID_XATTR), record, 0) {
        tracing::warn!("cannot store directory ID xattr ({e}); relying on the ID file");
    }
    write_dir_id_file(dir, record)?;
    sys::fsync_dir(dir)
}

/// Deletes the bookkeeping entries of encrypted-names directory `d` except
/// its ID file, after checking that it holds nothing else: any other entry,
/// even one that does not decrypt (the mount hides it), gives ENOTEMPTY and
/// nothing is deleted. `depth` bounds the descent into unfinished mkdirs,
/// which hold at most their own ID file.
fn clear_bookkeeping(d: &OwnedFd, depth: u32) -> std::io::Result<()> {
    let not_empty = || std::io::Error::from_raw_os_error(libc::ENOTEMPTY);
    let (mut files, mut dirs) = (Vec::new(), Vec::new());
    for e in std::fs::read_dir(sys::proc_path(d))? {
        let e = e?;
        let name = e.file_name();
        if name == super::DIRID_FILE {
            continue;
        }
        if !super::is_bookkeeping(name.as_bytes()) {
            return Err(not_empty());
        }
        if !e.file_type()?.is_dir() {
            files.push(name);
        } else if depth > 0 && name.as_bytes().starts_with(super::TMP_PREFIX.as_bytes()) {
            dirs.push(name);
        } else {
            return Err(not_empty());
        }
    }
    for name in dirs {
        remove_dir_at(d.as_raw_fd(), &name, depth - 1)?;
    }
    for name in files {
        sys::unlinkat(d.as_raw_fd(), &name, 0)?;
    }
    Ok(())
}

/// Removes an encrypted-names directory that holds only bookkeeping files:
/// the others first, then its ID file (the xattr copy stays with the
/// directory until it is gone, so a crash in between leaves a directory
/// that still has its ID), then the directory. The ID file comes back if
/// the last step fails.
pub fn remove_dir_with_id(parent: std::os::fd::RawFd, name: &OsStr) -> std::io::Result<()> {
    remove_dir_at(parent, name, 1)
}

fn remove_dir_at(parent: std::os::fd::RawFd, name: &OsStr, depth: u32) -> std::io::Result<()> {
    let d = sys::open_beneath(parent, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let id = read_id_file(&d).ok().flatten();
    clear_bookkeeping(&d, depth)?;
    let _ = sys::unlinkat(d.as_raw_fd(), OsStr::new(super::DIRID_FILE), 0);
    if let Err(e) = sys::unlinkat(parent, name, libc::AT_REMOVEDIR) {
        if let Some(id) = id {
            let _ = write_dir_id_file(&d, &id);
        }
        return Err(e);
    }
    Ok(())
}

/// Renames directory `from` over directory `to` that holds only bookkeeping
/// files (POSIX lets a rename replace an empty directory; the backing one
/// is not empty because of its ID file). The target is cleared as in
/// `remove_dir_with_id`, then one atomic rename replaces it: the source is
/// never touched before that, and a crash in between leaves the target with
/// its xattr ID copy. The target's ID file comes back if the rename fails.
pub(crate) fn replace_empty_dir(
    pfd: std::os::fd::RawFd,
    from: &OsStr,
    qfd: std::os::fd::RawFd,
    to: &OsStr,
) -> std::io::Result<()> {
    let t = sys::open_beneath(qfd, to, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let id = read_id_file(&t).ok().flatten();
    clear_bookkeeping(&t, 1)?;
    let _ = sys::unlinkat(t.as_raw_fd(), OsStr::new(super::DIRID_FILE), 0);
    if let Err(e) = sys::renameat2(pfd, from, qfd, to, 0) {
        if let Some(id) = id {
            let _ = write_dir_id_file(&t, &id);
        }
        return Err(e);
    }
    Ok(())
}
