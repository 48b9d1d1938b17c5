//! The KMS calls behind the provider seam: GenerateDataKey, Encrypt,
//! Decrypt, ReEncrypt and the DescribeKey check.

use std::collections::HashMap;

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeySpec, KeyState, KeyUsageType};
use zeroize::Zeroize;

use super::{AwsKmsProvider, PROVIDER_NAME};
use crate::keys::{DataKey, KeyContext, KeyError, KeyProvider, WrappedKey};

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
        self.add_trusted(keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_key_length_is_checked() {
        assert!(data_key_from(Some(Blob::new(vec![7u8; 32]))).is_ok());
        let err = data_key_from(Some(Blob::new(vec![7u8; 16]))).expect_err("short key");
        assert!(err.to_string().contains("16-byte"), "{err}");
        assert!(data_key_from(None).is_err());
    }
}
