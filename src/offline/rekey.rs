//! The volume-key side of rewrap and rotate-branch: which key the volume
//! moves to, its own keys (name, config, branch keys) re-wrapped, and the
//! config rewritten so that an interrupted run leaves every file readable.
//! The files themselves are `offline::rewrap`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::admin::{AdminError, Locked, layout_of, store};
use crate::format::layout::Layout;
use crate::keys::local::LocalProvider;
use crate::keys::{DataKey, KeyProvider};
use crate::names::Names;
use crate::volume::{ProviderKind, StoredKey, VolumeConfig};

/// Re-wraps one stored volume key from `source` to `dest` (one ReEncrypt
/// when both are the same KMS provider).
fn move_key(
    sk: &StoredKey,
    what: &str,
    cfg: &VolumeConfig,
    source: &dyn KeyProvider,
    dest: &dyn KeyProvider,
) -> Result<StoredKey, AdminError> {
    let (ctx, w) = sk.parts(cfg.volume_id()).ok_or(AdminError::Config(format!("malformed {what}")))?;
    let nw = if source.name() == dest.name() && dest.name() != crate::keys::local::NAME {
        dest.rewrap(&w, &ctx)
    } else {
        source.unwrap(&w, &ctx).and_then(|k| dest.wrap(&k, &ctx))
    }
    .map_err(|e| AdminError::KeyFailed(format!("{what}: {e}")))?;
    Ok(StoredKey::from_wrapped(&ctx, &nw))
}

/// A per-file-mode volume ready to move to a new key: the destination
/// resolved, the volume keys re-wrapped (not yet written), and, for a KMS
/// key, the new key already trusted for reading in the config.
pub struct Rekey {
    vol: Locked,
    dest: Arc<dyn KeyProvider>,
    kind: ProviderKind,
    key_id: String,
    key_file: Option<PathBuf>,
    old_key: String,
    auth: DataKey,
    name_key: Option<StoredKey>,
    auth_key: Option<StoredKey>,
    names: Names,
    layout: Layout,
}

impl Rekey {
    /// The current provider (reads the files' keys).
    pub fn source(&self) -> &dyn KeyProvider {
        self.vol.provider.as_ref()
    }
    /// The new provider.
    pub fn dest(&self) -> &dyn KeyProvider {
        self.dest.as_ref()
    }
    /// The volume's names (to walk it).
    pub fn names(&self) -> &Names {
        &self.names
    }
    /// The volume's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }
}

/// `rewrap`, first step for a per-file-mode volume: resolves `to_key` (KMS)
/// or `to_key_file` (local, created if missing), lets the destination
/// re-wrap from the keys this volume trusts, trusts a new KMS key for
/// reading from the start (written to the config now, so an interrupted
/// rewrap leaves every file readable), and re-wraps the volume keys, which
/// are small: a failure here changes no file.
pub fn rekey_prepare(
    cipherdir: &Path,
    vol: Locked,
    to_key: Option<String>,
    to_key_file: Option<PathBuf>,
) -> Result<Rekey, AdminError> {
    let (dest, kind, key_id, key_file): (Arc<dyn KeyProvider>, ProviderKind, String, Option<PathBuf>) =
        if let Some(k) = to_key {
            let p = crate::keys::open_aws_kms(&k, &[])?;
            p.check()?;
            let arn = p.key_id();
            (p, ProviderKind::AwsKms, arn, None)
        } else if let Some(f) = to_key_file {
            let p = if f.exists() { LocalProvider::open(&f) } else { LocalProvider::create_key_file(&f) }?;
            let id = p.key_id();
            let abs = std::path::absolute(&f).unwrap_or(f);
            (Arc::new(p), ProviderKind::Local, id, Some(abs))
        } else {
            return Err(AdminError::Usage("rewrap needs --to-key or --to-key-file".into()));
        };
    let mut vol = vol;
    let cfg = &mut vol.config;
    let source = vol.provider.clone();
    let old_key = cfg.key_id.clone();
    // ReEncrypt runs on the destination's client: it may name as source only
    // the keys this volume trusts.
    dest.trust_also(&[vec![old_key.clone()], cfg.previous_keys.clone()].concat());
    let auth = cfg.unwrap_auth_key(source.as_ref())?;
    if kind == ProviderKind::AwsKms && !cfg.previous_keys.contains(&key_id) && key_id != old_key {
        // Files move to the new key one by one: trust it for reading from
        // the start, so an interrupted rewrap leaves every file readable.
        cfg.previous_keys.push(key_id.clone());
        cfg.sign(&auth)?;
        store(cfg, cipherdir)?;
        source.trust_also(&cfg.previous_keys);
    }
    let names = cfg.names(source.as_ref())?;
    // The volume keys first: they are small, and a failure here changes nothing.
    let name_key = cfg.name_key.as_ref().map(|sk| move_key(sk, "name key", cfg, &*source, &*dest)).transpose()?;
    let auth_key = cfg.auth_key.as_ref().map(|sk| move_key(sk, "config key", cfg, &*source, &*dest)).transpose()?;
    let layout = layout_of(cfg)?;
    Ok(Rekey { vol, dest, kind, key_id, key_file, old_key, auth, name_key, auth_key, names, layout })
}

/// `rewrap`, last step, once every file is under the new key: the config
/// names the new key (the old one stays trusted for reading if it is a KMS
/// key), holds the re-wrapped volume keys, is signed and written, and this
/// host trusts the new key. Returns the config written.
pub fn rekey_finish(cipherdir: &Path, r: Rekey) -> Result<VolumeConfig, AdminError> {
    let Rekey { vol, kind, key_id, key_file, old_key, auth, name_key, auth_key, .. } = r;
    let mut cfg = vol.config;
    cfg.previous_keys.retain(|k| *k != key_id);
    if cfg.provider == ProviderKind::AwsKms && !cfg.previous_keys.contains(&old_key) {
        cfg.previous_keys.push(old_key);
    }
    if kind == ProviderKind::Local {
        // A local key only ever opens its own wrappings.
        cfg.previous_keys.clear();
    }
    cfg.provider = kind;
    cfg.key_id = key_id;
    cfg.key_file = key_file;
    cfg.name_key = name_key;
    cfg.auth_key = auth_key;
    cfg.sign(&auth)?;
    store(&cfg, cipherdir)?;
    crate::volume::pin(&cfg)?;
    Ok(cfg)
}

/// Refuses a rewrap request a branch-mode volume cannot take: `--all-files`
/// on a per-file volume, a local key, or nothing to do.
pub fn branch_request(
    cfg: &VolumeConfig,
    to_key: Option<&str>,
    to_key_file: Option<&Path>,
    all_files: bool,
) -> Result<(), AdminError> {
    if !cfg.is_branch() {
        return Err(AdminError::Usage("--all-files applies to branch-mode volumes only".into()));
    }
    if to_key_file.is_some() {
        return Err(AdminError::Usage("a branch-mode volume needs a KMS key: use --to-key".into()));
    }
    if to_key.is_none() && !all_files {
        return Err(AdminError::Usage(
            "rewrap of a branch-mode volume needs --to-key (re-wraps the branch keys) and/or --all-files".into(),
        ));
    }
    Ok(())
}

/// What [`rekey_branch`] did.
pub struct BranchRekeyed {
    /// Volume keys re-wrapped (branch keys, name key, config key).
    pub keys: usize,
    /// The new key's ARN.
    pub key_id: String,
}

/// `rewrap --to-key` of a branch-mode volume: re-wraps only the volume keys
/// (O(1) KMS calls, no file touched). With `dry_run`, writes nothing.
pub fn rekey_branch(
    cipherdir: &Path,
    vol: &mut Locked,
    to_key: &str,
    dry_run: bool,
) -> Result<BranchRekeyed, AdminError> {
    let key = |e: &dyn std::fmt::Display| AdminError::KeyFailed(e.to_string());
    let dest = crate::keys::open_aws_kms(to_key, &[]).map_err(|e| key(&e))?;
    dest.check().map_err(|e| key(&e))?;
    let arn = dest.key_id();
    let cfg = &mut vol.config;
    let source = vol.provider.as_ref();
    // ReEncrypt names the source key: only the keys this volume trusts.
    dest.trust_also(&[vec![cfg.key_id.clone()], cfg.previous_keys.clone()].concat());
    let auth = cfg.unwrap_auth_key(source)?;
    // Same provider: every key moves by one ReEncrypt on `dest`.
    let mv = |sk: &StoredKey, what: &str| move_key(sk, what, cfg, &*dest, &*dest);
    let name_key = cfg.name_key.as_ref().map(|sk| mv(sk, "name key")).transpose()?;
    let auth_key = cfg.auth_key.as_ref().map(|sk| mv(sk, "config key")).transpose()?;
    let mut branch_keys = cfg.branch_keys.clone();
    for b in &mut branch_keys {
        b.key = mv(&b.key, &format!("branch key version {}", b.version))?;
    }
    let n = branch_keys.len() + usize::from(name_key.is_some()) + usize::from(auth_key.is_some());
    if dry_run {
        return Ok(BranchRekeyed { keys: n, key_id: arn });
    }
    // One atomic config write: every volume key moves at once, and no file
    // key was ever wrapped under the old key, so nothing needs it afterwards.
    cfg.name_key = name_key;
    cfg.auth_key = auth_key;
    cfg.branch_keys = branch_keys;
    cfg.key_id = arn;
    cfg.previous_keys.clear();
    cfg.sign(&auth)?;
    store(cfg, cipherdir)?;
    crate::volume::pin(cfg)?;
    Ok(BranchRekeyed { keys: n, key_id: cfg.key_id.clone() })
}

/// `rotate-branch`: a new branch key version for new files (one
/// GenerateDataKey); files under older versions stay readable. Returns the
/// new version.
pub fn rotate_branch(cipherdir: &Path, vol: &mut Locked) -> Result<u32, AdminError> {
    let cfg = &mut vol.config;
    if !cfg.is_branch() {
        return Err(AdminError::Usage("rotate-branch applies to branch-mode volumes only".into()));
    }
    let auth = cfg.unwrap_auth_key(vol.provider.as_ref())?;
    let v = cfg.create_branch_key(vol.provider.as_ref())?;
    cfg.sign(&auth)?;
    store(cfg, cipherdir)?;
    Ok(v)
}
