//! Mapping SDK and KMS service errors to [`KeyError`]s that tell the user
//! what to do.

use std::error::Error as StdError;
use std::time::Duration;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kms::config::http::HttpResponse;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};

use crate::keys::KeyError;

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
pub(super) fn map_sdk_error<E>(err: SdkError<E, HttpResponse>, key: &str, elapsed: Duration) -> KeyError
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

#[cfg(test)]
mod tests {
    use super::*;

    const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

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
}
