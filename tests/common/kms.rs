//! Shared KMS-harness helpers: the SDK admin client for test set-up and
//! the kms-proxy control API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_kms::Client;

pub const START_HINT: &str =
    "start the harness: scripts/harness/kms-server.sh start DIR && . DIR/env (scripts/test.sh does this)";

/// True if the harness is there; false (after a visible SKIPPED line) if the
/// tests are switched off; panics otherwise so a missing server never passes.
pub fn harness(test: &str) -> bool {
    let endpoint = std::env::var("AWS_ENDPOINT_URL_KMS").ok().filter(|s| !s.is_empty());
    let proxy = std::env::var("KMSFS_TEST_KMS_PROXY").ok().filter(|s| !s.is_empty());
    if endpoint.is_some() && proxy.is_some() {
        return true;
    }
    if std::env::var("KMSFS_SKIP_KMS_TESTS").as_deref() == Ok("1") {
        super::skipped(test, "no KMS harness and KMSFS_SKIP_KMS_TESTS=1");
        return false;
    }
    panic!("{START_HINT} (AWS_ENDPOINT_URL_KMS and KMSFS_TEST_KMS_PROXY must both be set)");
}

/// The first line of every test that calls KMS: without the harness it
/// panics, or, with KMSFS_SKIP_KMS_TESTS=1, prints SKIPPED and returns.
/// A test that also mounts follows it with `require_mount!()`.
#[macro_export]
macro_rules! require_kms {
    () => {
        if !$crate::common::kms::harness($crate::fn_name!()) {
            return;
        }
    };
}

pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("test runtime")
    })
}

/// An SDK client for test set-up (CreateKey, DisableKey, ...), configured
/// from the same environment as the provider.
pub fn admin() -> &'static Client {
    static CLIENT: OnceLock<Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let conf = rt().block_on(aws_config::defaults(BehaviorVersion::latest()).load());
        Client::new(&conf)
    })
}

pub struct TestKey {
    pub id: String,
    pub arn: String,
}

pub fn create_key(what: &str) -> TestKey {
    let out = rt().block_on(admin().create_key().description(format!("kmsfs test: {what}")).send()).expect("CreateKey");
    let meta = out.key_metadata().expect("KeyMetadata");
    TestKey { id: meta.key_id().to_string(), arn: meta.arn().expect("Arn").to_string() }
}

pub fn create_alias(key: &TestKey, what: &str) -> String {
    let name = format!("alias/kmsfs-test-{what}-{}", &key.id[..8]);
    rt().block_on(admin().create_alias().alias_name(&name).target_key_id(&key.id).send()).expect("CreateAlias");
    name
}

pub fn disable(key: &TestKey) {
    rt().block_on(admin().disable_key().key_id(&key.id).send()).expect("DisableKey");
}

pub fn enable(key: &TestKey) {
    rt().block_on(admin().enable_key().key_id(&key.id).send()).expect("EnableKey");
}

/// One request to the proxy's control API; returns the JSON body.
pub fn proxy(method: &str, path: &str) -> serde_json::Value {
    let base = std::env::var("KMSFS_TEST_KMS_PROXY").expect(START_HINT);
    let hostport = base.trim_start_matches("http://").trim_end_matches('/');
    let mut s = TcpStream::connect(hostport).expect("connect to kms-proxy");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(
        s,
        "{method} /__proxy/{path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "proxy {path}: {head}\n{body}");
    serde_json::from_str(body).expect("JSON body")
}

/// Calls per operation on one key, as the proxy saw them (retries included).
pub fn count(key: &TestKey, op: &str) -> u64 {
    proxy("GET", &format!("counts?key={}", key.id))[op].as_u64().unwrap_or(0)
}

/// Every call the proxy saw on one key, whatever the operation.
pub fn total(key: &TestKey) -> u64 {
    let c = proxy("GET", &format!("counts?key={}", key.id));
    c.as_object().expect("counts by operation").values().filter_map(|v| v.as_u64()).sum()
}

/// A KMS outage for one key (the proxy resets every call on it), so tests
/// running alongside are not affected; ends when dropped.
pub struct Outage(String);

impl Outage {
    pub fn start(key: &TestKey) -> Self {
        proxy("POST", &format!("down?on=1&key={}", key.id));
        Outage(key.id.clone())
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        proxy("POST", &format!("down?on=0&key={}", self.0));
    }
}

/// `kmsfs init CIPHER --kms-key KEY_REF EXTRA` in a fresh temporary directory.
pub fn kms_volume_with(key_ref: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let cipher = tmp.path().join("cipher");
    let (code, out) = super::run(&[&["init", super::p(&cipher), "--kms-key", key_ref], extra].concat());
    assert_eq!(code, 0, "init: {out}");
    (tmp, cipher)
}

/// An aws-kms volume with plaintext names, so tests find backing files.
pub fn kms_volume(key_ref: &str) -> (tempfile::TempDir, PathBuf) {
    kms_volume_with(key_ref, &["--plaintext-names"])
}

/// Serialises tests that change the proxy's global fault settings.
pub static FAULTS: Mutex<()> = Mutex::new(());

pub struct FaultGuard(#[allow(dead_code)] MutexGuard<'static, ()>);

impl Drop for FaultGuard {
    fn drop(&mut self) {
        proxy("POST", "clear-faults");
    }
}

pub fn faults() -> FaultGuard {
    let g = FAULTS.lock().unwrap_or_else(|e| e.into_inner());
    proxy("POST", "clear-faults");
    FaultGuard(g)
}
