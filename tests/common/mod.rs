#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real-mount test helpers: a guard that mounts a fresh volume with the
//! kmsfs binary and unmounts (and reaps the daemon) on drop.
#![allow(dead_code)]

pub mod cli;
pub mod kms;

pub use cli::*;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_kmsfs");

/// Whether real mounts can run here; if not, the test must be explicitly
/// allowed to skip (KMSFS_SKIP_MOUNT_TESTS=1), so it never passes silently.
/// Tests call it through `require_mount!()` or `can_mount!()`.
pub fn fuse_available(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root && Path::new("/dev/fuse").exists() {
        return true;
    }
    if std::env::var_os("KMSFS_SKIP_MOUNT_TESTS").is_some() {
        skipped(test, "needs root and /dev/fuse");
        return false;
    }
    panic!("{test} needs root and /dev/fuse; set KMSFS_SKIP_MOUNT_TESTS=1 to skip explicitly");
}

/// Whether every program in `tools` is installed; if one is not, the test
/// must be explicitly allowed to skip (KMSFS_SKIP_MOUNT_TESTS=1).
/// Tests call it through `require_tools!(...)`.
pub fn tools_available(test: &str, tools: &[&str]) -> bool {
    for tool in tools {
        if sh(&format!("command -v {tool}")).0 {
            continue;
        }
        if std::env::var_os("KMSFS_SKIP_MOUNT_TESTS").is_some() {
            skipped(test, &format!("{tool} not installed"));
            return false;
        }
        panic!("{test}: {tool} not installed (scripts/install-deps.sh --for test installs it)");
    }
    true
}

/// A visible SKIPPED line. Straight to stderr: libtest captures the
/// `eprintln!` of passing tests, and a skip must not look like a pass.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The name of the function it stands in (a test's name, for SKIPPED lines).
#[macro_export]
macro_rules! fn_name {
    () => {{
        fn here() {}
        let full = std::any::type_name_of_val(&here);
        let full = full.strip_suffix("::here").unwrap_or(full);
        full.rsplit("::").next().unwrap_or(full)
    }};
}

/// Whether this test can mount (see `fuse_available`), for a test whose
/// offline part runs everywhere and whose mount part is optional.
#[macro_export]
macro_rules! can_mount {
    () => {
        $crate::common::fuse_available($crate::fn_name!())
    };
}

/// The first line of every test that mounts: without root and /dev/fuse it
/// panics, or, with KMSFS_SKIP_MOUNT_TESTS=1, prints SKIPPED and returns.
#[macro_export]
macro_rules! require_mount {
    () => {
        if !$crate::can_mount!() {
            return;
        }
    };
}

/// Like `require_mount!`, for programs a test runs (rsync, systemd-analyze).
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+ $(,)?) => {
        if !$crate::common::tools_available($crate::fn_name!(), &[$($tool),+]) {
            return;
        }
    };
}

pub fn mounted(mnt: &Path) -> bool {
    let Ok(abs) = std::fs::canonicalize(mnt) else { return false };
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&abs.to_string_lossy())))
        .unwrap_or(false)
}

pub struct Volume {
    pub tmp: tempfile::TempDir,
    pub cipher: PathBuf,
    pub key: PathBuf,
}

impl Volume {
    /// A volume with encrypted names (the default).
    pub fn new() -> Self {
        Self::with_args(&[])
    }
    /// A volume with plaintext names, for tests that poke at backing files.
    pub fn plain() -> Self {
        Self::with_args(&["--plaintext-names"])
    }
    pub fn with_args(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cipher = tmp.path().join("cipher");
        let key = tmp.path().join("vol.key");
        let out = Command::new(BIN)
            .arg("init")
            .arg(&cipher)
            .arg("--key-file")
            .arg(&key)
            .args(extra)
            .output()
            .expect("run kmsfs init");
        assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
        Self { tmp, cipher, key }
    }

    pub fn mount(&self, name: &str, opts: &[&str]) -> Mounted {
        Mounted::start(&self.cipher, &self.tmp.path().join(name), opts)
    }

    /// kmsfs.conf as JSON.
    pub fn config(&self) -> serde_json::Value {
        config_of(&self.cipher)
    }

    /// Overwrites kmsfs.conf, as a writer of the cipher dir would.
    pub fn set_config(&self, c: &serde_json::Value) {
        set_config_of(&self.cipher, c)
    }

    /// The backing path of plaintext path `rel` (`kmsfs path`, offline).
    pub fn backing(&self, rel: &str) -> PathBuf {
        let o = Command::new(BIN).arg("path").arg(&self.cipher).arg(rel).output().unwrap();
        assert!(o.status.success(), "kmsfs path {rel}: {}", String::from_utf8_lossy(&o.stderr));
        PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
    }
}

/// The kmsfs.conf of a cipher dir as JSON.
pub fn config_of(cipher: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(cipher.join("kmsfs.conf")).unwrap()).unwrap()
}

/// Overwrites the kmsfs.conf of a cipher dir, as its writer would.
pub fn set_config_of(cipher: &Path, c: &serde_json::Value) {
    std::fs::write(cipher.join("kmsfs.conf"), serde_json::to_vec_pretty(c).unwrap()).unwrap();
}

pub struct Mounted {
    pub mnt: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Mounted {
    /// `kmsfs mount CIPHER MNT -f -o OPTS`, up and serving.
    pub fn start(cipher: &Path, mnt: &Path, opts: &[&str]) -> Self {
        let o = opts.join(",");
        let args: &[&str] = if opts.is_empty() { &[] } else { &["-o", &o] };
        Self::start_with(cipher, mnt, args, &[])
    }

    /// `kmsfs mount CIPHER MNT -f ARGS` with extra environment (another
    /// host's trust store, say), up and serving.
    pub fn start_with(cipher: &Path, mnt: &Path, args: &[&str], env: &[(&str, &OsStr)]) -> Self {
        std::fs::create_dir_all(mnt).expect("mkdir mountpoint");
        let log = mnt.with_extension("log");
        let child = Command::new(BIN)
            .arg("mount")
            .arg(cipher)
            .arg(mnt)
            .arg("-f")
            .arg("--log-file")
            .arg(&log)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut m = Self { mnt: mnt.to_path_buf(), child: Some(child), log };
        wait_until("the mount to come up", 20, || {
            if let Some(Ok(Some(st))) = m.child.as_mut().map(Child::try_wait) {
                panic!("mount exited with {st}: {}", m.log());
            }
            mounted(mnt)
        });
        m
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's WARN and ERROR lines so far.
    pub fn noisy_log_lines(&self) -> Vec<String> {
        self.log().lines().filter(|l| l.contains(" WARN ") || l.contains(" ERROR ")).map(String::from).collect()
    }

    /// `kmsfs stats --json` of this mount: (exit status ok, output).
    pub fn stats_json(&self) -> (bool, String) {
        sh(&format!("{BIN} stats {} --json", self.mnt.display()))
    }

    /// kill -9 the daemon and clear the stale mount.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("fusermount3").arg("-uz").arg(&self.mnt).status();
    }

    pub fn unmount(&mut self) {
        if self.child.is_none() {
            return;
        }
        for i in 0..50 {
            let flag = if i < 40 { "-u" } else { "-uz" };
            let ok = Command::new("fusermount3").arg(flag).arg(&self.mnt).stderr(Stdio::null()).status();
            if ok.is_ok_and(|s| s.success()) || !mounted(&self.mnt) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.child.take() {
            let t = Instant::now();
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    _ if t.elapsed() > Duration::from_secs(10) => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.unmount();
    }
}

pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: deterministic and fast; content, not secrecy, matters here.
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// Polls `f` until it holds (every 20 ms for a second, then every 100 ms);
/// fails the test after `secs`.
pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for {what}");
        let pause = if t.elapsed() < Duration::from_secs(1) { 20 } else { 100 };
        std::thread::sleep(Duration::from_millis(pause));
    }
}

pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}
