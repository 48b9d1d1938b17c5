//! Running commands as a user would: the kmsfs binary (exit code and
//! output) and shell commands as an unprivileged user.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::BIN;

/// A path as a command-line argument (test paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn joined(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// `kmsfs ARGS` with standard input closed: (exit code, stdout, stderr).
pub fn run_split<S: AsRef<OsStr>>(args: &[S]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
    (code(&out), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `kmsfs!(a, b, ...)`: `run_split` with arguments of mixed types (str, Path,
/// OsString).
#[macro_export]
macro_rules! kmsfs {
    ($($a:expr),* $(,)?) => {
        $crate::common::cli::run_split(&[$(std::ffi::OsStr::new(&$a)),*])
    };
}

/// `kmsfs ARGS` with standard input closed: (exit code, stdout then stderr).
pub fn run<S: AsRef<OsStr>>(args: &[S]) -> (i32, String) {
    run_env(args, &[])
}

/// `run` with extra environment variables.
pub fn run_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &OsStr)]) -> (i32, String) {
    let out =
        Command::new(BIN).args(args).envs(env.iter().map(|(k, v)| (*k, *v))).stdin(Stdio::null()).output().unwrap();
    (code(&out), joined(&out))
}

/// `kmsfs ARGS` with `stdin` piped in: (exit code, stdout then stderr).
pub fn run_stdin(args: &[&str], stdin: &[u8]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (code(&out), joined(&out))
}

/// The uid and gid of `nobody`, the unprivileged local user in attacks.
pub const NOBODY: u32 = 65534;

/// Runs `cmd` with `sh -c` as nobody (no groups) in `dir`, killed after
/// 30 s: (success, stdout then stderr).
pub fn nobody(dir: &Path, cmd: &str) -> (bool, String) {
    let out = Command::new("timeout")
        .args(["30", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", cmd])
        .current_dir(dir)
        .output()
        .expect("setpriv");
    (out.status.success(), joined(&out))
}
