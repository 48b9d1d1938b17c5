//! Name encryption: AES-SIV (RFC 5297) under a per-volume name key, with the
//! parent directory's random ID as associated data, encoded base64url
//! without padding. Deterministic, so lookups need no directory scan; the
//! directory ID makes the same name encrypt differently in two directories.
//!
//! Encrypted names longer than 255 bytes are stored as `L.<hash>` with the
//! full encrypted name in a side file `L.<hash>.name` (as gocryptfs does).
//! Symlink targets and user xattr values are sealed with the same key under
//! their own associated data.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use zeroize::Zeroizing;

use crate::format::Id;

/// Longest name most filesystems store.
pub const NAME_MAX: usize = 255;
/// Prefix of hashed long names (contains '.', which base64url never does).
pub const LONG_PREFIX: &str = "L.";
/// Suffix of a long name's side file.
pub const LONG_SUFFIX: &str = ".name";
/// Per-directory ID file (the second copy is the `user.kmsfs.dirid` xattr).
pub const DIRID_FILE: &str = ".kmsfs.dirid";
/// xattr holding a directory's ID.
pub const DIRID_XATTR: &str = "user.kmsfs.dirid";
/// Prefix of directories being created (renamed into place when complete).
pub const TMP_PREFIX: &str = ".kmsfs.tmp.";
/// The root directory's ID: fixed, so it can never go missing.
pub const ROOT_DIR_ID: Id = [0u8; 16];

/// Why a name could not be mapped.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum NameError {
    /// Not a valid encrypted name in this directory (tampered, moved, or
    /// not written by kmsfs).
    #[error("name does not decrypt in this directory")]
    Undecryptable,
    /// Plaintext name too long.
    #[error("name too long")]
    TooLong,
}

/// How a plaintext name is stored in its backing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredName {
    /// The directory entry's name.
    pub on_disk: OsString,
    /// For long names: the full encrypted name, kept in the side file.
    pub long: Option<String>,
}

impl StoredName {
    /// Side file name of a long name.
    pub fn side_file(&self) -> Option<OsString> {
        self.long.as_ref().map(|_| {
            let mut s = self.on_disk.clone();
            s.push(LONG_SUFFIX);
            s
        })
    }
}

/// The name cipher of a volume. `None` key means plaintext names.
pub struct Names {
    // SIV needs &mut for its CMAC state; a name operation takes microseconds.
    siv: Option<std::sync::Mutex<Aes256Siv>>,
}

impl Names {
    /// Plaintext names (the `--plaintext-names` volumes).
    pub fn plaintext() -> Self {
        Self { siv: None }
    }

    /// Encrypted names from a 32-byte name secret (expanded with HKDF-SHA256
    /// to the 64 bytes AES-SIV-256 needs).
    pub fn new(secret: &[u8; 32]) -> Self {
        let mut k = Zeroizing::new([0u8; 64]);
        let salt = aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, b"kmsfs names v1");
        let prk = salt.extract(secret);
        struct Len64;
        impl aws_lc_rs::hkdf::KeyType for Len64 {
            fn len(&self) -> usize {
                64
            }
        }
        let ok = prk.expand(&[b"aes-siv-256"], Len64).and_then(|okm| okm.fill(&mut k[..])).is_ok();
        debug_assert!(ok, "HKDF of 64 bytes cannot fail");
        let siv = Aes256Siv::new_from_slice(&k[..]).ok().map(std::sync::Mutex::new);
        Self { siv }
    }

    /// Whether names are encrypted.
    pub fn encrypted(&self) -> bool {
        self.siv.is_some()
    }

    fn seal(&self, ad: &[&[u8]], plain: &[u8]) -> Vec<u8> {
        match &self.siv {
            // SIV over a few hundred bytes cannot fail.
            Some(siv) => siv.lock().unwrap_or_else(|p| p.into_inner()).encrypt(ad, plain).unwrap_or_default(),
            None => plain.to_vec(),
        }
    }

    fn open(&self, ad: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>, NameError> {
        match &self.siv {
            Some(siv) => {
                siv.lock().unwrap_or_else(|p| p.into_inner()).decrypt(ad, sealed).map_err(|_| NameError::Undecryptable)
            }
            None => Ok(sealed.to_vec()),
        }
    }

    /// Maps a plaintext name in directory `dir_id` to its stored form.
    pub fn encrypt(&self, dir_id: &Id, name: &OsStr) -> Result<StoredName, NameError> {
        if name.len() > NAME_MAX {
            return Err(NameError::TooLong);
        }
        if !self.encrypted() {
            return Ok(StoredName { on_disk: name.to_owned(), long: None });
        }
        let enc = B64.encode(self.seal(&[b"name", dir_id], name.as_bytes()));
        if enc.len() <= NAME_MAX {
            return Ok(StoredName { on_disk: enc.into(), long: None });
        }
        let h = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, enc.as_bytes());
        Ok(StoredName { on_disk: format!("{LONG_PREFIX}{}", B64.encode(h.as_ref())).into(), long: Some(enc) })
    }

    /// Decrypts a stored (short) name, or the content of a long name's side file.
    pub fn decrypt(&self, dir_id: &Id, encoded: &[u8]) -> Result<OsString, NameError> {
        if !self.encrypted() {
            return Ok(OsString::from_vec(encoded.to_vec()));
        }
        let raw = B64.decode(encoded).map_err(|_| NameError::Undecryptable)?;
        let plain = self.open(&[b"name", dir_id], &raw)?;
        if plain.is_empty() || plain.contains(&b'/') || plain.contains(&0) || plain.len() > NAME_MAX {
            return Err(NameError::Undecryptable);
        }
        Ok(OsString::from_vec(plain))
    }

    /// What kind of backing entry a name is.
    pub fn classify(&self, on_disk: &OsStr) -> EntryKind {
        let b = on_disk.as_bytes();
        if !self.encrypted() {
            return if b.starts_with(b".kmsfs") { EntryKind::Internal } else { EntryKind::Short };
        }
        if b.starts_with(b".kmsfs") || (b.starts_with(LONG_PREFIX.as_bytes()) && b.ends_with(LONG_SUFFIX.as_bytes())) {
            EntryKind::Internal
        } else if b.starts_with(LONG_PREFIX.as_bytes()) {
            EntryKind::Long
        } else {
            EntryKind::Short
        }
    }

    /// Seals a symlink target.
    pub fn encrypt_target(&self, target: &OsStr) -> OsString {
        if !self.encrypted() {
            return target.to_owned();
        }
        B64.encode(self.seal(&[b"symlink"], target.as_bytes())).into()
    }

    /// Opens a symlink target.
    pub fn decrypt_target(&self, stored: &[u8]) -> Result<Vec<u8>, NameError> {
        if !self.encrypted() {
            return Ok(stored.to_vec());
        }
        let raw = B64.decode(stored).map_err(|_| NameError::Undecryptable)?;
        self.open(&[b"symlink"], &raw)
    }

    /// Seals a user xattr value, bound to the attribute's name.
    pub fn encrypt_xattr(&self, name: &OsStr, value: &[u8]) -> Vec<u8> {
        self.seal(&[b"xattr", name.as_bytes()], value)
    }

    /// Opens a user xattr value.
    pub fn decrypt_xattr(&self, name: &OsStr, stored: &[u8]) -> Result<Vec<u8>, NameError> {
        self.open(&[b"xattr", name.as_bytes()], stored)
    }
}

/// Kinds of backing directory entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A name stored directly.
    Short,
    /// A hashed long name; the real name is in its side file.
    Long,
    /// kmsfs bookkeeping (ID files, side files, temp dirs): never shown.
    Internal,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_directory_binding() {
        let n = Names::new(&[5u8; 32]);
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let s = n.encrypt(&a, OsStr::new("hello world\n")).unwrap();
        assert!(s.long.is_none());
        assert_eq!(n.encrypt(&a, OsStr::new("hello world\n")).unwrap(), s, "deterministic");
        assert_ne!(n.encrypt(&b, OsStr::new("hello world\n")).unwrap(), s, "dir-bound");
        assert_eq!(n.decrypt(&a, s.on_disk.as_bytes()).unwrap(), "hello world\n");
        assert_eq!(n.decrypt(&b, s.on_disk.as_bytes()), Err(NameError::Undecryptable));
        assert_eq!(n.classify(&s.on_disk), EntryKind::Short);
    }

    #[test]
    fn long_names() {
        let n = Names::new(&[5u8; 32]);
        let name = "é".repeat(127) + "x"; // 255 bytes of multibyte UTF-8
        assert_eq!(name.len(), 255);
        let s = n.encrypt(&[1; 16], OsStr::new(&name)).unwrap();
        let full = s.long.clone().unwrap();
        assert!(s.on_disk.len() <= 255 && s.on_disk.as_bytes().starts_with(b"L."));
        assert_eq!(n.classify(&s.on_disk), EntryKind::Long);
        assert_eq!(n.classify(&s.side_file().unwrap()), EntryKind::Internal);
        assert_eq!(n.decrypt(&[1; 16], full.as_bytes()).unwrap(), OsStr::new(&name));
        assert_eq!(n.encrypt(&[1; 16], OsStr::new(&(name + "y"))), Err(NameError::TooLong));
    }

    #[test]
    fn targets_and_xattrs() {
        let n = Names::new(&[5u8; 32]);
        let t = n.encrypt_target(OsStr::new("../some/where"));
        assert_eq!(n.decrypt_target(t.as_bytes()).unwrap(), b"../some/where");
        let v = n.encrypt_xattr(OsStr::new("user.a"), b"value");
        assert_eq!(n.decrypt_xattr(OsStr::new("user.a"), &v).unwrap(), b"value");
        assert!(n.decrypt_xattr(OsStr::new("user.b"), &v).is_err());
        let p = Names::plaintext();
        assert_eq!(p.encrypt(&[0; 16], OsStr::new("x")).unwrap().on_disk, "x");
        assert_eq!(p.classify(OsStr::new(".kmsfs.dirid")), EntryKind::Internal);
    }
}
