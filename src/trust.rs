//! Trust anchors kept outside the cipher dir.
//!
//! The cipher dir is written by the attacker, so it cannot say which KMS key
//! is the volume's: someone holding credentials for a key of their own could
//! replace `kmsfs.conf` with one naming that key, authenticated under it. So
//! each host records, per volume ID, the key it trusts for that volume: at
//! `init`, at `upgrade`, and whenever the user names the key explicitly
//! (`--kms-key`, `--key-file`). Every later use checks the config against it.
//!
//! The store is a directory of small JSON files, one per volume:
//! `$KMSFS_TRUST_DIR`, else `/var/lib/kmsfs/trust` for root, else
//! `$XDG_STATE_HOME/kmsfs/trust` (default `~/.local/state/kmsfs/trust`).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::format::{Id, hex};
use crate::volume::ProviderKind;

/// Largest pin file read.
const PIN_MAX: u64 = 16 * 1024;

/// What a host trusts for one volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    /// The volume ID, hex.
    pub volume_id: String,
    /// The volume's provider.
    pub provider: ProviderKind,
    /// The trusted key: a KMS key ARN, or a local key fingerprint.
    pub key_id: String,
}

/// The per-host trust store.
#[derive(Clone, Debug)]
pub struct TrustStore {
    dir: PathBuf,
}

impl TrustStore {
    /// The store at its default place (see the module docs).
    pub fn default_location() -> Self {
        if let Some(d) = std::env::var_os("KMSFS_TRUST_DIR").filter(|d| !d.is_empty()) {
            return Self { dir: PathBuf::from(d) };
        }
        if crate::sys::euid() == 0 {
            // Not $HOME: systemd starts services without one.
            return Self { dir: PathBuf::from("/var/lib/kmsfs/trust") };
        }
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
            .unwrap_or_else(|| PathBuf::from("/var/lib"));
        Self { dir: base.join("kmsfs").join("trust") }
    }

    /// A store in `dir` (tests).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Where the store lives.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn path(&self, volume_id: &Id) -> PathBuf {
        self.dir.join(format!("{}.json", hex(volume_id)))
    }

    /// The pin for a volume, if this host has one.
    pub fn get(&self, volume_id: &Id) -> std::io::Result<Option<Pin>> {
        use std::io::Read;
        let path = self.path(volume_id);
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        let euid = crate::sys::euid();
        if !meta.is_file() || (meta.uid() != euid && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
            return Err(std::io::Error::other(format!(
                "{}: not a regular file owned by you or root and writable only by its owner",
                path.display()
            )));
        }
        let mut text = String::new();
        (&f).take(PIN_MAX).read_to_string(&mut text)?;
        let pin: Pin = serde_json::from_str(&text)
            .map_err(|e| std::io::Error::other(format!("{}: invalid trust record: {e}", path.display())))?;
        if pin.volume_id != hex(volume_id) {
            return Err(std::io::Error::other(format!("{}: record is for another volume", path.display())));
        }
        Ok(Some(pin))
    }

    /// Records (or replaces) a volume's pin: a new file under a fresh
    /// name, fsynced, then renamed into place.
    pub fn put(&self, pin: &Pin) -> std::io::Result<()> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let mut rnd = [0u8; 8];
        crate::format::random_fill(&mut rnd).map_err(std::io::Error::other)?;
        let tmp = self.dir.join(format!(".{}.{}.tmp", pin.volume_id, hex(&rnd)));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        let mut text = serde_json::to_string_pretty(pin).map_err(std::io::Error::other)?;
        text.push('\n');
        let r = f.write_all(text.as_bytes()).and_then(|_| f.sync_all());
        let target = self.dir.join(format!("{}.json", pin.volume_id));
        if let Err(e) = r.and_then(|_| std::fs::rename(&tmp, &target)) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn put_get_round_trip_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let s = TrustStore::at(d.path().join("t"));
        let id = [7u8; 16];
        assert_eq!(s.get(&id).unwrap(), None);
        let pin = Pin { volume_id: hex(&id), provider: ProviderKind::AwsKms, key_id: "arn:x".into() };
        s.put(&pin).unwrap();
        assert_eq!(s.get(&id).unwrap(), Some(pin.clone()));
        s.put(&Pin { key_id: "arn:y".into(), ..pin.clone() }).unwrap();
        assert_eq!(s.get(&id).unwrap().unwrap().key_id, "arn:y");
        // A record copied to another volume's name is refused.
        let other = [8u8; 16];
        std::fs::copy(s.path(&id), s.path(&other)).unwrap();
        assert!(s.get(&other).is_err());
        // A symlink is never followed.
        std::fs::remove_file(s.path(&other)).unwrap();
        std::os::unix::fs::symlink(s.path(&id), s.path(&other)).unwrap();
        assert!(s.get(&other).is_err());
    }
}
