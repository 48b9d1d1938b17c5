//! Envelope keys: the provider seam, the unwrapped-key cache and metrics.
//!
//! A provider turns a (volume ID, file ID) context into a fresh DEK plus its
//! wrapped form, and a wrapped form back into the DEK. Providers are blocking:
//! the filesystem calls them from its own worker threads, never while holding
//! an inode lock.

pub mod aws_kms;
pub mod branch;
pub mod cache;
#[cfg(test)]
pub(crate) mod fake;
pub mod local;
pub mod pool;
pub mod stats;

// The key types live with the format; re-exported so `keys::DataKey` stays valid.
pub use crate::format::keys::{DataKey, KeyContext, Purpose, WrappedKey};

use crate::format::Id;

/// Why a key operation failed. Messages tell the user what to do and never
/// contain key material.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// KMS DisabledException.
    #[error("KMS key {key} is disabled: enable it (aws kms enable-key) to read or write this volume")]
    Disabled {
        /// Key ID or ARN.
        key: String,
    },
    /// KMS KMSInvalidStateException, usually pending deletion.
    #[error(
        "KMS key {key} is not usable ({detail}); if it is pending deletion, cancel it with aws kms cancel-key-deletion"
    )]
    InvalidState {
        /// Key ID or ARN.
        key: String,
        /// The service's message.
        detail: String,
    },
    /// KMS AccessDeniedException.
    #[error("access to KMS key {key} denied: {detail}; check the key policy and IAM permissions")]
    AccessDenied {
        /// Key ID or ARN.
        key: String,
        /// The service's message.
        detail: String,
    },
    /// KMS NotFoundException.
    #[error("KMS key {key} not found: check the key ID, alias and region")]
    NotFound {
        /// Key ID or ARN.
        key: String,
    },
    /// The wrapped key does not open under this key and context.
    #[error(
        "wrapped data key does not decrypt under key {key} with this file's context (wrong key, wrong volume, or tampered header)"
    )]
    InvalidCiphertext {
        /// Key ID or ARN.
        key: String,
    },
    /// The header names a key this provider does not hold.
    #[error("file is wrapped under key {found}, but this volume uses {expected}")]
    WrongKey {
        /// What the provider holds.
        expected: String,
        /// What the header names.
        found: String,
    },
    /// The header names a key that is neither the volume's key nor one that
    /// `rewrap` recorded or the user named: never sent to KMS.
    #[error(
        "file is wrapped under key {found}, which this volume does not trust (not its key, nor an earlier key recorded by rewrap)"
    )]
    Untrusted {
        /// What the header names.
        found: String,
    },
    /// The header names a provider this volume does not use.
    #[error("file is wrapped by provider {found:?}, but this volume uses {expected:?}")]
    WrongProvider {
        /// This volume's provider.
        expected: String,
        /// What the header names.
        found: String,
    },
    /// No AWS credentials could be found.
    #[error(
        "no AWS credentials found: set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run on an instance with a role"
    )]
    NoCredentials,
    /// No region configured, or the key lives in another region.
    #[error("AWS region problem: {0}; set AWS_REGION or use the key's full ARN")]
    Region(String),
    /// KMS throttled us beyond the retry budget.
    #[error("KMS is throttling requests (retried for {0:?}); raise the quota or lower the load")]
    Throttled(std::time::Duration),
    /// KMS unreachable or failing (5xx, timeouts, connection refused).
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// A local key file problem.
    #[error("key file {path}: {detail}")]
    KeyFile {
        /// Path of the key file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// Anything else the provider reported.
    #[error("key provider error: {0}")]
    Other(String),
}

impl KeyError {
    /// Whether this error means "the key refuses", as opposed to a transient
    /// or infrastructure fault. Maps to EACCES rather than EIO.
    pub fn is_denied(&self) -> bool {
        matches!(
            self,
            Self::Disabled { .. } | Self::InvalidState { .. } | Self::AccessDenied { .. } | Self::Untrusted { .. }
        )
    }
}

/// A fresh DEK together with its wrapped form and the file ID it is bound to.
pub struct FreshKey {
    /// The file ID the wrapped key's context binds.
    pub file_id: Id,
    /// The plaintext DEK.
    pub key: DataKey,
    /// Its wrapped form for the header.
    pub wrapped: WrappedKey,
}

/// The seam between kmsfs and a key service.
pub trait KeyProvider: Send + Sync {
    /// Short provider name stored in headers (`local`, `aws-kms`).
    fn name(&self) -> &'static str;

    /// The key new files are wrapped under (key ARN or local fingerprint).
    fn key_id(&self) -> String;

    /// A new DEK and its wrapped form, bound to `ctx`.
    fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError>;

    /// Wraps an existing DEK under this provider's current key (KMS Encrypt).
    /// Used by `rewrap` across providers; plaintext leaves the process only
    /// inside the TLS request to the service.
    fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError>;

    /// Unwraps a DEK; fails unless `ctx` matches the one used to wrap it.
    fn unwrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError>;

    /// Re-wraps under this provider's current key (`key_id()`), keeping the
    /// plaintext inside the service where it can (KMS ReEncrypt).
    fn rewrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError>;

    /// Checks the key is usable before serving, so a disabled key or missing
    /// credentials stop the mount with a clear message.
    fn check(&self) -> Result<(), KeyError>;

    /// Also trusts these earlier keys for unwrapping (recorded by rewrap in
    /// the authenticated config). Providers that hold one key ignore it.
    fn trust_also(&self, _keys: &[String]) {}

    /// How long an intermediate key (branch mode) may be used after the
    /// service last confirmed it: the mount passes its cache max age, so
    /// revocation reaches new keys within one max age. Others ignore it.
    fn set_max_age(&self, _max_age: std::time::Duration) {}
}

/// Wraps an `Arc` provider so trait objects compose.
impl<T: KeyProvider + ?Sized> KeyProvider for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn key_id(&self) -> String {
        (**self).key_id()
    }
    fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError> {
        (**self).generate(ctx)
    }
    fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        (**self).wrap(key, ctx)
    }
    fn unwrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
        (**self).unwrap(wrapped, ctx)
    }
    fn rewrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        (**self).rewrap(wrapped, ctx)
    }
    fn check(&self) -> Result<(), KeyError> {
        (**self).check()
    }
    fn trust_also(&self, keys: &[String]) {
        (**self).trust_also(keys)
    }
    fn set_max_age(&self, max_age: std::time::Duration) {
        (**self).set_max_age(max_age)
    }
}

/// Opens the aws-kms provider for a key reference (key ID, ARN, alias) with
/// the standard AWS configuration chain. Makes no KMS request.
///
/// `trusted` are the key ARNs (besides `key_ref` itself) whose wrapped keys
/// may be unwrapped: a header's own key string is never sent to KMS.
pub fn open_aws_kms(key_ref: &str, trusted: &[String]) -> Result<std::sync::Arc<dyn KeyProvider>, KeyError> {
    let p = aws_kms::AwsKmsProvider::new(key_ref, aws_kms::AwsKmsOptions::default())?.with_trusted(trusted);
    Ok(std::sync::Arc::new(p))
}
