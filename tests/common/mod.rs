#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real-mount test helpers: a guard that mounts a fresh volume with the
//! kmsfs binary and unmounts (and reaps the daemon) on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_kmsfs");

/// Whether real mounts can run here; if not, the test must be explicitly
/// allowed to skip (KMSFS_SKIP_MOUNT_TESTS=1), so it never passes silently.
pub fn fuse_available(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root && Path::new("/dev/fuse").exists() {
        return true;
    }
    if std::env::var_os("KMSFS_SKIP_MOUNT_TESTS").is_some() {
        eprintln!("SKIPPED {test}: needs root and /dev/fuse");
        return false;
    }
    panic!("{test} needs root and /dev/fuse; set KMSFS_SKIP_MOUNT_TESTS=1 to skip explicitly");
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
}

pub struct Mounted {
    pub mnt: PathBuf,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Mounted {
    pub fn start(cipher: &Path, mnt: &Path, opts: &[&str]) -> Self {
        std::fs::create_dir_all(mnt).expect("mkdir mountpoint");
        let log = mnt.with_extension("log");
        let mut cmd = Command::new(BIN);
        cmd.arg("mount").arg(cipher).arg(mnt).arg("-f").arg("--log-file").arg(&log);
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts.join(","));
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
        let t = Instant::now();
        while !mounted(mnt) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("mount exited with {st}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { mnt: mnt.to_path_buf(), child: Some(child), log }
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

pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}
pub mod kms;
