//! An in-memory key provider for unit tests: no key file, no service.
//! Compiled only for the crate's own tests (`cfg(test)`), so it never ships
//! in the library or the binary. Integration tests use real providers (a
//! local key file, or aws-kms against moto), as the project's rules ask.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use super::{DataKey, KeyContext, KeyError, KeyProvider, WrappedKey};

/// An in-memory provider for unit tests: "wraps" by XOR with a constant
/// and the context, counts calls, and can be slowed down or made to fail.
#[derive(Default)]
pub struct MemProvider {
    /// Unwrap calls so far.
    pub unwraps: AtomicUsize,
    /// Generate calls so far.
    pub generates: AtomicUsize,
    /// Sleep in every unwrap (single-flight tests).
    pub delay: Duration,
    /// Unwraps fail as a disabled key would.
    pub fail: AtomicBool,
    /// Generates fail as an unreachable service would.
    pub fail_generate: AtomicBool,
}

fn xor(k: &[u8], ctx: &KeyContext) -> Vec<u8> {
    k.iter().enumerate().map(|(i, b)| b ^ 0x5a ^ ctx.file_id[i % 16] ^ ctx.volume_id[i % 16]).collect()
}

impl KeyProvider for MemProvider {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn key_id(&self) -> String {
        "mem:1".into()
    }
    fn generate(&self, ctx: &KeyContext) -> Result<(DataKey, WrappedKey), KeyError> {
        self.generates.fetch_add(1, Ordering::SeqCst);
        if self.fail_generate.load(Ordering::SeqCst) {
            return Err(KeyError::Unavailable("mem: down".into()));
        }
        let k = DataKey::generate().map_err(|e| KeyError::Other(e.to_string()))?;
        let w = self.wrap(&k, ctx)?;
        Ok((k, w))
    }
    fn wrap(&self, key: &DataKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        Ok(WrappedKey { provider: "mem".into(), key_id: self.key_id(), blob: xor(key.expose_secret(), ctx) })
    }
    fn unwrap(&self, w: &WrappedKey, ctx: &KeyContext) -> Result<DataKey, KeyError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if self.fail.load(Ordering::SeqCst) {
            return Err(KeyError::Disabled { key: "mem:1".into() });
        }
        DataKey::from_slice(&xor(&w.blob, ctx)).ok_or(KeyError::InvalidCiphertext { key: "mem:1".into() })
    }
    fn rewrap(&self, w: &WrappedKey, ctx: &KeyContext) -> Result<WrappedKey, KeyError> {
        let k = self.unwrap(w, ctx)?;
        self.wrap(&k, ctx)
    }
    fn check(&self) -> Result<(), KeyError> {
        Ok(())
    }
}
