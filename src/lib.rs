//! kmsfs: an encrypted FUSE filesystem with KMS envelope encryption.
//!
//! The core (`format`, `keys`, `file`, `fs`) is free of FUSE so unit tests can
//! drive it without mounting; `fuse` is the thin adapter.
#![deny(missing_docs)]
// Unsafe code lives only in the modules marked `allow(unsafe_code)` below
// (and format::data_key); each block states the invariant that makes it sound.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod daemon;
pub mod error;
pub mod file;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod keys;
pub mod mount;
pub mod names;
pub mod offline;
#[allow(unsafe_code)]
pub mod sys;
pub mod trust;
pub mod volume;
