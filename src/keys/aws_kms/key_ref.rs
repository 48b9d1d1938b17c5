//! KMS key references: parsed and checked before the first request.

use crate::keys::KeyError;

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
pub(super) fn is_key_id(s: &str) -> bool {
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
pub(super) fn arn_region(key_id: &str) -> Option<&str> {
    let mut it = key_id.splitn(6, ':');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some("arn"), Some(_), Some("kms"), Some(region)) if !region.is_empty() => Some(region),
        _ => None,
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
}
