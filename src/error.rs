//! The filesystem's error type and its one errno mapping.

use crate::file::FileError;
use crate::keys::KeyError;

/// An error from a filesystem operation.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// No such entry or inode.
    #[error("no such file or directory")]
    NotFound,
    /// Unknown file handle.
    #[error("bad file handle")]
    BadHandle,
    /// Data failed authentication or is missing; logged with path and block.
    #[error("integrity error in {path}: {detail}")]
    Integrity {
        /// Plaintext path, relative to the mount.
        path: String,
        /// What failed, with the block index where known.
        detail: String,
    },
    /// The key provider refused or failed.
    #[error("key provider: {0}")]
    Key(#[from] KeyError),
    /// Invalid argument from the caller.
    #[error("invalid argument")]
    Invalid,
    /// A name that kmsfs keeps for itself (the volume config).
    #[error("reserved name")]
    Reserved,
    /// Not supported by kmsfs.
    #[error("operation not supported")]
    Unsupported,
    /// The mount is read-only.
    #[error("read-only mount")]
    ReadOnly,
    /// File too large for the format.
    #[error("file too large")]
    TooLarge,
    /// An OS error from the backing directory, passed through.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FsError {
    /// The errno the kernel sees. Exhaustive on purpose: a new variant must
    /// decide its errno here.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound => libc::ENOENT,
            Self::BadHandle => libc::EBADF,
            Self::Integrity { .. } => libc::EIO,
            Self::Key(k) if k.is_denied() => libc::EACCES,
            Self::Key(_) => libc::EIO,
            Self::Invalid => libc::EINVAL,
            Self::Reserved => libc::EPERM,
            Self::Unsupported => libc::EOPNOTSUPP,
            Self::ReadOnly => libc::EROFS,
            Self::TooLarge => libc::EFBIG,
            Self::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// Whether this error deserves a log line above debug level: expected
    /// errors (ENOENT on lookup, EEXIST...) would drown the log.
    pub fn is_notable(&self) -> bool {
        match self {
            Self::Integrity { .. } | Self::Key(_) | Self::TooLarge => true,
            Self::Io(e) => matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::ENOSPC) | None),
            Self::NotFound | Self::BadHandle | Self::Invalid | Self::Reserved | Self::Unsupported | Self::ReadOnly => {
                false
            }
        }
    }

    /// Converts a file-layer error, naming the file for integrity failures.
    pub fn from_file(e: FileError, path: impl FnOnce() -> String) -> Self {
        match e {
            FileError::Io(e) => Self::Io(e),
            FileError::TooLarge => Self::TooLarge,
            FileError::NeedKey | FileError::Random => Self::Io(std::io::Error::from_raw_os_error(libc::EIO)),
            other => Self::Integrity { path: path(), detail: other.to_string() },
        }
    }
}

/// How long one integrity log line stands for the same file and error.
pub const INTEGRITY_LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// Rate limit and naming for integrity log lines. The kernel retries a
/// failed read (readahead, then the page alone), so one read(2) of a bad
/// block reaches kmsfs 3-6 times: one line per file and error per window
/// (`INTEGRITY_LOG_WINDOW`) says it all, and the next line counts the ones
/// left out. The line names the absolute plaintext path once the mountpoint
/// is known.
#[derive(Default)]
pub struct IntegrityLog {
    mountpoint: std::sync::OnceLock<std::path::PathBuf>,
    recent: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
    total: std::sync::atomic::AtomicU64,
}

impl IntegrityLog {
    /// Where the plaintext is mounted, for absolute paths in the log.
    pub fn set_mountpoint(&self, mnt: &std::path::Path) {
        let _ = self.mountpoint.set(std::path::absolute(mnt).unwrap_or_else(|_| mnt.to_path_buf()));
    }

    /// Logs `detail` for the file at `path` (relative to the mount root),
    /// unless the same line went out within the window.
    pub fn log(&self, path: &str, detail: &str) {
        self.total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::Instant::now();
        let key = format!("{path}\0{detail}");
        let left_out = {
            let Ok(mut m) = self.recent.lock() else { return };
            if m.len() > 4096 {
                m.retain(|_, (t, _)| now.duration_since(*t) < INTEGRITY_LOG_WINDOW);
            }
            match m.get_mut(&key) {
                Some((t, n)) if now.duration_since(*t) < INTEGRITY_LOG_WINDOW => {
                    *n += 1;
                    return;
                }
                Some((t, n)) => {
                    let left_out = *n;
                    (*t, *n) = (now, 0);
                    left_out
                }
                None => {
                    m.insert(key, (now, 0));
                    0
                }
            }
        };
        let shown = match self.mountpoint.get() {
            Some(m) => m.join(path.trim_start_matches('/')).display().to_string(),
            None => path.to_string(),
        };
        if left_out > 0 {
            tracing::error!(path = %shown, "integrity error: {detail} ({left_out} more like it not logged)");
        } else {
            tracing::error!(path = %shown, "integrity error: {detail}");
        }
    }

    /// Integrity errors so far, logged or not (for `kmsfs stats`).
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a line for this file and error would be left out now.
    #[cfg(test)]
    fn quiet(&self, path: &str, detail: &str) -> bool {
        self.recent.lock().is_ok_and(|m| m.get(&format!("{path}\0{detail}")).is_some_and(|(_, n)| *n > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(FsError::Integrity { path: "a".into(), detail: "b".into() }.errno(), libc::EIO);
        assert_eq!(FsError::Key(KeyError::Disabled { key: "k".into() }).errno(), libc::EACCES);
        assert_eq!(FsError::Key(KeyError::Unavailable("down".into())).errno(), libc::EIO);
        assert_eq!(FsError::Io(std::io::Error::from_raw_os_error(libc::EEXIST)).errno(), libc::EEXIST);
    }

    #[test]
    fn integrity_log_is_rate_limited_per_file_and_error() {
        let l = IntegrityLog::default();
        l.set_mountpoint(std::path::Path::new("/mnt/p"));
        l.log("/a", "block 1: authentication failed");
        assert!(!l.quiet("/a", "block 1: authentication failed"));
        l.log("/a", "block 1: authentication failed");
        assert!(l.quiet("/a", "block 1: authentication failed"));
        l.log("/a", "block 2: authentication failed");
        assert!(!l.quiet("/a", "block 2: authentication failed"));
    }
}
