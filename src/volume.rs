//! The volume config (`kmsfs.conf` at the root of the cipher dir) and the
//! construction of a volume's key provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::format::layout::Layout;
use crate::format::{FORMAT_VERSION, Id, hex, unhex};
use crate::keys::local::LocalProvider;
use crate::keys::{DataKey, KeyContext, KeyError, KeyProvider, Purpose};
use crate::trust::{Pin, TrustStore};

/// File name of the config inside the cipher dir; hidden from the mount.
pub const CONFIG_NAME: &str = "kmsfs.conf";
/// Lock file in the cipher dir: mounts hold it shared, rewrap exclusive.
pub const LOCK_NAME: &str = ".kmsfs.lock";
/// Largest config read.
const CONFIG_MAX: u64 = 64 * 1024;
/// Domain label of the config MAC (see docs/FORMAT.md).
const MAC_LABEL: &str = "kmsfs-config-mac-v1";
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
    /// Earlier (or, during a rewrap, next) KMS keys whose wrapped data keys
    /// may still be unwrapped. Recorded by rewrap; authenticated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_keys: Vec<String>,
    /// Branch key mode: the wrapped branch keys, oldest first; new files use
    /// the highest version. Absent (empty) in per-file volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branch_keys: Vec<BranchKey>,
    /// The wrapped key that authenticates this config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_key: Option<StoredKey>,
    /// HMAC-SHA256 over the authenticated fields, hex (docs/FORMAT.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The fields the MAC covers, in a fixed order. `key_file` is left out: it
/// only says where to look, and the key found there must match `key_id`.
#[derive(Serialize)]
struct Authenticated<'a> {
    label: &'static str,
    format_version: u8,
    volume_id: &'a str,
    provider: &'a ProviderKind,
    key_id: &'a str,
    previous_keys: &'a [String],
    block_size: u32,
    header_size: u16,
    plaintext_names: bool,
    name_key: &'a Option<StoredKey>,
    auth_key: &'a Option<StoredKey>,
    // Last and left out when empty, so per-file configs keep their MAC input.
    #[serde(skip_serializing_if = "<[BranchKey]>::is_empty")]
    branch_keys: &'a [BranchKey],
}

/// One branch key version (branch key mode).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchKey {
    /// Version number, from 1; headers name it as `branch:<version>`.
    pub version: u32,
    /// The wrapped branch key; its ID ends in the version (big-endian u32)
    /// and its purpose is `branch`.
    pub key: StoredKey,
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
    /// The purpose bound into the wrapping context (absent in volumes made
    /// before it existed; authenticated, so it cannot be stripped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
}

impl StoredKey {
    /// The wrapping context and wrapped form.
    pub fn parts(&self, volume_id: Id) -> Option<(crate::keys::KeyContext, crate::keys::WrappedKey)> {
        use base64::Engine;
        let file_id = unhex::<16>(&self.id)?;
        let blob = base64::engine::general_purpose::STANDARD.decode(&self.blob).ok()?;
        Some((
            KeyContext { volume_id, file_id, purpose: self.purpose },
            crate::keys::WrappedKey { provider: self.provider.clone(), key_id: self.key_id.clone(), blob },
        ))
    }

    /// Stores a wrapped key made under `ctx`.
    pub fn from_wrapped(ctx: &KeyContext, w: &crate::keys::WrappedKey) -> Self {
        use base64::Engine;
        Self {
            id: hex(&ctx.file_id),
            provider: w.provider.clone(),
            key_id: w.key_id.clone(),
            blob: base64::engine::general_purpose::STANDARD.encode(&w.blob),
            purpose: ctx.purpose,
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
    /// The config does not match what this host trusts, or fails its MAC.
    #[error("{path}: {detail}")]
    Untrusted {
        /// Config path.
        path: String,
        /// What does not match, and what to do.
        detail: String,
    },
    /// The cipher-dir lock is taken (a mount, or a rewrap).
    #[error(transparent)]
    Busy(#[from] BusyError),
    /// A config from before configs were authenticated.
    #[error(
        "{path}: this volume's config is not authenticated (made by an older kmsfs), so it is read-only: \
         review it and run `kmsfs upgrade {cipherdir}` once on a trusted host"
    )]
    Legacy {
        /// Config path.
        path: String,
        /// The cipher dir.
        cipherdir: String,
    },
}

/// The cipher-dir lock is held by someone else.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {detail}")]
pub struct BusyError {
    /// The cipher dir.
    pub path: String,
    /// Who holds it, and what to do.
    pub detail: String,
}

/// How a command names the volume's key; explicit names are trust anchors.
#[derive(Clone, Debug, Default)]
pub struct KeyArgs {
    /// Local key file given on the command line (or `key_file=`).
    pub key_file: Option<PathBuf>,
    /// KMS key given on the command line (`--kms-key`, `kms_key=`).
    pub kms_key: Option<String>,
}

/// A volume whose config has been checked against this host's trust store
/// and its MAC, with a provider that unwraps only under trusted keys.
pub struct OpenVolume {
    /// The authenticated config.
    pub config: VolumeConfig,
    /// The provider, pinned to the trusted keys.
    pub provider: Arc<dyn KeyProvider>,
    /// The config predates authentication: use the volume read-only until
    /// `kmsfs upgrade`.
    pub legacy: bool,
}

/// Whether `path` lies inside `cipherdir` (after resolving both). Key files
/// there would be readable by whoever holds the cipher dir.
pub fn inside(cipherdir: &Path, path: &Path) -> bool {
    if path == Path::new("-") {
        return false; // standard input
    }
    let Ok(cd) = std::fs::canonicalize(cipherdir) else { return false };
    let Ok(abs) = std::path::absolute(path) else { return false };
    // The final component is never followed when the key is opened; resolve
    // the directory it sits in.
    let dir = abs.parent().and_then(|p| std::fs::canonicalize(p).ok());
    abs.starts_with(&cd) || dir.is_some_and(|d| d.starts_with(&cd))
}

impl VolumeConfig {
    /// Loads and validates `CIPHERDIR/kmsfs.conf`.
    pub fn load(cipherdir: &Path) -> Result<Self, VolumeError> {
        let path = cipherdir.join(CONFIG_NAME);
        let p = path.display().to_string();
        let text = read_config(cipherdir).map_err(|source| VolumeError::Io { path: p.clone(), source })?;
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
            previous_keys: Vec::new(),
            branch_keys: Vec::new(),
            auth_key: None,
            mac: None,
        })
    }

    /// Creates and wraps a new name key (switches the volume to encrypted names).
    pub fn create_name_key(&mut self, provider: &dyn KeyProvider) -> Result<(), VolumeError> {
        let id = crate::format::random_id()
            .map_err(|e| VolumeError::Invalid { path: CONFIG_NAME.into(), detail: e.to_string() })?;
        let ctx = KeyContext { volume_id: self.volume_id(), file_id: id, purpose: Some(Purpose::Name) };
        let (_key, wrapped) = provider.generate(&ctx)?;
        self.name_key = Some(StoredKey::from_wrapped(&ctx, &wrapped));
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

    /// Whether the volume is in branch key mode.
    pub fn is_branch(&self) -> bool {
        !self.branch_keys.is_empty()
    }

    /// Adds a new branch key version (GenerateDataKey under the volume's
    /// key, context {volume ID, branch ID, purpose `branch`}); new files use
    /// it. The caller re-signs the config. Returns the new version.
    pub fn create_branch_key(&mut self, provider: &dyn KeyProvider) -> Result<u32, VolumeError> {
        let v = self.branch_keys.iter().map(|b| b.version).max().unwrap_or(0).checked_add(1).ok_or_else(|| {
            VolumeError::Invalid { path: CONFIG_NAME.into(), detail: "no branch key version left".into() }
        })?;
        let id = crate::keys::branch::branch_id(v)?;
        let ctx = KeyContext { volume_id: self.volume_id(), file_id: id, purpose: Some(Purpose::Branch) };
        let (_key, wrapped) = provider.generate(&ctx)?;
        self.branch_keys.push(BranchKey { version: v, key: StoredKey::from_wrapped(&ctx, &wrapped) });
        Ok(v)
    }

    /// The branch versions with their wrapping contexts, checked: versions
    /// unique and at least 1, each key's purpose `branch` and its ID ending
    /// in its version.
    pub fn branch_versions(&self) -> Result<Vec<crate::keys::branch::BranchVersion>, VolumeError> {
        let bad = |d: String| VolumeError::Invalid { path: CONFIG_NAME.into(), detail: d };
        let mut out: Vec<crate::keys::branch::BranchVersion> = Vec::new();
        for b in &self.branch_keys {
            let (ctx, wrapped) = b
                .key
                .parts(self.volume_id())
                .ok_or_else(|| bad(format!("malformed branch key version {}", b.version)))?;
            if b.version == 0
                || ctx.purpose != Some(Purpose::Branch)
                || ctx.file_id[12..] != b.version.to_be_bytes()
                || out.iter().any(|o| o.version == b.version)
            {
                return Err(bad(format!("branch key version {} is inconsistent", b.version)));
            }
            out.push(crate::keys::branch::BranchVersion { version: b.version, ctx, wrapped });
        }
        Ok(out)
    }

    /// Creates a new config-authentication key and signs the config with
    /// it: `init` and `upgrade`.
    pub fn create_auth_key(&mut self, provider: &dyn KeyProvider) -> Result<(), VolumeError> {
        let id = crate::format::random_id()
            .map_err(|e| VolumeError::Invalid { path: CONFIG_NAME.into(), detail: e.to_string() })?;
        let ctx = KeyContext { volume_id: self.volume_id(), file_id: id, purpose: Some(Purpose::Config) };
        let (key, wrapped) = provider.generate(&ctx)?;
        self.auth_key = Some(StoredKey::from_wrapped(&ctx, &wrapped));
        self.sign(&key)
    }

    /// Unwraps the config-authentication key (one provider call).
    pub fn unwrap_auth_key(&self, provider: &dyn KeyProvider) -> Result<DataKey, VolumeError> {
        let path = CONFIG_NAME.to_string();
        let sk = self.auth_key.as_ref().ok_or_else(|| VolumeError::Untrusted {
            path: path.clone(),
            detail: "config has a MAC but no auth_key".into(),
        })?;
        let (ctx, w) = sk
            .parts(self.volume_id())
            .filter(|(c, _)| c.purpose == Some(Purpose::Config))
            .ok_or_else(|| VolumeError::Untrusted { path: path.clone(), detail: "malformed auth_key".into() })?;
        provider.unwrap(&w, &ctx).map_err(|e| match e {
            KeyError::InvalidCiphertext { .. } | KeyError::Untrusted { .. } | KeyError::WrongKey { .. } => {
                VolumeError::Untrusted { path, detail: format!("config authentication key does not open: {e}") }
            }
            e => VolumeError::Key(e),
        })
    }

    fn mac_key(&self, auth: &DataKey) -> aws_lc_rs::hmac::Key {
        use aws_lc_rs::hkdf;
        // HKDF-SHA256(salt = volume ID, ikm = auth key, info = label).
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &self.volume_id());
        let prk = salt.extract(auth.expose_secret());
        let info = [MAC_LABEL.as_bytes()];
        let okm = prk.expand(&info, aws_lc_rs::hmac::HMAC_SHA256);
        match okm {
            Ok(okm) => aws_lc_rs::hmac::Key::from(okm),
            // expand only fails for outputs longer than 255 hashes.
            Err(_) => aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, auth.expose_secret()),
        }
    }

    fn mac_input(&self) -> Result<Vec<u8>, VolumeError> {
        let a = Authenticated {
            label: MAC_LABEL,
            format_version: self.format_version,
            volume_id: &self.volume_id,
            provider: &self.provider,
            key_id: &self.key_id,
            previous_keys: &self.previous_keys,
            block_size: self.block_size,
            header_size: self.header_size,
            plaintext_names: self.plaintext_names,
            name_key: &self.name_key,
            auth_key: &self.auth_key,
            branch_keys: &self.branch_keys,
        };
        serde_json::to_vec(&a).map_err(|e| VolumeError::Invalid { path: CONFIG_NAME.into(), detail: e.to_string() })
    }

    /// Recomputes the MAC after a change (rewrap).
    pub fn sign(&mut self, auth: &DataKey) -> Result<(), VolumeError> {
        let tag = aws_lc_rs::hmac::sign(&self.mac_key(auth), &self.mac_input()?);
        self.mac = Some(hex(tag.as_ref()));
        Ok(())
    }

    /// Checks the MAC in constant time.
    pub fn verify_mac(&self, auth: &DataKey) -> Result<(), VolumeError> {
        let bad = || VolumeError::Untrusted {
            path: CONFIG_NAME.into(),
            detail: "volume config was modified (its MAC does not verify): refusing to use it".into(),
        };
        let mac = self.mac.as_deref().and_then(unhex::<32>).ok_or_else(bad)?;
        aws_lc_rs::hmac::verify(&self.mac_key(auth), &self.mac_input()?, &mac).map_err(|_| bad())
    }

    /// Opens the volume's key provider from the config alone, trusting it:
    /// only for `upgrade` of an unauthenticated config, which the user
    /// confirms. Everything else goes through [`open`].
    pub fn provider_unchecked(&self, keys: &KeyArgs) -> Result<Arc<dyn KeyProvider>, VolumeError> {
        match self.provider {
            ProviderKind::Local => {
                let path =
                    keys.key_file.clone().or_else(|| self.key_file.clone()).ok_or_else(|| VolumeError::Invalid {
                        path: CONFIG_NAME.into(),
                        detail: "no key_file recorded; pass --key-file".into(),
                    })?;
                let p = LocalProvider::open(&path)?;
                if p.key_id() != self.key_id {
                    return Err(KeyError::KeyFile {
                        path: path.display().to_string(),
                        detail: format!("this key is {}, but the volume was created with {}", p.key_id(), self.key_id),
                    }
                    .into());
                }
                Ok(Arc::new(p))
            }
            ProviderKind::AwsKms => {
                let key = keys.kms_key.as_deref().unwrap_or(&self.key_id);
                crate::keys::open_aws_kms(key, &[]).map_err(VolumeError::Key)
            }
        }
    }
}

fn read_config(cipherdir: &Path) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    // Checked as a small regular file before it is opened for reading: a
    // FIFO or device planted under the name is never opened.
    let dir = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)?;
    let bytes = crate::sys::read_regular(dir.as_raw_fd(), CONFIG_NAME.as_ref(), CONFIG_MAX as usize)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::other("not UTF-8"))
}

/// Opens a volume for use: loads its config, checks it against the trust
/// anchor (an explicitly named key, else this host's pin, else for a local
/// volume its key file), opens the provider pinned to the trusted key,
/// verifies the config MAC, and records the pin if this host had none.
pub fn open(cipherdir: &Path, keys: &KeyArgs) -> Result<OpenVolume, VolumeError> {
    open_with(cipherdir, keys, &TrustStore::default_location())
}

/// [`open`] with an explicit trust store.
pub fn open_with(cipherdir: &Path, keys: &KeyArgs, store: &TrustStore) -> Result<OpenVolume, VolumeError> {
    let cfg = VolumeConfig::load(cipherdir)?;
    let path = cipherdir.join(CONFIG_NAME).display().to_string();
    let untrusted = |detail: String| VolumeError::Untrusted { path: path.clone(), detail };
    if let Some(k) = keys.key_file.as_ref().or(cfg.key_file.as_ref()).filter(|k| inside(cipherdir, k)) {
        return Err(KeyError::KeyFile {
            path: k.display().to_string(),
            detail: "lies inside the cipher dir: key files must live outside it".into(),
        }
        .into());
    }
    let vid = cfg.volume_id();
    let pin = store.get(&vid).map_err(|e| untrusted(format!("trust store: {e}")))?;
    // A config without a MAC was written by an older kmsfs, or had its MAC
    // stripped. This host records a volume only once its config has been
    // authenticated, so here it can only be the second.
    let legacy = cfg.mac.is_none();
    if legacy && pin.is_some() {
        return Err(untrusted(format!(
            "this host knows volume {} with an authenticated config, but this config has no MAC: it was \
             stripped; refusing it",
            cfg.volume_id
        )));
    }
    let provider: Arc<dyn KeyProvider> = match cfg.provider {
        ProviderKind::Local => {
            let p = cfg.provider_unchecked(keys)?;
            if let Some(pin) = &pin
                && (pin.provider != ProviderKind::Local || pin.key_id != cfg.key_id)
                && keys.key_file.is_none()
            {
                return Err(untrusted(format!(
                    "this host trusts {} for volume {}, but the config names {}; if the volume was re-keyed, \
                     pass --key-file with its new key once",
                    pin.key_id, cfg.volume_id, cfg.key_id
                )));
            }
            p
        }
        ProviderKind::AwsKms => {
            let trusted = match (&keys.kms_key, &pin) {
                (Some(k), _) => k.clone(),
                (None, Some(pin)) if pin.provider == ProviderKind::AwsKms => pin.key_id.clone(),
                _ => {
                    return Err(untrusted(format!(
                        "this host has no trusted KMS key for volume {}: pass --kms-key with the volume's key \
                         ARN once (it is then recorded in {})",
                        cfg.volume_id,
                        store.dir().display()
                    )));
                }
            };
            let p = crate::keys::open_aws_kms(&trusted, &[])?;
            // The config must name the trusted key itself; an alias given on
            // the command line is resolved first (one DescribeKey).
            if cfg.key_id != trusted {
                p.check()?;
                if cfg.key_id != p.key_id() {
                    return Err(untrusted(format!(
                        "the config names KMS key {}, but the trusted key for volume {} is {}; \
                         if you rewrapped the volume, pass --kms-key with its new key once",
                        cfg.key_id,
                        cfg.volume_id,
                        p.key_id()
                    )));
                }
            }
            p
        }
    };
    if legacy {
        // Read-only use only (the callers enforce it): nothing can be
        // written under a config nobody vouched for, and reads still only
        // accept data under the trusted key. Not recorded as trusted.
        tracing::warn!(
            "{path}: config not authenticated (made by an older kmsfs): read-only until `kmsfs upgrade {}`",
            cipherdir.display()
        );
        return Ok(OpenVolume { config: cfg, provider, legacy });
    }
    // The auth key is always wrapped under the volume's current key, so
    // this unwrap trusts that key alone.
    let auth = cfg.unwrap_auth_key(provider.as_ref())?;
    cfg.verify_mac(&auth)?;
    drop(auth);
    provider.trust_also(&cfg.previous_keys);
    let provider: Arc<dyn KeyProvider> = if cfg.is_branch() {
        if cfg.provider != ProviderKind::AwsKms {
            return Err(untrusted("branch keys in a volume that does not use aws-kms".into()));
        }
        // Makes no KMS call: branch keys are unwrapped on first use.
        Arc::new(crate::keys::branch::BranchProvider::new(provider, vid, cfg.branch_versions()?)?)
    } else {
        provider
    };
    let want = Pin { volume_id: cfg.volume_id.clone(), provider: cfg.provider.clone(), key_id: cfg.key_id.clone() };
    if pin.as_ref() != Some(&want) {
        // First use on this host, or a re-key the user confirmed by naming
        // the new key: remember it.
        if let Err(e) = store.put(&want) {
            tracing::warn!("cannot record the trusted key in {}: {e}", store.dir().display());
        }
    }
    Ok(OpenVolume { config: cfg, provider, legacy })
}

/// Records this host's trust in a volume's key (`init`, `upgrade`, rewrap).
pub fn pin(cfg: &VolumeConfig) -> Result<(), VolumeError> {
    let store = TrustStore::default_location();
    store
        .put(&Pin { volume_id: cfg.volume_id.clone(), provider: cfg.provider.clone(), key_id: cfg.key_id.clone() })
        .map_err(|e| VolumeError::Io { path: store.dir().display().to_string(), source: e })
}

/// Takes the cipher-dir lock: shared for a mount, exclusive for rewrap and
/// upgrade. A `flock` on a file inside the cipher dir, so it holds across
/// mount namespaces, whatever `fsname=` says, and (on NFS, where Linux maps
/// flock to byte-range locks) across hosts. Held until the file is dropped.
pub fn lock(cipherdir: &Path, exclusive: bool) -> Result<std::fs::File, VolumeError> {
    use std::os::fd::AsRawFd;
    let path = cipherdir.join(LOCK_NAME);
    let io = |source| VolumeError::Io { path: path.display().to_string(), source };
    let dir =
        crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0).map_err(io)?;
    let name = std::ffi::OsStr::new(LOCK_NAME);
    // The entry is checked to be a regular file before it is opened (a FIFO
    // or device planted under the name is never opened); if missing, it is
    // created new, never through a link.
    let existing = || -> std::io::Result<std::fs::File> {
        let p = crate::sys::open_path(dir.as_raw_fd(), name)?;
        if crate::sys::fstat(p.as_raw_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(std::io::Error::other("not a regular file"));
        }
        // A read-only cipher dir can still be mounted read-only.
        crate::sys::reopen(&p, libc::O_RDWR | libc::O_NONBLOCK)
            .or_else(|_| crate::sys::reopen(&p, libc::O_RDONLY | libc::O_NONBLOCK))
            .map(std::fs::File::from)
    };
    let f = match existing() {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            match crate::sys::open_beneath(dir.as_raw_fd(), name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600) {
                Ok(f) => Ok(std::fs::File::from(f)),
                // Made by another command meanwhile.
                Err(e2) if e2.raw_os_error() == Some(libc::EEXIST) => existing(),
                Err(_) => Err(e),
            }
        }
        r => r,
    }
    .map_err(io)?;
    let r = if exclusive { f.try_lock() } else { f.try_lock_shared() };
    match r {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(VolumeError::Busy(BusyError {
            path: cipherdir.display().to_string(),
            detail: if exclusive {
                "the volume is mounted (on this or another host) or another rewrap/upgrade runs: unmount it first"
            } else {
                "a rewrap or upgrade of this volume is running: wait for it to finish"
            }
            .into(),
        })),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-file configs keep the MAC input they had before branch mode, so
    /// existing volumes still verify; branch keys are appended when present.
    #[test]
    fn mac_input_is_unchanged_without_branch_keys() {
        let mut c =
            VolumeConfig::new(ProviderKind::AwsKms, "arn:aws:kms:us-east-1:1:key/k".into(), None, 4096).unwrap();
        let m = String::from_utf8(c.mac_input().unwrap()).unwrap();
        let want = format!(
            "{{\"label\":\"kmsfs-config-mac-v1\",\"format_version\":1,\"volume_id\":\"{}\",\"provider\":\"aws-kms\",\
             \"key_id\":\"arn:aws:kms:us-east-1:1:key/k\",\"previous_keys\":[],\"block_size\":4096,\
             \"header_size\":512,\"plaintext_names\":true,\"name_key\":null,\"auth_key\":null}}",
            c.volume_id
        );
        assert_eq!(m, want);
        let key = StoredKey {
            id: "00".repeat(15) + "01",
            provider: "aws-kms".into(),
            key_id: "k".into(),
            blob: "AA==".into(),
            purpose: Some(Purpose::Branch),
        };
        c.branch_keys.push(BranchKey { version: 1, key });
        let m = String::from_utf8(c.mac_input().unwrap()).unwrap();
        assert!(m.ends_with(
            "\"auth_key\":null,\"branch_keys\":[{\"version\":1,\"key\":{\"id\":\"00000000000000000000000000000001\",\
             \"provider\":\"aws-kms\",\"key_id\":\"k\",\"blob\":\"AA==\",\"purpose\":\"branch\"}}]}"
        ));
        assert_eq!(c.branch_versions().unwrap()[0].version, 1);
        c.branch_keys[0].version = 2;
        assert!(c.branch_versions().is_err(), "ID must end in the version");
    }
}
