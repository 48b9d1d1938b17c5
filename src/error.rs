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
}
