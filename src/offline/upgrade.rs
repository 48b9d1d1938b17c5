//! `kmsfs upgrade`: a legacy (unauthenticated) config signed, once, on a
//! trusted host, and legacy directory-ID records made authenticated ones.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::admin::{AdminError, Locked, load, store};
use super::walk::WalkDir;
use super::{OpError, io_err};
use crate::names::{DirKey, EntryKind, Names};
use crate::volume::{KeyArgs, OpenVolume, ProviderKind, VolumeConfig};

/// What [`upgrade_dir_ids`] did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UpgradeReport {
    /// Directories whose legacy ID record became an authenticated one.
    pub upgraded: Vec<String>,
    /// Entries renamed to names under the authenticated label.
    pub renamed: u64,
    /// Directories left as they were, with the reason (an unreadable ID,
    /// or entries whose names decrypt under neither label).
    pub skipped: Vec<(String, String)>,
}

/// Gives every directory that still has a legacy (unauthenticated, 16-byte)
/// ID record an authenticated one: renames its entries to their names under
/// the "name2" label, then writes the new record bound to its parent's ID.
/// For `kmsfs upgrade`: offline, under the cipher-dir lock, on a host the
/// user trusts, since the legacy IDs found are taken as they are. An
/// interrupted run leaves a directory's already renamed entries hidden until
/// the next run, which recognises them and finishes.
pub fn upgrade_dir_ids(cipherdir: &Path, names: &Names) -> Result<UpgradeReport, OpError> {
    use crate::names::escape;
    let mut r = UpgradeReport::default();
    if !names.encrypted() {
        return Ok(r);
    }
    let root = crate::sys::openat(libc::AT_FDCWD, cipherdir.as_os_str(), libc::O_PATH | libc::O_DIRECTORY, 0)
        .map_err(io_err(cipherdir))?;
    // Each directory with its parent's ID, which its record is bound to.
    let root = WalkDir { fd: root, rel: PathBuf::new(), plain: String::new(), key: Some(DirKey::ROOT) };
    let mut stack = vec![(root, crate::names::ROOT_DIR_ID)];
    while let Some((mut d, parent)) = stack.pop() {
        let here = cipherdir.join(&d.rel);
        let Some(key) = d.key else { continue };
        let at_root = d.rel.as_os_str().is_empty();
        if !at_root && !key.bound {
            match upgrade_one(&d.fd, &key, &parent, names) {
                Ok(n) => {
                    r.renamed += n;
                    r.upgraded.push(d.plain.clone());
                    d.key = Some(DirKey { id: key.id, bound: true });
                }
                Err(e) => {
                    r.skipped.push((d.plain.clone(), e.to_string()));
                    continue;
                }
            }
        }
        let Some(key) = d.key else { continue };
        let entries: Vec<_> = std::fs::read_dir(crate::sys::proc_path(&d.fd))
            .map_err(io_err(&here))?
            .collect::<Result<_, _>>()
            .map_err(io_err(&here))?;
        for e in entries {
            let raw = e.file_name();
            if !e.file_type().map_err(io_err(&here.join(&raw)))?.is_dir() || names.classify(&raw) == EntryKind::Internal
            {
                continue;
            }
            let Some(plain) = entry_name(&d.fd, &raw, &key, names) else { continue };
            let fd = crate::sys::open_beneath(d.fd.as_raw_fd(), &raw, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err(&here.join(&raw)))?;
            let shown = format!("{}/{}", d.plain, escape(plain.as_bytes()));
            let child = match crate::names::dirid::load_dir_id(&fd, &key.id, names, false) {
                Ok(l) => Some(l.key),
                Err(err) => {
                    r.skipped.push((shown.clone(), err.to_string()));
                    None
                }
            };
            stack.push((WalkDir { fd, rel: d.rel.join(&raw), plain: shown, key: child }, key.id));
        }
    }
    Ok(r)
}

/// The plaintext name of entry `raw` of a directory, under `key`.
fn entry_name(dir: &OwnedFd, raw: &std::ffi::OsStr, key: &DirKey, names: &Names) -> Option<std::ffi::OsString> {
    let encoded = names.stored_name(dir.as_raw_fd(), raw)?.ok()?;
    names.decrypt(key, &encoded).ok()
}

/// Renames the entries of one legacy directory to their authenticated-label
/// names (a long name's new side file first, its old one last), then writes
/// its authenticated record. Returns how many entries were renamed.
fn upgrade_one(dir: &OwnedFd, legacy: &DirKey, parent: &crate::format::Id, names: &Names) -> std::io::Result<u64> {
    let bound = DirKey { id: legacy.id, bound: true };
    let fd = dir.as_raw_fd();
    let mut renamed = 0;
    for e in std::fs::read_dir(crate::sys::proc_path(dir))? {
        let raw = e?.file_name();
        if names.classify(&raw) == EntryKind::Internal || entry_name(dir, &raw, &bound, names).is_some() {
            continue; // bookkeeping, or renamed by an interrupted run
        }
        let Some(plain) = entry_name(dir, &raw, legacy, names) else {
            return Err(std::io::Error::other(format!(
                "entry {} decrypts under neither label; left as it is",
                crate::names::escape(raw.as_bytes())
            )));
        };
        let new = names.encrypt(&bound, &plain).map_err(std::io::Error::other)?;
        if let (Some(side), Some(full)) = (new.side_file(), &new.long) {
            crate::sys::replace_file(fd, &side, full.as_bytes(), 0o644)?;
            crate::sys::fsync_dir(dir)?;
        }
        crate::sys::renameat2(fd, &raw, fd, &new.on_disk, libc::RENAME_NOREPLACE)?;
        if names.classify(&raw) == EntryKind::Long {
            let _ = crate::sys::unlinkat(fd, &crate::names::side_file_of(&raw), 0);
        }
        renamed += 1;
    }
    crate::sys::fsync_dir(dir)?;
    crate::names::dirid::store_dir_id(dir, &names.dir_record(&bound.id, &[parent]))?;
    Ok(renamed)
}

/// How `upgrade` starts, by the config it finds.
pub enum UpgradeStart {
    /// The config is authenticated already (and was verified, which also
    /// recorded this host's trust): only directories may be left to do.
    Authenticated(Locked),
    /// A legacy config, checked and ready to be signed.
    Legacy(LegacyUpgrade),
}

/// A legacy config checked for `upgrade`, under the exclusive lock.
pub struct LegacyUpgrade {
    vol: Locked,
    /// The key reference the config named, when its ARN replaced it.
    pub arn_replaced: Option<String>,
}

impl LegacyUpgrade {
    /// The config that will be signed.
    pub fn config(&self) -> &VolumeConfig {
        &self.vol.config
    }
}

/// `upgrade`, first step: locks the volume and reads its config. An
/// authenticated one is verified as a mount would. A legacy one is refused
/// when it cannot be the volume's own: this host trusts the volume already
/// (so it saw the config authenticated, and the MAC was stripped), it lists
/// previous keys (which only authenticated configs have), or it names a KMS
/// key the user did not (the cipher dir cannot say which key is the
/// volume's). Else the key is checked and its name key must unwrap.
pub fn upgrade_start(cipherdir: &Path, keys: KeyArgs) -> Result<UpgradeStart, AdminError> {
    let lock = crate::volume::lock(cipherdir, true)?;
    let mut cfg = load(cipherdir)?;
    if cfg.mac.is_some() {
        let OpenVolume { config, provider, .. } = crate::volume::open(cipherdir, &keys)?;
        return Ok(UpgradeStart::Authenticated(Locked { _lock: lock, config, provider }));
    }
    // Every config this kmsfs writes has a MAC, and this host records a pin
    // only for a config it checked or signed. So a legacy config for a
    // volume pinned here had its MAC stripped: signing it would accept
    // whatever was changed with it (names mode, key, name key).
    let conf = cipherdir.join(crate::volume::CONFIG_NAME);
    match crate::trust::TrustStore::default_location().get(&cfg.volume_id()) {
        Ok(None) => {}
        Ok(Some(pin)) => {
            return Err(AdminError::Config(format!(
                "{}: this host already trusts volume {} (key {}) and saw its config authenticated; this copy \
                 has no MAC, so it was modified: restore the config from a backup instead of upgrading it",
                conf.display(),
                cfg.volume_id,
                pin.key_id
            )));
        }
        Err(e) => return Err(AdminError::Config(format!("trust store: {e}"))),
    }
    // Earlier keys came with authenticated configs: a legacy one listing
    // some was forged, to have them signed as trusted.
    if !cfg.previous_keys.is_empty() {
        return Err(AdminError::Config(format!(
            "{}: lists previous_keys but has no MAC, which no kmsfs writes: it was modified",
            conf.display()
        )));
    }
    // The cipher dir cannot say which KMS key is the volume's (anyone with a
    // key of their own could write a config under it): the user names it.
    if cfg.provider == ProviderKind::AwsKms && keys.kms_key.is_none() {
        return Err(AdminError::Config(format!(
            "{}: the unauthenticated config names KMS key {}; if that is the volume's key, run upgrade again \
             with --kms-key and its ARN",
            conf.display(),
            cfg.key_id.escape_debug()
        )));
    }
    let provider = cfg.provider_unchecked(&keys)?;
    provider.check()?;
    let mut arn_replaced = None;
    if cfg.provider == ProviderKind::AwsKms {
        let arn = provider.key_id();
        if arn.starts_with("arn:") && cfg.key_id != arn {
            arn_replaced = Some(std::mem::replace(&mut cfg.key_id, arn));
        }
    }
    // The name key unwraps under this key, or the config is not this volume's.
    cfg.names(provider.as_ref())?;
    Ok(UpgradeStart::Legacy(LegacyUpgrade { vol: Locked { _lock: lock, config: cfg, provider }, arn_replaced }))
}

/// `upgrade`, second step: signs the legacy config under a new config key,
/// writes it and records its key as trusted on this host.
pub fn upgrade_authenticate(cipherdir: &Path, u: LegacyUpgrade) -> Result<Locked, AdminError> {
    let mut vol = u.vol;
    vol.config.create_auth_key(vol.provider.as_ref())?;
    store(&vol.config, cipherdir)?;
    crate::volume::pin(&vol.config)?;
    Ok(vol)
}

/// `upgrade`, last step: gives directories with legacy (unauthenticated)
/// ID records authenticated ones ([`upgrade_dir_ids`]).
pub fn upgrade_dirs(cipherdir: &Path, vol: &Locked) -> Result<UpgradeReport, AdminError> {
    let names = vol.config.names(vol.provider.as_ref())?;
    upgrade_dir_ids(cipherdir, &names).map_err(|e| AdminError::Other(e.to_string()))
}

/// `upgrade`, file contents: rewrites every format v1 file as v2
/// ([`super::upgrade_files`]); files already v2 are skipped, so a run that
/// was interrupted is finished by the next.
pub fn upgrade_contents(
    cipherdir: &Path,
    vol: &Locked,
    progress: impl FnMut(super::Progress),
) -> Result<super::FilesReport, AdminError> {
    let names = vol.config.names(vol.provider.as_ref())?;
    let layout = vol.config.layout().ok_or_else(|| AdminError::Other("bad block or header size".into()))?;
    super::upgrade_files(cipherdir, layout, vol.config.volume_id(), &names, vol.provider.as_ref(), progress)
        .map_err(|e| AdminError::Other(e.to_string()))
}
