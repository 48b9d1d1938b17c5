//! Exit codes (stable; documented in README.md, `--help` and the man page).
//! Every command, in the foreground and through the background mount's
//! ready pipe, takes its code from the one `Code` mapping below.

use kmsfs::mount::MountError;
use kmsfs::offline::AdminError;

/// Any other error (I/O on an input or output file, a failed rename...).
pub const ERROR: u8 = 1;
/// Bad command line or options.
pub const USAGE: u8 = 2;
/// The volume config is missing, invalid, untrusted or not a volume;
/// an input that is not a kmsfs file at all.
pub const VOLUME: u8 = 3;
/// The key provider: key file missing or loose, wrong key, KMS key
/// disabled or denied, no credentials, no region.
pub const KEY: u8 = 4;
/// Mounting or unmounting: busy, already mounted, bad mountpoint.
pub const MOUNT: u8 = 5;
/// Damaged data: a kmsfs file or block that fails authentication.
pub const DAMAGED: u8 = 6;

/// The one mapping from an error kind to its exit code.
pub trait Code: std::fmt::Display {
    fn exit_code(&self) -> u8;
}

impl Code for kmsfs::keys::KeyError {
    fn exit_code(&self) -> u8 {
        KEY
    }
}

impl Code for kmsfs::volume::VolumeError {
    fn exit_code(&self) -> u8 {
        use kmsfs::volume::VolumeError as V;
        match self {
            V::Key(_) => KEY,
            V::Busy(_) => MOUNT,
            _ => VOLUME,
        }
    }
}

impl Code for kmsfs::offline::OpError {
    fn exit_code(&self) -> u8 {
        use kmsfs::offline::OpError as O;
        match self {
            O::Key(_) => KEY,
            O::Io { .. } => ERROR,
            O::Corrupt { .. } => DAMAGED,
        }
    }
}

/// A bare I/O error on a path the user named.
impl Code for std::io::Error {
    fn exit_code(&self) -> u8 {
        ERROR
    }
}

/// Exit codes with what they mean, for `--help` and the man page.
pub const TABLE: &str = "Exit codes:
  0  success
  1  other error (I/O on an input or output file)
  2  usage: bad command line or mount option
  3  volume: config missing, invalid or untrusted; input not a kmsfs file
  4  key provider: key file missing or too open, wrong key, KMS key disabled
     or denied, no credentials, no region, unknown profile
  5  mount: already mounted, dead mount, mountpoint not empty or inside the
     cipher dir, busy, cannot unmount
  6  damaged data: a kmsfs file or block fails authentication (fsck: damage found)";

impl Code for MountError {
    fn exit_code(&self) -> u8 {
        match self {
            MountError::Usage(_) => USAGE,
            MountError::Mount(_) => MOUNT,
            MountError::Config(_) => VOLUME,
            MountError::Volume(e) => e.exit_code(),
            MountError::Key(e) => e.exit_code(),
            MountError::Other(_) => ERROR,
            MountError::Daemon { code, .. } => code.unwrap_or(MOUNT),
        }
    }
}

impl Code for AdminError {
    fn exit_code(&self) -> u8 {
        match self {
            AdminError::Usage(_) => USAGE,
            AdminError::Config(_) => VOLUME,
            AdminError::KeyFailed(_) => KEY,
            AdminError::Other(_) => ERROR,
            AdminError::Volume(e) => e.exit_code(),
            AdminError::Key(e) => e.exit_code(),
            AdminError::Op(e) => e.exit_code(),
        }
    }
}
