//! Volume-level steps of the offline commands: the errors they share,
//! `init`, and opening a volume under its exclusive lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::OpError;
use crate::format::layout::Layout;
use crate::keys::local::LocalProvider;
use crate::keys::{KeyError, KeyProvider};
use crate::volume::{KeyArgs, OpenVolume, ProviderKind, VolumeConfig, VolumeError};

/// Errors of the volume-level steps (init, rewrap, upgrade, rotate-branch,
/// info). Each variant is one class of failure, which the command line
/// maps to its exit code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request does not apply (a bad option for this volume).
    #[error("{0}")]
    Usage(String),
    /// The volume config is missing, invalid or refused, or the directory
    /// is not one a volume can be made in.
    #[error("{0}")]
    Config(String),
    /// A key-provider call failed (with what it was for).
    #[error("{0}")]
    KeyFailed(String),
    /// Anything else (writing the config, the trust store, a directory).
    #[error("{0}")]
    Other(String),
    /// Opening, signing or pinning the volume failed.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The key provider failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// An offline pass over the files failed.
    #[error(transparent)]
    Op(#[from] OpError),
}

/// The volume's block layout, or why its config has none.
pub fn layout_of(cfg: &VolumeConfig) -> Result<Layout, AdminError> {
    cfg.layout().ok_or_else(|| AdminError::Config("invalid block or header size in volume config".into()))
}

/// Reads the config without verifying it (no key needed).
pub fn load(cipherdir: &Path) -> Result<VolumeConfig, AdminError> {
    VolumeConfig::load(cipherdir).map_err(|e| AdminError::Config(e.to_string()))
}

/// Writes the config.
pub(super) fn store(cfg: &VolumeConfig, cipherdir: &Path) -> Result<(), AdminError> {
    cfg.store(cipherdir).map_err(|e| AdminError::Other(e.to_string()))
}

/// A volume opened through its trust anchor under the exclusive cipher-dir
/// lock, which no mount (here or on another host) holds meanwhile.
pub struct Locked {
    pub(super) _lock: std::fs::File,
    /// The verified config.
    pub config: VolumeConfig,
    /// Its key provider.
    pub provider: Arc<dyn KeyProvider>,
}

/// Locks the volume exclusively and opens it; with `refuse_legacy`,
/// refuses a legacy (unauthenticated) config, which only `upgrade` may
/// change.
pub fn open_locked(cipherdir: &Path, keys: &KeyArgs, refuse_legacy: bool) -> Result<Locked, AdminError> {
    let lock = crate::volume::lock(cipherdir, true)?;
    let OpenVolume { config, provider, legacy } = crate::volume::open(cipherdir, keys)?;
    if legacy && refuse_legacy {
        return Err(legacy_error(cipherdir).into());
    }
    Ok(Locked { _lock: lock, config, provider })
}

/// The error for a legacy config where an authenticated one is needed.
pub fn legacy_error(cipherdir: &Path) -> VolumeError {
    VolumeError::Legacy {
        path: cipherdir.join(crate::volume::CONFIG_NAME).display().to_string(),
        cipherdir: cipherdir.display().to_string(),
    }
}

/// What `init` makes.
pub struct InitOptions {
    /// AWS KMS key reference (else a local key file).
    pub kms_key: Option<String>,
    /// Where to create the local key file (else the default path).
    pub key_file: Option<PathBuf>,
    /// Plaintext bytes per block.
    pub block_size: u32,
    /// Keep names in clear.
    pub plaintext_names: bool,
    /// Branch key mode (KMS only).
    pub branch: bool,
}

/// A volume being created: its config and provider, before its keys.
pub struct NewVolume {
    /// The config so far.
    pub config: VolumeConfig,
    provider: Arc<dyn KeyProvider>,
    /// The local key file created for it, if any.
    pub created_key_file: Option<PathBuf>,
}

/// `init`, first step: checks the request and the (empty) cipher dir,
/// resolves the KMS key or creates the local key file (outside the cipher
/// dir). Nothing is written in the cipher dir yet.
pub fn init_prepare(cipherdir: &Path, o: &InitOptions) -> Result<NewVolume, AdminError> {
    let block_size = o.block_size;
    if !(4096..=1 << 20).contains(&block_size) || !block_size.is_power_of_two() {
        return Err(AdminError::Usage("--block-size must be a power of two from 4096 to 1048576".into()));
    }
    if o.branch && o.kms_key.is_none() {
        return Err(AdminError::Usage("--key-mode branch needs --kms-key".into()));
    }
    let dir_err = |e: std::io::Error| AdminError::Other(format!("{}: {e}", cipherdir.display()));
    std::fs::create_dir_all(cipherdir).map_err(dir_err)?;
    let mut entries = std::fs::read_dir(cipherdir).map_err(dir_err)?;
    if entries.next().is_some() {
        let what = if cipherdir.join(crate::volume::CONFIG_NAME).exists() {
            "is already a kmsfs volume"
        } else {
            "is not empty"
        };
        return Err(AdminError::Config(format!("{} {what}", cipherdir.display())));
    }
    let other = |e: &dyn std::fmt::Display| AdminError::Other(e.to_string());
    if let Some(k) = &o.kms_key {
        let p = crate::keys::open_aws_kms(k, &[])?;
        p.check()?;
        // The resolved ARN, not an alias someone could later repoint.
        let config = VolumeConfig::new(ProviderKind::AwsKms, p.key_id(), None, block_size).map_err(|e| other(&e))?;
        return Ok(NewVolume { config, provider: p, created_key_file: None });
    }
    let mut cfg = VolumeConfig::new(ProviderKind::Local, String::new(), None, block_size).map_err(|e| other(&e))?;
    let path = o.key_file.clone().unwrap_or_else(|| LocalProvider::default_path(&cfg.volume_id));
    let abs = std::path::absolute(&path).map_err(|e| other(&e))?;
    let cd = std::fs::canonicalize(cipherdir).map_err(|e| other(&e))?;
    let parent_canon = abs.parent().and_then(|p| std::fs::canonicalize(p).ok());
    if abs.starts_with(&cd) || parent_canon.is_some_and(|p| p.starts_with(&cd)) {
        return Err(AdminError::Usage("the key file must live outside the cipher dir".into()));
    }
    let p = LocalProvider::create_key_file(&abs)?;
    cfg.key_id = p.key_id();
    cfg.key_file = Some(abs.clone());
    Ok(NewVolume { config: cfg, provider: Arc::new(p), created_key_file: Some(abs) })
}

/// `init`, second step: creates the volume's keys (name, branch, config),
/// writes the signed config and records its key as trusted on this host.
pub fn init_finish(cipherdir: &Path, v: NewVolume, o: &InitOptions) -> Result<VolumeConfig, AdminError> {
    let NewVolume { config: mut cfg, provider, .. } = v;
    if !o.plaintext_names {
        cfg.create_name_key(provider.as_ref())?;
    }
    if o.branch {
        cfg.create_branch_key(provider.as_ref())?;
    }
    cfg.create_auth_key(provider.as_ref())?;
    store(&cfg, cipherdir)?;
    crate::volume::pin(&cfg)?;
    Ok(cfg)
}
