//! The local provider: a 256-bit key-encryption key in a file outside the
//! cipher dir. What a newcomer gets with no cloud account.
//!
//! Key file: 64 hex characters and a newline, mode 0600. DEKs are wrapped
//! with AES-256-GCM under it: `blob = nonce (12) || ct (32) || tag (16)`, AAD
//! = "kmsfs-local-wrap-v1" || volume ID || file ID.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::digest;
use zeroize::{Zeroize, Zeroizing};

use super::{DataKey, KeyContext, KeyError, KeyProvider, WrappedKey};
use crate::format::{DEK_LEN, NONCE_LEN, TAG_LEN, hex};

/// Provider name in headers.
pub const NAME: &str = "local";
const WRAP_LABEL: &[u8] = b"kmsfs-local-wrap-v1";
/// Read limit for a key file.
const KEY_FILE_MAX: u64 = 256;

/// The key read from standard input (`--key-file -`), once per process.
static STDIN_KEY: std::sync::Mutex<Option<Zeroizing<Vec<u8>>>> = std::sync::Mutex::new(None);

/// Reads a key file's text, refusing anything much larger than a key.
fn read_key_text(r: &mut dyn std::io::Read, path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use std::io::Read;
    // 64 hex digits and a newline; anything much larger is not a key file.
    let mut text = Zeroizing::new(Vec::with_capacity(80));
    r.take(KEY_FILE_MAX).read_to_end(&mut text).map_err(|e| kf_err(path, format!("cannot read: {e}")))?;
    if text.len() as u64 >= KEY_FILE_MAX {
        return Err(kf_err(path, "not a kmsfs key file (too large)"));
    }
    Ok(text)
}

/// The key text on standard input, read on first use.
fn stdin_key(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let mut slot = STDIN_KEY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = slot.as_ref() {
        return Ok(t.clone());
    }
    let text = read_key_text(&mut std::io::stdin().lock(), path)?;
    if text.is_empty() {
        return Err(kf_err(path, "no key on standard input"));
    }
    *slot = Some(text.clone());
    Ok(text)
}

/// The local key-file provider.
pub struct LocalProvider {
    kek: LessSafeKey,
    key_id: String,
}

fn kf_err(path: &Path, detail: impl Into<String>) -> KeyError {
    KeyError::KeyFile { path: path.display().to_string(), detail: detail.into() }
}

/// The fingerprint that names a key in headers: not secret, not reversible.
fn fingerprint(raw: &[u8; DEK_LEN]) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"kmsfs local key id v1");
    ctx.update(raw);
    format!("local:{}", hex(&ctx.finish().as_ref()[..8]))
}

impl LocalProvider {
    /// Creates a new random key file at `path` (mode 0600, parent dirs 0700).
    /// Refuses to overwrite an existing file.
    pub fn create_key_file(path: &Path) -> Result<Self, KeyError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| kf_err(path, format!("cannot create directory: {e}")))?;
        }
        let mut raw = Zeroizing::new([0u8; DEK_LEN]);
        crate::format::random_fill(&mut raw[..]).map_err(|e| kf_err(path, e.to_string()))?;
        let mut text = Zeroizing::new(hex(&raw[..]));
        text.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| kf_err(path, format!("cannot create: {e}")))?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| kf_err(path, format!("cannot write: {e}")))?;
        Self::from_raw(&raw)
    }

    /// Loads a key file. Pinned as an O_PATH descriptor without following a
    /// final symlink, checked through it, then that same inode is opened to
    /// read, so a swap between the check and the read changes nothing. The
    /// file must be a small regular file owned by us or root with no group
    /// or other bits.
    ///
    /// The path `-` means standard input (`--key-file -`): read once, at
    /// most 256 bytes, and kept (zeroized on exit) for the process's other
    /// uses of the same key.
    pub fn open(path: &Path) -> Result<Self, KeyError> {
        if path == Path::new("-") {
            return Self::from_text(path, &stdin_key(path)?);
        }
        // O_PATH first: the path may come from the (unauthenticated)
        // config's `key_file`, so it is never opened for reading unless it
        // is a regular file (opening a FIFO or a device can act).
        let pinned = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| kf_err(path, format!("cannot read: {e}")))?;
        let meta = pinned.metadata().map_err(|e| kf_err(path, format!("cannot stat: {e}")))?;
        if meta.file_type().is_symlink() {
            return Err(kf_err(path, "is a symbolic link; give the real path"));
        }
        if !meta.is_file() {
            return Err(kf_err(path, "not a regular file"));
        }
        // The same inode, now for reading (/proc/self/fd names it alone).
        let f = std::fs::File::from(
            crate::sys::reopen(&std::os::fd::OwnedFd::from(pinned), libc::O_RDONLY | libc::O_NONBLOCK)
                .map_err(|e| kf_err(path, format!("cannot read: {e}")))?,
        );
        let euid = crate::sys::euid();
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(kf_err(path, format!("owned by uid {}, not by you ({euid}) or root", meta.uid())));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(kf_err(
                path,
                format!("permissions {mode:04o} are too open; run: chmod 600 {}", path.display()),
            ));
        }
        Self::from_text(path, &read_key_text(&mut &f, path)?)
    }

    /// Parses key-file text (64 hex digits and a newline).
    fn from_text(path: &Path, text: &[u8]) -> Result<Self, KeyError> {
        let trimmed = text.strip_suffix(b"\n").unwrap_or(text);
        let s = std::str::from_utf8(trimmed).map_err(|_| kf_err(path, "not a kmsfs key file"))?;
        let mut raw = Zeroizing::new(
            crate::format::unhex::<DEK_LEN>(s)
                .ok_or_else(|| kf_err(path, "not a kmsfs key file (want 64 hex digits)"))?,
        );
        let p = Self::from_raw(&raw);
        raw.zeroize();
        p
    }

    /// Hands the daemon child the key its parent read from standard input
    /// (through a pipe, see `kmsfs mount --key-file -`).
    pub fn set_stdin_key(text: Zeroizing<Vec<u8>>) {
        *STDIN_KEY.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
    }

    /// The key text read from standard input, if any (for the daemon child).
    pub fn stdin_key_text() -> Option<Zeroizing<Vec<u8>>> {
        STDIN_KEY.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn from_raw(raw: &[u8; DEK_LEN]) -> Result<Self, KeyError> {
        let kek = UnboundKey::new(&AES_256_GCM, raw).map_err(|_| KeyError::Other("bad key length".into()))?;
        Ok(Self { kek: LessSafeKey::new(kek), key_id: fingerprint(raw) })
    }

    /// Default key file location for a volume: `$XDG_CONFIG_HOME/kmsfs/<volume>.key`.
    pub fn default_path(volume_hex: &str) -> PathBuf {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| PathBuf::from("/etc"));
        base.join("kmsfs").join(format!("{volume_hex}.key"))
    }

    fn seal(&self, dek: &[u8; DEK_LEN], ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::format::random_fill(&mut nonce).map_err(|e| KeyError::Other(e.to_string()))?;
        let mut blob = Vec::with_capacity(NONCE_LEN + DEK_LEN + TAG_LEN);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(dek);
        let tag = self
            .kek
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ctx.aad(WRAP_LABEL)),
                &mut blob[NONCE_LEN..],
            )
            .map_err(|_| KeyError::Other("wrap failed".into()))?;
        blob.extend_from_slice(tag.as_ref());
        Ok(WrappedKey { provider: NAME.into(), key_id: self.key_id.clone(), blob })
    }
}

impl KeyProvider for LocalProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn key_id(&self) -> String {
        self.key_id.clone()
    }

    fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError> {
        let key = DataKey::generate().map_err(|e| KeyError::Other(e.to_string()))?;
        let wrapped = self.seal(key.expose_secret(), ctx)?;
        Ok((key, wrapped))
    }

    fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        self.seal(key.expose_secret(), ctx)
    }

    fn unwrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
        if wrapped.provider != NAME {
            return Err(KeyError::WrongProvider { expected: NAME.into(), found: wrapped.provider.clone() });
        }
        if wrapped.key_id != self.key_id {
            return Err(KeyError::WrongKey { expected: self.key_id.clone(), found: wrapped.key_id.clone() });
        }
        let bad = || KeyError::InvalidCiphertext { key: self.key_id.clone() };
        if wrapped.blob.len() != NONCE_LEN + DEK_LEN + TAG_LEN {
            return Err(bad());
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped.blob[..NONCE_LEN]);
        let mut buf = Zeroizing::new(wrapped.blob[NONCE_LEN..].to_vec());
        let plain = self
            .kek
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(ctx.aad(WRAP_LABEL)), &mut buf[..])
            .map_err(|_| bad())?;
        DataKey::from_slice(plain).ok_or_else(bad)
    }

    fn rewrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        // Local wrapping is in-process anyway: unwrap and wrap with a new nonce.
        let key = self.unwrap(wrapped, ctx)?;
        self.seal(key.expose_secret(), ctx)
    }

    fn check(&self) -> Result<(), KeyError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn ctx(f: u8) -> KeyContext {
        KeyContext::file([1; 16], [f; 16])
    }

    #[test]
    fn create_open_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/k.key");
        let p = LocalProvider::create_key_file(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(LocalProvider::create_key_file(&path).is_err(), "never overwrites");
        let (dek, w) = p.generate(&ctx(2)).unwrap();
        let p2 = LocalProvider::open(&path).unwrap();
        assert_eq!(p2.key_id(), p.key_id());
        let back = p2.unwrap(&w, &ctx(2)).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        assert!(matches!(p2.unwrap(&w, &ctx(3)), Err(KeyError::InvalidCiphertext { .. })));
        let w2 = p2.rewrap(&w, &ctx(2)).unwrap();
        assert_ne!(w2.blob, w.blob);
        assert_eq!(p.unwrap(&w2, &ctx(2)).unwrap().expose_secret(), dek.expose_secret());
    }

    #[test]
    fn refuses_loose_permissions_and_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        let p = LocalProvider::create_key_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalProvider::open(&path).err().unwrap();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        // A symlink to a good key file is refused, as is a huge or odd file.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = LocalProvider::open(&link).err().unwrap();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let big = dir.path().join("big.key");
        std::fs::write(&big, vec![b'a'; 4096]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(LocalProvider::open(&big).err().unwrap().to_string().contains("too large"));
        assert!(LocalProvider::open(dir.path()).is_err(), "a directory");
        // A name-key context never opens a file-key wrapping (domain separation).
        let (_, w) = p.generate(&ctx(2)).unwrap();
        let name_ctx = KeyContext { purpose: Some(crate::keys::Purpose::Name), ..ctx(2) };
        assert!(matches!(p.unwrap(&w, &name_ctx), Err(KeyError::InvalidCiphertext { .. })));
        let other = LocalProvider::create_key_file(&dir.path().join("o.key")).unwrap();
        let (_, w) = p.generate(&ctx(2)).unwrap();
        assert!(matches!(other.unwrap(&w, &ctx(2)), Err(KeyError::WrongKey { .. })));
    }
}
