//! AWS KMS key provider: envelope keys wrapped by a KMS symmetric key.
//!
//! Configuration comes from aws-config's standard chain (AWS_REGION,
//! AWS_PROFILE, the credential chain, AWS_ENDPOINT_URL_KMS /
//! AWS_ENDPOINT_URL). Retries are the SDK's standard mode (jittered
//! exponential backoff for throttling, 5xx, timeouts and connection errors)
//! bounded by an operation timeout, so a call never hangs a FUSE thread for
//! longer than [`AwsKmsOptions::operation_timeout`].
//!
//! The provider owns a small tokio runtime and blocks on it: it is called from
//! plain worker threads, never from inside an async runtime.
//!
//! Rooms: `key_ref` parses key references; `client` holds the options, the
//! SDK client and runtime setup; `trust` decides which KeyIds may be sent
//! (trusted-key pinning, region and provider checks); `calls` makes the
//! GenerateDataKey, Encrypt, Decrypt, ReEncrypt and DescribeKey calls; and
//! `error` maps SDK and service errors to [`KeyError`](super::KeyError).

mod calls;
mod client;
mod error;
mod key_ref;
mod trust;

use std::sync::RwLock;

use aws_sdk_kms::Client;

pub use client::AwsKmsOptions;
pub use error::classify_service_error;
pub use key_ref::KeyRef;

/// Provider name stored in headers.
pub const PROVIDER_NAME: &str = "aws-kms";

/// Envelope keys under one AWS KMS symmetric key.
pub struct AwsKmsProvider {
    rt: tokio::runtime::Runtime,
    client: Client,
    key: KeyRef,
    region: String,
    /// The key ARN once a response has told us (aliases resolve to it).
    resolved: RwLock<Option<String>>,
    /// Earlier keys whose wrapped DEKs may still be unwrapped (recorded by
    /// rewrap, or named by the user). With the volume's own key, the only
    /// KeyIds ever sent to Decrypt and ReEncrypt.
    trusted: RwLock<Vec<String>>,
}

impl std::fmt::Debug for AwsKmsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsKmsProvider").field("key", &self.key).field("region", &self.region).finish_non_exhaustive()
    }
}
