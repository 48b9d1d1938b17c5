//! Trusted-key pinning: which KeyIds may be sent to KMS for a wrapped key.
//! The header's own key string is attacker input and is never sent.

use super::key_ref::{arn_region, is_key_id};
use super::{AwsKmsProvider, PROVIDER_NAME};
use crate::keys::{KeyError, KeyProvider, WrappedKey};

impl AwsKmsProvider {
    /// Also trusts these keys (ARNs or key IDs) for unwrapping.
    pub fn with_trusted(self, keys: &[String]) -> Self {
        self.trust_also(keys);
        self
    }

    /// The trusted KeyId to send for a blob whose header names `found`, or
    /// `Untrusted`. The header's own string is never sent: it is attacker
    /// input, and KMS would happily decrypt under any key the role may use
    /// (the AWS Encryption SDK's strict mode rule).
    pub(super) fn trusted_key_for(&self, found: &str) -> Result<String, KeyError> {
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

    pub(super) fn remember_arn(&self, arn: Option<&str>) {
        if let Some(arn) = arn.filter(|a| a.starts_with("arn:")) {
            let mut slot = self.resolved.write().unwrap_or_else(|e| e.into_inner());
            if slot.as_deref() != Some(arn) {
                *slot = Some(arn.to_string());
            }
        }
    }

    pub(super) fn check_region(&self, key_id: &str) -> Result<(), KeyError> {
        match arn_region(key_id) {
            Some(r) if r != self.region => Err(KeyError::Region(format!(
                "key {key_id} is in region {r}, but this volume's KMS client uses {}",
                self.region
            ))),
            _ => Ok(()),
        }
    }

    pub(super) fn check_provider(&self, wrapped: &WrappedKey) -> Result<(), KeyError> {
        if wrapped.provider != PROVIDER_NAME {
            return Err(KeyError::WrongProvider { expected: PROVIDER_NAME.into(), found: wrapped.provider.clone() });
        }
        self.check_region(&wrapped.key_id)
    }

    /// Adds keys to the trusted list (`KeyProvider::trust_also`).
    pub(super) fn add_trusted(&self, keys: &[String]) {
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
    use super::super::AwsKmsOptions;
    use super::*;
    use crate::keys::KeyContext;
    use aws_config::{BehaviorVersion, SdkConfig};

    const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

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
