//! Branch key mode: one KMS call per mount (and per max age) instead of one
//! per create and per cold open.
//!
//! The volume keeps a few 256-bit branch keys ("versions"), each made by
//! GenerateDataKey under the volume's KMS key with the context {volume ID,
//! branch ID, purpose `branch`} and stored wrapped in the authenticated
//! config. Per-file DEKs stay random; each is wrapped locally with
//! AES-256-GCM under HKDF(branch key, volume ID, file ID, version), the same
//! shape as S3 Bucket Keys and the AWS Encryption SDK's hierarchical keyring.
//!
//! Revocation: an unwrapped branch key is used for at most one max age after
//! KMS last confirmed it (one Decrypt), so `disable-key` stops creates and
//! cache misses within one max age, and `enable-key` restores them without a
//! remount. Volume keys (name and config keys) carry a purpose and go to the
//! inner provider unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aws_lc_rs::hkdf;
use ring::aead::{Aad, Nonce};
use zeroize::Zeroizing;

use super::{DataKey, KeyContext, KeyError, KeyProvider, WrappedKey};
use crate::format::{DEK_LEN, Id, NONCE_LEN, TAG_LEN, hex};

/// Provider name in the headers of branch-mode files.
pub const NAME: &str = "aws-kms-branch";
/// Domain label of the per-file wrapping (HKDF salt and AAD prefix).
const WRAP_LABEL: &[u8] = b"kmsfs-branch-wrap-v1";
/// Prefix of the key ID in headers: `branch:` + the decimal version.
const KEY_ID_PREFIX: &str = "branch:";
/// After a failed branch-key check, callers get the same error without a
/// KMS call for this long, so a disabled key does not turn every create into
/// a Decrypt; it also bounds how long after `enable-key` access resumes.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Length of a wrapped DEK: nonce, ciphertext, tag.
pub const BLOB_LEN: usize = NONCE_LEN + DEK_LEN + TAG_LEN;

/// The key ID a header names for branch version `v`.
pub fn key_id_for(v: u32) -> String {
    format!("{KEY_ID_PREFIX}{v}")
}

/// The branch version a header's key ID names (canonical form only).
pub fn version_of(key_id: &str) -> Option<u32> {
    let v: u32 = key_id.strip_prefix(KEY_ID_PREFIX)?.parse().ok()?;
    (v >= 1 && key_id_for(v) == key_id).then_some(v)
}

/// The ID of branch version `v`: 12 random bytes, then `v` (u32, big-endian),
/// so the KMS encryption context of a branch key names its version.
pub fn branch_id(v: u32) -> Result<Id, KeyError> {
    let mut id = crate::format::random_id().map_err(|e| KeyError::Other(e.to_string()))?;
    id[12..].copy_from_slice(&v.to_be_bytes());
    Ok(id)
}

/// One branch version as stored in the config: its number, the context it
/// was wrapped under and the wrapped key.
#[derive(Clone, Debug)]
pub struct BranchVersion {
    /// Version number (1, 2, ...).
    pub version: u32,
    /// Wrapping context {volume ID, branch ID, purpose `branch`}.
    pub ctx: KeyContext,
    /// The KMS-wrapped branch key.
    pub wrapped: WrappedKey,
}

#[derive(Default)]
struct Slot {
    /// The unwrapped branch key and when KMS last confirmed it.
    key: Option<(Arc<DataKey>, Instant)>,
    /// The last failed check, replayed for `RETRY_AFTER_FAILURE`.
    failed: Option<(Instant, KeyError)>,
}

/// Wraps file DEKs locally under branch keys unwrapped by `inner`.
///
/// No `Clone`, no `Debug`: it holds unwrapped branch keys (`DataKey`s,
/// zeroized when dropped).
pub struct BranchProvider {
    inner: Arc<dyn KeyProvider>,
    volume_id: Id,
    versions: Vec<BranchVersion>,
    current: u32,
    ttl: Mutex<Duration>,
    slots: Mutex<HashMap<u32, Slot>>,
    /// Single flight: one KMS Decrypt at a time, however many callers wait.
    fetch: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BranchProvider {
    /// A provider over `inner` for a volume's branch versions. New files use
    /// the highest version. Makes no KMS call.
    pub fn new(inner: Arc<dyn KeyProvider>, volume_id: Id, versions: Vec<BranchVersion>) -> Result<Self, KeyError> {
        let current = versions
            .iter()
            .map(|v| v.version)
            .max()
            .ok_or_else(|| KeyError::Other("branch-mode volume without a branch key".into()))?;
        Ok(Self {
            inner,
            volume_id,
            versions,
            current,
            ttl: Mutex::new(super::cache::DEFAULT_MAX_AGE),
            slots: Mutex::new(HashMap::new()),
            fetch: Mutex::new(()),
        })
    }

    /// The version new files are wrapped under.
    pub fn current(&self) -> u32 {
        self.current
    }

    fn ttl(&self) -> Duration {
        *lock(&self.ttl)
    }

    /// The branch key if KMS confirmed it within the max age; the replayed
    /// error during the pause after a failure; `None` if a check is due.
    fn fresh(&self, v: u32, ttl: Duration) -> Result<Option<Arc<DataKey>>, KeyError> {
        let slots = lock(&self.slots);
        let Some(slot) = slots.get(&v) else { return Ok(None) };
        if let Some((at, e)) = &slot.failed
            && at.elapsed() < RETRY_AFTER_FAILURE.min(ttl)
        {
            return Err(e.clone());
        }
        Ok(slot.key.as_ref().filter(|(_, at)| at.elapsed() < ttl).map(|(k, _)| k.clone()))
    }

    /// The unwrapped key of version `v`, confirmed by KMS within one max age.
    fn branch_key(&self, v: u32) -> Result<Arc<DataKey>, KeyError> {
        let bv = self
            .versions
            .iter()
            .find(|b| b.version == v)
            .ok_or_else(|| KeyError::WrongKey { expected: key_id_for(self.current), found: key_id_for(v) })?;
        let ttl = self.ttl();
        if let Some(k) = self.fresh(v, ttl)? {
            return Ok(k);
        }
        let _one = lock(&self.fetch);
        if let Some(k) = self.fresh(v, ttl)? {
            return Ok(k);
        }
        let res = self.inner.unwrap(&bv.wrapped, &bv.ctx);
        let mut slots = lock(&self.slots);
        let slot = slots.entry(v).or_default();
        match res {
            Ok(k) => {
                if slot.failed.take().is_some() {
                    tracing::warn!(volume = %hex(&self.volume_id), "branch key version {v} is usable again");
                }
                let k = Arc::new(k);
                slot.key = Some((k.clone(), Instant::now()));
                Ok(k)
            }
            Err(e) => {
                // Drop our copy now: the key is wiped once in-flight users let go.
                slot.key = None;
                if slot.failed.is_none() {
                    tracing::error!(
                        volume = %hex(&self.volume_id),
                        "branch key version {v} refused: {e}; creating files and opening files whose key is not \
                         cached fail (EACCES if the key is disabled or access is denied) until it is usable again"
                    );
                }
                slot.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// The per-file wrapping key: HKDF-SHA256(salt = label, IKM = branch key,
    /// info = volume ID || file ID || version).
    fn file_kek(&self, branch: &DataKey, ctx: &KeyContext, v: u32) -> Result<DataKey, KeyError> {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, WRAP_LABEL);
        let prk = salt.extract(branch.expose_secret());
        let ver = v.to_be_bytes();
        let info = [&ctx.volume_id[..], &ctx.file_id[..], &ver[..]];
        let okm = prk.expand(&info, hkdf::HKDF_SHA256).map_err(|_| KeyError::Other("HKDF failed".into()))?;
        let mut raw = Zeroizing::new([0u8; DEK_LEN]);
        okm.fill(&mut raw[..]).map_err(|_| KeyError::Other("HKDF failed".into()))?;
        Ok(DataKey::from_bytes(&mut raw))
    }

    fn aad(ctx: &KeyContext, v: u32) -> Vec<u8> {
        let mut a = ctx.aad(WRAP_LABEL);
        a.extend_from_slice(&v.to_be_bytes());
        a
    }

    fn seal(&self, dek: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        let v = self.current;
        let kek = self.file_kek(&*self.branch_key(v)?, ctx, v)?;
        let mut nonce = [0u8; NONCE_LEN];
        crate::format::random_fill(&mut nonce).map_err(|e| KeyError::Other(e.to_string()))?;
        let mut blob = Vec::with_capacity(BLOB_LEN);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(dek.expose_secret());
        let tag = kek
            .aead()
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(Self::aad(ctx, v)),
                &mut blob[NONCE_LEN..],
            )
            .map_err(|_| KeyError::Other("wrap failed".into()))?;
        blob.extend_from_slice(tag.as_ref());
        Ok(WrappedKey { provider: NAME.into(), key_id: key_id_for(v), blob })
    }

    fn open(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
        if wrapped.provider != NAME {
            return Err(KeyError::WrongProvider { expected: NAME.into(), found: wrapped.provider.clone() });
        }
        let wrong = || KeyError::WrongKey { expected: key_id_for(self.current), found: wrapped.key_id.clone() };
        let v = version_of(&wrapped.key_id).ok_or_else(wrong)?;
        if !self.versions.iter().any(|b| b.version == v) {
            return Err(wrong());
        }
        let bad = || KeyError::InvalidCiphertext { key: wrapped.key_id.clone() };
        if wrapped.blob.len() != BLOB_LEN {
            return Err(bad());
        }
        let kek = self.file_kek(&*self.branch_key(v)?, ctx, v)?;
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped.blob[..NONCE_LEN]);
        let mut buf = Zeroizing::new(wrapped.blob[NONCE_LEN..].to_vec());
        let plain = kek
            .aead()
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(Self::aad(ctx, v)), &mut buf[..])
            .map_err(|_| bad())?;
        DataKey::from_slice(plain).ok_or_else(bad)
    }
}

impl KeyProvider for BranchProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    /// `branch:<current version>`: what new headers name.
    fn key_id(&self) -> String {
        key_id_for(self.current)
    }

    fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError> {
        if ctx.purpose.is_some() {
            return self.inner.generate(ctx);
        }
        let key = DataKey::generate().map_err(|e| KeyError::Other(e.to_string()))?;
        let wrapped = self.seal(&key, ctx)?;
        Ok((key, wrapped))
    }

    fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        if ctx.purpose.is_some() {
            return self.inner.wrap(key, ctx);
        }
        self.seal(key, ctx)
    }

    fn unwrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
        if ctx.purpose.is_some() {
            return self.inner.unwrap(wrapped, ctx);
        }
        self.open(wrapped, ctx)
    }

    /// Moves a file's DEK to the current version (`rewrap --all-files`).
    fn rewrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        if ctx.purpose.is_some() {
            return self.inner.rewrap(wrapped, ctx);
        }
        let key = self.open(wrapped, ctx)?;
        self.seal(&key, ctx)
    }

    /// The KMS key's state, then the current branch key (one Decrypt).
    fn check(&self) -> Result<(), KeyError> {
        self.inner.check()?;
        self.branch_key(self.current).map(drop)
    }

    fn trust_also(&self, keys: &[String]) {
        self.inner.trust_also(keys);
    }

    fn set_max_age(&self, max_age: Duration) {
        *lock(&self.ttl) = max_age;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Purpose;
    use crate::keys::local::LocalProvider;

    const VOL: Id = [7; 16];

    fn provider(dir: &std::path::Path, versions: u32) -> (Arc<dyn KeyProvider>, BranchProvider) {
        let inner: Arc<dyn KeyProvider> = Arc::new(LocalProvider::create_key_file(&dir.join("k")).unwrap());
        let vs = (1..=versions)
            .map(|v| {
                let ctx = KeyContext { volume_id: VOL, file_id: branch_id(v).unwrap(), purpose: Some(Purpose::Branch) };
                let (_k, wrapped) = inner.generate(&ctx).unwrap();
                BranchVersion { version: v, ctx, wrapped }
            })
            .collect();
        (inner.clone(), BranchProvider::new(inner, VOL, vs).unwrap())
    }

    fn file(f: u8) -> KeyContext {
        KeyContext::file(VOL, [f; 16])
    }

    #[test]
    fn key_ids_are_canonical() {
        assert_eq!(version_of("branch:3"), Some(3));
        for bad in ["branch:0", "branch:03", "branch:+3", "branch:", "branch:x", "aws:3", "branch:4294967296"] {
            assert_eq!(version_of(bad), None, "{bad}");
        }
        let id = branch_id(258).unwrap();
        assert_eq!(id[12..], [0, 0, 1, 2]);
    }

    #[test]
    fn round_trip_and_every_edit_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (_inner, p) = provider(dir.path(), 2);
        let (k, w) = p.generate(&file(1)).unwrap();
        assert_eq!((w.provider.as_str(), w.key_id.as_str(), w.blob.len()), (NAME, "branch:2", BLOB_LEN));
        assert_eq!(p.unwrap(&w, &file(1)).unwrap().expose_secret(), k.expose_secret());
        // Another file's or another volume's context (a swapped header).
        assert!(matches!(p.unwrap(&w, &file(2)), Err(KeyError::InvalidCiphertext { .. })));
        let other_vol = KeyContext::file([8; 16], [1; 16]);
        assert!(matches!(p.unwrap(&w, &other_vol), Err(KeyError::InvalidCiphertext { .. })));
        // Another existing version, a foreign version, another provider.
        let v1 = WrappedKey { key_id: "branch:1".into(), ..w.clone() };
        assert!(matches!(p.unwrap(&v1, &file(1)), Err(KeyError::InvalidCiphertext { .. })));
        let v9 = WrappedKey { key_id: "branch:9".into(), ..w.clone() };
        assert!(matches!(p.unwrap(&v9, &file(1)), Err(KeyError::WrongKey { .. })));
        let kms = WrappedKey { provider: "aws-kms".into(), ..w.clone() };
        assert!(matches!(p.unwrap(&kms, &file(1)), Err(KeyError::WrongProvider { .. })));
        // Every bit of the blob is authenticated.
        for i in 0..w.blob.len() {
            let mut e = w.clone();
            e.blob[i] ^= 1;
            assert!(p.unwrap(&e, &file(1)).is_err(), "bit flip at {i} accepted");
        }
        let mut short = w.clone();
        short.blob.pop();
        assert!(p.unwrap(&short, &file(1)).is_err());
        // A file key never opens as a volume key, nor the reverse.
        let vol_ctx = KeyContext { purpose: Some(Purpose::Name), ..file(1) };
        assert!(p.unwrap(&w, &vol_ctx).is_err());
    }

    #[test]
    fn old_versions_stay_readable_and_rewrap_moves_to_current() {
        let dir = tempfile::tempdir().unwrap();
        let (inner, p1) = provider(dir.path(), 1);
        let (k, w1) = p1.generate(&file(3)).unwrap();
        // Rotation: version 2 added, version 1 kept.
        let mut vs = p1.versions.clone();
        let ctx = KeyContext { volume_id: VOL, file_id: branch_id(2).unwrap(), purpose: Some(Purpose::Branch) };
        vs.push(BranchVersion { version: 2, ctx, wrapped: inner.generate(&ctx).unwrap().1 });
        let p2 = BranchProvider::new(inner, VOL, vs).unwrap();
        assert_eq!(p2.key_id(), "branch:2");
        assert_eq!(p2.unwrap(&w1, &file(3)).unwrap().expose_secret(), k.expose_secret());
        let w2 = p2.rewrap(&w1, &file(3)).unwrap();
        assert_eq!(w2.key_id, "branch:2");
        assert_eq!(p2.unwrap(&w2, &file(3)).unwrap().expose_secret(), k.expose_secret());
        // The old provider does not know version 2.
        assert!(matches!(p1.unwrap(&w2, &file(3)), Err(KeyError::WrongKey { .. })));
    }

    #[test]
    fn a_branch_key_under_another_context_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn KeyProvider> = Arc::new(LocalProvider::create_key_file(&dir.path().join("k")).unwrap());
        let id = branch_id(1).unwrap();
        // Wrapped as a name key, or for version 2, then offered as version 1.
        for ctx in [
            KeyContext { volume_id: VOL, file_id: id, purpose: Some(Purpose::Name) },
            KeyContext { volume_id: VOL, file_id: branch_id(2).unwrap(), purpose: Some(Purpose::Branch) },
            KeyContext { volume_id: [9; 16], file_id: id, purpose: Some(Purpose::Branch) },
        ] {
            let (_k, wrapped) = inner.generate(&ctx).unwrap();
            let claimed = KeyContext { volume_id: VOL, file_id: id, purpose: Some(Purpose::Branch) };
            let p = BranchProvider::new(inner.clone(), VOL, vec![BranchVersion { version: 1, ctx: claimed, wrapped }])
                .unwrap();
            assert!(matches!(p.check(), Err(KeyError::InvalidCiphertext { .. })));
            assert!(p.generate(&file(1)).is_err());
        }
    }

    /// docs/FORMAT.md, recomputed independently (RustCrypto's AES-GCM).
    #[test]
    fn wrapping_is_as_documented() {
        use aes_gcm::aead::{AeadInOut, KeyInit};
        let dir = tempfile::tempdir().unwrap();
        let (inner, p) = provider(dir.path(), 3);
        let (k, w) = p.generate(&file(4)).unwrap();
        let bv = &p.versions[2];
        let branch = inner.unwrap(&bv.wrapped, &bv.ctx).unwrap();
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"kmsfs-branch-wrap-v1");
        let info: [&[u8]; 3] = [&VOL, &[4u8; 16], &3u32.to_be_bytes()];
        let mut kek = [0u8; 32];
        salt.extract(branch.expose_secret()).expand(&info, hkdf::HKDF_SHA256).unwrap().fill(&mut kek).unwrap();
        let mut aad = b"kmsfs-branch-wrap-v1".to_vec();
        aad.extend_from_slice(&VOL);
        aad.extend_from_slice(&[4u8; 16]);
        aad.extend_from_slice(&[0, 0, 0, 3]);
        let c = aes_gcm::Aes256Gcm::new_from_slice(&kek).unwrap();
        let nonce = aes_gcm::Nonce::try_from(&w.blob[..12]).unwrap();
        let tag = aes_gcm::Tag::try_from(&w.blob[44..60]).unwrap();
        let mut dek = w.blob[12..44].to_vec();
        c.decrypt_inout_detached(&nonce, &aad, dek.as_mut_slice().into(), &tag).unwrap();
        assert_eq!(&dek[..], &k.expose_secret()[..]);
        assert_eq!(w.key_id, "branch:3");
    }

    #[test]
    fn volume_keys_go_to_the_inner_provider() {
        let dir = tempfile::tempdir().unwrap();
        let (inner, p) = provider(dir.path(), 1);
        let ctx = KeyContext { purpose: Some(Purpose::Config), ..file(5) };
        let (k, w) = p.generate(&ctx).unwrap();
        assert_eq!(w.provider, "local");
        assert_eq!(inner.unwrap(&w, &ctx).unwrap().expose_secret(), k.expose_secret());
    }
}
