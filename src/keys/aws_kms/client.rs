//! Client setup: retry and timeout options, the SDK client and the
//! provider's own runtime, and running one call to completion on it.

use std::error::Error as StdError;
use std::future::Future;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_kms::Client;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};

use super::error::map_sdk_error;
use super::{AwsKmsProvider, KeyRef};
use crate::keys::{KeyError, KeyProvider};

/// Retry and timeout knobs. The defaults bound every call to about 20 s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsKmsOptions {
    /// Region override; `None` uses the standard chain (AWS_REGION, profile).
    /// A key ARN's own region always wins, since KMS keys are regional.
    pub region: Option<String>,
    /// Endpoint override; `None` uses AWS_ENDPOINT_URL_KMS / AWS_ENDPOINT_URL
    /// or the regional KMS endpoint.
    pub endpoint_url: Option<String>,
    /// Total attempts per call, first one included (SDK standard retry mode).
    pub max_attempts: u32,
    /// Backoff base; the SDK doubles it per attempt and applies full jitter.
    pub initial_backoff: Duration,
    /// Cap on a single backoff sleep.
    pub max_backoff: Duration,
    /// TCP/TLS connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Timeout of one attempt (request to parsed response).
    pub attempt_timeout: Duration,
    /// Timeout of the whole call including retries and backoff.
    pub operation_timeout: Duration,
}

impl Default for AwsKmsOptions {
    fn default() -> Self {
        // Worst case: 6 attempts with sleeps of at most 0.2+0.4+0.8+1.6+3.2 s,
        // cut at 20 s by the operation timeout.
        Self {
            region: None,
            endpoint_url: None,
            max_attempts: 6,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            attempt_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(20),
        }
    }
}

impl AwsKmsOptions {
    fn retry_config(&self) -> RetryConfig {
        RetryConfig::standard()
            .with_max_attempts(self.max_attempts.max(1))
            .with_initial_backoff(self.initial_backoff)
            .with_max_backoff(self.max_backoff)
    }

    fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect_timeout)
            .operation_attempt_timeout(self.attempt_timeout)
            .operation_timeout(self.operation_timeout)
            .build()
    }
}

impl AwsKmsProvider {
    /// A provider for `key_ref` (key ID, key ARN, `alias/NAME` or alias ARN)
    /// configured from the environment by aws-config's standard chain.
    /// Makes no KMS request; call [`KeyProvider::check`] before serving.
    pub fn new(key_ref: &str, opts: AwsKmsOptions) -> Result<Self, KeyError> {
        let key = KeyRef::parse(key_ref)?;
        let rt = build_runtime()?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &opts.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(url) = &opts.endpoint_url {
            loader = loader.endpoint_url(url.clone());
        }
        let sdk = rt.block_on(loader.load());
        Self::build(rt, key, &sdk, &opts)
    }

    /// Like [`new`](Self::new) but from a caller-built `SdkConfig` (custom
    /// credentials, shared HTTP client). `opts` still sets retries, timeouts,
    /// and region/endpoint overrides.
    pub fn from_sdk_config(key_ref: &str, sdk: &SdkConfig, opts: AwsKmsOptions) -> Result<Self, KeyError> {
        let key = KeyRef::parse(key_ref)?;
        let rt = build_runtime()?;
        Self::build(rt, key, sdk, &opts)
    }

    fn build(
        rt: tokio::runtime::Runtime,
        key: KeyRef,
        sdk: &SdkConfig,
        opts: &AwsKmsOptions,
    ) -> Result<Self, KeyError> {
        let configured = opts.region.clone().or_else(|| sdk.region().map(|r| r.to_string()));
        let region = match (key.region(), configured) {
            (Some(arn_region), Some(explicit)) if opts.region.is_some() && explicit != arn_region => {
                return Err(KeyError::Region(format!(
                    "key {key} is in region {arn_region}, but region {explicit} was requested"
                )));
            }
            // KMS keys are regional: the ARN's region is the only one that works.
            (Some(arn_region), _) => arn_region.to_string(),
            (None, Some(r)) => r,
            (None, None) => {
                return Err(KeyError::Region(format!("no AWS region configured for key {key}")));
            }
        };
        let mut conf = aws_sdk_kms::config::Builder::from(sdk)
            .region(Region::new(region.clone()))
            .retry_config(opts.retry_config())
            .timeout_config(opts.timeout_config());
        if let Some(url) = &opts.endpoint_url {
            conf = conf.endpoint_url(url.clone());
        }
        let client = Client::from_conf(conf.build());
        let resolved = match &key {
            KeyRef::KeyArn { arn, .. } => Some(arn.clone()),
            _ => None,
        };
        Ok(Self { rt, client, key, region, resolved: RwLock::new(resolved), trusted: RwLock::new(Vec::new()) })
    }

    /// The key reference this provider wraps new keys under, as given.
    pub fn key_ref(&self) -> &KeyRef {
        &self.key
    }

    /// The region requests go to.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The underlying SDK client, e.g. for administrative calls in tools.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The best name for the configured key in error messages.
    pub(super) fn key_name(&self) -> String {
        self.key_id()
    }

    /// Runs one SDK call to completion on the provider's runtime, mapping errors.
    pub(super) fn run<T, E, F>(&self, key: &str, fut: F) -> Result<T, KeyError>
    where
        F: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        // block_on inside a runtime would panic; fail the call instead.
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(KeyError::Other(
                "aws-kms provider called from inside an async runtime; call it from a plain thread".into(),
            ));
        }
        let start = Instant::now();
        self.rt.block_on(fut).map_err(|e| map_sdk_error(e, key, start.elapsed()))
    }
}

pub(super) fn build_runtime() -> Result<tokio::runtime::Runtime, KeyError> {
    // Two workers: FUSE threads block on it concurrently, and hyper's
    // connection tasks keep running between calls.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kmsfs-kms")
        .enable_all()
        .build()
        .map_err(|e| KeyError::Other(format!("cannot start the KMS client runtime: {e}")))
}

#[cfg(test)]
mod tests {
    use super::super::PROVIDER_NAME;
    use super::*;
    use crate::keys::{KeyContext, WrappedKey};

    const ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
    const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn region_is_required_and_arn_region_wins() {
        let sdk = SdkConfig::builder().behavior_version(BehaviorVersion::latest()).build();
        let err = AwsKmsProvider::from_sdk_config(ID, &sdk, AwsKmsOptions::default()).expect_err("no region");
        assert!(matches!(err, KeyError::Region(_)), "{err}");
        let p = AwsKmsProvider::from_sdk_config(ARN, &sdk, AwsKmsOptions::default()).expect("ARN region");
        assert_eq!(p.region(), "us-east-1");
        assert_eq!(p.key_id(), ARN);
        let opts = AwsKmsOptions { region: Some("eu-west-1".into()), ..Default::default() };
        let err = AwsKmsProvider::from_sdk_config(ARN, &sdk, opts.clone()).expect_err("conflict");
        assert!(matches!(err, KeyError::Region(_)), "{err}");
        let p = AwsKmsProvider::from_sdk_config("alias/x", &sdk, opts).expect("explicit region");
        assert_eq!(p.key_id(), "alias/x");
        // A blob from another region is refused before any request.
        let w = WrappedKey { provider: PROVIDER_NAME.into(), key_id: ARN.into(), blob: vec![1, 2, 3] };
        let ctx = KeyContext::file([1; 16], [2; 16]);
        assert!(matches!(p.unwrap(&w, &ctx), Err(KeyError::Region(_))));
        let w = WrappedKey { provider: "local".into(), ..w };
        assert!(matches!(p.unwrap(&w, &ctx), Err(KeyError::WrongProvider { .. })));
    }
}
