#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The aws-kms provider against a real KMS API: moto_server behind
//! scripts/harness/kms-proxy.py, reached through aws-sdk-kms (no in-memory fakes).
//!
//! Start the harness first:
//!   scripts/harness/kms-server.sh start DIR && . DIR/env && cargo test --test aws_kms
//! With KMSFS_SKIP_KMS_TESTS=1 and no harness, every test says SKIPPED.
//!
//! Each test makes its own keys, so tests run in parallel. Proxy counts are
//! read per key for the same reason. Fault injection and latency are global
//! in the proxy: those tests hold `FAULTS` and clear faults when done.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::types::KeyState;
use kmsfs::keys::aws_kms::{AwsKmsOptions, AwsKmsProvider};
mod common;
use common::kms::*;
use kmsfs::keys::{KeyContext, KeyError, KeyProvider, WrappedKey};

/// Short retries and timeouts so fault tests finish quickly.
fn fast_opts() -> AwsKmsOptions {
    AwsKmsOptions {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        connect_timeout: Duration::from_secs(1),
        attempt_timeout: Duration::from_secs(3),
        operation_timeout: Duration::from_secs(8),
        ..AwsKmsOptions::default()
    }
}

fn provider(key_ref: &str) -> AwsKmsProvider {
    AwsKmsProvider::new(key_ref, fast_opts()).expect("provider")
}

fn ctx() -> KeyContext {
    let mut volume_id = [0u8; 16];
    let mut file_id = [0u8; 16];
    getrandom::fill(&mut volume_id).expect("random");
    getrandom::fill(&mut file_id).expect("random");
    KeyContext::file(volume_id, file_id)
}

#[test]
fn harness_reaches_server_through_sdk() {
    require_kms!();
    let key = create_key("list");
    let mut found = false;
    let mut marker = None;
    loop {
        let out = rt().block_on(admin().list_keys().set_marker(marker.take()).send()).expect("ListKeys");
        found |= out.keys().iter().any(|k| k.key_id() == Some(key.id.as_str()));
        match out.next_marker() {
            Some(m) if out.truncated() => marker = Some(m.to_string()),
            _ => break,
        }
    }
    assert!(found, "CreateKey'd key {} missing from ListKeys", key.id);
    // The SDK's requests pass through the proxy, which counts them.
    rt().block_on(admin().describe_key().key_id(&key.id).send()).expect("DescribeKey");
    assert_eq!(count(&key, "DescribeKey"), 1);
}

#[test]
fn generate_unwrap_round_trip() {
    require_kms!();
    let key = create_key("round trip");
    let p = provider(&key.id);
    assert_eq!(p.name(), "aws-kms");
    let c = ctx();
    let (dek, w) = p.generate(&c).expect("generate");
    assert_eq!(w.provider, "aws-kms");
    assert_eq!(w.key_id, key.arn, "stored key_id is the key ARN");
    assert!(!w.blob.is_empty());
    assert_eq!(p.key_id(), key.arn);
    let back = p.unwrap(&w, &c).expect("unwrap");
    assert_eq!(back.expose_secret(), dek.expose_secret());
    // Call budget: one GenerateDataKey, one Decrypt.
    assert_eq!(count(&key, "GenerateDataKey"), 1);
    assert_eq!(count(&key, "Decrypt"), 1);

    // wrap (Encrypt) of an existing DEK round-trips too.
    let c2 = ctx();
    let w2 = p.wrap(&dek, &c2).expect("wrap");
    assert_eq!(w2.key_id, key.arn);
    assert_eq!(p.unwrap(&w2, &c2).expect("unwrap").expose_secret(), dek.expose_secret());
    assert_eq!(count(&key, "Encrypt"), 1);
    assert_eq!(count(&key, "Decrypt"), 2);
}

#[test]
fn wrong_context_is_rejected() {
    require_kms!();
    let key = create_key("context");
    let p = provider(&key.arn);
    let c = ctx();
    let (_dek, w) = p.generate(&c).expect("generate");
    let other_file = KeyContext { file_id: ctx().file_id, ..c };
    let other_volume = KeyContext { volume_id: ctx().volume_id, ..c };
    for bad in [other_file, other_volume] {
        match p.unwrap(&w, &bad) {
            Err(KeyError::InvalidCiphertext { key: k }) => assert_eq!(k, key.arn),
            other => panic!("expected InvalidCiphertext, got {other:?}"),
        }
    }
    // A flipped bit in the blob is rejected the same way.
    let mut tampered = w.clone();
    let mid = tampered.blob.len() / 2;
    tampered.blob[mid] ^= 1;
    assert!(matches!(p.unwrap(&tampered, &c), Err(KeyError::InvalidCiphertext { .. })));
    // Wrong errors are not retried: three refusals, three Decrypts.
    assert_eq!(count(&key, "Decrypt"), 3);
}

#[test]
fn blob_of_another_key_is_refused() {
    require_kms!();
    let k1 = create_key("owner");
    let k2 = create_key("impostor");
    let p = provider(&k1.id);
    let c = ctx();
    let (_dek, w) = p.generate(&c).expect("generate");
    // A header claiming key 2 for key 1's blob: key 2 is not trusted, so
    // no request names it at all.
    let forged = WrappedKey { key_id: k2.arn.clone(), ..w.clone() };
    assert!(matches!(p.unwrap(&forged, &c), Err(KeyError::Untrusted { .. })));
    assert_eq!(count(&k2, "Decrypt"), 0);
    // When key 2 is trusted too, KMS itself refuses a blob of another key:
    // real KMS says IncorrectKeyException (InvalidCiphertext), moto
    // AccessDeniedException.
    let p = provider(&k1.id).with_trusted(std::slice::from_ref(&k2.arn));
    match p.unwrap(&forged, &c) {
        Err(KeyError::InvalidCiphertext { .. }) | Err(KeyError::AccessDenied { .. }) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn disabled_key_is_refused_then_recovers() {
    require_kms!();
    let key = create_key("disable");
    let p = provider(&key.id);
    let c = ctx();
    let (dek, w) = p.generate(&c).expect("generate");
    disable(&key);

    let err = p.unwrap(&w, &c).expect_err("disabled key must refuse Decrypt");
    assert_eq!(err, KeyError::Disabled { key: key.arn.clone() });
    assert!(err.is_denied());
    let msg = err.to_string();
    assert!(msg.contains(&key.arn) && msg.contains("enable"), "{msg}");
    assert!(matches!(p.generate(&ctx()), Err(KeyError::Disabled { .. })));
    assert!(matches!(p.wrap(&dek, &c), Err(KeyError::Disabled { .. })));
    // Refusals are not retried.
    assert_eq!(count(&key, "Decrypt"), 1);

    enable(&key);
    let back = p.unwrap(&w, &c).expect("unwrap after EnableKey");
    assert_eq!(back.expose_secret(), dek.expose_secret());
}

#[test]
fn pending_deletion_is_invalid_state() {
    require_kms!();
    let key = create_key("deletion");
    let p = provider(&key.id);
    let c = ctx();
    let (dek, w) = p.generate(&c).expect("generate");
    rt().block_on(admin().schedule_key_deletion().key_id(&key.id).pending_window_in_days(7).send())
        .expect("ScheduleKeyDeletion");

    match p.unwrap(&w, &c) {
        Err(e @ KeyError::InvalidState { .. }) => {
            assert!(e.is_denied());
            let msg = e.to_string();
            assert!(msg.contains(&key.arn) && msg.contains("pending deletion"), "{msg}");
        }
        other => panic!("expected InvalidState, got {other:?}"),
    }
    assert!(matches!(p.generate(&ctx()), Err(KeyError::InvalidState { .. })));
    assert!(matches!(p.check(), Err(KeyError::InvalidState { .. })));

    // Cancelling leaves the key disabled, as in real KMS; enabling restores it.
    rt().block_on(admin().cancel_key_deletion().key_id(&key.id).send()).expect("CancelKeyDeletion");
    assert!(matches!(p.unwrap(&w, &c), Err(KeyError::Disabled { .. })));
    enable(&key);
    assert_eq!(p.unwrap(&w, &c).expect("unwrap").expose_secret(), dek.expose_secret());
}

#[test]
fn throttling_is_retried_then_succeeds() {
    require_kms!();
    let key = create_key("throttle");
    let p = provider(&key.id);
    let c = ctx();
    let (dek, w) = p.generate(&c).expect("generate");
    let _g = faults();
    proxy("POST", &format!("throttle?count=2&op=Decrypt&key={}", key.id));
    let back = p.unwrap(&w, &c).expect("unwrap after two throttles");
    assert_eq!(back.expose_secret(), dek.expose_secret());
    assert_eq!(count(&key, "Decrypt"), 3, "two throttled attempts and one success");
}

#[test]
fn persistent_throttling_is_throttled_within_budget() {
    require_kms!();
    let key = create_key("throttle forever");
    let p = provider(&key.id);
    let opts = fast_opts();
    let _g = faults();
    proxy("POST", &format!("throttle?count=100&op=GenerateDataKey&key={}", key.id));
    let start = Instant::now();
    let err = p.generate(&ctx()).expect_err("throttled");
    let took = start.elapsed();
    assert!(matches!(err, KeyError::Throttled(d) if d <= took), "{err:?}");
    assert!(took < opts.operation_timeout, "took {took:?}");
    assert_eq!(count(&key, "GenerateDataKey"), u64::from(opts.max_attempts));
}

#[test]
fn server_errors_are_retried_then_succeed() {
    require_kms!();
    let key = create_key("5xx");
    let p = provider(&key.id);
    let c = ctx();
    let _g = faults();
    proxy("POST", &format!("error5xx?count=2&status=503&op=GenerateDataKey&key={}", key.id));
    let (dek, w) = p.generate(&c).expect("generate after two 503s");
    assert_eq!(count(&key, "GenerateDataKey"), 3);
    proxy("POST", &format!("error5xx?count=2&op=Decrypt&key={}", key.id));
    assert_eq!(p.unwrap(&w, &c).expect("unwrap after two 500s").expose_secret(), dek.expose_secret());
    assert_eq!(count(&key, "Decrypt"), 3);

    // Past the retry budget it is Unavailable, not a key refusal.
    proxy("POST", &format!("error5xx?count=100&op=Decrypt&key={}", key.id));
    let err = p.unwrap(&w, &c).expect_err("persistent 500");
    assert!(matches!(err, KeyError::Unavailable(_)), "{err:?}");
    assert!(!err.is_denied());
}

#[test]
fn unreachable_endpoint_is_unavailable_in_bounded_time() {
    require_kms!();
    // A port that was just free and is now closed: connection refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let opts = AwsKmsOptions { endpoint_url: Some(format!("http://127.0.0.1:{port}")), ..fast_opts() };
    let budget = opts.operation_timeout;
    let p = AwsKmsProvider::new("alias/unreachable", opts).expect("provider");
    let start = Instant::now();
    let err = p.check().expect_err("nothing listens");
    let took = start.elapsed();
    assert!(matches!(err, KeyError::Unavailable(_)), "{err:?}");
    assert!(took < budget + Duration::from_secs(2), "took {took:?}");
    assert!(err.to_string().starts_with("KMS unavailable"), "{err}");
}

#[test]
fn slow_server_hits_attempt_timeout_and_is_unavailable() {
    require_kms!();
    let key = create_key("slow");
    let opts = AwsKmsOptions {
        attempt_timeout: Duration::from_millis(300),
        operation_timeout: Duration::from_secs(3),
        ..fast_opts()
    };
    let p = AwsKmsProvider::new(&key.id, opts).expect("provider");
    let _g = faults();
    proxy("POST", "latency?ms=700");
    let start = Instant::now();
    let err = p.generate(&ctx()).expect_err("every attempt times out");
    let took = start.elapsed();
    proxy("POST", "latency?ms=0");
    assert!(matches!(err, KeyError::Unavailable(_)), "{err:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(count(&key, "GenerateDataKey") >= 2, "attempt timeouts are retried");
}

#[test]
fn alias_and_alias_arn_resolve_to_key_arn() {
    require_kms!();
    let key = create_key("alias");
    let alias = create_alias(&key, "alias");
    // alias ARN: the key ARN with key/ID replaced by the alias name.
    let prefix = key.arn.split(":key/").next().expect("ARN prefix");
    let alias_arn = format!("{prefix}:{alias}");
    for r in [alias.as_str(), alias_arn.as_str()] {
        let p = provider(r);
        assert_eq!(p.key_id(), r, "unresolved before any call");
        let c = ctx();
        let (dek, w) = p.generate(&c).expect("generate via alias");
        assert_eq!(w.key_id, key.arn, "header stores the key ARN, not the alias");
        assert_eq!(p.key_id(), key.arn);
        assert_eq!(p.unwrap(&w, &c).expect("unwrap").expose_secret(), dek.expose_secret());
        let p2 = provider(r);
        p2.check().expect("check via alias");
        assert_eq!(p2.key_id(), key.arn, "check resolves the alias");
    }
    // The alias of a disabled key is refused naming the key, not the alias.
    disable(&key);
    let err = provider(&alias).generate(&ctx()).expect_err("disabled");
    assert_eq!(err, KeyError::Disabled { key: key.arn.clone() });
}

#[test]
fn rewrap_to_second_key_survives_disabling_first() {
    require_kms!();
    let k1 = create_key("rewrap source");
    let k2 = create_key("rewrap destination");
    let p1 = provider(&k1.id);
    // The destination may name the source key only because it trusts it.
    assert!(matches!(
        provider(&k2.id).rewrap(&p1.generate(&ctx()).expect("g").1, &ctx()),
        Err(KeyError::Untrusted { .. })
    ));
    let p2 = provider(&k2.id).with_trusted(std::slice::from_ref(&k1.arn));
    let c = ctx();
    let (dek, w1) = p1.generate(&c).expect("generate");
    let w2 = p2.rewrap(&w1, &c).expect("ReEncrypt");
    assert_eq!(w2.key_id, k2.arn);
    assert_ne!(w2.blob, w1.blob);
    assert_eq!(count(&k2, "ReEncrypt"), 1);
    assert_eq!(count(&k2, "Decrypt"), 0, "ReEncrypt keeps the plaintext in KMS");

    disable(&k1);
    assert!(matches!(p1.unwrap(&w1, &c), Err(KeyError::Disabled { .. })));
    assert_eq!(p2.unwrap(&w2, &c).expect("unwrap rewrapped").expose_secret(), dek.expose_secret());
    // Rewrapping from the disabled key is refused, naming it.
    assert_eq!(p2.rewrap(&w1, &c).expect_err("source disabled"), KeyError::Disabled { key: k1.arn });
    // And the rewrapped key is bound to the same context.
    assert!(matches!(p2.unwrap(&w2, &ctx()), Err(KeyError::InvalidCiphertext { .. })));
}

#[test]
fn rotation_keeps_old_wrapped_keys_unwrappable() {
    require_kms!();
    let key = create_key("rotation");
    let p = provider(&key.id);
    let c_old = ctx();
    let (old, w_old) = p.generate(&c_old).expect("generate");
    rt().block_on(admin().enable_key_rotation().key_id(&key.id).send()).expect("EnableKeyRotation");
    let status = rt().block_on(admin().get_key_rotation_status().key_id(&key.id).send()).expect("GetKeyRotationStatus");
    assert!(status.key_rotation_enabled());
    rt().block_on(admin().rotate_key_on_demand().key_id(&key.id).send()).expect("RotateKeyOnDemand");
    let c_new = ctx();
    let (new, w_new) = p.generate(&c_new).expect("generate after rotation");
    assert_eq!(w_new.key_id, key.arn, "rotation keeps the key ARN");
    assert_eq!(p.unwrap(&w_old, &c_old).expect("old DEK").expose_secret(), old.expose_secret());
    assert_eq!(p.unwrap(&w_new, &c_new).expect("new DEK").expose_secret(), new.expose_secret());
}

#[test]
fn check_fails_fast_for_disabled_and_passes_for_good() {
    require_kms!();
    let good = create_key("check good");
    let p = provider(&good.id);
    p.check().expect("check on an enabled key");
    assert_eq!(p.key_id(), good.arn);
    assert_eq!(count(&good, "DescribeKey"), 1);
    assert_eq!(count(&good, "GenerateDataKey"), 1);

    let bad = create_key("check disabled");
    disable(&bad);
    let p = provider(&bad.id);
    let start = Instant::now();
    let err = p.check().expect_err("disabled");
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    assert_eq!(err, KeyError::Disabled { key: bad.arn.clone() });
    assert_eq!(count(&bad, "DescribeKey"), 1, "no retries on a refusal");
    assert_eq!(count(&bad, "GenerateDataKey"), 0);
}

#[test]
fn missing_key_is_not_found() {
    require_kms!();
    let p = provider("alias/kmsfs-test-no-such-alias");
    assert!(matches!(p.check(), Err(KeyError::NotFound { .. })));
    let p = provider("11111111-2222-3333-4444-555555555555");
    assert!(matches!(p.generate(&ctx()), Err(KeyError::NotFound { .. })));
}

#[test]
fn missing_credentials_is_no_credentials() {
    require_kms!();
    #[derive(Debug)]
    struct NoCredentials;
    impl aws_sdk_kms::config::ProvideCredentials for NoCredentials {
        fn provide_credentials<'a>(&'a self) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            aws_credential_types::provider::future::ProvideCredentials::ready(Err(
                aws_credential_types::provider::error::CredentialsError::not_loaded("no credentials in this test"),
            ))
        }
    }
    let key = create_key("no credentials");
    let sdk = rt().block_on(aws_config::defaults(BehaviorVersion::latest()).credentials_provider(NoCredentials).load());
    let p = AwsKmsProvider::from_sdk_config(&key.id, &sdk, fast_opts()).expect("provider");
    let start = Instant::now();
    assert_eq!(p.check(), Err(KeyError::NoCredentials));
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    assert_eq!(count(&key, "DescribeKey"), 0, "nothing was sent");
}

#[test]
fn concurrent_calls_from_plain_threads() {
    require_kms!();
    let key = create_key("threads");
    let p = Arc::new(provider(&key.id));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let p = Arc::clone(&p);
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let c = ctx();
                    let (dek, w) = p.generate(&c).expect("generate");
                    let back = p.unwrap(&w, &c).expect("unwrap");
                    assert_eq!(back.expose_secret(), dek.expose_secret());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(count(&key, "GenerateDataKey"), 40);
    assert_eq!(count(&key, "Decrypt"), 40);
}

#[test]
fn called_inside_a_runtime_fails_instead_of_panicking() {
    require_kms!();
    let key = create_key("in runtime");
    let p = provider(&key.id);
    let err = rt().block_on(async { p.generate(&ctx()) }).expect_err("inside runtime");
    assert!(err.to_string().contains("async runtime"), "{err}");
    assert!(matches!(
        rt().block_on(async { admin().describe_key().key_id(&key.id).send().await }),
        Ok(out) if out.key_metadata().and_then(|m| m.key_state()) == Some(&KeyState::Enabled)
    ));
}
