//! Offline volume operations: encrypt, decrypt, inspect, fsck and rewrap.
//! No FUSE here (nothing from `fs`, `fuse` or `daemon`): the CLI calls
//! these and prints their results.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::keys::KeyError;

mod admin;
mod fsck;
mod info;
mod path;
mod rekey;
mod rewrap;
mod stream;
mod upgrade;
mod upgrade_files;
mod walk;

pub use admin::{
    AdminError, InitOptions, Locked, NewVolume, init_finish, init_prepare, layout_of, legacy_error, load, open_locked,
};
pub use fsck::{Damage, FsckReport, Repaired, fsck};
pub use info::{VolumeInfo, describe};
pub use path::{backing_to_plain, plain_to_backing};
pub use rekey::{BranchRekeyed, Rekey, branch_request, rekey_branch, rekey_finish, rekey_prepare, rotate_branch};
pub use rewrap::{RewrapReport, rewrap, rewrap_plan};
pub use stream::{decrypt_stream, encrypt_stream, inspect, peek_header};
pub use upgrade::{
    LegacyUpgrade, UpgradeReport, UpgradeStart, upgrade_authenticate, upgrade_contents, upgrade_dir_ids, upgrade_dirs,
    upgrade_start,
};
pub use upgrade_files::{FilesReport, upgrade_files};
pub use walk::{DirProblems, walk};

/// Errors of offline operations.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// I/O on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is damaged or not a kmsfs file.
    #[error("{path}: {detail}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A key provider error.
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> OpError + '_ {
    // Backing names come from the cipher dir: escaped before they are printed.
    move |source| OpError::Io { path: crate::names::escape(path.as_os_str().as_bytes()), source }
}

/// A backing file and the plaintext path it shows up as.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path in the cipher dir.
    pub backing: PathBuf,
    /// The same path relative to the cipher dir (see [`open_backing`]).
    pub rel: PathBuf,
    /// Plaintext path relative to the mount root, escaped for printing.
    pub plain: String,
}

/// Opens a walked file again, resolving its path from the cipher dir
/// without following a symlink in any component, so a directory swapped
/// for a link while a long fsck or rewrap runs cannot send it outside the
/// cipher dir; and only if it is still a regular file.
pub fn open_backing(cipherdir: &Path, e: &Entry, write: bool) -> std::io::Result<File> {
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let p = crate::sys::open_beneath(root.as_raw_fd(), e.rel.as_os_str(), libc::O_PATH, 0)?;
    if crate::sys::fstat(p.as_raw_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
    Ok(File::from(crate::sys::reopen(&p, mode)?))
}

/// How many files the offline tools (fsck, rewrap) work on at once. Each
/// holds at most one key-provider call in flight, so this is also the bound
/// on concurrent KMS calls: with ~10-50 ms per call, one call at a time
/// made 2,000 aws-kms files take 92 s to check.
pub const PARALLEL_FILES: usize = 16;

/// Progress of an offline pass over a volume.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Files done.
    pub files: u64,
    /// Files in all.
    pub files_total: u64,
    /// Backing bytes of the files done.
    pub bytes: u64,
    /// Backing bytes in all.
    pub bytes_total: u64,
}

/// Runs `work` on every item, `PARALLEL_FILES` at a time on scoped threads
/// (providers are blocking and `Sync`), and returns the results in the
/// items' order, so reports do not depend on timing. `done` runs on the
/// calling thread as each item finishes, with the item's index.
pub(crate) fn par_map<T: Sync, R: Send>(
    items: &[T],
    work: impl Fn(&T) -> R + Sync,
    mut done: impl FnMut(usize, &R),
) -> Vec<R> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let mut out: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut workers = 0;
        for n in 0..PARALLEL_FILES.min(items.len()) {
            let (tx, next, work) = (tx.clone(), &next, &work);
            let spawned = std::thread::Builder::new().name(format!("kmsfs-ops-{n}")).spawn_scoped(s, move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    if tx.send((i, work(item))).is_err() {
                        break;
                    }
                }
            });
            if spawned.is_ok() {
                workers += 1;
            }
        }
        drop(tx);
        for (i, r) in rx {
            done(i, &r);
            out[i] = Some(r);
        }
        // No thread could start: do the work here, one file at a time.
        if workers == 0 {
            for (i, item) in items.iter().enumerate() {
                let r = work(item);
                done(i, &r);
                out[i] = Some(r);
            }
        }
    });
    out.into_iter().flatten().collect()
}

/// The backing sizes of `files` (0 where a stat fails), for progress.
fn sizes(files: &[Entry]) -> Vec<u64> {
    files.iter().map(|e| std::fs::symlink_metadata(&e.backing).map_or(0, |m| m.len())).collect()
}
