//! The key types a header carries: the plaintext data key, its wrapped form
//! and the context the wrapping binds. They live with the format (as age's
//! `FileKey` sits beside its stanza) so the codec never depends on `keys`,
//! which holds the providers that produce them.

pub use super::data_key::DataKey;
use super::{Id, hex};

/// What a wrapped key is bound to. Becomes the KMS EncryptionContext (never a
/// path: CloudTrail logs the context in clear, and renames must not need KMS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyContext {
    /// The volume's random ID.
    pub volume_id: Id,
    /// The file's random ID (for volume keys: the key's own random ID).
    pub file_id: Id,
    /// What the key is for. File keys carry none, as in every v1 header, and
    /// every other key carries one, so a file key context never equals a
    /// name-key or config-key context (domain separation).
    pub purpose: Option<Purpose>,
}

/// The purpose of a volume-level key, bound into its wrapping context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// The name key (AES-SIV for names, symlink targets, xattr values).
    Name,
    /// The key that authenticates the volume config.
    Config,
    /// A branch key (branch key mode): wraps file keys locally.
    Branch,
}

impl Purpose {
    /// The value in the encryption context.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Config => "config",
            Self::Branch => "branch",
        }
    }
}

impl KeyContext {
    /// The context of a file's data key.
    pub fn file(volume_id: Id, file_id: Id) -> Self {
        Self { volume_id, file_id, purpose: None }
    }

    /// Key/value pairs for a KMS EncryptionContext.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![("kmsfs:volume", hex(&self.volume_id)), ("kmsfs:file", hex(&self.file_id))];
        if let Some(p) = self.purpose {
            v.push(("kmsfs:purpose", p.as_str().to_string()));
        }
        v
    }

    /// Bytes bound as AAD by providers that wrap locally. The IDs have a
    /// fixed length, so the optional purpose suffix keeps encodings distinct.
    pub fn aad(&self, label: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(label.len() + 40);
        v.extend_from_slice(label);
        v.extend_from_slice(&self.volume_id);
        v.extend_from_slice(&self.file_id);
        if let Some(p) = self.purpose {
            v.push(0);
            v.extend_from_slice(p.as_str().as_bytes());
        }
        v
    }
}

/// A DEK as stored in a header: which provider and key wrapped it, and the blob.
/// The blob is ciphertext, so this type may be cloned and printed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// Provider name, e.g. `local` or `aws-kms`.
    pub provider: String,
    /// The wrapping key: a key ARN for aws-kms, a fingerprint for local.
    pub key_id: String,
    /// The provider's opaque ciphertext.
    pub blob: Vec<u8>,
}
