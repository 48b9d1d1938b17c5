//! Mounting a volume: mount options ([`options`]), mountpoint checks and
//! unmount ([`point`]), the background daemon's start ([`spawn`]), the
//! daemon that serves the mount and stops it without losing an
//! acknowledged write ([`serve`]), and a mount's live statistics
//! ([`stats`]). The command line parses arguments, calls these and prints.

pub mod options;
pub mod point;
pub mod serve;
pub mod spawn;
pub mod stats;

pub use options::{MountPlan, parse_options};
pub use point::{Unmounted, check_mountpoint, is_dead_mount, is_mounted, resolve_mountpoint, unmount};
pub use serve::{ServeOptions, serve};
pub use spawn::{in_daemon_child, spawn_daemon, take_piped_key};

use crate::keys::KeyError;
use crate::volume::VolumeError;

/// Errors of mounting, serving and unmounting. Each variant is one class
/// of failure, which the command line maps to its exit code.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A bad mount option.
    #[error("{0}")]
    Usage(String),
    /// The mountpoint, the mount or the unmount failed.
    #[error("{0}")]
    Mount(String),
    /// The volume config is missing or invalid.
    #[error("{0}")]
    Config(String),
    /// Opening or locking the volume failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The key provider failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Anything else (a pipe, the executable's path).
    #[error("{0}")]
    Other(String),
    /// The background daemon failed; `code` is the exit code it reported
    /// (`None` if it reported none).
    #[error("{msg}")]
    Daemon {
        /// The daemon's own exit code.
        code: Option<u8>,
        /// Its message.
        msg: String,
    },
}
