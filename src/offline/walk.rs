//! The walk over a cipher dir: every regular file with its plaintext path,
//! through directory descriptors, never following a symlink.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Entry, OpError, io_err};
use crate::names::{DirKey, Names};
use crate::volume::CONFIG_NAME;

/// Problems with directories found while walking (encrypted names).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DirProblems {
    /// Directories whose ID could not be read, with the reason.
    pub bad_ids: Vec<(String, String)>,
    /// Directories whose missing ID copy was restored (with `repair`).
    pub repaired: Vec<String>,
    /// Entries whose names do not decrypt (hidden from the mount).
    pub undecryptable: Vec<String>,
    /// Directories whose ID record predates authenticated records (made by
    /// an older kmsfs): their ID can be copied to another directory
    /// undetected (docs/SECURITY.md).
    pub legacy_ids: Vec<String>,
}

/// A directory being walked: its descriptor, its path relative to the
/// cipher dir, its plaintext path and the key its children's names use
/// (`None` when its ID could not be read).
pub(super) struct WalkDir {
    pub(super) fd: OwnedFd,
    pub(super) rel: PathBuf,
    pub(super) plain: String,
    pub(super) key: Option<DirKey>,
}

/// Every regular file of a cipher dir with its plaintext path, skipping
/// kmsfs's own files. With `repair`, restores a missing directory-ID copy
/// (only from a copy that authenticates, see `names::dirid::load_dir_id`) and removes
/// what crashes leave behind. Directories are walked through descriptors,
/// never by path, and no symlink is followed.
pub fn walk(cipherdir: &Path, names: &Names, repair: bool) -> Result<(Vec<Entry>, DirProblems), OpError> {
    use crate::names::escape;
    let mut out = Vec::new();
    let mut problems = DirProblems::default();
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    let mut stack = vec![WalkDir { fd: root, rel: PathBuf::new(), plain: String::new(), key: Some(DirKey::ROOT) }];
    while let Some(d) = stack.pop() {
        let here = cipherdir.join(&d.rel);
        let mut entries: Vec<_> = std::fs::read_dir(crate::sys::proc_path(&d.fd))
            .map_err(io_err(&here))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&here))?;
        entries.sort_by_key(|e| e.file_name());
        let at_root = d.rel.as_os_str().is_empty();
        for e in entries {
            let raw = e.file_name();
            let nb = raw.as_bytes();
            let rel = d.rel.join(&raw);
            let where_ = escape(rel.as_os_str().as_bytes());
            // d_type, or an lstat through the directory's descriptor.
            let ft = e.file_type().map_err(io_err(&cipherdir.join(&rel)))?;
            if at_root && nb == CONFIG_NAME.as_bytes() {
                continue;
            }
            // kmsfs writes temporary entries only where names are its own:
            // anywhere with encrypted names, only at the root with plaintext
            // names (elsewhere such a name is the user's).
            if nb.starts_with(crate::sys::TMP_PREFIX.as_bytes()) && (names.encrypted() || at_root) {
                // Left by a crash: a directory whose mkdir was cut short
                // (never visible, holds at most its ID), or the temporary
                // file of a bookkeeping write (never the only copy).
                if ft.is_dir() {
                    // Only as much as an unfinished mkdir can hold: anything
                    // else in it (a directory renamed there by whoever owns
                    // this one) is never deleted.
                    let gone = repair && crate::names::dirid::remove_dir_with_id(d.fd.as_raw_fd(), &raw).is_ok();
                    if gone {
                        problems.repaired.push(format!("{where_} (unfinished mkdir removed)"));
                    } else if !repair {
                        problems.bad_ids.push((where_, "unfinished mkdir left by a crash (run fsck --repair)".into()));
                    } else {
                        problems
                            .bad_ids
                            .push((where_, "looks like an unfinished mkdir but holds entries: left as it is".into()));
                    }
                } else if repair && crate::sys::unlinkat(d.fd.as_raw_fd(), &raw, 0).is_ok() {
                    problems.repaired.push(format!("{where_} (leftover temporary file removed)"));
                }
                continue;
            }
            let plain_name = if names.encrypted() {
                let Some(encoded) = names.stored_name(d.fd.as_raw_fd(), &raw) else { continue };
                let encoded = encoded.ok();
                match (encoded, d.key) {
                    (Some(enc), Some(k)) => names.decrypt(&k, &enc).ok().map(|n| escape(n.as_bytes())),
                    _ => None,
                }
            } else if at_root && crate::names::is_reserved(nb) {
                continue;
            } else {
                Some(escape(nb))
            };
            let shown = match &plain_name {
                Some(n) => format!("{}/{n}", d.plain),
                None => {
                    problems.undecryptable.push(where_.clone());
                    format!("{}/?{where_}", d.plain)
                }
            };
            if ft.is_dir() {
                let fd = crate::sys::open_beneath(d.fd.as_raw_fd(), &raw, libc::O_PATH | libc::O_DIRECTORY, 0)
                    .map_err(io_err(&cipherdir.join(&rel)))?;
                let key = match d.key {
                    _ if !names.encrypted() => Some(DirKey::ROOT),
                    // Its record can only be checked under its parent's ID.
                    None => None,
                    Some(pk) => match crate::names::dirid::load_dir_id(&fd, &pk.id, names, repair) {
                        Ok(l) => {
                            if l.repaired.is_some() {
                                problems.repaired.push(shown.clone());
                            } else if !l.complete {
                                let why = if repair {
                                    "one copy of the directory ID is missing or damaged, and nothing vouches for \
                                     the other (legacy ID, no entry decrypts under it)"
                                } else {
                                    "one copy of the directory ID is missing or damaged (run fsck --repair)"
                                };
                                problems.bad_ids.push((shown.clone(), why.into()));
                            }
                            if !l.key.bound {
                                problems.legacy_ids.push(shown.clone());
                            }
                            Some(l.key)
                        }
                        Err(err) => {
                            problems.bad_ids.push((shown.clone(), err.to_string()));
                            None
                        }
                    },
                };
                stack.push(WalkDir { fd, rel, plain: shown, key });
            } else if ft.is_file() {
                out.push(Entry { backing: cipherdir.join(&rel), rel, plain: shown });
            }
        }
    }
    out.sort_by(|a, b| a.plain.cmp(&b.plain));
    Ok((out, problems))
}
