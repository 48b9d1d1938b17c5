//! The volume config (`kmsfs.conf` at the root of the cipher dir) and the
//! construction of a volume's key provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::format::layout::Layout;
use crate::format::{FORMAT_VERSION, Id, hex, unhex};
use crate::keys::KeyProvider;
use crate::keys::local::LocalProvider;

/// File name of the config inside the cipher dir; hidden from the mount.
pub const CONFIG_NAME: &str = "kmsfs.conf";
/// Header slot for local-provider volumes: fits a 60-byte wrapped key.
pub const LOCAL_HEADER_SIZE: u16 = 256;
/// Header slot for aws-kms volumes: real KMS blobs are ~184 bytes, key ARNs
/// ~75; 512 leaves room for longer ARNs and multi-region keys.
pub const KMS_HEADER_SIZE: u16 = 512;

/// Which provider a volume uses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// Key file on local disk.
    Local,
    /// AWS KMS.
    AwsKms,
}

/// The on-disk volume config (JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Format version of the volume.
    pub format_version: u8,
    /// Random volume ID, hex.
    pub volume_id: String,
    /// Key provider.
    pub provider: ProviderKind,
    /// Key reference: KMS key ID/ARN/alias, or the local key fingerprint.
    pub key_id: String,
    /// Local provider: where the key file lives (outside the cipher dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Plaintext bytes per block.
    pub block_size: u32,
    /// Bytes of every file's header slot.
    pub header_size: u16,
    /// Whether names are stored in clear.
    #[serde(default = "yes")]
    pub plaintext_names: bool,
    /// The wrapped name key (encrypted-names volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_key: Option<StoredKey>,
}

/// A wrapped secret kept in the config: the name key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// Random ID bound into the wrapping context in place of a file ID.
    pub id: String,
    /// Provider that wrapped it.
    pub provider: String,
    /// Key that wrapped it.
    pub key_id: String,
    /// The wrapped blob, base64.
    pub blob: String,
}

impl StoredKey {
    /// The wrapping context and wrapped form.
    pub fn parts(&self, volume_id: Id) -> Option<(crate::keys::KeyContext, crate::keys::WrappedKey)> {
        use base64::Engine;
        let file_id = unhex::<16>(&self.id)?;
        let blob = base64::engine::general_purpose::STANDARD.decode(&self.blob).ok()?;
        Some((
            crate::keys::KeyContext { volume_id, file_id },
            crate::keys::WrappedKey { provider: self.provider.clone(), key_id: self.key_id.clone(), blob },
        ))
    }

    /// Stores a wrapped key.
    pub fn from_wrapped(id: &Id, w: &crate::keys::WrappedKey) -> Self {
        use base64::Engine;
        Self {
            id: hex(id),
            provider: w.provider.clone(),
            key_id: w.key_id.clone(),
            blob: base64::engine::general_purpose::STANDARD.encode(&w.blob),
        }
    }
}

fn yes() -> bool {
    true
}

/// Errors loading or writing a volume config.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Missing or unreadable config.
    #[error("{path}: {source}")]
    Io {
        /// Config path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Malformed config.
    #[error("{path}: invalid volume config: {detail}")]
    Invalid {
        /// Config path.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Key provider could not be set up.
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
}

impl VolumeConfig {
    /// Loads and validates `CIPHERDIR/kmsfs.conf`.
    pub fn load(cipherdir: &Path) -> Result<Self, VolumeError> {
        let path = cipherdir.join(CONFIG_NAME);
        let p = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| VolumeError::Io { path: p.clone(), source })?;
        let c: Self =
            serde_json::from_str(&text).map_err(|e| VolumeError::Invalid { path: p.clone(), detail: e.to_string() })?;
        let bad = |d: &str| VolumeError::Invalid { path: p.clone(), detail: d.into() };
        if c.format_version != FORMAT_VERSION {
            return Err(bad(&format!("format version {} is not supported by this kmsfs", c.format_version)));
        }
        if unhex::<16>(&c.volume_id).is_none() {
            return Err(bad("volume_id must be 32 hex digits"));
        }
        if c.layout().is_none() {
            return Err(bad("block_size must be a power of two from 4096 to 1048576, header_size >= 128"));
        }
        Ok(c)
    }

    /// Writes the config atomically: a new file under a random temporary
    /// name (O_EXCL, no link followed), fsync, rename over the config, fsync
    /// of the cipher dir. Nothing planted in the cipher dir is written through.
    pub fn store(&self, cipherdir: &Path) -> Result<(), VolumeError> {
        let path = cipherdir.join(CONFIG_NAME);
        let io = |source| VolumeError::Io { path: path.display().to_string(), source };
        let mut text = serde_json::to_string_pretty(self)
            .map_err(|e| VolumeError::Invalid { path: path.display().to_string(), detail: e.to_string() })?;
        text.push('\n');
        let dir = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(io)?;
        use std::os::fd::AsRawFd;
        crate::sys::replace_file(dir.as_raw_fd(), CONFIG_NAME.as_ref(), text.as_bytes(), 0o644).map_err(io)?;
        crate::sys::fsync_dir(&dir).map_err(io)?;
        Ok(())
    }

    /// The volume ID.
    pub fn volume_id(&self) -> Id {
        unhex::<16>(&self.volume_id).unwrap_or_default()
    }

    /// The file geometry.
    pub fn layout(&self) -> Option<Layout> {
        if !self.block_size.is_power_of_two() {
            return None;
        }
        Layout::new(self.header_size, self.block_size.trailing_zeros() as u8)
    }

    /// A new config with a random volume ID.
    pub fn new(
        provider: ProviderKind,
        key_id: String,
        key_file: Option<PathBuf>,
        block_size: u32,
    ) -> Result<Self, VolumeError> {
        let id = crate::format::random_id()
            .map_err(|e| VolumeError::Invalid { path: String::new(), detail: e.to_string() })?;
        let header_size = match provider {
            ProviderKind::Local => LOCAL_HEADER_SIZE,
            ProviderKind::AwsKms => KMS_HEADER_SIZE,
        };
        Ok(Self {
            format_version: FORMAT_VERSION,
            volume_id: hex(&id),
            provider,
            key_id,
            key_file,
            block_size,
            header_size,
            plaintext_names: true,
            name_key: None,
        })
    }

    /// Creates and wraps a new name key (switches the volume to encrypted names).
    pub fn create_name_key(&mut self, provider: &dyn KeyProvider) -> Result<(), VolumeError> {
        let id = crate::format::random_id()
            .map_err(|e| VolumeError::Invalid { path: CONFIG_NAME.into(), detail: e.to_string() })?;
        let ctx = crate::keys::KeyContext { volume_id: self.volume_id(), file_id: id };
        let (_key, wrapped) = provider.generate(&ctx)?;
        self.name_key = Some(StoredKey::from_wrapped(&id, &wrapped));
        self.plaintext_names = false;
        Ok(())
    }

    /// The volume's name cipher (unwraps the name key: one provider call).
    pub fn names(&self, provider: &dyn KeyProvider) -> Result<crate::names::Names, VolumeError> {
        if self.plaintext_names {
            return Ok(crate::names::Names::plaintext());
        }
        let bad = |d: &str| VolumeError::Invalid { path: CONFIG_NAME.into(), detail: d.into() };
        let sk = self.name_key.as_ref().ok_or_else(|| bad("encrypted names but no name_key"))?;
        let (ctx, w) = sk.parts(self.volume_id()).ok_or_else(|| bad("malformed name_key"))?;
        let key = provider.unwrap(&w, &ctx)?;
        Ok(crate::names::Names::new(key.expose_secret()))
    }

    /// Opens the volume's key provider. `key_file` overrides the recorded path.
    pub fn provider(&self, key_file: Option<&Path>) -> Result<Arc<dyn KeyProvider>, VolumeError> {
        match self.provider {
            ProviderKind::Local => {
                let path = key_file.map(Path::to_path_buf).or_else(|| self.key_file.clone()).ok_or_else(|| {
                    VolumeError::Invalid {
                        path: CONFIG_NAME.into(),
                        detail: "no key_file recorded; pass --key-file".into(),
                    }
                })?;
                let p = LocalProvider::open(&path)?;
                if p.key_id() != self.key_id {
                    return Err(crate::keys::KeyError::KeyFile {
                        path: path.display().to_string(),
                        detail: format!("this key is {}, but the volume was created with {}", p.key_id(), self.key_id),
                    }
                    .into());
                }
                Ok(Arc::new(p))
            }
            ProviderKind::AwsKms => crate::keys::open_aws_kms(&self.key_id).map_err(VolumeError::Key),
        }
    }
}
