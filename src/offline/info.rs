//! `kmsfs info`: what a volume's config says, read without a key (its MAC
//! is checked only when asked), and what this host's trust store records.

use std::path::Path;

use super::admin::{AdminError, load};
use crate::volume::{KeyArgs, ProviderKind, VolumeConfig};

/// A volume described.
pub struct VolumeInfo {
    /// Its config.
    pub config: VolumeConfig,
    /// The description: `provider`, `names`, `authenticated` and `trust`
    /// as text, with the config's fields and this host's trust record.
    pub json: serde_json::Value,
}

/// Describes the volume; with `verify`, opens it through the same trust
/// checks as mount (one key-provider call) so its MAC is verified.
pub fn describe(cipherdir: &Path, verify: bool, keys: &KeyArgs) -> Result<VolumeInfo, AdminError> {
    let cfg = if verify { crate::volume::open(cipherdir, keys)?.config } else { load(cipherdir)? };
    let pin = crate::trust::TrustStore::default_location()
        .get(&cfg.volume_id())
        .map_err(|e| AdminError::Other(format!("trust store: {e}")))?;
    let provider = match cfg.provider {
        ProviderKind::Local => "local",
        ProviderKind::AwsKms => "aws-kms",
    };
    let authenticated = match (&cfg.mac, verify) {
        (None, _) => "no (made by an older kmsfs: run kmsfs upgrade)",
        (Some(_), true) => "yes (MAC verified)",
        (Some(_), false) => "MAC present (not verified: use --verify)",
    };
    let trust = match &pin {
        Some(p) if p.key_id == cfg.key_id => format!("this host trusts {} for this volume", p.key_id),
        Some(p) => format!("this host trusts {}, NOT the key this config names", p.key_id),
        None => "no record on this host (name the key once: --kms-key or --key-file)".into(),
    };
    let v = serde_json::json!({
        "volume_id": cfg.volume_id,
        "provider": provider,
        "key_id": cfg.key_id,
        "key_file": cfg.key_file,
        "previous_keys": cfg.previous_keys,
        "names": if cfg.plaintext_names { "plaintext" } else { "encrypted" },
        "block_size": cfg.block_size,
        "header_size": cfg.header_size,
        "format_version": cfg.format_version,
        "config_mac": cfg.mac.is_some(),
        "config_verified": verify && cfg.mac.is_some(),
        "authenticated": authenticated,
        "trust_record": pin.as_ref().map(|p| serde_json::json!({"provider": p.provider, "key_id": p.key_id})),
        "trust": trust,
    });
    Ok(VolumeInfo { config: cfg, json: v })
}
