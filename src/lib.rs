//! kmsfs: an encrypted FUSE filesystem with KMS envelope encryption.
//!
//! The core (`format`, `keys`, `file`, `fs`) is free of FUSE so unit tests can
//! drive it without mounting; `fuse` is the thin adapter.
#![deny(missing_docs)]

pub mod daemon;
pub mod error;
pub mod file;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod keys;
pub mod names;
pub mod ops;
pub mod sys;
pub mod trust;
pub mod volume;
