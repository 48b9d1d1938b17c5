//! The background mount: the command re-runs itself in the foreground,
//! detached, and waits on a pipe until the child says the mount serves (or
//! why it failed, with the exit code it exits with).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use super::MountError;
use crate::daemon;
use crate::keys::local::LocalProvider;

/// Environment variable naming the pipe that carries a `--key-file -` key
/// from the mount command to its daemon child.
const KEY_FD_ENV: &str = "KMSFS_KEY_FD";

/// Whether this process is the daemon child of a background mount.
pub fn in_daemon_child() -> bool {
    std::env::var_os(daemon::READY_FD_ENV).is_some()
}

/// A pipe holding `text`, whose read end (returned) a child inherits; the
/// write end is closed here, so the child reads the key and then EOF.
fn key_pipe(text: &[u8]) -> std::io::Result<OwnedFd> {
    let (r, w) = daemon::pipe()?;
    crate::sys::set_cloexec(&r, false)?;
    crate::sys::set_cloexec(&w, true)?;
    // A key is far below the pipe's capacity: this never blocks.
    std::fs::File::from(w).write_all(text)?;
    Ok(r)
}

/// Starts this executable with `args` (a foreground mount) as the daemon,
/// and returns once it reports the mount ready, or with its failure. A key
/// read from standard input (`--key-file -`) goes to it through a pipe,
/// never through a file or an argument.
pub fn spawn_daemon(args: Vec<OsString>) -> Result<(), MountError> {
    let (r, w) = daemon::pipe().map_err(|e| MountError::Other(e.to_string()))?;
    let exe = std::env::current_exe().map_err(|e| MountError::Other(e.to_string()))?;
    let mut cmd = std::process::Command::new(exe);
    let key_fd = match LocalProvider::stdin_key_text() {
        Some(text) => Some(key_pipe(&text).map_err(|e| MountError::Other(e.to_string()))?),
        None => None,
    };
    if let Some(fd) = &key_fd {
        cmd.env(KEY_FD_ENV, fd.as_raw_fd().to_string());
    }
    cmd.args(args)
        .env(daemon::READY_FD_ENV, w.as_raw_fd().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.spawn().map_err(|e| MountError::Mount(format!("cannot start the daemon: {e}")))?;
    drop(w);
    drop(key_fd);
    match daemon::wait_ready(r) {
        Ok(()) => Ok(()),
        Err(msg) => {
            let _ = child.id();
            let (code, msg) = match msg.strip_prefix("exit=").and_then(|m| m.split_once(' ')) {
                Some((c, m)) => (c.parse().ok(), m),
                None => (None, msg.as_str()),
            };
            Err(MountError::Daemon { code, msg: msg.trim_start_matches("kmsfs: ").to_string() })
        }
    }
}

/// In the daemon child, before any thread starts: takes the key its parent
/// passed through the pipe, if any.
pub fn take_piped_key() -> Result<(), MountError> {
    let key_pipe = |e: std::io::Error| MountError::Other(format!("key pipe: {e}"));
    let Some(fd) = crate::sys::take_inherited_fd(KEY_FD_ENV).map_err(key_pipe)? else { return Ok(()) };
    let mut text = zeroize::Zeroizing::new(Vec::with_capacity(80));
    std::fs::File::from(fd).take(256).read_to_end(&mut text).map_err(key_pipe)?;
    LocalProvider::set_stdin_key(text);
    Ok(())
}
