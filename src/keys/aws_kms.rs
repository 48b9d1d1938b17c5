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

use std::collections::HashMap;
use std::error::Error as StdError;
use std::future::Future;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::Client;
use aws_sdk_kms::config::Region;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeySpec, KeyState, KeyUsageType};
use zeroize::Zeroize;

use super::{DataKey, KeyContext, KeyError, KeyProvider, WrappedKey};

/// Provider name stored in headers.
pub const PROVIDER_NAME: &str = "aws-kms";

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

/// A parsed KMS key reference, in any form KMS accepts for a KeyId.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRef {
    /// A bare key ID (`1234abcd-...` or `mrk-...`), resolved in the client's region.
    KeyId(String),
    /// `arn:PARTITION:kms:REGION:ACCOUNT:key/ID`.
    KeyArn {
        /// The full ARN.
        arn: String,
        /// Its region.
        region: String,
    },
    /// `alias/NAME`, resolved in the client's region.
    Alias(String),
    /// `arn:PARTITION:kms:REGION:ACCOUNT:alias/NAME`.
    AliasArn {
        /// The full ARN.
        arn: String,
        /// Its region.
        region: String,
    },
}

impl KeyRef {
    /// Parses a key reference; rejects anything KMS would not accept so a typo
    /// fails before the first request.
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let bad = |why: &str| {
            KeyError::Other(format!(
                "invalid KMS key reference {s:?}: {why}; expected a key ID, key ARN, alias/NAME or alias ARN"
            ))
        };
        if s.starts_with("arn:") {
            let parts: Vec<&str> = s.splitn(6, ':').collect();
            let [_, partition, service, region, account, resource] = parts[..] else {
                return Err(bad("an ARN has six ':'-separated fields"));
            };
            if partition.is_empty() || service != "kms" {
                return Err(bad("not a KMS ARN"));
            }
            if !is_region(region) {
                return Err(bad("the ARN has no valid region"));
            }
            if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("the ARN has no 12-digit account"));
            }
            let region = region.to_string();
            if let Some(id) = resource.strip_prefix("key/") {
                if !is_key_id(id) {
                    return Err(bad("the key ID in the ARN is malformed"));
                }
                return Ok(Self::KeyArn { arn: s.to_string(), region });
            }
            if let Some(name) = resource.strip_prefix("alias/") {
                if !is_alias_name(name) {
                    return Err(bad("the alias name in the ARN is malformed"));
                }
                return Ok(Self::AliasArn { arn: s.to_string(), region });
            }
            return Err(bad("the ARN names neither key/ID nor alias/NAME"));
        }
        if let Some(name) = s.strip_prefix("alias/") {
            if !is_alias_name(name) {
                return Err(bad("malformed alias name"));
            }
            return Ok(Self::Alias(s.to_string()));
        }
        if is_key_id(s) {
            return Ok(Self::KeyId(s.to_string()));
        }
        Err(bad("malformed key ID"))
    }

    /// The reference as sent in KeyId parameters.
    pub fn as_str(&self) -> &str {
        match self {
            Self::KeyId(s) | Self::Alias(s) => s,
            Self::KeyArn { arn, .. } | Self::AliasArn { arn, .. } => arn,
        }
    }

    /// The region the reference pins, if it is an ARN.
    pub fn region(&self) -> Option<&str> {
        match self {
            Self::KeyArn { region, .. } | Self::AliasArn { region, .. } => Some(region),
            Self::KeyId(_) | Self::Alias(_) => None,
        }
    }
}

impl std::fmt::Display for KeyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A UUID key ID, or a multi-Region `mrk-` + 32 hex digits.
fn is_key_id(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix("mrk-") {
        return rest.len() == 32 && is_hex(rest);
    }
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5 && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| is_hex(g))
}

/// KMS alias names: 1-250 chars of `[A-Za-z0-9/_-]` after `alias/`.
fn is_alias_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 250 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-'))
}

fn is_region(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The region of a key ARN, if `key_id` is one.
fn arn_region(key_id: &str) -> Option<&str> {
    let mut it = key_id.splitn(6, ':');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some("arn"), Some(_), Some("kms"), Some(region)) if !region.is_empty() => Some(region),
        _ => None,
    }
}

/// Maps a KMS service error (code, message, HTTP status) to a [`KeyError`].
/// `key` names the key when the message does not carry an ARN; `elapsed` is
/// the time spent on the call including retries.
pub fn classify_service_error(
    code: Option<&str>,
    message: Option<&str>,
    status: u16,
    key: &str,
    elapsed: Duration,
) -> KeyError {
    let detail = message.unwrap_or("no message").to_string();
    // Real KMS names the key ARN in state errors; prefer it over an alias.
    let named = || arn_in(message).unwrap_or(key).to_string();
    match code.unwrap_or("") {
        "DisabledException" => KeyError::Disabled { key: named() },
        "KMSInvalidStateException" => KeyError::InvalidState { key: named(), detail },
        "AccessDeniedException" => KeyError::AccessDenied { key: named(), detail },
        // Bad or expired credentials are a permission problem, not absence.
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "ExpiredTokenException"
        | "IncompleteSignature" => {
            KeyError::AccessDenied { key: key.to_string(), detail: format!("credentials rejected: {detail}") }
        }
        "NotFoundException" => KeyError::NotFound { key: named() },
        "InvalidCiphertextException" | "IncorrectKeyException" => KeyError::InvalidCiphertext { key: key.to_string() },
        "ThrottlingException"
        | "ThrottledException"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "RequestThrottled"
        | "RequestThrottledException" => KeyError::Throttled(elapsed),
        "KMSInternalException"
        | "DependencyTimeoutException"
        | "KeyUnavailableException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException"
        | "InternalFailure" => KeyError::Unavailable(format!(
            "{} after {elapsed:.1?} of retries: {detail}",
            code.unwrap_or("server error")
        )),
        _ if status >= 500 => KeyError::Unavailable(format!(
            "HTTP {status} ({}) after {elapsed:.1?} of retries: {detail}",
            code.unwrap_or("no error code")
        )),
        other => KeyError::Other(format!(
            "KMS error {} (HTTP {status}) for key {key}: {detail}",
            if other.is_empty() { "without a code" } else { other }
        )),
    }
}

/// The first `arn:` token in a service message, trailing punctuation removed.
fn arn_in(message: Option<&str>) -> Option<&str> {
    message?
        .split_whitespace()
        .map(|w| w.trim_start_matches(['\'', '"', '(']))
        .find(|w| w.starts_with("arn:"))
        .map(|w| w.trim_end_matches(['.', ',', ';', ')', '\'', '"']))
}

/// The error and all its sources, joined for a one-line message.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = e.source();
    }
    s
}

fn has_credentials_error(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<CredentialsError>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Maps any SDK error to a [`KeyError`].
fn map_sdk_error<E>(err: SdkError<E, HttpResponse>, key: &str, elapsed: Duration) -> KeyError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    if has_credentials_error(&err) {
        return KeyError::NoCredentials;
    }
    match &err {
        SdkError::ServiceError(se) => {
            classify_service_error(se.err().code(), se.err().message(), se.raw().status().as_u16(), key, elapsed)
        }
        SdkError::TimeoutError(_) => {
            KeyError::Unavailable(format!("no answer from KMS within {elapsed:.1?} (retries included)"))
        }
        SdkError::DispatchFailure(df) if df.is_io() || df.is_timeout() => {
            KeyError::Unavailable(format!("cannot reach KMS after {elapsed:.1?} of retries: {}", error_chain(&err)))
        }
        SdkError::ResponseError(_) => {
            KeyError::Unavailable(format!("unreadable response from KMS: {}", error_chain(&err)))
        }
        _ => KeyError::Other(error_chain(&err)),
    }
}

/// A data key from KMS response bytes; the temporary buffer is wiped.
fn data_key_from(plaintext: Option<Blob>) -> Result<DataKey, KeyError> {
    let mut raw = plaintext.ok_or_else(|| KeyError::Other("KMS response has no plaintext".into()))?.into_inner();
    let key = DataKey::from_slice(&raw);
    let len = raw.len();
    raw.zeroize();
    key.ok_or_else(|| KeyError::Other(format!("KMS returned a {len}-byte data key, expected 32")))
}

fn context_map(ctx: &KeyContext) -> HashMap<String, String> {
    ctx.pairs().into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

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

    /// Also trusts these keys (ARNs or key IDs) for unwrapping.
    pub fn with_trusted(self, keys: &[String]) -> Self {
        self.trust_also(keys);
        self
    }

    /// The trusted KeyId to send for a blob whose header names `found`, or
    /// `Untrusted`. The header's own string is never sent: it is attacker
    /// input, and KMS would happily decrypt under any key the role may use
    /// (the AWS Encryption SDK's strict mode rule).
    fn trusted_key_for(&self, found: &str) -> Result<String, KeyError> {
        let own = self.key_id();
        let matches = |t: &str| {
            t == found
                // A bare key ID names the same key as its ARN in this region.
                || (is_key_id(t) && arn_region(found) == Some(self.region.as_str())
                    && found.strip_suffix(t).is_some_and(|p| p.ends_with(":key/")))
        };
        let trusted = self.trusted.read().unwrap_or_else(|e| e.into_inner());
        std::iter::once(own.as_str())
            .chain(trusted.iter().map(String::as_str))
            .find(|t| matches(t))
            .map(str::to_string)
            .ok_or_else(|| KeyError::Untrusted { found: found.to_string() })
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

    fn remember_arn(&self, arn: Option<&str>) {
        if let Some(arn) = arn.filter(|a| a.starts_with("arn:")) {
            let mut slot = self.resolved.write().unwrap_or_else(|e| e.into_inner());
            if slot.as_deref() != Some(arn) {
                *slot = Some(arn.to_string());
            }
        }
    }

    /// The best name for the configured key in error messages.
    fn key_name(&self) -> String {
        self.key_id()
    }

    /// Runs one SDK call to completion on the provider's runtime, mapping errors.
    fn run<T, E, F>(&self, key: &str, fut: F) -> Result<T, KeyError>
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

    fn check_region(&self, key_id: &str) -> Result<(), KeyError> {
        match arn_region(key_id) {
            Some(r) if r != self.region => Err(KeyError::Region(format!(
                "key {key_id} is in region {r}, but this volume's KMS client uses {}",
                self.region
            ))),
            _ => Ok(()),
        }
    }

    fn check_provider(&self, wrapped: &WrappedKey) -> Result<(), KeyError> {
        if wrapped.provider != PROVIDER_NAME {
            return Err(KeyError::WrongProvider { expected: PROVIDER_NAME.into(), found: wrapped.provider.clone() });
        }
        self.check_region(&wrapped.key_id)
    }
}

fn build_runtime() -> Result<tokio::runtime::Runtime, KeyError> {
    // Two workers: FUSE threads block on it concurrently, and hyper's
    // connection tasks keep running between calls.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kmsfs-kms")
        .enable_all()
        .build()
        .map_err(|e| KeyError::Other(format!("cannot start the KMS client runtime: {e}")))
}

fn wrapped(key_id: Option<String>, blob: Option<Blob>) -> Result<WrappedKey, KeyError> {
    let key_id = key_id.ok_or_else(|| KeyError::Other("KMS response has no KeyId".into()))?;
    let blob = blob.ok_or_else(|| KeyError::Other("KMS response has no CiphertextBlob".into()))?.into_inner();
    Ok(WrappedKey { provider: PROVIDER_NAME.into(), key_id, blob })
}

impl KeyProvider for AwsKmsProvider {
    fn name(&self) -> &'static str {
        PROVIDER_NAME
    }

    /// The key ARN once known (from a KeyArn reference, `check` or any
    /// generate/wrap/rewrap response), else the reference as given.
    fn key_id(&self) -> String {
        let slot = self.resolved.read().unwrap_or_else(|e| e.into_inner());
        slot.clone().unwrap_or_else(|| self.key.as_str().to_string())
    }

    fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError> {
        let fut = self
            .client
            .generate_data_key()
            .key_id(self.key.as_str())
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context_map(ctx)))
            .send();
        let mut out = self.run(&self.key_name(), fut)?;
        self.remember_arn(out.key_id());
        let key = data_key_from(out.plaintext.take())?;
        let wrapped = wrapped(out.key_id.take(), out.ciphertext_blob.take())?;
        Ok((key, wrapped))
    }

    fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        // The SDK owns (and drops without wiping) this request copy; the bytes
        // leave the process only inside the TLS request.
        let plaintext = Blob::new(key.expose_secret().to_vec());
        let fut = self
            .client
            .encrypt()
            .key_id(self.key.as_str())
            .plaintext(plaintext)
            .set_encryption_context(Some(context_map(ctx)))
            .send();
        let mut out = self.run(&self.key_name(), fut)?;
        self.remember_arn(out.key_id());
        wrapped(out.key_id.take(), out.ciphertext_blob.take())
    }

    fn unwrap(&self, wrapped: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
        self.check_provider(wrapped)?;
        let key = self.trusted_key_for(&wrapped.key_id)?;
        // A trusted KeyId makes KMS refuse a blob made under any other key.
        let fut = self
            .client
            .decrypt()
            .ciphertext_blob(Blob::new(wrapped.blob.clone()))
            .key_id(key.clone())
            .set_encryption_context(Some(context_map(ctx)))
            .send();
        let mut out = self.run(&key, fut)?;
        data_key_from(out.plaintext.take())
    }

    fn rewrap(&self, wrapped_key: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        self.check_provider(wrapped_key)?;
        let source = self.trusted_key_for(&wrapped_key.key_id)?;
        let map = context_map(ctx);
        let fut = self
            .client
            .re_encrypt()
            .ciphertext_blob(Blob::new(wrapped_key.blob.clone()))
            .source_key_id(source)
            .set_source_encryption_context(Some(map.clone()))
            .destination_key_id(self.key.as_str())
            .set_destination_encryption_context(Some(map))
            .send();
        let mut out = self.run(&wrapped_key.key_id, fut)?;
        self.remember_arn(out.key_id());
        wrapped(out.key_id.take(), out.ciphertext_blob.take())
    }

    fn check(&self) -> Result<(), KeyError> {
        let name = self.key_name();
        let fut = self.client.describe_key().key_id(self.key.as_str()).send();
        let out = self.run(&name, fut)?;
        let meta =
            out.key_metadata().ok_or_else(|| KeyError::Other("DescribeKey response has no KeyMetadata".into()))?;
        let arn = meta.arn().unwrap_or(&name).to_string();
        self.remember_arn(Some(&arn));
        match meta.key_state() {
            Some(KeyState::Enabled) | None => {}
            Some(KeyState::Disabled) => return Err(KeyError::Disabled { key: arn }),
            Some(KeyState::PendingDeletion) | Some(KeyState::PendingReplicaDeletion) => {
                return Err(KeyError::InvalidState { key: arn, detail: "pending deletion".into() });
            }
            Some(other) => {
                return Err(KeyError::InvalidState { key: arn, detail: format!("key state {}", other.as_str()) });
            }
        }
        let symmetric = meta.key_spec().is_none_or(|s| *s == KeySpec::SymmetricDefault)
            && meta.key_usage().is_none_or(|u| *u == KeyUsageType::EncryptDecrypt);
        if !symmetric {
            return Err(KeyError::Other(format!(
                "KMS key {arn} is not a symmetric encryption key; kmsfs needs KeySpec SYMMETRIC_DEFAULT with KeyUsage ENCRYPT_DECRYPT"
            )));
        }
        // DescribeKey needs only kms:DescribeKey; a real GenerateDataKey proves
        // the permission and key state the mount depends on.
        let fut = self
            .client
            .generate_data_key()
            .key_id(self.key.as_str())
            .key_spec(DataKeySpec::Aes256)
            .encryption_context("kmsfs:check", "mount")
            .send();
        let mut out = self.run(&arn, fut)?;
        if let Some(p) = out.plaintext.take() {
            p.into_inner().zeroize();
        }
        Ok(())
    }

    fn trust_also(&self, keys: &[String]) {
        let mut t = self.trusted.write().unwrap_or_else(|e| e.into_inner());
        for k in keys {
            if !t.contains(k) {
                t.push(k.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
    const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn parses_all_reference_forms() {
        assert_eq!(KeyRef::parse(ID), Ok(KeyRef::KeyId(ID.into())));
        let mrk = "mrk-1234abcd12ab34cd56ef1234567890ab";
        assert_eq!(KeyRef::parse(mrk), Ok(KeyRef::KeyId(mrk.into())));
        assert_eq!(KeyRef::parse(ARN), Ok(KeyRef::KeyArn { arn: ARN.into(), region: "us-east-1".into() }));
        assert_eq!(KeyRef::parse("alias/my-key_1/x"), Ok(KeyRef::Alias("alias/my-key_1/x".into())));
        let aarn = "arn:aws-cn:kms:cn-north-1:111122223333:alias/vol";
        assert_eq!(KeyRef::parse(aarn), Ok(KeyRef::AliasArn { arn: aarn.into(), region: "cn-north-1".into() }));
        assert_eq!(KeyRef::parse(aarn).map(|k| k.region().map(String::from)), Ok(Some("cn-north-1".into())));
        assert_eq!(KeyRef::parse(ID).map(|k| k.region().is_none()), Ok(true));
    }

    #[test]
    fn rejects_malformed_references() {
        for bad in [
            "",
            "alias/",
            "alias/has space",
            "1234abcd",
            "1234abcd-12ab-34cd-56ef-1234567890ag",
            " 1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:s3:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms::111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-1:1111:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:us-east-1:111122223333:grant/x",
            "arn:aws:kms:us-east-1:111122223333",
            "mrk-123",
        ] {
            let err = KeyRef::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid KMS key reference"), "{err}");
        }
    }

    #[test]
    fn arn_region_only_for_arns() {
        assert_eq!(arn_region(ARN), Some("us-east-1"));
        assert_eq!(arn_region(ID), None);
        assert_eq!(arn_region("alias/x"), None);
    }

    fn classify(code: &str, msg: &str, status: u16) -> KeyError {
        classify_service_error(Some(code), Some(msg), status, "alias/vol", Duration::from_secs(3))
    }

    #[test]
    fn service_errors_map_to_distinct_variants() {
        assert_eq!(
            classify("DisabledException", &format!("{ARN} is disabled."), 400),
            KeyError::Disabled { key: ARN.into() }
        );
        assert_eq!(
            classify("DisabledException", "key is disabled", 400),
            KeyError::Disabled { key: "alias/vol".into() }
        );
        assert!(matches!(
            classify("KMSInvalidStateException", &format!("{ARN} is pending deletion."), 400),
            KeyError::InvalidState { key, detail } if key == ARN && detail.contains("pending deletion")
        ));
        assert!(matches!(classify("AccessDeniedException", "no", 400), KeyError::AccessDenied { .. }));
        assert!(matches!(
            classify("UnrecognizedClientException", "bad token", 400),
            KeyError::AccessDenied { detail, .. } if detail.contains("credentials rejected")
        ));
        assert_eq!(classify("NotFoundException", "x", 400), KeyError::NotFound { key: "alias/vol".into() });
        assert_eq!(
            classify("InvalidCiphertextException", "", 400),
            KeyError::InvalidCiphertext { key: "alias/vol".into() }
        );
        assert_eq!(classify("IncorrectKeyException", "", 400), KeyError::InvalidCiphertext { key: "alias/vol".into() });
        assert_eq!(classify("ThrottlingException", "Rate exceeded", 400), KeyError::Throttled(Duration::from_secs(3)));
        assert!(matches!(classify("KMSInternalException", "boom", 500), KeyError::Unavailable(_)));
        assert!(matches!(classify("Whatever", "boom", 503), KeyError::Unavailable(m) if m.contains("503")));
        assert!(
            matches!(classify("ValidationException", "bad", 400), KeyError::Other(m) if m.contains("ValidationException"))
        );
        assert!(matches!(classify_service_error(None, None, 502, "k", Duration::ZERO), KeyError::Unavailable(_)));
    }

    #[test]
    fn arn_extraction_trims_punctuation() {
        assert_eq!(arn_in(Some(&format!("Key '{ARN}' does not exist"))), Some(ARN));
        assert_eq!(arn_in(Some("nothing here")), None);
        assert_eq!(arn_in(None), None);
    }

    #[test]
    fn credentials_error_is_found_in_chain() {
        #[derive(Debug)]
        struct Outer(CredentialsError);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("auth failed")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(CredentialsError::not_loaded("no providers in chain"));
        assert!(has_credentials_error(&e));
        assert!(error_chain(&e).starts_with("auth failed: "));
        assert!(!has_credentials_error(&std::io::Error::other("x")));
    }

    #[test]
    fn data_key_length_is_checked() {
        assert!(data_key_from(Some(Blob::new(vec![7u8; 32]))).is_ok());
        let err = data_key_from(Some(Blob::new(vec![7u8; 16]))).expect_err("short key");
        assert!(err.to_string().contains("16-byte"), "{err}");
        assert!(data_key_from(None).is_err());
    }

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

    #[test]
    fn only_trusted_keys_are_sent() {
        let sdk = SdkConfig::builder().behavior_version(BehaviorVersion::latest()).build();
        let other = "arn:aws:kms:us-east-1:111122223333:key/0987dcba-09fe-87dc-65ba-ab0987654321";
        let p = AwsKmsProvider::from_sdk_config(ARN, &sdk, AwsKmsOptions::default()).expect("provider");
        assert_eq!(p.trusted_key_for(ARN), Ok(ARN.to_string()));
        assert!(matches!(p.trusted_key_for(other), Err(KeyError::Untrusted { .. })));
        // An attacker's header is refused before any request is made.
        let w = WrappedKey { provider: PROVIDER_NAME.into(), key_id: other.into(), blob: vec![1, 2, 3] };
        assert!(matches!(p.unwrap(&w, &KeyContext::file([1; 16], [2; 16])), Err(KeyError::Untrusted { .. })));
        let p = p.with_trusted(&[other.to_string()]);
        assert_eq!(p.trusted_key_for(other), Ok(other.to_string()));
        // A bare key ID trusts its ARN in the provider's region only.
        let p = AwsKmsProvider::from_sdk_config(ARN, &sdk, AwsKmsOptions::default())
            .expect("provider")
            .with_trusted(&["0987dcba-09fe-87dc-65ba-ab0987654321".to_string()]);
        assert!(p.trusted_key_for(other).is_ok());
        let elsewhere = other.replace("us-east-1", "eu-west-1");
        assert!(p.trusted_key_for(&elsewhere).is_err());
    }
}
