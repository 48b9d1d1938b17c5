#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The KMS test harness itself (scripts/harness/kms-proxy.py in front of
//! moto): every KMS test reads its call counts and relies on its outage
//! switch, so these check both through aws-sdk-kms against real moto.
//!
//! The client here does not retry, so one SDK call is one counted request.
//! Every test holds `faults()`: one of them takes all of KMS down.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_kms::Client;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use common::kms::*;

/// One attempt per call and short timeouts: a refused call fails at once.
fn client() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(2))
            .operation_timeout(Duration::from_secs(10))
            .build();
        let loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        Client::new(&rt().block_on(loader.load()))
    })
}

/// GenerateDataKey under `key_ref`: the wrapped blob, or the SDK's error.
fn generate(key_ref: &str) -> Result<Vec<u8>, String> {
    let call = client().generate_data_key().key_id(key_ref).key_spec(DataKeySpec::Aes256);
    match rt().block_on(call.send()) {
        Ok(out) => Ok(out.ciphertext_blob().expect("CiphertextBlob").as_ref().to_vec()),
        Err(e) => Err(format!("{:?}", aws_sdk_kms::error::DisplayErrorContext(&e))),
    }
}

/// Decrypt, naming the key as kmsfs does, or not (KMS finds it in the blob).
fn decrypt(blob: &[u8], key: Option<&str>) -> Result<(), String> {
    let call = client().decrypt().ciphertext_blob(Blob::new(blob)).set_key_id(key.map(String::from));
    rt().block_on(call.send()).map(drop).map_err(|e| format!("{:?}", aws_sdk_kms::error::DisplayErrorContext(&e)))
}

/// The proxy's counts on `key`, as (operation, calls), sorted.
fn counts(key: &TestKey) -> Vec<(String, u64)> {
    let c = proxy("GET", &format!("counts?key={}", key.id));
    let mut v: Vec<_> = c.as_object().unwrap().iter().map(|(op, n)| (op.clone(), n.as_u64().unwrap())).collect();
    v.sort();
    v
}

fn pairs(expected: &[(&str, u64)]) -> Vec<(String, u64)> {
    expected.iter().map(|(op, n)| (op.to_string(), *n)).collect()
}

#[test]
fn counts_are_per_operation_and_per_key() {
    require_kms!();
    let _g = faults();
    let a = create_key("proxy-counts-a");
    let b = create_key("proxy-counts-b");
    let alias = create_alias(&b, "proxy-counts");
    let blob = generate(&a.id).unwrap();
    generate(&a.arn).unwrap();
    decrypt(&blob, Some(&a.id)).unwrap();
    // By alias, and Decrypt that names no key: both counted on the key
    // that did the work (asked of moto, or read from its answer).
    let blob_b = generate(&alias).unwrap();
    decrypt(&blob_b, None).unwrap();
    decrypt(&blob_b, Some(&alias)).unwrap();
    assert_eq!(counts(&a), pairs(&[("Decrypt", 1), ("GenerateDataKey", 2)]));
    assert_eq!(counts(&b), pairs(&[("Decrypt", 2), ("GenerateDataKey", 1)]));
    assert_eq!(count(&a, "Encrypt"), 0, "an operation never called counts 0");
    assert_eq!(total(&a), 3);
    // The global counts include every key's.
    let all = proxy("GET", "counts");
    assert!(all["GenerateDataKey"].as_u64().unwrap() >= 3, "{all}");
    assert!(all["Decrypt"].as_u64().unwrap() >= 3, "{all}");
}

#[test]
fn down_on_one_key_fails_its_calls_until_down_off() {
    require_kms!();
    let _g = faults();
    let a = create_key("proxy-down-a");
    let b = create_key("proxy-down-b");
    let blob = generate(&a.id).unwrap();
    proxy("POST", &format!("down?on=1&key={}", a.id));
    let e = generate(&a.id).expect_err("GenerateDataKey on a key that is down");
    assert!(!e.contains("Exception"), "an outage has no KMS answer, only a reset connection: {e}");
    decrypt(&blob, Some(&a.arn)).expect_err("Decrypt naming a key that is down");
    decrypt(&blob, None).expect_err("Decrypt of a blob under a key that is down");
    // Other keys are served, and the refused calls were counted.
    generate(&b.id).expect("GenerateDataKey on another key");
    assert_eq!(counts(&a), pairs(&[("Decrypt", 2), ("GenerateDataKey", 2)]));
    proxy("POST", &format!("down?on=0&key={}", a.id));
    generate(&a.id).expect("GenerateDataKey after down?on=0");
    decrypt(&blob, Some(&a.id)).expect("Decrypt after down?on=0");
    decrypt(&blob, None).expect("Decrypt naming no key after down?on=0");
    assert_eq!(counts(&a), pairs(&[("Decrypt", 4), ("GenerateDataKey", 3)]));
}

#[test]
fn down_for_all_fails_every_call_until_down_off() {
    require_kms!();
    let _g = faults();
    let a = create_key("proxy-down-all");
    proxy("POST", "down?on=1");
    let e = generate(&a.id).expect_err("GenerateDataKey while KMS is down");
    assert!(!e.contains("Exception"), "{e}");
    assert!(rt().block_on(client().list_keys().send()).is_err(), "ListKeys while KMS is down");
    // The control API itself stays up.
    assert_eq!(proxy("GET", "health")["ok"], true);
    proxy("POST", "down?on=0");
    generate(&a.id).expect("GenerateDataKey after down?on=0");
    assert_eq!(counts(&a), pairs(&[("GenerateDataKey", 2)]));
    // clear-faults ends an outage too (what every faults() guard relies on).
    proxy("POST", &format!("down?on=1&key={}", a.id));
    proxy("POST", "clear-faults");
    generate(&a.id).expect("GenerateDataKey after clear-faults");
}

#[test]
fn a_disabled_key_is_refused_as_real_kms_refuses_it() {
    require_kms!();
    let _g = faults();
    let a = create_key("proxy-disabled");
    let blob = generate(&a.id).unwrap();
    disable(&a);
    let e = generate(&a.id).expect_err("GenerateDataKey on a disabled key");
    assert!(e.contains("DisabledException"), "{e}");
    let e = decrypt(&blob, Some(&a.id)).expect_err("Decrypt under a disabled key");
    assert!(e.contains("DisabledException"), "{e}");
    assert_eq!(proxy("GET", "keys")[&a.id], "Disabled");
    enable(&a);
    decrypt(&blob, Some(&a.id)).expect("Decrypt after EnableKey");
}
